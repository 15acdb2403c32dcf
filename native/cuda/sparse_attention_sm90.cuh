// The sm_90a sparse-prefill attention kernel (§4), and the math helpers (detail::) the paged FP8
// attention kernel (§5, paged_sparse_attention.cuh) shares with it.
//
// A tile = one query x a block of 64 heads (one wgmma M tile). All heads of a query attend the
// same KV rows, so every row is gathered once for 64 heads. The grid is persistent (one CTA per
// SM, tiles taken round-robin), so one tile's epilogue overlaps the next tile's loads. A tile's
// entries are streamed in blocks of 64 rows through two block buffers (K0 holds the even
// blocks, K1 the odd ones); each buffer is split into a left half (dims 0-255) and a right half
// (dims 256-dQK) with their own empty barriers, so a half is refilled as soon as its last reader
// is done with it; a half lands in groups of two 64-dim chunks, each on its own full barrier, so
// a QKᵀ starts on a half's first chunks while the rest are still in flight.
//
//   warpgroup 2, producer: loads each tile's Q, then fills K0.left, K1.right, K0.right, K1.left
//     per pair of blocks (the order in which the math warpgroups need them), through a Source
//     policy: bf16 rows gathered by index, or FP8 v4 tokens dequantized in shared memory.
//     Invalid entries are zero-filled and never read.
//   warpgroups 0 and 1, math, in a "seesaw" over each pair of blocks (b, b+1):
//     WG0 computes S0 = Q·K_bᵀ, WG1 S1 = Q·K_{b+1}ᵀ (each m64n64, K = dQK). WG0 owns O[:, 0:256],
//     WG1 O[:, 256:512]. The running row max is chained through shared memory: WG0 takes the max
//     over block b, WG1 then over block b+1; it moves only when a block passes it by more than 8
//     (log2 units: lazy_max), so O is rarely rescaled, and the true max travels beside it. Each WG
//     multiplies its own P (bf16, in registers) into its own half of O right away (RS wgmma) and
//     hands P to the other WG through shared memory (SS wgmma); WG0's P is rescaled to WG1's newer
//     max before it is handed over. Per pair
//     each WG issues one QKᵀ and two P·V products, and the tensor cores stay busy while the other
//     WG does its softmax. Row sums are combined once, in the epilogue, which also folds in the
//     sink and stores O: with dQK 512 through the K1 halves and TMA stores (kTmaStore, below),
//     otherwise straight from registers (shared memory is already refilled by then; with dQK 576
//     each WG has issued the next tile's first QKᵀ chunks before it, so the tensor cores work
//     through it). The rare rows whose largest logit lies near 0 get their max and lse redone on
//     the CUDA cores there (max_logit_needs_exact).
//
// Tiles are rows of 128-byte swizzled chunks of 64 dims: element (r, d) of a 64-row tile sits at
// (d/64)*8192 + r*128 + (((d%64)/8) ^ (r%8))*16 + (d%8)*2, which is wgmma's canonical 128B-swizzle
// layout both as a K-major operand (Q, K, P) and as an MN-major operand (V).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "launch_cache.cuh"
#include "sm90_ptx.cuh"
#include "sparse_mla/formats.h"
#include "sparse_mla/online_softmax.h"

namespace smla::cuda {

constexpr int kHeadsPerCta = 64;
// A launch's tiles: (query, group of kHeadsPerCta heads) pairs.
__host__ __device__ inline int head_blocks_of(int h_q) { return (h_q + kHeadsPerCta - 1) / kHeadsPerCta; }
__host__ __device__ inline int64_t attention_tiles(int64_t s_q, int h_q) { return s_q * head_blocks_of(h_q); }
constexpr int kBlockRows = 64;
// The block pairs a query's `entries` take (a pair: one block each math warpgroup); 0 without
// entries, a tile the producer finishes itself.
__host__ __device__ inline int block_pairs(int entries) { return ((entries + kBlockRows - 1) / kBlockRows + 1) / 2; }
constexpr int kDv = 512;
constexpr int kAttnThreads = 384;
constexpr int kLeftChunks = 4;  // dims [0, 256): V's left half
// The kernels keep logits in log2 units (exp2 with the scale folded in): x·kLog2e, and back ·kLn2.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t swz_offset(int r, int d) {
  return uint32_t((d >> 6) * 8192 + r * 128 + ((((d & 63) >> 3) ^ (r & 7)) << 4) + (d & 7) * 2);
}

template <int DQK>
struct AttnSmem {
  static_assert(DQK % 64 == 0 && DQK >= kDv && DQK <= 576, "dQK: a multiple of 64 in [512, 576]");
  static constexpr int kChunks = DQK / 64;
  static constexpr int kTileBytes = kChunks * 8192;
  static constexpr int kQ = 0;
  static constexpr int kK0 = kTileBytes;
  static constexpr int kK1 = 2 * kTileBytes;
  // P handed between the warpgroups: 64x64 bf16 K-major tiles. WG1's always has its own space;
  // WG0's sits in K0's last chunk when dQK > dV (dims past dV are read only by QKᵀ, which is
  // done with that chunk before WG0 writes its P, and refilled only after WG1 has read it).
  static constexpr int kP1 = 3 * kTileBytes;
  static constexpr int kP0 = DQK > kDv ? kK0 + (kChunks - 1) * 8192 : kP1 + 8192;
  static constexpr int kValid = kP1 + (DQK > kDv ? 8192 : 16384);  // uint8 [2][64]
  static constexpr int kMax = kValid + 128;  // float [64]: the running max handed between WGs
  // Epilogue exchange, double-buffered by tile parity (the next tile's epilogue may start while
  // the other WG still reads this one's): float [2][2][64] row sums per WG, int [2][8] per math
  // warp whether it saw a valid entry.
  static constexpr int kL = kMax + 256;
  static constexpr int kSeen = kL + 1024;
  // uint64 full[2][kChunks] (by chunk: a landing group's on its first chunk, detail::
  // kChunksPerLanding), empty[4] ([buffer*2 + half]), q_full, q_empty, max_ready[2] (WG0 -> WG1,
  // WG1 -> WG0)
  static constexpr int kBarriers = 2 * kChunks + 8;
  static constexpr int kBar = kSeen + 64;
  static constexpr int kMaxTrue = kBar + kBarriers * 8;  // float [64]: the true running max handed with sMax
  // uint32 [2]: the tile handed to the math WGs with its Q, and the producer's last claim
  static constexpr int kTileIds = kMaxTrue + 256;
  static constexpr int kTotal = kTileIds + 8;
  static constexpr int kAlloc = kTotal + 1024;  // slack to align the base to 1024 B
  static_assert(kAlloc <= 232448, "fits the 227 KB a block may use");
};

struct AttnOutputs {
  const uint16_t* q;    // [s_q, h_q, DQK] bf16
  int64_t s_q;
  int32_t h_q;
  float sm_scale;
  const float* attn_sink;  // [h_q] or nullptr
  uint16_t* out;           // [s_q, h_q, 512] bf16
  float* max_logits;       // [s_q, h_q] or nullptr
  float* lse;              // [s_q, h_q] or nullptr
  // Zero before the launch: the persistent CTAs claim their tiles after the first by counting it up
  // (a CTA that finishes early takes the next tile). nullptr: tiles round-robin by CTA.
  unsigned int* tile_claims = nullptr;
};

// Producer threads: 16 groups of 8. Group g serves rows g + 16r (r = 0..3) of every block; the
// 8 threads of a group move one 128-byte chunk row together (coalesced), thread `piece` its
// 16-byte piece (or its 32 dims).
constexpr int kRowsPerProducerThread = 4;

// Source policy (the producer side):
//   kProducerRegs / kConsumerRegs: the setmaxnreg split between producer and math warpgroups.
//   Entries begin(qi): the query's entry count (.total).
//   Rows load_rows(entries, qi, block, group): entries block*64 + group + 16r, resolved; an entry
//     past .total is invalid and its index is never read.
//   bool valid(rows, r).
//   fill<DQK, C0, C1>(rows, tile, group, piece, landed): fill dims [64*C0, 64*C1) of the four rows
//     (invalid rows zero-filled without reading) and arrive, for each landing group of chunks
//     (detail::starts_landing_group), on landed[its first chunk] once that group is visible to
//     wgmma (an arrival that may complete later, when asynchronous copies land).
namespace detail {

// Matrix descriptors are built once per operand base; a step within the operand adds its byte
// offset / 16 to the address field (bits 0-13), which never carries: shared addresses are < 256 KB.
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t base) { return gmma_desc_sw128(base, 16, 1024); }
// V as wgmma's B operand: MN-major, 64-dim chunks 8192 B apart (LBO), 8-key groups 1024 B apart
// (SBO); k step kk (keys [16kk, 16kk + 16)) is 2048 B further.
__device__ __forceinline__ uint64_t v_desc(uint32_t half_base) { return gmma_desc_sw128(half_base, 8192, 1024); }

// S (+)= Q · K[:, chunk c]ᵀ, m64n64, both operands K-major (chunk c at +8192 B, k step at +32 B);
// `zero_first`: the chunk's first product overwrites S instead of adding to it.
__device__ __forceinline__ void qk_chunk(float (&s)[32], uint64_t dq, uint64_t dk, int c, bool zero_first) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t step = (c * 8192 + kk * 32) >> 4;
    wgmma_m64n64k16_ss(s, dq + step, dk + step, (zero_first && kk == 0) ? 0 : 1);
  }
}

// S (+)= Q · K[:, chunks C0..C1)ᵀ.
template <int C0, int C1>
__device__ __forceinline__ void qk_chunks(float (&s)[32], uint64_t dq, uint64_t dk, bool zero_first) {
#pragma unroll
  for (int c = C0; c < C1; ++c) qk_chunk(s, dq, dk, c, zero_first && c == C0);
}

// A buffer half lands in groups of kChunksPerLanding chunks, each group on the full barrier of
// its first chunk (landed[c]), so QKᵀ starts on a half's first chunks while its last ones are in
// flight. Groups start at the half's first chunk; the producer's fill and the math warpgroups'
// waits below share this rule.
constexpr int kChunksPerLanding = 2;
__device__ __forceinline__ constexpr int landing_group_first(int c, int half_first) {
  return c - (c - half_first) % kChunksPerLanding;
}
__device__ __forceinline__ constexpr bool starts_landing_group(int c, int half_first) {
  return landing_group_first(c, half_first) == c;
}
// Chunk c is its group's last in the half [half_first, half_end).
__device__ __forceinline__ constexpr bool ends_landing_group(int c, int half_first, int half_end) {
  return c + 1 == half_end || starts_landing_group(c + 1, half_first);
}

// qk_chunks with each group's products issued once that group has landed (`landed`: the buffer's
// full barriers by chunk, waited on with `parity`); the caller fences wgmma before.
template <int C0, int C1>
__device__ __forceinline__ void qk_chunks_landed(float (&s)[32], uint64_t dq, uint64_t dk, bool zero_first, uint64_t* landed,
                                                 uint32_t parity) {
#pragma unroll
  for (int c = C0; c < C1; ++c) {
    if (starts_landing_group(c, C0)) mbar_wait(&landed[c], parity);
    qk_chunk(s, dq, dk, c, zero_first && c == C0);
  }
}

// O += P · V_half with P in registers (this WG's own block).
__device__ __forceinline__ void pv_local(float (&o)[128], const uint32_t (&pa)[16], uint64_t dv) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
    wgmma_m64n256k16_rs_tb(o, a, dv + (kk * 2048 >> 4));
  }
}

// O += P · V_half with P from shared memory (the other WG's block).
__device__ __forceinline__ void pv_remote(float (&o)[128], uint64_t dp, uint64_t dv) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_ss_tb(o, dp + (kk * 32 >> 4), dv + (kk * 2048 >> 4), 1);
}

// 4x4 transpose of 32-bit words across the 4 lanes of a quad: lane q holds row q of M on entry
// and column q on return (two exchange stages, distance 1 then 2).
__device__ __forceinline__ void quad_transpose(uint32_t (&a)[4], int quad) {
  {
    const bool odd = quad & 1;
    const uint32_t x0 = __shfl_xor_sync(0xffffffffu, odd ? a[0] : a[1], 1);
    const uint32_t x1 = __shfl_xor_sync(0xffffffffu, odd ? a[2] : a[3], 1);
    if (odd) a[0] = x0, a[2] = x1;
    else a[1] = x0, a[3] = x1;
  }
  {
    const bool hi = quad & 2;
    const uint32_t x0 = __shfl_xor_sync(0xffffffffu, hi ? a[0] : a[2], 2);
    const uint32_t x1 = __shfl_xor_sync(0xffffffffu, hi ? a[1] : a[3], 2);
    if (hi) a[0] = x0, a[1] = x1;
    else a[2] = x0, a[3] = x1;
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&b);
}

// The S accumulator (m64n64: s[4j + e] is row a, column 8j + 2*quad + e; s[4j + 2 + e] is row
// a + 8) as bf16 A-operand registers of the P·V product (k step kk = columns [16kk, 16kk + 16)).
__device__ __forceinline__ void p_to_regs(const float (&s)[32], uint32_t (&pa)[16]) {
#pragma unroll
  for (int j = 0; j < 16; ++j) pa[j] = pack_bf16(s[2 * j], s[2 * j + 1]);
}

// The same registers as a K-major 128B-swizzled 64x64 tile in shared memory.
__device__ __forceinline__ void p_to_smem(const uint32_t (&pa)[16], uint8_t* tile, int row_a, int quad) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int col = 8 * j + 2 * quad;
    *reinterpret_cast<uint32_t*>(tile + swz_offset(row_a, col)) = pa[2 * j];
    *reinterpret_cast<uint32_t*>(tile + swz_offset(row_a + 8, col)) = pa[2 * j + 1];
  }
}

// Scales an accumulator's row a values by fa and row b values by fb (C layout: x[4j], x[4j + 1] in
// row a, x[4j + 2], x[4j + 3] in row b).
template <int N>
__device__ __forceinline__ void scale_pairs(float (&x)[N], float fa, float fb) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    x[4 * j] *= fa;
    x[4 * j + 1] *= fa;
    x[4 * j + 2] *= fb;
    x[4 * j + 3] *= fb;
  }
}

// O moved to a new running max; skipped when no row max of the warp moved.
__device__ __forceinline__ void scale_rows(float (&o)[128], float fa, float fb) {
  if (__any_sync(0xffffffffu, !(fa == 1.0f && fb == 1.0f))) scale_pairs(o, fa, fb);
}

// A math thread's place in its warpgroup's m64 tiles: its lane, its quad position and its two
// rows (heads) of the tile.
struct MathThread {
  int ctid, lane, quad, row_a, row_b;
};
__device__ __forceinline__ MathThread math_thread(int tid) {
  const int ctid = tid & 127, lane = tid & 31;
  const int row_a = (ctid >> 5) * 16 + (lane >> 2);
  return MathThread{ctid, lane, lane & 3, row_a, row_a + 8};
}

// A value summed over the four threads of a quad (the columns of one row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The end of one row (head h of query qi): the softmax with the sink; lse and max_logits written
// by `writer` (one thread per row); returns the factor that normalizes the row of O.
// m_log2: the (lazy) max the row's P and l are relative to; true_max_log2: the row's largest logit.
__device__ __forceinline__ float finalize_row(const AttnOutputs& p, int64_t qi, int h, float m_log2, float true_max_log2,
                                              float l, bool any_valid, bool writer) {
  SoftmaxRow r;
  r.m = m_log2 * kLn2;
  r.l = l;
  const bool has_sink = p.attn_sink != nullptr && h < p.h_q;
  SoftmaxResult fin = softmax_finalize(r, any_valid, has_sink, has_sink ? p.attn_sink[h] : 0.0f);
  if (any_valid) fin.max_logit = true_max_log2 * kLn2;
  if (writer && h < p.h_q) {
    const int64_t orow = qi * p.h_q + h;
    if (p.lse) p.lse[orow] = fin.lse;
    if (p.max_logits) p.max_logits[orow] = fin.max_logit;
  }
  return fin.out_scale;
}

// The outputs of a tile whose query has no entries (out 0; lse and maxLogits as finalize_row gives
// a row without valid entries, the sink included), by a warpgroup: thread `ctid` writes half of row
// ctid / 2.
__device__ __forceinline__ void store_empty_tile(const AttnOutputs& p, int64_t qi, int h0, int ctid) {
  const int h = h0 + (ctid >> 1), half = ctid & 1;
  if (h >= p.h_q) return;
  if (half == 0) finalize_row(p, qi, h, -INFINITY, -INFINITY, 0.0f, false, true);
  uint4* dst = reinterpret_cast<uint4*>(p.out + (qi * p.h_q + h) * kDv) + half * (kDv / 16);
#pragma unroll 4
  for (int k = 0; k < kDv / 16; ++k) dst[k] = make_uint4(0, 0, 0, 0);
}

// Masks S (an m64nN accumulator: s[4j + e] is row a, column 8j + 2*quad + e; s[4j + 2 + e] row
// a + 8) with the block's validity flags and scales it to log2 units; returns the row maxima
// (NaN-propagating: a NaN logit poisons its row, as in the CPU core) and whether any column of
// this thread was valid.
template <int N>
__device__ __forceinline__ bool mask_and_max(float (&s)[N], const uint8_t* valid, int quad, float c2, float& bm_a,
                                             float& bm_b) {
  bm_a = -INFINITY;
  bm_b = -INFINITY;
  uint32_t seen = 0;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    const uint32_t v2 = *reinterpret_cast<const uint16_t*>(valid + 8 * j + 2 * quad);
    seen |= v2;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool ok = ((v2 >> (8 * e)) & 0xffu) != 0;
      s[4 * j + e] = ok ? s[4 * j + e] * c2 : -INFINITY;
      s[4 * j + 2 + e] = ok ? s[4 * j + 2 + e] * c2 : -INFINITY;
      bm_a = max_nan(bm_a, s[4 * j + e]);
      bm_b = max_nan(bm_b, s[4 * j + 2 + e]);
    }
  }
  bm_a = max_nan(bm_a, __shfl_xor_sync(0xffffffffu, bm_a, 1));
  bm_a = max_nan(bm_a, __shfl_xor_sync(0xffffffffu, bm_a, 2));
  bm_b = max_nan(bm_b, __shfl_xor_sync(0xffffffffu, bm_b, 1));
  bm_b = max_nan(bm_b, __shfl_xor_sync(0xffffffffu, bm_b, 2));
  return seen != 0;
}

// acc + the dot product of two rows of 8 bf16 (16 bytes each), in float32.
__device__ __forceinline__ float dot8_bf16(uint4 a, uint4 b, float acc) {
  const uint32_t x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(bf16_to_float(uint16_t(x[i])), bf16_to_float(uint16_t(y[i])), acc);
    acc = fmaf(bf16_to_float(uint16_t(x[i] >> 16)), bf16_to_float(uint16_t(y[i] >> 16)), acc);
  }
  return acc;
}

// The scale of a row's logits, from a block's P = exp2(S - base) (log2 units, masked entries 0):
// max(|true max|, |smallest logit|), the smallest from the smallest P > 0 (so at most about 126
// below the base); `true_max` alone when this block has no P > 0.
__device__ __forceinline__ void block_logit_scale(const float (&s)[32], float base_a, float base_b, float true_a,
                                                  float true_b, float& ra, float& rb) {
  float pa = INFINITY, pb = INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      pa = fminf(pa, s[4 * j + e] > 0.0f ? s[4 * j + e] : INFINITY);
      pb = fminf(pb, s[4 * j + 2 + e] > 0.0f ? s[4 * j + 2 + e] : INFINITY);
    }
  }
  pa = fminf(pa, __shfl_xor_sync(0xffffffffu, pa, 1));
  pa = fminf(pa, __shfl_xor_sync(0xffffffffu, pa, 2));
  pb = fminf(pb, __shfl_xor_sync(0xffffffffu, pb, 1));
  pb = fminf(pb, __shfl_xor_sync(0xffffffffu, pb, 2));
  ra = fabsf(true_a);
  rb = fabsf(true_b);
  if (pa != INFINITY) ra = fmaxf(ra, fabsf(base_a + __log2f(pa)));
  if (pb != INFINITY) rb = fmaxf(rb, fabsf(base_b + __log2f(pb)));
}

// §4 bounds maxLogits by 1e-6 + 2^-15·|ref| (and lse by the same relative to max(|lse|, |maxLogits|)).
// The tensor cores accumulate a QKᵀ product in float32 with an error of some ulps of its partial
// sums, whose scale the row's largest |logit| gives (`scale`, log2 units; block_logit_scale); near
// a zero max that error can pass the bound. Such rows, and short rows (cheap to redo) whose max is
// near zero, get their max and lse recomputed on the CUDA cores. A NaN or infinite max is exact
// already. Arguments in log2 units.
__device__ __forceinline__ bool max_logit_needs_exact(float max_log2, float scale, int entries) {
  const float am = fabsf(max_log2);
  const bool short_row = entries <= kBlockRows;
  return (am < scale * (1.0f / 16) && (short_row || scale > 0.25f * kLog2e)) || (short_row && am < 0.25f * kLog2e);
}

// The Q tile of (query qi, heads h0..h0+63) into shared memory by cp.async, threads `first`,
// `first + stride`, ... each issuing their 16-byte pieces; heads past h_q are zero-filled without
// reading (padding inside the op). Q is read once: evict-first.
template <int DQK>
__device__ __forceinline__ void load_q_tile(uint8_t* sQ, const AttnOutputs& p, int64_t qi, int h0, int first, int stride) {
  constexpr int kPieces = DQK / 8;  // 16-byte pieces per row
  const uint64_t once = l2_policy_evict_first();
  for (int i = first; i < kHeadsPerCta * kPieces; i += stride) {
    const int r = i / kPieces, pc = i % kPieces;
    const int h = h0 + r;
    const bool ok = h < p.h_q;
    const uint16_t* g = ok ? p.q + ((qi * p.h_q + h) * int64_t(DQK) + pc * 8) : p.q;
    cp_async_16_hint(sQ + swz_offset(r, pc * 8), g, ok ? 16u : 0u, once);
  }
}

// The running max a row's P, l and O are kept relative to moves only when a block's max passes it
// by more than 8 (log2 units), so P stays below 2^8 and O is rarely rescaled (both kernels' math
// warpgroups skip a rescale by 1). NaN and +inf move it, as max_nan does.
constexpr float kLazyMaxSlack = 8.0f;
__device__ __forceinline__ float lazy_max(float m, float b) { return b <= m + kLazyMaxSlack ? m : max_nan(m, b); }
// exp2 base for a running max: rows that have seen only -inf use 0 (P = 0 there).
__device__ __forceinline__ float exp_base(float m) { return m == -INFINITY ? 0.0f : m; }
// Factor that moves values kept relative to max `from` to max `to` (to >= from); 0 when nothing
// was accumulated yet (from = -inf), which also keeps 0 · inf out of the math.
__device__ __forceinline__ float rebase(float from, float to) {
  return from == -INFINITY ? 0.0f : exp2_approx(from - exp_base(to));
}

// P = exp2(S - base) in place; returns this thread's share of the row sums.
__device__ __forceinline__ void exponentiate(float (&s)[32], float base_a, float base_b, float& sum_a, float& sum_b) {
  sum_a = 0.0f;
  sum_b = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[4 * j + e] = exp2_approx(s[4 * j + e] - base_a);
      s[4 * j + 2 + e] = exp2_approx(s[4 * j + 2 + e] - base_b);
      sum_a += s[4 * j + e];
      sum_b += s[4 * j + 2 + e];
    }
  }
}

// Hands this warpgroup's new running max to the other one (the barrier's arrival releases sMax).
__device__ __forceinline__ void publish_max(float* sMax, int row_a, int row_b, int quad, float nm_a, float nm_b,
                                            uint64_t* ready) {
  if (quad == 0) {
    sMax[row_a] = nm_a;
    sMax[row_b] = nm_b;
  }
  mbar_arrive(ready);
}

// Moves the row sums and O to the new max (nm), turns S into P = exp2(S - max) in place, and
// issues O += P · V_half with P from registers (committed, not waited for).
__device__ __forceinline__ void softmax_and_pv_local(float (&s)[32], float (&o)[128], uint32_t (&pa)[16],
                                                     float& m_a, float& m_b, float& l_a, float& l_b, float nm_a,
                                                     float nm_b, uint64_t dv) {
  const float alpha_a = rebase(m_a, nm_a), alpha_b = rebase(m_b, nm_b);
  float sum_a, sum_b;
  exponentiate(s, exp_base(nm_a), exp_base(nm_b), sum_a, sum_b);
  l_a = l_a * alpha_a + sum_a;
  l_b = l_b * alpha_b + sum_b;
  scale_rows(o, alpha_a, alpha_b);
  m_a = nm_a;
  m_b = nm_b;
  p_to_regs(s, pa);
  wgmma_fence();
  pv_local(o, pa, dv);
  wgmma_commit();
}

// One row (head h, this thread's row a or b: `half`) of this warpgroup's half of O, normalized by
// `scale`, stored straight from the accumulator: a quad's words of 4 column groups are transposed so
// each lane stores one group's 16 bytes. Padded heads (h >= h_q) are not stored.
__device__ __forceinline__ void store_o_row(const AttnOutputs& p, int64_t qi, int h, int wg, int quad, int half,
                                            const float (&o)[128], float scale) {
  uint4* dst = reinterpret_cast<uint4*>(p.out + (qi * p.h_q + h) * kDv + wg * 256) + quad;
#pragma unroll
  for (int jj = 0; jj < 8; ++jj) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = 4 * jj + k;
      w[k] = pack_bf16(o[4 * j + 2 * half] * scale, o[4 * j + 2 * half + 1] * scale);
    }
    quad_transpose(w, quad);
    if (h < p.h_q) __stcs(dst + 4 * jj, make_uint4(w[0], w[1], w[2], w[3]));
  }
}

// One math warpgroup's half of a tile's O (rows row0 .. row0 + 63 of out, this warpgroup's 256
// columns), normalized by each row's scale, out through shared memory: written into the 32 KB at
// `stage` in the swz_offset layout (the tensor map's 128B swizzle), then sent as four 64 x 64 boxes
// of `map` by the warpgroup's first thread; once the stores have read the stage, every thread of
// the warpgroup arrives on `release` (each its own arrival after its own writes: the ordering a
// memory checker follows). `barrier_id`: a named barrier for the warpgroup's 128 threads. O is
// written once and not read by this kernel: its lines leave L2 first, before the gathered rows.
__device__ __forceinline__ void store_o_half_tma(const CUtensorMap* map, uint8_t* stage, const float (&o)[128],
                                                 float scale_a, float scale_b, const MathThread& mt, int wg,
                                                 int64_t row0, uint32_t barrier_id, uint64_t* release) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int col = 8 * j + 2 * mt.quad;
    *reinterpret_cast<uint32_t*>(stage + swz_offset(mt.row_a, col)) = pack_bf16(o[4 * j] * scale_a, o[4 * j + 1] * scale_a);
    *reinterpret_cast<uint32_t*>(stage + swz_offset(mt.row_b, col)) =
        pack_bf16(o[4 * j + 2] * scale_b, o[4 * j + 3] * scale_b);
  }
  fence_proxy_async();
  named_barrier_sync(barrier_id, 128);
  if (mt.ctid == 0) {
    const uint64_t once = l2_policy_evict_first();
#pragma unroll
    for (int c = 0; c < 4; ++c) tma_store_2d(map, smem_u32(stage + c * 8192), wg * 256 + 64 * c, int32_t(row0), once);
    bulk_commit_group();
    bulk_wait_group_read0();
  }
  named_barrier_sync(barrier_id, 128);
  mbar_arrive(release);
}

enum NamedBarrier : uint32_t {
  kMathSync = 1,   // both math WGs (256)
  kP0Ready = 2,    // WG0 -> WG1: P0 (rescaled) is in shared memory
  kP1Ready = 3,    // WG1 -> WG0: P1 is in shared memory
  kOStore0 = 4,    // math WG w's own O staging (128) is kOStore0 + w
  kClaimSync = 6,  // the producer WG (128): a claimed tile id
};

// A tile's query and first head, tiles query-major and counted in 32 bits (both launchers keep
// attention_tiles below 2^31: the kernels' warpgroups are short of registers).
struct TileOf {
  int64_t qi;
  int h0;
};
__device__ __forceinline__ TileOf tile_of(uint32_t t, int head_blocks) {
  return TileOf{int64_t(t / uint32_t(head_blocks)), int(t % uint32_t(head_blocks)) * kHeadsPerCta};
}

// Where a launch's tiles stop going round-robin and are claimed from its counter (with one): the
// last kClaimedRounds rounds or a sixteenth of them, whichever is more, and never the first, which
// every CTA takes at blockIdx.x. Without a counter: past the end.
constexpr uint32_t kClaimedRounds = 2;
__device__ __forceinline__ uint32_t claimed_tiles_from(uint32_t n_tiles, bool counter) {
  const uint32_t grid = gridDim.x, rounds = n_tiles / grid;
  if (!counter) return n_tiles + grid;
  const uint32_t claimed = rounds / 16 > kClaimedRounds ? rounds / 16 : kClaimedRounds;
  return (rounds > claimed + 1 ? rounds - claimed : 1) * grid;
}

// A launch of many tiles a CTA (kStaggerTiles or more) starts its CTAs in 16 phases, each CTA
// without one of the last round's tiles up to about one tile's time late (`entries` of its first
// tile, kStaggerNsPerEntry each: about an H200's pace at dQK 512). Started together, CTAs with
// identical tiles can run them in lockstep, their Q loads and O stores reaching memory at once: the
// sQ 32K rows ran at either of two speeds from run to run on the same buffers, and with the starts
// staggered mostly at the faster one (bench/RESULTS.md). CTAs with a last-round tile start at
// once, so the launch ends no later.
constexpr int64_t kStaggerTiles = 64;
constexpr uint64_t kStaggerNsPerEntry = 30;
__device__ __forceinline__ void stagger_start(int entries, int64_t n_tiles) {
  if (entries <= 0 || n_tiles < kStaggerTiles * gridDim.x || blockIdx.x < n_tiles % gridDim.x) return;
  const uint64_t delay = uint64_t(blockIdx.x % 16) * uint64_t(entries) * kStaggerNsPerEntry / 16;
  const uint64_t t0 = global_timer_ns();
  while (global_timer_ns() - t0 < delay) __nanosleep(256);
}

}  // namespace detail

// kTmaStore (dQK 512 with h_q a multiple of 64): a tile's normalized O leaves through shared memory
// and TMA stores (`out_map`: out as a [s_q * h_q, 512] bf16 tensor of 64 x 64 boxes, 128B swizzle)
// instead of each math thread's own stores, which stall the math warpgroups while every CTA's O
// drains at once. It is staged in the K1 half each math warpgroup read last (warpgroup 0: K1.left,
// warpgroup 1: K1.right); the producer fills a tile's first pair K0 first and refills those halves
// once the stores have read them. (Tiles without entries never reach the math warpgroups.)
template <int DQK, class Source, bool kTmaStore>
__global__ void __launch_bounds__(kAttnThreads, 1)
    sparse_attention_sm90_kernel(const AttnOutputs p, const Source src, const __grid_constant__ CUtensorMap out_map) {
  using L = AttnSmem<DQK>;
  using namespace detail;
  constexpr int C = L::kChunks;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // Aligned by an offset (not a cast through an integer), so the compiler keeps shared loads
  // and stores (LDS/STS) instead of generic ones.
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK[2] = {smem + L::kK0, smem + L::kK1};
  uint8_t* sValid = smem + L::kValid;
  float* sMax = reinterpret_cast<float*>(smem + L::kMax);
  float* sMaxTrue = reinterpret_cast<float*>(smem + L::kMaxTrue);
  float* sL = reinterpret_cast<float*>(smem + L::kL);
  int* sSeen = reinterpret_cast<int*>(smem + L::kSeen);
  uint32_t* sTileIds = reinterpret_cast<uint32_t*>(smem + L::kTileIds);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBar);  // [buffer * C + chunk]
  uint64_t* const full0 = full, * const full1 = full + C;
  uint64_t* empty = full + 2 * C;  // [buffer * 2 + half]
  uint64_t* q_full = empty + 4;
  uint64_t* q_empty = empty + 5;
  // The running max handed between the WGs once per pair (mbarriers: the handoff is a release /
  // acquire pair that memory checkers follow).
  uint64_t* max0_ready = empty + 6;  // WG0's max over block 2i is in sMax
  uint64_t* max1_ready = empty + 7;  // WG1's (newer) max over block 2i+1 is in sMax

  const int head_blocks = head_blocks_of(p.h_q);
  const uint32_t n_tiles = uint32_t(p.s_q * head_blocks);  // attention_tiles, in 32 bits
  const int tid = threadIdx.x;

  if (tid == 0) {
    // The first chunk filled of each buffer (K0's chunk 0, K1's chunk kLeftChunks) also carries
    // the buffer's validity flags: 16 more arrivals, from the threads that wrote them.
    for (int c = 0; c < C; ++c) {
      mbar_init(&full0[c], c == 0 ? 128 + 16 : 128);
      mbar_init(&full1[c], c == kLeftChunks ? 128 + 16 : 128);
    }
    // K0.right also holds P0 when dQK > dV: warpgroup 0 releases it too, once it has written P0
    for (int i = 0; i < 4; ++i) mbar_init(&empty[i], i == 1 && DQK > kDv ? 256 : 128);
    mbar_init(q_full, 128 + 1);  // Q's copies by the producer's threads, and the tile id
    mbar_init(q_empty, 256);
    mbar_init(max0_ready, 128);
    mbar_init(max1_ready, 128);
  }
  __syncthreads();

  // Warp-uniform by construction (a broadcast), so the compiler knows each warpgroup's branch is
  // not divergent and keeps its wgmma asynchronous.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);

  if (wg == 2) {
    setmaxnreg_dec<Source::kProducerRegs>();
    const int ptid = tid - 256;
    const int group = ptid >> 3, piece = ptid & 7;
    // A buffer's validity flags (written before the arrival that publishes them).
    auto write_flags = [&](const typename Source::Rows& rows, uint8_t* flags, uint64_t* bar) {
      if (piece == 0) {
#pragma unroll
        for (int r = 0; r < kRowsPerProducerThread; ++r) flags[group + 16 * r] = src.valid(rows, r);
        mbar_arrive(bar);
      }
    };
    // The producer resolves the first rows of the CTA's next tile during the current one's last
    // pair, so a tile starts without an index round trip.
    auto pairs_of = [&](const typename Source::Entries& e) { return block_pairs(e.total); };
    struct Next {
      uint32_t t;
      typename Source::Entries entries;
    };
    // The CTA's tiles: round-robin (blockIdx.x, then every gridDim.x-th) up to `claims_from`, then
    // claimed from the launch's counter, so the SMs that run faster take more of the last rounds'
    // tiles (round-robin throughout without a counter). The producer finds each next tile a tile
    // ahead and hands it with its Q to the math WGs; a tile without entries it finishes itself (its
    // outputs are constants).
    const uint32_t claims_from = claimed_tiles_from(n_tiles, p.tile_claims != nullptr);
    // the tile after t: round-robin, or claimed by producer thread 0 (`issue_claim`) and read by
    // every producer thread (`next_after`)
    const auto claimed = [&](uint32_t t) { return t + gridDim.x >= claims_from; };
    auto issue_claim = [&](uint32_t t) {
      if (claimed(t) && ptid == 0) sTileIds[1] = claims_from + atomicAdd(p.tile_claims, 1u);
    };
    auto next_after = [&](uint32_t t) -> uint32_t {
      if (!claimed(t)) return t + gridDim.x;
      named_barrier_sync(kClaimSync, 128);
      const uint32_t next = __reduce_max_sync(0xffffffffu, sTileIds[1]);  // (see the math WGs' read)
      named_barrier_sync(kClaimSync, 128);  // read by all before the next claim writes it
      return next;
    };
    auto claim = [&](uint32_t t) {
      issue_claim(t);
      return next_after(t);
    };
    auto next_tile = [&](uint32_t first) {
      Next n;
      for (n.t = first; n.t < n_tiles; n.t = claim(n.t)) {
        const TileOf tile = tile_of(n.t, head_blocks);
        n.entries = src.begin(tile.qi);
        if (pairs_of(n.entries) > 0) break;
        store_empty_tile(p, tile.qi, tile.h0, ptid);
      }
      return n;
    };
    uint32_t pairs_done = 0, q_loads = 0;
    Next cur = next_tile(blockIdx.x);
    stagger_start(cur.t < n_tiles ? cur.entries.total : 0, n_tiles);
    typename Source::Rows r0{}, r1{};
    if (cur.t < n_tiles) {
      const int64_t qi = tile_of(cur.t, head_blocks).qi;
      r0 = src.load_rows(cur.entries, qi, 0, group);
      r1 = src.load_rows(cur.entries, qi, 1, group);
    }
    while (cur.t < n_tiles) {
      const TileOf tile = tile_of(cur.t, head_blocks);
      const int n_pairs = pairs_of(cur.entries);
      Next nxt{n_tiles, {}};  // known from the tile's last pair on, where its first rows are resolved
      // Q, once the math WGs are done with the last tile's, and the tile's id beside it.
      if (q_loads > 0) mbar_wait(q_empty, (q_loads - 1) & 1);
      if (ptid == 0) {
        *sTileIds = cur.t;
        mbar_arrive(q_full);
      }
      load_q_tile<DQK>(sQ, p, tile.qi, tile.h0, ptid, 128);
      cp_async_arrive_noinc(q_full);
      ++q_loads;
      issue_claim(cur.t);  // behind Q's copies; read at the last pair
      for (int i = 0; i < n_pairs; ++i) {
        const uint32_t free_parity = ((pairs_done + i) & 1) ^ 1;  // the first wait on an empty barrier passes
        // The next pair's entries (or the next tile's first pair) are resolved now, behind this
        // pair's copies.
        const bool last = i + 1 == n_pairs;
        if (last) nxt = next_tile(next_after(cur.t));
        const bool more = !last || nxt.t < n_tiles;
        const typename Source::Entries ne = last ? nxt.entries : cur.entries;  // a copy: a reference would put both in local memory
        const int64_t nq = last ? (more ? tile_of(nxt.t, head_blocks).qi : 0) : tile.qi;
        const int nb = last ? 0 : 2 * i + 2;
        typename Source::Rows n0{}, n1{};
        if (more) {
          n0 = src.load_rows(ne, nq, nb, group);
          n1 = src.load_rows(ne, nq, nb + 1, group);
        }
        mbar_wait(&empty[0], free_parity);  // K0.left (block 2i), with buffer 0's flags
        write_flags(r0, sValid, &full0[0]);
        src.template fill<DQK, 0, kLeftChunks>(r0, sK[0], group, piece, full0);
        const auto fill_k0_right = [&] { src.template fill<DQK, kLeftChunks, C>(r0, sK[0], group, piece, full0); };
        const auto fill_k1_left = [&] { src.template fill<DQK, 0, kLeftChunks>(r1, sK[1], group, piece, full1); };
        // K1.right (block 2i+1), with buffer 1's flags
        const auto fill_k1_right = [&] {
          write_flags(r1, sValid + 64, &full1[kLeftChunks]);
          src.template fill<DQK, kLeftChunks, C>(r1, sK[1], group, piece, full1);
        };
        if (kTmaStore && i == 0) {
          // A tile's first pair: K1 holds the last tile's O staging until its stores have read it,
          // so K0 is filled whole first.
          mbar_wait(&empty[1], free_parity);
          fill_k0_right();
          mbar_wait(&empty[3], free_parity);
          fill_k1_right();
          mbar_wait(&empty[2], free_parity);
          fill_k1_left();
          r0 = n0;
          r1 = n1;
          continue;
        }
        mbar_wait(&empty[3], free_parity);
        fill_k1_right();
        // K0.right before K1.left (dQK 576 included, where K0.right also holds P0): warpgroup 0's
        // next QKᵀ needs it right behind K0.left
        mbar_wait(&empty[1], free_parity);
        fill_k0_right();
        mbar_wait(&empty[2], free_parity);
        fill_k1_left();
        r0 = n0;
        r1 = n1;
      }
      pairs_done += n_pairs;
      cur = nxt;
    }
    // no more tiles: an id past the end, with no Q
    if (q_loads > 0) mbar_wait(q_empty, (q_loads - 1) & 1);
    if (ptid == 0) {
      *sTileIds = n_tiles;
      mbar_arrive(q_full);
    }
    mbar_arrive(q_full);
    cp_async_wait_all();
    return;
  }

  setmaxnreg_inc<Source::kConsumerRegs>();
  const MathThread mt = math_thread(tid);
  const int lane = mt.lane, quad = mt.quad, row_a = mt.row_a, row_b = mt.row_b;
  const float c2 = p.sm_scale * kLog2e;  // logits in log2 units
  const uint64_t dq = kmajor_desc(smem_u32(sQ));
  const uint64_t dk0 = kmajor_desc(smem_u32(sK[0])), dk1 = kmajor_desc(smem_u32(sK[1]));
  const uint64_t dv0l = v_desc(smem_u32(sK[0])), dv0r = v_desc(smem_u32(sK[0]) + kLeftChunks * 8192);
  const uint64_t dv1l = v_desc(smem_u32(sK[1])), dv1r = v_desc(smem_u32(sK[1]) + kLeftChunks * 8192);
  uint8_t* const sP0 = smem + L::kP0;
  uint8_t* const sP1 = smem + L::kP1;
  const uint64_t dp0 = kmajor_desc(smem_u32(sP0)), dp1 = kmajor_desc(smem_u32(sP1));

  // The math warpgroups' state for their current tile.
  float o[128];
  float s[32];
  uint32_t pa[16];
  uint32_t pairs_done = 0, q_loads = 0, tiles_done = 0;
  TileOf tile{0, 0};
  float m_a, m_b;          // running (lazy) max, log2 units, shared by both WGs
  float mt_a, mt_b;        // WG0: the true running max, for max_logits
  float scale_a, scale_b;  // WG0: the scale of the rows' logits (block_logit_scale)
  float l_a, l_b;          // this thread's share of its WG's row sums
  bool seen;               // a valid entry among this thread's columns
  const auto start_tile = [&](TileOf next) {
    tile = next;
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    m_a = -INFINITY, m_b = -INFINITY;
    mt_a = -INFINITY, mt_b = -INFINITY;
    scale_a = 0.0f, scale_b = 0.0f;
    l_a = 0.0f, l_b = 0.0f;
    seen = false;
  };
  // The next tile's id (n_tiles or more: none left) once its Q is in, from the producer.
  const auto next_tile_id = [&] {
    mbar_wait(q_full, q_loads & 1);
    ++q_loads;
    // through a warp reduction, which ptxas knows to be uniform: read plainly (or by a shuffle),
    // a tile id from shared memory moved the math loops' descriptors and barrier addresses out of
    // the uniform registers (an R2UR before every wgmma group; docs/perf-history.md, twentieth session)
    return __reduce_max_sync(0xffffffffu, *reinterpret_cast<volatile uint32_t*>(sTileIds));
  };
  const auto pairs_of = [&](TileOf of) { return block_pairs(src.begin(of.qi).total); };

  // Warpgroup 0's pairs of a tile, its first QKᵀ (block 0 into s) done.
  const auto wg0_pairs = [&](int n_pairs) {
    for (int i = 0; i < n_pairs; ++i) {
      // Softmax over block 2i against the running max; hand the new max to WG1.
      float bm_a, bm_b;
      seen |= mask_and_max(s, sValid, quad, c2, bm_a, bm_b);
      const float nm_a = lazy_max(m_a, bm_a), nm_b = lazy_max(m_b, bm_b);
      if (quad == 0) {
        sMaxTrue[row_a] = max_nan(mt_a, bm_a);
        sMaxTrue[row_b] = max_nan(mt_b, bm_b);
      }
      publish_max(sMax, row_a, row_b, quad, nm_a, nm_b, max0_ready);
      // O[:, 0:256] += P0 · V0.left; then K0.left is free.
      softmax_and_pv_local(s, o, pa, m_a, m_b, l_a, l_b, nm_a, nm_b, dv0l);
      wgmma_wait<0>();
      mbar_arrive(&empty[0]);
      // WG1's max over block 2i+1: move P0, O and l to it, hand P0 over.
      mbar_wait(max1_ready, (pairs_done + i) & 1);
      const float m1_a = sMax[row_a], m1_b = sMax[row_b];
      const float f_a = rebase(m_a, m1_a), f_b = rebase(m_b, m1_b);
      mt_a = sMaxTrue[row_a];
      mt_b = sMaxTrue[row_b];
      if (__any_sync(0xffffffffu, !(f_a == 1.0f && f_b == 1.0f))) {  // pa already holds P0 on this max
        scale_pairs(s, f_a, f_b);
        p_to_regs(s, pa);
      }
      p_to_smem(pa, sP0, row_a, quad);
      fence_proxy_async();
      named_barrier_arrive(kP0Ready, 256);
      // with dQK > dV, P0 sits in K0.right: this warpgroup's part of its release (its own
      // arrival after its own writes, the ordering a memory checker follows)
      if constexpr (DQK > kDv) mbar_arrive(&empty[1]);
      l_a *= f_a;
      l_b *= f_b;
      scale_rows(o, f_a, f_b);
      m_a = m1_a;
      m_b = m1_b;
      // O[:, 0:256] += P1 · V1.left.
      named_barrier_sync(kP1Ready, 256);
      wgmma_fence();
      pv_remote(o, dp1, dv1l);
      wgmma_commit();
      if (i + 1 < n_pairs) {
        // S for block 2i+2 behind it; K1.left is free once the P·V above is done.
        const uint32_t ph = (pairs_done + i + 1) & 1;
        mbar_wait(&full0[0], ph);
        wgmma_fence();
        qk_chunks_landed<0, kLeftChunks>(s, dq, dk0, true, full0, ph);
        wgmma_commit();
        wgmma_wait<1>();
        mbar_arrive(&empty[2]);
        mbar_wait(&full0[kLeftChunks], ph);
        wgmma_fence();
        qk_chunks_landed<kLeftChunks, C>(s, dq, dk0, false, full0, ph);
        wgmma_commit();
        wgmma_wait<0>();
        if (i + 2 == n_pairs) mbar_arrive(q_empty);  // WG0's last QKᵀ of the tile is done
      } else {
        // while the tensor cores finish the tile: the scale of the row's logits, for the epilogue
        if (p.max_logits || p.lse) block_logit_scale(s, exp_base(m_a), exp_base(m_b), mt_a, mt_b, scale_a, scale_b);
        wgmma_wait<0>();
        if (!kTmaStore) mbar_arrive(&empty[2]);  // with TMA stores: once O staged there is stored
      }
    }
  };

  // Warpgroup 1's pairs of a tile; first_qk_done (a std::bool_constant): its first QKᵀ already done.
  const auto wg1_pairs = [&](int n_pairs, auto first_qk_done) {
    for (int i = 0; i < n_pairs; ++i) {
      if (!(decltype(first_qk_done)::value && i == 0)) {
        const uint32_t ph = (pairs_done + i) & 1;
        mbar_wait(&full1[kLeftChunks], ph);
        wgmma_fence();
        qk_chunks_landed<kLeftChunks, C>(s, dq, dk1, true, full1, ph);
        qk_chunks_landed<0, kLeftChunks>(s, dq, dk1, false, full1, ph);
        wgmma_commit();
        wgmma_wait<0>();
        if (i + 1 == n_pairs) mbar_arrive(q_empty);  // WG1's last QKᵀ of the tile is done
      }
      float bm_a, bm_b;
      seen |= mask_and_max(s, sValid + 64, quad, c2, bm_a, bm_b);
      // The max over block 2i+1 on top of WG0's max over block 2i.
      mbar_wait(max0_ready, (pairs_done + i) & 1);
      const float nm_a = lazy_max(sMax[row_a], bm_a), nm_b = lazy_max(sMax[row_b], bm_b);
      const float t_a = max_nan(sMaxTrue[row_a], bm_a), t_b = max_nan(sMaxTrue[row_b], bm_b);
      __syncwarp();
      if (quad == 0) {
        sMaxTrue[row_a] = t_a;
        sMaxTrue[row_b] = t_b;
      }
      publish_max(sMax, row_a, row_b, quad, nm_a, nm_b, max1_ready);
      // O[:, 256:512] += P1 · V1.right; hand P1 to WG0.
      softmax_and_pv_local(s, o, pa, m_a, m_b, l_a, l_b, nm_a, nm_b, dv1r);
      p_to_smem(pa, sP1, row_a, quad);
      fence_proxy_async();
      named_barrier_arrive(kP1Ready, 256);
      // K1.right is free once this WG's own P·V is done (before waiting for P0); with TMA stores
      // the tile's last one holds O's staging first.
      wgmma_wait<0>();
      if (!kTmaStore || i + 1 < n_pairs) mbar_arrive(&empty[3]);
      // O[:, 256:512] += P0 · V0.right (P0 already on this max).
      named_barrier_sync(kP0Ready, 256);
      pv_remote(o, dp0, dv0r);
      wgmma_commit();
      wgmma_wait<0>();
      mbar_arrive(&empty[1]);
    }
  };

  // With dQK > dV (576), each math warpgroup issues the next tile's first QKᵀ chunks before the last
  // tile's epilogue, so the tensor cores work while O is stored. With dQK = dV the epilogue stays at
  // the tile's end, its O leaving through TMA stores staged in K1, which the next tile's keys need:
  // the overlap with O stored from registers instead was slower there (docs/perf-history.md,
  // thirty-third and thirty-fifth sessions).
  constexpr bool kNextQkUnderEpilogue = DQK > kDv;

  // The end of tile `index` (its sums, normalization, outputs), by both math warpgroups.
  const auto finish_tile = [&](uint32_t index) {
    float* const sLt = sL + (index & 1) * 128;
    int* const sSeenT = sSeen + (index & 1) * 8;
    // Row sums: this thread's columns -> quad -> both warpgroups; whether the query had any valid
    // entry (the same for every head; logits that are all −inf still count: lse = −inf then, not
    // the +inf of an empty row, as in the core).
    l_a = quad_sum(l_a);
    l_b = quad_sum(l_b);
    const bool warp_seen = __any_sync(0xffffffffu, seen);
    if (quad == 0) {
      sLt[wg * 64 + row_a] = l_a;
      sLt[wg * 64 + row_b] = l_b;
    }
    if (lane == 0) sSeenT[tid >> 5] = warp_seen;
    // the next-QKᵀ form reaches this barrier from each warpgroup's own copy of the tile loop:
    // the non-aligned barrier there
    if constexpr (kNextQkUnderEpilogue) named_barrier_sync_unaligned(kMathSync, 256);
    else named_barrier_sync(kMathSync, 256);
    bool any_valid = false;
#pragma unroll
    for (int w = 0; w < 8; ++w) any_valid |= sSeenT[w] != 0;
    float out_scale[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = half ? row_b : row_a;
      const int h = tile.h0 + row;
      out_scale[half] =
          finalize_row(p, tile.qi, h, half ? m_b : m_a, half ? mt_b : mt_a, sLt[row] + sLt[64 + row], any_valid,
                       wg == 0 && quad == 0);
      // Normalized O, straight from registers (shared memory already holds the next tile).
      if (!kTmaStore) store_o_row(p, tile.qi, h, wg, quad, half, o, out_scale[half]);
    }
    if (kTmaStore) {
      // O's half through this warpgroup's K1 half, released to the producer once stored.
      store_o_half_tma(&out_map, sK[1] + (wg == 0 ? 0 : kLeftChunks * 8192), o, out_scale[0], out_scale[1], mt, wg,
                       tile.qi * p.h_q + tile.h0, kOStore0 + wg, &empty[wg == 0 ? 2 : 3]);
    }
    if (wg == 0 && (p.max_logits || p.lse) && any_valid) {
      // The rows whose max and lse need it, one at a time over the warp (rare: near-zero maxima).
      const int entries = src.begin(tile.qi).total;
      const bool redo_a = quad == 0 && tile.h0 + row_a < p.h_q && max_logit_needs_exact(mt_a, scale_a, entries);
      const bool redo_b = quad == 0 && tile.h0 + row_b < p.h_q && max_logit_needs_exact(mt_b, scale_b, entries);
      __syncwarp();  // finalize_row's stores of these rows come before lane 0's below
      // bit 4q: row a of quad q (lane 4q decided it), bit 4q + 1: its row b
      for (uint32_t rows = __ballot_sync(0xffffffffu, redo_a) | __ballot_sync(0xffffffffu, redo_b) << 1; rows != 0;) {
        const int bit = __ffs(rows) - 1;
        rows &= rows - 1;
        const int row = (tid >> 5) * 16 + (bit >> 2) + (bit & 1) * 8;
        const int64_t orow = tile.qi * p.h_q + tile.h0 + row;
        const float2 exact = src.template exact_logit_stats<DQK>(p.q + orow * DQK, tile.qi, p.sm_scale, lane);
        if (lane == 0) {
          if (p.max_logits) p.max_logits[orow] = exact.x;
          if (p.lse) p.lse[orow] = exact.y;
        }
      }
    }
  };

  if constexpr (!kNextQkUnderEpilogue) {
    for (;; ++tiles_done) {
      const uint32_t t = next_tile_id();
      if (t >= n_tiles) break;
      start_tile(tile_of(t, head_blocks));
      const int n_pairs = pairs_of(tile);
      if (wg == 0) {
        if (n_pairs > 0) {  // always (the producer finishes empty tiles), but without the test ptxas
                            // moves the loops' shared-memory addresses out of the uniform registers
          const uint32_t ph = pairs_done & 1;
          mbar_wait(&full0[0], ph);
          wgmma_fence();
          qk_chunks_landed<0, kLeftChunks>(s, dq, dk0, true, full0, ph);
          qk_chunks_landed<kLeftChunks, C>(s, dq, dk0, false, full0, ph);
          wgmma_commit();
          wgmma_wait<0>();
          if (n_pairs == 1) mbar_arrive(q_empty);
        }
        wg0_pairs(n_pairs);
      } else {
        wg1_pairs(n_pairs, std::false_type{});
      }
      pairs_done += n_pairs;
      finish_tile(tiles_done);
    }
  } else {
    static_assert(!kTmaStore, "O's TMA staging in K1 would hold the next tile's keys back");
    // A tile's epilogue runs inside the next tile's first QKᵀ: each math warpgroup issues the chunks
    // of its block it reads first (warpgroup 0: K0.left, warpgroup 1: K1.right), finishes the last
    // tile while the tensor cores work, then issues the rest. Each warpgroup runs its own copy of the
    // loop (W, its index, a constant), so no path of the compiled code leads from one warpgroup's
    // early QKᵀ into the other's code: ptxas follows every path when it checks which wgmma may be in
    // flight, and serializes them all (C7515) for paths no thread takes.
    const auto run_tiles = [&](auto wg_tag) {
      constexpr int W = decltype(wg_tag)::value;
      constexpr int kFirstLo = W == 0 ? 0 : kLeftChunks, kFirstHi = W == 0 ? kLeftChunks : C;
      constexpr int kRestLo = W == 0 ? kLeftChunks : 0, kRestHi = W == 0 ? C : kLeftChunks;
      const uint64_t dk = W == 0 ? dk0 : dk1;
      uint64_t* const my_full = W == 0 ? full0 : full1;
      for (;; ++tiles_done) {
        const uint32_t t = next_tile_id();
        if (t >= n_tiles) {
          if (tiles_done > 0) finish_tile(tiles_done - 1);
          break;
        }
        const TileOf next = tile_of(t, head_blocks);
        const int n_pairs = pairs_of(next);
        // The early chunks, the epilogue and the rest of the QKᵀ in one branch: ptxas must find no
        // path on which the early chunks stay in flight, and the n_pairs test keeps the loops'
        // descriptors in uniform registers (without it, an R2UR before every wgmma group:
        // native/cuda/sass_census.sh counts them).
        if (n_pairs > 0) {  // always (the producer finishes empty tiles)
          const uint32_t ph = pairs_done & 1;
          mbar_wait(&my_full[kFirstLo], ph);
          wgmma_fence();
          qk_chunks_landed<kFirstLo, kFirstHi>(s, dq, dk, true, my_full, ph);
          wgmma_commit();
          if (tiles_done > 0) finish_tile(tiles_done - 1);
          start_tile(next);
          wgmma_fence();
          qk_chunks_landed<kRestLo, kRestHi>(s, dq, dk, false, my_full, ph);
          wgmma_commit();
          wgmma_wait<0>();
          if (n_pairs == 1) mbar_arrive(q_empty);
        } else {
          if (tiles_done > 0) finish_tile(tiles_done - 1);
          start_tile(next);
        }
        if constexpr (W == 0) wg0_pairs(n_pairs);
        else wg1_pairs(n_pairs, std::true_type{});
        pairs_done += n_pairs;
      }
    };
    if (wg == 0) run_tiles(std::integral_constant<int, 0>{});
    else run_tiles(std::integral_constant<int, 1>{});
  }
  if (kTmaStore && (tid & 127) == 0) bulk_wait_group0();  // the stores are done before the CTA leaves
}

// Launches a persistent kernel, kernel(args...), over `items` work items on the current `device`
// with its `sms`: one CTA per SM (fewer when there are fewer items). `smem_set`: the kernel
// instantiation's own record of its shared memory attribute.
template <class Kernel, class... Args>
cudaError_t launch_persistent_items(Kernel kernel, int smem, PerDeviceValue<int>& smem_set, int device, int sms,
                                    int64_t items, cudaStream_t stream, const Args&... args) {
  if (const cudaError_t err = max_dynamic_smem_once(smem_set, kernel, smem, device); err != cudaSuccess) return err;
  const unsigned ctas = unsigned(items < sms ? items : sms);
  kernel<<<ctas, kAttnThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}
// The same over the launch's tiles (query, 64-head group), kernel(o, src, extra...).
template <class Kernel, class Source, class... Extra>
cudaError_t launch_persistent(Kernel kernel, int smem, PerDeviceValue<int>& smem_set, int device, int sms,
                              const AttnOutputs& o, const Source& src, cudaStream_t stream, const Extra&... extra) {
  return launch_persistent_items(kernel, smem, smem_set, device, sms, attention_tiles(o.s_q, o.h_q), stream, o, src,
                                 extra...);
}

// cuTensorMapEncodeTiled, from the driver through the runtime (the addon links no libcuda). A build
// with -DSMLA_TEST_NO_TENSOR_MAPS finds none, so a harness can check the paths a driver without it
// takes (the threads' own O stores, the paged kernel's cp.async Q).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline EncodeTiledFn encode_tiled_fn() {
#ifdef SMLA_TEST_NO_TENSOR_MAPS
  return nullptr;
#else
  static EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
#endif
}

// A tensor map of bf16 rows of `rank` dims (dims[0] the contiguous one, strides in bytes of the
// others) in 64 x 64 (x 1) boxes with the 128B swizzle the kernels' shared tiles use; elements
// past the tensor's bounds read as zeros. False without an encoder in the driver.
inline bool encode_bf16_boxes_64x64(CUtensorMap* map, void* base, cuuint32_t rank, const cuuint64_t* dims,
                                    const cuuint64_t* strides) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (!encode) return false;
  const cuuint32_t box[3] = {64, 64, 1}, element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, base, dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor map for O's TMA stores (out as [s_q * h_q, 512] bf16, 64 x 64 boxes, 128B swizzle):
// false when the threads must store O themselves (a padded head group, rows past the map's 32-bit
// coordinates, no encoder in the driver).
inline bool make_out_map(CUtensorMap* map, const AttnOutputs& o) {
  const int64_t rows = o.s_q * int64_t(o.h_q);
  if (o.h_q % kHeadsPerCta != 0 || rows >= (int64_t(1) << 31)) return false;
  const cuuint64_t dims[2] = {cuuint64_t(kDv), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(kDv) * 2};
  return encode_bf16_boxes_64x64(map, o.out, 2, dims, strides);
}

// O through TMA stores for dQK 512 (V3.2's dQK 576 measured 0.5% slower with them) when
// make_out_map allows, otherwise the threads' own stores. zeroed_claims: a tile counter that is 0
// in stream order when the kernel runs (the caller's), or null for one of the launch's own.
template <int DQK, class Source>
cudaError_t launch_sparse_attention(const AttnOutputs& o_in, const Source& src, cudaStream_t stream, unsigned* zeroed_claims = nullptr) {
  static PerDeviceValue<int> smem_set, smem_set_tma;
  int device = 0, sms = 0;
  cudaError_t err = current_device_sms(&device, &sms);
  if (err != cudaSuccess) return err;
  AttnOutputs o = o_in;
  // More tiles than CTAs: the CTAs claim them from a zeroed counter (the caller's, or one of the
  // launch's own: stream-ordered, from the device's memory pool), so the SMs that run faster take
  // more of them. Without a pool (cudaMallocAsync unsupported, or out of memory) the tiles go
  // round-robin.
  const bool claims = attention_tiles(o.s_q, o.h_q) > sms;
  if (claims && zeroed_claims) {
    o.tile_claims = zeroed_claims;
  } else if (claims) {
    if (cudaMallocAsync(reinterpret_cast<void**>(&o.tile_claims), sizeof(*o.tile_claims), stream) == cudaSuccess) {
      err = cudaMemsetAsync(o.tile_claims, 0, sizeof(*o.tile_claims), stream);
    } else {
      (void)cudaGetLastError();  // not sticky: clear it, run without the counter
      o.tile_claims = nullptr;
    }
  }
  CUtensorMap map{};
  if (err == cudaSuccess) {
    bool tma_store = false;
    if constexpr (DQK == kDv) {  // dQK 576 has no TMA-store kernel
      if (make_out_map(&map, o)) {
        tma_store = true;
        err = launch_persistent(sparse_attention_sm90_kernel<DQK, Source, true>, AttnSmem<DQK>::kAlloc, smem_set_tma,
                                device, sms, o, src, stream, map);
      }
    }
    if (!tma_store)
      err = launch_persistent(sparse_attention_sm90_kernel<DQK, Source, false>, AttnSmem<DQK>::kAlloc, smem_set, device,
                              sms, o, src, stream, map);
  }
  if (o.tile_claims && o.tile_claims != zeroed_claims) {
    const cudaError_t freed = cudaFreeAsync(o.tile_claims, stream);
    if (err == cudaSuccess) err = freed;
  }
  return err;
}

}  // namespace smla::cuda
