#!/usr/bin/env bash
# Builds wasm/sparse_mla.wasm: the C++ core as a standalone WebAssembly module (SIMD128) that the
# TS facade instantiates itself. Reference toolchain: Debian's Emscripten 3.1.6. The output is
# committed and must be byte-identical to a rebuild (CI compares).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's emscripten needs its node modules for optimized (-O2+) links.
export NODE_PATH="${NODE_PATH:-/usr/share/nodejs}"

EXPORTS='["_smla_abi_version","_smla_malloc","_smla_free","_smla_quantize_kv_cache","_smla_dequantize_kv_cache","_smla_sparse_prefill","_smla_paged_sparse_attention"]'

SOURCES=(
  cpp/src/c_api.cpp
  cpp/src/kv_cache.cpp
  cpp/src/sparse_prefill.cpp
  cpp/src/paged_sparse_attention.cpp
)

OUT=wasm/sparse_mla.wasm
TMP=wasm/sparse_mla.tmp.wasm

em++ -std=c++17 -O3 -msimd128 -fno-exceptions -fno-rtti \
  -Icpp/include -Icpp/src \
  "${SOURCES[@]}" \
  --no-entry -sSTANDALONE_WASM \
  -sEXPORTED_FUNCTIONS="$EXPORTS" \
  -sALLOW_MEMORY_GROWTH=1 -sINITIAL_MEMORY=16MB -sMAXIMUM_MEMORY=4GB \
  -sFILESYSTEM=0 -sMALLOC=dlmalloc -sDISABLE_EXCEPTION_CATCHING=1 \
  -sTOTAL_STACK=1MB -sASSERTIONS=0 -g0 \
  -o "$TMP"

# Keep exactly the smla_* functions and memory as exports. Emscripten also exports _initialize
# (empty here: dlmalloc initializes lazily, the core has no static constructors), the function
# table and stack helpers; the host needs none of them, so wasm-metadce drops them.
GRAPH=wasm/exports.tmp.json
{
  echo '[{"name":"memory","root":true,"export":"memory"}'
  for f in $(echo "$EXPORTS" | tr -d '[]"' | tr ',' ' '); do
    echo ",{\"name\":\"${f#_}\",\"root\":true,\"export\":\"${f#_}\"}"
  done
  for f in __indirect_function_table _initialize __errno_location stackSave stackRestore stackAlloc; do
    echo ",{\"name\":\"$f\",\"export\":\"$f\"}"
  done
  echo ']'
} > "$GRAPH"
wasm-metadce --enable-simd --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
  --enable-nontrapping-float-to-int --graph-file "$GRAPH" "$TMP" -o "$OUT" > /dev/null
rm -f "$TMP" "$GRAPH"
echo "built $OUT ($(stat -c %s "$OUT") bytes)"
