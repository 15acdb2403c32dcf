/**
 * A stub of the addon's `cuda` op table for the API fuzzer (no GPU needed): cuda engines of the
 * real CudaBackend over stand-in streams, device buffers and layer programs.
 *
 * - Device buffers hold their bytes in host memory (so upload / download / copies round-trip
 *   exactly); views hold their base's allocation as the addon's do; every allocation not yet given
 *   back is in `live` (the leak check).
 * - Kernel ops compute nothing (their outputs stay as they were) and settle at once. Before that
 *   each reads its params object as the addon's binding files do (native/addon/sparse_prefill.h,
 *   paged_sparse_attention.h, kv_cache.h + cuda_ops.h's ReadDequantize, planner.h, cuda_stream.cpp's
 *   CudaFields::Read / BufferOf, layer_program.cpp): scalars in their ranges, every array a host
 *   typed array of exactly its type and element count or a live DeviceBuffer of the stream's device
 *   of exactly its bytes. What the addon would refuse (SMLA_ADDON_ARGUMENT, a BACKEND_FAILURE on the
 *   TS side) is refused here too and recorded in `faults`: the library handed the addon arguments
 *   its own checks should have stopped.
 * - `reached` counts the op calls (kernels, copies, layer programs made and run), so the fuzzer
 *   sees whether a refused call did any work first.
 *
 *   const stub = await stubCuda(distDir); const { engine } = stub.makeEngine(0);
 */
import { types } from 'node:util';

const INT32_MAX = 0x7fffffff;
const TYPED_ARRAY_PROTOTYPE = Object.getPrototypeOf(Uint8Array.prototype);
const kindOf = Object.getOwnPropertyDescriptor(TYPED_ARRAY_PROTOTYPE, Symbol.toStringTag).get;
const lengthOf = Object.getOwnPropertyDescriptor(TYPED_ARRAY_PROTOTYPE, 'length').get;
const ELEMENT = { u8: ['Uint8Array', 1], u16: ['Uint16Array', 2], i32: ['Int32Array', 4], f32: ['Float32Array', 4], i64: ['BigInt64Array', 8] };
/** Backing bytes are kept only up to this size (beyond it a buffer is sizes only). */
const MAX_BACKED = 64 << 20;

/** The kind of a real typed array (napi's IsTypedArray: a Proxy of one is not), else undefined. */
function typedKind(v) {
  return typeof v === 'object' && v !== null && !types.isProxy(v) ? kindOf.call(v) : undefined;
}

export async function stubCuda(dist) {
  const { CudaBackend } = await import(`${dist}/backends/native/cuda_backend.js`);
  const { SparseMlaEngine } = await import(`${dist}/engine.js`);
  const { loadNativeAddon } = await import(`${dist}/backends/native/binding.js`);
  const { v4PageBytes, V32_TOKEN_BYTES } = await import(`${dist}/kv_cache_layout.js`);
  const load = loadNativeAddon();
  // quantizeKCache runs on the host CPU core: the real addon's when it is built
  const addon = load.ok ? load.addon : null;

  // STUB_CUDA_TRACE=1: every op call on stderr (replaying a case)
  const trace = process.env.STUB_CUDA_TRACE ? (what) => process.stderr.write(`stub: ${what}\n`) : null;
  const stub = {
    /** allocations not yet given back */
    live: new Set(),
    /** what the addon would have refused or faulted on, one line each */
    faults: [],
    /** op calls so far */
    reached: 0,
    /** allocations so far (views excluded) */
    allocs: 0,
    hostCore: addon !== null,
    hostCoreWhyNot: load.ok ? null : load.reason,
    makeEngine,
  };

  class Allocation {
    constructor(bytes) {
      this.bytes = bytes;
      this.refs = 0;
      this.data = bytes <= MAX_BACKED ? new Uint8Array(bytes) : null;
      stub.live.add(this);
    }
    drop() {
      if (--this.refs === 0) stub.live.delete(this);
    }
  }

  class StubStream {
    constructor(device) {
      if (typeof device !== 'number') argError('stream', 'device: expected a device index');
      this.device = device;
    }
    query() {
      return true;
    }
    synchronize() {
      return Promise.resolve();
    }
  }

  class StubBuffer {
    #alloc;
    #offset = 0;
    constructor(bytes, stream, base, byteOffset) {
      if (typeof bytes !== 'number' || !(bytes >= 0 && bytes <= Number.MAX_SAFE_INTEGER) || !Number.isInteger(bytes)) argError('alloc', 'bytes: expected a non-negative integer');
      if (!(stream instanceof StubStream)) argError('alloc', 'stream: expected a Stream');
      if (base !== undefined) {
        if (!(base instanceof StubBuffer) || base.freed) argError('alloc', 'base: expected a live DeviceBuffer');
        if (base.stream !== stream) argError('alloc', 'base: a buffer of another stream');
        if (typeof byteOffset !== 'number' || byteOffset < 0 || byteOffset % 256 !== 0) argError('alloc', 'byteOffset: expected a non-negative multiple of 256');
        if (byteOffset + bytes > base.byteLength) argError('alloc', `a view of ${bytes} bytes at ${byteOffset} does not fit a buffer of ${base.byteLength} bytes`);
        this.#alloc = base.#alloc;
        this.#offset = base.#offset + byteOffset;
      } else {
        stub.allocs++;
        this.#alloc = new Allocation(bytes);
      }
      this.#alloc.refs++;
      this.byteLength = bytes;
      this.stream = stream;
    }
    get device() {
      return this.stream.device;
    }
    get freed() {
      return this.#alloc === null;
    }
    free() {
      this.#alloc?.drop();
      this.#alloc = null;
    }
    /** @internal the buffer's bytes (null when freed or too large to back) */
    bytes() {
      const a = this.#alloc;
      return a?.data ? a.data.subarray(this.#offset, this.#offset + this.byteLength) : null;
    }
  }

  function argError(op, message) {
    const e = Object.assign(new Error(`${op}: ${message}`), { code: 'SMLA_ADDON_ARGUMENT' });
    stub.faults.push(e.message);
    throw e;
  }

  /** BufferOf: a live DeviceBuffer of the stream's device. */
  function bufferOf(op, v, name, stream) {
    if (!(v instanceof StubBuffer)) argError(op, `${name}: expected a DeviceBuffer`);
    if (v.freed) argError(op, `${name}: the device buffer was freed`);
    if (v.device !== stream.device) argError(op, `${name}: a buffer on device ${v.device}, this engine runs on device ${stream.device}`);
    return v;
  }

  /** A params object's reader: CudaFields over Args::Fields. */
  class Fields {
    constructor(op, params, stream, outputsLater = false) {
      if (typeof params !== 'object' || params === null || Array.isArray(params) || typedKind(params)) argError(op, 'params: expected a params object');
      this.op = op;
      this.p = params;
      this.stream = stream;
      this.outputsLater = outputsLater;
      this.operands = []; // [name, { device?, bytes, output }]
    }
    int(name, lo, hi) {
      const v = this.p[name];
      if (typeof v !== 'number') argError(this.op, `${name}: expected a number`);
      if (!(v >= lo && v <= hi) || !Number.isInteger(v)) argError(this.op, `${name}: expected an integer in [${lo}, ${hi}], got ${v}`);
      return v;
    }
    float(name) {
      if (typeof this.p[name] !== 'number') argError(this.op, `${name}: expected a number`);
      return this.p[name];
    }
    isNull(name) {
      return this.p[name] === null || this.p[name] === undefined;
    }
    onDevice(name) {
      const v = this.p[name];
      return typeof v === 'object' && v !== null && typedKind(v) === undefined;
    }
    /** A host typed array of exactly `count` elements of `el` (null allowed when nullable). */
    host(name, el, count, nullable) {
      const v = this.p[name];
      if (v === null || v === undefined) {
        if (nullable) return null;
        argError(this.op, `${name}: expected a ${ELEMENT[el][0]}, got null`);
      }
      const kind = typedKind(v);
      if (kind === undefined) argError(this.op, `${name}: expected a ${ELEMENT[el][0]}`);
      if (kind !== ELEMENT[el][0]) argError(this.op, `${name}: expected a ${ELEMENT[el][0]}, got a ${kind}`);
      if (lengthOf.call(v) !== count) argError(this.op, `${name}: expected ${count} elements, got ${lengthOf.call(v)}`);
      return v;
    }
    /** CudaFields::Read: a DeviceBuffer of exactly el * count bytes, or a host array of count elements. */
    read(name, el, count, output, nullable = false) {
      const v = this.p[name];
      const bytes = ELEMENT[el][1] * count;
      if (output && this.outputsLater) {
        if (v !== null && v !== undefined) argError(this.op, `${name}: expected null (bound per call)`);
        this.operands.push([name, { output, bytes }]);
        return null;
      }
      if (v !== null && typeof v === 'object' && typedKind(v) === undefined) {
        const b = bufferOf(this.op, v, name, this.stream);
        if (b.byteLength !== bytes) argError(this.op, `${name}: expected a device buffer of ${bytes} bytes, got ${b.byteLength}`);
        this.operands.push([name, { device: b, bytes, output }]);
        return b;
      }
      const h = this.host(name, el, count, nullable);
      this.operands.push([name, { bytes: h === null ? 0 : bytes, output, host: h }]);
      return h;
    }
  }

  const cacheBytes = (format, pageSize, numPages) => (format === 1 ? numPages * V32_TOKEN_BYTES : v4PageBytes(pageSize) * numPages);

  function readSparsePrefill(f) {
    const sQ = f.int('sQ', 0, INT32_MAX), hQ = f.int('hQ', 1, INT32_MAX), dQK = f.int('dQK', 1, INT32_MAX), dV = f.int('dV', 1, INT32_MAX);
    const sKV = f.int('sKV', 0, INT32_MAX), topk = f.int('topk', 0, INT32_MAX);
    f.float('smScale');
    const rows = sQ * hQ;
    f.read('q', 'u16', rows * dQK, false);
    f.read('kv', 'u16', sKV * dQK, false);
    f.read('indices', 'i32', sQ * topk, false);
    f.read('topkLength', 'i32', sQ, false, true);
    f.read('attnSink', 'f32', hQ, false, true);
    f.read('out', 'u16', rows * dV, true);
    f.read('maxLogits', 'f32', rows, true);
    f.read('lse', 'f32', rows, true);
    return { rows, dV };
  }

  function readPaged(f) {
    const n = f.int('n', 0, INT32_MAX), hQ = f.int('hQ', 1, INT32_MAX);
    const pageSize = f.int('pageSize', 1, INT32_MAX), numPages = f.int('numPages', 0, INT32_MAX), topk = f.int('topk', 0, INT32_MAX);
    const extra = !f.isNull('extraKCache');
    const ePage = f.int('extraPageSize', extra ? 1 : 0, INT32_MAX), ePages = f.int('extraNumPages', 0, INT32_MAX), eTopk = f.int('extraTopk', 0, extra ? INT32_MAX : 0);
    f.float('smScale');
    const rows = n * hQ;
    f.read('q', 'u16', rows * 512, false);
    f.read('kCache', 'u8', cacheBytes(0, pageSize, numPages), false);
    f.read('indices', 'i32', n * topk, false);
    f.read('topkLength', 'i32', n, false, true);
    if (extra) {
      f.read('extraKCache', 'u8', cacheBytes(0, ePage, ePages), false);
      f.read('extraIndices', 'i32', n * eTopk, false);
      f.read('extraTopkLength', 'i32', n, false, true);
    }
    f.read('attnSink', 'f32', hQ, false, true);
    f.read('out', 'u16', rows * 512, true);
    f.read('lse', 'f32', rows, true);
    f.read('maxLogits', 'f32', rows, true);
    return { rows };
  }

  /** ReadDequantize (cuda_ops.h) over ReadCacheGeometry (kv_cache.h). */
  function readDequantize(f) {
    const format = f.int('format', 0, 1);
    const pageSize = f.int('pageSize', 1, format === 1 ? 1 : INT32_MAX), numPages = f.int('numPages', 0, INT32_MAX), n = f.int('numTokens', 0, INT32_MAX);
    const dim = format === 1 ? 576 : 512;
    f.read('cache', 'u8', cacheBytes(format, pageSize, numPages), false);
    const deviceIds = f.onDevice('tokenIds');
    if (deviceIds) f.read('tokenIds', 'i64', n, false);
    else f.host('tokenIds', 'i32', n, false);
    let intoRows = false;
    if (!f.isNull('outRowOffset')) {
      intoRows = true;
      const row0 = f.int('outRowOffset', 0, INT32_MAX);
      const out = bufferOf(f.op, f.p.out, 'out', f.stream);
      if ((row0 + n) * dim * 2 > out.byteLength) argError(f.op, `out: rows [${row0}, ${row0 + n}) do not fit a buffer of ${out.byteLength} bytes`);
      f.operands.push(['out', { device: out, bytes: out.byteLength, output: true }]);
    } else {
      f.read('out', 'u16', n * dim, true);
    }
    return { deviceIds, intoRows };
  }

  /** ReadPlanRows (planner.h), and the launcher's check of numQueries against the requests. */
  function readPlanRows(f) {
    const nr = f.int('numRequests', 0, INT32_MAX);
    const seq = f.host('seqLens', 'i32', nr, false), ext = f.host('extendLens', 'i32', nr, false);
    f.int('window', 1, INT32_MAX);
    const ratio = f.int('ratio', 0, 128), topk = f.int('topk', 0, INT32_MAX), width = f.int('width', 0, INT32_MAX), nq = f.int('numQueries', 0, INT32_MAX);
    const topkIndices = f.read('topkIndices', 'i32', nq * topk, false, true);
    f.read('rows', 'i32', nq * width, true);
    f.read('lens', 'i32', nq, true);
    f.read('dropped', 'i32', nq, true, true);
    f.read('droppedTotal', 'i64', 1, true, true);
    let sum = 0;
    for (let r = 0; r < nr; r++) {
      if (ext[r] < 0 || seq[r] < ext[r]) argError(f.op, `request ${r}: seqLen ${seq[r]}, extendLen ${ext[r]}`);
      sum += ext[r];
    }
    if (sum !== nq) argError(f.op, `numQueries ${nq}: the requests have ${sum}`);
    if (ratio !== 0 && ratio !== 4 && ratio !== 128) argError(f.op, `ratio ${ratio}`);
    if ((ratio === 4) !== (topkIndices !== null || f.onDevice('topkIndices'))) argError(f.op, `ratio ${ratio} with${topkIndices === null ? 'out' : ''} topkIndices`);
  }

  function readPlanCompressedTokenIds(f) {
    const nr = f.int('numRequests', 0, INT32_MAX);
    const seq = f.host('seqLens', 'i32', nr, false), ext = f.host('extendLens', 'i32', nr, false);
    const offsets = f.host('pageTableOffsets', 'i64', nr + 1, false);
    const ratio = f.int('ratio', 4, 128);
    const tableLen = Number(offsets[nr]);
    if (tableLen < 0) argError(f.op, 'pageTableOffsets: expected non-negative offsets');
    f.int('pageSize', 1, INT32_MAX);
    const total = f.int('total', 0, INT32_MAX);
    f.read('pageTables', 'i32', tableLen, false);
    f.read('tokenIds', 'i64', total, true);
    let want = 0;
    for (let r = 0; r < nr; r++) want += ext[r] > 0 ? Math.floor(seq[r] / ratio) : 0;
    if (want !== total) argError(f.op, `total ${total}: the requests have ${want} compressed ids`);
  }

  const kernel = (op, read) => (params, stream, ...rest) => {
    stub.reached++;
    trace?.(`${op} on device ${stream?.device} ${JSON.stringify(params, (k, v) => (v instanceof StubBuffer ? `buffer(${v.byteLength} B, device ${v.device}${v.freed ? ', freed' : ''})` : ArrayBuffer.isView(v) ? `${v.constructor.name}(${v.length})` : v))}`);
    if (!(stream instanceof StubStream)) argError(op, 'stream: expected a Stream (the engine\'s)');
    if (rest.length) argError(op, `${rest.length} arguments too many`);
    read(new Fields(op, params, stream));
    return Promise.resolve();
  };

  /** upload / download: a live buffer of the stream's device and a typed array of exactly its bytes. */
  const transfer = (op, toDevice) => (buffer, data, stream) => {
    stub.reached++;
    trace?.(`${op} ${buffer?.byteLength} B on device ${stream?.device}`);
    if (!(stream instanceof StubStream)) argError(op, 'stream: expected a Stream');
    const b = bufferOf(op, buffer, 'buffer', stream);
    if (typedKind(data) === undefined && !(data instanceof DataView)) argError(op, 'data: expected a typed array');
    const view = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (view.length !== b.byteLength) argError(op, `data: expected ${b.byteLength} bytes, got ${view.length}`);
    const bytes = b.bytes();
    if (bytes) (toDevice ? bytes : view).set(toDevice ? view : bytes);
    return Promise.resolve();
  };

  class StubProgram {
    #stream;
    #inputs = []; // [name, bytes]
    #outputs = []; // [name, bytes]
    #combine = false;
    #paged = false;
    constructor(params, stream) {
      stub.reached++;
      trace?.(`new layerProgram (${params?.paged ? 'paged' : 'workspace'})`);
      const op = 'layerProgram';
      if (!(stream instanceof StubStream)) argError(op, 'stream: expected a Stream');
      this.#stream = stream;
      if (typeof params !== 'object' || params === null) argError(op, 'params: expected a params object');
      const parts = [];
      if (params.paged !== null && params.paged !== undefined) {
        if (![params.planRows, params.dequants, params.prefill].every((x) => x === null || x === undefined)) argError(op, 'paged: a paged layer\'s program has no planRows, dequants or prefill');
        const f = new Fields(op, params.paged, stream, true);
        readPaged(f);
        parts.push(['paged', f]);
        this.#paged = true;
      } else {
        if (params.planRows !== null && params.planRows !== undefined) {
          const f = new Fields(op, params.planRows, stream);
          readPlanRows(f);
          if (f.isNull('droppedTotal')) argError(op, 'planRows.droppedTotal: a combine in a layer program sums its dropped count on the device');
          parts.push(['planRows', f]);
          this.#combine = true;
        }
        if (!Array.isArray(params.dequants)) argError(op, 'dequants: expected an array of dequantizeKvCache params');
        params.dequants.forEach((d, i) => {
          const f = new Fields(op, d, stream);
          const r = readDequantize(f);
          if (!r.deviceIds || !r.intoRows) argError(op, `dequants.${i}: expected device tokenIds and an outRowOffset`);
          parts.push([`dequants.${i}`, f]);
        });
        if (params.dequants.length > 2) argError(op, 'dequants: a layer has at most two');
        const f = new Fields(op, params.prefill, stream, true);
        readSparsePrefill(f);
        parts.push(['prefill', f]);
      }
      const outputsOf = this.#paged ? 'paged.' : 'prefill.';
      for (const [part, f] of parts) {
        for (const [field, o] of f.operands) {
          const name = `${part}.${field}`;
          if (o.output && name.startsWith(outputsOf)) {
            this.#outputs.push([field, o.bytes]);
            continue;
          }
          if (!o.device) {
            if (o.bytes === 0) continue;
            argError(op, `${name}: expected a device buffer (a layer program queues device work only)`);
          }
          if (o.device.stream !== stream) argError(op, `${name}: a buffer of another engine's stream`);
          this.#inputs.push([name, o.device.byteLength]);
        }
      }
    }
    get slots() {
      return this.#inputs.map(([n]) => n);
    }
    run(droppedInto, smScale, ...inputs) {
      stub.reached++;
      trace?.(`layerProgram.run ${this.slots.join(', ')}`);
      const op = 'layerProgram.run';
      if (droppedInto !== null && droppedInto !== undefined) {
        if (!this.#combine) argError(op, 'droppedInto: this program has no combine');
        if (typedKind(droppedInto) !== 'BigInt64Array' || lengthOf.call(droppedInto) !== 1) argError(op, 'droppedInto: expected a BigInt64Array of 1 element');
      }
      if (typeof smScale !== 'number') argError(op, 'smScale: expected a number');
      if (inputs.length !== this.#inputs.length) argError(op, `expected ${2 + this.#inputs.length} arguments, got ${2 + inputs.length}`);
      this.#inputs.forEach(([name, bytes], i) => {
        const b = bufferOf(op, inputs[i], name, this.#stream);
        if (b.stream !== this.#stream) argError(op, `${name}: a buffer of another engine's stream`);
        if (b.byteLength !== bytes) argError(op, `${name}: expected a device buffer of ${bytes} bytes, got ${b.byteLength}`);
      });
      let total = 0;
      const offsets = this.#outputs.map(([, bytes]) => {
        const at = total;
        total += Math.ceil(bytes / 256) * 256;
        return at;
      });
      const whole = new StubBuffer(total + (this.#paged ? 0 : 256), this.#stream);
      const result = { done: Promise.resolve() };
      this.#outputs.forEach(([name, bytes], i) => (result[name] = new StubBuffer(bytes, this.#stream, whole, offsets[i])));
      whole.free();
      if (droppedInto) droppedInto[0] = 0n;
      return result;
    }
  }

  function copyBetween(op, dst, ds, src, ss) {
    const d = bufferOf(op, dst, 'dst', ds), s = bufferOf(op, src, 'src', ss);
    if (d.byteLength !== s.byteLength) argError(op, 'buffers differ in size');
    const a = d.bytes(), b = s.bytes();
    if (a && b) a.set(b);
  }

  const table = {
    streamClass: () => StubStream,
    deviceBufferClass: () => StubBuffer,
    layerProgramClass: () => StubProgram,
    sparsePrefill: kernel('sparsePrefill', readSparsePrefill),
    pagedSparseAttention: kernel('pagedSparseAttention', readPaged),
    dequantizeKvCache: kernel('dequantizeKvCache', readDequantize),
    planRows: kernel('planRows', readPlanRows),
    planCompressedTokenIds: kernel('planCompressedTokenIds', readPlanCompressedTokenIds),
    upload: transfer('upload', true),
    download: transfer('download', false),
    copyDevice(dst, src, stream) {
      stub.reached++;
      copyBetween('copyDevice', dst, stream, src, stream);
      return Promise.resolve();
    },
    copyPeer(dst, ds, src, ss) {
      stub.reached++;
      copyBetween('copyPeer', dst, ds, src, ss);
      return Promise.resolve();
    },
    fillDevice(dst, src, stream) {
      stub.reached++;
      bufferOf('fillDevice', dst, 'dst', stream);
      bufferOf('fillDevice', src, 'src', stream);
      return Promise.resolve();
    },
    probeLaunch: () => Promise.resolve(),
    setTiming() {},
    takeKernelMs: () => [],
    takeKernelSpans: () => [],
    memInfo: () => ({ free: 2 ** 36, total: 2 ** 37 }),
  };

  /** A cuda engine on `device` over the stub: { engine, backend }. */
  function makeEngine(device = 0) {
    const backend = new CudaBackend(addon ?? {}, table, 1, undefined, device);
    return { engine: new SparseMlaEngine(backend), backend };
  }

  return stub;
}
