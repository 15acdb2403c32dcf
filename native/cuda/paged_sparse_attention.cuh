// SPEC §5 paged FP8 sparse attention on sm_90a: the shared attention kernel (dQK = dV = 512) fed
// by a producer that reads v4 tokens straight from the paged FP8 cache(s) and dequantizes them
// into the bf16 tile in registers. The main and extra sets form one list per query: the main
// set's first min(topk, topkLength) entries, then the extra set's; one softmax over all of it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kv_cache.cuh"
#include "sparse_attention_sm90.cuh"
#include "sparse_prefill.cuh"

namespace smla::cuda {

struct PagedFp8Source {
  // The producer dequantizes in registers (a batch of rows in flight): it needs more of them
  // than the cp.async gather. ptxas confines the code after setmaxnreg to these counts.
  static constexpr uint32_t kProducerRegs = 112;
  static constexpr uint32_t kConsumerRegs = 184;
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
      const uint8_t* base = in_main ? cache.data : extra.data;
      const int64_t page_size = in_main ? cache.page_size : extra.page_size;
      const int64_t num_tokens = in_main ? cache.num_tokens : extra.num_tokens;
      if (v >= 0 && int64_t(v) < num_tokens) {
        r.data = base + v4::data_offset(v, page_size);
        r.scales = base + v4::scale_offset(v, page_size);
      }
    }
    return r;
  }

  template <int DQK>
  __device__ __forceinline__ void fill(const Entry& mine, uint8_t* tile, uint8_t* valid, int ptid) const {
    static_assert(DQK == 512, "v4 rows are 512 wide");
    const int warp = ptid >> 5, lane = ptid & 31;
    const uint8_t* my_data = mine.data;
    const uint8_t* my_scales = mine.scales;
    if (lane < 16) valid[warp * 16 + lane] = my_data ? 1 : 0;
    // Rows in batches of kBatch: all loads of a batch are in flight before the first convert.
    constexpr int kBatch = 8;
#pragma unroll 1
    for (int j0 = 0; j0 < 16; j0 += kBatch) {
      uint4 raw[kBatch], raw2[kBatch];
      uint32_t sb[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const uint8_t* data = reinterpret_cast<const uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_data), j0 + u));
        const uint8_t* scales = reinterpret_cast<const uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_scales), j0 + u));
        raw[u] = raw2[u] = make_uint4(0, 0, 0, 0);
        sb[u] = 127;
        if (data) {
          if (lane < 28) {
            sb[u] = __ldg(scales + (lane >> 2));
            raw[u] = __ldg(reinterpret_cast<const uint4*>(data + lane * 16));
          } else {
            const uint4* rope = reinterpret_cast<const uint4*>(data + v4::kNopeDim + (lane - 28) * 32);
            raw[u] = __ldg(rope);
            raw2[u] = __ldg(rope + 1);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int r = warp * 16 + j0 + u;
        uint4 lo = raw[u], hi = raw2[u];
        if (lane < 28) {  // nope: e4m3 * 2^(byte-127) (zeros stay zeros for invalid rows)
          const float scale = ue8m0_to_float(uint8_t(sb[u]));
          lo = dequant8(raw[u].x, raw[u].y, scale);
          hi = dequant8(raw[u].z, raw[u].w, scale);
        }
        // Lane l < 28 holds dims [16l, 16l+16); lanes 28..31 hold rope dims [448 + 16u, +16).
        const int d0 = lane * 16;
        *reinterpret_cast<uint4*>(tile + swz_offset(r, d0)) = lo;
        *reinterpret_cast<uint4*>(tile + swz_offset(r, d0 + 8)) = hi;
      }
    }
    fence_proxy_async();
  }
};

}  // namespace smla::cuda
