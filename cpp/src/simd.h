// A small float-vector abstraction for the CPU core: one set of kernels, compiled to WASM SIMD128,
// AVX-512, AVX2+FMA, NEON (AArch64), SSE2 or plain scalar code. W is the lane count; madd(a, b, c) =
// a * b + c (fused only where the target has FMA: AVX-512, AVX2+FMA and AArch64, whose Advanced
// SIMD always has it; Node 20's WASM has no relaxed SIMD, so there it is mul + add).
// AVX-512 (F, BW, VL, DQ: x86-64-v4) is taken where the compiler targets it, unless
// SMLA_SIMD_NO_AVX512 is defined (then AVX2); it is the AVX2 path's arithmetic on 16 lanes.
// SMLA_SIMD_HAS_EXP: the target also has exp, max, hmax and the lane masks the vector softmax
// uses (WASM, AVX-512, AVX2 and SSE2, one polynomial held to 1 ulp, written once over each target's
// exp_ops; libm's expf was a visible share of the kernel's time on each. NEON and scalar code keep
// libm's expf).
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>
#define SMLA_SIMD_WASM 1
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && !defined(SMLA_SIMD_NO_AVX512)
// GCC 12's AVX-512 intrinsics warn of their own placeholder operand (_mm512_undefined_*) once
// inlined; the warning points into the header, so it is silenced for the header's lines only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#define SMLA_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SMLA_SIMD_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define SMLA_SIMD_NEON 1
#elif defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define SMLA_SIMD_SSE2 1
#else
#define SMLA_SIMD_SCALAR 1
#endif

namespace smla {
namespace simd {

#if defined(SMLA_SIMD_WASM)
constexpr int W = 4;
typedef v128_t vf;
static inline vf zero() { return wasm_f32x4_splat(0.0f); }
static inline vf set1(float x) { return wasm_f32x4_splat(x); }
static inline vf load_splat(const float* p) { return wasm_v128_load32_splat(p); }
static inline vf load(const float* p) { return wasm_v128_load(p); }
static inline void store(float* p, vf v) { wasm_v128_store(p, v); }
static inline vf add(vf a, vf b) { return wasm_f32x4_add(a, b); }
static inline vf sub(vf a, vf b) { return wasm_f32x4_sub(a, b); }
static inline vf mul(vf a, vf b) { return wasm_f32x4_mul(a, b); }
static inline vf madd(vf a, vf b, vf c) { return wasm_f32x4_add(wasm_f32x4_mul(a, b), c); }
static inline float hsum(vf v) {
  const vf s = wasm_f32x4_add(v, wasm_i32x4_shuffle(v, v, 2, 3, 0, 1));
  const vf t = wasm_f32x4_add(s, wasm_i32x4_shuffle(s, s, 1, 0, 3, 2));
  return wasm_f32x4_extract_lane(t, 0);
}
// W bf16 values (bit patterns) -> W floats.
static inline vf load_bf16(const uint16_t* p) {
  return wasm_i32x4_shl(wasm_u32x4_load16x4(p), 16);
}

#define SMLA_SIMD_HAS_EXP 1
namespace exp_ops {  // what the generic exp (below) needs of the ISA
typedef v128_t vi;  // int32 lanes
static inline vf clamp(vf x, float lo, float hi) {  // WASM's min / max give NaN for a NaN lane
  return wasm_f32x4_min(wasm_f32x4_max(x, wasm_f32x4_splat(lo)), wasm_f32x4_splat(hi));
}
static inline vf round_nearest(vf x) { return wasm_f32x4_nearest(x); }
static inline vi rounded_to_int(vf, vf n) { return wasm_i32x4_trunc_sat_f32x4(n); }  // n = round_nearest(x), as int32
static inline vi i32_set1(int32_t k) { return wasm_i32x4_splat(k); }
static inline vi i32_add(vi a, vi b) { return wasm_i32x4_add(a, b); }
static inline vi i32_sub(vi a, vi b) { return wasm_i32x4_sub(a, b); }
static inline vi i32_shr(vi a, int k) { return wasm_i32x4_shr(a, k); }  // arithmetic
static inline vi i32_shl(vi a, int k) { return wasm_i32x4_shl(a, k); }
static inline vf bits_as_float(vi a) { return a; }
}  // namespace exp_ops
static inline vf max(vf a, vf b) { return wasm_f32x4_max(a, b); }  // NaN if either lane is NaN
static inline float hmax(vf v) {
  const vf s = wasm_f32x4_max(v, wasm_i32x4_shuffle(v, v, 2, 3, 0, 1));
  return wasm_f32x4_extract_lane(wasm_f32x4_max(s, wasm_i32x4_shuffle(s, s, 1, 0, 3, 2)), 0);
}
typedef v128_t lanes;  // a lane mask: all ones or all zeros a lane
static inline lanes first_lanes(int n) {  // lanes [0, n)
  return wasm_i32x4_gt(wasm_i32x4_splat(n), wasm_i32x4_make(0, 1, 2, 3));
}
static inline vf select(lanes m, vf a, vf b) { return wasm_v128_bitselect(a, b, m); }  // m ? a : b

#elif defined(SMLA_SIMD_AVX512)
constexpr int W = 16;
typedef __m512 vf;
static inline vf zero() { return _mm512_setzero_ps(); }
static inline vf set1(float x) { return _mm512_set1_ps(x); }
static inline vf load_splat(const float* p) { return _mm512_set1_ps(*p); }
static inline vf load(const float* p) { return _mm512_loadu_ps(p); }
static inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf madd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vf v) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline vf load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define SMLA_SIMD_HAS_EXP 1
namespace exp_ops {
typedef __m512i vi;
// x86's min / max return their second operand when either is NaN: x second keeps a NaN lane NaN
static inline vf clamp(vf x, float lo, float hi) {
  return _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), x));
}
static inline vf round_nearest(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vi rounded_to_int(vf, vf n) { return _mm512_cvttps_epi32(n); }
static inline vi i32_set1(int32_t k) { return _mm512_set1_epi32(k); }
static inline vi i32_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi i32_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline vi i32_shr(vi a, int k) { return _mm512_srai_epi32(a, k); }
static inline vi i32_shl(vi a, int k) { return _mm512_slli_epi32(a, k); }
static inline vf bits_as_float(vi a) { return _mm512_castsi512_ps(a); }
}  // namespace exp_ops
static inline vf max(vf a, vf b) {  // NaN if either lane is NaN
  return _mm512_mask_mov_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
}
static inline float hmax(vf v) {
  v = max(v, _mm512_shuffle_f32x4(v, v, 0x4e));  // 256-bit halves swapped
  v = max(v, _mm512_shuffle_f32x4(v, v, 0xb1));  // 128-bit quarters swapped in pairs
  v = max(v, _mm512_permute_ps(v, 0x4e));
  return _mm512_cvtss_f32(max(v, _mm512_permute_ps(v, 0xb1)));
}
typedef __mmask16 lanes;  // a lane mask: one bit a lane
static inline lanes first_lanes(int n) { return lanes((1u << n) - 1u); }  // lanes [0, n), n <= 16
static inline vf select(lanes m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
#if defined(__GNUC__)
#define SMLA_SIMD_HAS_IN_REGISTER 1
// v, held in a register: a value used by several FMAs is otherwise loaded again by each of them
// where GCC's tuning folds the load into the FMA (-mtune=generic, which -march=x86-64-v4 implies),
// doubling the loads of the S = Q·Kᵀ tile.
static inline vf in_register(vf v) {
  __asm__("" : "+v"(v));
  return v;
}
#endif

#elif defined(SMLA_SIMD_AVX2)
constexpr int W = 8;
typedef __m256 vf;
static inline vf zero() { return _mm256_setzero_ps(); }
static inline vf set1(float x) { return _mm256_set1_ps(x); }
static inline vf load_splat(const float* p) { return _mm256_broadcast_ss(p); }
static inline vf load(const float* p) { return _mm256_loadu_ps(p); }
static inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf madd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline vf load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#define SMLA_SIMD_HAS_EXP 1
namespace exp_ops {
typedef __m256i vi;
// x86's min / max return their second operand when either is NaN: x second keeps a NaN lane NaN
static inline vf clamp(vf x, float lo, float hi) {
  return _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x));
}
static inline vf round_nearest(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vi rounded_to_int(vf, vf n) { return _mm256_cvttps_epi32(n); }
static inline vi i32_set1(int32_t k) { return _mm256_set1_epi32(k); }
static inline vi i32_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi i32_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static inline vi i32_shr(vi a, int k) { return _mm256_srai_epi32(a, k); }
static inline vi i32_shl(vi a, int k) { return _mm256_slli_epi32(a, k); }
static inline vf bits_as_float(vi a) { return _mm256_castsi256_ps(a); }
}  // namespace exp_ops
static inline vf max(vf a, vf b) {  // NaN if either lane is NaN
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
static inline float hmax(vf v) {
  v = max(v, _mm256_permute2f128_ps(v, v, 1));  // 128-bit halves swapped
  v = max(v, _mm256_permute_ps(v, 0x4e));
  return _mm256_cvtss_f32(max(v, _mm256_permute_ps(v, 0xb1)));
}
typedef __m256 lanes;  // a lane mask: all ones in a lane that is on
static inline lanes first_lanes(int n) {  // lanes [0, n), n <= 8
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
static inline vf select(lanes m, vf a, vf b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b

#elif defined(SMLA_SIMD_NEON)
constexpr int W = 4;
typedef float32x4_t vf;
static inline vf zero() { return vdupq_n_f32(0.0f); }
static inline vf set1(float x) { return vdupq_n_f32(x); }
static inline vf load_splat(const float* p) { return vld1q_dup_f32(p); }
static inline vf load(const float* p) { return vld1q_f32(p); }
static inline void store(float* p, vf v) { vst1q_f32(p, v); }
static inline vf add(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf sub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf mul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf madd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline float hsum(vf v) { return vaddvq_f32(v); }
static inline vf load_bf16(const uint16_t* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}

#elif defined(SMLA_SIMD_SSE2)
constexpr int W = 4;
typedef __m128 vf;
static inline vf zero() { return _mm_setzero_ps(); }
static inline vf set1(float x) { return _mm_set1_ps(x); }
static inline vf load_splat(const float* p) { return _mm_load1_ps(p); }
static inline vf load(const float* p) { return _mm_loadu_ps(p); }
static inline void store(float* p, vf v) { _mm_storeu_ps(p, v); }
static inline vf add(vf a, vf b) { return _mm_add_ps(a, b); }
static inline vf sub(vf a, vf b) { return _mm_sub_ps(a, b); }
static inline vf mul(vf a, vf b) { return _mm_mul_ps(a, b); }
static inline vf madd(vf a, vf b, vf c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
static inline float hsum(vf v) {
  __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline vf load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}

#define SMLA_SIMD_HAS_EXP 1
namespace exp_ops {
typedef __m128i vi;
// x86's min / max return their second operand when either is NaN: x second keeps a NaN lane NaN
static inline vf clamp(vf x, float lo, float hi) { return _mm_min_ps(_mm_set1_ps(hi), _mm_max_ps(_mm_set1_ps(lo), x)); }
// SSE2 has no round instruction: the conversion to int32 rounds to nearest (the default MXCSR
// mode; exp's argument lies within ±151), and rounded_to_int repeats it, one instruction once merged
static inline vf round_nearest(vf x) { return _mm_cvtepi32_ps(_mm_cvtps_epi32(x)); }
static inline vi rounded_to_int(vf x, vf) { return _mm_cvtps_epi32(x); }
static inline vi i32_set1(int32_t k) { return _mm_set1_epi32(k); }
static inline vi i32_add(vi a, vi b) { return _mm_add_epi32(a, b); }
static inline vi i32_sub(vi a, vi b) { return _mm_sub_epi32(a, b); }
static inline vi i32_shr(vi a, int k) { return _mm_srai_epi32(a, k); }
static inline vi i32_shl(vi a, int k) { return _mm_slli_epi32(a, k); }
static inline vf bits_as_float(vi a) { return _mm_castsi128_ps(a); }
}  // namespace exp_ops
typedef __m128 lanes;  // a lane mask: all ones in a lane that is on
static inline vf select(lanes m, vf a, vf b) { return _mm_or_ps(_mm_and_ps(m, a), _mm_andnot_ps(m, b)); }  // m ? a : b
static inline vf max(vf a, vf b) { return select(_mm_cmpunord_ps(a, a), a, _mm_max_ps(a, b)); }  // NaN if either lane is NaN
static inline float hmax(vf v) {
  v = max(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(max(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1))));
}
static inline lanes first_lanes(int n) {  // lanes [0, n), n <= 4
  return _mm_castsi128_ps(_mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)));
}

#else
constexpr int W = 1;
typedef float vf;
static inline vf zero() { return 0.0f; }
static inline vf set1(float x) { return x; }
static inline vf load_splat(const float* p) { return *p; }
static inline vf load(const float* p) { return *p; }
static inline void store(float* p, vf v) { *p = v; }
static inline vf add(vf a, vf b) { return a + b; }
static inline vf sub(vf a, vf b) { return a - b; }
static inline vf mul(vf a, vf b) { return a * b; }
static inline vf madd(vf a, vf b, vf c) { return a * b + c; }
static inline float hsum(vf v) { return v; }
static inline vf load_bf16(const uint16_t* p) {
  const uint32_t u = uint32_t(*p) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#endif

#if defined(SMLA_SIMD_HAS_EXP)
// e^x in each lane, within 1 ulp of the correctly rounded value over the whole float range
// (Cephes' expf: x = n·ln2 + r, a degree-7 polynomial for e^r on [−ln2/2, ln2/2], then 2^n).
// NaN gives NaN, −inf and x < −104 give 0 (subnormal results rounded once), x > 88.73 +inf.
// One body for every target; each supplies exp_ops. Where the target has FMA, madd is fused and
// GCC (C++: -ffp-contract=fast by default) fuses r's mul / sub too: bits differ across ISAs.
static inline vf exp(vf x) {
  using namespace exp_ops;
  x = clamp(x, -104.0f, 88.8f);
  const vf t = mul(x, set1(1.44269504088896341f));
  const vf n = round_nearest(t);
  // ln2 in two parts: n · 0.693359375 is exact for |n| < 2^15, so r keeps its low bits
  vf r = sub(x, mul(n, set1(0.693359375f)));
  r = sub(r, mul(n, set1(-2.12194440e-4f)));
  vf y = set1(1.9875691500e-4f);
  y = madd(y, r, set1(1.3981999507e-3f));
  y = madd(y, r, set1(8.3334519073e-3f));
  y = madd(y, r, set1(4.1665795894e-2f));
  y = madd(y, r, set1(1.6666665459e-1f));
  y = madd(y, r, set1(5.0000001201e-1f));
  y = madd(y, mul(r, r), add(r, set1(1.0f)));
  // 2^n as 2^n1 · 2^n2 (n1 = n >> 1): each factor a normal float for n in [−150, 128]
  const vi ni = rounded_to_int(t, n);
  const vi n1 = i32_shr(ni, 1);
  const vi bias = i32_set1(127);
  y = mul(y, bits_as_float(i32_shl(i32_add(n1, bias), 23)));
  return mul(y, bits_as_float(i32_shl(i32_add(i32_sub(ni, n1), bias), 23)));
}
#endif

#if !defined(SMLA_SIMD_HAS_IN_REGISTER)
static inline vf in_register(vf v) { return v; }  // the compiler's choice stands
#endif

#if defined(SMLA_SIMD_WASM)
// Reads a byte of every 64-byte line of [p, p + bytes) and drops it. WASM has no prefetch
// instruction: the gathers touch the next block's KV rows this way (#if SMLA_SIMD_TOUCH_AHEAD),
// so that those rows' cache misses are in flight together while the current block computes,
// instead of stalling the next gather one row at a time. Native builds keep the hardware's
// prefetchers and their code as it was (even a no-op touch in the gathers changed GCC's output).
#define SMLA_SIMD_TOUCH_AHEAD 1
static inline void touch_lines(const void* p, int64_t bytes) {
  const volatile uint8_t* b = static_cast<const volatile uint8_t*>(p);
  for (int64_t i = 0; i < bytes; i += 64) (void)b[i];
  if (bytes > 0) (void)b[bytes - 1];  // the last line, when p is not line-aligned
}
#elif defined(SMLA_SIMD_AVX512) && !defined(SMLA_SIMD_NO_PREFETCH)
// AVX-512's kernels wait on the gathers' cache misses for a larger share of their time: the next
// block's rows are prefetched the same way (prefetcht0 of every line).
#define SMLA_SIMD_TOUCH_AHEAD 1
static inline void touch_lines(const void* p, int64_t bytes) {
  const char* b = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(b + i, _MM_HINT_T0);
  if (bytes > 0) _mm_prefetch(b + bytes - 1, _MM_HINT_T0);
}
#endif

}  // namespace simd
}  // namespace smla
