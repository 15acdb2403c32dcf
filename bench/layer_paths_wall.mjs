#!/usr/bin/env node
// The router's question asked of whole layers: the wall clock of one prefillLayer down each path,
// forced in turn, on a cuda engine (the GPU bench's router sweep times the paths' kernels only) or a
// host engine (cpu, wasm: SPARSE_MLA_BACKEND), whose default thresholds come from this script too.
// One request of seqLen = prefix + N whose chunk is its last N tokens; on cuda device q, caches, top-k
// and sink, output on the device (HOST=1: every operand and output on the host; SHARED=1: host caches
// in SharedArrayBuffers). A run = LAYERS layers
// awaited one after another, then a synchronize; ROUNDS runs a path after one warm-up run, the paths
// alternated (each layer's call-to-resolve time kept too: the host's share); before a case's first
// point, WARMUP (default 300) untimed layers a path, at most WARMUP_MS (cuda: no limit; host: 2000), so
// V8 has optimized the layer's JS on both (a process's first layers run its JS several times slower:
// docs/perf-history.md). On a host engine LAYERS defaults to auto: as many layers as fill RUN_MS
// (default 300) ms by the slower path's warm-up run, at least one.
// Prints each point's median µs a layer and paged / sparse (> 1: the workspace path is faster; also
// the median of each round's ratio, its two runs back to back, each round's order the other way), then
// per ratio the threshold whose worst loss over the measured points is smallest (the rule of
// SPARSE_PREFILL_THRESHOLDS: bench/router_threshold.mjs, which also merges several runs); --out
// FILE writes them as JSON.
// Usage (dist built; cuda: a cuda addon): [SPARSE_MLA_BACKEND=cpu|wasm] [HOST=1] [DROPPED=later] node bench/layer_paths_wall.mjs [ROUNDS] [LAYERS|auto] [--out FILE]
// PREFIXES=comma list (default 0,32768), RATIOS (default 4,128,0) and HEADS (default 64,128; 16: a
// tensor-parallel shard of 128 heads, top-k 1024) narrow the sweep; NS replaces every case's query
// counts (cuda: 16,64,256 … 1024 as below; host: 16,32,64,128,256,512,1024); STOP (host default 1.2,
// cuda none) ends a case's counts once paged / sparse has reached it at two counts in a row (the
// workspace path clearly wins from there).
import { writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { createEngine, createPlan, prefillLayer, swaGatherLength, tensor, toBf16 } from '../dist/index.js';
import { randomV4Cache } from './device_inputs.mjs';
import { median, takeOption } from './lib.mjs';
import { chooseThresholds } from './router_threshold.mjs';

const args = process.argv.slice(2);
const outFile = takeOption(args, '--out');
let seed = 0x1234567;
const rand = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
const engine = await createEngine({ backend: process.env.SPARSE_MLA_BACKEND ?? 'cuda' });
const hostEngine = !engine.hasDevice;
const env = process.env;
const list = (name, dflt) => (env[name] ?? dflt).split(',').map(Number);
const ROUNDS = Number(args[0] ?? 5), LAYERS_ARG = args[1] ?? (hostEngine ? 'auto' : '20'), W = 128;
const AUTO_LAYERS = LAYERS_ARG === 'auto', RUN_MS = Number(env.RUN_MS ?? 300);
const PREFIXES = list('PREFIXES', '0,32768'), RATIOS = list('RATIOS', '4,128,0'), HEADS = list('HEADS', '64,128');
const WARMUP = Number(env.WARMUP ?? 300), WARMUP_MS = Number(env.WARMUP_MS ?? (hostEngine ? 2000 : Infinity));
const STOP = Number(env.STOP ?? (hostEngine ? 1.2 : Infinity));
const warmed = new Set();
const onDevice = engine.hasDevice && process.env.HOST !== '1';
const up = (t) => (onDevice ? engine.upload(t) : t);
const output = onDevice ? 'device' : 'host';
// DROPPED=later: c4 layers resolve once queued, their dropped totals read later (prefillLayer's { dropped })
const layerOptions = env.DROPPED ? { output, dropped: env.DROPPED } : { output };
const free = (t) => (onDevice ? t.data.free() : undefined);

/**
 * A v4 cache (P 64) of at least `tokens` tokens: random rows quantized once, on this engine's memory;
 * with SHARED=1 a host cache's bytes in a SharedArrayBuffer (a host backend reads them in place, where
 * it copies other memory into its staging each call).
 */
const v4Cache = async (tokens) => {
  const cache = await randomV4Cache(engine, tokens, rand, onDevice);
  if (onDevice || env.SHARED !== '1') return cache;
  const data = new Uint8Array(new SharedArrayBuffer(cache.data.byteLength));
  data.set(cache.data);
  return { ...cache, data };
};

const HOST_NS = [16, 32, 64, 128, 256, 512, 1024];
const NS = env.NS ? list('NS', '') : undefined;
const CASES = [
  { ratio: 4, hQ: 64, topk: 512, ns: [16, 32, 64, 256] },
  { ratio: 4, hQ: 128, topk: 1024, ns: [16, 32, 64, 256] },
  { ratio: 4, hQ: 16, topk: 1024, ns: [16, 32, 64, 256] },
  { ratio: 128, hQ: 64, ns: [16, 64, 256, 512, 1024] },
  { ratio: 128, hQ: 128, ns: [16, 64, 256, 512, 1024] },
  { ratio: 128, hQ: 16, ns: [16, 64, 256, 512, 1024] },
  { ratio: 0, hQ: 64, ns: [16, 64, 256, 512, 1024] },
  { ratio: 0, hQ: 128, ns: [16, 64, 256, 512, 1024] },
  { ratio: 0, hQ: 16, ns: [16, 64, 256, 512, 1024] },
].filter((k) => RATIOS.includes(k.ratio) && HEADS.includes(k.hQ)).map((k) => ({ ...k, ns: NS ?? (hostEngine ? HOST_NS : k.ns) }));
const points = [];
for (const prefix of PREFIXES) {
  const most = prefix + Math.max(...CASES.flatMap((k) => k.ns));
  const swa = await v4Cache(most);
  const comp = { 4: await v4Cache(Math.floor(most / 4)), 128: await v4Cache(Math.floor(most / 128)) };
  for (const c of CASES) {
    let wins = 0;
    for (const N of c.ns) {
      if (wins >= 2) break;
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
        const r = await prefillLayer(engine, { plan, compressRatio: c.ratio, q, caches, ...(topk ? { topkIndices: topk } : {}), attnSink: sink, smScale: 1 / Math.sqrt(512), path }, layerOptions);
        for (const t of [r.out, r.lse, r.maxLogits]) free(t);
      };
      const kind = `${c.ratio}/${c.hQ}`;
      if (!warmed.has(kind)) {
        warmed.add(kind);
        for (const path of ['sparse', 'paged']) {
          const t0 = performance.now();
          for (let l = 0; l < WARMUP && performance.now() - t0 < WARMUP_MS; l++) await layer(path);
        }
        await engine.synchronize();
      }
      const runs = { sparse: [], paged: [] };
      // the process's CPU µs a layer (every thread, workers too): the work, which other processes'
      // load moves less than the wall clock (but it counts a path's serial part once where the wall
      // clock of an idle host would too, and its parallel part once per thread)
      const cpu = { sparse: [], paged: [] };
      // host µs from each layer's call until its promise resolved (the JS thread's share of a layer)
      const resolve = { sparse: [], paged: [] };
      // auto: the warm-up run is one layer a path, and sets the point's layer count
      let layers = AUTO_LAYERS ? 1 : Number(LAYERS_ARG);
      const warmupMs = { sparse: 0, paged: 0 };
      for (let r = 0; r <= ROUNDS; r++) {
        if (r === 1 && AUTO_LAYERS) layers = Math.max(1, Math.round(RUN_MS / Math.max(warmupMs.sparse, warmupMs.paged)));
        // each round's order the other way round: neither path always runs first after the other
        for (const path of r % 2 === 0 ? ['sparse', 'paged'] : ['paged', 'sparse']) {
          await engine.synchronize();
          const t0 = performance.now(), u0 = process.cpuUsage();
          for (let l = 0; l < layers; l++) {
            const c0 = performance.now();
            await layer(path);
            if (r > 0) resolve[path].push((performance.now() - c0) * 1000);
          }
          await engine.synchronize();
          // DROPPED=later: a run ends once its layers' dropped totals are in too
          if (env.DROPPED) await plan.settleDropped();
          const u = process.cpuUsage(u0);
          if (r > 0) runs[path].push(((performance.now() - t0) * 1000) / layers);
          if (r > 0) cpu[path].push((u.user + u.system) / layers);
          else warmupMs[path] = performance.now() - t0;
        }
      }
      const s = median(runs.sparse), p = median(runs.paged);
      // each round's two runs ran back to back and saw much the same load from other processes (a
      // shared host): the median of their ratios is the figure that load moves least
      const paired = median(runs.paged.map((x, i) => x / runs.sparse[i]));
      const rs = median(resolve.sparse), rp = median(resolve.paged);
      const name = `c${c.ratio} hQ ${c.hQ}${c.topk ? ` topk ${c.topk}` : ''} prefix ${prefix} N ${N}`;
      wins = paired >= STOP ? wins + 1 : 0;
      points.push({ ratio: c.ratio, hQ: c.hQ, topk: c.topk ?? 0, prefix, queries: N, layers, sparse_us: s, paged_us: p, paged_over_sparse: p / s, paged_over_sparse_paired: paired, sparse_cpu_us: median(cpu.sparse), paged_cpu_us: median(cpu.paged), paged_over_sparse_cpu: median(cpu.paged) / median(cpu.sparse), load_1min: loadavg()[0], sparse_resolve_us: rs, paged_resolve_us: rp, sparse_runs_us: runs.sparse, paged_runs_us: runs.paged });
      console.log(`${name}: sparse ${s.toFixed(1)} µs, paged ${p.toFixed(1)} µs a layer (${ROUNDS} runs of ${layers}), paged / sparse ${(p / s).toFixed(2)}, paired ${paired.toFixed(2)}, CPU time ${(median(cpu.paged) / median(cpu.sparse)).toFixed(2)}, load ${loadavg()[0].toFixed(1)} (a call resolves in ${rs.toFixed(1)} / ${rp.toFixed(1)} µs)`);
      for (const t of [q, sink, topk]) if (t) free(t);
    }
  }
  for (const t of [swa, comp[4], comp[128]]) free(t);
}

const thresholds = chooseThresholds(points);
if (outFile) {
  const vars = ['SPARSE_MLA_BACKEND', 'HOST', 'SHARED', 'PREFIXES', 'RATIOS', 'HEADS', 'NS', 'WARMUP', 'WARMUP_MS', 'RUN_MS', 'STOP', 'DROPPED'].filter((k) => env[k] !== undefined && env[k] !== '').map((k) => `${k}=${env[k]}`);
  const command = [...vars, 'node bench/layer_paths_wall.mjs', ROUNDS, LAYERS_ARG].join(' ');
  const report = { date: new Date().toISOString(), command, backend: engine.backend, workers: engine.workers, memory: output, dropped: env.DROPPED || 'await', rounds: ROUNDS, layers: LAYERS_ARG, warmup: WARMUP, warmup_ms: WARMUP_MS, run_ms: AUTO_LAYERS ? RUN_MS : undefined, stop: STOP, points, thresholds };
  writeFileSync(outFile, `${JSON.stringify(report, null, 2)}\n`);
}
await engine.dispose();
