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
#include "sm90_ptx.cuh"

namespace smla::cuda {

// A v4 cache as the kernels read it. Token id -> (page, slot) by a multiply-high division when
// every id fits 31 bits (page sizes and id counts seen in practice), by a 64-bit division otherwise.
struct V4Cache {
  const uint8_t* data;  // nullptr when absent
  int64_t page_size;
  int64_t num_tokens;  // page_size * num_pages
  int64_t page_bytes;
  uint32_t div_mul, div_shift;  // valid when num_tokens <= 2^31

  static V4Cache make(const uint8_t* data, int64_t page_size, int64_t num_pages) {
    uint32_t l = 0;
    while ((uint64_t(1) << l) < uint64_t(page_size)) ++l;
    const uint64_t m = l >= 32 ? 0 : ((uint64_t(1) << 32) * ((uint64_t(1) << l) - uint64_t(page_size))) / uint64_t(page_size) + 1;
    return V4Cache{data, page_size, page_size * num_pages, v4::page_bytes(page_size), uint32_t(m), l};
  }
  // Field-wise choice between two caches: a struct chosen at run time would move both (kernel
  // parameters) to local memory.
  __device__ __forceinline__ static V4Cache pick(bool second, const V4Cache& a, const V4Cache& b) {
    return V4Cache{second ? b.data : a.data,           second ? b.page_size : a.page_size,
                   second ? b.num_tokens : a.num_tokens, second ? b.page_bytes : a.page_bytes,
                   second ? b.div_mul : a.div_mul,     second ? b.div_shift : a.div_shift};
  }
  __device__ __forceinline__ bool contains(int64_t id) const { return id >= 0 && id < num_tokens; }
  // The token's page start and slot (id must be contained).
  __device__ __forceinline__ const uint8_t* page_of(int64_t id, int64_t& slot) const {
    int64_t page;
    if (num_tokens <= (int64_t(1) << 31)) {
      const uint32_t t = uint32_t(id);
      page = (__umulhi(t, div_mul) + t) >> div_shift;
    } else {
      page = id / page_size;
    }
    slot = id - page * page_size;
    return data + page * page_bytes;
  }
};

// Two e4m3 bytes (the low half of a word) as floats, exactly (e4m3 -> f16 -> f32).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// 8 e4m3 bytes (two words) times a power-of-two scale -> 8 bf16 (one 16-byte word).
__device__ __forceinline__ uint32_t dequant_pair(uint32_t two_bytes, float scale) {
  const float2 f = e4m3x2_to_float2(two_bytes);
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
  return *reinterpret_cast<const uint32_t*>(&b);
}
__device__ __forceinline__ uint4 dequant8(uint32_t w0, uint32_t w1, float scale) {
  return make_uint4(dequant_pair(w0 & 0xffffu, scale), dequant_pair(w0 >> 16, scale),
                    dequant_pair(w1 & 0xffffu, scale), dequant_pair(w1 >> 16, scale));
}

// A ue8m0 byte's 2^(byte-127) as a bf16, in both halves: exact (bf16 has float's exponent range),
// the top half of formats.h's ue8m0_to_float (0 the subnormal 2^-127, 0xFF NaN), written as
// selects because deriving it from that float costs the paged producer instructions.
__device__ __forceinline__ uint32_t ue8m0_to_bf16x2(uint32_t byte) {
  uint32_t e = byte << 7;
  e = byte == 0 ? 0x0040u : e;
  e = byte == 0xffu ? 0x7fc0u : e;
  return e * 0x00010001u;
}
// a * b for bf16 pairs, rounded once. With a an e4m3 value (exact in bf16) and b a ue8m0 scale
// from ue8m0_to_bf16x2, the one rounding of the exact product is the float path's rounding to
// bf16 (subnormals and NaN included).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// dequant8 with the scale as a bf16 pair (ue8m0_to_bf16x2): each value rounded to bf16 (exact) and
// multiplied once by bf16x2_mul, one instruction a pair fewer than the float route and the same
// result (the paged kernel's warpgroup 1 and its tensor-core route round this way).
__device__ __forceinline__ uint4 dequant8_bf16_scale(uint32_t w0, uint32_t w1, uint32_t scale) {
  const auto pair = [&](uint32_t two) {
    const float2 f = e4m3x2_to_float2(two);
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return bf16x2_mul(*reinterpret_cast<const uint32_t*>(&b), scale);
  };
  return make_uint4(pair(w0 & 0xffffu), pair(w0 >> 16), pair(w1 & 0xffffu), pair(w1 >> 16));
}

// The gather kernel: a warp takes kTokens consecutive output rows per iteration (the ids of the
// next iteration are loaded a step ahead, so an id load and its record load never form one chain),
// all records' loads in flight before the first convert. Lane l produces the row's 16-byte output
// pieces l and l + 32 (and v32's rope piece 64 + l), so every store of the warp writes 512
// contiguous bytes and every load reads contiguous bytes. A Format reads one token's record
// (`load`: this lane's words, zeros for an id outside the cache) and writes its row (`store`).
template <int kTokens>
__device__ __forceinline__ void load_ids(const int64_t* __restrict__ ids, int64_t i0, int64_t n, int64_t (&t)[kTokens]) {
#pragma unroll
  for (int u = 0; u < kTokens; ++u) t[u] = i0 + u < n ? __ldg(ids + i0 + u) : -1;
}

// The gather by blocks `block` of `blocks` (a kernel's own grid, or its share of a shared one).
template <class Format>
__device__ __forceinline__ void dequant_gather(const Format& f, const int64_t* __restrict__ ids, int64_t n, uint16_t* __restrict__ out,
                                               int32_t* bad_id, int64_t block, int64_t blocks) {
  constexpr int K = Format::kTokens;
  const int lane = threadIdx.x & 31;
  const int64_t stride = blocks * (blockDim.x >> 5) * K;
  int64_t i0 = (block * (blockDim.x >> 5) + (threadIdx.x >> 5)) * K;
  int64_t t[K];
  load_ids<K>(ids, i0, n, t);
  for (; i0 < n; i0 += stride) {
    int64_t next[K];
    load_ids<K>(ids, i0 + stride, n, next);
    typename Format::Record rec[K];
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if (f.contains(t[u])) {
        rec[u] = f.load(t[u], lane);
      } else {
        rec[u] = typename Format::Record{};
        if (lane == 0 && bad_id && i0 + u < n) *bad_id = 1;
      }
    }
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const int64_t i = i0 + u;
      if (i >= n) break;
      f.store(reinterpret_cast<uint4*>(out + i * Format::kDim), rec[u], f.contains(t[u]), lane);
    }
#pragma unroll
    for (int u = 0; u < K; ++u) t[u] = next[u];
  }
}

template <class Format>
static __global__ void __launch_bounds__(256) dequant_gather_kernel(const Format f, const int64_t* __restrict__ ids, int64_t n,
                                                                    uint16_t* __restrict__ out, int32_t* bad_id) {
  dequant_gather(f, ids, n, out, bad_id, blockIdx.x, gridDim.x);
}

// One cache's gather as a share of a launch's blocks.
template <class Format>
struct GatherShare {
  Format f;
  const int64_t* ids;
  int64_t n;
  uint16_t* out;
  int32_t* bad_id;
};
constexpr int kMaxZeroedWords = 4;
// Device words (8 bytes each) a launch zeroes for the work queued after it.
struct ZeroedWords {
  unsigned long long* word[kMaxZeroedWords];
  int count;
};

// Two caches' gathers in one launch (a layer's compressed rows and its SWA rows: one launch less
// on the host's way to the prefill, and the two run side by side): blocks [0, a_blocks) take a,
// the rest b. Block 0 also zeroes `zero`'s words, which launches queued after this one count on.
template <class Format>
static __global__ void __launch_bounds__(256) dequant_gather_pair_kernel(const GatherShare<Format> a, const GatherShare<Format> b,
                                                                         unsigned a_blocks, const ZeroedWords zero) {
  if (blockIdx.x == 0 && int(threadIdx.x) < zero.count) *zero.word[threadIdx.x] = 0ull;
  if (blockIdx.x < a_blocks) {
    dequant_gather(a.f, a.ids, a.n, a.out, a.bad_id, blockIdx.x, a_blocks);
  } else {
    dequant_gather(b.f, b.ids, b.n, b.out, b.bad_id, blockIdx.x - a_blocks, gridDim.x - a_blocks);
  }
}

// v4: piece l is nope dims [8l, 8l+8) (tile l/8); piece 32 + l is nope dims [256 + 8l, +8)
// (tile 4 + l/8) for l < 24 and rope dims [448 + 8(l-24), +8) after.
struct V4Format {
  static constexpr int kTokens = 4;
  static constexpr int kDim = v4::kDim;
  struct Record {
    uint2 lo, scales;  // scale bytes of tiles 0-3 and 4-7
    uint4 hi;          // nope bytes (lanes < 24) or rope bf16 (lanes >= 24)
  };
  V4Cache c;
  __device__ __forceinline__ bool contains(int64_t id) const { return c.contains(id); }
  __device__ __forceinline__ Record load(int64_t id, int lane) const {
    int64_t slot;
    const uint8_t* page = c.page_of(id, slot);
    const uint8_t* data = page + slot * v4::kDataBytes;
    Record r;
    // A page's scales (8 bytes a token, four tokens a sector) are read again by the page's other
    // tokens: kept in L2 while the records stream past.
    r.scales = ldg_nc_policy(reinterpret_cast<const uint2*>(page + c.page_size * v4::kDataBytes + slot * v4::kScaleBytes),
                             l2_policy_evict_last());
    r.lo = __ldg(reinterpret_cast<const uint2*>(data + 8 * lane));
    if (lane < 24) {
      const uint2 h = __ldg(reinterpret_cast<const uint2*>(data + 256 + 8 * lane));
      r.hi = make_uint4(h.x, h.y, 0, 0);
    } else {
      r.hi = __ldg(reinterpret_cast<const uint4*>(data + v4::kNopeDim) + (lane - 24));
    }
    return r;
  }
  // An id outside the cache gives +0 rows (its zero record's rope is +0 too).
  __device__ __forceinline__ void store(uint4* row, const Record& r, bool valid, int lane) const {
    auto scale_of = [&](int tile) {
      const uint32_t w = tile < 4 ? r.scales.x : r.scales.y;
      return ue8m0_to_float(uint8_t(w >> (8 * (tile & 3))));
    };
    row[lane] = valid ? dequant8(r.lo.x, r.lo.y, scale_of(lane >> 3)) : make_uint4(0, 0, 0, 0);
    row[32 + lane] = lane < 24 ? (valid ? dequant8(r.hi.x, r.hi.y, scale_of(4 + (lane >> 3))) : make_uint4(0, 0, 0, 0)) : r.hi;
  }
};

// v32: pieces l and 32 + l are nope dims [8l, +8) and [256 + 8l, +8) (tiles l/16 and 2 + l/16);
// lanes 0..7 also copy rope piece 64 + l.
struct V32Format {
  static constexpr int kTokens = 4;
  static constexpr int kDim = v32::kDim;
  struct Record {
    uint2 lo, hi;
    uint4 rope;
    float4 scales;  // zero for an id outside the cache: +0 rows
  };
  const uint8_t* cache;
  int64_t num_tokens;
  __device__ __forceinline__ bool contains(int64_t id) const { return id >= 0 && id < num_tokens; }
  __device__ __forceinline__ Record load(int64_t id, int lane) const {
    const uint8_t* tok = cache + v32::token_offset(id);
    Record r;
    r.scales = __ldg(reinterpret_cast<const float4*>(tok + v32::kScalesAt));
    r.lo = __ldg(reinterpret_cast<const uint2*>(tok + 8 * lane));
    r.hi = __ldg(reinterpret_cast<const uint2*>(tok + 256 + 8 * lane));
    r.rope = lane < 8 ? __ldg(reinterpret_cast<const uint4*>(tok + v32::kRopeAt) + lane) : make_uint4(0, 0, 0, 0);
    return r;
  }
  __device__ __forceinline__ void store(uint4* row, const Record& r, bool, int lane) const {
    row[lane] = dequant8(r.lo.x, r.lo.y, lane < 16 ? r.scales.x : r.scales.y);
    row[32 + lane] = dequant8(r.hi.x, r.hi.y, lane < 16 ? r.scales.z : r.scales.w);
    if (lane < 8) row[64 + lane] = r.rope;
  }
};

}  // namespace smla::cuda
