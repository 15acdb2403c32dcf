#!/usr/bin/env bash
# Times addon builds alternately with the whole GPU bench (or the sections in SPARSE_MLA_GPU_BENCH_ONLY), one
# process per run, a second idle before each: ROUNDS rounds, each running every addon once.
# Usage (on the device, Node on PATH, dist built): bench/experiments/addon-alternate.sh ROUNDS OUTDIR ADDON...
# Writes OUTDIR/bench-<addon file name without .node>-<round>.json and prints each run's paged rows.
set -uo pipefail
rounds=$1 out=$2
shift 2
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for a in "$@"; do
    sleep 1
    name=$(basename "$a" .node)
    SPARSE_MLA_NATIVE_ADDON=$a timeout 300 node dist/cli/main.js bench --backend cuda --repeat 10 --warmup 3 --quiet \
      --out "$out/bench-$name-$r.json" > "$out/bench-$name-$r.log" 2>&1
    rc=$?
    echo "round $r $name: rc $rc $(python3 -c 'import json,re,sys
for x in json.load(open(sys.argv[1]))["results"]:
    m = re.match(r"pagedSparseAttention N (\d+) hQ (\d+)", x["name"])
    if m: print("h%s:%s=%.1f" % (m[2], m[1], x["value"]), end=" ")' "$out/bench-$name-$r.json" 2>/dev/null)"
  done
done
