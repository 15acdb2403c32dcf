#!/usr/bin/env bash
# Builds the C++ core (cpp/src/*.cpp) as a standalone WebAssembly module (SIMD128) that the TS
# facade instantiates itself: no imports; exports are `memory` and exactly the smla_* functions
# declared in cpp/include/sparse_mla/sparse_mla.h (the C ABI) and wasm_heap.h (the WASM build's
# heap diagnostics). Reference toolchain: Debian's Emscripten 3.1.6.
# The output is committed and must be byte-identical to a rebuild (CI compares).
#
# usage: bash wasm/build.sh [output.wasm]     (default: wasm/sparse_mla.wasm)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/wasm/sparse_mla.wasm}")"
cd "$ROOT"

# Debian's emscripten needs its node modules for optimized (-O2+) links.
export NODE_PATH="${NODE_PATH:-/usr/share/nodejs}"
export LC_ALL=C

# Every smla_* function of the C ABI header and of the WASM heap diagnostics is exported.
FUNCS=$(cat cpp/include/sparse_mla/sparse_mla.h cpp/include/sparse_mla/wasm_heap.h |
  grep -oE 'SMLA_API[^(]*\bsmla_[a-z0-9_]+\(' |
  grep -oE 'smla_[a-z0-9_]+' | sort -u)
EXPORTS="[$(for f in $FUNCS; do printf '"_%s",' "$f"; done | sed 's/,$//')]"
SOURCES=$(ls cpp/src/*.cpp | sort)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# -O3 -msimd128: the SIMD128 kernels. dlmalloc initializes lazily, so the module has no static
# constructors and needs no _initialize call. No filesystem, exceptions or RTTI.
em++ -std=c++17 -O3 -msimd128 -fno-exceptions -fno-rtti \
  -Icpp/include -Icpp/src \
  $SOURCES \
  --no-entry -sSTANDALONE_WASM \
  -sEXPORTED_FUNCTIONS="$EXPORTS" \
  -sALLOW_MEMORY_GROWTH=1 -sINITIAL_MEMORY=16MB -sMAXIMUM_MEMORY=4GB \
  -sFILESYSTEM=0 -sMALLOC=dlmalloc -sDISABLE_EXCEPTION_CATCHING=1 \
  -sTOTAL_STACK=1MB -sASSERTIONS=0 -g0 \
  -o "$WORK/linked.wasm"

# Keep exactly `memory` and the smla_* functions as exports. Emscripten also exports _initialize
# (empty here), the function table and stack helpers; the host needs none, so wasm-metadce drops them.
{
  echo '[{"name":"memory","root":true,"export":"memory"}'
  for f in $FUNCS; do echo ",{\"name\":\"$f\",\"root\":true,\"export\":\"$f\"}"; done
  for f in __indirect_function_table _initialize __errno_location stackSave stackRestore stackAlloc; do
    echo ",{\"name\":\"$f\",\"export\":\"$f\"}"
  done
  echo ']'
} > "$WORK/graph.json"
wasm-metadce --enable-simd --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
  --enable-nontrapping-float-to-int --graph-file "$WORK/graph.json" "$WORK/linked.wasm" \
  -o "$WORK/out.wasm" > /dev/null
mkdir -p "$(dirname "$OUT")"
cp "$WORK/out.wasm" "$OUT"
echo "built $OUT ($(stat -c %s "$OUT") bytes)"
