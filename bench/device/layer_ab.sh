#!/usr/bin/env bash
# On the device: the GPU bench's layer section (SPARSE_MLA_GPU_BENCH_ONLY=layer) for two or more shipped trees,
# alternated process by process, ROUNDS rounds (each tree once a round, a second idle before each run), so every
# tree sees the same machine start and the host's swings alike. Prints each run's c4 layer ratios.
# Usage (repository root, after bench/device/ship.sh NAME1 NAME2 ...): bash bench/device/layer_ab.sh ROUNDS NAME1 NAME2 ...
# Files: $OUT/bench-cuda-layer-NAME-ROUND.json (the device tool brings back at most 8 files: more go back as one
# archive layer-ab.tgz).
set -uo pipefail
rounds=$1
shift
out=${OUT:-$PWD/device-out}
mkdir -p "$out" .cudabuild
(cd .cudabuild && tar xJf ship.tar.xz) || { echo "no .cudabuild/ship.tar.xz: carry it" >&2; exit 1; }
ship=$PWD/.cudabuild
export PATH=$(bash .gpu/unpack-node.sh .gpu):$PATH
cp -r "$ship/bench/." bench/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > "$out/gpu-layer-ab.csv" 2>&1
for r in $(seq "$rounds"); do
  for name in "$@"; do
    rm -rf dist && cp -r "$ship/dist_$name" dist
    sleep 1
    f="$out/bench-cuda-layer-$name-$r.json"
    SPARSE_MLA_GPU_BENCH_ONLY=layer SPARSE_MLA_NATIVE_ADDON=$ship/addon_$name.node SPARSE_MLA_COMMIT=$(cat "$ship/commit_$name") \
      timeout 200 node dist/cli/main.js bench --backend cuda --repeat 10 --warmup 3 --quiet --out "$f" > "${f%.json}.log" 2>&1
    echo "round $r $name: rc $? $(python3 -c 'import json,sys
for x in json.load(open(sys.argv[1]))["results"]:
    if x["name"].startswith("prefillLayer c4"): print("%s=%.3f" % (x["name"].split(",")[0].replace("prefillLayer c4 ", "").replace(" queries", ""), x["value"]), end="  ")' "$f" 2>/dev/null)"
  done
done
made=("$out"/*)
if (( ${#made[@]} > 8 )); then
  (cd "$out" && tar czf ../layer-ab.tgz -- * && rm -f -- * && mv ../layer-ab.tgz .)
  echo "${#made[@]} files: packed into $out/layer-ab.tgz"
fi
exit 0
