/**
 * createEngine: picks a backend (registry), then for every call validates and normalizes the
 * arguments once (src/ops/, before any work) and hands the job to the backend. The main thread
 * never does the math.
 */
import { SparseMlaError, disposedError, fail } from './errors.js';
import { deviceTensor, isDeviceBuffer, placedTensor as placed, tensor } from './tensor.js';
import type {
  BackendName,
  DType,
  DequantizeKCacheArgs,
  DeviceBuffer,
  DeviceKvCache,
  DeviceTensor,
  Engine,
  KvCache,
  OnDevice,
  OutputOptions,
  Placement,
  PlacedTensor,
  EngineOptions,
  PagedSparseAttentionArgs,
  PagedSparseAttentionResult,
  QuantizeKCacheArgs,
  SparsePrefillArgs,
  SparsePrefillResult,
  Tensor,
} from './types.js';
import type { Backend, DeviceOps, HostOpMemory, LayerSteps, PlacedAttentionOutput } from './backends/backend.js';
import type { StagingArena } from './backends/staging.js';
import { createBackend, resolveBackendChoice } from './backends/registry.js';
import { checkDeviceTensor, checkOutputOption as checkOutput, checkTensor, checkViewsIntact, describe } from './ops/common.js';
import { checkCache, prepareDequantizeKCache, prepareQuantizeKCache } from './ops/kv_cache.js';
import { preparePagedSparseAttention } from './ops/paged_sparse_attention.js';
import { prepareSparsePrefill } from './ops/sparse_prefill.js';

/** Upper bound on the worker option (far above any core count; guards typos like 1e6). */
export const MAX_WORKERS = 1024;
/** Smallest memoryBudgetBytes accepted (a budget below the smallest staging slab is a typo). */
export const MIN_MEMORY_BUDGET_BYTES = 2 ** 20;

/**
 * The engine behind createEngine(). Exported for the library's own layer API (prefillLayer narrows
 * an engine to it to run the backend's layer steps) and tests; not part of the public API.
 */
export class SparseMlaEngine implements Engine {
  /** Whether `value` is an engine createEngine() made: its private brand is there (a Proxy of one, or an object inheriting from one, has none). */
  static isEngine(value: unknown): value is SparseMlaEngine {
    return typeof value === 'object' && value !== null && #brand in value;
  }

  /**
   * @internal Whether `self` runs the engine's methods: an engine, or a Proxy of one or an object inheriting from
   * one (its state read through it). An object that has only the engine's prototype (Object.create of
   * it, a mocking library's stub instance, a Proxy claiming it) passes instanceof but has no state.
   */
  static runsAsEngine(self: unknown): self is SparseMlaEngine {
    if (!(self instanceof SparseMlaEngine)) return false;
    const life: unknown = self.life, impl: unknown = self.impl;
    return typeof life === 'object' && life !== null && typeof impl === 'object' && impl !== null;
  }

  /** the brand isEngine checks */
  readonly #brand = true;
  readonly backend: BackendName;
  readonly workers: number;
  private readonly impl: Backend;
  // in an object of its own: a caller's Object.freeze(engine) (shallow) must not keep dispose() from
  // marking it (the assignment threw TypeError, and the backend's workers and threads were never
  // stopped); not a #field, which a Proxy of the engine could not read through its methods
  private readonly life: { teardown: Promise<void> | undefined } = { teardown: undefined };

  constructor(impl: Backend) {
    this.impl = impl;
    this.backend = impl.name;
    this.workers = impl.workers;
  }

  private alive(): void {
    if (this.life.teardown !== undefined) throw disposedError();
  }

  async quantizeKCache(args: QuantizeKCacheArgs): Promise<void> {
    engineThis(this, 'quantizeKCache');
    const job = prepareQuantizeKCache(args);
    checkViewsIntact(job);
    await this.impl.quantizeKCache(job);
  }

  /** @internal DISPOSED after dispose(): a layer checks it before it starts (one without queries does no backend work) */
  assertAlive(): void {
    this.alive();
  }

  /** @internal the backend's layer steps (prefillLayer's workspace path); DISPOSED after dispose() */
  layerSteps(): LayerSteps<DeviceBuffer> {
    this.alive();
    return this.impl.layer;
  }

  /** @internal the staging a layer's copies of its host operands are lent from, and the budget they count against (prefill_layer_checks.ts) */
  hostMemory(): { staging: StagingArena | undefined; budgetBytes: number | undefined; ops: HostOpMemory | undefined } {
    return { staging: this.impl.staging, budgetBytes: this.impl.memoryBudgetBytes, ops: this.impl.opMemory };
  }

  get hasDevice(): boolean {
    if (!SparseMlaEngine.runsAsEngine(this)) throw notThisEngine(this, 'hasDevice', true);
    return this.impl.device !== undefined;
  }

  private deviceOps(what: string): DeviceOps {
    if (!this.impl.device) {
      throw new SparseMlaError('BACKEND_UNAVAILABLE', `${what} needs device memory, which the ${this.backend} backend has not; create the engine with { backend: 'cuda' }`, 'backend');
    }
    return this.impl.device;
  }

  /** The device ops when the call involves device memory (device inputs or device outputs), else null. */
  private route(job: object, output: Placement, op: string): DeviceOps | null {
    return output === 'device' || usesDevice(job) ? this.deviceOps(`${op} with device tensors`) : null;
  }

  async dequantizeKCachePaged<P extends Placement = 'host'>(args: OnDevice<DequantizeKCacheArgs>, options?: OutputOptions<P>): Promise<PlacedTensor<'bf16', P>> {
    engineThis(this, 'dequantizeKCachePaged');
    const output = checkOutput(options);
    // with the engine's memory: a call over it is refused from the ids' count, before any id is read
    const job = prepareDequantizeKCache(args, { ...this.hostMemory(), hasDevice: this.hasDevice }, output);
    checkViewsIntact(job);
    const dev = this.route(job, output, 'dequantizeKCachePaged');
    const out = dev ? await dev.dequantizeKCache(job, output) : await this.impl.dequantizeKCache(job as typeof job & { cache: { data: Uint8Array } });
    return placed('bf16', [job.n, job.rowDim], out) as PlacedTensor<'bf16', P>;
  }

  async sparsePrefill<P extends Placement = 'host'>(args: OnDevice<SparsePrefillArgs>, options?: OutputOptions<P>): Promise<SparsePrefillResult<P>> {
    engineThis(this, 'sparsePrefill');
    const output = checkOutput(options);
    const job = prepareSparsePrefill(args);
    checkViewsIntact(job);
    const dev = this.route(job, output, 'sparsePrefill');
    const r: PlacedAttentionOutput = dev ? await dev.sparsePrefill(job, output) : await this.impl.sparsePrefill(job as Parameters<Backend['sparsePrefill']>[0]);
    return attentionTensors(r, job.sQ, job.hQ, job.dV) as SparsePrefillResult<P>;
  }

  async pagedSparseAttention<P extends Placement = 'host'>(args: OnDevice<PagedSparseAttentionArgs>, options?: OutputOptions<P>): Promise<PagedSparseAttentionResult<P>> {
    engineThis(this, 'pagedSparseAttention');
    const output = checkOutput(options);
    const job = preparePagedSparseAttention(args);
    checkViewsIntact(job);
    const dev = this.route(job, output, 'pagedSparseAttention');
    const r: PlacedAttentionOutput = dev ? await dev.pagedSparseAttention(job, output) : await this.impl.pagedSparseAttention(job as Parameters<Backend['pagedSparseAttention']>[0]);
    return attentionTensors(r, job.n, job.hQ, 512) as PagedSparseAttentionResult<P>;
  }

  async upload<D extends DType>(t: Tensor<D>): Promise<DeviceTensor<D>> {
    engineThis(this, 'upload');
    const dev = this.deviceOps('upload');
    const host = checkTensor(t as unknown, 'tensor', ['bf16', 'float32', 'int32', 'int64', 'uint8'] as const) as unknown as Tensor<D>;
    return deviceTensor(host.dtype, host.shape, await dev.upload(host.data as ArrayBufferView));
  }

  async uploadKvCache(cache: KvCache): Promise<DeviceKvCache> {
    engineThis(this, 'uploadKvCache');
    const dev = this.deviceOps('uploadKvCache');
    const c = checkCache(cache, 'cache');
    return Object.freeze({ format: c.format, pageSize: c.pageSize, numPages: c.numPages, data: await dev.upload(c.data) });
  }

  async download<D extends DType>(t: DeviceTensor<D>): Promise<Tensor<D>> {
    engineThis(this, 'download');
    return this.downloadArgument(t, 'tensor');
  }

  /** @internal download, a typed error naming the tensor `argument` (a layer's device operand it reads back). */
  async downloadArgument<D extends DType>(t: DeviceTensor<D>, argument: string): Promise<Tensor<D>> {
    this.alive();
    const dev = this.deviceOps('download');
    const { dtype, shape, data } = checkDeviceTensor(t, argument, 'a device tensor (from upload or an op with { output: "device" })');
    const host = tensor(dtype, shape) as Tensor<D>;
    await dev.download(data, host.data as ArrayBufferView, argument);
    return host;
  }

  get device(): number | undefined {
    if (!SparseMlaEngine.runsAsEngine(this)) throw notThisEngine(this, 'device', true);
    return this.impl.device?.deviceIndex;
  }

  /** @internal the backend's device ops, if it has device memory (a device layer's checks of its operands: DeviceOps.ownsLive) */
  layerDevice(): DeviceOps | undefined {
    return this.impl.device;
  }

  /** @internal whether `buffer` is a device buffer this engine's backend made on its device (prefillLayer's checks) */
  ownsDeviceBuffer(buffer: DeviceBuffer): boolean {
    return this.impl.device?.owns(buffer) ?? false;
  }

  async copyFrom<D extends DType>(t: DeviceTensor<D>): Promise<DeviceTensor<D>> {
    engineThis(this, 'copyFrom');
    const dev = this.deviceOps('copyFrom');
    const { dtype, shape, data } = checkDeviceTensor(t, 'tensor', 'a device tensor of a cuda engine');
    return deviceTensor(dtype as D, shape, await dev.copyFrom(data));
  }

  /** Not an async function (it waits in the backend's): one promise a call, the backend's. */
  synchronize(): Promise<void> {
    if (!SparseMlaEngine.runsAsEngine(this)) return Promise.reject(notThisEngine(this, 'synchronize'));
    if (this.life.teardown !== undefined) return Promise.reject(disposedError());
    return this.impl.device?.synchronize() ?? Promise.resolve();
  }

  /** Every call, the first or a later one, resolves once the backend is torn down (a later one is not done before the first is). */
  dispose(): Promise<void> {
    // (unbound, e.g. passed as a callback: refused, and no engine is disposed)
    if (!SparseMlaEngine.runsAsEngine(this)) return Promise.reject(notThisEngine(this, 'dispose'));
    if (this.life.teardown === undefined) {
      undisposedWorkers.unregister(this);
      this.life.teardown = this.teardown();
    }
    return this.life.teardown;
  }

  /** The backend's dispose, started now (a call already past its checks finds the backend disposed), as a promise. */
  private async teardown(): Promise<void> {
    await this.impl.dispose();
  }
}

/**
 * The typed error of an engine method called on anything but an engine (called unbound, e.g. taken
 * from the engine or passed as a callback: `this` was undefined, a TypeError from inside), or on an
 * object of the engine's prototype without its state (runsAsEngine). A Proxy of an engine, or an object
 * inheriting from one, runs the method as the engine does.
 */
function notThisEngine(self: unknown, method: string, getter = false): SparseMlaError {
  return new SparseMlaError('INVALID_VALUE', `this: expected an Engine from createEngine() (${getter ? 'read it as' : 'call it as'} engine.${method}${getter ? '' : '(...)'}), got ${describe(self)}`, 'this');
}

/** The checks an engine method makes first: INVALID_VALUE naming this on anything but an engine, then DISPOSED after dispose(). */
function engineThis(self: unknown, method: string): asserts self is SparseMlaEngine {
  if (!SparseMlaEngine.runsAsEngine(self)) throw notThisEngine(self, method);
  self.assertAlive();
}

/** An attention call's outputs as tensors where they lie: out [rows, hQ, dV], maxLogits and lse [rows, hQ]. */
function attentionTensors(r: PlacedAttentionOutput, rows: number, hQ: number, dV: number) {
  return {
    out: placed('bf16', [rows, hQ, dV], r.out),
    maxLogits: placed('float32', [rows, hQ], r.maxLogits),
    lse: placed('float32', [rows, hQ], r.lse),
  };
}

/** Whether a job holds a device buffer anywhere (its arrays, caches, index sets). */
function usesDevice(job: object): boolean {
  for (const v of Object.values(job)) {
    if (isDeviceBuffer(v)) return true;
    if (typeof v === 'object' && v !== null && !ArrayBuffer.isView(v) && usesDevice(v as object)) return true;
  }
  return false;
}

/**
 * @internal The one check of an engine argument (prefillLayer, prefillLayerSharded): an engine
 * createEngine() made, by its private brand, not by its prototype — a Proxy of an engine passes
 * instanceof and could answer the library's internal calls (hostMemory, layerSteps, ...) with
 * anything. Else INVALID_VALUE naming `argument`.
 */
export function checkEngine(value: unknown, argument: string): SparseMlaEngine {
  if (!SparseMlaEngine.isEngine(value)) fail('INVALID_VALUE', argument, 'an Engine from createEngine() (not a Proxy of one, nor an object inheriting from one)', describe(value));
  return value;
}

const internals = new WeakMap<Engine, Backend>();

/**
 * The backend object behind an engine — for tests and diagnostics (e.g. the wasm backend's pool
 * and its testing hooks, the cuda backend's timing). With a backend class, only a backend of that
 * class (else undefined), typed as such. Not part of the public API.
 */
export function engineBackend(engine: Engine): Backend | undefined;
export function engineBackend<T extends Backend>(engine: Engine, kind: abstract new (...args: never[]) => T): T | undefined;
export function engineBackend(engine: Engine, kind?: abstract new (...args: never[]) => Backend): Backend | undefined {
  const b = internals.get(engine);
  return kind === undefined || b instanceof kind ? b : undefined;
}

/** Creates an engine on the requested backend (option, else SPARSE_MLA_BACKEND, else auto). */
export async function createEngine(options: EngineOptions = {}): Promise<Engine> {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) fail('INVALID_VALUE', 'options', 'an EngineOptions object', describe(options));
  const choice = resolveBackendChoice(options.backend);
  const workers = options.workers;
  if (workers !== undefined && (typeof workers !== 'number' || !Number.isSafeInteger(workers) || workers < 1 || workers > MAX_WORKERS)) {
    fail('INVALID_VALUE', 'workers', `an integer in [1, ${MAX_WORKERS}]`, describe(workers));
  }
  const budget = options.memoryBudgetBytes;
  if (budget !== undefined && (typeof budget !== 'number' || !Number.isSafeInteger(budget) || budget < MIN_MEMORY_BUDGET_BYTES)) {
    fail('INVALID_VALUE', 'memoryBudgetBytes', `an integer number of bytes ≥ ${MIN_MEMORY_BUDGET_BYTES}`, describe(budget));
  }
  const device = options.device;
  if (device !== undefined && (typeof device !== 'number' || !Number.isSafeInteger(device) || device < 0)) {
    fail('INVALID_VALUE', 'device', 'a CUDA device index (an integer ≥ 0)', describe(device));
  }
  const impl = await createBackend(choice, {
    ...(workers === undefined ? {} : { workers }),
    ...(budget === undefined ? {} : { memoryBudgetBytes: budget }),
    ...(device === undefined ? {} : { device }),
  });
  const engine = new SparseMlaEngine(impl);
  internals.set(engine, impl);
  if (impl.name === 'wasm') undisposedWorkers.register(engine, impl, engine);
  return engine;
}

/**
 * A wasm engine's workers are threads that live until dispose(); those of an engine dropped without
 * it are ended once the engine is collected (an engine with a call in flight is still reachable
 * from that call), so a program that never disposes its engines does not collect threads.
 */
const undisposedWorkers = new FinalizationRegistry<Backend>((impl) => {
  impl.dispose().catch(() => undefined);
});
