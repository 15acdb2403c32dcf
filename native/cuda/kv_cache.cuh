// SPEC §3.3 dequantizeKCachePaged on the GPU: gather tokens of a v4 (paged) or v32 FP8 cache by
// id into a bf16 workspace. Memory-bound: one warp per token, 16-byte loads and stores, int64
// offsets from the core's layout (kv_cache_layout.h). The per-element math is the core's:
// e4m3 * 2^(byte-127) in float32, rounded to bf16 (the e4m3 -> f16 step is the exact hardware
// conversion). Ids outside the cache are never read: their rows are zero-filled and *bad_id is
// set, so a caller that skipped validation gets an error instead of a fault.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "sparse_mla/formats.h"
#include "sparse_mla/kv_cache_layout.h"

namespace smla::cuda {

struct V4Cache {
  const uint8_t* data;
  int64_t page_size;
  int64_t num_tokens;  // page_size * num_pages
  __device__ __forceinline__ bool contains(int64_t id) const { return id >= 0 && id < num_tokens; }
};

// 8 e4m3 bytes (two words) times a power-of-two scale -> 8 bf16 (one 16-byte word).
__device__ __forceinline__ uint32_t dequant_pair(uint32_t two_bytes, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
  return *reinterpret_cast<const uint32_t*>(&b);
}
__device__ __forceinline__ uint4 dequant8(uint32_t w0, uint32_t w1, float scale) {
  return make_uint4(dequant_pair(w0 & 0xffffu, scale), dequant_pair(w0 >> 16, scale),
                    dequant_pair(w1 & 0xffffu, scale), dequant_pair(w1 >> 16, scale));
}

// Lane l of a warp produces dims [16l, 16l+16) of token t's 512-dim row as two 16-byte words.
__device__ __forceinline__ void dequant_v4_lane(const V4Cache& c, int64_t t, int lane, uint4& lo, uint4& hi) {
  const uint8_t* data = c.data + v4::data_offset(t, c.page_size);
  if (lane < 28) {
    const uint8_t* sc = c.data + v4::scale_offset(t, c.page_size);
    const float scale = ue8m0_to_float(__ldg(sc + (lane >> 2)));
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(data + lane * 16));
    lo = dequant8(raw.x, raw.y, scale);
    hi = dequant8(raw.z, raw.w, scale);
  } else {
    const uint4* rope = reinterpret_cast<const uint4*>(data + v4::kNopeDim + (lane - 28) * 32);
    lo = __ldg(rope);
    hi = __ldg(rope + 1);
  }
}

// Tokens per warp per loop iteration. 1 = one token at a time: the id load and the record load form
// one dependent chain per token. 2 = two tokens' ids, then both records, in flight together: twice
// the bytes in flight per thread and half the dependent round trips (the v32 fix, bench/cuda/ADDON.md).
template <int kTokens>
static __global__ void __launch_bounds__(256) dequant_v4_kernel(V4Cache c, const int64_t* __restrict__ ids,
                                                         int64_t n, uint16_t* __restrict__ out,
                                                         int32_t* bad_id) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t i0 = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); i0 < n; i0 += warps * kTokens) {
    int64_t t[kTokens];
#pragma unroll
    for (int u = 0; u < kTokens; ++u) t[u] = i0 + u * warps < n ? ids[i0 + u * warps] : -1;
    uint4 lo[kTokens], hi[kTokens];
#pragma unroll
    for (int u = 0; u < kTokens; ++u) {
      lo[u] = make_uint4(0, 0, 0, 0);
      hi[u] = make_uint4(0, 0, 0, 0);
      if (c.contains(t[u])) {
        dequant_v4_lane(c, t[u], lane, lo[u], hi[u]);
      } else if (lane == 0 && bad_id && i0 + u * warps < n) {
        *bad_id = 1;
      }
    }
#pragma unroll
    for (int u = 0; u < kTokens; ++u) {
      const int64_t i = i0 + u * warps;
      if (i < n) {
        uint4* dst = reinterpret_cast<uint4*>(out + i * v4::kDim + lane * 16);
        dst[0] = lo[u];
        dst[1] = hi[u];
      }
    }
  }
}

// v32: lane l produces nope dims [16l, 16l+16); lanes 0..7 also copy rope dims [512 + 8l, +8).
template <int kTokens>
static __global__ void __launch_bounds__(256) dequant_v32_kernel(const uint8_t* __restrict__ cache,
                                                          int64_t num_tokens,
                                                          const int64_t* __restrict__ ids, int64_t n,
                                                          uint16_t* __restrict__ out, int32_t* bad_id) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t i0 = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); i0 < n; i0 += warps * kTokens) {
    int64_t t[kTokens];
#pragma unroll
    for (int u = 0; u < kTokens; ++u) t[u] = i0 + u * warps < n ? ids[i0 + u * warps] : -1;
    uint4 raw[kTokens], rope[kTokens];
    float scale[kTokens];
#pragma unroll
    for (int u = 0; u < kTokens; ++u) {
      raw[u] = make_uint4(0, 0, 0, 0);
      rope[u] = make_uint4(0, 0, 0, 0);
      scale[u] = 0.f;
      if (t[u] >= 0 && t[u] < num_tokens) {
        const uint8_t* tok = cache + v32::token_offset(t[u]);
        scale[u] = __ldg(reinterpret_cast<const float*>(tok + v32::kScalesAt) + (lane >> 3));
        raw[u] = __ldg(reinterpret_cast<const uint4*>(tok + lane * 16));
        if (lane < 8) rope[u] = __ldg(reinterpret_cast<const uint4*>(tok + v32::kRopeAt) + lane);
      } else if (lane == 0 && bad_id && i0 + u * warps < n) {
        *bad_id = 1;
      }
    }
#pragma unroll
    for (int u = 0; u < kTokens; ++u) {
      const int64_t i = i0 + u * warps;
      if (i < n) {
        // an invalid id leaves raw = 0 and scale = 0: the row is written as +0
        const uint4 lo = dequant8(raw[u].x, raw[u].y, scale[u]);
        const uint4 hi = dequant8(raw[u].z, raw[u].w, scale[u]);
        uint16_t* row = out + i * v32::kDim;
        uint4* dst = reinterpret_cast<uint4*>(row + lane * 16);
        dst[0] = lo;
        dst[1] = hi;
        if (lane < 8) reinterpret_cast<uint4*>(row + v32::kNopeDim)[lane] = rope[u];
      }
    }
  }
}

}  // namespace smla::cuda
