// One name for every op of the C ABI, so a check passes the op's params struct built in place
// with designated initializers (C++20: the fields by name, in declaration order, the rest zero):
//   core(smla_sparse_prefill_params{.q = q, .kv = kv, ...})
#pragma once
#include "sparse_mla/sparse_mla.h"

inline int32_t core(const smla_quantize_kv_cache_params& p) { return smla_quantize_kv_cache(&p); }
inline int32_t core(const smla_dequantize_kv_cache_params& p) { return smla_dequantize_kv_cache(&p); }
inline int32_t core(const smla_sparse_prefill_params& p) { return smla_sparse_prefill(&p); }
inline int32_t core(const smla_paged_sparse_attention_params& p) { return smla_paged_sparse_attention(&p); }
