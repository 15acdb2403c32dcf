// pagedSparseAttention's params object (src/backends/abi.ts) read into
// smla_paged_sparse_attention_params: scalars in their ranges, then every array of exactly the
// length the scalars give it; caches of exactly their v4 geometry's bytes.
#pragma once
#include <climits>

#include "addon.h"
#include "kv_cache.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

template <class Fields>
smla_paged_sparse_attention_params ReadPagedSparseAttention(Fields& f) {
  constexpr uint64_t kD = smla::v4::kDim;
  smla_paged_sparse_attention_params p{};
  p.n = f.Int("n", 0, INT32_MAX);
  p.h_q = f.Int("hQ", 1, INT32_MAX);
  p.page_size = f.Int("pageSize", 1, INT32_MAX);
  p.num_pages = f.Int("numPages", 0, INT32_MAX);
  p.topk = f.Int("topk", 0, INT32_MAX);
  const bool extra = !f.IsNull("extraKCache");
  p.extra_page_size = f.Int("extraPageSize", extra ? 1 : 0, INT32_MAX);
  p.extra_num_pages = f.Int("extraNumPages", 0, INT32_MAX);
  p.extra_topk = f.Int("extraTopk", 0, extra ? INT32_MAX : 0);
  p.sm_scale = f.Float("smScale");
  const uint64_t rows = uint64_t(p.n) * uint64_t(p.h_q);
  p.q = f.template Input<uint16_t>("q", napi_uint16_array, rows * kD);
  p.k_cache = f.template Input<uint8_t>("kCache", napi_uint8_array, CacheBytes(SMLA_CACHE_V4, p.page_size, p.num_pages));
  p.indices = f.template Input<int32_t>("indices", napi_int32_array, uint64_t(p.n) * uint64_t(p.topk));
  p.topk_length = f.template Input<int32_t>("topkLength", napi_int32_array, uint64_t(p.n), true);
  if (extra) {
    p.extra_k_cache = f.template Input<uint8_t>("extraKCache", napi_uint8_array, CacheBytes(SMLA_CACHE_V4, p.extra_page_size, p.extra_num_pages));
    p.extra_indices = f.template Input<int32_t>("extraIndices", napi_int32_array, uint64_t(p.n) * uint64_t(p.extra_topk));
    p.extra_topk_length = f.template Input<int32_t>("extraTopkLength", napi_int32_array, uint64_t(p.n), true);
  }
  p.attn_sink = f.template Input<float>("attnSink", napi_float32_array, uint64_t(p.h_q), true);
  p.out = f.template Output<uint16_t>("out", napi_uint16_array, rows * kD);
  p.lse = f.template Output<float>("lse", napi_float32_array, rows);
  p.max_logits = f.template Output<float>("maxLogits", napi_float32_array, rows);
  return p;
}

}  // namespace smla_addon
