// The cache ops' params objects (src/backends/abi.ts) read into smla_quantize_kv_cache_params /
// smla_dequantize_kv_cache_params, and the cache geometry every cache op needs (kv_cache_layout.h).
// Token ids are int32 on the JS side and int64 in the C ABI: the reader returns them as they came,
// and the op widens them where it runs. The cuda dequant reads the geometry here and its arrays
// itself (cuda_ops.cpp: its ids may be a device buffer, its output a workspace region).
#pragma once
#include <climits>

#include "addon.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

// Bytes of a cache of this geometry (SPEC §3).
inline uint64_t CacheBytes(int32_t format, int64_t page_size, int64_t num_pages) {
  if (format == SMLA_CACHE_V32) return uint64_t(num_pages) * smla::v32::kTokenBytes;
  return uint64_t(smla::v4::page_bytes(page_size)) * uint64_t(num_pages);
}

inline int64_t RowDim(int32_t format) { return format == SMLA_CACHE_V32 ? smla::v32::kDim : smla::v4::kDim; }

// Format, geometry and token count, shared by both cache ops.
template <class Fields, class Params>
void ReadCacheGeometry(Fields& f, Params& p) {
  p.format = f.Int("format", SMLA_CACHE_V4, SMLA_CACHE_V32);
  p.page_size = f.Int("pageSize", 1, p.format == SMLA_CACHE_V32 ? 1 : INT32_MAX);
  p.num_pages = f.Int("numPages", 0, INT32_MAX);
  p.num_tokens = f.Int("numTokens", 0, INT32_MAX);
}

// The cache is borrowed (*shared: whether it lives in shared memory; see Args::Borrow), not copied:
// the op copies just the tokens it reads.
template <class Fields>
void ReadDequantizeKvCache(Fields& f, smla_dequantize_kv_cache_params& p, const int32_t** token_ids, bool* shared) {
  ReadCacheGeometry(f, p);
  p.cache = static_cast<const uint8_t*>(f.Borrow("cache", napi_uint8_array, CacheBytes(p.format, p.page_size, p.num_pages), shared));
  f.Snapshot(*token_ids, "tokenIds", napi_int32_array, uint64_t(p.num_tokens));
  f.Output(p.out, "out", napi_uint16_array, uint64_t(p.num_tokens) * uint64_t(RowDim(p.format)));
}

// The cache is checked and pinned as an output, written only by the op's commit; rows are
// float32 (rowsDtype 0) or bf16 (1).
template <class Fields>
void ReadQuantizeKvCache(Fields& f, smla_quantize_kv_cache_params& p, const int32_t** token_ids) {
  ReadCacheGeometry(f, p);
  p.rows_dtype = f.Int("rowsDtype", SMLA_ROWS_F32, SMLA_ROWS_BF16);
  f.Output(p.cache, "cache", napi_uint8_array, CacheBytes(p.format, p.page_size, p.num_pages));
  f.Snapshot(*token_ids, "tokenIds", napi_int32_array, uint64_t(p.num_tokens));
  const uint64_t values = uint64_t(p.num_tokens) * uint64_t(RowDim(p.format));
  if (p.rows_dtype == SMLA_ROWS_F32) {
    const float* rows = nullptr;
    f.Input(rows, "rows", napi_float32_array, values);
    p.rows = rows;
  } else {
    const uint16_t* rows = nullptr;
    f.Input(rows, "rows", napi_uint16_array, values);
    p.rows = rows;
  }
}

}  // namespace smla_addon
