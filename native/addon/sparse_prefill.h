// sparsePrefill's params object (src/backends/abi.ts) read into smla_sparse_prefill_params:
// scalars in their ranges, then every array of exactly the length the scalars give it. Fields:
// Args::Fields (the cpu op) or CudaFields (the cuda op; cuda_stream.h).
#pragma once
#include <climits>

#include "addon.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

template <class Fields>
void ReadSparsePrefill(Fields& f, smla_sparse_prefill_params& p) {
  p.s_q = f.Int("sQ", 0, INT32_MAX);
  p.h_q = f.Int("hQ", 1, INT32_MAX);
  p.d_qk = f.Int("dQK", 1, INT32_MAX);
  p.d_v = f.Int("dV", 1, INT32_MAX);
  p.s_kv = f.Int("sKV", 0, INT32_MAX);
  p.topk = f.Int("topk", 0, INT32_MAX);
  p.sm_scale = f.Float("smScale");
  const uint64_t rows = uint64_t(p.s_q) * uint64_t(p.h_q);
  f.Input(p.q, "q", napi_uint16_array, rows * uint64_t(p.d_qk));
  f.Input(p.kv, "kv", napi_uint16_array, uint64_t(p.s_kv) * uint64_t(p.d_qk));
  f.Input(p.indices, "indices", napi_int32_array, uint64_t(p.s_q) * uint64_t(p.topk));
  f.Input(p.topk_length, "topkLength", napi_int32_array, uint64_t(p.s_q), true);
  f.Input(p.attn_sink, "attnSink", napi_float32_array, uint64_t(p.h_q), true);
  f.Output(p.out, "out", napi_uint16_array, rows * uint64_t(p.d_v));
  f.Output(p.max_logits, "maxLogits", napi_float32_array, rows);
  f.Output(p.lse, "lse", napi_float32_array, rows);
}

}  // namespace smla_addon
