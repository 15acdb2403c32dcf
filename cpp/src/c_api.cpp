// The small parts of the C ABI that belong to no op: version and the heap the WASM host uses.
#include <stdlib.h>

#include "sparse_mla/sparse_mla.h"
#include "sparse_mla/wasm_heap.h"

#if defined(__EMSCRIPTEN__)
#include <malloc.h>
#endif

extern "C" SMLA_API int32_t smla_abi_version(void) { return SMLA_ABI_VERSION; }

// 16-byte aligned so that every typed-array view the host makes (up to BigInt64Array) is aligned.
extern "C" SMLA_API void* smla_malloc(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 16, bytes ? bytes : 1) != 0) return nullptr;
  return p;
}

extern "C" SMLA_API void smla_free(void* ptr) { free(ptr); }

#if defined(__EMSCRIPTEN__)
// The standalone WASM build grows its memory itself (memory.grow); libc then tells the host through
// this hook, which a JS glue would use to refresh its views. Our host re-creates its typed-array
// views after every call, so the hook is defined here as a no-op and the module imports nothing.
extern "C" void emscripten_notify_memory_growth(size_t memory_index) { (void)memory_index; }

// dlmalloc's own count (mallinfo's uordblks: its footprint less its free chunks), so a block left
// allocated anywhere in the module shows, not only the host's. The header declares it int; it is
// a size_t in dlmalloc, 4 bytes either way in wasm32.
extern "C" SMLA_API size_t smla_heap_bytes_in_use(void) { return static_cast<unsigned>(mallinfo().uordblks); }
#endif
