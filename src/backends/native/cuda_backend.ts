/**
 * The `cuda` backend: the sm_90a kernels (native/cuda) behind the addon's `cuda.ops` table
 * (native/addon/cuda_ops.cpp). Available iff the addon loads, was built with CUDA, a Hopper device
 * answers and a real kernel launch (probeLaunch: a known one-token dequant) succeeds; otherwise the
 * reason says which of these is missing.
 *
 * Every op runs on the addon's one CUDA stream off the event loop and resolves when the stream is
 * done. Operands may be host arrays (staged on the device by the op, outputs copied back) or
 * device buffers (used in place); outputs go to the host or stay on the device (DeviceOps). CUDA
 * errors reject as SparseMlaError BACKEND_FAILURE carrying the CUDA message; the addon frees the
 * call's temporaries and clears the error, so the next call runs normally.
 * quantizeKCache writes a host cache, so it runs on the native CPU core (the same code as the
 * `cpu` backend), not on the GPU.
 *
 * Its device buffers are cuda_device_buffer.ts's; the layer programs' arguments, geometry and kept
 * programs are cuda_layer_program.ts's.
 */
import { availableParallelism } from 'node:os';
import { performance } from 'node:perf_hooks';
import { SparseMlaError } from '../../errors.js';
import { allocHostArray, isDeviceBuffer } from '../../tensor.js';
import type { DeviceBuffer, Placement } from '../../types.js';
import {
  pagedSparseAttentionFields,
  type Backend,
  type BackendEntry,
  type BackendProbe,
  type DequantizeKCacheJob,
  type DeviceOps,
  type HostOpMemory,
  type LayerSteps,
  type PagedSetBytes,
  type PagedSparseAttentionJob,
  type PagedSparseAttentionOutput,
  type PlacedAttentionOutput,
  type PlanRowsJob,
  type QuantizeKCacheJob,
  type QueuedLayerJob,
  type QueuedLayerOutput,
  type SparsePrefillJob,
  type WorkspacePrefillJob,
  type SparsePrefillOutput,
} from '../backend.js';
import { CpuBackend } from './cpu_backend.js';
import { attentionOutputBytes, inputBytes, type InputBytes, type StageableArray, type StagingArena } from '../staging.js';
import { checkCallMemory, defaultMemoryBudgetBytes, type MemoryPart } from '../memory.js';
import { V4_ROW_DIMS } from '../../kv_cache_layout.js';
import { AddonCalls } from './addon_calls.js';
import {
  CACHE_FORMAT_CODE,
  HOW_TO_BUILD,
  addonFailure,
  loadNativeAddon,
  queryCudaDevices,
  type NativeAddon,
  type NativeCudaOps,
  type NativeDeviceBuffer,
  type LayerProgramParams,
  type NativeLayerProgram,
  type PagedLayerProgramParams,
  type NativeLayerRun,
  type NativeStream,
} from './binding.js';
import { CudaDeviceBuffer } from './cuda_device_buffer.js';
import {
  RUN_BUFFERS_AT,
  failedRun,
  freeRunOutputs,
  freedLayerOperand,
  keptPagedProgram,
  layerGeometry,
  layerRunArgs,
  layerSlotNames,
  pagedGeometry,
  pagedSlotFields,
  sameGeometry,
  type KeptLayerProgram,
  type PagedFields,
  type RunOutputs,
} from './cuda_layer_program.js';

const GiB = 2 ** 30;
/** How long synchronize() polls the stream from the event loop before a pool thread takes the wait. */
export const SYNC_POLL_MS = 20;

/** A params object as the addon takes it: each device buffer among its fields is the addon's buffer. */
type AddonParams<P> = { [K in keyof P]: P[K] extends infer V ? (V extends DeviceBuffer ? NativeDeviceBuffer : V) : never };

/** A layer step's operand that only a device buffer can be (the steps place everything on the device). */
function onDevice<T>(x: T | DeviceBuffer, argument: string): DeviceBuffer {
  if (!isDeviceBuffer(x)) throw new SparseMlaError('INVALID_VALUE', `${argument}: a device buffer of this engine, got host memory`, argument);
  return x;
}

/** A layer's prefill over its workspace: kv is the whole workspace; the rows index only [0, job.rows), the rest is never read. */
function workspacePrefill(job: WorkspacePrefillJob<DeviceBuffer>): SparsePrefillJob<DeviceBuffer> {
  const sKV = job.workspace.byteLength / (2 * V4_ROW_DIMS);
  return { q: job.q, kv: job.workspace, indices: job.indices, topkLength: job.lengths, attnSink: job.attnSink, sQ: job.numQueries, hQ: job.hQ, dQK: V4_ROW_DIMS, dV: V4_ROW_DIMS, sKV, topk: job.width, smScale: job.smScale };
}

/** dequantizeKvCache's params (rowOffset null: out holds exactly the n rows). */
function dequantFields(cache: { format: 'v4' | 'v32'; pageSize: number; numPages: number; data: Uint8Array | DeviceBuffer }, tokenIds: Int32Array | DeviceBuffer, n: number, out: Uint16Array | DeviceBuffer, rowOffset: number | null) {
  return { format: CACHE_FORMAT_CODE[cache.format], cache: cache.data, pageSize: cache.pageSize, numPages: cache.numPages, tokenIds, numTokens: n, out, outRowOffset: rowOffset };
}

/** planRows' params for a job's requests and the arrays it builds into. */
function planRowsFields(job: PlanRowsJob<DeviceBuffer>, rows: Int32Array | DeviceBuffer, lens: Int32Array | DeviceBuffer, dropped: Int32Array | DeviceBuffer | null, droppedTotal: BigInt64Array | DeviceBuffer | null, numQueries: number) {
  return { numRequests: job.seqLens.length, seqLens: job.seqLens, extendLens: job.extendLens, window: job.window, ratio: job.ratio, topkIndices: job.topkIndices, topk: job.topk, width: job.width, rows, lens, dropped, droppedTotal, numQueries };
}

const launchProbes = new Map<number, Promise<string | null>>();

/** null when the probe kernel ran on `device` and gave the expected row, else the reason. Once per device and process. */
function probeLaunch(ops: NativeCudaOps, device: number): Promise<string | null> {
  let p = launchProbes.get(device);
  if (!p) {
    p = (async () => {
      try {
        await ops.probeLaunch(new (ops.streamClass())(device));
        return null;
      } catch (e) {
        return `the launch probe failed: ${(e as { status?: string; message?: string }).status ?? (e as Error).message}`;
      }
    })();
    launchProbes.set(device, p);
  }
  return p;
}

/** Whether the cuda backend can run on `device` (default 0), and the device's details. */
async function probeCuda(device = 0): Promise<BackendProbe & { addon?: NativeAddon }> {
  const l = loadNativeAddon();
  if (!l.ok) return { available: false, reason: l.reason, details: { addon: l.path } };
  const cuda = l.addon.cuda;
  if (!cuda.built) return { available: false, reason: `the addon has no CUDA kernels: ${l.cudaWhyNot}; for them, ${HOW_TO_BUILD}`, details: { addon: l.path, addonOrigin: l.origin } };
  const q = queryCudaDevices(l.addon)!;
  const details: Record<string, string | number | boolean> = {
    addon: l.path,
    addonOrigin: l.origin,
    arch: cuda.arch,
    nvcc: cuda.compilerVersion,
    cudaRuntime: q.runtimeVersion,
    cudaDriver: q.driverVersion,
    devices: q.count,
  };
  if (q.count === 0) return { available: false, reason: `no CUDA device: ${q.error ?? 'cudaGetDeviceCount found 0 devices'}`, details };
  const d = q.devices[device];
  if (!d) return { available: false, reason: `no CUDA device ${device}: this machine has ${q.count} (0-${q.count - 1})`, details };
  Object.assign(details, { deviceIndex: device, device: d.name, computeCapability: d.computeCapability, sms: d.multiProcessors, memoryGiB: Math.round((d.memoryBytes / GiB) * 10) / 10, l2MiB: Math.round((d.l2Bytes / 2 ** 20) * 10) / 10 });
  if (d.computeCapability !== '9.0') return { available: false, reason: `device ${device} (${d.name}) is compute capability ${d.computeCapability}; the kernels are built for sm_90a (Hopper) only`, details };
  if (!cuda.kernels || !cuda.ops) return { available: false, reason: `${d.name} found, but this addon has no CUDA op launchers (a stale build): ${HOW_TO_BUILD}`, details };
  const failed = await probeLaunch(cuda.ops, device);
  if (failed) return { available: false, reason: `${d.name} (device ${device}) found, but ${failed}`, details };
  details.launchProbe = 'ok';
  return { available: true, details, addon: l.addon };
}

/** What CudaBackend.planRows builds, each where it was asked for (null: not built). */
export interface DevicePlannedRows {
  /** int32 [numQueries, width]: workspace rows, −1 padded */
  rows: Int32Array | DeviceBuffer;
  /** int32 [numQueries] */
  lens: Int32Array | DeviceBuffer;
  /** int32 [numQueries]: top-k entries dropped per query (0 for dense rows) */
  dropped: Int32Array | DeviceBuffer | null;
  /** int64 [1]: their sum */
  droppedTotal: BigInt64Array | DeviceBuffer | null;
}

/** A cuda op's operand as its host budget counts it: no host bytes in device memory (inputBytes otherwise). */
function hostInputBytes(a: ArrayBufferView | DeviceBuffer | null): InputBytes {
  return a === null || isDeviceBuffer(a) ? NO_HOST_BYTES : inputBytes(a as StageableArray);
}
const NO_HOST_BYTES: InputBytes = { unshared: 0, callCopy: 0 };

/**
 * What a cuda op holds in host memory: the addon's copies of its host inputs that are not shared
 * (it stages host inputs through them), what else it builds on the host (`built`: a dequant's
 * widened ids), the copies a layer took at its call and handed to the op (shared, read in place,
 * held by the call: memory.ts, markCallCopies) and its host outputs.
 */
function cudaHostParts(inputs: readonly InputBytes[], hostOutputBytes: number, built?: MemoryPart): MemoryPart[] {
  let copies = 0, layerCopies = 0;
  for (const a of inputs) {
    copies += a.unshared;
    layerCopies += a.callCopy;
  }
  const parts: MemoryPart[] = [{ what: 'copies of the host inputs', bytes: copies }, { what: "the layer's copies of its operands", bytes: layerCopies }];
  if (built !== undefined) parts.push(built);
  parts.push({ what: 'host outputs', bytes: hostOutputBytes });
  return parts;
}

/**
 * What the cuda backend's ops count against its host budget, from sizes (backend.ts, HostOpMemory):
 * its ops' own checks (CudaBackend.hostBudget) and a layer's check of the ops it will run call these.
 * The paged op reads every set whole, as it is given.
 */
export const cudaOpMemory: HostOpMemory = {
  // host int32 ids are widened by the addon to int64, with one spare slot for the kernel's bad-id flag
  dequantizeKCache: (_format, n, rowDim, cache, tokenIds, output) =>
    cudaHostParts(tokenIds === null ? [cache] : [cache, tokenIds], output === 'host' ? n * rowDim * 2 : 0, tokenIds === null ? undefined : { what: 'the widened token ids', bytes: (n + 1) * 8 }),
  sparsePrefill: (inputs, sQ, hQ, dV, output) => cudaHostParts(inputs, output === 'host' ? attentionOutputBytes(sQ, hQ, dV) : 0),
  pagedSparseAttention(fixed, sets, n, hQ, output) {
    const inputs = [...fixed];
    for (const s of sets) inputs.push(...(s.whole ? [s.cache, s.indices] : [{ unshared: s.cacheBytes, callCopy: 0 }, { unshared: s.indicesBytes, callCopy: 0 }]));
    return cudaHostParts(inputs, output === 'host' ? attentionOutputBytes(n, hQ, 512) : 0);
  },
  pagedCopies: null,
};

export class CudaBackend implements Backend, DeviceOps {
  readonly name = 'cuda' as const;
  /** host threads for quantizeKCache (the CPU core); the GPU ops use none */
  readonly workers: number;
  readonly device: DeviceOps = this;
  readonly deviceIndex: number;
  private readonly ops: NativeCudaOps;
  /** this engine's stream on its device: every op and allocation is ordered on it */
  private readonly stream: NativeStream;
  private readonly BufferClass: new (bytes: number, stream: NativeStream, base?: NativeDeviceBuffer, byteOffset?: number) => NativeDeviceBuffer;
  #LayerProgramClass?: new (params: LayerProgramParams, stream: NativeStream) => NativeLayerProgram;
  private readonly calls = new AddonCalls('cuda');
  /** Host-side work (quantizeKCache writes a host cache) runs on the native CPU core. */
  private readonly host: CpuBackend;

  /** host memory one call may use for the addon's copies of host inputs and for host outputs (SPEC §9) */
  readonly memoryBudgetBytes: number;
  readonly opMemory = cudaOpMemory;

  /** the host staging (the cpu core's, for quantizeKCache); a layer's copies of its host operands are lent from it */
  get staging(): StagingArena {
    return this.host.staging;
  }

  /**
   * The layer steps on this engine's device: rows, ids and the workspace are device buffers and
   * every step is queued on the engine's stream, so a layer whose inputs are on the device makes
   * no host round trip. A c4 combine sums its dropped counts on the device; readDroppedTotal
   * queues the read of those 8 bytes on the stream right behind it and only its promise waits.
   * Dense rows drop nothing: they get no total.
   */
  readonly layer: LayerSteps<DeviceBuffer> = {
    memory: 'device',
    planRows: async (job) => {
      const r = await this.planRows(job, 'device', null, job.topkIndices === null ? null : 'device');
      return { rows: r.rows, lens: r.lens, droppedTotal: r.droppedTotal as DeviceBuffer | null };
    },
    planCompressedTokenIds: (job) => this.planCompressedTokenIds(job, 'device'),
    placeIds: (ids) => this.upload(ids),
    placeRows: (rows) => this.upload(rows),
    allocWorkspace: (bytes) => this.alloc(bytes),
    dequantizeKCacheInto: (job) => this.dequantizeKCacheIdsInto(job.cache, onDevice(job.tokenIds, 'tokenIds'), job.n, onDevice(job.workspace, 'workspace'), job.rowOffset),
    prefill: (job, output) => this.sparsePrefill(workspacePrefill(job), output),
    readDroppedTotal: async (total) => {
      if (!isDeviceBuffer(total)) return total;
      const into = new BigInt64Array(1);
      await this.download(total, into);
      return Number(into[0]);
    },
    // (an arrow, not the method bound: bench/layer_probe.mjs wraps CudaBackend.prototype.queueLayer after the engine is made)
    queueLayer: (job, droppedLater) => this.queueLayer(job, droppedLater),
    pagedAttention: (job, output, owner) => (output === 'device' ? this.queuePagedLayer(job, owner) : this.pagedSparseAttention(job, output)),
  };

  constructor(addon: NativeAddon, ops: NativeCudaOps, workers: number, memoryBudgetBytes = defaultMemoryBudgetBytes(), deviceIndex = 0) {
    this.ops = ops;
    this.workers = workers;
    this.memoryBudgetBytes = memoryBudgetBytes;
    this.deviceIndex = deviceIndex;
    this.stream = new (ops.streamClass())(deviceIndex);
    this.BufferClass = ops.deviceBufferClass();
    this.host = new CpuBackend(addon, workers, memoryBudgetBytes);
  }

  /**
   * The addon's buffer behind a live device buffer of this engine's device (else a typed error
   * naming the argument). Freed is checked here, right before the addon call, too: a buffer the
   * caller frees after a call's checks but before its launch (a layer awaits between its steps) is
   * INVALID_VALUE, not the addon's refusal as a backend failure.
   */
  private own(b: DeviceBuffer, argument = 'tensor'): NativeDeviceBuffer {
    if (!CudaDeviceBuffer.made(b)) throw new SparseMlaError('INVALID_VALUE', `${argument}: a device buffer from another backend or process cannot be used here`, argument);
    if (b.deviceIndex !== this.deviceIndex) {
      throw new SparseMlaError('INVALID_VALUE', `${argument}: expected a tensor on this engine's CUDA device ${this.deviceIndex}, got one on device ${b.deviceIndex} (engine.copyFrom moves it)`, argument);
    }
    if (b.freed) throw new SparseMlaError('INVALID_VALUE', `${argument}: expected a live device buffer, got one freed before the op ran`, argument);
    return b.native;
  }

  /**
   * An op's params as the addon takes them: host arrays and numbers as they are, each device
   * buffer the addon's buffer behind it (one of this engine's device, else a typed error naming
   * the field).
   */
  private operands<P extends object, O extends object = object>(params: P, outputs?: O): AddonParams<P & O> {
    // keys and plain loops: an op's call builds this one object and no per-field entry arrays
    const out: Record<string, unknown> = {};
    for (const part of outputs === undefined ? [params] : [params, outputs]) {
      const fields = part as Record<string, unknown>;
      for (const field of Object.keys(fields)) {
        const value = fields[field];
        out[field] = isDeviceBuffer(value) ? this.own(value, field) : value;
      }
    }
    return out as AddonParams<P & O>;
  }

  /** Runs an addon call on the stream; the outputs it was given are freed if it fails (device buffers only). */
  private async launch(op: string, outputs: readonly unknown[], start: () => Promise<void>): Promise<void> {
    try {
      await this.calls.run(op, start);
    } catch (e) {
      for (const b of outputs) if (isDeviceBuffer(b)) b.free();
      throw e;
    }
  }

  /** Refuses (TOO_LARGE) a call whose host memory (cudaOpMemory's parts) exceeds the budget. */
  private hostBudget(op: string, argument: string, parts: readonly MemoryPart[]): void {
    checkCallMemory(op, argument, parts, this.memoryBudgetBytes);
  }

  owns(buffer: DeviceBuffer): boolean {
    return CudaDeviceBuffer.made(buffer) && buffer.deviceIndex === this.deviceIndex;
  }

  ownsLive(buffer: unknown, bytes: number): boolean {
    return CudaDeviceBuffer.ownedLive(buffer, this.deviceIndex, bytes);
  }

  alloc(bytes: number): DeviceBuffer {
    this.calls.assertAlive();
    try {
      // the addon allocates exactly `bytes` on the stream's device (this engine's)
      return new CudaDeviceBuffer(new this.BufferClass(bytes, this.stream), this.stream, bytes, this.deviceIndex);
    } catch (e) {
      const x = e as { status?: string };
      if (x.status?.startsWith('cudaErrorMemoryAllocation')) throw new SparseMlaError('TOO_LARGE', `a device buffer of ${bytes} bytes cannot be allocated (${x.status})`, 'alloc');
      throw addonFailure('cuda', 'alloc', e);
    }
  }

  /**
   * Device buffers of these sizes in one allocation (one cudaMallocAsync: a call's outputs), each a
   * view at a 256-byte boundary; the memory goes back once every one of them is freed.
   */
  allocTogether(sizes: readonly number[]): CudaDeviceBuffer[] {
    const offsets: number[] = [];
    let total = 0;
    for (let i = 0; i < sizes.length; i++) {
      offsets.push(total);
      total += Math.ceil(sizes[i]! / 256) * 256;
    }
    const base = this.alloc(total) as CudaDeviceBuffer;
    try {
      const views: CudaDeviceBuffer[] = [];
      for (let i = 0; i < sizes.length; i++) {
        const bytes = sizes[i]!;
        views.push(new CudaDeviceBuffer(new this.BufferClass(bytes, this.stream, base.native, offsets[i]), this.stream, bytes, this.deviceIndex));
      }
      return views;
    } catch (e) {
      throw addonFailure('cuda', 'alloc', e);
    } finally {
      base.free(); // the views hold the memory
    }
  }

  /** An attention op's outputs for `rows` query-head rows: host arrays, or device buffers in one allocation. */
  private attentionOutputs(placement: Placement, rows: number, dV: number): { out: Uint16Array | DeviceBuffer; maxLogits: Float32Array | DeviceBuffer; lse: Float32Array | DeviceBuffer } {
    if (placement === 'device') {
      const [out, maxLogits, lse] = this.allocTogether([rows * dV * 2, rows * 4, rows * 4]);
      return { out: out!, maxLogits: maxLogits!, lse: lse! };
    }
    return { out: allocHostArray(Uint16Array, rows * dV, 'out'), maxLogits: allocHostArray(Float32Array, rows, 'maxLogits'), lse: allocHostArray(Float32Array, rows, 'lse') };
  }

  /** An output: a host array, or a device buffer of the same byte size. */
  private output<T extends ArrayBufferView>(placement: Placement, ctor: new (n: number) => T, bytesPer: number, n: number, argument: string): T | DeviceBuffer {
    return placement === 'device' ? this.alloc(n * bytesPer) : allocHostArray(ctor, n, argument);
  }

  async upload(data: ArrayBufferView): Promise<DeviceBuffer> {
    const b = this.alloc(data.byteLength);
    await this.launch('upload', [b], () => this.ops.upload(this.own(b), data, this.stream));
    return b;
  }

  /**
   * Read on the stream of the engine that allocated the buffer (one of this device's; the work that
   * writes a buffer is queued there): a buffer of another engine is read after that engine's queued
   * work, as an op's operand is, not racing it on this engine's stream.
   */
  async download(buffer: DeviceBuffer, into: ArrayBufferView, argument = 'tensor'): Promise<void> {
    const native = this.own(buffer, argument);
    const stream = (buffer as CudaDeviceBuffer).stream;
    await this.calls.run('download', () => this.ops.download(native, into, stream));
  }

  async copyFrom(src: DeviceBuffer): Promise<DeviceBuffer> {
    if (!CudaDeviceBuffer.made(src)) throw new SparseMlaError('INVALID_VALUE', 'tensor.data: a device buffer from another backend or process cannot be copied here', 'tensor.data');
    const dst = this.alloc(src.byteLength);
    await this.launch('copyFrom', [dst], () => this.ops.copyPeer(this.own(dst), this.stream, src.native, src.stream));
    return dst;
  }

  /**
   * Waits for everything queued on the stream. A short wait is polled from the event loop (one
   * cudaStreamQuery per turn, other callbacks running in between), so the JS thread sees the device
   * finish at once instead of through a pool thread's wake-up of the loop (tens of µs, about a tenth
   * of a 4K-query layer); after SYNC_POLL_MS a pool thread waits instead (the CUDA runtime's own
   * spin-then-block policy, one level up).
   */
  async synchronize(): Promise<void> {
    this.calls.assertAlive();
    // the poll's SYNC_POLL_MS run from its first "not yet" (a stream that is done costs one query)
    let until = -1;
    for (;;) {
      let done: boolean;
      try {
        done = this.stream.query();
      } catch (e) {
        throw addonFailure('cuda', 'synchronize', e);
      }
      if (done) return;
      const now = performance.now();
      if (until < 0) until = now + SYNC_POLL_MS;
      else if (now >= until) break;
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    await this.calls.run('synchronize', () => this.stream.synchronize());
  }

  /** Device-to-device copy of equal-sized buffers (the bandwidth ceiling in benchmarks). */
  async copyDevice(dst: DeviceBuffer, src: DeviceBuffer): Promise<void> {
    await this.calls.run('copyDevice', () => this.ops.copyDevice(this.own(dst, 'dst'), this.own(src, 'src'), this.stream));
  }

  /** dst filled with repeats of src (benchmark inputs) */
  async fillDevice(dst: DeviceBuffer, src: DeviceBuffer): Promise<void> {
    await this.calls.run('fillDevice', () => this.ops.fillDevice(this.own(dst, 'dst'), this.own(src, 'src'), this.stream));
  }

  /** CUDA events around every launch from now on (benchmarks; process-wide), or none (the default). */
  setTiming(on: boolean): void {
    this.ops.setTiming(on);
  }

  /**
   * Device milliseconds of each launch this engine made since the last call, in order (waits for
   * them; −1 for one that could not be timed); setTiming(true) first.
   */
  takeKernelMs(): number[] {
    return this.ops.takeKernelMs(this.stream);
  }

  /**
   * The same launches as takeKernelMs, each as [start, end] device milliseconds from the first
   * one's start (gaps between them: untimed device work or the device waiting for the host).
   */
  takeKernelSpans(): [number, number][] {
    const flat = this.ops.takeKernelSpans(this.stream);
    const spans: [number, number][] = [];
    for (let i = 0; i + 1 < flat.length; i += 2) spans.push([flat[i]!, flat[i + 1]!]);
    return spans;
  }

  memInfo(): { free: number; total: number } {
    return this.ops.memInfo(this.stream);
  }

  async sparsePrefill(job: SparsePrefillJob<DeviceBuffer>, placement: Placement = 'host'): Promise<SparsePrefillOutput & PlacedAttentionOutput> {
    const { sQ, hQ, dV } = job;
    this.hostBudget('sparsePrefill', 'q', cudaOpMemory.sparsePrefill([job.q, job.kv, job.indices, job.topkLength, job.attnSink].map(hostInputBytes), sQ, hQ, dV, placement));
    const { out, maxLogits, lse } = this.attentionOutputs(placement, sQ * hQ, dV);
    await this.launch('sparsePrefill', [out, maxLogits, lse], () => this.ops.sparsePrefill(this.operands(job, { out, maxLogits, lse }), this.stream));
    return { out, maxLogits, lse } as SparsePrefillOutput & PlacedAttentionOutput;
  }

  async pagedSparseAttention(job: PagedSparseAttentionJob<DeviceBuffer>, placement: Placement = 'host'): Promise<PagedSparseAttentionOutput & PlacedAttentionOutput> {
    const { n, hQ } = job;
    const fields = pagedSparseAttentionFields(job);
    const fixed = [fields.q, fields.topkLength, fields.extraTopkLength, fields.attnSink].map(hostInputBytes);
    const sets: PagedSetBytes[] = [{ whole: true, cache: hostInputBytes(fields.kCache), indices: hostInputBytes(fields.indices) }];
    if (fields.extraKCache !== null) sets.push({ whole: true, cache: hostInputBytes(fields.extraKCache), indices: hostInputBytes(fields.extraIndices) });
    this.hostBudget('pagedSparseAttention', 'q', cudaOpMemory.pagedSparseAttention(fixed, sets, n, hQ, placement));
    const { out, lse, maxLogits } = this.attentionOutputs(placement, n * hQ, 512);
    await this.launch('pagedSparseAttention', [out, lse, maxLogits], () => this.ops.pagedSparseAttention(this.operands(fields, { out, lse, maxLogits }), this.stream));
    return { out, lse, maxLogits } as PagedSparseAttentionOutput & PlacedAttentionOutput;
  }

  async dequantizeKCache(job: DequantizeKCacheJob<DeviceBuffer>, placement: Placement = 'host'): Promise<Uint16Array> {
    const { cache, tokenIds, n, rowDim } = job;
    this.hostBudget('dequantizeKCachePaged', 'tokenIds', cudaOpMemory.dequantizeKCache(cache.format, n, rowDim, hostInputBytes(cache.data), hostInputBytes(tokenIds), placement));
    const out = this.output(placement, Uint16Array, 2, n * rowDim, 'out');
    await this.launch('dequantizeKCachePaged', [out], () =>
      this.ops.dequantizeKvCache(
        this.operands(dequantFields(cache, tokenIds, n, out, null)),
        this.stream,
      ),
    );
    return out as Uint16Array; // a DeviceBuffer when placement is 'device' (DeviceOps' contract)
  }

  /**
   * Dequantizes into rows [rowOffset, rowOffset + n) of an existing device buffer (a plan's device
   * workspace, reused across layers), nothing allocated or copied back, with the token ids already
   * on the device (int64 [n], a plan's ids uploaded once and range-checked then against the cache
   * geometry): no host→device id copy, and with a device cache nothing waits for the GPU
   * (stream-ordered). The kernel still checks every id and zero-fills a row whose id is outside the
   * cache, never reading it.
   */
  async dequantizeKCacheIdsInto(cache: { format: 'v4' | 'v32'; pageSize: number; numPages: number; data: Uint8Array | DeviceBuffer }, tokenIds: DeviceBuffer, n: number, out: DeviceBuffer, rowOffset: number): Promise<void> {
    if (tokenIds.byteLength !== n * 8) throw new SparseMlaError('INVALID_SHAPE', `tokenIds: a device buffer of ${n} int64 ids (${n * 8} bytes), got ${tokenIds.byteLength} bytes`, 'tokenIds');
    // a host cache is copied by the addon when it is not shared (a layer's dequant: checked with its layer's ops at the call)
    this.hostBudget('dequantizeKCachePaged', 'cache', cudaOpMemory.dequantizeKCache(cache.format, n, V4_ROW_DIMS, hostInputBytes(cache.data), null, 'device'));
    await this.calls.run('dequantizeKCachePaged', () =>
      this.ops.dequantizeKvCache(
        this.operands(dequantFields(cache, tokenIds, n, out, rowOffset)),
        this.stream,
      ),
    );
  }

  /**
   * The planner's per-row index building on the GPU (SPEC §6; planner.h's topk_row / dense_row in
   * a kernel): ratio 4 rows from the indexer's top-k (host or device), ratio 0 / 128 dense rows
   * when topkIndices is null. Outputs where `placement` says; the dropped counts per query where
   * `droppedPlacement` says and their total (int64 [1], summed on the device) where
   * `totalPlacement` says, each or not at all (null). Inputs are the plan's, already validated and
   * sized (width ≥ the widest row). `args.into`: the caller's device buffers of exactly these sizes
   * to build the rows, lengths and total (when one is asked for) into instead of allocating them.
   */
  async planRows(args: PlanRowsJob<DeviceBuffer>, placement: Placement = 'host', droppedPlacement: Placement | null = placement, totalPlacement: Placement | null = null): Promise<DevicePlannedRows> {
    const { into } = args;
    const numQueries = args.extendLens.reduce((a, b) => a + b, 0);
    // on failure (an allocation or the launch) only what was allocated here is freed: the caller's buffers stay the caller's
    const allocated: (ArrayBufferView | DeviceBuffer)[] = [];
    const made = <T extends ArrayBufferView | DeviceBuffer>(b: T): T => (allocated.push(b), b);
    let rows, lens, dropped, droppedTotal;
    try {
      rows = into?.rows ?? made(this.output(placement, Int32Array, 4, numQueries * args.width, 'rows'));
      lens = into?.lens ?? made(this.output(placement, Int32Array, 4, numQueries, 'lens'));
      dropped = droppedPlacement === null ? null : made(this.output(droppedPlacement, Int32Array, 4, numQueries, 'dropped'));
      droppedTotal = totalPlacement === null ? null : isDeviceBuffer(into?.droppedTotal) ? into.droppedTotal : made(this.output(totalPlacement, BigInt64Array, 8, 1, 'droppedTotal'));
    } catch (e) {
      for (const b of allocated) if (isDeviceBuffer(b)) b.free();
      throw e;
    }
    await this.launch('planRows', allocated, () =>
      this.ops.planRows(
        this.operands(planRowsFields(args, rows, lens, dropped, droppedTotal, numQueries)),
        this.stream,
      ),
    );
    return { rows, lens, dropped, droppedTotal };
  }

  /**
   * A workspace layer queued by one addon call (LayerSteps.queueLayer). The first layer of a
   * geometry reads the params objects the stepwise ops (planRows, dequantizeKCacheIdsInto,
   * sparsePrefill) take into a layer program, kept per job owner (a plan's resources) and geometry;
   * every layer then runs it over its own buffers, taken straight from the job in the program's slot
   * order (nothing read by name on the native side). The run queues the whole layer before it
   * returns — dequants, combine, the prefill into outputs it allocates (one allocation) — so no JS
   * runs between the combine's launch and the prefill's; the outputs' handles are made here after
   * that, and freed if anything fails. The combine's dropped total, when there is one, is read right
   * behind it and the call resolves once it is in. Undefined, before any work, when a buffer is not
   * this engine's own (another engine's stream needs the stepwise ops, which order the two).
   */
  async queueLayer(job: QueuedLayerJob<DeviceBuffer>, droppedLater = false): Promise<QueuedLayerOutput<DeviceBuffer> | undefined> {
    // This runs on every queued layer, mostly before V8 has given it feedback (once it has run about
    // eight times its own bytecode): only the common path is here, the rest in calls.
    // run's arguments: after droppedInto and smScale the addon's buffers, each of this engine's stream
    const args = layerRunArgs(job);
    // the loop here rather than in a helper: its turns count toward V8's feedback budget of queueLayer
    for (let i = RUN_BUFFERS_AT; i < args.length; i++) {
      const native = CudaDeviceBuffer.nativeOn(args[i], this.stream);
      if (native === null) return this.notQueued(job, args, i);
      args[i] = native;
    }
    // the combine's dropped total lands here: the backend's one slot when no other layer holds it
    let droppedInto: BigInt64Array | null = null;
    if (job.planRows !== null) {
      droppedInto = this.#droppedSlot ?? new BigInt64Array(1);
      this.#droppedSlot = undefined;
    }
    // the addon call, tracked as AddonCalls.run tracks one (inlined here: one async frame a layer)
    this.calls.assertAlive();
    // the layer program kept for the job's owner and geometry, looked up here (made out of line):
    // a branch skipped on every call delays V8's feedback, which counts the bytecode a call runs
    const kept = this.programs.get(job.owner);
    let program: NativeLayerProgram | undefined;
    if (kept !== undefined) {
      for (let k = 0; k < kept.length; k++) {
        if (sameGeometry(kept[k]!.geometry, job)) {
          program = kept[k]!.program;
          break;
        }
      }
    }
    let run: NativeLayerRun;
    try {
      program ??= this.newLayerProgram(job, kept);
      args[0] = droppedInto;
      run = Reflect.apply(program.run, program, args) as NativeLayerRun;
    } catch (e) {
      throw addonFailure('cuda', 'queueLayer', e);
    }
    const done = run.done;
    this.calls.begin(done);
    // the layer is queued: its outputs' handles are made while the device runs it
    const outputs = this.adoptRunOutputs(run, job.prefill.numQueries * job.prefill.hQ);
    // { dropped: 'later' }: every launch was queued (outputs made: a failed launch makes none), so the
    // call resolves now and only the total's read is left to its promise
    if (droppedLater && droppedInto !== null && outputs.out !== null) return this.droppedLater(done, droppedInto, outputs);
    try {
      await done; // once the dropped total is in, when there is one
    } catch (e) {
      throw failedRun(outputs, e);
    } finally {
      this.calls.end(done);
    }
    let dropped = 0;
    if (droppedInto !== null) {
      dropped = Number(droppedInto[0]);
      this.#droppedSlot = droppedInto; // read: the next layer may write into it
    }
    // (null only when done rejected)
    return { out: outputs.out!, lse: outputs.lse!, maxLogits: outputs.maxLogits!, dropped };
  }

  /** A queued layer's 8-byte landing place for its dropped total, kept between layers (one allocation less a c4 layer). */
  #droppedSlot: BigInt64Array | undefined;

  /**
   * queueLayer where args[stopped] is no live buffer of this engine's (CudaDeviceBuffer.nativeOn): undefined for a buffer of
   * another engine's stream (the stepwise ops order the two), else (freed, or not one this class
   * made) INVALID_VALUE naming the layer's argument.
   */
  private notQueued(job: QueuedLayerJob<DeviceBuffer>, args: readonly unknown[], stopped: number): undefined {
    const b = args[stopped];
    if (!(b instanceof CudaDeviceBuffer) || b.stream !== this.stream) return undefined;
    freedLayerOperand(layerSlotNames(job)[stopped - RUN_BUFFERS_AT]!);
  }

  /** queueLayer where no program is kept for the job's geometry: one read now and kept (with the owner's list, made where it has none). */
  private newLayerProgram(job: QueuedLayerJob<DeviceBuffer>, kept: KeptLayerProgram[] | undefined): NativeLayerProgram {
    if (kept === undefined) this.programs.set(job.owner, (kept = []));
    return this.makeLayerProgram(job, kept);
  }

  /**
   * queueLayer's result with { dropped: 'later' } once every launch was queued: the outputs now,
   * the dropped total as a promise of its read (the slot goes back once read).
   */
  private droppedLater(done: Promise<void>, slot: BigInt64Array, outputs: RunOutputs): QueuedLayerOutput<DeviceBuffer> {
    const dropped = done.then(
      () => {
        const total = Number(slot[0]);
        this.#droppedSlot ??= slot; // read: another layer may write into it
        return total;
      },
      (e: unknown) => {
        throw addonFailure('cuda', 'queueLayer', e);
      },
    );
    void done.then(
      () => this.calls.end(done),
      () => this.calls.end(done),
    );
    return { out: outputs.out!, lse: outputs.lse!, maxLogits: outputs.maxLogits!, dropped };
  }

  /**
   * A c0 / c128 paged layer with its outputs on the device (LayerSteps.pagedAttention): the paged
   * op as a layer program, read once per owner (a plan's resources) and geometry, then run over each
   * layer's buffers in its slot order with the outputs allocated by the run, as queueLayer runs a
   * workspace layer: the op's params object is not read per layer. A buffer that is not this
   * engine's own goes through the op (pagedSparseAttention), which orders the two streams.
   */
  async queuePagedLayer(job: PagedSparseAttentionJob<DeviceBuffer>, owner: object): Promise<PlacedAttentionOutput> {
    const fields = pagedSparseAttentionFields(job);
    // run's buffers, in its slot order: each field's addon buffer, of this engine's stream
    const inputs: unknown[] = pagedSlotFields(fields);
    for (let i = 0; i < inputs.length; i++) {
      const b = fields[inputs[i] as keyof PagedFields];
      if (!(b instanceof CudaDeviceBuffer) || b.stream !== this.stream) return this.pagedSparseAttention(job, 'device');
      if (b.freed) freedLayerOperand(`paged.${inputs[i] as string}`);
      inputs[i] = b.native;
    }
    let kept = this.pagedPrograms.get(owner);
    if (kept === undefined) this.pagedPrograms.set(owner, (kept = []));
    const geometry = pagedGeometry(fields);
    let program = keptPagedProgram(kept, geometry);
    this.calls.assertAlive();
    let run: NativeLayerRun;
    try {
      program ??= this.makePagedProgram(fields, geometry, kept);
      run = program.run(null, job.smScale, ...(inputs as NativeDeviceBuffer[]));
    } catch (e) {
      throw addonFailure('cuda', 'pagedSparseAttention', e);
    }
    const done = run.done;
    this.calls.begin(done);
    const outputs = this.adoptRunOutputs(run, job.n * job.hQ);
    try {
      await done;
    } catch (e) {
      freeRunOutputs(outputs);
      throw addonFailure('cuda', 'pagedSparseAttention', e);
    } finally {
      this.calls.end(done);
    }
    return outputs as PlacedAttentionOutput;
  }

  /** Paged layer programs by their owner (a plan's resources on this engine), each with its geometry (pagedGeometry). */
  private readonly pagedPrograms = new WeakMap<object, KeptLayerProgram[]>();

  /** Reads a paged layer's params into a program (the addon checks them as the op does) and keeps it. */
  private makePagedProgram(fields: PagedFields, geometry: number[], kept: KeptLayerProgram[]): NativeLayerProgram {
    const params: PagedLayerProgramParams = { paged: this.operands(fields, { out: null, maxLogits: null, lse: null }) };
    const program = new (this.#LayerProgramClass ??= this.ops.layerProgramClass())(params, this.stream);
    const names = pagedSlotFields(fields).map((k) => `paged.${k}`);
    if (program.slots.join() !== names.join()) throw new Error(`paged layer program slots ${program.slots.join(', ')}: expected ${names.join(', ')}`);
    kept.push({ geometry, program });
    return program;
  }

  /** A device buffer of this engine's that the addon allocated, of a size the caller knows. */
  private adopt(native: NativeDeviceBuffer, byteLength: number): CudaDeviceBuffer {
    return new CudaDeviceBuffer(native, this.stream, byteLength, this.deviceIndex);
  }

  /**
   * A layer run's outputs (out bf16 [rows, 512], maxLogits and lse float32 [rows]) as this engine's
   * buffers; each null where the run made none (it failed: its done rejects).
   */
  private adoptRunOutputs(run: NativeLayerRun, rows: number): RunOutputs {
    return {
      out: run.out === null ? null : this.adopt(run.out, rows * V4_ROW_DIMS * 2),
      maxLogits: run.maxLogits === null ? null : this.adopt(run.maxLogits, rows * 4),
      lse: run.lse === null ? null : this.adopt(run.lse, rows * 4),
    };
  }

  /** @internal The layer programs kept for an owner (checks reach the addon's LayerProgram through them). */
  layerProgramsOf(owner: object): NativeLayerProgram[] {
    return (this.programs.get(owner) ?? []).map((k) => k.program);
  }

  /** Layer programs by their owner (a plan's resources on this engine), each with its geometry (layerGeometry). */
  private readonly programs = new WeakMap<object, KeptLayerProgram[]>();

  /** Reads a layer's params objects into a program (the addon checks them as the ops do) and keeps it. */
  private makeLayerProgram(job: QueuedLayerJob<DeviceBuffer>, kept: KeptLayerProgram[]): NativeLayerProgram {
    const { planRows: rows, dequants } = job;
    const params: LayerProgramParams = {
      planRows:
        rows === null
          ? null
          : this.operands(planRowsFields(rows, rows.into.rows, rows.into.lens, null, rows.into.droppedTotal as DeviceBuffer | null, rows.extendLens.reduce((a, b) => a + b, 0))),
      dequants: dequants.map(({ cache, tokenIds, n, workspace, rowOffset }) =>
        this.operands(dequantFields(cache, onDevice(tokenIds, 'tokenIds'), n, onDevice(workspace, 'workspace'), rowOffset)),
      ),
      // each run allocates the outputs
      prefill: this.operands(workspacePrefill(job.prefill), { out: null, maxLogits: null, lse: null }),
    };
    const program = new (this.#LayerProgramClass ??= this.ops.layerProgramClass())(params, this.stream);
    // run's buffers as layerRunArgs orders them
    const names = layerSlotNames(job);
    if (program.slots.join() !== names.join()) throw new Error(`layer program slots ${program.slots.join(', ')}: expected ${names.join(', ')}`);
    const geometry = layerGeometry(job);
    if (!sameGeometry(geometry, job)) throw new Error(`layer geometry ${geometry.join(', ')}: sameGeometry reads another order`);
    kept.push({ geometry, program });
    return program;
  }

  /**
   * A ratio's compressed flat token ids (int64 [Σ visible]) built on the device from the page tables
   * (host Int32Array or device buffer, flattened request by request at pageTableOffsets): the same
   * per-entry function as the host planner. Page ids are not range-checked here (the caller checks
   * the page tables against the cache); the dequant kernel checks every id again.
   */
  async planCompressedTokenIds(
    args: { seqLens: Int32Array; extendLens: Int32Array; ratio: 4 | 128; pageTables: Int32Array | DeviceBuffer; pageTableOffsets: ArrayLike<number>; pageSize: number },
    placement: Placement = 'host',
  ): Promise<BigInt64Array | DeviceBuffer> {
    const n = args.seqLens.length;
    let total = 0;
    for (let r = 0; r < n; r++) total += args.extendLens[r]! > 0 ? Math.floor(args.seqLens[r]! / args.ratio) : 0;
    const offsets = new BigInt64Array(n + 1);
    for (let r = 0; r <= n; r++) offsets[r] = BigInt(args.pageTableOffsets[r] ?? 0);
    const ids = this.output(placement, BigInt64Array, 8, total, 'tokenIds');
    await this.launch('planCompressedTokenIds', [ids], () =>
      this.ops.planCompressedTokenIds(
        this.operands({ numRequests: n, seqLens: args.seqLens, extendLens: args.extendLens, ratio: args.ratio, pageTables: args.pageTables, pageTableOffsets: offsets, pageSize: args.pageSize, tokenIds: ids, total }),
        this.stream,
      ),
    );
    return ids;
  }

  /** A host-side write: the native CPU core on host threads (the cache lives in host memory). */
  async quantizeKCache(job: QuantizeKCacheJob): Promise<void> {
    this.calls.assertAlive();
    await this.host.quantizeKCache(job);
  }

  async dispose(): Promise<void> {
    await Promise.all([this.calls.dispose(), this.host.dispose()]);
  }
}

export const cudaBackendEntry: BackendEntry = {
  name: 'cuda',
  priority: 10,
  async probe(options: { device?: number } = {}): Promise<BackendProbe> {
    let device: number;
    try {
      device = options.device ?? defaultCudaDevice();
    } catch (e) {
      return { available: false, reason: (e as Error).message };
    }
    const { addon: _addon, ...p } = await probeCuda(device);
    return p;
  },
  async create(options) {
    const device = options.device ?? defaultCudaDevice();
    const p = await probeCuda(device);
    if (!p.available || !p.addon) throw new SparseMlaError('BACKEND_UNAVAILABLE', `backend "cuda" is unavailable — ${p.reason}`, 'backend');
    const cuda = p.addon.cuda as Extract<NativeAddon['cuda'], { built: true }>;
    try {
      return new CudaBackend(p.addon, cuda.ops!, options.workers ?? availableParallelism(), options.memoryBudgetBytes ?? defaultMemoryBudgetBytes(), device);
    } catch (e) {
      // the engine's stream (SMLA_OUT_OF_MEMORY: TOO_LARGE, a CUDA error: BACKEND_FAILURE), typed as the ops' failures are
      throw addonFailure('cuda', 'createEngine', e);
    }
  },
};

/** The environment variable that picks a cuda engine's device when createEngine names none. */
export const CUDA_DEVICE_ENV = 'SPARSE_MLA_DEVICE';

/** SPARSE_MLA_DEVICE, else 0; a value that is not a device index is refused (INVALID_VALUE). */
export function defaultCudaDevice(env: Readonly<Record<string, string | undefined>> = process.env): number {
  const raw = env[CUDA_DEVICE_ENV];
  if (raw === undefined || raw.trim() === '') return 0;
  const v = Number(raw.trim());
  if (!Number.isSafeInteger(v) || v < 0) throw new SparseMlaError('INVALID_VALUE', `${CUDA_DEVICE_ENV}: expected a CUDA device index (0, 1, …), got ${JSON.stringify(raw)}`, CUDA_DEVICE_ENV);
  return v;
}
