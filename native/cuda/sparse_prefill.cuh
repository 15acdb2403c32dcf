// SPEC §4 sparse prefill forward on sm_90a: the shared attention kernel fed by a bf16 row gather,
// plus a plain fallback kernel for shapes outside the fast path (dQK not in {512, 576} or
// dV != 512).
#pragma once
#include <math.h>
#include <stdint.h>

#include "sparse_attention_sm90.cuh"
#include "sparse_mla/formats.h"

namespace smla::cuda {

// Number of leading entries of row i that can count: min(topk, max(topkLength[i], 0)).
__device__ __forceinline__ int row_entry_limit(const int32_t* topk_length, int64_t i, int topk) {
  if (!topk_length) return topk;
  const int32_t n = topk_length[i];
  return n < 0 ? 0 : (n < topk ? n : topk);
}

// Gathers bf16 kv rows [s_kv, DQK] by int32 index with 16-byte cp.async (L2 128-byte prefetch,
// kept in L2: many queries read the same rows); invalid entries are zero-filled with a 0-byte
// source (nothing is read). The copies arrive on the half's barrier when they land, so the
// producer goes straight on to the next half.
struct Bf16GatherSource {
  static constexpr uint32_t kProducerRegs = 72;
  static constexpr uint32_t kConsumerRegs = 216;
  struct Entries {
    int total;
  };
  struct Rows {
    int32_t idx[kRowsPerProducerThread];  // kv row, or -1 when the entry is invalid
  };
  const uint16_t* kv;
  int64_t s_kv;
  const int32_t* indices;  // [s_q, topk]
  int32_t topk;
  const int32_t* topk_length;  // [s_q] or nullptr

  __device__ Entries begin(int64_t qi) const { return Entries{row_entry_limit(topk_length, qi, topk)}; }

  __device__ __forceinline__ Rows load_rows(const Entries& e, int64_t qi, int block, int group) const {
    Rows rows;
#pragma unroll
    for (int r = 0; r < kRowsPerProducerThread; ++r) {
      const int k = block * kBlockRows + group + 16 * r;
      const int32_t v = k < e.total ? __ldg(indices + qi * int64_t(topk) + k) : -1;
      rows.idx[r] = (v >= 0 && int64_t(v) < s_kv) ? v : -1;
    }
    return rows;
  }
  __device__ __forceinline__ bool valid(const Rows& rows, int r) const { return rows.idx[r] >= 0; }

  // A row's (max, lse) from its lanes' running states: both sums moved to the larger max. The
  // caller redoes only rows of a query with a valid entry.
  __device__ __forceinline__ static float2 warp_row_stats(SoftmaxRow row) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, row.m, off), l2 = __shfl_xor_sync(0xffffffffu, row.l, off);
      const float m_new = nan_max(row.m, m2);
      row.l = row.l * softmax_rescale(row.m, m_new) + l2 * softmax_rescale(m2, m_new);
      row.m = m_new;
    }
    const SoftmaxResult fin = softmax_finalize(row, true, false, 0.0f);
    return make_float2(fin.max_logit, fin.lse);
  }

  // A row's largest valid logit and its lse (query qi, its head's q row), on the CUDA cores in
  // float32, returned to every lane of the warp: each lane takes every 32nd entry and its whole
  // product, the lanes' (max, sum) are combined at the end. For the rare rows whose tensor-core
  // logits are not accurate enough (detail::max_logit_needs_exact); not inlined, so the attention
  // kernel's registers stay as they are.
  template <int DQK>
  __device__ __noinline__ float2 exact_logit_stats(const uint16_t* q_row, int64_t qi, float sm_scale, int lane) const {
    const int total = row_entry_limit(topk_length, qi, topk);
    const uint4* q16 = reinterpret_cast<const uint4*>(q_row);
    if (total <= kShortRowEntries) return exact_short_row_stats<DQK>(q16, qi, total, sm_scale, lane);
    SoftmaxRow row = softmax_row_init();
    for (int k = lane; k < total; k += 32) {
      const int32_t v = __ldg(indices + qi * int64_t(topk) + k);
      if (v < 0 || int64_t(v) >= s_kv) continue;
      const uint4* k16 = reinterpret_cast<const uint4*>(kv + int64_t(v) * DQK);
      float dot = 0.0f;
#pragma unroll 8
      for (int c = 0; c < DQK / 8; ++c) dot = detail::dot8_bf16(__ldg(q16 + c), __ldg(k16 + c), dot);
      softmax_row_add(row, dot * sm_scale);
    }
    return warp_row_stats(row);
  }

  // exact_logit_stats of a row of at most kShortRowEntries entries (a query near its sequence's
  // start, whose rows the kernel flags most), eight entries at a time: each lane sums its 16 or 24
  // dims of the eight entries' products (their loads in flight at once), a reduce-scatter over the
  // octets (7 shuffles) and two butterfly adds leave entry k's whole product in the lanes k mod 8,
  // and lane k mod 32 takes it into its running max and sum: nine shuffles and one softmax step
  // a group instead of a chain per entry. Longer rows (rare: only large logits flag them) keep an
  // entry a lane.
  static constexpr int kShortRowEntries = 64;
  template <int DQK>
  __device__ __forceinline__ float2 exact_short_row_stats(const uint4* q16, int64_t qi, int total, float sm_scale, int lane) const {
    constexpr int kPieces = DQK / 8, kPer = (kPieces + 31) / 32, kGroup = 8;
    const int32_t* ids = indices + qi * int64_t(topk);
    uint4 qv[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) qv[i] = lane + 32 * i < kPieces ? __ldg(q16 + lane + 32 * i) : make_uint4(0, 0, 0, 0);
    SoftmaxRow row = softmax_row_init();
    int32_t my_id = -1;  // entry (k0 & ~31) + lane's id (-1 when invalid or past the row)
    for (int k0 = 0; k0 < total; k0 += kGroup) {
      if ((k0 & 31) == 0) {
        my_id = -1;
        if (k0 + lane < total) {
          const int32_t v = __ldg(ids + k0 + lane);
          my_id = (v >= 0 && int64_t(v) < s_kv) ? v : -1;
        }
      }
      uint4 kp[kGroup][kPer];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int32_t id = __shfl_sync(0xffffffffu, my_id, (k0 & 31) + u);
        const uint4* k16 = reinterpret_cast<const uint4*>(kv + int64_t(id >= 0 ? id : 0) * DQK);
#pragma unroll
        for (int i = 0; i < kPer; ++i) kp[u][i] = id >= 0 && lane + 32 * i < kPieces ? __ldg(k16 + lane + 32 * i) : make_uint4(0, 0, 0, 0);
      }
      float part[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kPer; ++i) dot = detail::dot8_bf16(qv[i], kp[u][i], dot);
        part[u] = dot;
      }
      // at step s a lane keeps the half of its entries its lane bit s selects and adds its
      // partner's sums of that half: lane l ends with entry k0 + (l & 7) over its octet's lanes
#pragma unroll
      for (int s = kGroup / 2; s >= 1; s >>= 1) {
        const bool upper = (lane & s) != 0;
#pragma unroll
        for (int i = 0; i < s; ++i) {
          const float send = upper ? part[i] : part[i + s];
          const float keep = upper ? part[i + s] : part[i];
          part[i] = keep + __shfl_xor_sync(0xffffffffu, send, s);
        }
      }
      part[0] += __shfl_xor_sync(0xffffffffu, part[0], 8);
      part[0] += __shfl_xor_sync(0xffffffffu, part[0], 16);
      // entry k0 + (lane & 7) is entry (k0 & ~31) + lane in the octet k0 / 8 mod 4: that lane holds its id
      if ((lane >> 3) == ((k0 >> 3) & 3) && my_id >= 0) softmax_row_add(row, part[0] * sm_scale);
    }
    return warp_row_stats(row);
  }

  template <int DQK, int C0, int C1>
  __device__ __forceinline__ void fill(const Rows& rows, uint8_t* tile, int group, int piece, uint64_t* landed) const {
    const uint64_t keep = l2_policy_evict_last();
    // rows group + 16r all have (row % 8) = group % 8: one swizzled piece position per thread
    uint8_t* dst = tile + group * 128 + ((piece ^ (group & 7)) << 4);
    const uint16_t* src[kRowsPerProducerThread];
    uint32_t bytes[kRowsPerProducerThread];
#pragma unroll
    for (int r = 0; r < kRowsPerProducerThread; ++r) {
      const int32_t idx = rows.idx[r];
      src[r] = kv + (idx >= 0 ? int64_t(idx) : 0) * DQK + piece * 8;
      bytes[r] = idx >= 0 ? 16u : 0u;
    }
    // chunk by chunk; a landing group's arrival follows its last chunk's copies (it completes once
    // this thread's copies so far have landed)
#pragma unroll
    for (int c = C0; c < C1; ++c) {
#ifndef SMLA_EXP_NOGATHER  // experiment switch: the math alone
#pragma unroll
      for (int r = 0; r < kRowsPerProducerThread; ++r) cp_async_16_hint(dst + c * 8192 + r * 16 * 128, src[r] + c * 64, bytes[r], keep);
#endif
      if (detail::ends_landing_group(c, C0, C1)) cp_async_arrive_noinc(&landed[detail::landing_group_first(c, C0)]);
    }
  }
};

// Fallback for any dQK / dV (dV <= 1024): one CTA of 128 threads per (query, head), float32
// throughout. Slow, for shapes the fast kernel does not cover.
template <int kMaxDvPerThread>
__global__ void __launch_bounds__(128) sparse_prefill_generic_kernel(
    const uint16_t* q, const uint16_t* kv, const int32_t* indices, const int32_t* topk_length,
    const float* attn_sink, int32_t h_q, int32_t d_qk, int32_t d_v, int64_t s_kv, int32_t topk,
    float sm_scale, uint16_t* out, float* max_logits, float* lse) {
  const int64_t qi = blockIdx.x;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  __shared__ float red[4];
  const uint16_t* qrow = q + (qi * h_q + h) * int64_t(d_qk);
  const int n = row_entry_limit(topk_length, qi, topk);
  float acc[kMaxDvPerThread];
#pragma unroll
  for (int i = 0; i < kMaxDvPerThread; ++i) acc[i] = 0.0f;
  SoftmaxRow row = softmax_row_init();
  bool any = false;
  for (int k = 0; k < n; ++k) {
    const int32_t v = indices[qi * int64_t(topk) + k];
    if (v < 0 || int64_t(v) >= s_kv) continue;
    const uint16_t* krow = kv + int64_t(v) * d_qk;
    float dot = 0.0f;
    for (int d = tid; d < d_qk; d += 128) dot += bf16_to_float(qrow[d]) * bf16_to_float(krow[d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    __syncthreads();
    if ((tid & 31) == 0) red[tid >> 5] = dot;
    __syncthreads();
    const float logit = (red[0] + red[1] + red[2] + red[3]) * sm_scale;
    any = true;
    const float m_new = nan_max(row.m, logit);
    const float alpha = softmax_rescale(row.m, m_new);
    const float pk = expf(logit - softmax_exp_base(m_new));
    row.m = m_new;
    row.l = row.l * alpha + pk;
#pragma unroll
    for (int i = 0; i < kMaxDvPerThread; ++i) {
      const int d = tid + 128 * i;
      if (d < d_v) acc[i] = acc[i] * alpha + pk * bf16_to_float(krow[d]);
    }
  }
  const SoftmaxResult fin = softmax_finalize(row, any, attn_sink != nullptr, attn_sink ? attn_sink[h] : 0.0f);
  const int64_t orow = qi * h_q + h;
#pragma unroll
  for (int i = 0; i < kMaxDvPerThread; ++i) {
    const int d = tid + 128 * i;
    if (d < d_v) out[orow * d_v + d] = float_to_bf16(acc[i] * fin.out_scale);
  }
  if (tid == 0) {
    if (lse) lse[orow] = fin.lse;
    if (max_logits) max_logits[orow] = fin.max_logit;
  }
}

}  // namespace smla::cuda
