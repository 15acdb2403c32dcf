#!/usr/bin/env bash
# Runs test/cpp/core_check.cpp against the WASM SIMD128 build of the core (the same code paths as
# wasm/sparse_mla.wasm) under node. The native build runs through CMake: ./build/smla_core_check.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
export NODE_PATH="${NODE_PATH:-/usr/share/nodejs}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# C++20 for the check's designated initializers (the core compiles as C++17 and C++20 alike).
em++ -std=c++20 -O3 -msimd128 -fno-exceptions -Icpp/include -Icpp/src cpp/src/*.cpp test/cpp/core_check.cpp \
  -sALLOW_MEMORY_GROWTH=1 -sMAXIMUM_MEMORY=4GB -sENVIRONMENT=node -o "$WORK/core_check.js"
# Node 20's global fetch confuses Emscripten 3.1.6's loader; read the .wasm from disk instead.
node --no-experimental-fetch "$WORK/core_check.js"
