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

static __global__ void __launch_bounds__(256) dequant_v4_kernel(V4Cache c, const int64_t* __restrict__ ids,
                                                         int64_t n, uint16_t* __restrict__ out,
                                                         int32_t* bad_id) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t i = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); i < n; i += warps) {
    const int64_t t = ids[i];
    uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
    if (c.contains(t)) {
      dequant_v4_lane(c, t, lane, lo, hi);
    } else if (lane == 0 && bad_id) {
      *bad_id = 1;
    }
    uint4* dst = reinterpret_cast<uint4*>(out + i * v4::kDim + lane * 16);
    dst[0] = lo;
    dst[1] = hi;
  }
}

// v32: lane l produces nope dims [16l, 16l+16); lanes 0..7 also copy rope dims [512 + 8l, +8).
static __global__ void __launch_bounds__(256) dequant_v32_kernel(const uint8_t* __restrict__ cache,
                                                          int64_t num_tokens,
                                                          const int64_t* __restrict__ ids, int64_t n,
                                                          uint16_t* __restrict__ out, int32_t* bad_id) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t i = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); i < n; i += warps) {
    const int64_t t = ids[i];
    uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0), rope = make_uint4(0, 0, 0, 0);
    if (t >= 0 && t < num_tokens) {
      const uint8_t* tok = cache + v32::token_offset(t);
      const float scale = __ldg(reinterpret_cast<const float*>(tok + v32::kScalesAt) + (lane >> 3));
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(tok + lane * 16));
      if (lane < 8) rope = __ldg(reinterpret_cast<const uint4*>(tok + v32::kRopeAt) + lane);
      lo = dequant8(raw.x, raw.y, scale);
      hi = dequant8(raw.z, raw.w, scale);
    } else if (lane == 0 && bad_id) {
      *bad_id = 1;
    }
    uint16_t* row = out + i * v32::kDim;
    uint4* dst = reinterpret_cast<uint4*>(row + lane * 16);
    dst[0] = lo;
    dst[1] = hi;
    if (lane < 8) reinterpret_cast<uint4*>(row + v32::kNopeDim)[lane] = rope;
  }
}

}  // namespace smla::cuda
