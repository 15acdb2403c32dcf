// sparsePrefill's params object (src/backends/abi.ts) read into smla_sparse_prefill_params:
// scalars in their ranges, then every array of exactly the length the scalars give it.
#pragma once
#include <climits>

#include "addon.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

template <class Fields>
smla_sparse_prefill_params ReadSparsePrefill(Fields& f) {
  smla_sparse_prefill_params p{};
  p.s_q = f.Int("sQ", 0, INT32_MAX);
  p.h_q = f.Int("hQ", 1, INT32_MAX);
  p.d_qk = f.Int("dQK", 1, INT32_MAX);
  p.d_v = f.Int("dV", 1, INT32_MAX);
  p.s_kv = f.Int("sKV", 0, INT32_MAX);
  p.topk = f.Int("topk", 0, INT32_MAX);
  p.sm_scale = f.Float("smScale");
  const uint64_t rows = uint64_t(p.s_q) * uint64_t(p.h_q);
  p.q = f.template Input<uint16_t>("q", napi_uint16_array, rows * uint64_t(p.d_qk));
  p.kv = f.template Input<uint16_t>("kv", napi_uint16_array, uint64_t(p.s_kv) * uint64_t(p.d_qk));
  p.indices = f.template Input<int32_t>("indices", napi_int32_array, uint64_t(p.s_q) * uint64_t(p.topk));
  p.topk_length = f.template Input<int32_t>("topkLength", napi_int32_array, uint64_t(p.s_q), true);
  p.attn_sink = f.template Input<float>("attnSink", napi_float32_array, uint64_t(p.h_q), true);
  p.out = f.template Output<uint16_t>("out", napi_uint16_array, rows * uint64_t(p.d_v));
  p.max_logits = f.template Output<float>("maxLogits", napi_float32_array, rows);
  p.lse = f.template Output<float>("lse", napi_float32_array, rows);
  return p;
}

}  // namespace smla_addon
