// KV cache byte layouts of SPEC §3 and the per-token quantize / per-element dequantize math.
// Everything here is SMLA_HD so the CPU loops and the CUDA kernels share one definition.
#pragma once
#include <math.h>
#include <stdint.h>

#include "formats.h"

namespace smla {

// Power-of-two tile scale: the smallest e with 448 * 2^e >= max(amax, 1e-4), clamped to the
// ue8m0 byte range [0, 254] (e in [-127, 127]). amax is the largest |x| of the tile with NaN
// ignored; an infinite amax gives e = 127. Exact: the candidate from log2 is corrected by
// exact comparisons, so no rounding of log2 can move it.
SMLA_HD int32_t tile_scale_exponent(float amax) {
  const float m = amax > 1e-4f ? amax : 1e-4f;
  if (isinf(m)) return 127;
  int32_t e = int32_t(ceilf(log2f(m / 448.0f)));
  if (e > 127) e = 127;
  if (e < -127) e = -127;
  while (e < 127 && ldexpf(448.0f, e) < m) ++e;
  while (e > -127 && ldexpf(448.0f, e - 1) >= m) --e;
  return e;
}

// One e4m3 value of a tile: q = e4m3(clamp(x / 2^e, -448, 448)). float_to_e4m3 clamps and
// keeps NaN.
SMLA_HD uint8_t quantize_e4m3(float x, int32_t e) { return float_to_e4m3(x / ldexpf(1.0f, e)); }

// |x| max over n values, NaN ignored.
SMLA_HD float abs_max(const float* x, int n) {
  float a = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float v = fabsf(x[i]);
    if (v > a) a = v;
  }
  return a;
}

// One dequantized value, e4m3 code q times a float32 scale, as bf16 bits (SPEC §3): the product in
// float32, rounded to bf16. SPEC asks only for a NaN where one arises; its bits follow one rule on
// every path and build (the CPU's SIMD tiles send tiles with a NaN or infinite scale here):
//   NaN scale            -> the scale's NaN, quieted, top half, for every code (NaN codes included)
//   NaN code (0x7f/0xff) -> 0x7fc0 | the code's sign (any other scale)
//   ±0 code, ±inf scale  -> 0x7fc0
// Each is decided before the multiplication, which then has no NaN operand and no invalid case.
// Left to it, NaN x NaN keeps the operand the compiler happened to put first (GCC's -O2 and -O0
// differ on x86-64), 0 x inf is the ISA's default NaN (0xffc0 on x86-64, 0x7fc0 on AArch64), and
// CUDA's conversions make every NaN 0x7fff.
SMLA_HD uint16_t dequantize_e4m3(uint8_t q, float scale) {
  const uint32_t s = float_bits(scale) & 0x7fffffffu;
  if (s > 0x7f800000u) return uint16_t((float_bits(scale) >> 16) | 0x0040u);
  if ((q & 0x7fu) == 0x7fu) return uint16_t(0x7fc0u | uint32_t(q & 0x80u) << 8);
  if ((q & 0x7fu) == 0 && s == 0x7f800000u) return 0x7fc0u;
  return float_to_bf16(e4m3_to_float(q) * scale);
}

namespace v4 {
constexpr int kNopeDim = 448;
constexpr int kRopeDim = 64;
constexpr int kDim = 512;           // dequantized row: 448 nope + 64 rope
constexpr int kTile = 64;           // nope dims per ue8m0 scale
constexpr int kNumTiles = 7;
constexpr int kDataBytes = 576;     // 448 e4m3 + 64 bf16
constexpr int kScaleBytes = 8;      // 7 ue8m0 + 1 pad
constexpr int kTokenBytes = 584;
// Page size of a compact cache holding only the tokens one call reads or writes (ids 0..m-1):
// 72 tokens of 584 bytes fill 73 rows of 576 exactly, so its pages carry no padding.
constexpr int kCompactPageSize = 72;
static_assert(kCompactPageSize * kTokenBytes % kDataBytes == 0, "compact v4 pages are unpadded");

SMLA_HD int64_t page_bytes(int64_t page_size) {
  return (page_size * kTokenBytes + kDataBytes - 1) / kDataBytes * kDataBytes;
}
SMLA_HD int64_t data_offset(int64_t token_id, int64_t page_size) {
  return (token_id / page_size) * page_bytes(page_size) + (token_id % page_size) * kDataBytes;
}
SMLA_HD int64_t scale_offset(int64_t token_id, int64_t page_size) {
  return (token_id / page_size) * page_bytes(page_size) + page_size * kDataBytes +
         (token_id % page_size) * kScaleBytes;
}

// Quantize one token (x: 512 floats) into its data (576 B) and scale (8 B) records.
SMLA_HD void quantize_token(const float* x, uint8_t* data, uint8_t* scales) {
  for (int t = 0; t < kNumTiles; ++t) {
    const int32_t e = tile_scale_exponent(abs_max(x + t * kTile, kTile));
    scales[t] = uint8_t(e + 127);
    for (int i = 0; i < kTile; ++i) data[t * kTile + i] = quantize_e4m3(x[t * kTile + i], e);
  }
  scales[kNumTiles] = 0;
  uint16_t* rope = reinterpret_cast<uint16_t*>(data + kNopeDim);
  for (int i = 0; i < kRopeDim; ++i) rope[i] = float_to_bf16(x[kNopeDim + i]);
}

// Dequantized nope value: e4m3 * 2^(byte - 127) in float32, rounded to bf16; byte 0xFF (NaN)
// gives 0x7fc0 for every code (dequantize_e4m3).
SMLA_HD uint16_t dequantize_nope(uint8_t q, uint8_t scale_byte) {
  return dequantize_e4m3(q, ue8m0_to_float(scale_byte));
}
}  // namespace v4

namespace v32 {
constexpr int kNopeDim = 512;
constexpr int kRopeDim = 64;
constexpr int kDim = 576;           // dequantized row: 512 + 64 rope
constexpr int kTile = 128;
constexpr int kNumTiles = 4;
constexpr int kTokenBytes = 656;    // [512 e4m3][4 float32 scales][64 bf16 rope]
constexpr int kScalesAt = 512;
constexpr int kRopeAt = 528;

SMLA_HD int64_t token_offset(int64_t token_id) { return token_id * kTokenBytes; }

SMLA_HD void quantize_token(const float* x, uint8_t* token) {
  for (int t = 0; t < kNumTiles; ++t) {
    const int32_t e = tile_scale_exponent(abs_max(x + t * kTile, kTile));
    const float scale = ldexpf(1.0f, e);
    memcpy(token + kScalesAt + 4 * t, &scale, 4);
    for (int i = 0; i < kTile; ++i) token[t * kTile + i] = quantize_e4m3(x[t * kTile + i], e);
  }
  uint16_t* rope = reinterpret_cast<uint16_t*>(token + kRopeAt);
  for (int i = 0; i < kRopeDim; ++i) rope[i] = float_to_bf16(x[kNopeDim + i]);
}

SMLA_HD uint16_t dequantize_nope(uint8_t q, float scale) { return dequantize_e4m3(q, scale); }
}  // namespace v32

}  // namespace smla
