#!/usr/bin/env bash
# One launch of the paged kernel under ncu per harness build: where its memory traffic goes (the L2 hit
# rate, DRAM bytes read and written, the SM and memory throughputs), to compare a build with another, e.g.
# main against -DSMLA_DIAG_NO_OSTORE (bench/experiments/paged-o-store-policies.patch).
# Usage: bench/experiments/paged-ncu-memory.sh FILTER BINARY...   (FILTER: SMLA_BENCH_FILTER, one paged row,
# e.g. "h128 fm128+1024"); the third launch of the row is profiled, at the device's own clock.
set -uo pipefail
filter=$1
shift
for b in "$@"; do
  echo "== $(basename "$(dirname "$b")"): $filter"
  SMLA_BENCH_FILTER="$filter" timeout 300 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_write.sum \
    -k regex:paged_attention -s 2 -c 1 "$b" bench --reps 3 2>&1 |
    grep -E "Duration|SM Frequency|DRAM Throughput|L2 Hit Rate|L2 Cache Throughput|Compute \(SM\)|Mem Busy|dram__bytes|lts__t_sectors" |
    sed -E 's/ +/ /g'
done
