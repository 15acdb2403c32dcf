// Whether the wasm backend's resident memory creeps call after call, and which part grows: rounds
// of the 50 overlapping calls of test/children/concurrency.mjs (test/children/mixed_calls.mjs: quantize, dequant, sparsePrefill,
// pagedSparseAttention, prefillLayer of every ratio down both paths, on one engine), with after
// each round the main thread's process.memoryUsage(), and, through the pool's diagnostic hook,
// each worker's wasm linear memory, V8 heap and ArrayBuffers, plus the main-thread structures a
// per-call retention would grow (the 'message' listeners on each worker, the staging's slabs).
//
//   node --expose-gc bench/wasm_memory_creep.mjs [--backend wasm|cpu] [--rounds 1000] [--gc none|main|all]
//        [--workers 2] [--seed 1] [--fresh]
//   --gc none: no forced collection; main: global.gc() on the main thread before each reading;
//        all: also a full collection inside each worker (needs --expose-gc, which workers inherit).
//   --fresh: fresh input arrays every round (default: the same calls every round, as the test).
// One TSV line a round on stdout (MiB unless named), then a summary: growth per round as the
// median slope between every two rounds (as test/threads.test.ts measures it), over windows of rounds.
import { readFileSync, readdirSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { createEngine } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import { makeRng } from '../dist/check/grid.js';
import { mixedWorkload } from '../test/children/mixed_calls.mjs';
import { median } from './lib.mjs';

const { values: o } = parseArgs({
  options: {
    backend: { type: 'string', default: 'wasm' },
    rounds: { type: 'string', default: '1000' },
    gc: { type: 'string', default: 'main' },
    workers: { type: 'string', default: '2' },
    seed: { type: 'string', default: '1' },
    fresh: { type: 'boolean', default: false },
  },
});
const rounds = Number(o.rounds);
if (o.gc !== 'none' && typeof globalThis.gc !== 'function') throw new Error('run with node --expose-gc (or --gc none)');
const rng = makeRng(Number(o.seed) >>> 0);
const engine = await createEngine({ backend: o.backend, workers: Number(o.workers) });
const backend = engineBackend(engine);
const pool = o.backend === 'wasm' ? backend.pool : null;
const MiB = 2 ** 20;

/**
 * The process's resident memory split by mapping (/proc/self/smaps): `wasm`, runs of contiguous
 * anonymous mappings spanning at least 4 GiB (V8 reserves each wasm32 memory with its guard region
 * so; only the pages the instance touched are resident), `brk` the main malloc heap, `file` mapped
 * files, `anon` every other anonymous mapping (V8's heaps, the threads' malloc arenas and stacks).
 */
function residentByMapping() {
  const out = { wasm: 0, brk: 0, file: 0, anon: 0 };
  let run = null; // { end, span, rss } of the current run of contiguous anonymous mappings
  const closeRun = () => {
    if (run) out[run.span >= 4 * 2 ** 30 ? 'wasm' : 'anon'] += run.rss;
    run = null;
  };
  let current = null;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const header = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$/.exec(line);
    if (header) {
      const start = parseInt(header[1], 16), end = parseInt(header[2], 16), path = header[3];
      current = { kind: path === '' ? 'anon' : path === '[heap]' ? 'brk' : path.startsWith('/') ? 'file' : 'anon-named' };
      if (current.kind === 'anon') {
        if (!run || run.end !== start) { closeRun(); run = { end, span: 0, rss: 0 }; }
        run.end = end;
        run.span += end - start;
      } else closeRun();
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss && current) {
      const bytes = Number(rss[1]) * 1024;
      if (current.kind === 'anon') run.rss += bytes;
      else out[current.kind === 'anon-named' ? 'anon' : current.kind] += bytes;
    }
  }
  closeRun();
  return out;
}

// the workload of concurrency.mjs, its inputs made again each round with --fresh
const { initialCache, makeCalls } = mixedWorkload(engine, rng);

/** Tasks a round sends the workers (counted once through the pool's dispatch hook). */
let tasks = 0;
pool?.testing.onDispatch(() => tasks++);

const cols = ['round', 'tasks', 'ms', 'rss', 'rssWasm', 'rssBrk', 'rssFile', 'rssAnon', 'heapUsed', 'heapTotal', 'external', 'arrayBuffers', 'stagingHeld', 'stagingAllocs', 'threads'];
if (pool) cols.push('wHeap', 'wV8Used', 'wV8Total', 'wArrayBuffers', 'wExternal', 'msgListeners');
// one preallocated column a measure, so that the bench's own records do not grow the heap it measures
const columns = Object.fromEntries(cols.map((k) => [k, new Float64Array(rounds)]));
console.log(`# node ${process.version} ${process.execArgv.join(' ')} bench/wasm_memory_creep.mjs ${process.argv.slice(2).join(' ')}`);
console.log(cols.join('\t'));
let calls = makeCalls();
const t00 = Date.now();
for (let round = 0; round < rounds; round++) {
  if (o.fresh && round > 0) calls = makeCalls();
  const cache = structuredClone(initialCache);
  const t0 = performance.now();
  await Promise.all(calls.map((c) => c.run(cache)));
  const ms = performance.now() - t0;
  if (o.gc !== 'none') globalThis.gc();
  const workers = pool ? await pool.testing.workerMemory(o.gc === 'all') : [];
  if (o.gc !== 'none') globalThis.gc(); // what the diagnostic round trip left
  const m = process.memoryUsage();
  const split = residentByMapping();
  const sum = (f) => workers.reduce((s, w) => s + f(w), 0);
  const row = {
    round, tasks, ms, rss: m.rss, rssWasm: split.wasm, rssBrk: split.brk, rssFile: split.file, rssAnon: split.anon, heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external, arrayBuffers: m.arrayBuffers,
    stagingHeld: backend.staging?.heldBytes ?? 0, stagingAllocs: backend.staging?.allocations ?? 0, threads: readdirSync('/proc/self/task').length,
  };
  if (pool) {
    if (o.gc === 'all' && !workers.every((w) => w.collected)) throw new Error('no gc in the workers');
    Object.assign(row, {
      wHeap: sum((w) => w.heapBytes), wV8Used: sum((w) => w.v8UsedBytes), wV8Total: sum((w) => w.v8TotalBytes), wArrayBuffers: sum((w) => w.arrayBuffers), wExternal: sum((w) => w.external),
      msgListeners: pool.testing.messageListeners().reduce((a, b) => a + b, 0),
    });
  }
  for (const k of cols) columns[k][round] = row[k];
  const fmt = (k) => (k === 'round' || k === 'tasks' || k === 'stagingAllocs' || k === 'threads' || k === 'msgListeners' ? String(row[k]) : k === 'ms' ? row[k].toFixed(0) : (row[k] / MiB).toFixed(3));
  console.log(cols.map(fmt).join('\t'));
}
await engine.dispose();

/** Median slope between every two values (pairs subsampled to stay cheap on long runs). */
function growthPerRound(xs) {
  const slopes = [];
  const step = Math.max(1, Math.floor(xs.length / 300));
  for (let i = 0; i < xs.length; i += step) for (let j = i + step; j < xs.length; j += step) slopes.push((xs[j] - xs[i]) / (j - i));
  return slopes.length ? median(slopes) : NaN;
}
const callsPerRound = 50;
const windows = [...[[4, 30], [30, 100], [100, 300], [300, 1000], [1000, 2000], [2000, 3000], [3000, 5000], [5000, 10000]].filter(([, b]) => b <= rounds), [4, rounds]];
console.log(`# ${rounds} rounds of ${callsPerRound} calls in ${((Date.now() - t00) / 1000).toFixed(0)} s; growth per round (median pairwise slope), KiB; per call = / ${callsPerRound}`);
const keys = cols.filter((k) => !['round', 'tasks', 'ms', 'stagingAllocs', 'threads', 'msgListeners'].includes(k));
console.log(['# window', ...keys].join('\t'));
for (const [a, b0] of windows) {
  const b = Math.min(b0, rounds);
  if (b - a < 5) continue;
  console.log([`# ${a}-${b}`, ...keys.map((k) => (growthPerRound(Array.from(columns[k].subarray(a, b))) / 1024).toFixed(2))].join('\t'));
}
const at = (k, i) => columns[k][i];
const r4 = Math.min(4, rounds - 1), end = rounds - 1;
console.log(['# last-r4 MiB', ...keys.map((k) => ((at(k, end) - at(k, r4)) / MiB).toFixed(2))].join('\t'));
if (pool) console.log(`# message listeners on the workers: ${at('msgListeners', 0)} after round 0, ${at('msgListeners', end)} after the last; staging slabs allocated ${at('stagingAllocs', end)}`);
