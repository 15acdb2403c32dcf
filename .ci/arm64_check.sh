#!/usr/bin/env bash
# The linux-arm64 build, checked on an x86-64 machine under emulation (qemu-user), from the
# repository root:
#   bash .ci/arm64_check.sh core
#       cross-builds test/cpp/core_check.cpp with aarch64-linux-gnu-g++ -march=armv8-a (the NEON
#       path of cpp/src/simd.h and kv_cache.cpp, which the build must show: vector fmla and the
#       dequant's float16 fcvtl in the binary) into build/arm64-core/ and runs it with qemu-aarch64.
#       Needs g++-aarch64-linux-gnu, qemu-user.
#   bash .ci/arm64_check.sh addon FILE.node [check options]
#       loads the linux-arm64 addon FILE in an arm64 node under qemu-aarch64 and runs this
#       checkout's `sparse-mla check --backend cpu` on it (every result against the float64
#       reference and the WASM backend, SPEC §4 bounds; about 38 min emulated: `--only dequant`
#       runs its 4 dequant cases, `--only paged` its 6 paged ones). The arm64 node is Debian's
#       nodejs:arm64 (18: enough for a Node-API 8 addon), fetched with apt-get download and unpacked with dpkg -x
#       into build/arm64-node/, never installed (it would replace this machine's node). Needs
#       `dpkg --add-architecture arm64 && apt-get update` once, and qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "arm64 check: $*" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null 2>&1 || fail "qemu-aarch64 not found (apt-get install qemu-user)"

case "${1:-}" in
core)
  command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || fail "aarch64-linux-gnu-g++ not found (apt-get install g++-aarch64-linux-gnu)"
  out=build/arm64-core
  cmake -S . -B "$out" -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DSMLA_CPU_ARCH=armv8-a -DCMAKE_BUILD_TYPE=Release > "$out.configure.log" 2>&1 || { cat "$out.configure.log"; fail "configure failed"; }
  cmake --build "$out" --target smla_core_check --parallel "$(nproc)" > "$out.build.log" 2>&1 || { tail -30 "$out.build.log"; fail "build failed"; }
  # the kernels run on 4-lane fused multiply-adds (simd.h's NEON madd), not scalar code
  fmla=$(aarch64-linux-gnu-objdump -d "$out/smla_core_check" | grep -cE $'\tfmla\tv[0-9]+\\.4s' || true)
  [ "$fmla" -gt 0 ] || fail "no vector fmla in $out/smla_core_check: the NEON path was not compiled"
  # the FP8 dequant runs on NEON too (kv_cache.cpp: e4m3 -> float16 bits -> fcvtl), not the scalar loop
  fcvtl=$(aarch64-linux-gnu-objdump -d "$out/smla_core_check" | grep -cE $'\tfcvtl2?\tv[0-9]+\\.4s, v[0-9]+\\.[48]h' || true)
  [ "$fcvtl" -gt 0 ] || fail "no float16 -> float32 fcvtl in $out/smla_core_check: the NEON FP8 dequant was not compiled"
  echo "smla_core_check (aarch64, armv8-a): $fmla vector fmla, $fcvtl fcvtl (FP8 dequant) instructions"
  start=$(date +%s%N)
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$out/smla_core_check"
  echo "core check under qemu-aarch64: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  ;;
addon)
  addon=$(readlink -f "${2:?usage: arm64_check.sh addon FILE.node [check options]}")
  shift 2
  root=build/arm64-node
  if [ ! -x "$root/usr/bin/node" ]; then
    dpkg --print-foreign-architectures | grep -qx arm64 || fail "apt has no arm64 packages (dpkg --add-architecture arm64 && apt-get update)"
    mkdir -p "$root/debs"
    # nodejs:arm64 and everything it depends on, as arm64 packages, plus the architecture-independent
    # node-* libraries Debian's node loads its externalized builtins from (acorn, cjs-module-lexer,
    # undici in /usr/share/nodejs); a local index query, nothing is installed
    pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances nodejs:arm64 |
      grep -E '^[a-z0-9][^ ]*:arm64$|^    node-[a-z0-9.-]+$' | sed 's/^ *//' | sort -u)
    (cd "$root/debs" && apt-get download $pkgs > download.log 2>&1) || { cat "$root/debs/download.log"; fail "apt-get download failed"; }
    for deb in "$root"/debs/*.deb; do dpkg -x "$deb" "$root"; done
    [ -x "$root/usr/bin/node" ] || fail "no usr/bin/node in the unpacked nodejs:arm64"
  fi
  node=(qemu-aarch64 -L "$(readlink -f "$root")" "$(readlink -f "$root")/usr/bin/node")
  echo "arm64 node: $("${node[@]}" --version) ($("${node[@]}" -p process.arch))"
  export SPARSE_MLA_NATIVE_ADDON="$addon"
  "${node[@]}" dist/cli/main.js info --json | "${node[@]}" -e '
    let t = ""; process.stdin.on("data", (d) => (t += d)).on("end", () => {
      const info = JSON.parse(t), cpu = info.backends.find((b) => b.name === "cpu");
      if (!cpu.available) { console.error(`cpu unavailable: ${cpu.reason}`); process.exit(1); }
      console.log(`info: cpu available (${cpu.details.simd}, ${cpu.details.cpuArch}), addon ${info.addon.path}`);
    });' || fail "the addon does not load in the arm64 node"
  start=$(date +%s%N)
  "${node[@]}" dist/cli/main.js check --backend cpu "$@" || fail "sparse-mla check --backend cpu on the arm64 addon"
  echo "check --backend cpu under qemu-aarch64: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  ;;
*)
  fail "usage: arm64_check.sh core | addon FILE.node [check options]"
  ;;
esac
