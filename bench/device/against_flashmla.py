#!/usr/bin/env python3
"""Prints issue 8's and 9's rows from GPU bench JSON files (sparse-mla bench --out) beside FlashMLA's
figures on the H200 (issues 8 and 9: FlashMLA 9241ae3), one column a file, and the dequant and
c4 layer figures those issues set targets for.
Usage: python3 bench/device/against_flashmla.py BENCH.json..."""
import json
import re
import sys

PREFILL = [  # (name prefix, FlashMLA TFLOPS)
    ("sparsePrefill V3.2 sQ4096 hQ128 dQK576 topk2048", 647),
    ("sparsePrefill V4 sQ4096 hQ64 dQK512 topk512 ", 479),
    ("sparsePrefill V4 sQ4096 hQ64 dQK512 topk640", 510),
    ("sparsePrefill V4 sQ4096 hQ128 dQK512 topk1024", 583),
    ("sparsePrefill V4 sQ32768 hQ64 dQK512 topk512 ", 462),
    ("sparsePrefill V4 sQ32768 hQ64 dQK512 topk640", 481),
]
PAGED_FLASHMLA = {(64, 2048): 333, (64, 4096): 337, (64, 8192): 345, (64, 11264): 349,
                  (128, 2048): 422, (128, 4096): 422, (128, 8192): 424, (128, 11264): 424}


def rows_of(path):
    with open(path) as f:
        d = json.load(f)
    return d, {r["name"] + " ": r for r in d["results"]}


def main(paths):
    if not paths:
        print(__doc__)
        return 2
    runs = [rows_of(p) for p in paths]
    print("files: " + "; ".join(f"{p} ({d.get('commit', '?')}, {d.get('date', '?')})" for p, (d, _) in zip(paths, runs)))
    print(f"{'row':52} {'FlashMLA':>8} " + " ".join(f"{'run ' + str(i + 1):>15}" for i in range(len(runs))))

    def line(label, ref, values):
        cells = []
        for v in values:
            cells.append(f"{'—':>15}" if v is None else f"{v:8.1f} {v / ref:5.3f}x" if ref else f"{v:15.3f}" if v < 10 else f"{v:15.1f}")
        print(f"{label:52} {ref or '':>8} " + " ".join(cells))

    for prefix, ref in PREFILL:
        vals = [next((r["value"] for n, r in rows.items() if n.startswith(prefix)), None) for _, rows in runs]
        line(prefix.replace("sparsePrefill ", "").strip(), ref, vals)
    for (h, n), ref in sorted(PAGED_FLASHMLA.items()):
        key = f"pagedSparseAttention N {n} hQ {h}, main 128 + extra {512 if h == 64 else 1024} (P 64) "
        line(f"paged hQ {h} N {n}", ref, [rows[key]["value"] if key in rows else None for _, rows in runs])
    # dequant: each round's 256K figure as a share of that round's copy (the bench's own note)
    for fmt in ("v4", "v32"):
        vals = []
        for _, rows in runs:
            shares = [float(re.match(r"([\d.]+)%", r["note"])[1]) for n, r in rows.items()
                      if re.match(rf"round \d+: dequant {fmt} 256K random tokens ", n) and r.get("note")]
            vals.append(sorted(shares)[len(shares) // 2] if shares else None)
        line(f"dequant {fmt} 256K, % of copy (median of rounds)", None, vals)
    # issue 9's layer targets: wall clock over the kernels' time, ≤ 1.15x at 4K and ≤ 1.05x at 32K
    for q in ("4K", "16K", "32K"):
        n = f"prefillLayer c4 {q} queries, hQ 64, topk 512 (planner → dequant → prefill, device) "
        line(f"c4 layer {q}: wall / kernels (x)", None, [rows[n]["value"] if n in rows else None for _, rows in runs])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
