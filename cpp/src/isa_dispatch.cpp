// smla_isa_avx512_active (cpp/src/isa_dispatch.h); compiled for the baseline -march only.
#include "isa_dispatch.h"

#if defined(SMLA_ISA_DISPATCH_AVX512) && !defined(SMLA_ISA_VARIANT_AVX512)
#include <stdlib.h>
#include <string.h>

namespace {
bool cpu_has_avx512_variant_features() {
  __builtin_cpu_init();
  // libgcc / compiler-rt also require the OS to save the opmask and zmm state (XCR0) for these
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

bool decide() {
  // SPARSE_MLA_CPU_ISA=baseline keeps the build's own -march kernels (tests run both on one machine)
  const char* forced = getenv("SPARSE_MLA_CPU_ISA");
  if (forced && strcmp(forced, "baseline") == 0) return false;
  return cpu_has_avx512_variant_features();
}
}  // namespace

extern "C" int32_t smla_isa_avx512_active(void) {
  static const bool active = decide();  // once: a call never switches copies midway
  return active ? 1 : 0;
}
#endif
