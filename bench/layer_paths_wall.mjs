#!/usr/bin/env node
// The router's question asked of whole layers: the wall clock of one prefillLayer on a cuda engine
// down each path, forced in turn (the GPU bench's router sweep times the paths' kernels only).
// One request of seqLen = prefix + N whose chunk is its last N tokens; device q, caches, top-k and
// sink, output on the device (HOST=1: every operand and output on the host). A run = LAYERS layers
// awaited one after another, then a synchronize; ROUNDS runs a path after one warm-up run, the paths
// alternated (each layer's call-to-resolve time kept too: the host's share); before a case's first point, WARMUP (default 300) untimed layers a path, so V8 has
// optimized the layer's JS on both (a process's first layers run its JS several times slower:
// docs/perf-history.md). Prints each point's median µs a layer and paged / sparse (> 1: the workspace
// path is faster); --out FILE writes them as JSON.
// Usage (dist built, a cuda addon): [HOST=1] node bench/layer_paths_wall.mjs [ROUNDS] [LAYERS] [--out FILE]
// PREFIXES=comma list (default 0,32768) and RATIOS (default 4,128,0) narrow the sweep.
import { writeFileSync } from 'node:fs';
import { createEngine, createPlan, prefillLayer, swaGatherLength, tensor, toBf16 } from '../dist/index.js';
import { randomV4Cache } from './device_inputs.mjs';

const args = process.argv.slice(2);
const outAt = args.indexOf('--out');
const outFile = outAt >= 0 ? args.splice(outAt, 2)[1] : undefined;
const ROUNDS = Number(args[0] ?? 5), LAYERS = Number(args[1] ?? 20), W = 128;
const list = (name, dflt) => (process.env[name] ?? dflt).split(',').map(Number);
const PREFIXES = list('PREFIXES', '0,32768'), RATIOS = list('RATIOS', '4,128,0'), WARMUP = Number(process.env.WARMUP ?? 300);
const warmed = new Set();
let seed = 0x1234567;
const rand = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
const engine = await createEngine({ backend: process.env.SPARSE_MLA_BACKEND ?? 'cuda' });
const onDevice = engine.hasDevice && process.env.HOST !== '1';
const up = (t) => (onDevice ? engine.upload(t) : t);
const output = onDevice ? 'device' : 'host';
const free = (t) => (onDevice ? t.data.free() : undefined);
const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** A v4 cache (P 64) of at least `tokens` tokens: random rows quantized once, on this engine's memory. */
const v4Cache = (tokens) => randomV4Cache(engine, tokens, rand, onDevice);

const CASES = [
  { ratio: 4, hQ: 64, topk: 512, ns: [16, 32, 64, 256] },
  { ratio: 4, hQ: 128, topk: 1024, ns: [16, 32, 64, 256] },
  { ratio: 128, hQ: 64, ns: [16, 64, 256, 512, 1024] },
  { ratio: 128, hQ: 128, ns: [16, 64, 256, 512, 1024] },
  { ratio: 0, hQ: 64, ns: [16, 64, 256, 512, 1024] },
  { ratio: 0, hQ: 128, ns: [16, 64, 256, 512, 1024] },
];
const points = [];
for (const prefix of PREFIXES) {
  const most = prefix + 1024;
  const swa = await v4Cache(most);
  const comp = { 4: await v4Cache(Math.floor(most / 4)), 128: await v4Cache(Math.floor(most / 128)) };
  for (const c of CASES.filter((k) => RATIOS.includes(k.ratio))) {
    for (const N of c.ns) {
      const seqLen = prefix + N;
      const g = swaGatherLength(seqLen, N, W);
      const request = { seqLen, extendLen: N, swaTokenIds: Int32Array.from({ length: g }, (_, i) => seqLen - g + i) };
      const pages = (r) => Int32Array.from({ length: Math.max(1, Math.ceil(Math.floor(seqLen / r) / 64)) }, (_, i) => i);
      if (c.ratio === 4) request.c4PageTable = pages(4);
      if (c.ratio === 128) request.c128PageTable = pages(128);
      const plan = createPlan({ requests: [request], ...(c.ratio === 4 ? { c4PageSize: 64 } : {}), ...(c.ratio === 128 ? { c128PageSize: 64 } : {}) });
      const q = await up(toBf16({ shape: [N, c.hQ, 512], data: Float32Array.from({ length: N * c.hQ * 512 }, () => rand() * 2 - 1) }));
      const sink = await up(tensor('float32', [c.hQ], Float32Array.from({ length: c.hQ }, () => rand())));
      let topk;
      if (c.ratio === 4) {
        const ids = new Int32Array(N * c.topk).fill(-1);
        for (let i = 0; i < N; i++) {
          const visible = Math.floor((prefix + i + 1) / 4);
          for (let k = 0; k < Math.min(c.topk, visible); k++) ids[i * c.topk + k] = Math.floor(rand() * visible);
        }
        topk = await up(tensor('int32', [N, c.topk], ids));
      }
      const caches = c.ratio === 0 ? { swa } : { swa, [c.ratio === 4 ? 'c4' : 'c128']: comp[c.ratio] };
      const layer = async (path) => {
        const r = await prefillLayer(engine, { plan, compressRatio: c.ratio, q, caches, ...(topk ? { topkIndices: topk } : {}), attnSink: sink, smScale: 1 / Math.sqrt(512), path }, { output });
        for (const t of [r.out, r.lse, r.maxLogits]) free(t);
      };
      const kind = `${c.ratio}/${c.hQ}`;
      if (!warmed.has(kind)) {
        warmed.add(kind);
        for (const path of ['sparse', 'paged']) for (let l = 0; l < WARMUP; l++) await layer(path);
        await engine.synchronize();
      }
      const runs = { sparse: [], paged: [] };
      // host µs from each layer's call until its promise resolved (the JS thread's share of a layer)
      const resolve = { sparse: [], paged: [] };
      for (let r = 0; r <= ROUNDS; r++) {
        for (const path of ['sparse', 'paged']) {
          await engine.synchronize();
          const t0 = performance.now();
          for (let l = 0; l < LAYERS; l++) {
            const c0 = performance.now();
            await layer(path);
            if (r > 0) resolve[path].push((performance.now() - c0) * 1000);
          }
          await engine.synchronize();
          if (r > 0) runs[path].push(((performance.now() - t0) * 1000) / LAYERS);
        }
      }
      const s = median(runs.sparse), p = median(runs.paged);
      const rs = median(resolve.sparse), rp = median(resolve.paged);
      const name = `c${c.ratio} hQ ${c.hQ}${c.topk ? ` topk ${c.topk}` : ''} prefix ${prefix} N ${N}`;
      points.push({ ratio: c.ratio, hQ: c.hQ, topk: c.topk ?? 0, prefix, queries: N, sparse_us: s, paged_us: p, paged_over_sparse: p / s, sparse_resolve_us: rs, paged_resolve_us: rp, sparse_runs_us: runs.sparse, paged_runs_us: runs.paged });
      console.log(`${name}: sparse ${s.toFixed(1)} µs, paged ${p.toFixed(1)} µs a layer, paged / sparse ${(p / s).toFixed(2)} (a call resolves in ${rs.toFixed(1)} / ${rp.toFixed(1)} µs)`);
      for (const t of [q, sink, topk]) if (t) free(t);
    }
  }
  for (const t of [swa, comp[4], comp[128]]) free(t);
}
if (outFile) {
  const report = { date: new Date().toISOString(), command: `${process.env.HOST === '1' ? 'HOST=1 ' : ''}node bench/layer_paths_wall.mjs ${ROUNDS} ${LAYERS}`, memory: output, rounds: ROUNDS, layers: LAYERS, warmup: WARMUP, points };
  writeFileSync(outFile, `${JSON.stringify(report, null, 2)}\n`);
}
await engine.dispose();
