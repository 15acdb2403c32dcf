// The sm_90a attention kernel shared by sparse prefill (§4) and paged FP8 attention (§5).
//
// One CTA = one query x a block of 64 heads (one wgmma M tile). All heads of a query attend the
// same KV rows, so the CTA streams the query's entries in blocks of 64 rows through a two-stage
// shared-memory ring and every row is gathered once for 64 heads.
//
//   warpgroup 2 (producer): fills a stage with 64 KV rows (a Source policy: bf16 rows gathered
//     by index with cp.async, or FP8 v4 tokens dequantized in registers), zero-filling invalid
//     entries without reading them, and records each entry's validity.
//   warpgroups 0, 1 (math): WG w computes S_w = Q · K[32w, 32w+32)ᵀ (m64n32, K = dQK), masks,
//     exchanges row maxima with the other WG, writes P to shared memory as two bf16 terms
//     P_hi + P_lo (a single bf16 P costs 2^-9 relative per weight, which breaks SPEC §4's
//     elementwise tolerance on unit-scale data), then
//     O_w += P_hi·V + P_lo·V over V[:, 256w, 256w+256) (m64n256, V MN-major from the K tile).
//
// Tiles are rows of 128-byte swizzled chunks of 64 dims: element (r, d) of a 64-row tile sits at
// (d/64)*8192 + r*128 + (((d%64)/8) ^ (r%8))*16 + (d%8)*2, which is wgmma's canonical 128B-swizzle
// layout both as a K-major operand (Q, K, P) and as an MN-major operand (V).
#pragma once
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "sm90_ptx.cuh"
#include "sparse_mla/online_softmax.h"

namespace smla::cuda {

constexpr int kHeadsPerCta = 64;
constexpr int kRowsPerStage = 64;
constexpr int kStages = 2;
constexpr int kDv = 512;
constexpr int kAttnThreads = 384;

__device__ __forceinline__ uint32_t swz_offset(int r, int d) {
  return uint32_t((d >> 6) * 8192 + r * 128 + ((((d & 63) >> 3) ^ (r & 7)) << 4) + (d & 7) * 2);
}

template <int DQK>
struct AttnSmem {
  static_assert(DQK % 64 == 0 && DQK >= kDv, "dQK: a multiple of 64, at least dV");
  static constexpr int kChunks = DQK / 64;
  static constexpr int kTileBytes = kChunks * 8192;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTileBytes;
  // P = P_hi + P_lo, each a 64x64 bf16 K-major tile. When dQK > dV the last chunk of the K
  // tile (dims past dV, read only by S = QKᵀ) is free once S is done and holds P_hi.
  static constexpr bool kPhiInTile = DQK > kDv;
  static constexpr int kP = kK + kStages * kTileBytes;  // P_lo
  static constexpr int kPhi = kP + 8192;                // P_hi when !kPhiInTile
  static constexpr int kMax = kPhi + (kPhiInTile ? 0 : 8192);  // float [2][64]: block row maxima
  static constexpr int kL = kMax + 512;            // float [2][64]: each WG's row sums at the end
  static constexpr int kAny = kL + 512;            // int [2]: each WG saw a valid entry
  static constexpr int kValid = kAny + 16;         // uint8 [kStages][64]
  static constexpr int kBar = kValid + kStages * 64;  // uint64 full[kStages], empty[kStages]
  static constexpr int kTotal = kBar + 2 * kStages * 8;
  static constexpr int kAlloc = kTotal + 1024;     // slack to align the base to 1024 B
};

struct AttnOutputs {
  const uint16_t* q;    // [s_q, h_q, DQK] bf16
  int32_t h_q;
  float sm_scale;
  const float* attn_sink;  // [h_q] or nullptr
  uint16_t* out;           // [s_q, h_q, 512] bf16
  float* max_logits;       // [s_q, h_q] or nullptr
  float* lse;              // [s_q, h_q] or nullptr
};

// Source policy: begin(qi) -> Entries (the query's entry count); load_entry(entries, qi, k) ->
// Entry (entry k resolved, or invalid past the end; must not read past the row); fill(entry,
// tile, valid, ptid) is called by all 128 producer threads per stage, each passing the entry of
// its own row (warp w, lane l < 16 owns row 16w + l); it must issue its copies / stores, make
// them visible to wgmma (wait + fence.proxy.async) and return. The kernel then arrives.
template <int DQK, class Source>
__global__ void __launch_bounds__(kAttnThreads, 1)
    sparse_attention_sm90_kernel(const AttnOutputs p, const Source src) {
  using L = AttnSmem<DQK>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  uint8_t* sP = smem + L::kP;
  float* sMax = reinterpret_cast<float*>(smem + L::kMax);
  float* sL = reinterpret_cast<float*>(smem + L::kL);
  int* sAny = reinterpret_cast<int*>(smem + L::kAny);
  uint8_t* sValid = smem + L::kValid;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint64_t* empty = full + kStages;

  const int64_t qi = blockIdx.x;
  const int h0 = blockIdx.y * kHeadsPerCta;
  const int tid = threadIdx.x;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 128);
      mbar_init(&empty[s], 256);
    }
  }
  // Q tile: 64 heads x DQK, heads past h_q zero-filled (padding inside the op). Issued by the
  // math warpgroups and awaited just before the first S = QKᵀ, so it overlaps the first gather.
  if (tid < 256) {
    constexpr int kPieces = DQK / 8;  // 16-byte pieces per row
    const uint64_t once = l2_policy_evict_first();
    for (int t = tid; t < kHeadsPerCta * kPieces; t += 256) {
      const int r = t / kPieces, pc = t % kPieces;
      const int h = h0 + r;
      const bool ok = h < p.h_q;
      const uint16_t* g = ok ? p.q + ((qi * p.h_q + h) * int64_t(DQK) + pc * 8) : p.q;
      cp_async_16_hint(sQ + swz_offset(r, pc * 8), g, ok ? 16u : 0u, once);
    }
    cp_async_commit();
  }
  __syncthreads();

  const typename Source::Entries entries = src.begin(qi);
  const int n_blocks = (entries.total + kRowsPerStage - 1) / kRowsPerStage;
  const int wg = tid / 128;

  if (wg == 2) {
    setmaxnreg_dec<Source::kProducerRegs>();
    const int ptid = tid - 256;
    // Each producer lane owns one row of its warp's 16 per stage. The entry (index) of the next
    // block is loaded before this block's gather, so its latency hides behind the gather.
    const int my_row = (ptid >> 5) * 16 + (ptid & 15);
    typename Source::Entry cur = src.load_entry(entries, qi, my_row);
    for (int b = 0; b < n_blocks; ++b) {
      const int st = b % kStages;
      if (b >= kStages) mbar_wait(&empty[st], ((b / kStages) - 1) & 1);
      const typename Source::Entry nxt = src.load_entry(entries, qi, (b + 1) * kRowsPerStage + my_row);
      src.template fill<DQK>(cur, sK + st * L::kTileBytes, sValid + st * kRowsPerStage, ptid);
      mbar_arrive(&full[st]);
      cur = nxt;
    }
    return;
  }

  setmaxnreg_inc<Source::kConsumerRegs>();
  const int ctid = tid & 127;
  const int lane = tid & 31;
  const int quad = lane & 3;
  const int row_a = (ctid >> 5) * 16 + (lane >> 2);  // this thread's two rows (heads) of the tile
  const int row_b = row_a + 8;
  const float c2 = p.sm_scale * 1.4426950408889634f;  // logits in log2 units

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY;  // running max, log2 units
  float l_a = 0.0f, l_b = 0.0f;            // this thread's share of the running sums
  bool seen_valid = false;                 // a valid entry among this thread's columns (any head)

  cp_async_wait_all();
  fence_proxy_async();
  named_barrier_sync(1, 256);  // the whole Q tile has landed

  const uint32_t q_base = smem_u32(sQ);
  const uint32_t p_base = smem_u32(sP);

  // S(b) = Q·K_wᵀ for the stage holding block b (m64n32, K = dQK).
  float s[16];
  auto issue_s = [&](int stage) {
    const uint32_t kb = smem_u32(sK + stage * L::kTileBytes);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < L::kChunks; ++c) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t da = gmma_desc_sw128(q_base + c * 8192 + kk * 32, 16, 1024);
        const uint64_t db = gmma_desc_sw128(kb + c * 8192 + wg * 4096 + kk * 32, 16, 1024);
        wgmma_m64n32k16_ss(s, da, db, (c | kk) != 0);
      }
    }
    wgmma_commit();
  };
  // S(b+1) is issued right behind PV(b) when block b+1 has already landed (the tensor cores go
  // from one to the other without a gap); otherwise stage b is released first and S(b+1) waits
  // at the top (always waiting for b+1 before releasing b was measured slower: the gather chain
  // is then held up).
  bool s_issued = false;
  for (int b = 0; b < n_blocks; ++b) {
    const int st = b % kStages;
    const uint32_t k_base = smem_u32(sK + st * L::kTileBytes);
    if (!s_issued) {
      mbar_wait(&full[st], (b / kStages) & 1);
      issue_s(st);
    }
    wgmma_wait<0>();

    // Mask and scale; block row max.
    const uint8_t* valid = sValid + st * kRowsPerStage + wg * 32;
    float bm_a = -INFINITY, bm_b = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = valid[8 * j + 2 * quad + e] != 0;
        seen_valid |= ok;
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
    if (quad == 0) {
      sMax[wg * 64 + row_a] = bm_a;
      sMax[wg * 64 + row_b] = bm_b;
    }
    named_barrier_sync(1, 256);
    const float nm_a = max_nan(m_a, max_nan(bm_a, sMax[(wg ^ 1) * 64 + row_a]));
    const float nm_b = max_nan(m_b, max_nan(bm_b, sMax[(wg ^ 1) * 64 + row_b]));
    const float base_a = nm_a == -INFINITY ? 0.0f : nm_a;
    const float base_b = nm_b == -INFINITY ? 0.0f : nm_b;
    const float alpha_a = exp2f(m_a - base_a);
    const float alpha_b = exp2f(m_b - base_b);
    m_a = nm_a;
    m_b = nm_b;

    uint8_t* sPhi = L::kPhiInTile ? sK + st * L::kTileBytes + (L::kChunks - 1) * 8192 : smem + L::kPhi;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float p0 = exp2f(s[4 * j] - base_a), p1 = exp2f(s[4 * j + 1] - base_a);
      const float p2 = exp2f(s[4 * j + 2] - base_b), p3 = exp2f(s[4 * j + 3] - base_b);
      sum_a += p0 + p1;
      sum_b += p2 + p3;
      const __nv_bfloat162 ha = __floats2bfloat162_rn(p0, p1), hb = __floats2bfloat162_rn(p2, p3);
      const float2 fa = __bfloat1622float2(ha), fb = __bfloat1622float2(hb);
      const __nv_bfloat162 la = __floats2bfloat162_rn(p0 - fa.x, p1 - fa.y);
      const __nv_bfloat162 lb = __floats2bfloat162_rn(p2 - fb.x, p3 - fb.y);
      const int col = wg * 32 + 8 * j + 2 * quad;
      const uint32_t oa = swz_offset(row_a, col), ob = swz_offset(row_b, col);
      *reinterpret_cast<__nv_bfloat162*>(sPhi + oa) = ha;
      *reinterpret_cast<__nv_bfloat162*>(sPhi + ob) = hb;
      *reinterpret_cast<__nv_bfloat162*>(sP + oa) = la;
      *reinterpret_cast<__nv_bfloat162*>(sP + ob) = lb;
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
    if (__any_sync(0xffffffffu, !(alpha_a == 1.0f && alpha_b == 1.0f))) {  // max unchanged: skip
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        o[4 * j] *= alpha_a;
        o[4 * j + 1] *= alpha_a;
        o[4 * j + 2] *= alpha_b;
        o[4 * j + 3] *= alpha_b;
      }
    }
    fence_proxy_async();
    named_barrier_sync(2, 256);

    wgmma_fence();
    const uint32_t phi_base = smem_u32(sPhi);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      // V: MN-major, 64-dim chunks 8192 B apart (LBO), 8-key groups 1024 B apart (SBO).
      const uint64_t db = gmma_desc_sw128(k_base + wg * 4 * 8192 + kk * 2048, 8192, 1024);
      wgmma_m64n256k16_ss_tb(o, gmma_desc_sw128(phi_base + kk * 32, 16, 1024), db, 1);
#ifndef SMLA_EXP_NOPLO  // experiment switch: measure the cost of the P_lo term
      wgmma_m64n256k16_ss_tb(o, gmma_desc_sw128(p_base + kk * 32, 16, 1024), db, 1);
#endif
    }
    wgmma_commit();
    const int nst = (b + 1) % kStages;
    s_issued = b + 1 < n_blocks && mbar_test(&full[nst], ((b + 1) / kStages) & 1);
    if (s_issued) {
      issue_s(nst);
      wgmma_wait<1>();  // PV(b) done; S(b+1) may still run
    } else {
      wgmma_wait<0>();
    }
    mbar_arrive(&empty[st]);
  }

  // Row sums: this thread's columns -> quad -> both warpgroups.
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  if (quad == 0) {
    sL[wg * 64 + row_a] = l_a;
    sL[wg * 64 + row_b] = l_b;
  }
  // Whether the query had any valid entry (the same for every head). Logits that are all −inf
  // still count as entries: lse = −inf then, not the +inf of an empty row (as in the core).
  const bool warp_seen = __any_sync(0xffffffffu, seen_valid);
  if (ctid == 0) sAny[wg] = 0;
  named_barrier_sync(3 + wg, 128);
  if (lane == 0 && warp_seen) sAny[wg] = 1;
  named_barrier_sync(1, 256);
  const bool any_valid = (sAny[0] | sAny[1]) != 0;
  // Epilogue: normalize, stage the bf16 tile in shared memory (all operand buffers are free now:
  // every wgmma finished before the barrier above), then 16-byte coalesced stores.
  const float ln2 = 0.6931471805599453f;
  constexpr int kStageRow = kDv * 2 + 16;  // bytes per staged row, padded against bank conflicts
  static_assert(kHeadsPerCta * kStageRow <= L::kP, "staging fits in the Q + K region");
  float scale[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half ? row_b : row_a;
    const int h = h0 + row;
    const float m2 = half ? m_b : m_a;
    SoftmaxRow r;
    r.m = m2 * ln2;
    r.l = sL[row] + sL[64 + row];
    const bool has_sink = p.attn_sink != nullptr && h < p.h_q;
    const SoftmaxResult fin = softmax_finalize(r, any_valid, has_sink, has_sink ? p.attn_sink[h] : 0.0f);
    scale[half] = fin.out_scale;
    if (wg == 0 && quad == 0 && h < p.h_q) {
      const int64_t orow = qi * p.h_q + h;
      if (p.lse) p.lse[orow] = fin.lse;
      if (p.max_logits) p.max_logits[orow] = fin.max_logit;
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint8_t* srow = smem + (half ? row_b : row_a) * kStageRow + (wg * 256 + 2 * quad) * 2;
#pragma unroll
    for (int j = 0; j < 32; ++j)
      *reinterpret_cast<__nv_bfloat162*>(srow + 16 * j) =
          __floats2bfloat162_rn(o[4 * j + 2 * half] * scale[half], o[4 * j + 2 * half + 1] * scale[half]);
  }
  named_barrier_sync(3 + wg, 128);
  // This warpgroup's half rows: 64 rows x 32 pieces of 16 bytes.
#pragma unroll 4
  for (int t = ctid; t < kHeadsPerCta * 32; t += 128) {
    const int r = t >> 5, pc = t & 31;
    const int h = h0 + r;
    if (h >= p.h_q) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(smem + r * kStageRow + wg * 512 + pc * 16);
    __stcs(reinterpret_cast<uint4*>(p.out + (qi * p.h_q + h) * kDv + wg * 256 + pc * 8), v);
  }
}

}  // namespace smla::cuda
