// Per-run host timeline of the 4K device c4 layer (the bench's wall-clock loop), for joining with
// an instrumented addon's in-run() stamps (SMLA_TRACE_FILE). Writes JSON to argv[2].
import { writeFileSync } from 'node:fs';
import { createEngine, createPlan, prefillLayer, tensor } from '../../dist/index.js';
import { engineBackend } from '../../dist/engine.js';
import { CudaBackend } from '../../dist/backends/native/cuda_backend.js';
import { makeRng } from '../../dist/check/grid.js';
import { deviceInputs } from '../device_inputs.mjs';

const N = Number(process.env.LWT_N ?? 4096), HQ = 64, TOPK = 512, MiB = 2 ** 20;
const RUNS = Number(process.env.LWT_RUNS ?? 200), JIT = Number(process.env.LWT_JIT ?? 300);
const now = () => Number(process.hrtime.bigint());
const engine = await createEngine({ backend: 'cuda' });
const be = engineBackend(engine, CudaBackend);
const rng = makeRng(0x5eed);
const { randomDevice, deviceCache, c4TopkIndices } = deviceInputs(engine, rng);
const flushA = be.alloc(256 * MiB), flushB = be.alloc(256 * MiB);
const nComp = N / 4;
const plan = createPlan({ requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: Int32Array.from({ length: nComp / 64 }, (_, i) => i) }], c4PageSize: 64 });
const swa = await deviceCache(N / 64), c4 = await deviceCache(nComp / 64);
const q = await randomDevice([N, HQ, 512]);
const sink = await engine.upload(tensor('float32', [HQ], Float32Array.from({ length: HQ }, () => rng.normal())));
const topkIdx = c4TopkIndices(N, TOPK);
const topk = await engine.upload(tensor('int32', [N, TOPK], topkIdx));
let tRet = 0;
const layer = async () => {
  const r = await prefillLayer(engine, { plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, attnSink: sink, smScale: 1 / Math.sqrt(512), path: 'sparse' }, { output: 'device' });
  tRet = now();
  for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
};
await layer();
await engine.synchronize();
const kernels = async (n) => {
  be.setTiming(true);
  const out = [];
  for (let i = 0; i < n; i++) {
    await be.copyDevice(flushA, flushB);
    await layer();
    const [, ...l] = be.takeKernelMs();
    out.push(l.reduce((a, b) => a + b, 0));
  }
  be.setTiming(false);
  return out;
};
const walls = async (n, rec) => {
  for (let i = 0; i < n; i++) {
    await be.copyDevice(flushA, flushB);
    await engine.synchronize();
    const t0 = now();
    await layer();
    const t1 = now();
    await engine.synchronize();
    const t2 = now();
    if (rec) rec.push([t0, tRet, t1, t2]);
  }
};
const cold = { kernels: await kernels(13), walls: [] };
await walls(RUNS, cold.walls);
await walls(JIT, null);
const warm = { kernels: await kernels(13), walls: [] };
await walls(RUNS, warm.walls);
writeFileSync(process.argv[2], JSON.stringify({ N, cold, warm }));
for (const x of [q, topk, sink, swa, c4]) x.data.free();
flushA.free();
flushB.free();
await engine.dispose();
