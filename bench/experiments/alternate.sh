#!/usr/bin/env bash
# Times harness builds alternately, process by process (the method of docs/perf-history.md since the
# seventeenth session): ROUNDS rounds, each running every binary once with the device idle a second
# before it; prints one line a run with the row values of `smla_cuda_check bench` (the first value
# is the device-to-device copy's GB/s).
# Usage: bench/experiments/alternate.sh ROUNDS FILTER BINARY...   (FILTER: SMLA_BENCH_FILTER, e.g. "sQ4096")
# Rows of long launches (the sQ 32K prefill rows, V3.2) can step down mid-row when the H200's power cap
# lowers its clock (docs/perf-history.md, thirty-third session); SMLA_BENCH_GAP_MS=100 in the environment
# idles the device before each run so every run sees the full clock (short rows then pay a ramp), and
# SMLA_BENCH_PRINT_RUNS=1 shows each row's runs in order.
set -uo pipefail
rounds=$1 filter=$2
shift 2
for r in $(seq "$rounds"); do
  for b in "$@"; do
    sleep 1
    v=$(SMLA_BENCH_FILTER="$filter" timeout 120 "$b" bench --reps 10 2>&1 | grep -E "TFLOPS|GB/s" | awk '{print $(NF-1)}' | tr '\n' ' ')
    echo "round $r $(basename "$(dirname "$b")")/$(basename "$b"): $v"
  done
done
