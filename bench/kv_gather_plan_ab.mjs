// The kv-row planner of two builds in one process, alternated call by call (A B, then B A, ...), so
// that the host's drift and its neighbours' load fall on both: the part of a host call that plans
// its gather, without the attention around it (src/backends/prefill_gather.ts,
// src/backends/paged_gather.ts). Per shape, the median of each build's times and of the per-pair
// ratios new / base:
//   prefill: chooseKvRows as the cpu backend calls it (1 whole copy, none compact, 700 ns a run), in a
//     KvRowScratch kept by each build as the backend keeps its own;
//   paged choice: choosePagedRead in a kept map (the op's own choice, alone), cpu's copies of an unshared cache;
//   paged plan + gather: planPagedReads(...).gather(), what the op runs at the call before staging.
// Ids: each row's distinct random rows (or tokens). No kv or cache bytes are timed but the gather's.
//   node bench/kv_gather_plan_ab.mjs --new DIST --base DIST [--pairs 60]
import { pathToFileURL } from 'node:url';
import { loadavg } from 'node:os';
import { median, takeOption } from './lib.mjs';

const args = process.argv.slice(2);
const dists = { new: takeOption(args, '--new'), base: takeOption(args, '--base') };
if (!dists.new || !dists.base) throw new Error('give --new DIST and --base DIST');
const pairs = Number(takeOption(args, '--pairs') ?? 60);
const load = async (dist) => ({
  prefill: await import(pathToFileURL(`${dist}/backends/prefill_gather.js`).href),
  paged: await import(pathToFileURL(`${dist}/backends/paged_gather.js`).href),
});
const builds = { new: await load(dists.new), base: await load(dists.base) };
const scratches = { new: new builds.new.prefill.KvRowScratch(), base: new builds.base.prefill.KvRowScratch() };
// the paged op's kept map (one of its backend's pool) and its pool, where the build has them (a build
// before them plans in fresh maps and ignores the arguments)
const pools = { new: builds.new.paged.PagedScratchPool ? new builds.new.paged.PagedScratchPool() : undefined, base: builds.base.paged.PagedScratchPool ? new builds.base.paged.PagedScratchPool() : undefined };
const pagedScratches = { new: pools.new?.take(), base: pools.base?.take() };

let seed = 0x5eed60;
const rand = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
function distinctRows(n, topk, rows) {
  const ids = new Int32Array(n * topk);
  for (let i = 0; i < n; i++) {
    const row = new Set();
    while (row.size < topk) row.add(Math.floor(rand() * rows));
    ids.set([...row], i * topk);
  }
  return ids;
}

/** Times f(build) for both builds, alternated; the medians and the median ratio. */
function ab(f) {
  const t = { new: [], base: [] };
  for (let i = 0; i < pairs; i++) {
    for (const b of i % 2 ? ['base', 'new'] : ['new', 'base']) {
      const t0 = performance.now();
      f(b);
      t[b].push(performance.now() - t0);
    }
  }
  const ratios = t.new.map((x, i) => x / t.base[i]);
  return `new ${median(t.new).toFixed(3)} ms  base ${median(t.base).toFixed(3)} ms  new/base ${median(ratios).toFixed(3)}`;
}

// every case of both builds run first (200 times each), so that no case is timed before its code is optimized
const cases = [];
for (const [sKV, dQK] of [[32768, 512], [131072, 576]]) {
  for (const [sQ, topk] of [[1, 512], [1, 2048], [2, 2048], [16, 512], [16, 2048]]) {
    const s = { indices: distinctRows(sQ, topk, sKV), sQ, topk, topkLength: null, sKV };
    const plan = builds.base.prefill.chooseKvRows(s, dQK, 1, 0, 700);
    cases.push([`prefill ${sQ} x ${topk} over ${sKV} x ${dQK} (${plan ? `compact, ${plan.rows.length} rows` : 'whole'})`, (b) => builds[b].prefill.chooseKvRows(s, dQK, 1, 0, 700, scratches[b])]);
  }
}
const P = 64;
const copies = { whole: (unshared) => (unshared ? 1 : 0), compact: 1 };
for (const tokens of [32768, 131072]) {
  const data = new Uint8Array((tokens / P) * Math.ceil((P * 584) / 576) * 576);
  const cache = { format: 'v4', pageSize: P, numPages: tokens / P, numTokens: tokens, bytes: data.length, data };
  for (const [n, topk] of [[1, 512], [1, 2048], [4, 512], [4, 2048], [16, 2048]]) {
    const main = { cache, indices: distinctRows(n, topk, tokens), topk, topkLength: null };
    const job = { q: null, n, hQ: 64, main, extra: null, attnSink: null, smScale: 1 };
    const whole = builds.base.paged.pagedSetReads([main], n, copies)[0].bytes.whole;
    const label = `paged ${n} x ${topk} over ${tokens} tokens (${whole ? 'whole' : 'compact'})`;
    cases.push([`${label}, choice`, (b) => builds[b].paged.choosePagedRead(main, n, copies, pagedScratches[b])]);
    cases.push([`${label}, plan + gather`, (b) => builds[b].paged.planPagedReads(job, copies, pools[b]).gather()]);
  }
}
for (let i = 0; i < 200; i++) for (const [, f] of cases) for (const b of ['new', 'base']) f(b);
console.log(`# ${pairs} alternated pairs per row, after 200 warm-up calls of every row; load ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
for (const [label, f] of cases) console.log(`${label.padEnd(52)} ${ab(f)}`);
