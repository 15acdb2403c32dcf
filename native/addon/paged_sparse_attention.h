// pagedSparseAttention's params object (src/backends/abi.ts) read into
// smla_paged_sparse_attention_params: scalars in their ranges, then every array of exactly the
// length the scalars give it; caches of exactly their v4 geometry's bytes. Fields: Args::Fields
// (the cpu op) or CudaFields (the cuda op; cuda_stream.h).
#pragma once
#include <climits>

#include "addon.h"
#include "kv_cache.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

template <class Fields>
void ReadPagedSparseAttention(Fields& f, smla_paged_sparse_attention_params& p) {
  constexpr uint64_t kD = smla::v4::kDim;
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
  f.Input(p.q, "q", napi_uint16_array, rows * kD);
  f.Input(p.k_cache, "kCache", napi_uint8_array, CacheBytes(SMLA_CACHE_V4, p.page_size, p.num_pages));
  f.Input(p.indices, "indices", napi_int32_array, uint64_t(p.n) * uint64_t(p.topk));
  f.Input(p.topk_length, "topkLength", napi_int32_array, uint64_t(p.n), true);
  if (extra) {
    f.Input(p.extra_k_cache, "extraKCache", napi_uint8_array, CacheBytes(SMLA_CACHE_V4, p.extra_page_size, p.extra_num_pages));
    f.Input(p.extra_indices, "extraIndices", napi_int32_array, uint64_t(p.n) * uint64_t(p.extra_topk));
    f.Input(p.extra_topk_length, "extraTopkLength", napi_int32_array, uint64_t(p.n), true);
  }
  f.Input(p.attn_sink, "attnSink", napi_float32_array, uint64_t(p.h_q), true);
  f.Output(p.out, "out", napi_uint16_array, rows * kD);
  f.Output(p.lse, "lse", napi_float32_array, rows);
  f.Output(p.max_logits, "maxLogits", napi_float32_array, rows);
}

}  // namespace smla_addon
