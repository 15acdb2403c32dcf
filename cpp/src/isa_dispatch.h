// Load-time choices of the core's x86-64 code paths, all made once per process (cpp/src/isa_dispatch.cpp):
// - Between the core's kernels as compiled for the build's -march (the baseline) and a second copy
//   compiled for x86-64-v4 (AVX-512 F/CD/BW/DQ/VL), where the build carries one
//   (SMLA_ISA_DISPATCH_AVX512, root CMakeLists.txt). Each C entry point of the baseline starts with
//   SMLA_ISA_DISPATCH: it hands the call to the AVX-512 copy when smla_isa_avx512_active() says so.
// - Whether AVX-512 kernels take S = Q·Kᵀ through AVX512_BF16's vdpbf16ps
//   (sparse_attention_kernel.h SMLA_BF16_DOT): only those few routines are compiled for
//   AVX512_BF16 (a target attribute, unless -march has it), so one AVX-512 build serves CPUs with
//   and without it (Skylake-SP, Cascade Lake, Ice Lake).
// SPARSE_MLA_CPU_ISA overrides at run time (tests run every path on one machine):
//   unset or 'auto'  the widest path the CPU and OS have;
//   'avx512'         AVX-512 without the BF16 dot (where the CPU has AVX-512; else the baseline);
//   'baseline'       only what the build's -march gives: no AVX-512 copy, and the BF16 dot only
//                    where -march itself has AVX512_BF16.
// Any other value counts as 'auto'.
#pragma once
#include <stdint.h>

#include "sparse_mla/sparse_mla.h"

// This compiler can build the BF16 dot: for the whole target (-march with AVX512_BF16) or for its
// routines alone (target attribute: GCC 10 and clang 9 on). SMLA_SIMD_NO_BF16_DOT turns it off.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SMLA_SIMD_NO_BF16_DOT) && \
    (defined(__AVX512BF16__) || (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10))
#define SMLA_ISA_BF16_DOT_BUILDABLE 1
#endif

extern "C" {
#if defined(SMLA_ISA_BF16_DOT_BUILDABLE)
// Whether AVX-512 kernels that carry the BF16 dot may run it: the CPU has AVX512_BF16 (or -march
// has it), and SPARSE_MLA_CPU_ISA is not 'avx512' (nor 'baseline' where -march lacks it).
int32_t smla_isa_bf16_dot_active(void);
#endif
#if !defined(__wasm__)
// The SIMD path the core's calls take, as the addon's build.simd names it: "AVX-512+BF16",
// "AVX-512", "AVX2+FMA", "NEON", "SSE2" or "scalar".
const char* smla_isa_simd_path(void);
#endif
}

#if defined(SMLA_ISA_DISPATCH_AVX512) && !defined(SMLA_ISA_VARIANT_AVX512)
extern "C" {
// The CPU has AVX-512 F/CD/BW/DQ/VL with the OS saving the zmm state, and SPARSE_MLA_CPU_ISA is
// not 'baseline'.
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
