// SPEC §3.3: quantize rows into cache token ids, dequantize a gather of token ids into bf16 rows.
#include <string.h>

#include "kv_cache_rows.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_indices.h"
#include "sparse_mla/sparse_mla.h"

namespace smla {
namespace cpu {

void dequant_v4_token_bf16(const uint8_t* data, const uint8_t* scales, uint16_t* out) {
  for (int t = 0; t < v4::kNumTiles; ++t) {
    const uint8_t sb = scales[t];
    for (int i = 0; i < v4::kTile; ++i)
      out[t * v4::kTile + i] = v4::dequantize_nope(data[t * v4::kTile + i], sb);
  }
  memcpy(out + v4::kNopeDim, data + v4::kNopeDim, v4::kRopeDim * 2);
}

void dequant_v4_token_f32(const uint8_t* data, const uint8_t* scales, float* out) {
  uint16_t row[v4::kDim];
  dequant_v4_token_bf16(data, scales, row);
  for (int i = 0; i < v4::kDim; ++i) out[i] = bf16_to_float(row[i]);
}

void dequant_v32_token_bf16(const uint8_t* token, uint16_t* out) {
  for (int t = 0; t < v32::kNumTiles; ++t) {
    float scale;
    memcpy(&scale, token + v32::kScalesAt + 4 * t, 4);
    for (int i = 0; i < v32::kTile; ++i)
      out[t * v32::kTile + i] = v32::dequantize_nope(token[t * v32::kTile + i], scale);
  }
  memcpy(out + v32::kNopeDim, token + v32::kRopeAt, v32::kRopeDim * 2);
}

namespace {

// Shared argument checks of both cache ops; tokens checked against the cache before any write.
smla_status check_cache_args(int32_t format, const void* cache, int32_t page_size,
                             int32_t num_pages, const int64_t* token_ids, int32_t num_tokens) {
  if (format != SMLA_CACHE_V4 && format != SMLA_CACHE_V32) return SMLA_ERR_INVALID_ARGUMENT;
  if (page_size <= 0 || num_pages < 0 || num_tokens < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (format == SMLA_CACHE_V32 && page_size != 1) return SMLA_ERR_INVALID_ARGUMENT;
  if (num_tokens == 0) return SMLA_OK;
  if (!token_ids) return SMLA_ERR_INVALID_ARGUMENT;
  for (int32_t i = 0; i < num_tokens; ++i)
    if (!token_id_valid(token_ids[i], page_size, num_pages)) return SMLA_ERR_OUT_OF_RANGE;
  if (!cache) return SMLA_ERR_INVALID_ARGUMENT;  // reached only with num_pages > 0
  return SMLA_OK;
}

}  // namespace
}  // namespace cpu
}  // namespace smla

using namespace smla;

extern "C" SMLA_API int32_t smla_quantize_kv_cache(int32_t format, uint8_t* cache,
                                                   int32_t page_size, int32_t num_pages,
                                                   const int64_t* token_ids, int32_t num_tokens,
                                                   const void* rows, int32_t rows_dtype) {
  if (rows_dtype != SMLA_ROWS_F32 && rows_dtype != SMLA_ROWS_BF16) return SMLA_ERR_INVALID_ARGUMENT;
  const smla_status st =
      cpu::check_cache_args(format, cache, page_size, num_pages, token_ids, num_tokens);
  if (st != SMLA_OK || num_tokens == 0) return st;
  if (!rows) return SMLA_ERR_INVALID_ARGUMENT;
  const int dim = format == SMLA_CACHE_V4 ? v4::kDim : v32::kDim;
  float x[v32::kDim];
  for (int32_t i = 0; i < num_tokens; ++i) {
    const int64_t base = int64_t(i) * dim;
    if (rows_dtype == SMLA_ROWS_F32) {
      memcpy(x, static_cast<const float*>(rows) + base, size_t(dim) * sizeof(float));
    } else {
      const uint16_t* r = static_cast<const uint16_t*>(rows) + base;
      for (int d = 0; d < dim; ++d) x[d] = bf16_to_float(r[d]);
    }
    const int64_t id = token_ids[i];
    if (format == SMLA_CACHE_V4) {
      v4::quantize_token(x, cache + v4::data_offset(id, page_size),
                         cache + v4::scale_offset(id, page_size));
    } else {
      v32::quantize_token(x, cache + v32::token_offset(id));
    }
  }
  return SMLA_OK;
}

extern "C" SMLA_API int32_t smla_dequantize_kv_cache(int32_t format, const uint8_t* cache,
                                                     int32_t page_size, int32_t num_pages,
                                                     const int64_t* token_ids, int32_t num_tokens,
                                                     uint16_t* out) {
  const smla_status st =
      cpu::check_cache_args(format, cache, page_size, num_pages, token_ids, num_tokens);
  if (st != SMLA_OK || num_tokens == 0) return st;
  if (!out) return SMLA_ERR_INVALID_ARGUMENT;
  for (int32_t i = 0; i < num_tokens; ++i) {
    const int64_t id = token_ids[i];
    if (format == SMLA_CACHE_V4) {
      cpu::dequant_v4_token_bf16(cache + v4::data_offset(id, page_size),
                                 cache + v4::scale_offset(id, page_size),
                                 out + int64_t(i) * v4::kDim);
    } else {
      cpu::dequant_v32_token_bf16(cache + v32::token_offset(id), out + int64_t(i) * v32::kDim);
    }
  }
  return SMLA_OK;
}
