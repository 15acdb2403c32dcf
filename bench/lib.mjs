// What the bench scripts share, written once: the median they report, the build they time, an
// option they take out of their arguments, the median time of a call, two builds compared in
// alternated processes, and the c4 chunk their device layers run. Depends on no build, so a script
// comparing two builds can load it beside either.
import { execFileSync } from 'node:child_process';
import { pathToFileURL } from 'node:url';

/** The middle of `xs` once sorted; of an even count, the mean of the two middle values (as `sparse-mla bench` reports, src/cli/table.ts); NaN of none. */
export function median(xs) {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * The dist/ a script times, as a URL ending in '/': the one SPARSE_MLA_DIST names (a path), so that
 * alternated processes can time two builds, else this checkout's.
 */
export function benchDist() {
  const env = process.env.SPARSE_MLA_DIST;
  return env ? pathToFileURL(`${env}/`).href : new URL('../dist/', import.meta.url).href;
}

/** Takes `name VALUE` out of `args` (changing it) and gives VALUE, or undefined where `name` is not there. */
export function takeOption(args, name) {
  const at = args.indexOf(name);
  return at >= 0 ? args.splice(at, 2)[1] : undefined;
}

/** Takes `name A,B,…` out of `args` (as takeOption) and gives [A, B, …], or `fallback`'s where `name` is not there. */
export function takeList(args, name, fallback) {
  return (takeOption(args, name) ?? fallback).split(',');
}

/** The median ms of `calls` awaited calls of `f` after `warmups` untimed ones, to `digits` decimals. */
export async function medianCallMs(f, calls, warmups = 1, digits = 3) {
  for (let i = 0; i < warmups; i++) await f();
  const t = [];
  for (let i = 0; i < calls; i++) {
    const t0 = performance.now();
    await f();
    t.push(performance.now() - t0);
  }
  return +median(t).toFixed(digits);
}

/** Takes --new DIST and --base DIST (two builds' dist/; throws where either is missing) and --pairs (default 5) out of `args`. */
export function takeComparison(args) {
  const builds = { new: takeOption(args, '--new'), base: takeOption(args, '--base') };
  if (!builds.new || !builds.base) throw new Error('give --new DIST and --base DIST');
  return { builds, pairs: Number(takeOption(args, '--pairs') ?? 5) };
}

/** `{ '--name': value }` as arguments: each name, then its value as a string (a list's joined by commas). */
export function optionArgs(options) {
  return Object.entries(options).flatMap(([name, value]) => [name, String(value)]);
}

/**
 * `script --child --dist DIST ...childArgs` run for each build `pairs` times, alternated (new base,
 * then base new, and so on, so a drift of the machine's speed falls on both): per build the `ms` of
 * the JSON line each process printed last (a promise).
 */
export function alternatedRuns(script, builds, pairs, childArgs) {
  const run = (build) => () => JSON.parse(execFileSync(process.execPath, [script, '--child', '--dist', builds[build], ...childArgs], { encoding: 'utf8', maxBuffer: 1 << 24 }).trim().split('\n').at(-1)).ms;
  return alternated({ new: run('new'), base: run('base') }, pairs);
}

/**
 * Two runs' functions (sync or async) called `pairs` times each, alternated (A B, then B A, and so
 * on, so a drift of the machine's speed falls on both): per key the results in order.
 */
export async function alternated(runs, pairs) {
  const [a, b] = Object.keys(runs);
  const got = { [a]: [], [b]: [] };
  for (let p = 0; p < pairs; p++) {
    for (const key of p % 2 ? [b, a] : [a, b]) got[key].push(await runs[key]());
  }
  return got;
}

/** alternatedRuns' table: per shape each build's median ms (to `msDigits` decimals) and the median [min - max] of the per-pair ratios new / base. */
export function pairTable(got, shapeWidth, msDigits) {
  const f = (x) => x.toFixed(3);
  const lines = [`${'shape'.padEnd(shapeWidth + 3)}new ms   base ms   new/base per pair: median [min - max]`];
  for (const shape of Object.keys(got.new[0])) {
    const ratios = got.new.map((n, i) => n[shape] / got.base[i][shape]);
    lines.push(`${shape.padEnd(shapeWidth)} ${median(got.new.map((x) => x[shape])).toFixed(msDigits).padStart(8)} ${median(got.base.map((x) => x[shape])).toFixed(msDigits).padStart(9)}   ${f(median(ratios))} [${f(Math.min(...ratios))} - ${f(Math.max(...ratios))}]`);
  }
  return lines;
}

/**
 * One fresh request of n tokens (n a multiple of 4 · pageSize) with a c4 page table for its n / 4
 * compressed tokens: the chunk of the c4 layers of `sparse-mla bench --backend cuda`.
 */
export function freshC4Chunk(n, pageSize = 64) {
  return {
    requests: [{ seqLen: n, extendLen: n, swaTokenIds: Int32Array.from({ length: n }, (_, i) => i), c4PageTable: Int32Array.from({ length: n / 4 / pageSize }, (_, i) => i) }],
    c4PageSize: pageSize,
  };
}
