// A cuda engine over a stub of the addon's cuda op table, for the host-JS layer benchmarks
// (layer_host_js.mjs, layer_host_cold.mjs): buffers and streams without a device (sizes only),
// layer programs that name their slots and hand back their outputs as the addon does, and ops that
// do nothing and settle at once (as the addon's ops with device operands do), so only the library's
// own JS is timed.
//   stubCudaEngine(dist, onOp): dist = a build's dist/ (absolute path); onOp(t) is called with
//   performance.now() at every op call. Returns { engine, backend, prefillLayer, c4Layer(N, hQ, topk) },
//   c4Layer giving the layer bench's operands: one fresh request, device q / caches / top-k / sink.
import { performance } from 'node:perf_hooks';
import { freshC4Chunk } from './lib.mjs';

export async function stubCudaEngine(dist, onOp = () => {}) {
  const { createPlan, prefillLayer } = await import(`${dist}/index.js`);
  const { SparseMlaEngine } = await import(`${dist}/engine.js`);
  const { CudaBackend } = await import(`${dist}/backends/native/cuda_backend.js`);
  const { v4PageBytes } = await import(`${dist}/kv_cache_layout.js`);

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
    query() {
      return true;
    }
    synchronize() {
      return Promise.resolve();
    }
  }
  const settled = () => {
    onOp(performance.now());
    return Promise.resolve();
  };
  class StubProgram {
    constructor(params, stream) {
      this.slots = [];
      // a workspace layer's parts, or a paged layer's one op
      const parts = params.paged
        ? [['paged', params.paged]]
        : [...(params.planRows ? [['planRows', params.planRows]] : []), ...params.dequants.map((d, i) => [`dequants.${i}`, d]), ['prefill', params.prefill]];
      for (const [name, part] of parts) for (const [field, v] of Object.entries(part)) if (v instanceof StubBuffer) this.slots.push(`${name}.${field}`);
      this.stream = stream;
      this.rows = params.paged ? params.paged.n * params.paged.hQ : params.prefill.sQ * params.prefill.hQ;
    }
    // run queues the whole layer and hands back its outputs; being a promise too, and with finish
    // and abandon, it also serves a build before one call per layer (LAYER_DIST, --vs), whose
    // program reads its outputs as slots
    run() {
      const done = settled();
      return Object.assign(done, { done, out: new StubBuffer(this.rows * 1024, this.stream), maxLogits: new StubBuffer(this.rows * 4, this.stream), lse: new StubBuffer(this.rows * 4, this.stream) });
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
  const c4Layer = (N, hQ, topk) => {
    return {
      plan: createPlan(freshC4Chunk(N)),
      q: deviceTensor('bf16', [N, hQ, 512], N * hQ * 512 * 2),
      caches: { swa: deviceCache(N / 64), c4: deviceCache(N / 4 / 64) },
      topkIndices: deviceTensor('int32', [N, topk], N * topk * 4),
      attnSink: deviceTensor('float32', [hQ], hQ * 4),
    };
  };
  return { engine, backend, prefillLayer, c4Layer };
}
