// What the main thread still holds of the calls between two points: heap snapshots after round A
// and after round B of overlapping calls on one engine (collected each round, and collected again
// with event-loop turns between, so FinalizationRegistry cleanups run), and the objects of the
// second that the first did not have (snapshot ids are stable within a process), grouped by type,
// name and a few links of their retainer chain. A per-call retention shows as a group of about one
// (or k) objects per call; JIT code and the snapshots' own bookkeeping show as a few groups.
//
//   node --expose-gc bench/wasm_memory_survivors.mjs [--backend wasm] [--from 300] [--to 800] [--depth 4] [--top 15]
// A round: 4 sparsePrefill, 4 pagedSparseAttention, 1 dequant, 1 quantize (fixed inputs).
import v8 from 'node:v8';
import { readFileSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createEngine, createKvCache, tensor } from '../dist/index.js';
import { makeRng, randomBf16Bits, randomIndices } from '../dist/check/grid.js';

const { values: o } = parseArgs({
  options: {
    backend: { type: 'string', default: 'wasm' },
    from: { type: 'string', default: '300' },
    to: { type: 'string', default: '800' },
    depth: { type: 'string', default: '4' },
    top: { type: 'string', default: '15' },
  },
});
const [A, B, depth] = [Number(o.from), Number(o.to), Number(o.depth)];
if (typeof globalThis.gc !== 'function') throw new Error('run with node --expose-gc');
const rng = makeRng(1);
const engine = await createEngine({ backend: o.backend, workers: 2 });
const pagedCache = createKvCache('v4', { pageSize: 16, numPages: 30 });
const all = tensor('int32', [480], Int32Array.from({ length: 480 }, (_, i) => i));
await engine.quantizeKCache({ cache: pagedCache, tokenIds: all, rows: tensor('bf16', [480, 512], randomBf16Bits(rng, 480 * 512)) });
const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
const prefill = { q: tensor('bf16', [8, 8, 512], randomBf16Bits(rng, 8 * 8 * 512)), kv: tensor('bf16', [256, 512], randomBf16Bits(rng, 256 * 512)), indices: tensor('int32', [8, 64], randomIndices(rng, 8, 64, 256, 0.1, 0.05, [])), smScale: 0.05 };
const paged = { q: tensor('bf16', [8, 4, 512], randomBf16Bits(rng, 8 * 4 * 512)), kCache: pagedCache, indices: tensor('int32', [8, 64], randomIndices(rng, 8, 64, 480, 0.1, 0, [])), smScale: 0.05 };
const ids = tensor('int32', [100], Int32Array.from({ length: 100 }, () => rng.int(0, 480)));
const rows = tensor('bf16', [64, 512], randomBf16Bits(rng, 64 * 512));
const qIds = tensor('int32', [64], Int32Array.from({ length: 64 }, (_, i) => i));
const CALLS = 10;
const round = () =>
  Promise.all([
    ...Array.from({ length: 4 }, () => engine.sparsePrefill(prefill)),
    ...Array.from({ length: 4 }, () => engine.pagedSparseAttention(paged)),
    engine.dequantizeKCachePaged({ cache: pagedCache, tokenIds: ids }),
    engine.quantizeKCache({ cache, tokenIds: qIds, rows }),
  ]);
const turn = () => new Promise((r) => setTimeout(r, 30));

async function snapshot() {
  for (let i = 0; i < 4; i++) {
    globalThis.gc();
    await turn();
  }
  const file = v8.writeHeapSnapshot(join(tmpdir(), `wasm-memory-survivors-${process.pid}.heapsnapshot`));
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } finally {
    unlinkSync(file);
  }
}

async function rounds(from, to) {
  for (let r = from; r < to; r++) {
    await round();
    globalThis.gc();
  }
}

await rounds(0, A);
/** The ids of a snapshot, sorted; in a function of its own, so that the parsed snapshot is garbage once it returns. */
async function snapshotIds() {
  const s = await snapshot();
  const n = s.snapshot.meta.node_fields.length, at = s.snapshot.meta.node_fields.indexOf('id');
  const ids = new Float64Array(s.nodes.length / n);
  for (let i = 0, k = 0; i < s.nodes.length; i += n) ids[k++] = s.nodes[i + at];
  return ids.sort();
}
const before = await snapshotIds();
globalThis.gc();
const heapA = process.memoryUsage().heapUsed;
const had = (id) => {
  let lo = 0, hi = before.length - 1;
  while (lo <= hi) {
    const m = (lo + hi) >> 1;
    if (before[m] === id) return true;
    if (before[m] < id) lo = m + 1;
    else hi = m - 1;
  }
  return false;
};
await rounds(A, B);
globalThis.gc();
const heapB = process.memoryUsage().heapUsed;
const s = await snapshot();
const nf = s.snapshot.meta.node_fields, N = nf.length, ef = s.snapshot.meta.edge_fields, E = ef.length;
const ntypes = s.snapshot.meta.node_types[0], etypes = s.snapshot.meta.edge_types[0];
const [it, iname, isz, iec, iid] = ['type', 'name', 'self_size', 'edge_count', 'id'].map((f) => nf.indexOf(f));
const [et, en, eto] = ['type', 'name_or_index', 'to_node'].map((f) => ef.indexOf(f));
const count = s.nodes.length / N;
const retainers = Array.from({ length: count }, () => []);
for (let i = 0, e = 0; i < count; i++) {
  const end = e + s.nodes[i * N + iec] * E;
  for (; e < end; e += E) {
    const type = etypes[s.edges[e + et]];
    if (type === 'weak') continue;
    const name = type === 'element' || type === 'hidden' ? String(s.edges[e + en]) : s.strings[s.edges[e + en]];
    retainers[s.edges[e + eto] / N].push([i, type, name]);
  }
}
const desc = (i) => `${ntypes[s.nodes[i * N + it]]}:${s.strings[s.nodes[i * N + iname]].slice(0, 40).replace(/\s+/g, ' ')}`;
const groups = new Map();
let born = 0, bornBytes = 0;
for (let i = 0; i < count; i++) {
  if (had(s.nodes[i * N + iid])) continue;
  born++;
  bornBytes += s.nodes[i * N + isz];
  const chain = [desc(i)];
  for (let d = 0, cur = i; d < depth && retainers[cur].length > 0; d++) {
    const [by, type, name] = retainers[cur][0];
    const old = had(s.nodes[by * N + iid]);
    chain.push(`<-${type}:${name.slice(0, 20)}- ${desc(by)}${old ? ' [before]' : ''}`);
    if (old) break;
    cur = by;
  }
  const key = chain.join(' ');
  const g = groups.get(key) ?? { count: 0, bytes: 0 };
  g.count++;
  g.bytes += s.nodes[i * N + isz];
  groups.set(key, g);
}
const calls = (B - A) * CALLS;
console.log(`# node ${process.version} ${process.execArgv.join(' ')} bench/wasm_memory_survivors.mjs ${process.argv.slice(2).join(' ')}`);
console.log(`# ${o.backend}: rounds ${A}-${B} (${calls} calls): ${born} objects (${bornBytes} bytes) made meanwhile survive; heapUsed ${heapA} -> ${heapB} (${((heapB - heapA) / calls).toFixed(2)} bytes a call; the first snapshot's sorted ids, ${before.byteLength} bytes, included)`);
console.log('# count  bytes  object <-retainer chain ([before]: held since before round A)');
for (const [k, g] of [...groups].sort((x, y) => y[1].bytes - x[1].bytes).slice(0, Number(o.top))) console.log(`${String(g.count).padStart(7)} ${String(g.bytes).padStart(9)} ${k}`);
await engine.dispose();
