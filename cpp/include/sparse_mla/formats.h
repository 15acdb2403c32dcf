// Number formats of SPEC §2: bf16, e4m3fn (OCP FP8), ue8m0. Bit-exact, round-to-nearest-even.
#pragma once
#include <stdint.h>
#include <string.h>

#include "config.h"

namespace smla {

SMLA_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

SMLA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// bf16 is the top half of a float32.
SMLA_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// float32 -> bf16, round to nearest even; NaN stays NaN (quiet bit forced so the
// truncation cannot turn a NaN payload into infinity).
SMLA_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinities, NaN = S.1111.111.
SMLA_HD float e4m3_to_float(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xfu;
  const uint32_t man = b & 0x7u;
  if (exp == 0xfu && man == 0x7u) return bits_float(sign | 0x7fc00000u);
  if (exp == 0) {
    // subnormal: man * 2^-9, exact in float32
    const float v = float(man) * 0.001953125f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// float -> e4m3fn: NaN -> 0x7F (sign kept), clamp to ±448 (infinities saturate),
// then round to nearest even on the e4m3 grid (subnormal step 2^-9).
SMLA_HD uint8_t float_to_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448 (incl. inf) saturates
  if (a < 0x3c800000u) {
    // below 2^-6: subnormal range, quantum 2^-9. Scale so the quantum is 1 and round half to even.
    const float x = bits_float(a) * 512.0f;  // exact (power of two scaling)
    uint32_t q = uint32_t(x);
    const float rem = x - float(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return uint8_t(sign | q);  // q == 8 becomes the smallest normal 0x08, which is correct
  }
  // normal: keep 3 mantissa bits of 23, round to nearest even on the dropped 20 bits.
  a += 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t exp = (a >> 23) - 120u;
  const uint32_t man = (a >> 20) & 0x7u;
  uint32_t r = (exp << 3) | man;
  if (r > 0x7eu) r = 0x7eu;  // rounding up past 448 saturates (cannot happen below 448 but keep it safe)
  return uint8_t(sign | r);
}

// ue8m0: value = 2^(byte - 127); 0xFF is NaN. Byte 0 is 2^-127 (a float32 subnormal).
SMLA_HD float ue8m0_to_float(uint8_t b) {
  if (b == 0xffu) return bits_float(0x7fc00000u);
  if (b == 0) return bits_float(0x00400000u);
  return bits_float(uint32_t(b) << 23);
}

}  // namespace smla
