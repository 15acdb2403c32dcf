// Which SIMD path the core's calls take, as the core decides it (cpp/src/isa_dispatch.h: the
// build's -march, its AVX-512 copy, the BF16 dot and SPARSE_MLA_CPU_ISA).
#include "isa_dispatch.h"

namespace smla_addon {
const char* CoreSimdPath() { return smla_isa_simd_path(); }
}  // namespace smla_addon
