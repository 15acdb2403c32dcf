// Which SIMD path the core was compiled with: this file gets the core's -march flags and reads the
// same header (cpp/src/simd.h) the core's kernels pick their path from.
#include "simd.h"

namespace smla_addon {
const char* CoreSimdPath() {
// "+BF16" exactly when sparse_attention_kernel.h compiles its vdpbf16ps dot (SMLA_BF16_DOT).
#if defined(SMLA_SIMD_AVX512) && defined(__AVX512BF16__) && !defined(SMLA_SIMD_NO_BF16_DOT)
  return "AVX-512+BF16";
#elif defined(SMLA_SIMD_AVX512)
  return "AVX-512";
#elif defined(SMLA_SIMD_AVX2)
  return "AVX2+FMA";
#elif defined(SMLA_SIMD_NEON)
  return "NEON";
#elif defined(SMLA_SIMD_SSE2)
  return "SSE2";
#else
  return "scalar";
#endif
}
}  // namespace smla_addon
