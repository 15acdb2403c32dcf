// Per-run host timeline of the 4K device c4 layer (the bench's wall-clock loop), for joining with
// an instrumented addon's in-run() stamps (SMLA_TRACE_FILE). Writes JSON to argv[2].
import { writeFileSync } from 'node:fs';
import { createEngine, prefillLayer } from '../../dist/index.js';
import { engineBackend } from '../../dist/engine.js';
import { CudaBackend } from '../../dist/backends/native/cuda_backend.js';
import { makeRng } from '../../dist/check/grid.js';
import { c4DeviceLayer } from '../device_inputs.mjs';

const N = Number(process.env.LWT_N ?? 4096), HQ = 64, TOPK = 512, MiB = 2 ** 20;
const RUNS = Number(process.env.LWT_RUNS ?? 200), JIT = Number(process.env.LWT_JIT ?? 300);
const now = () => Number(process.hrtime.bigint());
const engine = await createEngine({ backend: 'cuda' });
const be = engineBackend(engine, CudaBackend);
const rng = makeRng(0x5eed);
const layerInputs = await c4DeviceLayer(engine, rng, N, HQ, TOPK);
const flushA = be.alloc(256 * MiB), flushB = be.alloc(256 * MiB);
let tRet = 0;
const layer = async () => {
  const r = await prefillLayer(engine, layerInputs.args, { output: 'device' });
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
layerInputs.free();
flushA.free();
flushB.free();
await engine.dispose();
