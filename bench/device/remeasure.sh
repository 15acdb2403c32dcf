#!/usr/bin/env bash
# On the device: the re-measure a tree needs before its numbers are quoted, in one call (~6 min):
# two whole GPU benches, `check --backend cuda`, the layer paths' wall clock and, where the ship has
# NAME's harness, its check and a memcheck of its fuzz. Every file lands in $OUT (or ./device-out), as one
# archive remeasure-NAME.tgz when there are more than 8 (what the device tool brings back).
# Usage (repository root, after bench/device/ship.sh [--harness] NAME): bash bench/device/remeasure.sh NAME [STEPS]
# STEPS: comma list of bench,bench2,check,layer,harness (default) and, only when named, fuzz (75 s of the
# API fuzzer on the cuda backend, test/fuzz/run.mjs, against this tree's test/fuzz), memcheck (150 s of its
# cases in one process under compute-sanitizer's memcheck, bench/device/fuzz_in_process.mjs) and dropped (short c4
# layers with prefillLayer's { dropped: 'later' } against the default, bench/layer_paths_wall.mjs, about 2 min).
set -uo pipefail
name=$1 steps=${2:-bench,bench2,check,layer,harness}
out=${OUT:-$PWD/device-out}
mkdir -p "$out" .cudabuild
(cd .cudabuild && tar xJf ship.tar.xz) || { echo "no .cudabuild/ship.tar.xz: carry it" >&2; exit 1; }
ship=$PWD/.cudabuild
[[ -f $ship/addon_$name.node ]] || { echo "no addon_$name.node in the ship" >&2; exit 1; }
export PATH=$(bash .gpu/unpack-node.sh .gpu):$PATH
rm -rf dist && cp -r "$ship/dist_$name" dist
cp -r "$ship/bench/." bench/
export SPARSE_MLA_NATIVE_ADDON=$ship/addon_$name.node
export SPARSE_MLA_COMMIT=$(cat "$ship/commit_$name")
want() { [[ ,$steps, == *,$1,* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > "$out/gpu-$name.csv" 2>&1
t0=$(date +%s)
for k in 1 2; do
  want bench$([[ $k == 2 ]] && echo 2) || continue
  sleep 1
  timeout 200 node dist/cli/main.js bench --backend cuda --repeat 10 --warmup 3 --quiet --out "$out/bench-cuda-$name-$k.json" > "$out/bench-cuda-$name-$k.log" 2>&1
  echo "bench $k: rc $? ($(( $(date +%s) - t0 )) s)"
done
if want check; then
  timeout 200 node dist/cli/main.js check --backend cuda > "$out/check-cuda-$name.txt" 2>&1
  echo "check: rc $? $(grep -E 'passed|failed' "$out/check-cuda-$name.txt" | tail -1) ($(( $(date +%s) - t0 )) s)"
fi
if want layer; then
  timeout 150 node bench/layer_paths_wall.mjs 5 20 --out "$out/layer-paths-wall-$name.json" > "$out/layer-paths-wall-$name.txt" 2>&1
  echo "layer paths: rc $? ($(( $(date +%s) - t0 )) s)"
fi
if want harness && [[ -x $ship/harness_$name/smla_cuda_check ]]; then
  timeout 60 "$ship/harness_$name/smla_cuda_check" > "$out/harness-check-$name.txt" 2>&1
  echo "harness check: rc $? $(tail -1 "$out/harness-check-$name.txt") ($(( $(date +%s) - t0 )) s)"
  timeout 120 compute-sanitizer --tool memcheck "$ship/harness_$name/smla_cuda_check" fuzz > "$out/memcheck-fuzz-$name.txt" 2>&1
  echo "memcheck fuzz: rc $? $(grep -E 'ERROR SUMMARY' "$out/memcheck-fuzz-$name.txt" | tail -1) ($(( $(date +%s) - t0 )) s)"
fi
if want dropped; then
  # short c4 layers with the dropped total awaited (the default) and read later ({ dropped: 'later' }), alternated twice
  for r in 1 2; do
    for m in await later; do
      d=""; [[ $m == later ]] && d=later
      DROPPED=$d RATIOS=4 NS=16,64,256,1024 timeout 100 node bench/layer_paths_wall.mjs 5 20 --out "$out/layer-c4-dropped-$m-$name-$r.json" > "$out/layer-c4-dropped-$m-$name-$r.txt" 2>&1
      echo "c4 layers, dropped $m, run $r: rc $? ($(( $(date +%s) - t0 )) s)"
    done
  done
fi
if want memcheck; then
  # the fuzzer's cases in one process (compute-sanitizer does not follow the runner's forked children)
  timeout 240 compute-sanitizer --tool memcheck --print-limit 20 node bench/device/fuzz_in_process.mjs test/fuzz "${FUZZ_SEED:-3}" 150 > "$out/memcheck-fuzz-api-$name.txt" 2>&1
  echo "memcheck API fuzz: rc $? $(grep -E 'ERROR SUMMARY' "$out/memcheck-fuzz-api-$name.txt" | tail -1) $(grep -o '"exit":[0-9]*,"cases":[0-9]*' "$out/memcheck-fuzz-api-$name.txt" | tail -1) ($(( $(date +%s) - t0 )) s)"
fi
if want fuzz; then
  timeout 110 node test/fuzz/run.mjs --backends cuda --seconds 75 --seed "${FUZZ_SEED:-3}" --json > "$out/fuzz-cuda-$name.json" 2> "$out/fuzz-cuda-$name.log"
  echo "fuzz: rc $? $(tail -c 300 "$out/fuzz-cuda-$name.json" | tr '\n' ' ') ($(( $(date +%s) - t0 )) s)"
fi
shopt -s nullglob
benches=("$out"/bench-cuda-"$name"-*.json)
[[ ${#benches[@]} -gt 0 ]] && python3 bench/device/against_flashmla.py "${benches[@]}"
# the device tool brings back at most 8 files from $OUT: more than that go back as one archive
made=("$out"/*)
if (( ${#made[@]} > 8 )); then
  (cd "$out" && tar czf "../remeasure-$name.tgz" -- * && rm -f -- * && mv "../remeasure-$name.tgz" .)
  echo "${#made[@]} files: packed into $out/remeasure-$name.tgz (the device tool returns at most 8; unpack with tar xzf)"
fi
exit 0
