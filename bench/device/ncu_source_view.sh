#!/usr/bin/env bash
# On the device: does Nsight Compute map an addon's kernels back to their source lines? The addon's
# line tables name package-relative files (native/build_tools.mjs scrubBuildTree), so a profile
# taken from the package root, or with --source-folders pointing at it, should show the CUDA source
# beside the SASS. Profiles one launch of a sparse-mla kernel run by `sparse-mla run`, then prints
# the report's source page (CUDA view) and says whether it holds lines of native/cuda/*.cuh.
# Usage (repository root, after bench/device/ship.sh NAME; ship unpacked by remeasure.sh or here):
#   bash bench/device/ncu_source_view.sh NAME
set -uo pipefail
name=$1
out=${OUT:-$PWD/device-out}
mkdir -p "$out" .cudabuild
[[ -f .cudabuild/addon_$name.node ]] || (cd .cudabuild && tar xJf ship.tar.xz) || { echo "no ship: carry .cudabuild/ship.tar.xz" >&2; exit 1; }
export PATH=$(bash .gpu/unpack-node.sh .gpu):$PATH
rm -rf dist && cp -r ".cudabuild/dist_$name" dist
export SPARSE_MLA_NATIVE_ADDON=$PWD/.cudabuild/addon_$name.node
rep=$out/ncu-source-$name
timeout 150 ncu --import-source yes --section SourceCounters -k 'regex:sparse|paged|attention' -c 1 -f -o "$rep" \
  node dist/cli/main.js run --backend cuda --queries 256 --section prefill > "$out/ncu-source-$name.log" 2>&1
echo "profile: rc $?"
for view in cuda cuda,sass; do
  timeout 60 ncu -i "$rep.ncu-rep" --page source --print-source "$view" --csv > "$out/ncu-source-$name-${view/,/-}.csv" 2> "$out/ncu-source-$name-${view/,/-}.err"
  echo "source page ($view): rc $? $(wc -l < "$out/ncu-source-$name-${view/,/-}.csv") lines"
done
csv=$out/ncu-source-$name-cuda.csv
echo "files named in the CUDA view: $(grep -o '[A-Za-z0-9_./]*native/cuda/[a-z0-9_]*\.cu[h]*' "$csv" "$rep".ncu-rep 2>/dev/null | sed 's/.*native/native/' | sort | uniq -c | tr '\n' ';')"
echo "absolute paths of the build tree in the report: $(grep -c '/work/\|/tmp/' "$csv" 2>/dev/null || echo 0)"
head -c 1500 "$csv"
