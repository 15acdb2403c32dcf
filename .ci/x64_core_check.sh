#!/usr/bin/env bash
# The C++ core check (test/cpp/core_check.cpp) on x86-64, from the repository root:
#   bash .ci/x64_core_check.sh [x86-64|x86-64-v2|x86-64-v3|native ...]     (default: all four)
# x86-64 builds the core with -march=x86-64 (SSE2 only: what a source build on a CPU without AVX2
# gets) into build/x64-core-x86-64/ and requires the SSE2 FP8 dequant in the binary (cvtdq2ps,
# packssdw; no ymm register anywhere); x86-64-v2 (the prebuilt SSE addon's level) requires the
# dequant's SSSE3 byte path too (pshufb); x86-64-v3 (the prebuilt AVX2 addon's level) carries a
# second copy of the kernels for AVX-512 (root CMakeLists.txt): zmm registers only inside that
# copy (names smla_avx512...), and the check runs twice, with the copy where this CPU has AVX-512
# and with SPARSE_MLA_CPU_ISA=baseline; native builds it for this machine. Each build then runs.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "x64 core check: $*" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || fail "not an x86-64 machine ($(uname -m))"
levels=("$@")
((${#levels[@]})) || levels=(x86-64 x86-64-v2 x86-64-v3 native)
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
  isas=(auto)
  if [ "$level" = x86-64-v3 ] && grep -q 'carries its kernels for x86-64-v4' "$out.configure.log"; then
    # every instruction on a zmm register lies in a function of the AVX-512 copy, which the
    # baseline reaches only through its dispatch (cpp/src/isa_dispatch.h)
    outside=$(objdump -d -C --no-show-raw-insn "$out/smla_core_check" | awk '
      /^[0-9a-f]+ <.*>:$/ { fn = $0; next }
      /%zmm/ && fn !~ /smla_avx512/ { n++; if (!first) first = fn }
      END { printf "%d %s", n, first }')
    [ "${outside%% *}" -eq 0 ] || fail "zmm instructions outside the AVX-512 copy in $out/smla_core_check (first in ${outside#* })"
    inside=$(objdump -d --no-show-raw-insn "$out/smla_core_check" | grep -c '%zmm' || true)
    [ "$inside" -gt 0 ] || fail "no zmm instruction in $out/smla_core_check although the configure says it carries the AVX-512 copy"
    echo "smla_core_check ($level): $inside zmm instructions, all in the AVX-512 copy"
    isas=(auto baseline)
  fi
  for isa in "${isas[@]}"; do
    start=$(date +%s%N)
    SPARSE_MLA_CPU_ISA=$isa "$out/smla_core_check"
    echo "core check ($level, SPARSE_MLA_CPU_ISA=$isa): $(( ($(date +%s%N) - start) / 1000000 )) ms"
  done
done
