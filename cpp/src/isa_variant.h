// Force-included (-include) into the second, AVX-512 compile of the core's kernels (root
// CMakeLists.txt, SMLA_CPU_AVX512_VARIANT). Every name with linkage gets its own spelling, so the
// linker never merges an inline function or a static of this copy with the baseline's (one would
// then run AVX-512 code on a CPU without it): the core's namespace and its C entry points are
// renamed; cpp/src/isa_dispatch.h calls the renamed entry points.
#pragma once
#define smla smla_avx512
#define smla_sparse_prefill smla_avx512_sparse_prefill
#define smla_paged_sparse_attention smla_avx512_paged_sparse_attention
#define smla_quantize_kv_cache smla_avx512_quantize_kv_cache
#define smla_dequantize_kv_cache smla_avx512_dequantize_kv_cache
