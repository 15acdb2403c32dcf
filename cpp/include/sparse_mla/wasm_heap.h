/* What the WASM host may read of its module's heap besides the C ABI (sparse_mla.h). Diagnostics
 * for the tests, in the WASM build only: the native addon uses the system's allocator and never
 * calls these. wasm/build.sh exports every smla_* function declared here too. */
#ifndef SPARSE_MLA_WASM_HEAP_H_
#define SPARSE_MLA_WASM_HEAP_H_

#include "sparse_mla/sparse_mla.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__EMSCRIPTEN__)
/* Bytes the allocator (dlmalloc) holds in use, chunk headers included: every live allocation, the
 * host's (smla_malloc) and the core's own scratch alike. It walks the heap's chunks, so it is for
 * diagnostics between calls, never on a call's path. */
SMLA_API size_t smla_heap_bytes_in_use(void);
#endif

#ifdef __cplusplus
}
#endif

#endif /* SPARSE_MLA_WASM_HEAP_H_ */
