// The CPU attention kernel shared by sparse prefill (§4) and paged FP8 attention (§5): one query,
// all heads, against a list of gathered KV rows. It works like a small flash attention:
// the valid rows are gathered in blocks of kBlock rows converted to float32 (each KV row is read
// once per query, for all heads), S = Q·Kᵀ for all heads with register-blocked SIMD tiles, an online
// softmax update per head, then O += P·V with register-blocked tiles. Accumulation is float32.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "isa_dispatch.h"
#include "simd.h"
#include "sparse_mla/formats.h"
#include "sparse_mla/online_softmax.h"

// SMLA_BF16_DOT: S = Q·Kᵀ with AVX512_BF16's vdpbf16ps, straight on the bf16 values (twice the
// multiply-adds of an fp32 FMA an instruction), on CPUs that have it (Zen 4 / 5, Sapphire Rapids
// and later). Every AVX-512 build carries it: only its routines (namespace bf16_dot) are compiled
// for AVX512_BF16, by a target attribute unless -march has it, so the rest of an AVX-512 build
// still runs on CPUs without it (Skylake-SP, Cascade Lake, Ice Lake); smla_isa_bf16_dot_active()
// (isa_dispatch.h) says at run time whether a query may take it. bf16 products are exact in fp32
// and each of the instruction's two steps is an fp32 FMA rounded to nearest even, as the fp32
// path's; what differs is that it reads subnormal inputs as 0 and flushes subnormal results to 0
// (whatever MXCSR says). So a block takes it only when that cannot move a logit measurably
// (bf16_dot_query): no bf16 subnormal in the query or the block's rows (a subnormal times a huge
// value can be a logit's whole size), and |smScale| · dQK ≤ 2^80 (each flushed step moves the dot
// by less than 2^-126, so a logit moves by less than 2^-46: far below SPEC §4's bounds). Other
// blocks take the fp32 path. P·V stays fp32: V's subnormals count there.
#if defined(SMLA_SIMD_AVX512) && defined(SMLA_ISA_BF16_DOT_BUILDABLE)
#define SMLA_BF16_DOT 1
#if defined(__AVX512BF16__)
#define SMLA_BF16_DOT_TARGET
#else
#define SMLA_BF16_DOT_TARGET __attribute__((target("avx512bf16")))
#endif
#endif

namespace smla {
namespace cpu {

// malloc of count * elem bytes (64-byte aligned), or null when the size does not fit size_t
// (wasm32: 4 GiB) or the allocation fails. Never allocates less than asked for.
static inline void* scratch_alloc(int64_t count, int64_t elem) {
  if (count < 0 || elem <= 0) return nullptr;
  if (count == 0) count = 1;
  if (uint64_t(count) > uint64_t(SIZE_MAX) / uint64_t(elem)) return nullptr;
  void* p = nullptr;
  if (posix_memalign(&p, 64, size_t(count) * size_t(elem)) != 0) return nullptr;
  return p;
}

// Tile shapes (register blocking), one row per SIMD target; a -D of the same name overrides one.
// KBLOCK: KV rows per block. LOGIT_HB x LOGIT_RB: heads x rows of one S = Q·Kᵀ tile, that many
// accumulators. PV_HB x PV_DB: heads x vectors along d of one O += P·V tile.
// - AVX2, WASM, SSE2: chosen by measurement (bench/wasm_kernel.mjs, test/cpp/core_bench.cpp).
//   AVX2 has 16 registers of 8 lanes: 12 accumulators a tile, and 32-row blocks (half the
//   per-block rescales of O). WASM has no FMA in Node 20 (a temporary register per mul + add)
//   and V8 allocates 15 of the 16 xmm registers: 8 accumulators a tile; AVX2's tiles and 32-row
//   blocks, and 9- or 10-accumulator tiles, measured slower there.
// - AVX-512 (32 registers of 16 lanes): AVX2's shapes. Measured against logits 8x2, 12x2, 6x4 and
//   P·V 8x2, 6x4 and 64-row blocks (bench/cpu_core_ab.sh; hQ 64 / 128): none differed beyond the
//   noise, and AVX2's shapes keep the same head groups (64 heads = 10 · 6 + 4).
// - NEON (not measured: no arm64 machine here; qemu timings mean nothing), by register count:
//   AArch64 has 32 registers of 4 lanes; Neoverse N1 runs 2 FMLA a cycle, V1 / V2 run 4, each with
//   a latency of 4 cycles (Arm's optimization guides), so 16 independent accumulators keep every
//   pipe busy. A 4 x 4 tile is 16 accumulators + 4 row / vector loads + 1 query / splat = 21
//   registers (no spills; 6 x 4 would be 29), 2 FMLA per load (these cores load 2-3 vectors a
//   cycle), and 4 heads divide the usual head counts (16, 64, 128) with no tail. 16-row blocks
//   keep a block of KV rows in the 64 KiB L1D of N1 / V1 / V2 (16 x 576 floats = 36 KiB; 32
//   rows, 72 KiB, would not).
struct TileShapes {
  int kblock, logit_hb, logit_rb, pv_hb, pv_db;
};
#if defined(SMLA_SIMD_AVX512) || defined(SMLA_SIMD_AVX2)
constexpr TileShapes kTileShapes{32, 6, 2, 6, 2};
#elif defined(SMLA_SIMD_NEON)
constexpr TileShapes kTileShapes{16, 4, 4, 4, 4};
#elif defined(SMLA_SIMD_WASM)
constexpr TileShapes kTileShapes{16, 4, 2, 2, 4};
#else  // SSE2, scalar
constexpr TileShapes kTileShapes{16, 4, 2, 4, 2};
#endif
#ifndef SMLA_KBLOCK
#define SMLA_KBLOCK kTileShapes.kblock
#endif
#ifndef SMLA_LOGIT_HB
#define SMLA_LOGIT_HB kTileShapes.logit_hb
#endif
#ifndef SMLA_LOGIT_RB
#define SMLA_LOGIT_RB kTileShapes.logit_rb
#endif
#ifndef SMLA_PV_HB
#define SMLA_PV_HB kTileShapes.pv_hb
#endif
#ifndef SMLA_PV_DB
#define SMLA_PV_DB kTileShapes.pv_db
#endif
constexpr int kBlock = SMLA_KBLOCK;  // KV rows per block

// Scratch for one call (reused by every query of the call).
struct AttentionScratch {
  float* q = nullptr;      // [h_q, d_qk] the query in float32
  float* acc = nullptr;    // [h_q, d_v] unnormalized output
  float* k = nullptr;      // [kBlock, d_qk] gathered KV rows in float32 (V = first d_v dims)
#if defined(SMLA_BF16_DOT)
  uint16_t* kb = nullptr;  // [kBlock, d_qk] the same rows as bf16, for vdpbf16ps
#endif
  float* s = nullptr;      // [h_q, kBlock] logits, then probabilities
  SoftmaxRow* rows = nullptr;  // [h_q]

  bool allocate(int64_t h_q, int64_t d_qk, int64_t d_v) {
    q = static_cast<float*>(scratch_alloc(h_q * d_qk, sizeof(float)));
    acc = static_cast<float*>(scratch_alloc(h_q * d_v, sizeof(float)));
    k = static_cast<float*>(scratch_alloc(kBlock * d_qk, sizeof(float)));
    s = static_cast<float*>(scratch_alloc(h_q * kBlock, sizeof(float)));
    rows = static_cast<SoftmaxRow*>(scratch_alloc(h_q, sizeof(SoftmaxRow)));
#if defined(SMLA_BF16_DOT)
    kb = static_cast<uint16_t*>(scratch_alloc(kBlock * d_qk, sizeof(uint16_t)));
    if (!kb) return false;
#endif
    return q && acc && k && s && rows;
  }
  void release() {
    free(q);
    free(acc);
    free(k);
    free(s);
    free(rows);
#if defined(SMLA_BF16_DOT)
    free(kb);
    kb = nullptr;
#endif
    q = acc = k = s = nullptr;
    rows = nullptr;
  }

};

// s[h * kBlock + r] = <q[h], k[r]> for h in [h0, h0+HB), r in [r0, r0+RB). Vectors run along d.
template <int HB, int RB>
static inline void logits_tile(const float* q, const float* k, float* s, int d_qk, int h0, int r0) {
  using namespace simd;
  vf a[HB][RB];
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < RB; ++r) a[h][r] = zero();
  const float* qp[HB];
  const float* kp[RB];
  for (int h = 0; h < HB; ++h) qp[h] = q + int64_t(h0 + h) * d_qk;
  for (int r = 0; r < RB; ++r) kp[r] = k + int64_t(r0 + r) * d_qk;
  for (int d = 0; d < d_qk; d += W) {
    vf kv[RB];
    for (int r = 0; r < RB; ++r) kv[r] = load(kp[r] + d);
    for (int h = 0; h < HB; ++h) {
      const vf qv = in_register(load(qp[h] + d));
      for (int r = 0; r < RB; ++r) a[h][r] = madd(qv, kv[r], a[h][r]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < RB; ++r) s[int64_t(h0 + h) * kBlock + r0 + r] = hsum(a[h][r]);
}

template <int HB, int RB>
static inline void logits_rows(const float* q, const float* k, float* s, int d_qk, int h0, int nb) {
  int r = 0;
  for (; r + RB <= nb; r += RB) logits_tile<HB, RB>(q, k, s, d_qk, h0, r);
  for (; r < nb; ++r) logits_tile<HB, 1>(q, k, s, d_qk, h0, r);
}

// S = Q·Kᵀ for all heads over nb rows.
static inline void block_logits(const float* q, const float* k, float* s, int h_q, int d_qk, int nb) {
  constexpr int HB = SMLA_LOGIT_HB, RB = SMLA_LOGIT_RB;
  int h = 0;
  for (; h + HB <= h_q; h += HB) logits_rows<HB, RB>(q, k, s, d_qk, h, nb);
  if (HB > 2)
    for (; h + 2 <= h_q; h += 2) logits_rows<2, RB>(q, k, s, d_qk, h, nb);
  for (; h < h_q; ++h) logits_rows<1, RB>(q, k, s, d_qk, h, nb);
}

#if defined(SMLA_BF16_DOT)
// Whether x[0, n) (bf16 bits, n a multiple of 32) holds a subnormal: exponent field 0, fraction not.
static inline bool has_bf16_subnormal(const uint16_t* x, int64_t n) {
  const __m512i exp_bits = _mm512_set1_epi16(0x7f80), frac_bits = _mm512_set1_epi16(0x007f);
  __mmask32 sub = 0;
  for (int64_t j = 0; j < n; j += 32) {
    const __m512i b = _mm512_loadu_si512(x + j);
    sub |= _mm512_testn_epi16_mask(b, exp_bits) & _mm512_test_epi16_mask(b, frac_bits);
  }
  return sub != 0;
}

// The bf16 bits of n float32 values that are bf16 values (the gathered rows): their top halves.
// Returns whether one is a bf16 subnormal. n is a multiple of 16.
static inline bool pack_bf16_rows(const float* src, uint16_t* dst, int64_t n) {
  const __m256i exp_bits = _mm256_set1_epi16(0x7f80), frac_bits = _mm256_set1_epi16(0x007f);
  __mmask16 sub = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __m256i b =
        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(src + j)), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), b);
    sub |= _mm256_testn_epi16_mask(b, exp_bits) & _mm256_test_epi16_mask(b, frac_bits);
  }
  return sub != 0;
}

// The only code built for AVX512_BF16 where -march lacks it (.ci/x64_core_check.sh: its
// instructions lie in this namespace alone). Compilers never inline a function into a caller
// without its target attribute, so none of it lands in code that runs without the CPU check.
namespace bf16_dot {
// logits_tile on bf16 q and k rows: 32 values of d a step, vdpbf16ps summing pairs into 16 lanes.
template <int HB, int RB>
SMLA_BF16_DOT_TARGET __attribute__((always_inline)) static inline void logits_tile_bf16(
    const uint16_t* q, const uint16_t* k, float* s, int d_qk, int h0, int r0) {
  __m512 a[HB][RB];
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < RB; ++r) a[h][r] = _mm512_setzero_ps();
  const uint16_t* qp[HB];
  const uint16_t* kp[RB];
  for (int h = 0; h < HB; ++h) qp[h] = q + int64_t(h0 + h) * d_qk;
  for (int r = 0; r < RB; ++r) kp[r] = k + int64_t(r0 + r) * d_qk;
  for (int d = 0; d < d_qk; d += 32) {
    __m512bh kv[RB];
    for (int r = 0; r < RB; ++r) kv[r] = (__m512bh)_mm512_loadu_si512(kp[r] + d);
    for (int h = 0; h < HB; ++h) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp[h] + d);
      for (int r = 0; r < RB; ++r) a[h][r] = _mm512_dpbf16_ps(a[h][r], qv, kv[r]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < RB; ++r) s[int64_t(h0 + h) * kBlock + r0 + r] = simd::hsum(a[h][r]);
}

template <int HB, int RB>
SMLA_BF16_DOT_TARGET __attribute__((always_inline)) static inline void logits_rows_bf16(
    const uint16_t* q, const uint16_t* k, float* s, int d_qk, int h0, int nb) {
  int r = 0;
  for (; r + RB <= nb; r += RB) logits_tile_bf16<HB, RB>(q, k, s, d_qk, h0, r);
  for (; r < nb; ++r) logits_tile_bf16<HB, 1>(q, k, s, d_qk, h0, r);
}

// block_logits through vdpbf16ps, the fp32 path's tile shape (6 x 4, 8 x 2 and 12 x 2 measured no
// faster beyond the noise).
SMLA_BF16_DOT_TARGET static void block_logits_bf16(const uint16_t* q, const uint16_t* k, float* s, int h_q,
                                                   int d_qk, int nb) {
  constexpr int HB = SMLA_LOGIT_HB, RB = SMLA_LOGIT_RB;
  int h = 0;
  for (; h + HB <= h_q; h += HB) logits_rows_bf16<HB, RB>(q, k, s, d_qk, h, nb);
  if (HB > 2)
    for (; h + 2 <= h_q; h += 2) logits_rows_bf16<2, RB>(q, k, s, d_qk, h, nb);
  for (; h < h_q; ++h) logits_rows_bf16<1, RB>(q, k, s, d_qk, h, nb);
}
}  // namespace bf16_dot

// The scale condition of SMLA_BF16_DOT (false for NaN and ±inf).
static inline bool bf16_dot_scale_ok(float sm_scale, int d_qk) {
  return fabsf(sm_scale) * float(d_qk) <= 0x1p80f;
}
#endif

// acc[h, d0 : d0 + DB*W] += Σ_r p[h, r] · v[r, ...] for h in [h0, h0+HB).
template <int HB, int DB>
static inline void pv_tile(const float* p, const float* v, float* acc, int d_qk, int d_v, int h0,
                           int d0) {
  using namespace simd;
  vf a[HB][DB];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < DB; ++c) a[h][c] = load(acc + int64_t(h0 + h) * d_v + d0 + c * W);
  for (int r = 0; r < kBlock; ++r) {  // whole blocks: a fixed trip count the compiler unrolls
    const float* vr = v + int64_t(r) * d_qk + d0;
    vf vv[DB];
    for (int c = 0; c < DB; ++c) vv[c] = load(vr + c * W);
    for (int h = 0; h < HB; ++h) {
      const vf ph = load_splat(p + int64_t(h0 + h) * kBlock + r);
      for (int c = 0; c < DB; ++c) a[h][c] = madd(ph, vv[c], a[h][c]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < DB; ++c) store(acc + int64_t(h0 + h) * d_v + d0 + c * W, a[h][c]);
}

template <int HB>
static inline void pv_heads(const float* p, const float* v, float* acc, int d_qk, int d_v, int h0) {
  constexpr int DB = SMLA_PV_DB;
  int d = 0;
  for (; d + DB * simd::W <= d_v; d += DB * simd::W) pv_tile<HB, DB>(p, v, acc, d_qk, d_v, h0, d);
  for (; d < d_v; d += simd::W) pv_tile<HB, 1>(p, v, acc, d_qk, d_v, h0, d);
}

// O += P·V over a whole block; rows past the block's count have p = 0 and zeroed V rows. Heads
// past the last whole group of HB go in groups of 4, 2, then 1 (64 heads = 10 · 6 + 4).
static inline void block_pv(const float* p, const float* v, float* acc, int h_q, int d_qk, int d_v) {
  constexpr int HB = SMLA_PV_HB;
  int h = 0;
  for (; h + HB <= h_q; h += HB) pv_heads<HB>(p, v, acc, d_qk, d_v, h);
  if (HB > 4)
    for (; h + 4 <= h_q; h += 4) pv_heads<4>(p, v, acc, d_qk, d_v, h);
  if (HB > 2)
    for (; h + 2 <= h_q; h += 2) pv_heads<2>(p, v, acc, d_qk, d_v, h);
  for (; h < h_q; ++h) pv_heads<1>(p, v, acc, d_qk, d_v, h);
}

// Online softmax update of every head for one block of nb logits (in place: logits -> exp terms,
// zero past nb); rescales acc rows whose max moved.
#if defined(SMLA_SIMD_HAS_EXP)
// Moves a row to its running max after a block whose own max is m_blk: l and the row's acc are
// rescaled (the caller adds the block's terms to l); returns the exponent base of the new max.
static inline float row_update(SoftmaxRow& row, float m_blk, float* acc_row, int d_v) {
  const float m_new = nan_max(row.m, m_blk);
  const float alpha = softmax_rescale(row.m, m_new);
  row.l *= alpha;
  row.m = m_new;
  if (alpha != 1.0f) {
    const simd::vf av = simd::set1(alpha);
    for (int d = 0; d < d_v; d += simd::W) simd::store(acc_row + d, simd::mul(simd::load(acc_row + d), av));
  }
  return softmax_exp_base(m_new);
}

// Vectors along the block's rows; the last, partial vector is masked (its lanes past nb hold
// stale logits: they count as −inf in the max and their terms are zeroed).
static inline void block_softmax(float* s, SoftmaxRow* rows, float* acc, int h_q, int d_v, int nb,
                                 float sm_scale) {
  using namespace simd;
  const int whole = nb - nb % W;
  const lanes tail = first_lanes(nb - whole);
  const vf scale = set1(sm_scale), neg_inf = set1(-INFINITY);
  for (int h = 0; h < h_q; ++h) {
    float* sh = s + int64_t(h) * kBlock;
    vf m = neg_inf;
    int r = 0;
    for (; r < whole; r += W) {
      const vf x = mul(load(sh + r), scale);
      store(sh + r, x);
      m = max(m, x);
    }
    if (r < nb) {
      const vf x = mul(load(sh + r), scale);
      store(sh + r, x);
      m = max(m, select(tail, x, neg_inf));
    }
    const vf base = set1(row_update(rows[h], hmax(m), acc + int64_t(h) * d_v, d_v));
    vf sum = zero();
    for (r = 0; r < whole; r += W) {
      const vf e = exp(sub(load(sh + r), base));
      store(sh + r, e);
      sum = add(sum, e);
    }
    if (r < nb) {
      const vf e = select(tail, exp(sub(load(sh + r), base)), zero());
      store(sh + r, e);
      sum = add(sum, e);
      r += W;
    }
    for (; r < kBlock; r += W) store(sh + r, zero());
    rows[h].l += hsum(sum);
  }
}
#else
// NEON and scalar code: libm's expf a logit.
static inline void block_softmax(float* s, SoftmaxRow* rows, float* acc, int h_q, int d_v, int nb,
                                 float sm_scale) {
  for (int h = 0; h < h_q; ++h) {
    float* sh = s + int64_t(h) * kBlock;
    float m_blk = -INFINITY;
    for (int r = 0; r < nb; ++r) {
      sh[r] *= sm_scale;
      m_blk = nan_max(m_blk, sh[r]);
    }
    SoftmaxRow row = rows[h];
    const float m_new = nan_max(row.m, m_blk);
    const float alpha = softmax_rescale(row.m, m_new);
    const float base = softmax_exp_base(m_new);
    float sum = 0.0f;
    for (int r = 0; r < nb; ++r) {
      const float e = expf(sh[r] - base);
      sh[r] = e;
      sum += e;
    }
    for (int r = nb; r < kBlock; ++r) sh[r] = 0.0f;
    row.l = row.l * alpha + sum;
    row.m = m_new;
    rows[h] = row;
    if (alpha != 1.0f) {
      float* ah = acc + int64_t(h) * d_v;
      const simd::vf av = simd::set1(alpha);
      for (int d = 0; d < d_v; d += simd::W) simd::store(ah + d, simd::mul(simd::load(ah + d), av));
    }
  }
}
#endif

// Runs one query. q_bf16: [h_q, d_qk]. fill(start, count, dst) writes `count` gathered rows
// (entries start..start+count of this query's valid list) as float32 into dst [count, d_qk].
// Writes out [h_q, d_v] bf16, lse [h_q], max_logits [h_q] (max_logits may be null).
template <class Fill>
static void attend_query(const uint16_t* q_bf16, int h_q, int d_qk, int d_v, int64_t n_valid,
                         Fill&& fill, float sm_scale, const float* attn_sink, AttentionScratch& sc,
                         uint16_t* out, float* lse, float* max_logits) {
  const int64_t qn = int64_t(h_q) * d_qk;
  for (int64_t j = 0; j < qn; j += simd::W) simd::store(sc.q + j, simd::load_bf16(q_bf16 + j));
  const int64_t an = int64_t(h_q) * d_v;
  for (int64_t j = 0; j < an; j += simd::W) simd::store(sc.acc + j, simd::zero());
  for (int h = 0; h < h_q; ++h) sc.rows[h] = softmax_row_init();
#if defined(SMLA_BF16_DOT)
  // With few heads, packing the block's rows to bf16 costs about what the faster dots save (hQ = 4:
  // no gain; hQ = 1: a loss), so the bf16 path starts at 8 heads.
  const bool bf16_dot_query = h_q >= 8 && smla_isa_bf16_dot_active() && bf16_dot_scale_ok(sm_scale, d_qk) &&
                              !has_bf16_subnormal(q_bf16, qn);
#endif

  for (int64_t start = 0; start < n_valid; start += kBlock) {
    const int nb = int(n_valid - start < kBlock ? n_valid - start : kBlock);
    fill(start, nb, sc.k);
    // A short last block: zero the unused rows so that P·V can run the whole block (0 · 0).
    if (nb < kBlock) memset(sc.k + int64_t(nb) * d_qk, 0, size_t(kBlock - nb) * size_t(d_qk) * sizeof(float));
#if defined(SMLA_BF16_DOT)
    if (bf16_dot_query && !pack_bf16_rows(sc.k, sc.kb, int64_t(nb) * d_qk))
      bf16_dot::block_logits_bf16(q_bf16, sc.kb, sc.s, h_q, d_qk, nb);
    else
#endif
      block_logits(sc.q, sc.k, sc.s, h_q, d_qk, nb);
    block_softmax(sc.s, sc.rows, sc.acc, h_q, d_v, nb, sm_scale);
    block_pv(sc.s, sc.k, sc.acc, h_q, d_qk, d_v);
  }

  for (int h = 0; h < h_q; ++h) {
    const SoftmaxResult r = softmax_finalize(sc.rows[h], n_valid > 0, attn_sink != nullptr,
                                             attn_sink ? attn_sink[h] : 0.0f);
    lse[h] = r.lse;
    if (max_logits) max_logits[h] = r.max_logit;
    const float* ah = sc.acc + int64_t(h) * d_v;
    uint16_t* oh = out + int64_t(h) * d_v;
    if (n_valid == 0) {
      for (int d = 0; d < d_v; ++d) oh[d] = 0;
    } else {
      for (int d = 0; d < d_v; ++d) oh[d] = float_to_bf16(ah[d] * r.out_scale);
    }
  }
}

}  // namespace cpu
}  // namespace smla
