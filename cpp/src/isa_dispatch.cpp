// The load-time choices of cpp/src/isa_dispatch.h; compiled for the build's -march only (never in
// the AVX-512 copy), so the simd.h path seen here is the baseline's.
#include "isa_dispatch.h"

#include "simd.h"

#if !defined(__wasm__)
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace {
enum class IsaOverride { kAuto, kAvx512, kBaseline };

IsaOverride isa_override() {
  const char* forced = getenv("SPARSE_MLA_CPU_ISA");
  if (forced && strcmp(forced, "baseline") == 0) return IsaOverride::kBaseline;
  if (forced && strcmp(forced, "avx512") == 0) return IsaOverride::kAvx512;
  return IsaOverride::kAuto;
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512 F/CD/BW/DQ/VL (x86-64-v4). libgcc / compiler-rt also require the OS to save the opmask
// and zmm state (XCR0) for these.
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

// AVX512_BF16 is CPUID leaf 7 sub-leaf 1, EAX bit 5, read here directly: GCC learned
// __builtin_cpu_supports("avx512bf16") later than the target attribute the dot is built with.
bool cpu_has_avx512_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return cpu_has_avx512() && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u);
}
#endif

#if defined(SMLA_ISA_BF16_DOT_BUILDABLE)
bool decide_bf16_dot() {
  const IsaOverride forced = isa_override();
  if (forced == IsaOverride::kAvx512) return false;
#if defined(__AVX512BF16__)
  return true;  // -march has it: so does every CPU this build runs on
#else
  return forced != IsaOverride::kBaseline && cpu_has_avx512_bf16();
#endif
}
#endif

// The AVX-512 kernels' name: "+BF16" exactly when they take the vdpbf16ps dot.
[[maybe_unused]] const char* avx512_path() {
#if defined(SMLA_ISA_BF16_DOT_BUILDABLE)
  if (smla_isa_bf16_dot_active()) return "AVX-512+BF16";
#endif
  return "AVX-512";
}
}  // namespace

extern "C" {
#if defined(SMLA_ISA_DISPATCH_AVX512) && !defined(SMLA_ISA_VARIANT_AVX512)
int32_t smla_isa_avx512_active(void) {
  // once: a call never switches copies midway
  static const bool active = isa_override() != IsaOverride::kBaseline && cpu_has_avx512();
  return active ? 1 : 0;
}
#endif

#if defined(SMLA_ISA_BF16_DOT_BUILDABLE)
int32_t smla_isa_bf16_dot_active(void) {
  static const bool active = decide_bf16_dot();
  return active ? 1 : 0;
}
#endif

const char* smla_isa_simd_path(void) {
#if defined(SMLA_ISA_DISPATCH_AVX512) && !defined(SMLA_ISA_VARIANT_AVX512)
  if (smla_isa_avx512_active()) {
#if defined(SMLA_SIMD_NO_AVX512)
    return "AVX2+FMA";  // the copy then takes simd.h's AVX2 path too
#else
    return avx512_path();
#endif
  }
#endif
#if defined(SMLA_SIMD_AVX512)
  return avx512_path();
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
}  // extern "C"
#endif  // !__wasm__
