// The JS host cost of a device c4 layer (prefillLayer(engine, …, { output: 'device' }) on the cuda
// backend's code path), measurable on any machine: the CudaBackend runs over a stub of the addon's
// cuda op table whose ops do nothing and settle at once (as the addon's ops with device operands
// do), so what is timed is the library's own JS — argument checks, plan lookups, the layer steps,
// operand marshalling — and none of the addon's or the driver's time (those need a GPU:
// bench/layer_probe.mjs). Shapes as the layer section of `sparse-mla bench --backend cuda`: one
// fresh request, hQ 64, top-k 512. Prints medians of REPEAT layers after WARMUP:
//   first op   µs from the call to the layer's first op call (planRows; from the second layer of a
//              plan on, the layer program's run)
//   resolved   µs from the call until its promise resolved
//   ops        the op calls a layer made
//   node bench/layer_host_js.mjs            (LAYER_N=4096,32768  REPEAT=2000  IDLE_MS=1  LAYER_DIST=/abs/dist)
import { performance } from 'node:perf_hooks';
import { median } from './lib.mjs';
import { stubCudaEngine } from './stub_cuda_engine.mjs';
// LAYER_DIST: another build's dist/ to time (an absolute path; default this checkout's)
const dist = process.env.LAYER_DIST ?? new URL('../dist', import.meta.url).pathname;
const SIZES = (process.env.LAYER_N ?? '4096').split(',').map(Number);
const REPEAT = Number(process.env.REPEAT ?? 2000), WARMUP = Math.min(500, REPEAT);
const HQ = 64, TOPK = 512;
// the thread idles this long before each layer, as it does waiting for the previous layer's device work
const IDLE_MS = Number(process.env.IDLE_MS ?? 0);

let opCalls = 0, firstOpAt = NaN;
const { engine, prefillLayer, c4Layer } = await stubCudaEngine(dist, (t) => {
  if (opCalls++ === 0) firstOpAt = t;
});

for (const N of SIZES) {
  const { plan, q, caches, topkIndices, attnSink } = c4Layer(N, HQ, TOPK);
  const args = { plan, compressRatio: 4, q, caches, topkIndices, attnSink, smScale: 1 / Math.sqrt(512), path: 'sparse' };
  const first = [], resolved = [];
  let opsPerLayer = 0;
  for (let i = 0; i < WARMUP + REPEAT; i++) {
    if (IDLE_MS > 0) await new Promise((resolve) => setTimeout(resolve, IDLE_MS));
    opCalls = 0;
    const t0 = performance.now();
    const r = await prefillLayer(engine, args, { output: 'device' });
    const t1 = performance.now();
    for (const x of [r.out, r.lse, r.maxLogits]) x.data.free();
    if (i >= WARMUP) first.push(firstOpAt - t0), resolved.push(t1 - t0);
    opsPerLayer = opCalls;
  }
  const us = (x) => (x * 1000).toFixed(1);
  console.log(`N = ${N}: first op ${us(median(first))} µs, resolved ${us(median(resolved))} µs (medians of ${REPEAT}); ${opsPerLayer} op calls a layer`);
}
