#!/usr/bin/env bash
# The C++ core check (test/cpp/core_check.cpp) on x86-64, from the repository root:
#   bash .ci/x64_core_check.sh [x86-64|x86-64-v2|native ...]     (default: all three)
# x86-64 builds the core with -march=x86-64 (SSE2 only: what a source build on a CPU without AVX2
# gets) into build/x64-core-x86-64/ and requires the SSE2 FP8 dequant in the binary (cvtdq2ps,
# packssdw; no ymm register anywhere); x86-64-v2 (the prebuilt SSE addon's level) requires the
# dequant's SSSE3 byte path too (pshufb); native builds it for this machine. Each build then runs.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "x64 core check: $*" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || fail "not an x86-64 machine ($(uname -m))"
levels=("$@")
((${#levels[@]})) || levels=(x86-64 x86-64-v2 native)
for level in "${levels[@]}"; do
  out=build/x64-core-$level
  cmake -S . -B "$out" -DSMLA_CPU_ARCH="$level" -DCMAKE_BUILD_TYPE=Release > "$out.configure.log" 2>&1 || { cat "$out.configure.log"; fail "configure failed ($level)"; }
  cmake --build "$out" --target smla_core_check --parallel "$(nproc)" > "$out.build.log" 2>&1 || { tail -30 "$out.build.log"; fail "build failed ($level)"; }
  if [ "$level" = x86-64 ] || [ "$level" = x86-64-v2 ]; then
    asm=$(objdump -d --no-show-raw-insn "$out/smla_core_check")
    ymm=$(grep -c '%ymm' <<< "$asm" || true)
    [ "$ymm" -eq 0 ] || fail "$ymm instructions on ymm registers in $out/smla_core_check: not an SSE2-only build"
    # the dequant's SSE2 path: e4m3 subnormals through cvtdq2ps, bf16 halves packed with packssdw
    cvt=$(grep -cE $'\tcvtdq2ps ' <<< "$asm" || true)
    pack=$(grep -cE $'\tpackssdw ' <<< "$asm" || true)
    [ "$cvt" -gt 0 ] && [ "$pack" -gt 0 ] || fail "no cvtdq2ps / packssdw in $out/smla_core_check: the SSE2 FP8 dequant was not compiled"
    if [ "$level" = x86-64-v2 ]; then
      shuf=$(grep -cE $'\tpshufb ' <<< "$asm" || true)
      [ "$shuf" -gt 0 ] || fail "no pshufb in $out/smla_core_check: the SSSE3 FP8 dequant was not compiled"
      echo "smla_core_check ($level, SSE2 + SSSE3): $cvt cvtdq2ps, $pack packssdw, $shuf pshufb (FP8 dequant), no ymm"
    else
      echo "smla_core_check ($level, SSE2): $cvt cvtdq2ps, $pack packssdw (FP8 dequant), no ymm"
    fi
  fi
  start=$(date +%s%N)
  "$out/smla_core_check"
  echo "core check ($level): $(( ($(date +%s%N) - start) / 1000000 )) ms"
done
