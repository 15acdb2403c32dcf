#!/usr/bin/env node
// Where a small layer's wall clock goes, down each path (diagnostic for bench/layer_paths_wall.mjs's
// prefix split): every native op a layer calls, wrapped to record the host µs of its synchronous part
// (call to return) and until its promise settles, plus the µs from the layer's call to its first op;
// then, with the addon's timing events on, each launch's device span within one layer. Same inputs
// as layer_paths_wall.mjs (device q, caches, sink, outputs; one request of prefix + N tokens).
// Usage (dist built, a cuda addon): [PREFIXES=0,32768] [RATIO=0] [HQ=64] [N=16] node bench/experiments/layer_path_trace.mjs
import { createEngine, createPlan, prefillLayer, swaGatherLength, tensor, toBf16 } from '../../dist/index.js';
import { randomV4Cache } from '../device_inputs.mjs';

const PREFIXES = (process.env.PREFIXES ?? '0,32768').split(',').map(Number);
const RATIO = Number(process.env.RATIO ?? 0), HQ = Number(process.env.HQ ?? 64), N = Number(process.env.N ?? 16), W = 128;
let seed = 0x2345671;
const rand = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
const median = (xs) => (xs.length ? [...xs].sort((a, b) => a - b)[xs.length >> 1] : NaN);
const engine = await createEngine({ backend: 'cuda' });
const ops = engine.impl.ops; // the addon's op table (diagnostic access to a private field)
const log = [];
let layerStart = 0;
for (const name of Object.keys(ops)) {
  const f = ops[name];
  if (typeof f !== 'function' || ['setTiming', 'takeKernelMs', 'takeKernelSpans', 'memInfo'].includes(name)) continue;
  ops[name] = function (...a) {
    const t0 = performance.now();
    const r = f.apply(this, a);
    const t1 = performance.now();
    const rec = { name, fromLayer: (t0 - layerStart) * 1000, sync: (t1 - t0) * 1000, settle: NaN };
    log.push(rec);
    if (r && typeof r.then === 'function') r.then(() => (rec.settle = (performance.now() - t0) * 1000), () => undefined);
    return r;
  };
}

const v4Cache = (tokens) => randomV4Cache(engine, tokens, rand, true);

for (const prefix of PREFIXES) {
  const seqLen = prefix + N;
  const swa = await v4Cache(prefix + 1024);
  const comp = RATIO === 128 ? await v4Cache(Math.floor((prefix + 1024) / 128)) : undefined;
  const g = swaGatherLength(seqLen, N, W);
  const request = { seqLen, extendLen: N, swaTokenIds: Int32Array.from({ length: g }, (_, i) => seqLen - g + i) };
  if (RATIO === 128) request.c128PageTable = Int32Array.from({ length: Math.max(1, Math.ceil(Math.floor(seqLen / 128) / 64)) }, (_, i) => i);
  const plan = createPlan({ requests: [request], ...(RATIO === 128 ? { c128PageSize: 64 } : {}) });
  const q = await engine.upload(toBf16({ shape: [N, HQ, 512], data: Float32Array.from({ length: N * HQ * 512 }, () => rand() * 2 - 1) }));
  const sink = await engine.upload(tensor('float32', [HQ], Float32Array.from({ length: HQ }, () => rand())));
  const caches = RATIO === 0 ? { swa } : { swa, c128: comp };
  const layer = async (path) => {
    layerStart = performance.now();
    const r = await prefillLayer(engine, { plan, compressRatio: RATIO, q, caches, attnSink: sink, smScale: 1 / Math.sqrt(512), path }, { output: 'device' });
    const end = performance.now();
    for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
    return (end - layerStart) * 1000;
  };
  for (const path of ['sparse', 'paged']) for (let l = 0; l < 300; l++) await layer(path);
  await engine.synchronize();
  for (const path of ['sparse', 'paged']) {
    log.length = 0;
    const resolve = [];
    for (let l = 0; l < 40; l++) resolve.push(await layer(path));
    await engine.synchronize();
    const byName = new Map();
    for (const r of log) {
      const k = byName.get(r.name) ?? { n: 0, sync: [], settle: [], from: [] };
      k.n++;
      k.sync.push(r.sync);
      k.settle.push(r.settle);
      k.from.push(r.fromLayer);
      byName.set(r.name, k);
    }
    console.log(`c${RATIO} hQ ${HQ} N ${N} prefix ${prefix} ${path}: a layer resolves in ${median(resolve).toFixed(1)} µs (median of 40)`);
    for (const [name, k] of byName)
      console.log(`  ${name} x${k.n / 40}: starts ${median(k.from).toFixed(1)} µs into the layer, returns in ${median(k.sync).toFixed(1)} µs, settles in ${median(k.settle).toFixed(1)} µs`);
    engine.impl.ops.setTiming(true);
    for (let l = 0; l < 5; l++) await layer(path);
    const spans = engine.impl.ops.takeKernelSpans(engine.impl.stream);
    engine.impl.ops.setTiming(false);
    const last = [];
    for (let i = 0; i < spans.length; i += 2) last.push(`[${spans[i].toFixed(3)}, ${spans[i + 1].toFixed(3)}]`);
    console.log(`  device spans of 5 layers (ms from the first launch): ${last.join(' ')}`);
  }
  for (const t of [q, sink, swa, comp]) if (t) t.data.free();
}
await engine.dispose();
