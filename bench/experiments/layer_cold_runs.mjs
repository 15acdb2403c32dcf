// What the first layers of a process pay: the 4K device c4 layer run as the GPU bench's layer
// section runs it (a first layer, then runs alternating a timed and an untimed layer, L2 flushed
// before each), per untimed run its wall clock (call to synchronize resolved), when prefillLayer
// resolved, and the garbage collections that ran inside it (PerformanceObserver 'gc'), so a cold
// run's excess can be told apart as the collector's or the JS tiers'. Prints one line per run and a
// JSON summary on the last line. Also the device memory a run took from the driver (cudaMemGetInfo
// before and after), to tell a memory pool still growing. Run it under different V8 flags to compare, e.g.
//   node bench/experiments/layer_cold_runs.mjs
//   node --max-semi-space-size=64 bench/experiments/layer_cold_runs.mjs
//   node --always-sparkplug bench/experiments/layer_cold_runs.mjs
//   LCR_SPANS=1 node bench/experiments/layer_cold_runs.mjs   (the wall clock split: device span / host)
// GPU only; `npm run build` first (or the dist of bench/device/ship.sh).
import { PerformanceObserver, performance } from 'node:perf_hooks';
import { createEngine, prefillLayer } from '../../dist/index.js';
import { engineBackend } from '../../dist/engine.js';
import { CudaBackend } from '../../dist/backends/native/cuda_backend.js';
import { makeRng } from '../../dist/check/grid.js';
import { c4DeviceLayer } from '../device_inputs.mjs';

const N = 4096, HQ = 64, TOPK = 512, MiB = 2 ** 20;
const RUNS = Number(process.env.LCR_RUNS ?? 40);
const SPANS = process.env.LCR_SPANS === '1';
const gcs = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) gcs.push({ start: e.startTime, ms: e.duration, kind: e.detail?.kind ?? e.kind });
}).observe({ entryTypes: ['gc'] });

const engine = await createEngine({ backend: 'cuda' });
const be = engineBackend(engine, CudaBackend);
const rng = makeRng(0x5eed);
const layerInputs = await c4DeviceLayer(engine, rng, N, HQ, TOPK);
const flushA = be.alloc(256 * MiB), flushB = be.alloc(256 * MiB);
const markA = be.alloc(4096), markB = be.alloc(4096);
let resolvedAt = 0;
const layer = async () => {
  const r = await prefillLayer(engine, layerInputs.args, { output: 'device' });
  resolvedAt = performance.now();
  for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
};
await layer();
await engine.synchronize();

const runs = [];
for (let i = 0; i < RUNS; i++) {
  // the timed layer (events on), as kernelsAndWall's time(fn)
  be.setTiming(true);
  await be.copyDevice(flushA, flushB);
  await layer();
  const kernelMs = be.takeKernelMs().slice(1).reduce((a, b) => a + b, 0);
  be.setTiming(false);
  // the untimed layer, as its wallClock(fn); with LCR_SPANS=1 between two small timed copies, as
  // the bench's firstLaunchWait runs it, so the wall clock splits into the device's span (its
  // kernels and its waits for the host's launches) and the host's rest (its first copy's launch
  // and seeing the device done)
  await be.copyDevice(flushA, flushB);
  await engine.synchronize();
  const freeBefore = be.memInfo().free;
  if (SPANS) be.setTiming(true), be.takeKernelSpans();
  const t0 = performance.now();
  if (SPANS) await be.copyDevice(markA, markB), be.setTiming(false);
  await layer();
  if (SPANS) be.setTiming(true), await be.copyDevice(markA, markB);
  await engine.synchronize();
  const t1 = performance.now();
  let spanMs = NaN;
  if (SPANS) {
    const [before, after] = be.takeKernelSpans();
    spanMs = after[0] - before[1];
    be.setTiming(false);
  }
  const inside = gcs.filter((g) => g.start >= t0 && g.start < t1);
  runs.push({ wallMs: t1 - t0, kernelMs, resolvedMs: resolvedAt - t0, gcMs: inside.reduce((a, g) => a + g.ms, 0), gcs: inside.length, spanMs, poolGrowMiB: (freeBefore - be.memInfo().free) / MiB });
}
for (const [i, r] of runs.entries()) {
  console.log(`run ${String(i + 1).padStart(2)}: wall ${r.wallMs.toFixed(3)} ms, kernels ${r.kernelMs.toFixed(3)}, ratio ${(r.wallMs / r.kernelMs).toFixed(3)}, resolved at ${r.resolvedMs.toFixed(3)} ms, gc ${r.gcs} (${r.gcMs.toFixed(3)} ms), device memory taken in the run ${r.poolGrowMiB.toFixed(1)} MiB${SPANS ? `, device span ${r.spanMs.toFixed(3)} ms (waits ${(1000 * (r.spanMs - r.kernelMs)).toFixed(1)} µs), host past it ${(1000 * (r.wallMs - r.spanMs)).toFixed(1)} µs` : ''}`);
}
const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const ratios = runs.map((r) => r.wallMs / r.kernelMs);
console.log(JSON.stringify({ flags: process.execArgv, firstTen: median(ratios.slice(3, 13)), next: median(ratios.slice(13)), gcRuns: runs.filter((r) => r.gcs > 0).length, ratios: ratios.map((x) => +x.toFixed(3)), resolvedMs: runs.map((r) => +r.resolvedMs.toFixed(3)), poolGrowRuns: runs.filter((r) => r.poolGrowMiB !== 0).length, ...(SPANS ? { deviceWaitUs: runs.map((r) => +(1000 * (r.spanMs - r.kernelMs)).toFixed(1)), hostPastUs: runs.map((r) => +(1000 * (r.wallMs - r.spanMs)).toFixed(1)) } : {}) }));
layerInputs.free();
flushA.free();
markA.free();
markB.free();
flushB.free();
await engine.dispose();
