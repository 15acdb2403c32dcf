// Load-time choice between the core's kernels as compiled for the build's -march (the baseline)
// and a second copy compiled for AVX-512 (x86-64-v4 + AVX512_BF16), where the build carries one
// (SMLA_ISA_DISPATCH_AVX512, root CMakeLists.txt). Each C entry point of the baseline starts with
// SMLA_ISA_DISPATCH: it hands the call to the AVX-512 copy when smla_isa_avx512_active() says so.
#pragma once
#include <stdint.h>

#include "sparse_mla/sparse_mla.h"

#if defined(SMLA_ISA_DISPATCH_AVX512) && !defined(SMLA_ISA_VARIANT_AVX512)
extern "C" {
// Decided once per process: the CPU has AVX-512 F/CD/BW/DQ/VL and AVX512_BF16 with the OS saving
// the zmm state, and SPARSE_MLA_CPU_ISA is not 'baseline'.
int32_t smla_isa_avx512_active(void);
int32_t smla_avx512_sparse_prefill(const smla_sparse_prefill_params* p);
int32_t smla_avx512_paged_sparse_attention(const smla_paged_sparse_attention_params* p);
int32_t smla_avx512_quantize_kv_cache(const smla_quantize_kv_cache_params* p);
int32_t smla_avx512_dequantize_kv_cache(const smla_dequantize_kv_cache_params* p);
}
#define SMLA_ISA_DISPATCH(entry, p) \
  do {                                \
    if (smla_isa_avx512_active()) return smla_avx512_##entry(p); \
  } while (0)
#else
#define SMLA_ISA_DISPATCH(entry, p) \
  do {                                \
  } while (0)
#endif
