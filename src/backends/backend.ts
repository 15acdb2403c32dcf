/**
 * The internal backend interface. The engine validates and normalizes every call once (src/ops/)
 * and hands a backend a *job*: plain typed arrays plus explicit sizes, already checked against
 * each other. A backend (wasm, cpu, cuda) only has to run it.
 *
 * Guarantees a backend can rely on:
 * - all sizes are non-negative integers ≤ 2^31 − 1 and the arrays have exactly the stated lengths;
 * - attention indices are int32; any value outside [0, bound) is an invalid entry to skip;
 * - topkLength values lie in [0, topk]; attnSink has hQ entries; smScale is finite as float32;
 * - cache token ids (quantize/dequantize) lie in [0, cache.numTokens);
 * - input arrays must not be modified and may be backed by a SharedArrayBuffer (a layer's own
 *   copies of its operands among them: memory.ts, markCallCopies; count them in the call's budget).
 * A backend adds only its own limits (e.g. the WASM heap) and must check them before any work.
 */
import type { BackendName, CacheFormat, DeviceBuffer, Placement } from '../types.js';
import type { InputBytes, StagingArena } from './staging.js';
import type { MemoryPart } from './memory.js';

/**
 * Jobs are generic in B, the device-buffer type a backend accepts in place of a host array
 * (never, the default: host arrays only; the cuda backend takes DeviceBuffer too).
 */
export interface CacheView<B = never> {
  format: CacheFormat;
  pageSize: number;
  numPages: number;
  /** pageSize × numPages */
  numTokens: number;
  /** exact byte length of data */
  bytes: number;
  data: Uint8Array | B;
}

export interface QuantizeKCacheJob {
  /** written in place; last write wins for duplicate ids */
  cache: CacheView;
  tokenIds: Int32Array;
  /** [n, rowDim] row-major */
  rows: Uint16Array | Float32Array;
  rowsDtype: 'bf16' | 'float32';
  n: number;
  /** 512 (v4) or 576 (v32) */
  rowDim: number;
}

export interface DequantizeKCacheJob<B = never> {
  cache: CacheView<B>;
  tokenIds: Int32Array;
  n: number;
  rowDim: number;
}

export interface SparsePrefillJob<B = never> {
  /** bf16 [sQ, hQ, dQK] */
  q: Uint16Array | B;
  /** bf16 [sKV, dQK] */
  kv: Uint16Array | B;
  /** int32 [sQ, topk]; valid iff 0 ≤ v < sKV */
  indices: Int32Array | B;
  /** int32 [sQ] in [0, topk] (device: any value, clamped to [0, topk] by the kernel), or null */
  topkLength: Int32Array | B | null;
  /** float32 [hQ], or null */
  attnSink: Float32Array | B | null;
  sQ: number;
  hQ: number;
  /** a multiple of 64, ≥ dV */
  dQK: number;
  /** a multiple of 64 */
  dV: number;
  sKV: number;
  topk: number;
  smScale: number;
}

export interface SparsePrefillOutput {
  /** bf16 [sQ, hQ, dV] */
  out: Uint16Array;
  /** float32 [sQ, hQ] */
  maxLogits: Float32Array;
  /** float32 [sQ, hQ] */
  lse: Float32Array;
}

/** One set of paged entries: token ids into a v4 cache. */
export interface PagedIndexSet<B = never> {
  cache: CacheView<B>;
  /** int32 [n, topk]; valid iff 0 ≤ v < cache.numTokens */
  indices: Int32Array | B;
  topk: number;
  topkLength: Int32Array | B | null;
}

export interface PagedSparseAttentionJob<B = never> {
  /** bf16 [n, hQ, 512] */
  q: Uint16Array | B;
  n: number;
  hQ: number;
  main: PagedIndexSet<B>;
  extra: PagedIndexSet<B> | null;
  attnSink: Float32Array | B | null;
  smScale: number;
}

export type PagedSparseAttentionOutput = SparsePrefillOutput;

/** An index set as pagedSparseAttentionFields reads it, whatever arrays (host, staged, device) it holds. */
interface PagedSetOf<C, I, L> {
  cache: { pageSize: number; numPages: number; data: C };
  indices: I;
  topk: number;
  topkLength: L;
}

/**
 * A paged attention job's inputs as the fields of the C ABI's params struct (abi.ts
 * OP_PARAMS.pagedSparseAttention, less the outputs): each index set flattened, no extra set as
 * nulls and zeros. Every backend hands its ops these fields; the arrays are the job's own.
 */
export function pagedSparseAttentionFields<Q, C, I, L, S>(job: { q: Q; n: number; hQ: number; main: PagedSetOf<C, I, L>; extra: PagedSetOf<C, I, L> | null; attnSink: S; smScale: number }) {
  const { main, extra } = job;
  return {
    q: job.q,
    n: job.n,
    hQ: job.hQ,
    kCache: main.cache.data,
    pageSize: main.cache.pageSize,
    numPages: main.cache.numPages,
    indices: main.indices,
    topk: main.topk,
    topkLength: main.topkLength,
    extraKCache: extra ? extra.cache.data : null,
    extraPageSize: extra ? extra.cache.pageSize : 0,
    extraNumPages: extra ? extra.cache.numPages : 0,
    extraIndices: extra ? extra.indices : null,
    extraTopk: extra ? extra.topk : 0,
    extraTopkLength: extra ? extra.topkLength : null,
    attnSink: job.attnSink,
    smScale: job.smScale,
  };
}

/** Outputs where the caller asked for them: host arrays or device buffers. */
export interface PlacedAttentionOutput {
  out: Uint16Array | DeviceBuffer;
  maxLogits: Float32Array | DeviceBuffer;
  lse: Float32Array | DeviceBuffer;
}

/**
 * What a backend with device memory adds (cuda): explicit copies, and ops whose operands may be
 * device buffers and whose outputs go where `output` says. Jobs come from the same validation
 * (src/ops/) as host jobs.
 */
export interface DeviceOps {
  /** the CUDA device the engine runs on */
  readonly deviceIndex: number;
  /** whether `buffer` is one this backend made, on its device (a layer's checks refuse any other before any work) */
  owns(buffer: DeviceBuffer): boolean;
  /**
   * whether `buffer` is a live device buffer (branded, not freed) of exactly `bytes` bytes that this
   * backend made on its device: a device layer's check of each operand in one call (false for
   * anything else, whose full checks then name it)
   */
  ownsLive(buffer: unknown, bytes: number): boolean;
  /** an uninitialized device buffer of `bytes` bytes */
  alloc(bytes: number): DeviceBuffer;
  /** a new buffer on this device holding a copy of another engine's buffer (any device) */
  copyFrom(src: DeviceBuffer): Promise<DeviceBuffer>;
  /** resolves once every op queued so far has finished */
  synchronize(): Promise<void>;
  /** a new device buffer holding a copy of `data` */
  upload(data: ArrayBufferView): Promise<DeviceBuffer>;
  /** copies the whole buffer into `into` (exactly buffer.byteLength bytes) */
  /** `argument` names the buffer in a typed error (a buffer of another device or backend, or freed). */
  download(buffer: DeviceBuffer, into: ArrayBufferView, argument?: string): Promise<void>;
  dequantizeKCache(job: DequantizeKCacheJob<DeviceBuffer>, output: Placement): Promise<Uint16Array | DeviceBuffer>;
  sparsePrefill(job: SparsePrefillJob<DeviceBuffer>, output: Placement): Promise<PlacedAttentionOutput>;
  pagedSparseAttention(job: PagedSparseAttentionJob<DeviceBuffer>, output: Placement): Promise<PlacedAttentionOutput>;
}

/**
 * The steps of one attention layer down the workspace path (SPEC §6, §7), declared by every
 * backend over its own memory: host arrays on the host backends (B = never), device buffers queued
 * on the engine's stream on cuda. prefillLayer (src/planner/prefill_layer.ts) is one flow over
 * them; the plan keeps what they build that does not change within a chunk. Inputs are a plan's,
 * already validated and sized.
 */
export interface LayerSteps<B = never> {
  /** where the steps' arrays live: 'host' (typed arrays) or 'device' (the engine's buffers) */
  readonly memory: Placement;
  /** Index rows (SPEC §6): a c4 combine of the indexer's top-k, or the dense rows of ratio 0 / 128 (topkIndices null). */
  planRows(job: PlanRowsJob<B>): Promise<PlannedRows<B>>;
  /** A ratio's compressed flat token ids (int64 [total]) from its page tables. */
  planCompressedTokenIds(job: CompressedTokenIdsJob<B>): Promise<BigInt64Array | B>;
  /** Chunk-invariant ids (the SWA gather) in the steps' memory: the array itself on the host, a copy on a device. */
  placeIds(ids: BigInt64Array): Promise<BigInt64Array | B>;
  /** Chunk-invariant int32 rows (a c0 / c128 layer's paged form) in the steps' memory, as placeIds. */
  placeRows(rows: Int32Array): Promise<Int32Array | B>;
  /** A workspace of `bytes` bytes of bf16 rows (on the host in shared memory, so workers read it in place). */
  allocWorkspace(bytes: number): Uint16Array | B;
  /** Dequantizes a cache's rows at tokenIds into workspace rows [rowOffset, rowOffset + n). */
  dequantizeKCacheInto(job: WorkspaceDequantizeJob<B>): Promise<void>;
  /** sparsePrefill of the layer's queries over the workspace rows; outputs where `output` says. */
  prefill(job: WorkspacePrefillJob<B>, output: Placement): Promise<PlacedAttentionOutput>;
  /**
   * A c4 combine's dropped total (PlannedRows.droppedTotal) as a number: itself on the host; on a
   * device an 8-byte read queued behind the combine, resolving once it has landed.
   */
  readDroppedTotal(total: number | B): Promise<number>;
  /**
   * Device steps only: a layer's planRows (a c4 combine into rows the plan keeps, or none), its
   * dequants and its prefill queued on the stream at once (a layer program: one addon call, not one
   * a step), every operand on the device and the outputs left there. Everything is checked before the first launch. Resolves once queued,
   * with the combine's dropped total once that has come back (read right behind the combine, so
   * the prefill may still be running); undefined, before any work, when the steps cannot queue
   * these operands together (another engine's memory): the caller then runs the steps one by one.
   * `droppedLater`: resolves once queued, the dropped total a promise of its read.
   */
  queueLayer?(job: QueuedLayerJob<B>, droppedLater: boolean): Promise<QueuedLayerOutput<B> | undefined>;
  /**
   * Device steps only: a c0 / c128 layer's paged path, the device paged op (DeviceOps
   * pagedSparseAttention) over a job prefillLayer builds from what was checked already — the
   * plan's placed paged form, the layer's caches (Plan.checkCaches) and its q, sink and smScale
   * (the layer call's checks), with no await between those checks and this call — so nothing is
   * validated again (engine.pagedSparseAttention still validates every argument of the public op).
   * `owner`: what the steps may keep per-layer state for (the plan's resources, as QueuedLayerJob's).
   */
  pagedAttention?(job: PagedSparseAttentionJob<B>, output: Placement, owner: object): Promise<PlacedAttentionOutput>;
}

/** What LayerSteps.queueLayer queues: the steps' own jobs, in launch order. */
export interface QueuedLayerJob<B = never> {
  /** what the steps may keep per-layer state for (the plan's resources): kept as long as it lives */
  owner: object;
  /** a c4 combine into kept rows (`into` with a droppedTotal), or null when the rows are built already */
  planRows: (PlanRowsJob<B> & { into: PlannedRows<B> }) | null;
  dequants: WorkspaceDequantizeJob<B>[];
  prefill: WorkspacePrefillJob<B>;
}

export interface QueuedLayerOutput<B = never> {
  out: B;
  lse: B;
  maxLogits: B;
  /** the combine's dropped total (0 without a combine); with droppedLater, a promise of its read */
  dropped: number | Promise<number>;
}

/** The rows of one ratio for a chunk: the planner's per-request lengths and the row geometry. */
export interface PlanRowsJob<B = never> {
  seqLens: Int32Array;
  extendLens: Int32Array;
  window: number;
  ratio: 0 | 4 | 128;
  /** ratio 4: int32 [numQueries, topk] request-local compressed positions; null: the dense rows */
  topkIndices: Int32Array | B | null;
  topk: number;
  /** row width: at least the widest row */
  width: number;
  /**
   * Device steps build the rows into these (a c4 layer's buffers kept by its plan, sized for this
   * job) instead of allocating; host steps return new arrays.
   */
  into?: PlannedRows<B>;
}

export interface PlannedRows<B = never> {
  /** int32 [numQueries, width]: workspace rows, −1 padded */
  rows: Int32Array | B;
  /** int32 [numQueries]: real entries per row */
  lens: Int32Array | B;
  /**
   * top-k entries dropped as not yet visible, summed over the queries: a number on the host, an
   * int64 [1] buffer on a device (readDroppedTotal reads either); null for dense rows (nothing to drop)
   */
  droppedTotal: number | B | null;
}

export interface CompressedTokenIdsJob<B = never> {
  seqLens: Int32Array;
  extendLens: Int32Array;
  ratio: 4 | 128;
  /** each request's used pages, flattened request by request at pageTableOffsets (numRequests + 1) */
  pageTables: Int32Array | B;
  pageTableOffsets: Float64Array;
  pageSize: number;
  /** ids in all: the ratio's compressed workspace rows */
  total: number;
}

export interface WorkspaceDequantizeJob<B = never> {
  cache: CacheView<B>;
  /** int64 [n], every id inside the cache (the plan checked them) */
  tokenIds: BigInt64Array | B;
  n: number;
  workspace: Uint16Array | B;
  rowOffset: number;
}

export interface WorkspacePrefillJob<B = never> {
  /** bf16 [numQueries, hQ, 512] */
  q: Uint16Array | B;
  workspace: Uint16Array | B;
  /** workspace rows the index rows read: [0, rows) */
  rows: number;
  /** int32 [numQueries, width] */
  indices: Int32Array | B;
  /** int32 [numQueries] */
  lengths: Int32Array | B;
  /** float32 [hQ], or null */
  attnSink: Float32Array | B | null;
  numQueries: number;
  hQ: number;
  width: number;
  smScale: number;
}

export interface Backend {
  readonly name: BackendName;
  /** Worker threads the backend runs on (wasm), 0 when not applicable. */
  readonly workers: number;
  /** present when the backend has device memory (cuda) */
  readonly device?: DeviceOps;
  /** the layer steps over the backend's memory (host backends: host arrays; cuda: device buffers) */
  readonly layer: LayerSteps<DeviceBuffer>;
  /** host memory one call may use beyond the caller's arrays (memory.ts, SPEC §9) */
  readonly memoryBudgetBytes?: number;
  /**
   * The reused shared memory through which host inputs reach the backend's threads (staging.ts);
   * a layer call's copies of its host operands are lent from it too (copyAtCall)
   */
  readonly staging?: StagingArena;
  /** what its ops count against the host memory budget, from sizes (HostOpMemory): cpu and wasm, and cuda for its host staging */
  readonly opMemory?: HostOpMemory;
  quantizeKCache(job: QuantizeKCacheJob): Promise<void>;
  /** bf16 [n, rowDim] */
  dequantizeKCache(job: DequantizeKCacheJob): Promise<Uint16Array>;
  sparsePrefill(job: SparsePrefillJob): Promise<SparsePrefillOutput>;
  pagedSparseAttention(job: PagedSparseAttentionJob): Promise<PagedSparseAttentionOutput>;
  /** Release threads/devices. Idempotent; calls after it reject with DISPOSED. */
  dispose(): Promise<void>;
}

/**
 * Bulk copies a host backend's paged op makes of a cache (choosePagedRead's estimate): read whole
 * (`whole(cacheUnshared)`: 0 for an in-place read, as the cpu addon's of a shared cache, which then
 * keeps the whole cache without planning) or compact (`compact`: after its gather, into the staging
 * or a worker's heap). The op and a layer's check of it (prefill_layer_checks.ts) read the same counts.
 */
export interface PagedCopies {
  whole(cacheUnshared: boolean): number;
  compact: number;
}

/**
 * An index set of a paged call as the host backends' budget counts it: read whole (its cache and
 * ids staged as they are) or through a compact cache of `cacheBytes` with ids of `indicesBytes`,
 * both made by the gather (unshared).
 */
export type PagedSetBytes = { whole: true; cache: InputBytes; indices: InputBytes } | { whole: false; cacheBytes: number; indicesBytes: number };

/**
 * What a backend's ops count against its host memory budget, from sizes alone: the functions its
 * ops' own budget checks call, so that prefillLayer can check the ops a layer will run before any
 * work with the same arithmetic (prefill_layer_checks.ts, checkLayerOps). An operand in device memory is
 * no host bytes; `output` is where the op's outputs go (a host backend's: always the host).
 */
export interface HostOpMemory {
  /** dequantizeKCache of n tokens (rows of rowDim) of a `format` cache whose data is `cache`, by ids `tokenIds` (null: int64 ids already in device memory, a cuda layer's) */
  dequantizeKCache(format: CacheFormat, n: number, rowDim: number, cache: InputBytes, tokenIds: InputBytes | null, output: Placement): MemoryPart[];
  /** sparsePrefill of sQ × hQ queries, dV wide, over its inputs q, kv, indices, topkLength, attnSink */
  sparsePrefill(inputs: readonly InputBytes[], sQ: number, hQ: number, dV: number, output: Placement): MemoryPart[];
  /** pagedSparseAttention of n × hQ queries over `fixed` (q, the lengths, attnSink) and its index sets as it reads them (whole or compact) */
  pagedSparseAttention(fixed: readonly InputBytes[], sets: readonly PagedSetBytes[], n: number, hQ: number, output: Placement): MemoryPart[];
  /** how its paged op reads an index set's cache (paged_gather.ts, choosePagedRead); null: always whole, as it is given */
  readonly pagedCopies: PagedCopies | null;
  /** where its ops' tasks run in workers of a bounded heap each (wasm): what one task needs there; absent: no such bound */
  readonly workerHeap?: WorkerHeap;
}

/** What one task of an op needs in a worker's heap: bytes every task holds whatever its rows (replicated inputs, scratch), and bytes per row. */
export interface TaskHeap {
  fixedBytes: number;
  bytesPerRow: number;
}

/**
 * What a backend's ops need in a worker's heap, from sizes, and the check of it: the functions its
 * ops' own checks (before any copy) call, so that prefillLayer checks the ops a layer will run
 * at the call with the same arithmetic (prefill_layer_checks.ts, checkLayerOps).
 */
export interface WorkerHeap {
  /** dequantizeKCache of a `format` cache into rows of rowDim */
  dequantizeKCache(format: CacheFormat, rowDim: number): TaskHeap;
  /** sparsePrefill over a kv of `kvBytes`, hQ heads, topk entries per row */
  sparsePrefill(kvBytes: number, hQ: number, dQK: number, dV: number, topk: number): TaskHeap;
  /** pagedSparseAttention over caches of `cacheBytes` in all (as it reads them: whole or compact), `entries` ids per row (every set's topk) */
  pagedSparseAttention(cacheBytes: number, entries: number, hQ: number): TaskHeap;
  /** whether a task of one row fits a worker's heap */
  fits(need: TaskHeap): boolean;
  /** TOO_LARGE naming `argument` where a task of one row does not fit (`call`: the call to name, where not the op itself) */
  check(need: TaskHeap, argument: string, call?: string): void;
}

export interface BackendProbe {
  available: boolean;
  /** why it is not available (and how to get it), or a note when it is */
  reason?: string;
  details?: Record<string, string | number | boolean>;
}

export interface BackendCreateOptions {
  /** worker-thread count for backends that use workers; validated by the engine */
  workers?: number;
  /** host memory one call may use beyond its inputs (src/backends/memory.ts); validated by the engine */
  memoryBudgetBytes?: number;
  /** the CUDA device (cuda backend); validated by the engine */
  device?: number;
}

/** A registry entry: backends are data (name, priority, how to probe, how to create). */
export interface BackendEntry {
  name: BackendName;
  /** lower runs first under `auto` */
  priority: number;
  /** Never throws; says whether create() can succeed on this machine (on that CUDA device, for cuda). */
  probe(options?: { device?: number }): Promise<BackendProbe>;
  create(options: BackendCreateOptions): Promise<Backend>;
}
