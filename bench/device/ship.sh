#!/usr/bin/env bash
# Builds here (no GPU needed) everything a device call runs, for one or more trees, into
# .cudabuild/ship.tar.xz: per NAME the cuda addon (x86-64-v2 host code), dist/ and, with --harness,
# the standalone harness (test/cuda/smla_cuda_check). NAME alone is the working tree; NAME=REV builds
# commit REV in a temporary worktree (for A/B runs against an older tree). Also packs this machine's
# Node into .gpu/ when it is missing.
# Usage: bench/device/ship.sh [--harness] NAME[=REV]...
# Then: run(command="bash bench/device/remeasure.sh NAME", carry=[".gpu", "node_modules/comlink",
# ".cudabuild/ship.tar.xz"]) — see bench/device/README.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
harness=0
if [[ ${1:-} == --harness ]]; then harness=1; shift; fi
[[ $# -ge 1 ]] || { sed -n 2,9p "$0" >&2; exit 2; }
ship="$root/.cudabuild/ship"
rm -rf "$ship"
mkdir -p "$ship"
[[ -s .gpu/node.xz ]] || bash ../shared/gpu/pack-node.sh .gpu
[[ -s .gpu/unpack-node.sh ]] || cp ../shared/gpu/unpack-node.sh .gpu/
grep -qx '.gpu/' .git/info/exclude || echo '.gpu/' >> .git/info/exclude
for spec in "$@"; do
  name=${spec%%=*}
  rev=""
  [[ $spec == *=* ]] && rev=${spec#*=}
  tree="$root"
  if [[ -n $rev ]]; then
    tree=$(mktemp -d /tmp/ship-tree-XXXX)
    git worktree add -q --detach "$tree" "$rev"
    ln -s "$root/node_modules" "$tree/node_modules"
  fi
  # the commit the bench JSON names (the device's own checkout does not know it)
  if [[ -n $rev ]]; then commit=$(git rev-parse "$rev"); else commit=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty); fi
  echo "$commit" > "$ship/commit_$name"
  echo "== $name: $commit"
  (cd "$tree" && SPARSE_MLA_BUILD_FROM_SOURCE=1 SPARSE_MLA_WITH_CUDA=ON SPARSE_MLA_CPU_ARCH=x86-64-v2 node native/install.mjs > "$ship/build-$name.log" 2>&1) \
    || { tail -20 "$ship/build-$name.log" >&2; exit 1; }
  # install.mjs falls back (exit 0) when a build fails: ship only an addon built now, with CUDA
  grep -q "built the native addon in .*CUDA sm_90a" "$ship/build-$name.log" || { cat "$ship/build-$name.log" >&2; exit 1; }
  cp "$tree/build/addon/Release/sparse_mla_native.node" "$ship/addon_$name.node"
  (cd "$tree" && "$root/node_modules/.bin/tsc" -p tsconfig.json --outDir "$ship/dist_$name")
  if [[ $harness == 1 ]]; then
    bash "$tree/native/cuda/build.sh" "$ship/harness_$name" > "$ship/harness-$name.log" 2>&1 || { tail -20 "$ship/harness-$name.log" >&2; exit 1; }
    rm -rf "$ship/harness_$name/obj"
  fi
  if [[ -n $rev ]]; then
    rm -f "$tree/node_modules"
    git worktree remove --force "$tree"
  fi
done
# the bench scripts as committed now (a helper's uncommitted edit in the working tree cannot break a run)
git archive HEAD bench ':(exclude)bench/results' | tar -x -C "$ship"
tar cJf "$root/.cudabuild/ship.tar.xz" -C "$ship" .
echo "$root/.cudabuild/ship.tar.xz: $(du -h "$root/.cudabuild/ship.tar.xz" | cut -f1) ($*)"
