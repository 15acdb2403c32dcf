#!/usr/bin/env bash
# Builds the standalone CUDA smoke test, sanitizer fuzz and bench program (test/cuda/smla_cuda_check)
# for sm_90a with a static cudart, from every kernel source in native/cuda.
# Usage: native/cuda/build.sh [out_dir] [extra nvcc flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/.cudabuild}"
shift || true
mkdir -p "$out/obj"
NVCC="${NVCC:-nvcc}"
flags=(-O3 -gencode=arch=compute_90a,code=sm_90a -lineinfo -I"$root/cpp/include" -I"$root/native/cuda"
       -Xcompiler -fopenmp -Xptxas -v)
log="$out/ptxas.log"
: > "$log"
# The kernels in C++17, as the addon builds them; the harness in C++20 (it fills the launchers'
# params structs with designated initializers).
kernels=("$root"/native/cuda/*.cu)
objs=()
for k in "${kernels[@]}"; do objs+=("$out/obj/$(basename "${k%.cu}").o"); done
objs+=("$out/obj/smla_cuda_check.o")
"$NVCC" -std=c++17 "${flags[@]}" "$@" -c "${kernels[@]}" -odir "$out/obj" 2>> "$log" || { cat "$log"; exit 1; }
"$NVCC" -std=c++20 "${flags[@]}" "$@" -c "$root/test/cuda/smla_cuda_check.cu" -o "${objs[-1]}" 2>> "$log" || { cat "$log"; exit 1; }
"$NVCC" -gencode=arch=compute_90a,code=sm_90a -cudart=static "${objs[@]}" -o "$out/smla_cuda_check" -lgomp 2>> "$log" || { cat "$log"; exit 1; }
grep -E "error|warning|spill|Used [0-9]+ registers" "$log" | grep -v "0 bytes spill" | sed 's/ptxas info    : //' || true
# ptxas serializes a kernel's wgmma pipeline when other instructions touch its accumulators
# mid-flight (C7514): correct code that runs up to 20% slower, so it fails the build.
if grep -q "C7514" "$log"; then
  grep "C7514" "$log" | sed 's/ptxas info    : //' >&2
  echo "wgmma serialized (C7514): see $log" >&2
  exit 1
fi
echo "built $out/smla_cuda_check"
