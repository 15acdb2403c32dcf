#!/usr/bin/env bash
# Counts, per attention kernel, its SASS instructions and its R2UR moves (a register copied into a
# uniform register), from cubins compiled here: no GPU, no cuobjdump. Hundreds of R2URs in an
# attention kernel mean ptxas has moved the math loops' wgmma descriptors or barrier addresses out of
# the uniform registers (one R2UR before every wgmma group); that cost the prefill kernel 17% more
# instructions and 2% of its speed once (docs/perf-history.md, twentieth session). A value read from
# shared memory that should count as warp-uniform goes through a warp reduction (__reduce_*_sync).
# Usage: native/cuda/sass_census.sh [src_root] [extra nvcc flags...]
set -euo pipefail
root="$(cd "${1:-$(dirname "$0")/../..}" && pwd)"
shift || true
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for tu in sparse_prefill paged_sparse_attention; do
  "${NVCC:-nvcc}" -std=c++17 -O3 -arch=sm_90a -I"$root/cpp/include" -I"$root/native/cuda" "$@" -cubin \
    "$root/native/cuda/$tu.cu" -o "$tmp/$tu.cubin" 2> "$tmp/$tu.log" || { cat "$tmp/$tu.log" >&2; exit 1; }
done
python3 - "$tmp"/*.cubin <<'PY'
import re, struct, subprocess, sys
R2UR = 0x2ca  # the low 12 bits of a sm_90 R2UR instruction word
for path in sys.argv[1:]:
    data = open(path, 'rb').read()
    table = subprocess.run(['readelf', '-SW', path], capture_output=True, text=True).stdout
    for m in re.finditer(r'\]\s+\.text\.(\S*attention\S*)\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)', table):
        name, off, size = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
        words = [struct.unpack_from('<Q', data, i)[0] & 0xfff for i in range(off, off + size, 16)]
        demangled = subprocess.run(['c++filt', name], capture_output=True, text=True).stdout.strip()
        short = re.sub(r'smla::cuda::|\(.*', '', demangled)
        print(f'{short:70s} {size // 16:6d} instructions {words.count(R2UR):5d} R2UR')
PY
