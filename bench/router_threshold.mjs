#!/usr/bin/env node
// The router's default threshold of each compress ratio from runs of bench/layer_paths_wall.mjs, by
// the rule of SPARSE_PREFILL_THRESHOLDS (src/planner/router.ts). Several runs of one backend are
// merged point by point (the geometric mean of their paired paged / sparse ratios) before the rule
// reads them, so that the load on a shared host during one run does not decide a threshold.
// Usage: node bench/router_threshold.mjs RUN.json [RUN2.json …] [--out MERGED.json]
// Prints each ratio's choice, every candidate's worst loss, and the merged ratios as a markdown table.
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { takeOption } from './lib.mjs';

/** A point's paged / sparse ratio: the median of its rounds' paired ratios where the run kept it. */
const ratioOf = (x) => x.paged_over_sparse_paired ?? x.paged_over_sparse;

/**
 * The threshold of one ratio: of the candidates (0: always the workspace path; each measured count
 * N: N queries or fewer go down the paged path), the one whose worst loss — the chosen path's time
 * over the faster one's, − 1 — over the ratio's points (every head count and prefix) is smallest;
 * ties to the smaller mean loss.
 */
export function chooseThreshold(ratioPoints) {
  const candidates = [0, ...new Set(ratioPoints.map((x) => x.queries))].sort((a, b) => a - b);
  const scored = candidates.map((threshold) => {
    const losses = ratioPoints.map((x) => Math.max(0, x.queries > threshold ? 1 / ratioOf(x) - 1 : ratioOf(x) - 1));
    return { threshold, worstLoss: Math.max(...losses), meanLoss: losses.reduce((a, b) => a + b, 0) / losses.length };
  });
  const best = scored.reduce((a, b) => (b.worstLoss < a.worstLoss || (b.worstLoss === a.worstLoss && b.meanLoss < a.meanLoss) ? b : a));
  return { ...best, candidates: scored };
}

/** chooseThreshold for each ratio that has points; prints one line per ratio. */
export function chooseThresholds(points) {
  const thresholds = {};
  for (const ratio of [...new Set(points.map((x) => x.ratio))]) {
    const t = (thresholds[ratio] = chooseThreshold(points.filter((x) => x.ratio === ratio)));
    console.log(`c${ratio}: threshold ${t.threshold} (worst loss ${(t.worstLoss * 100).toFixed(1)}%, mean ${(t.meanLoss * 100).toFixed(1)}%); by candidate: ${t.candidates.map((k) => `${k.threshold} ${(k.worstLoss * 100).toFixed(0)}%`).join(', ')}`);
  }
  return thresholds;
}

const pointKey = (x) => `${x.ratio}/${x.hQ}/${x.topk}/${x.prefix}/${x.queries}`;

/** The runs' points merged: one a case, prefix and count, its ratio the geometric mean of the runs'. */
export function mergeRuns(runs) {
  const byKey = new Map();
  for (const run of runs) for (const x of run.points) (byKey.get(pointKey(x)) ?? byKey.set(pointKey(x), []).get(pointKey(x))).push(x);
  return [...byKey.values()].map((xs) => {
    const ratios = xs.map(ratioOf);
    const { ratio, hQ, topk, prefix, queries } = xs[0];
    return { ratio, hQ, topk, prefix, queries, paged_over_sparse_paired: Math.exp(ratios.reduce((a, r) => a + Math.log(r), 0) / ratios.length), runs: ratios };
  });
}

/** The merged ratios as a markdown table: a row per case and prefix, a column per count. */
export function ratioTable(points) {
  const ns = [...new Set(points.map((x) => x.queries))].sort((a, b) => a - b);
  const rows = new Map();
  for (const x of points) {
    const name = `c${x.ratio} hQ ${x.hQ}${x.topk ? ` top-k ${x.topk}` : ''}, prefix ${x.prefix >= 1024 ? `${x.prefix / 1024}K` : x.prefix}`;
    (rows.get(name) ?? rows.set(name, { x, at: {} }).get(name)).at[x.queries] = x.runs ? x.runs.map((r) => r.toFixed(2)).join(' / ') : ratioOf(x).toFixed(2);
  }
  const rank = ({ x }) => [4, 128, 0].indexOf(x.ratio) * 1e9 + x.prefix * 1e3 + x.hQ;
  const sorted = [...rows].sort((a, b) => rank(a[1]) - rank(b[1]));
  return [`| layer | ${ns.map((n, i) => (i ? n : `N = ${n}`)).join(' | ')} |`, `| --- | ${ns.map(() => '---').join(' | ')} |`, ...sorted.map(([name, { at }]) => `| ${name} | ${ns.map((n) => at[n] ?? '').join(' | ')} |`)].join('\n');
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const outFile = takeOption(args, '--out');
  if (args.length === 0) throw new Error('usage: node bench/router_threshold.mjs RUN.json [RUN2.json …] [--out MERGED.json]');
  const runs = args.map((f) => JSON.parse(readFileSync(f, 'utf8')));
  const backends = new Set(runs.map((r) => r.backend));
  if (backends.size !== 1) throw new Error(`runs of one backend only, got ${[...backends].join(', ')}`);
  const points = mergeRuns(runs);
  const thresholds = chooseThresholds(points);
  console.log(ratioTable(points));
  if (outFile) writeFileSync(outFile, `${JSON.stringify({ backend: runs[0].backend, runs: args, commands: runs.map((r) => r.command), points, thresholds }, null, 2)}\n`);
}
