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
  static constexpr uint32_t kProducerRegs = 56;
  static constexpr uint32_t kConsumerRegs = 224;
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

  template <int DQK>
  __device__ __forceinline__ void fill(const Entries& e, int64_t qi, int k0, uint8_t* tile,
                                       uint8_t* valid, int ptid) const {
    static_assert(DQK == 512, "v4 rows are 512 wide");
    const int warp = ptid >> 5, lane = ptid & 31;
    const int my_row = warp * 16 + (lane & 15);
    const int k = k0 + my_row;
    // Resolve this lane's entry to (cache, token id); invalid -> set = -1.
    int64_t tok = -1;
    int set = -1;
    if (k < e.main) {
      const int32_t v = indices[qi * int64_t(topk) + k];
      if (cache.contains(v)) tok = v, set = 0;
    } else if (k < e.total) {
      const int32_t v = extra_indices[qi * int64_t(extra_topk) + (k - e.main)];
      if (extra.contains(v)) tok = v, set = 1;
    }
    if (lane < 16) valid[my_row] = set >= 0 ? 1 : 0;
#pragma unroll 2
    for (int j = 0; j < 16; ++j) {
      const int64_t t = __shfl_sync(0xffffffffu, tok, j);
      const int s = __shfl_sync(0xffffffffu, set, j);
      const int r = warp * 16 + j;
      uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
      if (s >= 0) {
        const V4Cache& c = s == 0 ? cache : extra;
        dequant_v4_lane(c, t, lane, lo, hi);
      }
      // Lane l < 28 holds dims [16l, 16l+16); lanes 28..31 hold rope dims [448 + 16u, +16).
      const int d0 = lane * 16;
      *reinterpret_cast<uint4*>(tile + swz_offset(r, d0)) = lo;
      *reinterpret_cast<uint4*>(tile + swz_offset(r, d0 + 8)) = hi;
    }
    fence_proxy_async();
  }
};

}  // namespace smla::cuda
