// The softmax's vector exp as cpp/src/simd.h wrote it once per ISA before it became one generic
// body over per-ISA primitives (session 59), kept verbatim so core_check can require the generic
// exp to give the same bits on every input. Include after simd.h (its ISA macros and intrinsics).
#pragma once

namespace exp_frozen {

#if defined(SMLA_SIMD_WASM)
typedef v128_t vf;
static inline vf madd(vf a, vf b, vf c) { return wasm_f32x4_add(wasm_f32x4_mul(a, b), c); }
static inline vf exp(vf x) {
  x = wasm_f32x4_min(wasm_f32x4_max(x, wasm_f32x4_splat(-104.0f)), wasm_f32x4_splat(88.8f));
  const vf n = wasm_f32x4_nearest(wasm_f32x4_mul(x, wasm_f32x4_splat(1.44269504088896341f)));
  vf r = wasm_f32x4_sub(x, wasm_f32x4_mul(n, wasm_f32x4_splat(0.693359375f)));
  r = wasm_f32x4_sub(r, wasm_f32x4_mul(n, wasm_f32x4_splat(-2.12194440e-4f)));
  vf y = wasm_f32x4_splat(1.9875691500e-4f);
  y = madd(y, r, wasm_f32x4_splat(1.3981999507e-3f));
  y = madd(y, r, wasm_f32x4_splat(8.3334519073e-3f));
  y = madd(y, r, wasm_f32x4_splat(4.1665795894e-2f));
  y = madd(y, r, wasm_f32x4_splat(1.6666665459e-1f));
  y = madd(y, r, wasm_f32x4_splat(5.0000001201e-1f));
  y = madd(y, wasm_f32x4_mul(r, r), wasm_f32x4_add(r, wasm_f32x4_splat(1.0f)));
  const v128_t ni = wasm_i32x4_trunc_sat_f32x4(n);
  const v128_t n1 = wasm_i32x4_shr(ni, 1);
  const v128_t bias = wasm_i32x4_splat(127);
  y = wasm_f32x4_mul(y, wasm_i32x4_shl(wasm_i32x4_add(n1, bias), 23));
  return wasm_f32x4_mul(y, wasm_i32x4_shl(wasm_i32x4_add(wasm_i32x4_sub(ni, n1), bias), 23));
}

#elif defined(SMLA_SIMD_AVX512)
typedef __m512 vf;
static inline vf madd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf exp(vf x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  vf y = _mm512_set1_ps(1.9875691500e-4f);
  y = madd(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = madd(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = madd(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = madd(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = madd(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = madd(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i ni = _mm512_cvttps_epi32(n);
  const __m512i n1 = _mm512_srai_epi32(ni, 1);
  const __m512i bias = _mm512_set1_epi32(127);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23)));
  return _mm512_mul_ps(
      y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, n1), bias), 23)));
}

#elif defined(SMLA_SIMD_AVX2)
typedef __m256 vf;
static inline vf madd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf exp(vf x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
  const vf n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  vf y = _mm256_set1_ps(1.9875691500e-4f);
  y = madd(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = madd(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = madd(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = madd(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = madd(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = madd(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvttps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23)));
  return _mm256_mul_ps(
      y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, n1), bias), 23)));
}

#elif defined(SMLA_SIMD_SSE2)
typedef __m128 vf;
static inline vf madd(vf a, vf b, vf c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
static inline vf exp(vf x) {
  x = _mm_min_ps(_mm_set1_ps(88.8f), _mm_max_ps(_mm_set1_ps(-104.0f), x));
  const __m128i ni = _mm_cvtps_epi32(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)));
  const vf n = _mm_cvtepi32_ps(ni);
  vf r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0.693359375f)));
  r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(-2.12194440e-4f)));
  vf y = _mm_set1_ps(1.9875691500e-4f);
  y = madd(y, r, _mm_set1_ps(1.3981999507e-3f));
  y = madd(y, r, _mm_set1_ps(8.3334519073e-3f));
  y = madd(y, r, _mm_set1_ps(4.1665795894e-2f));
  y = madd(y, r, _mm_set1_ps(1.6666665459e-1f));
  y = madd(y, r, _mm_set1_ps(5.0000001201e-1f));
  y = madd(y, _mm_mul_ps(r, r), _mm_add_ps(r, _mm_set1_ps(1.0f)));
  const __m128i n1 = _mm_srai_epi32(ni, 1);
  const __m128i bias = _mm_set1_epi32(127);
  y = _mm_mul_ps(y, _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n1, bias), 23)));
  return _mm_mul_ps(y, _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(_mm_sub_epi32(ni, n1), bias), 23)));
}
#endif

}  // namespace exp_frozen
