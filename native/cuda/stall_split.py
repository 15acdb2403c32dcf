#!/usr/bin/env python3
"""Where each warpgroup of a warp-specialized kernel waits, from ncu's per-instruction stall samples.

The kernel's SASS is split into regions at its `USETMAXREG` instructions (each warpgroup's branch
starts with one; the region is named by the register count it asks for), and for every region the
script prints its share of the samples, its stall reasons, the mbarrier waits it spins on (each
`SYNCS.PHASECHK...TRYWAIT` with the samples of the wait loop that branches to it, named by the
barrier's shared-memory offset) and its hottest instructions.

Input: the CSV of a report taken with the SourceCounters section (on the device):
  ncu --clock-control none --kernel-name regex:paged_attention --launch-skip 3 --launch-count 1 \\
      --section WarpStateStats --section SourceCounters --import-source yes -o rep smla_cuda_check bench
  ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
Usage: native/cuda/stall_split.py sass.csv [top_n]
The paged kernel's barriers sit at PagedSmem::kBar (0x346a0 for dQK 512): full, empty, p_ready,
p_free, out_ready, out_free, raw_ready, two of each (8 bytes apart).
"""
import csv
import re
import sys

ALL = 'Warp Stall Sampling (All Samples)'


def main(path, top_n):
    rows = list(csv.reader(open(path)))
    hdr = rows[1]
    data = rows[2:]
    col = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith('stall_') and '(Not Issued)' not in h]

    def num(r, key):
        try:
            return float(r[col[key]])
        except (ValueError, IndexError):
            return 0.0

    addr_of = {int(r[0], 16): i for i, r in enumerate(data)}
    cuts = [(i, re.search(r'0x([0-9a-f]+)', r[1])) for i, r in enumerate(data) if 'USETMAXREG' in r[1]]
    bounds = [(0, 'prologue')] + [(i, f'setmaxnreg {int(m.group(1), 16)}' if m else 'setmaxnreg') for i, m in cuts]
    total = sum(num(r, ALL) for r in data) or 1.0
    for k, (start, name) in enumerate(bounds):
        end = bounds[k + 1][0] if k + 1 < len(bounds) else len(data)
        seg = range(start, end)
        samples = sum(num(data[i], ALL) for i in seg)
        if samples == 0:
            continue
        print(f'== {name} (instructions {start}..{end - 1}): {samples / total * 100:.1f}% of the samples')
        by_reason = sorted(((sum(num(data[i], r) for i in seg), r[6:]) for r in reasons), reverse=True)
        print('   ' + ', '.join(f'{n} {s / samples * 100:.1f}%' for s, n in by_reason[:8] if s))
        # A wait loop: TRYWAIT, then a branch back on failure, often out of line (at the kernel's end).
        waits = {}
        for i in seg:
            ins = data[i][1]
            target = re.search(r'BRA (0x[0-9a-f]+)', ins)
            j = addr_of.get(int(target.group(1), 16)) if target else None
            if 'TRYWAIT' in ins:
                j = i
            if j is None or 'TRYWAIT' not in data[j][1]:
                continue
            bar = re.search(r'\[([^\]]+)\]', data[j][1]).group(1)
            waits[bar] = waits.get(bar, 0.0) + num(data[i], ALL)
        for bar, s in sorted(waits.items(), key=lambda x: -x[1]):
            if s / samples >= 0.005:
                print(f'   wait [{bar}]: {s / samples * 100:.1f}%')
        for i in sorted(seg, key=lambda i: -num(data[i], ALL))[:top_n]:
            top = sorted(((num(data[i], r), r[6:]) for r in reasons), reverse=True)[:2]
            print(f'   {i:5d} {num(data[i], ALL) / samples * 100:5.1f}%  {data[i][1].strip()[:64]:64s} '
                  + ', '.join(f'{n} {s:.0f}' for s, n in top if s))


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
