#!/usr/bin/env bash
# Builds the standalone CUDA smoke test, sanitizer fuzz and bench program (test/cuda/smla_cuda_check)
# for sm_90a with a static cudart, from every kernel source in native/cuda.
# Usage: native/cuda/build.sh [out_dir] [extra nvcc flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/.cudabuild}"
shift || true
mkdir -p "$out"
NVCC="${NVCC:-nvcc}"
flags=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -cudart=static -lineinfo
       -I"$root/cpp/include" -I"$root/native/cuda" -Xcompiler -fopenmp -Xptxas -v)
srcs=("$root"/native/cuda/*.cu "$root/test/cuda/smla_cuda_check.cu")
"$NVCC" "${flags[@]}" "$@" "${srcs[@]}" -o "$out/smla_cuda_check" -lgomp 2> "$out/ptxas.log" || { cat "$out/ptxas.log"; exit 1; }
grep -E "error|warning|spill|Used [0-9]+ registers" "$out/ptxas.log" | grep -v "0 bytes spill" | sed 's/ptxas info    : //' || true
echo "built $out/smla_cuda_check"
