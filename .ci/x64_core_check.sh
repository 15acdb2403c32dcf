#!/usr/bin/env bash
# The C++ core check (test/cpp/core_check.cpp) on x86-64, from the repository root:
#   bash .ci/x64_core_check.sh [x86-64|x86-64-v2|x86-64-v3|native|<any -march> ...]   (default: the first four)
# x86-64 builds the core with -march=x86-64 (SSE2 only: what a source build on a CPU without AVX2
# gets) into build/x64-core-x86-64/ and requires the SSE2 FP8 dequant in the binary (cvtdq2ps,
# packssdw; no ymm register anywhere); x86-64-v2 (the prebuilt SSE addon's level) requires the
# dequant's SSSE3 byte path too (pshufb); x86-64-v3 (the prebuilt AVX2 addon's level) carries a
# second copy of the kernels for AVX-512 (root CMakeLists.txt): zmm registers only inside that
# copy (names smla_avx512...), no symbol of the copy the linker could merge with the baseline's
# (weak, or a global without its own name); native builds it for this machine; any other -march
# (skylake-avx512, icelake-server: AVX-512 without AVX512_BF16) builds for that. Where -march lacks
# AVX512_BF16, its instructions may lie only in the dot routines built for it by a target attribute
# (namespace bf16_dot, cpp/src/sparse_attention_kernel.h). Each build from x86-64-v3 up runs with
# SPARSE_MLA_CPU_ISA unset, =avx512 (AVX-512 without the BF16 dot) and =baseline (the build's own
# -march kernels); core_check checks the path each takes against /proc/cpuinfo.
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
  case "$level" in
    x86-64 | x86-64-v2) isas=(auto) ;;
    *) isas=(auto avx512 baseline) ;;
  esac
  asm=$(objdump -d -C --no-show-raw-insn "$out/smla_core_check")
  if [ "$level" = x86-64-v3 ] && grep -q 'carries its kernels for x86-64-v4' "$out.configure.log"; then
    # every instruction on a zmm register lies in a function of the AVX-512 copy, which the
    # baseline reaches only through its dispatch (cpp/src/isa_dispatch.h)
    outside=$(awk '
      /^[0-9a-f]+ <.*>:$/ { fn = $0; next }
      /%zmm/ && fn !~ /smla_avx512/ { n++; if (!first) first = fn }
      END { printf "%d %s", n, first }' <<< "$asm")
    [ "${outside%% *}" -eq 0 ] || fail "zmm instructions outside the AVX-512 copy in $out/smla_core_check (first in ${outside#* })"
    inside=$(grep -c '%zmm' <<< "$asm" || true)
    [ "$inside" -gt 0 ] || fail "no zmm instruction in $out/smla_core_check although the configure says it carries the AVX-512 copy"
    # the linker keeps one definition of a weak symbol (an inline function, a template, a static
    # of one): one of the copy's would then serve the baseline too. Globals carry the copy's names.
    objs=("$out"/CMakeFiles/sparse_mla_core_avx512.dir/cpp/src/*.o)
    [ -e "${objs[0]}" ] || fail "no object of the AVX-512 copy under $out/CMakeFiles/sparse_mla_core_avx512.dir"
    shared=$(nm --defined-only "${objs[@]}" | awk 'NF == 3 && ($2 ~ /^[WVwvuiu]$/ || ($2 ~ /^[A-Z]$/ && $3 !~ /smla_avx512/)) { print $2, $3 }' | sort -u)
    [ -z "$shared" ] || fail "symbols of the AVX-512 copy the linker may merge with the baseline's: $(head -5 <<< "$shared" | tr '\n' ' ')"
    echo "smla_core_check ($level): $inside zmm instructions, all in the AVX-512 copy; its ${#objs[@]} objects define no weak symbol and no global outside its names"
  fi
  # AVX512_BF16 instructions only in the dot routines built for them, unless -march has them
  # (the macros read whole first: grep -q on a pipe would end the compiler early, a failure under pipefail)
  march_macros=$("${CXX:-c++}" -march="$level" -dM -E -x c++ /dev/null 2>/dev/null || true)
  if ! grep -q __AVX512BF16__ <<< "$march_macros"; then
    bf16=$(awk '
      /^[0-9a-f]+ <.*>:$/ { fn = $0; next }
      /\t(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16) / { if (fn ~ /::cpu::bf16_dot::/) ok++; else { n++; if (!first) first = fn } }
      END { printf "%d %d %s", n, ok, first }' <<< "$asm")
    read -r bad good first <<< "$bf16"
    [ "$bad" -eq 0 ] || fail "$bad AVX512_BF16 instructions outside the bf16_dot routines in $out/smla_core_check (first in $first)"
    if [ "$good" -gt 0 ]; then
      echo "smla_core_check ($level): $good AVX512_BF16 instructions, all in the bf16_dot routines"
    elif [ "$level" = x86-64-v3 ] && grep -q 'carries its kernels for x86-64-v4' "$out.configure.log"; then
      fail "no vdpbf16ps in the AVX-512 copy of $out/smla_core_check"
    fi
  fi
  for isa in "${isas[@]}"; do
    start=$(date +%s%N)
    SPARSE_MLA_CPU_ISA=$isa "$out/smla_core_check"
    echo "core check ($level, SPARSE_MLA_CPU_ISA=$isa): $(( ($(date +%s%N) - start) / 1000000 )) ms"
  done
done
