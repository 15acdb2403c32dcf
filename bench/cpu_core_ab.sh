#!/usr/bin/env bash
# A/B of two smla_core_bench binaries (test/cpp/core_bench.cpp built from two trees), processes
# alternated A B A B ..., single thread. Prints each process's figures, then per figure the median of
# A, the median of B and the median of the pairwise ratios B/A (throughput: > 1 = B faster).
#   bash bench/cpu_core_ab.sh A_BIN B_BIN PAIRS [core_bench args: sQ sKV runs hQ dQK topk]
set -euo pipefail
a=$1 b=$2 pairs=$3
shift 3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for ((i = 0; i < pairs; i++)); do
  "$a" "$@" > "$tmp/a$i"
  "$b" "$@" > "$tmp/b$i"
done
awk -v pairs="$pairs" -v dir="$tmp" 'BEGIN {
  for (i = 0; i < pairs; i++) {
    n = 0
    while ((getline la < (dir "/a" i)) > 0) {
      getline lb < (dir "/b" i)
      n++
      split(la, fa, " "); split(lb, fb, " ")
      label[n] = la; sub(/: median.*/, "", label[n])
      va[n, i] = fa[length(fa) - 1]; vb[n, i] = fb[length(fb) - 1]
    }
    lines = n
  }
  for (n = 1; n <= lines; n++) {
    ra = ""; rb = ""
    for (i = 0; i < pairs; i++) { A[i] = va[n, i]; B[i] = vb[n, i]; R[i] = vb[n, i] / va[n, i]; ra = ra " " A[i]; rb = rb " " B[i] }
    printf "%s\n  A:%s\n  B:%s\n  median A %.2f, median B %.2f, median ratio B/A %.3f\n", label[n], ra, rb, med(A, pairs), med(B, pairs), med(R, pairs)
  }
}
function med(x, k,   i, j, t, y) {
  for (i = 0; i < k; i++) y[i] = x[i]
  for (i = 1; i < k; i++) { t = y[i]; for (j = i - 1; j >= 0 && y[j] > t; j--) y[j + 1] = y[j]; y[j + 1] = t }
  return k % 2 ? y[int(k / 2)] : (y[k / 2 - 1] + y[k / 2]) / 2
}'
