// Compile-time switches shared by every build of the core (host C++, WASM, CUDA).
#pragma once

// Per-element and per-row math is marked SMLA_HD so the same function body runs in
// host loops (native, WASM) and inside CUDA kernels.
#if defined(__CUDACC__)
#define SMLA_HD __host__ __device__ __forceinline__
#else
#define SMLA_HD inline
#endif

#if defined(__EMSCRIPTEN__) && defined(__wasm_simd128__)
#define SMLA_WASM_SIMD 1
#endif
