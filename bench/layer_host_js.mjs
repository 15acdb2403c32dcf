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
// LAYER_DIST: another build's dist/ to time (an absolute path; default this checkout's)
const dist = process.env.LAYER_DIST ?? new URL('../dist', import.meta.url).pathname;
const { createPlan, prefillLayer } = await import(`${dist}/index.js`);
const { SparseMlaEngine } = await import(`${dist}/engine.js`);
const { CudaBackend } = await import(`${dist}/backends/native/cuda_backend.js`);
const { v4PageBytes } = await import(`${dist}/kv_cache_layout.js`);

const SIZES = (process.env.LAYER_N ?? '4096').split(',').map(Number);
const REPEAT = Number(process.env.REPEAT ?? 2000), WARMUP = Math.min(500, REPEAT);
const HQ = 64, TOPK = 512;
// the thread idles this long before each layer, as it does waiting for the previous layer's device work
const IDLE_MS = Number(process.env.IDLE_MS ?? 0);
const med = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** The addon's buffer and stream classes without a device: sizes only. */
class StubBuffer {
  constructor(bytes, stream) {
    this.byteLength = bytes;
    this.device = stream.device;
    this.freed = false;
  }
  free() {
    this.freed = true;
  }
}
class StubStream {
  constructor(device) {
    this.device = device;
  }
  synchronize() {
    return Promise.resolve();
  }
}

let opCalls = 0, firstOpAt = NaN;
const settled = () => {
  if (opCalls++ === 0) firstOpAt = performance.now();
  return Promise.resolve();
};
/** The addon's layer program without a device: its slots as the addon names them, runs that settle at once. */
class StubProgram {
  constructor(params) {
    this.slots = [];
    const parts = [...(params.planRows ? [['planRows', params.planRows]] : []), ...params.dequants.map((d, i) => [`dequants.${i}`, d]), ['prefill', params.prefill]];
    for (const [name, part] of parts) for (const [field, v] of Object.entries(part)) if (v instanceof StubBuffer) this.slots.push(`${name}.${field}`);
  }
  run() {
    return settled();
  }
  finish() {
    return settled();
  }
  abandon() {}
}
const ops = {
  streamClass: () => StubStream,
  deviceBufferClass: () => StubBuffer,
  layerProgramClass: () => StubProgram,
  sparsePrefill: settled,
  pagedSparseAttention: settled,
  dequantizeKvCache: settled,
  planRows: settled,
  planCompressedTokenIds: settled,
  upload: settled,
  download: settled,
  copyDevice: settled,
  setTiming() {},
};
const backend = new CudaBackend(/* addon: only the host CPU core reads it (quantizeKCache) */ {}, ops, 1);
const engine = new SparseMlaEngine(backend);
const deviceTensor = (dtype, shape, bytes) => ({ dtype, shape, data: backend.alloc(bytes) });
const deviceCache = (pages) => ({ format: 'v4', pageSize: 64, numPages: pages, data: backend.alloc(v4PageBytes(64) * pages) });

for (const N of SIZES) {
  const nComp = N / 4;
  const plan = createPlan({
    requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: Int32Array.from({ length: nComp / 64 }, (_, i) => i) }],
    c4PageSize: 64,
  });
  const args = {
    plan,
    compressRatio: 4,
    q: deviceTensor('bf16', [N, HQ, 512], N * HQ * 512 * 2),
    caches: { swa: deviceCache(N / 64), c4: deviceCache(nComp / 64) },
    topkIndices: deviceTensor('int32', [N, TOPK], N * TOPK * 4),
    attnSink: deviceTensor('float32', [HQ], HQ * 4),
    smScale: 1 / Math.sqrt(512),
    path: 'sparse',
  };
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
  console.log(`N = ${N}: first op ${us(med(first))} µs, resolved ${us(med(resolved))} µs (medians of ${REPEAT}); ${opsPerLayer} op calls a layer`);
}
