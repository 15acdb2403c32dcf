/**
 * The `cpu` backend: the C++ core built natively for this machine (AVX-512, with AVX512_BF16's
 * vdpbf16ps for Q·Kᵀ where it has them, in a source build for that machine; AVX2+FMA otherwise),
 * run by the addon on its own threads split by query rows (token rows for the cache ops), never on
 * the event loop nor on libuv's thread pool (native/addon/addon.h, QueueCpuJob). Inputs reach the addon in shared memory: the caller's own when it is shared,
 * else a copy in the engine's reused staging (../staging.ts), made when the call is made, so a
 * caller that detaches or transfers an array mid-call cannot pull memory from under the threads.
 * A cache is not staged whole: the addon copies the tokens a dequant reads, and a quantize writes
 * the cache only when it settles (native/addon/cpu_ops.cpp); nor is an unshared kv or cache whose
 * few rows a call reads: those rows are gathered at the call instead (../prefill_gather.ts,
 * ../paged_gather.ts). Outputs are allocated here and reach the caller only when the call has settled.
 */
import { AddonCalls } from './addon_calls.js';
import { SparseMlaError, disposedError } from '../../errors.js';
import {
  pagedSparseAttentionFields,
  type Backend,
  type BackendEntry,
  type BackendProbe,
  type DequantizeKCacheJob,
  type HostOpMemory,
  type LayerSteps,
  type PagedSparseAttentionJob,
  type PagedSparseAttentionOutput,
  type QuantizeKCacheJob,
  type SparsePrefillJob,
  type SparsePrefillOutput,
} from '../backend.js';
import { hostLayerSteps } from '../wasm/planner.js';
import { checkCallMemory, defaultMemoryBudgetBytes, type MemoryPart } from '../memory.js';
import { allocHostArray } from '../../tensor.js';
import { StagingArena, detached, inputBytes, sparsePrefillParts, stageInputs, stagingParts, stagingPartsOf, tryStageInputs, type StageableArray, type StagedInputs } from '../staging.js';
import { KvRowScratch, planPrefillGather, stageGathered, type KvCopies } from '../prefill_gather.js';
import { defaultWorkerCount } from '../wasm/wasm_backend.js';
import { PagedScratchPool, pagedSparseAttentionParts, planPagedReads } from '../paged_gather.js';
import { CACHE_FORMAT_CODE, ROWS_DTYPE_CODE, loadNativeAddon, type NativeAddon } from './binding.js';
import { V32_TOKEN_BYTES, V4_TOKEN_BYTES } from '../../kv_cache_layout.js';

/**
 * Smallest work (flop-equivalents) worth a thread of its own: starting and joining a thread costs
 * tens of microseconds, about what a core does with this much work.
 */
const MIN_THREAD_WORK = 4e6;

/** Threads for a call: the backend's count, no more than the rows or than the work justifies. */
export function threadsFor(workers: number, rows: number, workPerRow: number): number {
  return Math.max(1, Math.min(workers, rows, Math.floor((rows * workPerRow) / MIN_THREAD_WORK)));
}

/** Heads an attention call's thread takes at least when the addon splits a query row by heads. */
const MIN_GROUP_HEADS = 8;

/**
 * Threads for an attention call over `rows` queries of `hQ` heads: as threadsFor, but a call with
 * fewer rows than threads may use more, the addon then splitting each row's heads into groups of at
 * least MIN_GROUP_HEADS (native/addon/cpu_ops.cpp, GroupHeads).
 */
export function attentionThreadsFor(workers: number, rows: number, hQ: number, workPerRow: number): number {
  const groups = Math.max(1, Math.floor(hQ / MIN_GROUP_HEADS));
  return threadsFor(workers, rows * groups, workPerRow / groups);
}

/** Bytes per token of the compact caches the addon's cache ops copy tokens into (v4 without page padding). */
const COMPACT_TOKEN_BYTES = { v4: V4_TOKEN_BYTES, v32: V32_TOKEN_BYTES } as const;

/**
 * What the cpu backend's ops count against the budget, from sizes (backend.ts, HostOpMemory): its
 * ops' own checks and a layer's check of the ops it will run call these.
 */
export const cpuOpMemory: HostOpMemory = {
  dequantizeKCache(format, n, rowDim, cache, tokenIds) {
    // the addon copies the requested tokens of a cache that is not shared (n tokens, not the
    // cache), snapshots the ids it checks (int32) and widens them for the core (int64)
    return [
      ...stagingPartsOf(tokenIds === null ? [] : [tokenIds]),
      { what: 'the gathered tokens', bytes: cache.unshared > 0 ? n * COMPACT_TOKEN_BYTES[format] : 0 },
      { what: "the addon's checked and widened token ids", bytes: n * (4 + 8) },
      { what: 'outputs', bytes: n * rowDim * 2 },
    ];
  },
  sparsePrefill: (inputs, sQ, hQ, dV) => sparsePrefillParts(inputs, sQ, hQ, dV),
  // the compact caches and ids are staged as they are made (unaligned)
  pagedSparseAttention: (fixed, sets, n, hQ) => pagedSparseAttentionParts(fixed, sets, (b) => b, n, hQ),
  // a whole cache is copied into the staging when it is not shared (a shared one is read in place); a compact one is staged once
  pagedCopies: { whole: (cacheUnshared) => (cacheUnshared ? 1 : 0), compact: 1 },
};

/**
 * The cpu sparsePrefill's kv copies, for the gather's estimate (../prefill_gather.ts): an unshared
 * kv is copied whole once, into the staging; a compact one is gathered straight into the staging.
 * Against a single copy of the whole kv the choice turns on the gather's cost per run of rows, taken
 * from this backend's calls whole vs gathered (bench/results/cpu-prefill-kv-rows-fifty-ninth.txt).
 */
export const cpuPrefillKvCopies: KvCopies = { wholeCopies: 1, compactCopies: 0, runNs: 700 };

/** Engine ids of this thread, naming each engine's calls in the addon (cancelQueued at dispose). */
let nextGroup = 1;

/** The addon's cpu ops with `group` passed to each as its third argument. */
function groupOps(addon: NativeAddon, group: number): NativeAddon {
  return {
    ...addon,
    cpu: {
      sparsePrefill: (threads, params) => addon.cpu.sparsePrefill(threads, params, group),
      pagedSparseAttention: (threads, params) => addon.cpu.pagedSparseAttention(threads, params, group),
      dequantizeKvCache: (threads, params) => addon.cpu.dequantizeKvCache(threads, params, group),
      quantizeKvCache: (threads, params) => addon.cpu.quantizeKvCache(threads, params, group),
      cancelQueued: (g) => addon.cpu.cancelQueued(g),
    },
  };
}

export class CpuBackend implements Backend {
  readonly name = 'cpu' as const;
  readonly workers: number;
  /** host memory one call may use for input copies and outputs (SPEC §9) */
  readonly memoryBudgetBytes: number;
  /** reused shared memory for the inputs (its capacity is the budget) */
  readonly staging: StagingArena;
  /** the layer steps: the host planner and this backend's ops over a host workspace */
  readonly layer: LayerSteps = hostLayerSteps(this);
  readonly opMemory = cpuOpMemory;
  private readonly addon: NativeAddon;
  private readonly calls = new AddonCalls('cpu');
  private readonly group = nextGroup++ % 0x7fffffff;
  /** whether a call reached the addon (dispose() has queued calls to cancel only then) */
  private called = false;
  /** the sparsePrefill gather's plans, each used at its call (../prefill_gather.ts) */
  private readonly kvRows = new KvRowScratch();
  /** the paged op's plans of token ids, each out of the pool while its call may read it (../paged_gather.ts) */
  private readonly pagedScratches = new PagedScratchPool();

  constructor(addon: NativeAddon, workers: number, memoryBudgetBytes = defaultMemoryBudgetBytes()) {
    this.addon = groupOps(addon, this.group);
    this.workers = workers;
    this.memoryBudgetBytes = memoryBudgetBytes;
    this.staging = new StagingArena(memoryBudgetBytes);
  }

  /** Refuses (TOO_LARGE) a call whose parts (cpuOpMemory) exceed the budget. */
  private budget(op: string, argument: string, parts: readonly MemoryPart[]): void {
    checkCallMemory(op, argument, parts, this.memoryBudgetBytes);
  }

  /**
   * Stages the inputs and starts the addon call on them before returning to the caller (so what a
   * caller detaches afterwards is no longer read), then gives the staging back once it settled.
   * When the staging is all in use the call waits; a cache it reads in place (`cache`) detached
   * meanwhile is then an error. The addon queues the call on its own threads at once.
   */
  private run<T extends readonly (StageableArray | null)[]>(
    op: string,
    inputs: T,
    names: readonly string[],
    start: (views: T) => Promise<void>,
    cache?: { data: Uint8Array; bytes: number },
  ): Promise<void> {
    const launch = (staged: StagedInputs<T>): Promise<void> => this.launch(op, () => start(staged.views), staged.release);
    const now = tryStageInputs(this.staging, inputs, names);
    if (now) return launch(now);
    return stageInputs(this.staging, inputs, names).then((staged) => {
      if (cache && cache.data.byteLength !== cache.bytes) {
        staged.release();
        detached('cache.data', 'while the call waited for staging');
      }
      return launch(staged);
    });
  }

  /** Starts the addon call (`start`, on inputs already in shared memory) and runs `release` once it settled. */
  private async launch(op: string, start: () => Promise<void>, release: () => void): Promise<void> {
    this.called = true;
    try {
      await this.calls.run(op, start);
    } finally {
      release();
    }
  }

  /**
   * An unshared kv is copied into the staging whole, however few of its rows the ids read: when
   * those rows cost less, they are gathered now (read at the call) into the staging instead, a
   * compact kv with the ids rewritten to it (../prefill_gather.ts), which the addon reads as it
   * reads the whole kv, with the same results. A kv in shared memory is read in place: nothing to
   * save. Whether the call is refused is the whole kv's, never its ids' (a layer's check from
   * sizes counts the same); the gather is taken only where its own bytes fit the budget too.
   */
  async sparsePrefill(job: SparsePrefillJob): Promise<SparsePrefillOutput> {
    this.calls.assertAlive();
    const { sQ, hQ, dQK, dV, topk } = job;
    const inputs = [job.q, job.kv, job.indices, job.topkLength, job.attnSink] as const;
    const sizes = inputs.map(inputBytes);
    this.budget('sparsePrefill', 'q', cpuOpMemory.sparsePrefill(sizes, sQ, hQ, dV, 'host'));
    const out = allocHostArray(Uint16Array, sQ * hQ * dV, 'out');
    const maxLogits = allocHostArray(Float32Array, sQ * hQ, 'maxLogits');
    const lse = allocHostArray(Float32Array, sQ * hQ, 'lse');
    const threads = attentionThreadsFor(this.workers, sQ, hQ, 2 * topk * hQ * (dQK + dV) + hQ * dV);
    const plan = sizes[1]!.unshared > 0 ? planPrefillGather(job, sizes, this.memoryBudgetBytes, cpuPrefillKvCopies, this.kvRows) : null;
    if (plan) {
      const gathered = stageGathered(this.staging, job, plan, sizes);
      await this.launch('sparsePrefill', () => this.addon.cpu.sparsePrefill(threads, { ...gathered.job, out, maxLogits, lse }), gathered.release);
      return { out, maxLogits, lse };
    }
    await this.run('sparsePrefill', inputs, ['q.data', 'kv.data', 'indices.data', 'topkLength.data', 'attnSink.data'], ([q, kv, indices, topkLength, attnSink]) =>
      this.addon.cpu.sparsePrefill(threads, { ...job, q, kv, indices, topkLength, attnSink, out, maxLogits, lse }),
    );
    return { out, maxLogits, lse };
  }

  async pagedSparseAttention(job: PagedSparseAttentionJob): Promise<PagedSparseAttentionOutput> {
    this.calls.assertAlive();
    const { n, hQ, main, extra } = job;
    // a cache not in shared memory would be copied whole into the staging (one in shared memory is
    // read in place): when the tokens the call reads cost less, they are gathered now (read at the
    // call) into a compact cache instead
    const reads = planPagedReads(job, cpuOpMemory.pagedCopies!, this.pagedScratches);
    // the staging holds the sets read whole as they are; the compact ones' caches and ids, then their staged copies
    const fixed = [job.q, main.topkLength, extra?.topkLength ?? null, job.attnSink].map(inputBytes);
    this.budget('pagedSparseAttention', 'q', cpuOpMemory.pagedSparseAttention(fixed, reads.setBytes, n, hQ, 'host'));
    const fields = pagedSparseAttentionFields({ ...job, ...reads.gather() });
    const inputs = [fields.q, fields.kCache, fields.indices, fields.topkLength, fields.extraKCache, fields.extraIndices, fields.extraTopkLength, fields.attnSink] as const;
    const out = allocHostArray(Uint16Array, n * hQ * 512, 'out');
    const lse = allocHostArray(Float32Array, n * hQ, 'lse');
    const maxLogits = allocHostArray(Float32Array, n * hQ, 'maxLogits');
    const entries = main.topk + (extra?.topk ?? 0);
    const threads = attentionThreadsFor(this.workers, n, hQ, 2 * entries * hQ * 1024 + entries * 1024 + hQ * 512);
    const names = ['q.data', 'kCache.data', 'indices.data', 'topkLength.data', 'extraKCache.data', 'extraIndices.data', 'extraTopkLength.data', 'attnSink.data'];
    await this.run('pagedSparseAttention', inputs, names, ([q, kCache, indices, topkLength, extraKCache, extraIndices, extraTopkLength, attnSink]) =>
      this.addon.cpu.pagedSparseAttention(threads, { ...fields, q, kCache, indices, topkLength, extraKCache, extraIndices, extraTopkLength, attnSink, out, lse, maxLogits }),
    );
    return { out, lse, maxLogits };
  }

  async dequantizeKCache(job: DequantizeKCacheJob): Promise<Uint16Array> {
    this.calls.assertAlive();
    const { cache, tokenIds, n, rowDim } = job;
    // a layer's dequant runs after the layer's awaits: its cache may have gone since the layer's call
    if (cache.data.byteLength !== cache.bytes) detached('cache.data', 'while the call ran');
    this.budget('dequantizeKCachePaged', 'tokenIds', cpuOpMemory.dequantizeKCache(cache.format, n, rowDim, inputBytes(cache.data), inputBytes(tokenIds), 'host'));
    const out = allocHostArray(Uint16Array, n * rowDim, 'out');
    const threads = threadsFor(this.workers, n, rowDim * 8);
    await this.run(
      'dequantizeKCachePaged',
      [tokenIds] as const,
      ['tokenIds'],
      ([ids]) => this.addon.cpu.dequantizeKvCache(threads, { format: CACHE_FORMAT_CODE[cache.format], cache: cache.data, pageSize: cache.pageSize, numPages: cache.numPages, tokenIds: ids, numTokens: n, out }),
      cache,
    );
    return out;
  }

  async quantizeKCache(job: QuantizeKCacheJob): Promise<void> {
    this.calls.assertAlive();
    const { cache, tokenIds, n, rowDim, rows, rowsDtype } = job;
    // the addon quantizes into a compact scratch cache and writes the cache when it settles; it
    // snapshots the ids it checks (int32) and sorts them into four int64 arrays of n
    this.budget('quantizeKCache', 'rows', [
      ...stagingParts([tokenIds, rows]),
      { what: 'the quantized tokens', bytes: n * COMPACT_TOKEN_BYTES[cache.format] },
      { what: "the addon's checked and sorted token ids", bytes: n * (4 + 4 * 8) },
      { what: 'outputs', bytes: 0 },
    ]);
    const threads = threadsFor(this.workers, n, rowDim * 32);
    await this.run('quantizeKCache', [tokenIds, rows] as const, ['tokenIds', 'rows.data'], ([ids, staged]) =>
      this.addon.cpu.quantizeKvCache(threads, { format: CACHE_FORMAT_CODE[cache.format], cache: cache.data, pageSize: cache.pageSize, numPages: cache.numPages, tokenIds: ids, numTokens: n, rows: staged, rowsDtype: ROWS_DTYPE_CODE[rowsDtype] }),
      cache,
    );
  }

  /**
   * Later calls reject with DISPOSED, and so do this engine's calls still queued in the addon (not
   * started); resolves once the running ones have settled.
   */
  async dispose(): Promise<void> {
    const settled = this.calls.dispose();
    if (this.called) this.addon.cpu.cancelQueued(this.group);
    await settled;
    this.staging.close(disposedError());
  }
}

export const cpuBackendEntry: BackendEntry = {
  name: 'cpu',
  priority: 20,
  async probe(): Promise<BackendProbe> {
    const l = loadNativeAddon();
    if (!l.ok) return { available: false, reason: l.reason, details: { addon: l.path } };
    const b = l.addon.build;
    return { available: true, details: { addon: l.path, addonOrigin: l.origin, simd: b.simd, cpuArch: b.cpuArch, defaultWorkers: defaultWorkerCount() } };
  },
  async create(options) {
    const l = loadNativeAddon();
    if (!l.ok) throw new SparseMlaError('BACKEND_UNAVAILABLE', `backend "cpu" is unavailable — ${l.reason}`, 'backend');
    return new CpuBackend(l.addon, options.workers ?? defaultWorkerCount(), options.memoryBudgetBytes ?? defaultMemoryBudgetBytes());
  },
};
