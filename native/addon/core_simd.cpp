// Which SIMD path the core's kernels take: this file gets the core's -march flags and reads the
// same header (cpp/src/simd.h) the core's kernels pick their path from; where the core also
// carries its AVX-512 copy (cpp/src/isa_dispatch.h), the copy its calls are handed to.
#include "isa_dispatch.h"
#include "simd.h"

namespace smla_addon {
namespace {
const char* CompiledSimdPath() {
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
}  // namespace

const char* CoreSimdPath() {
#if defined(SMLA_ISA_DISPATCH_AVX512) && !defined(SMLA_SIMD_NO_BF16_DOT)
  // the copy is built with -march=x86-64-v4 -mavx512bf16 (root CMakeLists.txt)
  if (smla_isa_avx512_active()) return "AVX-512+BF16";
#elif defined(SMLA_ISA_DISPATCH_AVX512)
  if (smla_isa_avx512_active()) return "AVX-512";
#endif
  return CompiledSimdPath();
}
}  // namespace smla_addon
