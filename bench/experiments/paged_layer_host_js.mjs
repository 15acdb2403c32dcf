// The library's own JS per c0 layer down each path on the stub cuda engine (bench/stub_cuda_engine.mjs:
// ops that do nothing), device operands and outputs: what of a paged layer's wall clock on the GPU is JS.
// Prints the median µs from the call until its promise resolved, over layers 1000-2999 of each run,
// the paths alternated twice.   node bench/experiments/paged_layer_host_js.mjs
import { performance } from 'node:perf_hooks';
import { stubCudaEngine } from '../stub_cuda_engine.mjs';

const { prefillLayer, engine, c4Layer } = await stubCudaEngine(new URL('../../dist', import.meta.url).pathname);
const med = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
for (const N of [256, 1024]) {
  const { plan, q, caches, attnSink } = c4Layer(N, 64, 512);
  for (const path of ['sparse', 'paged', 'sparse', 'paged']) {
    const ts = [];
    for (let i = 0; i < 3000; i++) {
      const t0 = performance.now();
      const r = await prefillLayer(engine, { plan, compressRatio: 0, q, caches: { swa: caches.swa }, attnSink, smScale: 0.04, path }, { output: 'device' });
      ts.push(performance.now() - t0);
      for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
    }
    console.log(`c0 N ${N} ${path}: ${(med(ts.slice(1000)) * 1000).toFixed(1)} µs`);
  }
}
