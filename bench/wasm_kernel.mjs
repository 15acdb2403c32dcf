// Single-thread benchmark of the WASM core, instantiated directly (no facade, no workers):
// smla_sparse_prefill GFLOP/s on the `run` shape, smla_dequantize_kv_cache GB/s and
// smla_paged_sparse_attention GFLOP/s.
//   node bench/wasm_kernel.mjs [--sq 32] [--skv 4096] [--hq 64] [--dqk 512] [--dv 512] [--topk 640]
//                              [--runs 5] [--wasm wasm/sparse_mla.wasm] [--vs other.wasm]
// FLOPs = 2 · Σ valid topk · hQ · (dQK + dV) (SPEC §4). Prints the median of the runs.
// --vs B: both modules in this process on the same inputs, their calls alternated (A B, then B A,
// ...), and for the two attention ops the median over those pairs of B's CPU time / A's (the speed
// of A against B; CPU time leaves out time the thread spent descheduled on a busy machine).
// The ops' params structs and the cache layout come from the built package (npm run build).
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { cFunctionName, fieldsOf } from '../dist/backends/abi.js';
import { V4_TOKEN_BYTES, V4_TOKEN_DATA_BYTES, V4_TOKEN_SCALE_BYTES, v4PageBytes } from '../dist/kv_cache_layout.js';
import { median } from './lib.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const num = (k, d) => (args[k] !== undefined ? Number(args[k]) : d);
const sQ = num('sq', 32), sKV = num('skv', 4096), hQ = num('hq', 64), dQK = num('dqk', 512);
const dV = num('dv', 512), topk = num('topk', 640), runs = num('runs', 5);
const wasmPath = args.wasm ?? fileURLToPath(new URL('../wasm/sparse_mla.wasm', import.meta.url));
const P = 64, pages = Math.ceil(8192 / P), nDequant = 8192;
const withPaged = dQK === 512 && dV === 512;

/** One module with every op's inputs in its heap (the same inputs in every module: a fixed seed); returns a timed call per op. */
async function load(path) {
  const { instance } = await WebAssembly.instantiate(readFileSync(path), {});
  const e = instance.exports;
  let seed = 12345;
  const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 4294967296);
  const f32 = new Float32Array(1), u32 = new Uint32Array(f32.buffer);
  const bf16 = (x) => { f32[0] = x; const u = u32[0]; return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff; };
  const alloc = (bytes) => {
    const p = e.smla_malloc(bytes);
    if (!p) throw new Error(`smla_malloc(${bytes}) failed`);
    return p;
  };
  const heap = (Type, ptr, n) => new Type(e.memory.buffer, ptr, n);
  /** Calls an op with its params struct (wasm32: 4 bytes a field; arrays are heap addresses, absent fields 0). */
  const call = (op, values) => {
    const fields = fieldsOf(op);
    const p = alloc(fields.length * 4);
    const view = new DataView(e.memory.buffer);
    fields.forEach(([name, kind], i) => {
      if (kind === 'f32') view.setFloat32(p + 4 * i, values[name] ?? 0, true);
      else view.setInt32(p + 4 * i, values[name] ?? 0, true);
    });
    const st = e[cFunctionName(op)](p);
    e.smla_free(p);
    if (st !== 0) throw new Error(`${cFunctionName(op)} returned ${st}`);
  };
  // Wall time and this process's CPU time: on a shared, busy machine the CPU-time figure is the
  // steadier one (it does not count time the thread spent descheduled).
  const timed = (op, values) => () => {
    const c0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    call(op, values);
    const wall = Number(process.hrtime.bigint() - t0) / 1e9;
    const c = process.cpuUsage(c0);
    return { wall, cpu: (c.user + c.system) / 1e6 };
  };

  // ---- sparse prefill
  const pq = alloc(sQ * hQ * dQK * 2), pkv = alloc(sKV * dQK * 2), pidx = alloc(sQ * topk * 4);
  const pout = alloc(sQ * hQ * dV * 2), pml = alloc(sQ * hQ * 4), plse = alloc(sQ * hQ * 4);
  const psink = alloc(hQ * 4);
  {
    const q = heap(Uint16Array, pq, sQ * hQ * dQK);
    for (let i = 0; i < q.length; i++) q[i] = bf16(rand() * 2 - 1);
    const kv = heap(Uint16Array, pkv, sKV * dQK);
    for (let i = 0; i < kv.length; i++) kv[i] = bf16(rand() * 2 - 1);
    const idx = heap(Int32Array, pidx, sQ * topk);
    for (let i = 0; i < idx.length; i++) idx[i] = Math.floor(rand() * sKV);
    const sink = heap(Float32Array, psink, hQ);
    for (let i = 0; i < hQ; i++) sink[i] = rand();
  }
  const ops = {
    prefill: timed('sparsePrefill', { q: pq, kv: pkv, indices: pidx, attnSink: psink, sQ, hQ, dQK, dV, sKV, topk, smScale: 1 / Math.sqrt(dQK), out: pout, maxLogits: pml, lse: plse }),
  };

  // ---- dequant gather (v4, page size 64): bytes = n · (record read + bf16 row written)
  const pageBytes = v4PageBytes(P);
  const pcache = alloc(pageBytes * pages), pids = alloc(nDequant * 8), pdq = alloc(nDequant * 512 * 2);
  {
    const c = heap(Uint8Array, pcache, pageBytes * pages);
    for (let i = 0; i < c.length; i++) c[i] = (rand() * 256) & 0x7e;
    for (let p = 0; p < pages; p++) for (let t = 0; t < P; t++) for (let s = 0; s < V4_TOKEN_SCALE_BYTES; s++)
      c[p * pageBytes + P * V4_TOKEN_DATA_BYTES + t * V4_TOKEN_SCALE_BYTES + s] = 120 + ((rand() * 8) | 0);
    const ids = heap(BigInt64Array, pids, nDequant);
    for (let i = 0; i < nDequant; i++) ids[i] = BigInt(Math.floor(rand() * P * pages));
  }
  ops.dequant = timed('dequantizeKvCache', { format: 0, cache: pcache, pageSize: P, numPages: pages, tokenIds: pids, numTokens: nDequant, out: pdq });

  // ---- paged FP8 attention (SPEC §5) on the same cache: topk token ids per query, dQK = dV = 512
  if (withPaged) {
    const pidxPaged = alloc(sQ * topk * 4);
    const ids = heap(Int32Array, pidxPaged, sQ * topk);
    for (let i = 0; i < ids.length; i++) ids[i] = Math.floor(rand() * P * pages);
    ops.paged = timed('pagedSparseAttention', { q: pq, n: sQ, hQ, kCache: pcache, pageSize: P, numPages: pages, indices: pidxPaged, topk, attnSink: psink, smScale: 1 / Math.sqrt(576), out: pout, lse: plse, maxLogits: pml });
  }
  return ops;
}

const prefillFlops = 2 * sQ * topk * hQ * (dQK + dV);
const pagedFlops = 2 * sQ * topk * hQ * 1024;
const gflops = (flops, s) => (flops / s / 1e9).toFixed(2);

if (args.vs === undefined) {
  const m = await load(wasmPath);
  /** runs + 1 calls, the first dropped (it warms up: tier-up, page faults). */
  const measure = (run) => {
    const t = [];
    for (let r = 0; r < runs + 1; r++) {
      const x = run();
      if (r > 0) t.push(x);
    }
    return { wall: t.map((x) => x.wall), cpu: t.map((x) => x.cpu) };
  };
  const pre = measure(m.prefill);
  const tMed = median(pre.wall), cMed = median(pre.cpu);
  console.log(`sparse_prefill sQ=${sQ} hQ=${hQ} dQK=${dQK} dV=${dV} topk=${topk} sKV=${sKV}: ` +
    `median ${(tMed * 1e3).toFixed(1)} ms, ${gflops(prefillFlops, tMed)} GFLOP/s wall, ` +
    `${gflops(prefillFlops, cMed)} GFLOP/s cpu-time ` +
    `(wall runs: ${pre.wall.map((t) => gflops(prefillFlops, t)).join(' ')})`);
  const dqMed = median(measure(m.dequant).wall);
  console.log(`dequantize v4 gather n=${nDequant} P=${P}: median ${(dqMed * 1e3).toFixed(2)} ms, ` +
    `${((nDequant * (V4_TOKEN_BYTES + 1024)) / dqMed / 1e9).toFixed(2)} GB/s (${V4_TOKEN_BYTES} B read + 1024 B written per token)`);
  if (m.paged) {
    const pg = measure(m.paged);
    const pMed = median(pg.wall);
    console.log(`paged_sparse_attention n=${sQ} hQ=${hQ} topk=${topk} P=${P}: median ${(pMed * 1e3).toFixed(1)} ms, ` +
      `${gflops(pagedFlops, pMed)} GFLOP/s (dequant inside), ${gflops(pagedFlops, median(pg.cpu))} GFLOP/s cpu-time`);
  }
} else {
  const a = await load(wasmPath), b = await load(args.vs);
  const name = (p) => p.split('/').pop();
  console.log(`A = ${wasmPath}, B = ${args.vs}; ${runs} pairs per op, calls alternated (A B, B A, ...) after one warm-up call each`);
  const compare = (label, flops, op) => {
    a[op]();
    b[op]();
    const ta = [], tb = [];
    for (let r = 0; r < runs; r++) {
      if (r % 2 === 0) {
        ta.push(a[op]());
        tb.push(b[op]());
      } else {
        tb.push(b[op]());
        ta.push(a[op]());
      }
    }
    const speed = (key) => median(ta.map((x, r) => tb[r][key] / x[key])).toFixed(3);
    const line = (t) => `${gflops(flops, median(t.map((x) => x.cpu)))} GFLOP/s cpu-time, ${gflops(flops, median(t.map((x) => x.wall)))} wall`;
    console.log(`${label}: A (${name(wasmPath)}) ${line(ta)}; B (${name(args.vs)}) ${line(tb)}; ` +
      `A / B speed ${speed('cpu')} cpu-time, ${speed('wall')} wall (medians of the ${runs} pairs' ratios)`);
  };
  compare(`sparse_prefill sQ=${sQ} hQ=${hQ} dQK=${dQK} dV=${dV} topk=${topk} sKV=${sKV}`, prefillFlops, 'prefill');
  if (a.paged) compare(`paged_sparse_attention n=${sQ} hQ=${hQ} topk=${topk} P=${P}`, pagedFlops, 'paged');
}
