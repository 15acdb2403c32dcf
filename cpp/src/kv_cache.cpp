// SPEC §3.3: quantize rows into cache token ids, dequantize a gather of token ids into bf16 rows.
#include <string.h>

#include "kv_cache_rows.h"
#include "simd.h"
#if defined(SMLA_SIMD_SSE2) && defined(__SSSE3__)
#include <tmmintrin.h>
#endif
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_indices.h"
#include "sparse_mla/sparse_mla.h"
#include "isa_dispatch.h"

namespace smla {
namespace cpu {

namespace {

// Emscripten's clang keeps the tile functions out of line otherwise: a call per 64 codes.
#if defined(SMLA_SIMD_WASM)
#define SMLA_TILE_INLINE __attribute__((always_inline)) inline
#else
#define SMLA_TILE_INLINE inline
#endif

// A tile of e4m3 bytes times its power-of-two scale, rounded to bf16 (SPEC §3.1), vectorized.
// For each byte: the e4m3 value is built exactly in float32 (normal codes by placing exponent and
// mantissa bits, subnormal codes as m * 2^-9, NaN codes as NaN), multiplied by the scale (the one
// float32 rounding of the spec), then rounded to bf16 with the same rule as float_to_bf16. The
// result is returned as float32 bits whose low half is zero, so it serves both output types.
//
// kExact: the scale is a power of two that keeps every e4m3 value inside the normal float range
// (see scale_keeps_exact); then the product is exact, already a bf16 value (4 significant bits),
// NaN codes give 0x7fc00000 | sign, and the rounding step is the identity, so it is skipped.
// WASM, AVX2 and SSSE3 go further for kExact and build the bf16 bits from the bytes with integer
// operations (dequant_tile64_exact); NEON and plain SSE2 multiply in float32 for every scale.
#if defined(SMLA_SIMD_WASM)
template <bool kExact>
inline v128_t dequant4(v128_t u, v128_t scale) {
  const v128_t mag = wasm_v128_and(u, wasm_i32x4_splat(0x7f));
  const v128_t sign = wasm_i32x4_shl(wasm_v128_and(u, wasm_i32x4_splat(0x80)), 24);
  const v128_t normal = wasm_i32x4_add(wasm_i32x4_shl(mag, 20), wasm_i32x4_splat(0x3c000000));
  const v128_t sub = wasm_f32x4_mul(wasm_f32x4_convert_i32x4(mag), wasm_f32x4_splat(0.001953125f));
  v128_t v = wasm_v128_bitselect(sub, normal, wasm_i32x4_lt(mag, wasm_i32x4_splat(8)));
  v = wasm_v128_bitselect(wasm_i32x4_splat(0x7fc00000), v, wasm_i32x4_eq(mag, wasm_i32x4_splat(0x7f)));
  const v128_t r = wasm_f32x4_mul(wasm_v128_or(v, sign), scale);
  if (kExact) return r;
  const v128_t lsb = wasm_v128_and(wasm_u32x4_shr(r, 16), wasm_i32x4_splat(1));
  const v128_t rounded = wasm_v128_and(wasm_i32x4_add(r, wasm_i32x4_add(lsb, wasm_i32x4_splat(0x7fff))),
                                       wasm_i32x4_splat(int32_t(0xffff0000u)));
  const v128_t nan = wasm_v128_and(wasm_v128_or(r, wasm_i32x4_splat(0x00400000)),
                                   wasm_i32x4_splat(int32_t(0xffff0000u)));
  return wasm_v128_bitselect(nan, rounded, wasm_f32x4_ne(r, r));
}

// kExact on 16 codes at a time, in bytes and 16-bit lanes, no float arithmetic: the product with
// a scale 2^k that keeps it a normal float32 is exact, so its bf16 is the e4m3 value's own bf16
// with k added to the exponent field. That bf16 is built as two bytes: the normal codes' formula
// (mag << 4) + 0x3c00, plus, for magnitudes 0..7 (zero and the subnormals m * 2^-9), a table's
// byte-wise difference to their bf16; NaN codes are patched to 0x7fc0; then the sign bit, then
// k << 7 added to every lane but zeros and NaNs.
template <bool kF32>
SMLA_TILE_INLINE void dequant_tile64_exact(const uint8_t* q, float scale_f, void* out) {
  const int32_t k = int32_t(float_bits(scale_f) >> 23) - 127;
  const v128_t shift = wasm_i16x8_splat(int16_t(k * 128));
  // per byte, for m = 0..7: the bf16 of m * 2^-9 (0 for m = 0) minus the formula's (m << 4) + 0x3c00;
  // swizzle gives 0 past index 15, and indices 8..15 hold 0
  const v128_t fix_lo = wasm_i8x16_make(0, int8_t(0xf0), 0x60, int8_t(0x90), int8_t(0xc0), int8_t(0xd0),
                                        int8_t(0xe0), int8_t(0xf0), 0, 0, 0, 0, 0, 0, 0, 0);
  const v128_t fix_hi = wasm_i8x16_make(int8_t(0xc4), -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int j = 0; j < 64; j += 16) {
    const v128_t b = wasm_v128_load(q + j);
    const v128_t mag = wasm_v128_and(b, wasm_i8x16_splat(0x7f));
    const v128_t is_nan = wasm_i8x16_eq(mag, wasm_i8x16_splat(0x7f));
    // 0x7f by the formula is 0x43f0: 0x7fc0 is 0x30 off in the low byte, 0x3c in the high one
    const v128_t lo = wasm_v128_xor(wasm_i8x16_add(wasm_i8x16_shl(mag, 4), wasm_i8x16_swizzle(fix_lo, mag)),
                                    wasm_v128_and(is_nan, wasm_i8x16_splat(0x30)));
    const v128_t hi = wasm_v128_or(
        wasm_i8x16_add(wasm_i8x16_add(wasm_u8x16_shr(mag, 4), wasm_i8x16_splat(0x3c)), wasm_i8x16_swizzle(fix_hi, mag)),
        wasm_v128_or(wasm_v128_and(is_nan, wasm_i8x16_splat(0x3c)), wasm_v128_and(b, wasm_i8x16_splat(int8_t(0x80)))));
    const v128_t unscaled = wasm_v128_or(wasm_i8x16_eq(mag, wasm_i8x16_splat(0)), is_nan);
    const v128_t h0 = wasm_i8x16_shuffle(lo, hi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const v128_t h1 = wasm_i8x16_shuffle(lo, hi, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const v128_t r0 = wasm_i16x8_add(h0, wasm_v128_andnot(shift, wasm_i16x8_extend_low_i8x16(unscaled)));
    const v128_t r1 = wasm_i16x8_add(h1, wasm_v128_andnot(shift, wasm_i16x8_extend_high_i8x16(unscaled)));
    if (kF32) {
      // a bf16 in the high half of a float32 lane
      const v128_t z = wasm_i16x8_splat(0);
      float* o = static_cast<float*>(out) + j;
      wasm_v128_store(o, wasm_i16x8_shuffle(z, r0, 0, 8, 1, 9, 2, 10, 3, 11));
      wasm_v128_store(o + 4, wasm_i16x8_shuffle(z, r0, 4, 12, 5, 13, 6, 14, 7, 15));
      wasm_v128_store(o + 8, wasm_i16x8_shuffle(z, r1, 0, 8, 1, 9, 2, 10, 3, 11));
      wasm_v128_store(o + 12, wasm_i16x8_shuffle(z, r1, 4, 12, 5, 13, 6, 14, 7, 15));
    } else {
      uint16_t* o = static_cast<uint16_t*>(out) + j;
      wasm_v128_store(o, r0);
      wasm_v128_store(o + 8, r1);
    }
  }
}

// 64 bytes -> 64 values. Out is bf16 bits or float32 (the bf16 value).
template <bool kF32, bool kExact>
SMLA_TILE_INLINE void dequant_tile64(const uint8_t* q, float scale_f, void* out) {
  if (kExact) return dequant_tile64_exact<kF32>(q, scale_f, out);
  const v128_t scale = wasm_f32x4_splat(scale_f);
  for (int j = 0; j < 64; j += 16) {
    const v128_t b = wasm_v128_load(q + j);
    const v128_t lo = wasm_u16x8_extend_low_u8x16(b), hi = wasm_u16x8_extend_high_u8x16(b);
    const v128_t r0 = dequant4<kExact>(wasm_u32x4_extend_low_u16x8(lo), scale);
    const v128_t r1 = dequant4<kExact>(wasm_u32x4_extend_high_u16x8(lo), scale);
    const v128_t r2 = dequant4<kExact>(wasm_u32x4_extend_low_u16x8(hi), scale);
    const v128_t r3 = dequant4<kExact>(wasm_u32x4_extend_high_u16x8(hi), scale);
    if (kF32) {
      float* o = static_cast<float*>(out) + j;
      wasm_v128_store(o, r0);
      wasm_v128_store(o + 4, r1);
      wasm_v128_store(o + 8, r2);
      wasm_v128_store(o + 12, r3);
    } else {
      uint16_t* o = static_cast<uint16_t*>(out) + j;
      wasm_v128_store(o, wasm_u16x8_narrow_i32x4(wasm_u32x4_shr(r0, 16), wasm_u32x4_shr(r1, 16)));
      wasm_v128_store(o + 8, wasm_u16x8_narrow_i32x4(wasm_u32x4_shr(r2, 16), wasm_u32x4_shr(r3, 16)));
    }
  }
}
#elif defined(SMLA_SIMD_AVX2) || defined(SMLA_SIMD_AVX512)
// kF32: the low halves cleared (a float32 row); the bf16 output shifts them out instead.
template <bool kF32, bool kExact>
inline __m256i dequant8(__m256i u, __m256 scale) {
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7f));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x80)), 24);
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(0x3c000000));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0.001953125f));
  __m256 v = _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub,
                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag)));
  v = _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                       _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f))));
  const __m256 rf = _mm256_mul_ps(_mm256_or_ps(v, _mm256_castsi256_ps(sign)), scale);
  const __m256i r = _mm256_castps_si256(rf);
  if (kExact) return r;
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(1));
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(kF32 ? 0xffff0000u : 0xffffffffu));
  const __m256i rounded =
      _mm256_and_si256(_mm256_add_epi32(r, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), hi_mask);
  const __m256i nan = _mm256_and_si256(_mm256_or_si256(r, _mm256_set1_epi32(0x00400000)), hi_mask);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan),
                                              _mm256_cmp_ps(rf, rf, _CMP_UNORD_Q)));
}

#if defined(SMLA_SIMD_AVX512)
// kExact: the WASM / SSSE3 byte path on all 64 codes at once (AVX-512BW). vpshufb and the byte
// unpacks work in each 128-bit lane, so the codes' 8-byte quarters are first reordered (0, 4, 1, 5,
// 2, 6, 3, 7): the unpacks then yield codes 0..31 and 32..63 in order.
template <bool kF32>
inline void dequant_tile64_exact(const uint8_t* q, float scale_f, void* out) {
  const int32_t k = int32_t(float_bits(scale_f) >> 23) - 127;
  const __m512i shift = _mm512_set1_epi16(int16_t(k * 128));
  const __m512i fix_lo = _mm512_broadcast_i32x4(_mm_setr_epi8(
      0, 0, 0, 0, 0, 0, 0, 0, 0, int8_t(0xf0), 0x60, int8_t(0x90), int8_t(0xc0), int8_t(0xd0), int8_t(0xe0), int8_t(0xf0)));
  const __m512i fix_hi = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, int8_t(0xc4), -1, -1, -1, 0, 0, 0, 0));
  const __m512i b = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7), _mm512_loadu_si512(q));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi8(0x7f));
  const __m512i is_nan = _mm512_movm_epi8(_mm512_cmpeq_epi8_mask(mag, _mm512_set1_epi8(0x7f)));
  const __m512i idx = _mm512_adds_epu8(mag, _mm512_set1_epi8(0x78));
  const __m512i lo_formula = _mm512_and_si512(_mm512_slli_epi16(mag, 4), _mm512_set1_epi8(int8_t(0xf0)));
  const __m512i hi_formula = _mm512_add_epi8(_mm512_and_si512(_mm512_srli_epi16(mag, 4), _mm512_set1_epi8(0x0f)),
                                             _mm512_set1_epi8(0x3c));
  const __m512i lo = _mm512_xor_si512(_mm512_add_epi8(lo_formula, _mm512_shuffle_epi8(fix_lo, idx)),
                                      _mm512_and_si512(is_nan, _mm512_set1_epi8(0x30)));
  const __m512i hi = _mm512_or_si512(
      _mm512_add_epi8(hi_formula, _mm512_shuffle_epi8(fix_hi, idx)),
      _mm512_or_si512(_mm512_and_si512(is_nan, _mm512_set1_epi8(0x3c)),
                      _mm512_and_si512(b, _mm512_set1_epi8(int8_t(0x80)))));
  const __m512i unscaled =
      _mm512_or_si512(_mm512_movm_epi8(_mm512_cmpeq_epi8_mask(mag, _mm512_setzero_si512())), is_nan);
  const __m512i r0 = _mm512_add_epi16(_mm512_unpacklo_epi8(lo, hi),
                                      _mm512_andnot_si512(_mm512_unpacklo_epi8(unscaled, unscaled), shift));
  const __m512i r1 = _mm512_add_epi16(_mm512_unpackhi_epi8(lo, hi),
                                      _mm512_andnot_si512(_mm512_unpackhi_epi8(unscaled, unscaled), shift));
  if (kF32) {
    float* o = static_cast<float*>(out);
    _mm512_storeu_si512(o, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r0)), 16));
    _mm512_storeu_si512(o + 16, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r0, 1)), 16));
    _mm512_storeu_si512(o + 32, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r1)), 16));
    _mm512_storeu_si512(o + 48, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r1, 1)), 16));
  } else {
    uint16_t* o = static_cast<uint16_t*>(out);
    _mm512_storeu_si512(o, r0);
    _mm512_storeu_si512(o + 32, r1);
  }
}
#else
// kExact: the WASM / SSSE3 byte path on 32 codes at a time. vpshufb and the byte unpacks work in
// each 128-bit half, so the codes' 8-byte quarters are first reordered (0, 2, 1, 3): the unpacks
// then yield codes 0..15 and 16..31 in order.
template <bool kF32>
inline void dequant_tile64_exact(const uint8_t* q, float scale_f, void* out) {
  const int32_t k = int32_t(float_bits(scale_f) >> 23) - 127;
  const __m256i shift = _mm256_set1_epi16(int16_t(k * 128));
  const __m256i fix_lo = _mm256_broadcastsi128_si256(_mm_setr_epi8(
      0, 0, 0, 0, 0, 0, 0, 0, 0, int8_t(0xf0), 0x60, int8_t(0x90), int8_t(0xc0), int8_t(0xd0), int8_t(0xe0), int8_t(0xf0)));
  const __m256i fix_hi = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, int8_t(0xc4), -1, -1, -1, 0, 0, 0, 0));
  for (int j = 0; j < 64; j += 32) {
    const __m256i b =
        _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j)), 0xd8);
    const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi8(0x7f));
    const __m256i is_nan = _mm256_cmpeq_epi8(mag, _mm256_set1_epi8(0x7f));
    const __m256i idx = _mm256_adds_epu8(mag, _mm256_set1_epi8(0x78));
    const __m256i lo_formula = _mm256_and_si256(_mm256_slli_epi16(mag, 4), _mm256_set1_epi8(int8_t(0xf0)));
    const __m256i hi_formula = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(mag, 4), _mm256_set1_epi8(0x0f)),
                                               _mm256_set1_epi8(0x3c));
    const __m256i lo = _mm256_xor_si256(_mm256_add_epi8(lo_formula, _mm256_shuffle_epi8(fix_lo, idx)),
                                        _mm256_and_si256(is_nan, _mm256_set1_epi8(0x30)));
    const __m256i hi = _mm256_or_si256(
        _mm256_add_epi8(hi_formula, _mm256_shuffle_epi8(fix_hi, idx)),
        _mm256_or_si256(_mm256_and_si256(is_nan, _mm256_set1_epi8(0x3c)),
                        _mm256_and_si256(b, _mm256_set1_epi8(int8_t(0x80)))));
    const __m256i unscaled = _mm256_or_si256(_mm256_cmpeq_epi8(mag, _mm256_setzero_si256()), is_nan);
    const __m256i r0 = _mm256_add_epi16(_mm256_unpacklo_epi8(lo, hi),
                                        _mm256_andnot_si256(_mm256_unpacklo_epi8(unscaled, unscaled), shift));
    const __m256i r1 = _mm256_add_epi16(_mm256_unpackhi_epi8(lo, hi),
                                        _mm256_andnot_si256(_mm256_unpackhi_epi8(unscaled, unscaled), shift));
    if (kF32) {
      __m256i* o = reinterpret_cast<__m256i*>(static_cast<float*>(out) + j);
      _mm256_storeu_si256(o, _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(r0)), 16));
      _mm256_storeu_si256(o + 1, _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(r0, 1)), 16));
      _mm256_storeu_si256(o + 2, _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(r1)), 16));
      _mm256_storeu_si256(o + 3, _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(r1, 1)), 16));
    } else {
      __m256i* o = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + j);
      _mm256_storeu_si256(o, r0);
      _mm256_storeu_si256(o + 1, r1);
    }
  }
}

#endif

template <bool kF32, bool kExact>
inline void dequant_tile64(const uint8_t* q, float scale_f, void* out) {
  if (kExact) return dequant_tile64_exact<kF32>(q, scale_f, out);
  const __m256 scale = _mm256_set1_ps(scale_f);
  for (int j = 0; j < 64; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
    const __m256i r0 = dequant8<kF32, kExact>(_mm256_cvtepu8_epi32(b), scale);
    const __m256i r1 = dequant8<kF32, kExact>(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), scale);
    if (kF32) {
      float* o = static_cast<float*>(out) + j;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), r0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), r1);
    } else {
      // packus works per 128-bit lane: pack then restore the element order.
      const __m256i p = _mm256_packus_epi32(_mm256_srli_epi32(r0, 16), _mm256_srli_epi32(r1, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + j),
                          _mm256_permute4x64_epi64(p, 0xd8));
    }
  }
}
#elif defined(SMLA_SIMD_NEON)
// NEON has no byte -> float32 gather, so the e4m3 value goes through float16, which AArch64
// widens exactly (FCVTL: base armv8-a, blind to FPCR.FZ16): a code's 7 magnitude bits shifted left
// by 7 are a float16 whose exponent field has bias 15 = e4m3's 7 + 8 and whose top mantissa bits
// are e4m3's, so the float16 is the e4m3 value times 2^-8 for every code, subnormals included
// (m * 2^-17). NaN codes are replaced, per byte, by 0xfc, which the same shift turns into
// float16's quiet NaN 0x7e00. Times 256 (exact) gives the e4m3 value; times the scale is the
// spec's one float32 rounding; the rounding to bf16 is float_to_bf16's, as on the other paths.
template <bool kExact>
inline uint32x4_t dequant4(float16x4_t h, float32x4_t scale) {
  const float32x4_t v = vcvt_f32_f16(h);
  // kExact: scale holds scale * 2^8 (<= 2^127), the product is exact either way.
  const float32x4_t r = kExact ? vmulq_f32(v, scale) : vmulq_f32(vmulq_n_f32(v, 256.0f), scale);
  const uint32x4_t u = vreinterpretq_u32_f32(r);
  if (kExact) return u;
  const uint32x4_t hi_mask = vdupq_n_u32(0xffff0000u);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t rounded = vandq_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), hi_mask);
  const uint32x4_t nan = vandq_u32(vorrq_u32(u, vdupq_n_u32(0x00400000)), hi_mask);
  return vbslq_u32(vceqq_f32(r, r), rounded, nan);
}

template <bool kF32, bool kExact>
inline void dequant_tile64(const uint8_t* q, float scale_f, void* out) {
  const float32x4_t scale = vdupq_n_f32(kExact ? scale_f * 256.0f : scale_f);
  for (int j = 0; j < 64; j += 16) {
    const uint8x16_t b = vld1q_u8(q + j);
    const uint8x16_t sign = vandq_u8(b, vdupq_n_u8(0x80));
    uint8x16_t mag = vandq_u8(b, vdupq_n_u8(0x7f));
    mag = vbslq_u8(vceqq_u8(mag, vdupq_n_u8(0x7f)), vdupq_n_u8(0xfc), mag);
    // float16 bits: sign to bit 15, magnitude to bits 14..7
    const float16x8_t h_lo = vreinterpretq_f16_u16(
        vorrq_u16(vshll_n_u8(vget_low_u8(mag), 7), vshll_n_u8(vget_low_u8(sign), 8)));
    const float16x8_t h_hi =
        vreinterpretq_f16_u16(vorrq_u16(vshll_high_n_u8(mag, 7), vshll_high_n_u8(sign, 8)));
    const uint32x4_t r0 = dequant4<kExact>(vget_low_f16(h_lo), scale);
    const uint32x4_t r1 = dequant4<kExact>(vget_high_f16(h_lo), scale);
    const uint32x4_t r2 = dequant4<kExact>(vget_low_f16(h_hi), scale);
    const uint32x4_t r3 = dequant4<kExact>(vget_high_f16(h_hi), scale);
    if (kF32) {
      float* o = static_cast<float*>(out) + j;
      vst1q_f32(o, vreinterpretq_f32_u32(r0));
      vst1q_f32(o + 4, vreinterpretq_f32_u32(r1));
      vst1q_f32(o + 8, vreinterpretq_f32_u32(r2));
      vst1q_f32(o + 12, vreinterpretq_f32_u32(r3));
    } else {
      // the high half of each 32-bit lane is the bf16
      uint16_t* o = static_cast<uint16_t*>(out) + j;
      vst1q_u16(o, vuzp2q_u16(vreinterpretq_u16_u32(r0), vreinterpretq_u16_u32(r1)));
      vst1q_u16(o + 8, vuzp2q_u16(vreinterpretq_u16_u32(r2), vreinterpretq_u16_u32(r3)));
    }
  }
}
#elif defined(SMLA_SIMD_SSE2)
// The AVX2 path's arithmetic on 4 lanes with SSE2 only (x86-64's baseline, no SSE4.1): bytes are
// widened by unpacking against zero, selects are and / andnot / or, and the bf16 halves are packed
// with the signed packs after an arithmetic shift, which keeps each lane's 16 bits unchanged.
// With SSSE3 the exact scales take the byte path below instead.
inline __m128i select_si128(__m128i mask, __m128i if_set, __m128i if_clear) {
  return _mm_or_si128(_mm_and_si128(mask, if_set), _mm_andnot_si128(mask, if_clear));
}

template <bool kExact>
inline __m128i dequant4(__m128i u, __m128 scale) {
  const __m128i mag = _mm_and_si128(u, _mm_set1_epi32(0x7f));
  const __m128i sign = _mm_slli_epi32(_mm_and_si128(u, _mm_set1_epi32(0x80)), 24);
  const __m128i normal = _mm_add_epi32(_mm_slli_epi32(mag, 20), _mm_set1_epi32(0x3c000000));
  const __m128i sub =
      _mm_castps_si128(_mm_mul_ps(_mm_cvtepi32_ps(mag), _mm_set1_ps(0.001953125f)));
  __m128i v = select_si128(_mm_cmplt_epi32(mag, _mm_set1_epi32(8)), sub, normal);
  v = select_si128(_mm_cmpeq_epi32(mag, _mm_set1_epi32(0x7f)), _mm_set1_epi32(0x7fc00000), v);
  const __m128 rf = _mm_mul_ps(_mm_castsi128_ps(_mm_or_si128(v, sign)), scale);
  const __m128i r = _mm_castps_si128(rf);
  if (kExact) return r;
  const __m128i hi_mask = _mm_set1_epi32(int32_t(0xffff0000u));
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(r, 16), _mm_set1_epi32(1));
  const __m128i rounded =
      _mm_and_si128(_mm_add_epi32(r, _mm_add_epi32(lsb, _mm_set1_epi32(0x7fff))), hi_mask);
  const __m128i nan = _mm_and_si128(_mm_or_si128(r, _mm_set1_epi32(0x00400000)), hi_mask);
  return select_si128(_mm_castps_si128(_mm_cmpunord_ps(rf, rf)), nan, rounded);
}

// Two lanes' sets of 32-bit results -> 8 bf16 (their high halves).
inline __m128i pack_bf16(__m128i a, __m128i b) {
  return _mm_packs_epi32(_mm_srai_epi32(a, 16), _mm_srai_epi32(b, 16));
}

#if defined(__SSSE3__)
// kExact as the WASM path does it (bytes and 16-bit lanes, the subnormals' table through pshufb),
// where SSSE3 is there (x86-64-v2 and up); plain SSE2 has no byte shuffle and keeps the float path.
template <bool kF32>
inline void dequant_tile64_exact(const uint8_t* q, float scale_f, void* out) {
  const int32_t k = int32_t(float_bits(scale_f) >> 23) - 127;
  const __m128i shift = _mm_set1_epi16(int16_t(k * 128));
  // the WASM path's tables at indices 8..15: magnitudes 0..7 saturate-add 0x78 to 0x78..0x7f, pshufb
  // reads their low nibble; magnitudes 8 and up become >= 0x80, which pshufb turns into 0
  const __m128i fix_lo = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, int8_t(0xf0), 0x60, int8_t(0x90),
                                       int8_t(0xc0), int8_t(0xd0), int8_t(0xe0), int8_t(0xf0));
  const __m128i fix_hi = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, int8_t(0xc4), -1, -1, -1, 0, 0, 0, 0);
  const __m128i z = _mm_setzero_si128();
  for (int j = 0; j < 64; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
    const __m128i mag = _mm_and_si128(b, _mm_set1_epi8(0x7f));
    const __m128i is_nan = _mm_cmpeq_epi8(mag, _mm_set1_epi8(0x7f));
    const __m128i idx = _mm_adds_epu8(mag, _mm_set1_epi8(0x78));
    // byte shifts from 16-bit ones, masked
    const __m128i lo_formula = _mm_and_si128(_mm_slli_epi16(mag, 4), _mm_set1_epi8(int8_t(0xf0)));
    const __m128i hi_formula =
        _mm_add_epi8(_mm_and_si128(_mm_srli_epi16(mag, 4), _mm_set1_epi8(0x0f)), _mm_set1_epi8(0x3c));
    const __m128i lo = _mm_xor_si128(_mm_add_epi8(lo_formula, _mm_shuffle_epi8(fix_lo, idx)),
                                     _mm_and_si128(is_nan, _mm_set1_epi8(0x30)));
    const __m128i hi = _mm_or_si128(
        _mm_add_epi8(hi_formula, _mm_shuffle_epi8(fix_hi, idx)),
        _mm_or_si128(_mm_and_si128(is_nan, _mm_set1_epi8(0x3c)), _mm_and_si128(b, _mm_set1_epi8(int8_t(0x80)))));
    const __m128i unscaled = _mm_or_si128(_mm_cmpeq_epi8(mag, z), is_nan);
    const __m128i r0 = _mm_add_epi16(_mm_unpacklo_epi8(lo, hi),
                                     _mm_andnot_si128(_mm_unpacklo_epi8(unscaled, unscaled), shift));
    const __m128i r1 = _mm_add_epi16(_mm_unpackhi_epi8(lo, hi),
                                     _mm_andnot_si128(_mm_unpackhi_epi8(unscaled, unscaled), shift));
    if (kF32) {
      __m128i* o = reinterpret_cast<__m128i*>(static_cast<float*>(out) + j);
      _mm_storeu_si128(o, _mm_unpacklo_epi16(z, r0));
      _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(z, r0));
      _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(z, r1));
      _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(z, r1));
    } else {
      __m128i* o = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + j);
      _mm_storeu_si128(o, r0);
      _mm_storeu_si128(o + 1, r1);
    }
  }
}
#endif

template <bool kF32, bool kExact>
inline void dequant_tile64(const uint8_t* q, float scale_f, void* out) {
#if defined(__SSSE3__)
  if (kExact) return dequant_tile64_exact<kF32>(q, scale_f, out);
#endif
  const __m128 scale = _mm_set1_ps(scale_f);
  const __m128i z = _mm_setzero_si128();
  for (int j = 0; j < 64; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
    const __m128i lo = _mm_unpacklo_epi8(b, z), hi = _mm_unpackhi_epi8(b, z);
    const __m128i r0 = dequant4<kExact>(_mm_unpacklo_epi16(lo, z), scale);
    const __m128i r1 = dequant4<kExact>(_mm_unpackhi_epi16(lo, z), scale);
    const __m128i r2 = dequant4<kExact>(_mm_unpacklo_epi16(hi, z), scale);
    const __m128i r3 = dequant4<kExact>(_mm_unpackhi_epi16(hi, z), scale);
    if (kF32) {
      __m128i* o = reinterpret_cast<__m128i*>(static_cast<float*>(out) + j);
      _mm_storeu_si128(o, r0);
      _mm_storeu_si128(o + 1, r1);
      _mm_storeu_si128(o + 2, r2);
      _mm_storeu_si128(o + 3, r3);
    } else {
      __m128i* o = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + j);
      _mm_storeu_si128(o, pack_bf16(r0, r1));
      _mm_storeu_si128(o + 1, pack_bf16(r2, r3));
    }
  }
}
#else
template <bool kF32, bool kExact>
inline void dequant_tile64(const uint8_t* q, float scale, void* out) {
  for (int i = 0; i < 64; ++i) {
    const uint16_t h = dequantize_e4m3(q[i], scale);
    if (kF32) static_cast<float*>(out)[i] = bf16_to_float(h);
    else static_cast<uint16_t*>(out)[i] = h;
  }
}
#endif

// A power-of-two scale 2^e with -117 <= e <= 119: every e4m3 value (2^-9 .. 448) times it is a
// normal float32, so the product is exact.
inline bool scale_keeps_exact(float scale) {
  const uint32_t u = float_bits(scale);
  const uint32_t e = u >> 23;
  return (u & 0x807fffffu) == 0 && e >= 10 && e <= 246;
}

// NaN or ±inf.
inline bool scale_is_special(float scale) { return (float_bits(scale) & 0x7fffffffu) >= 0x7f800000u; }

// A tile whose scale is NaN or infinite, by the scalar rule (dequantize_e4m3): a NaN scale gives its
// own NaN for every code, a ±0 code times ±inf 0x7fc0. Left to the vector multiplication, NaN x NaN
// keeps whichever operand the instruction has first (AVX2, SSE2, SSSE3 and NEON differed) and
// 0 x inf is the ISA's default NaN (0xffc0 on x86-64 and in V8 there, 0x7fc0 on AArch64). Out of
// line: the tile loops keep their constants in registers. A plain loop: such tiles are bad input,
// not worth vector code in the WASM module.
template <bool kF32>
__attribute__((noinline)) void dequant_tile64_special_scale(const uint8_t* q, float scale, void* out) {
#if defined(__clang__)
#pragma clang loop vectorize(disable) unroll(disable)
#endif
  for (int i = 0; i < 64; ++i) {
    const uint16_t h = dequantize_e4m3(q[i], scale);
    if (kF32) static_cast<float*>(out)[i] = bf16_to_float(h);
    else static_cast<uint16_t*>(out)[i] = h;
  }
}

template <bool kF32>
void* tile_out(void* out, int tile) {
  return kF32 ? static_cast<void*>(static_cast<float*>(out) + 64 * tile)
              : static_cast<void*>(static_cast<uint16_t*>(out) + 64 * tile);
}

// A token's nope part: kTiles tiles of 64 codes, tile t scaled by scale_of(t / kTilesPerScale). One
// loop per path, chosen per token: the byte path and the float path each need about a dozen
// vector constants, and one loop holding both (a choice per tile) made GCC hoist both sets, more
// than 16 ymm registers, and spill the float path's. Tokens whose scales are all exact (every token
// SPEC's quantization writes) take the exact path's loop; other tokens the float path for every
// tile (an exact product rounds to itself: the same bits), and tiles with a NaN or infinite scale the
// rule above.
// Out of line too, so that the calls in its loop make no register saves on the other paths.
template <bool kF32, int kTiles, int kTilesPerScale, typename ScaleOf>
__attribute__((noinline)) void dequant_nope_some_special(const uint8_t* q, ScaleOf scale_of, void* out) {
  for (int t = 0; t < kTiles; ++t) {
    const float scale = scale_of(t / kTilesPerScale);
    if (scale_is_special(scale)) dequant_tile64_special_scale<kF32>(q + 64 * t, scale, tile_out<kF32>(out, t));
    else dequant_tile64<kF32, false>(q + 64 * t, scale, tile_out<kF32>(out, t));
  }
}

template <bool kF32, int kTiles, int kTilesPerScale, typename ScaleOf>
SMLA_TILE_INLINE void dequant_nope(const uint8_t* q, bool all_exact, bool any_special, ScaleOf scale_of, void* out) {
  if (all_exact) {
    for (int t = 0; t < kTiles; ++t)
      dequant_tile64<kF32, true>(q + 64 * t, scale_of(t / kTilesPerScale), tile_out<kF32>(out, t));
  } else if (!any_special) {
    for (int t = 0; t < kTiles; ++t)
      dequant_tile64<kF32, false>(q + 64 * t, scale_of(t / kTilesPerScale), tile_out<kF32>(out, t));
  } else {
    dequant_nope_some_special<kF32, kTiles, kTilesPerScale>(q, scale_of, out);
  }
}

// v4's scale bytes: 2^(b - 127) is exact for b in 10..246 (scale_keeps_exact), 255 is NaN (the one
// special scale: no byte is infinite).
template <bool kF32>
SMLA_TILE_INLINE void dequant_v4_nope(const uint8_t* data, const uint8_t* scales, void* out) {
  bool all_exact = true, any_special = false;
  for (int t = 0; t < v4::kNumTiles; ++t) {
    all_exact &= uint8_t(scales[t] - 10) <= 236;
    any_special |= scales[t] == 0xff;
  }
  dequant_nope<kF32, v4::kNumTiles, 1>(data, all_exact, any_special,
                                       [scales](int t) { return ue8m0_to_float(scales[t]); }, out);
}

// A token's 64 bf16 rope values, copied bit for bit. The WASM build has no bulk memory, so its
// memcpy is a library call; 8 vector moves instead.
static_assert(v4::kRopeDim == 64 && v32::kRopeDim == 64, "rope rows are 128 bytes");
inline void copy_rope(uint16_t* dst, const uint8_t* src) {
#if defined(SMLA_SIMD_WASM)
  for (int i = 0; i < 128; i += 16)
    wasm_v128_store(reinterpret_cast<uint8_t*>(dst) + i, wasm_v128_load(src + i));
#else
  memcpy(dst, src, 128);
#endif
}

}  // namespace

static_assert(v4::kTile == 64 && v32::kTile == 128, "tiles of 64 codes");

void dequant_v4_token_bf16(const uint8_t* data, const uint8_t* scales, uint16_t* out) {
  dequant_v4_nope<false>(data, scales, out);
  copy_rope(out + v4::kNopeDim, data + v4::kNopeDim);
}

void dequant_v4_token_f32(const uint8_t* data, const uint8_t* scales, float* out) {
  dequant_v4_nope<true>(data, scales, out);
  const uint16_t* rope = reinterpret_cast<const uint16_t*>(data + v4::kNopeDim);
  for (int i = 0; i < v4::kRopeDim; i += simd::W) simd::store(out + v4::kNopeDim + i, simd::load_bf16(rope + i));
}

void dequant_v32_token_bf16(const uint8_t* token, uint16_t* out) {
  float scales[v32::kNumTiles];
  memcpy(scales, token + v32::kScalesAt, sizeof scales);
  bool all_exact = true, any_special = false;
  for (int t = 0; t < v32::kNumTiles; ++t) all_exact &= scale_keeps_exact(scales[t]);
  if (!all_exact)  // exact scales are finite
    for (int t = 0; t < v32::kNumTiles; ++t) any_special |= scale_is_special(scales[t]);
  dequant_nope<false, 2 * v32::kNumTiles, 2>(token, all_exact, any_special, [&scales](int t) { return scales[t]; }, out);
  copy_rope(out + v32::kNopeDim, token + v32::kRopeAt);
}

namespace {

// Shared argument checks of both cache ops; tokens checked against the cache before any write.
smla_status check_cache_args(int32_t format, const void* cache, int32_t page_size,
                             int32_t num_pages, const int64_t* token_ids, int32_t num_tokens) {
  if (format != SMLA_CACHE_V4 && format != SMLA_CACHE_V32) return SMLA_ERR_INVALID_ARGUMENT;
  if (page_size <= 0 || num_pages < 0 || num_tokens < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (format == SMLA_CACHE_V32 && page_size != 1) return SMLA_ERR_INVALID_ARGUMENT;
  if (num_tokens == 0) return SMLA_OK;
  if (!token_ids) return SMLA_ERR_INVALID_ARGUMENT;
  for (int32_t i = 0; i < num_tokens; ++i)
    if (!token_id_valid(token_ids[i], page_size, num_pages)) return SMLA_ERR_OUT_OF_RANGE;
  if (!cache) return SMLA_ERR_INVALID_ARGUMENT;  // reached only with num_pages > 0
  return SMLA_OK;
}

}  // namespace
}  // namespace cpu
}  // namespace smla

using namespace smla;

extern "C" SMLA_API int32_t smla_quantize_kv_cache(const smla_quantize_kv_cache_params* p) {
  SMLA_ISA_DISPATCH(quantize_kv_cache, p);
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t format = p->format, page_size = p->page_size, num_tokens = p->num_tokens;
  const int32_t rows_dtype = p->rows_dtype;
  uint8_t* const cache = p->cache;
  const int64_t* const token_ids = p->token_ids;
  const void* const rows = p->rows;
  if (rows_dtype != SMLA_ROWS_F32 && rows_dtype != SMLA_ROWS_BF16) return SMLA_ERR_INVALID_ARGUMENT;
  const smla_status st =
      cpu::check_cache_args(format, cache, page_size, p->num_pages, token_ids, num_tokens);
  if (st != SMLA_OK || num_tokens == 0) return st;
  if (!rows) return SMLA_ERR_INVALID_ARGUMENT;
  const int dim = format == SMLA_CACHE_V4 ? v4::kDim : v32::kDim;
  float x[v32::kDim];
  for (int32_t i = 0; i < num_tokens; ++i) {
    const int64_t base = int64_t(i) * dim;
    if (rows_dtype == SMLA_ROWS_F32) {
      memcpy(x, static_cast<const float*>(rows) + base, size_t(dim) * sizeof(float));
    } else {
      const uint16_t* r = static_cast<const uint16_t*>(rows) + base;
      for (int d = 0; d < dim; ++d) x[d] = bf16_to_float(r[d]);
    }
    const int64_t id = token_ids[i];
    uint8_t* rope_dst;
    if (format == SMLA_CACHE_V4) {
      v4::quantize_token(x, cache + v4::data_offset(id, page_size),
                         cache + v4::scale_offset(id, page_size));
      rope_dst = cache + v4::data_offset(id, page_size) + v4::kNopeDim;
    } else {
      v32::quantize_token(x, cache + v32::token_offset(id));
      rope_dst = cache + v32::token_offset(id) + v32::kRopeAt;
    }
    // bf16 rope dims are stored unchanged: copy the bits, so a NaN payload survives
    // (a round trip through float would set the quiet bit).
    if (rows_dtype == SMLA_ROWS_BF16) {
      const int nope = format == SMLA_CACHE_V4 ? v4::kNopeDim : v32::kNopeDim;
      memcpy(rope_dst, static_cast<const uint16_t*>(rows) + base + nope, 64 * sizeof(uint16_t));
    }
  }
  return SMLA_OK;
}

extern "C" SMLA_API int32_t smla_dequantize_kv_cache(const smla_dequantize_kv_cache_params* p) {
  SMLA_ISA_DISPATCH(dequantize_kv_cache, p);
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t format = p->format, page_size = p->page_size, num_tokens = p->num_tokens;
  const uint8_t* const cache = p->cache;
  const int64_t* const token_ids = p->token_ids;
  uint16_t* const out = p->out;
  const smla_status st =
      cpu::check_cache_args(format, cache, page_size, p->num_pages, token_ids, num_tokens);
  if (st != SMLA_OK || num_tokens == 0) return st;
  if (!out) return SMLA_ERR_INVALID_ARGUMENT;
  for (int32_t i = 0; i < num_tokens; ++i) {
    const int64_t id = token_ids[i];
    if (format == SMLA_CACHE_V4) {
      cpu::dequant_v4_token_bf16(cache + v4::data_offset(id, page_size),
                                 cache + v4::scale_offset(id, page_size),
                                 out + int64_t(i) * v4::kDim);
    } else {
      cpu::dequant_v32_token_bf16(cache + v32::token_offset(id), out + int64_t(i) * v32::kDim);
    }
  }
  return SMLA_OK;
}
