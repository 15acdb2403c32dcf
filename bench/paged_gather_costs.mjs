#!/usr/bin/env node
// The costs behind the host backends' choice between a paged call's whole caches and compact ones
// (src/backends/paged_gather.ts: COPY_NS_PER_BYTE, ENTRY_NS, RUN_NS): one 32K-token v4 cache (P 64,
// about 19 MB, the SWA cache of a 32K prefix) copied whole into a reused buffer, against planning,
// remapping and gathering the tokens of index sets shaped like the router's: sliding windows (one
// run of consecutive ids) and c4-like random top-k ids (a run a token).
// Usage (dist built): node bench/paged_gather_costs.mjs [MS per measurement, default 300]
import { loadavg } from 'node:os';
import { gatherCompact, planPagedRead, remapIndices } from '../dist/backends/paged_gather.js';
import { median } from './lib.mjs';

const MS = Number(process.argv[2] ?? 300);
let seed = 0x2468ace;
const rand = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
const P = 64, pages = 512, tokens = P * pages;
const pageBytes = Math.ceil((P * 584) / 576) * 576;
const data = new Uint8Array(pages * pageBytes).map(() => (rand() * 256) | 0);
const cache = { format: 'v4', pageSize: P, numPages: pages, numTokens: tokens, bytes: data.length, data };
/** median ms of 7 timings, each the mean over as many calls as fill MS / 7 */
const time = (f) => {
  for (let i = 0; i < 10; i++) f();
  const ms = [];
  for (let k = 0; k < 7; k++) {
    const t0 = performance.now();
    let reps = 0;
    while (performance.now() - t0 < MS / 7) { f(); reps++; }
    ms.push((performance.now() - t0) / reps);
  }
  return median(ms);
};
const into = new Uint8Array(data.length);
const whole = time(() => into.set(data));
console.log(`load ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
console.log(`whole cache copy: ${data.length} bytes in ${whole.toFixed(3)} ms, ${((whole * 1e6) / data.length).toFixed(3)} ns/byte`);
const sets = [
  ['window 128, N 16', 16, 128, (i, k) => tokens - 16 - 127 + i + k],
  ['window 128, N 512', 512, 128, (i, k) => tokens - 512 - 127 + i + k],
  ['random top-k 1024, N 16', 16, 1024, () => (rand() * tokens) | 0],
  ['random top-k 512, N 64', 64, 512, () => (rand() * tokens) | 0],
  ['random top-k 64, N 16', 16, 64, () => (rand() * tokens) | 0],
];
for (const [name, n, topk, id] of sets) {
  const indices = new Int32Array(n * topk);
  for (let i = 0; i < n; i++) for (let k = 0; k < topk; k++) indices[i * topk + k] = id(i, k);
  const set = { cache, indices, topk, topkLength: null };
  const plan = planPagedRead(set, n);
  const tp = time(() => planPagedRead(set, n)), tr = time(() => remapIndices(set, n, plan)), tg = time(() => gatherCompact(cache, plan, into));
  const entries = n * topk;
  console.log(
    `${name}: ${plan.tokens.length} tokens in ${plan.runs} runs (${((plan.bytes / data.length) * 100).toFixed(1)}% of the cache); ` +
      `plan ${tp.toFixed(3)} ms + remap ${tr.toFixed(3)} ms = ${(((tp + tr) * 1e6) / entries).toFixed(1)} ns/entry; ` +
      `gather ${tg.toFixed(3)} ms = ${((tg * 1e6) / plan.runs).toFixed(0)} ns/run = ${(tg / whole * data.length / plan.runs).toFixed(0)} bytes of the whole copy; plan + remap + gather / whole copy ${((tp + tr + tg) / whole).toFixed(2)}`,
  );
}
