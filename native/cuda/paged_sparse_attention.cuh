// SPEC §5 paged FP8 sparse attention on sm_90a (dQK = dV = 512): a kernel of its own whose
// producer reads v4 tokens straight from the paged FP8 cache(s) and dequantizes them into the
// bf16 tile in registers. The main and extra sets form one list per query: the main set's first
// min(topk, topkLength) entries, then the extra set's; one softmax over all of it.
//
// One CTA = one query x 64 heads; warpgroup 2 dequantizes 64 tokens per stage into a two-stage
// ring (each warp's 16 rows of FP8 loaded into registers at once, before the stage is free; the
// RoPE dims copied into the tile by cp.async); warpgroups 0/1 each compute S for 32 of the 64
// rows (m64n32), exchange row maxima through shared memory, write P (bf16) to shared memory, then
// each multiplies P into its half of dV (m64n256). The dequantizing producer needs registers
// that the math warpgroups of the prefill kernel (sparse_attention_sm90.cuh) cannot spare.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "kv_cache.cuh"
#include "sparse_attention_sm90.cuh"
#include "sparse_prefill.cuh"

namespace smla::cuda {

constexpr int kPagedRowsPerStage = 64;
constexpr int kPagedStages = 2;

template <int DQK>
struct PagedSmem {
  static_assert(DQK % 64 == 0 && DQK >= kDv, "dQK: a multiple of 64, at least dV");
  static constexpr int kChunks = DQK / 64;
  static constexpr int kTileBytes = kChunks * 8192;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTileBytes;
  static constexpr int kP = kK + kPagedStages * kTileBytes;  // P: a 64x64 bf16 K-major tile
  static constexpr int kMax = kP + 8192;                // float [2][64]: block row maxima
  static constexpr int kL = kMax + 512;            // float [2][64]: each WG's row sums at the end
  static constexpr int kAny = kL + 512;            // int [2]: each WG saw a valid entry
  static constexpr int kValid = kAny + 16;         // uint8 [kPagedStages][64]
  static constexpr int kBar = kValid + kPagedStages * 64;  // uint64 full[kPagedStages], empty[kPagedStages]
  static constexpr int kTotal = kBar + 2 * kPagedStages * 8;
  static constexpr int kAlloc = kTotal + 1024;     // slack to align the base to 1024 B
};


// Source policy: begin(qi) -> Entries (the query's entry count); load_entry(entries, qi, k) ->
// Entry (entry k resolved, or invalid past the end; must not read past the row); fill(entry,
// tile, valid, ptid, stage_free) is called by all 128 producer threads per stage, each passing
// the entry of its own row (warp w, lane l < 16 owns row 16w + l); it may load from global memory
// at once but must call stage_free() before it writes the tile or the valid flags; it must make
// its stores visible to wgmma (wait + fence.proxy.async) and return. The kernel then arrives.
template <int DQK, class Source>
__global__ void __launch_bounds__(kAttnThreads, 1)
    paged_attention_sm90_kernel(const AttnOutputs p, const Source src) {
  using L = PagedSmem<DQK>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  uint8_t* sP = smem + L::kP;
  float* sMax = reinterpret_cast<float*>(smem + L::kMax);
  float* sL = reinterpret_cast<float*>(smem + L::kL);
  int* sAny = reinterpret_cast<int*>(smem + L::kAny);
  uint8_t* sValid = smem + L::kValid;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint64_t* empty = full + kPagedStages;

  const int64_t qi = blockIdx.x;
  const int h0 = blockIdx.y * kHeadsPerCta;
  const int tid = threadIdx.x;

  if (tid == 0) {
    for (int s = 0; s < kPagedStages; ++s) {
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
  const int n_blocks = (entries.total + kPagedRowsPerStage - 1) / kPagedRowsPerStage;
  const int wg = tid / 128;

  if (wg == 2) {
    setmaxnreg_dec<Source::kProducerRegs>();
    const int ptid = tid - 256;
    // Each producer lane owns one row of its warp's 16 per stage. The entry (index) of the next
    // block is loaded before this block's gather, so its latency hides behind the gather.
    const int my_row = (ptid >> 5) * 16 + (ptid & 15);
    typename Source::Entry cur = src.load_entry(entries, qi, my_row);
    for (int b = 0; b < n_blocks; ++b) {
      const int st = b % kPagedStages;
      const typename Source::Entry nxt = src.load_entry(entries, qi, (b + 1) * kPagedRowsPerStage + my_row);
      // fill may start its global loads before the stage is free; it calls this before touching it
      const auto stage_free = [&] {
        if (b >= kPagedStages) mbar_wait(&empty[st], ((b / kPagedStages) - 1) & 1);
      };
      src.template fill<DQK>(cur, sK + st * L::kTileBytes, sValid + st * kPagedRowsPerStage, ptid, stage_free);
      mbar_arrive(&full[st]);
      cur = nxt;
    }
    return;
  }

  setmaxnreg_inc<Source::kConsumerRegs>();
  const detail::MathThread mt = detail::math_thread(tid);
  const int ctid = mt.ctid, lane = mt.lane, quad = mt.quad, row_a = mt.row_a, row_b = mt.row_b;
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
    const int st = b % kPagedStages;
    const uint32_t k_base = smem_u32(sK + st * L::kTileBytes);
    if (!s_issued) {
      mbar_wait(&full[st], (b / kPagedStages) & 1);
      issue_s(st);
    }
    wgmma_wait<0>();

    // Mask and scale; block row max.
    const uint8_t* valid = sValid + st * kPagedRowsPerStage + wg * 32;
    float bm_a, bm_b;
    seen_valid |= detail::mask_and_max(s, valid, quad, c2, bm_a, bm_b);
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

    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float p0 = exp2f(s[4 * j] - base_a), p1 = exp2f(s[4 * j + 1] - base_a);
      const float p2 = exp2f(s[4 * j + 2] - base_b), p3 = exp2f(s[4 * j + 3] - base_b);
      sum_a += p0 + p1;
      sum_b += p2 + p3;
      const int col = wg * 32 + 8 * j + 2 * quad;
      *reinterpret_cast<__nv_bfloat162*>(sP + swz_offset(row_a, col)) = __floats2bfloat162_rn(p0, p1);
      *reinterpret_cast<__nv_bfloat162*>(sP + swz_offset(row_b, col)) = __floats2bfloat162_rn(p2, p3);
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
    detail::scale_rows(o, alpha_a, alpha_b);
    fence_proxy_async();
    named_barrier_sync(2, 256);

    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      // V: MN-major, 64-dim chunks 8192 B apart (LBO), 8-key groups 1024 B apart (SBO).
      const uint64_t db = gmma_desc_sw128(k_base + wg * 4 * 8192 + kk * 2048, 8192, 1024);
      wgmma_m64n256k16_ss_tb(o, gmma_desc_sw128(p_base + kk * 32, 16, 1024), db, 1);
    }
    wgmma_commit();
    const int nst = (b + 1) % kPagedStages;
    // One answer for the whole warpgroup (its four warps may probe on either side of the arrival),
    // broadcast so the compiler sees it warp-uniform and keeps the wgmma asynchronous.
    s_issued = b + 1 < n_blocks &&
               __shfl_sync(0xffffffffu, int(named_barrier_all(3 + wg, 128, mbar_test(&full[nst], ((b + 1) / kPagedStages) & 1))), 0);
    if (s_issued) {
      issue_s(nst);
      wgmma_wait<1>();  // PV(b) done; S(b+1) may still run
    } else {
      wgmma_wait<0>();
    }
    mbar_arrive(&empty[st]);
  }

  // Row sums: this thread's columns -> quad -> both warpgroups.
  l_a = detail::quad_sum(l_a);
  l_b = detail::quad_sum(l_b);
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
  constexpr int kStageRow = kDv * 2 + 16;  // bytes per staged row, padded against bank conflicts
  static_assert(kHeadsPerCta * kStageRow <= L::kP, "staging fits in the Q + K region");
  float scale[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half ? row_b : row_a;
    scale[half] =
        detail::finalize_row(p, qi, h0 + row, half ? m_b : m_a, sL[row] + sL[64 + row], any_valid, wg == 0 && quad == 0);
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

struct PagedFp8Rows {
  // The producer holds a warp's 16 rows of FP8 in registers (all their loads in flight at once):
  // it needs more of them than the cp.async gather. ptxas confines the code after setmaxnreg to
  // these counts. The launch gives 168 a thread (384 threads); the producer's 32 fewer (x 128
  // threads) are exactly what the consumers' 16 more (x 256) take: a larger producer would leave
  // the consumers' setmaxnreg waiting forever.
  static constexpr uint32_t kProducerRegs = 136;
  static constexpr uint32_t kConsumerRegs = 184;  // O (128) + S (16) + softmax state
  struct Entries {
    int total;
    int main;
  };
  V4Cache cache;
  const int32_t* indices;  // [n, topk] token ids
  int32_t topk;
  const int32_t* topk_length;
  V4Cache extra;  // extra.data == nullptr when absent
  const int32_t* extra_indices;
  int32_t extra_topk;
  const int32_t* extra_topk_length;

  __device__ Entries begin(int64_t qi) const {
    const int nm = row_entry_limit(topk_length, qi, topk);
    const int ne = extra.data ? row_entry_limit(extra_topk_length, qi, extra_topk) : 0;
    return Entries{nm + ne, nm};
  }

  // Entry: the token's data and scale records, or data == nullptr when invalid.
  struct Entry {
    const uint8_t* data;
    const uint8_t* scales;
  };
  __device__ __forceinline__ Entry load_entry(const Entries& e, int64_t qi, int k) const {
    Entry r{nullptr, nullptr};
    if (k < e.total) {
      const bool in_main = k < e.main;
      const int32_t v = in_main ? indices[qi * int64_t(topk) + k] : extra_indices[qi * int64_t(extra_topk) + (k - e.main)];
      const V4Cache c = V4Cache::pick(!in_main, cache, extra);
      if (c.contains(v)) {
        int64_t slot;
        const uint8_t* page = c.page_of(v, slot);
        r.data = page + slot * v4::kDataBytes;
        r.scales = page + c.page_size * v4::kDataBytes + slot * v4::kScaleBytes;
      }
    }
    return r;
  }

  template <int DQK, class StageFree>
  __device__ __forceinline__ void fill(const Entry& mine, uint8_t* tile, uint8_t* valid, int ptid, StageFree stage_free) const {
    static_assert(DQK == 512, "v4 rows are 512 wide");
    const int warp = ptid >> 5, lane = ptid & 31;
    const uint8_t* my_data = mine.data;
    const uint8_t* my_scales = mine.scales;
    constexpr int kRows = 16;  // the warp's rows of the stage
    // All 16 rows' FP8 nope bytes and scales in flight at once, into registers: lane l < 28 holds
    // dims [16l, 16l+16) of each row. Issued before the stage is free (they do not touch it).
    uint4 raw[kRows];
    uint32_t sb[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const uint8_t* data = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_data), u));
      const uint8_t* scales = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_scales), u));
      raw[u] = make_uint4(0, 0, 0, 0);
      sb[u] = 127;
      if (data && lane < 28) {
        sb[u] = __ldg(scales + (lane >> 2));
        raw[u] = __ldg(reinterpret_cast<const uint4*>(data + lane * 16));
      }
    }
    stage_free();
    if (lane < 16) valid[warp * 16 + lane] = my_data ? 1 : 0;
    // RoPE dims (bf16 as stored) straight into the tile: 16 rows x 8 pieces of 16 bytes, 4 a lane;
    // an invalid row's pieces are zeros.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int c = lane + 32 * k, u = c >> 3, piece = c & 7;
      const uint8_t* data = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_data), u));
      uint8_t* dst = tile + swz_offset(warp * 16 + u, v4::kNopeDim + piece * 8);
      if (data) {
        cp_async_16(dst, data + v4::kNopeDim + piece * 16, 16u);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
    // nope: e4m3 * 2^(byte-127) (zeros stay zeros for invalid rows)
    if (lane < 28) {
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int r = warp * 16 + u;
        const float scale = ue8m0_to_float(uint8_t(sb[u]));
        const int d0 = lane * 16;
        *reinterpret_cast<uint4*>(tile + swz_offset(r, d0)) = dequant8(raw[u].x, raw[u].y, scale);
        *reinterpret_cast<uint4*>(tile + swz_offset(r, d0 + 8)) = dequant8(raw[u].z, raw[u].w, scale);
      }
    }
    cp_async_wait_all();
    fence_proxy_async();
  }
};

}  // namespace smla::cuda
