/**
 * The WASM backend: runs validated jobs on the worker pool. It splits a call into row ranges
 * (query rows for attention, token rows for the cache ops; an attention call over fewer query rows
 * than workers into runs of each row's heads as well), checks that each task fits a worker's
 * heap and that the call fits the engine's memory budget before any work, places the inputs where
 * the workers can read them (a reused staging slab, see staging.ts and pool.ts) and stitches the
 * outputs. The main thread only copies bytes; all math runs in the workers.
 */
import os from 'node:os';
import { disposedError, fail } from '../../errors.js';
import type { CacheFormat } from '../../types.js';
import type {
  Backend,
  BackendEntry,
  BackendProbe,
  CacheView,
  DequantizeKCacheJob,
  HostOpMemory,
  LayerSteps,
  PagedSparseAttentionJob,
  PagedSparseAttentionOutput,
  QuantizeKCacheJob,
  SparsePrefillJob,
  SparsePrefillOutput,
  TaskHeap,
} from '../backend.js';
import { V32_TOKEN_BYTES, V4_COMPACT_PAGE_SIZE, V4_TOKEN_DATA_BYTES, V4_TOKEN_SCALE_BYTES, compactGeometry, tokenByteRanges, v4PageBytes } from '../../kv_cache_layout.js';
import { hostLayerSteps } from './planner.js';
import { checkCallMemory, defaultMemoryBudgetBytes } from '../memory.js';
import { PagedScratchPool, pagedSparseAttentionParts, planPagedReads } from '../paged_gather.js';
import { allocHostArray } from '../../tensor.js';
import { WASM_PATH, type WasmModule } from './loader.js';
import { compileCoreModule } from './ops.js';
import { WorkerPool, type TaskGroup, type TaskMethod, type TaskValue } from './pool.js';
import type { AttentionOutput, SharedCache } from './protocol.js';
import { StagingArena, alignStaging, detached, inputBytes, sparsePrefillParts, stageInputs, stagingParts, type InputBytes, type StageableArray } from '../staging.js';
import { KvRowScratch, planPrefillGather, stageGathered, type KvCopies, type KvRowPlan } from '../prefill_gather.js';

/** Heap kept free for the stack, static data, allocator overhead and the core's scratch (exported for the heap tests). */
export const HEAP_RESERVE_BYTES = 64 * 2 ** 20;
/**
 * Smallest amount of work (in flop-equivalents) worth a task of its own: below it the dispatch
 * and copies cost more than another worker saves, so tiny calls stay on one worker.
 */
const MIN_TASK_WORK = 2e7;
/** Work-equivalent of copying one replicated byte (kv, caches) into another worker's heap. */
const COPY_WORK_PER_BYTE = 2;

/**
 * Tokens per part of a dequant: its gathered tokens and its output rows stay around 16 MiB, so the
 * staging, the worker heaps and the outputs in flight are bounded whatever the call's size.
 */
const DEQUANT_PART_BYTES = 16 * 2 ** 20;

export interface RowSplit extends TaskHeap {
  rows: number;
  /** work of one row, flop-equivalents */
  workPerRow: number;
  /** the argument to blame when even one row does not fit */
  argument: string;
}

/** Whether a task of one row (`need`: its heap bytes, TaskHeap) fits a worker heap of `heapBytes`. */
function taskFits(need: TaskHeap, heapBytes: number): boolean {
  return heapBytes - HEAP_RESERVE_BYTES - need.fixedBytes >= need.bytesPerRow;
}

/** TOO_LARGE naming `argument` where a task of one row does not fit a worker heap of `heapBytes` (`call`: the call to name, where not the op itself). */
function checkTaskHeap(need: TaskHeap, heapBytes: number, argument: string, call?: string): void {
  if (taskFits(need, heapBytes)) return;
  fail(
    'TOO_LARGE',
    argument,
    `a call whose per-worker heap share fits the ${heapBytes / 2 ** 20} MiB WASM heap (wasm32, no MEMORY64)${call === undefined ? '' : `: ${call}`}`,
    `${need.fixedBytes + need.bytesPerRow} bytes for the shared inputs and one row (${need.fixedBytes} shared + ${need.bytesPerRow} per row)`,
  );
}

/** A sparsePrefill task's heap: the kv it reads (whole or gathered, prefill_gather.ts) and the sink replicated, the core's scratch; per row its q, ids, length and outputs. */
function sparsePrefillTask(kvBytes: number, hQ: number, dQK: number, dV: number, topk: number): TaskHeap {
  return { fixedBytes: kvBytes + hQ * 4 + scratchBytes(hQ, dQK, dV, topk), bytesPerRow: hQ * dQK * 2 + topk * 4 + 4 + hQ * dV * 2 + hQ * 8 };
}

/**
 * The wasm sparsePrefill's kv copies, for the gather's estimate (../prefill_gather.ts): an unshared
 * kv is copied whole into the staging, then by each of `wholeTasks` tasks into its worker's heap; a
 * compact one is gathered into the staging, then copied by each worker. A run of rows costs the
 * estimate's default.
 */
export function wasmPrefillKvCopies(sizes: readonly InputBytes[], wholeTasks: number, workers: number): KvCopies {
  return { wholeCopies: (sizes[1]!.unshared > 0 ? 1 : 0) + wholeTasks, compactCopies: workers };
}

/** A paged task's heap: the caches it reads (whole or compact) and the sink replicated, the core's scratch; per row its q, ids, lengths and outputs. */
function pagedTask(cacheBytes: number, entries: number, hQ: number): TaskHeap {
  return { fixedBytes: cacheBytes + hQ * 4 + scratchBytes(hQ, 512, 512, entries), bytesPerRow: hQ * 512 * 2 + entries * 4 + 8 + hQ * 512 * 2 + hQ * 8 };
}

/** A dequant task's heap: per token its gathered bytes (twice: the staging's copy, the heap's), its id and its row. */
function dequantTask(format: CacheFormat, rowDim: number): TaskHeap {
  return { fixedBytes: 0, bytesPerRow: 2 * compactTokenBytes(format) + 8 + rowDim * 2 };
}

/**
 * Balanced [start, end) row ranges: as many as the workers, no more than the work justifies
 * (replicated bytes count as work, since each extra task copies them again), and enough that every
 * range fits a worker heap and holds at most maxRowsPerTask rows. Throws TOO_LARGE when a single
 * row cannot fit.
 */
export function splitRows(s: RowSplit, workers: number, heapBytes: number, maxRowsPerTask = Infinity): Array<[number, number]> {
  if (s.rows === 0) return [];
  checkTaskHeap(s, heapBytes, s.argument);
  return rowRanges(s, workers, heapBytes, maxRowsPerTask);
}

/** splitRows' ranges, the heap unchecked (a range is one row where one row does not fit): for arithmetic whose caller checks the heap itself. */
function rowRanges(s: Omit<RowSplit, 'argument'>, workers: number, heapBytes: number, maxRowsPerTask: number): Array<[number, number]> {
  if (s.rows === 0) return [];
  const usable = heapBytes - HEAP_RESERVE_BYTES - s.fixedBytes;
  const maxRows = Math.max(1, Math.floor(usable / s.bytesPerRow));
  let count = Math.min(workers, s.rows, tasksWorthIt(s));
  count = Math.max(count, Math.ceil(s.rows / Math.min(maxRows, maxRowsPerTask)));
  const base = Math.floor(s.rows / count);
  const extra = s.rows % count;
  const out: Array<[number, number]> = [];
  let start = 0;
  for (let i = 0; i < count; i++) {
    const end = start + base + (i < extra ? 1 : 0);
    out.push([start, end]);
    start = end;
  }
  return out;
}

/** The most tasks a call's work is worth: each at least MIN_TASK_WORK, and at least the work of copying the replicated bytes it copies again. */
function tasksWorthIt(s: Pick<RowSplit, 'rows' | 'workPerRow' | 'fixedBytes'>): number {
  const minWork = Math.max(MIN_TASK_WORK, s.fixedBytes * COPY_WORK_PER_BYTE);
  return Math.max(1, Math.floor((s.rows * s.workPerRow) / minWork));
}

/**
 * Heads a task of a call split by heads takes at least: each task's heads start at a multiple of
 * it, and all but a row's last run are a multiple of it, so each takes the core's path (its blocks
 * of heads) that the whole row would and the results are one worker's bits.
 */
const MIN_GROUP_HEADS = 8;

/** An attention call to split: its rows and heads, a row's work, heap and blame (RowSplit). */
export interface AttentionSplit extends RowSplit {
  hQ: number;
}

/** One attention task: query rows [rowStart, rowEnd), of them heads [headStart, headEnd) (protocol.ts, HeadRange). */
export interface AttentionPart {
  rowStart: number;
  rowEnd: number;
  headStart: number;
  headEnd: number;
}

/**
 * An attention call's tasks. Splitting by rows as splitRows does, unless the call has fewer rows
 * than workers and its work is worth more tasks than rows (each task copies the replicated kv or
 * caches into its heap again: tasksWorthIt): then each row's heads are cut into the same number of
 * runs of whole blocks of MIN_GROUP_HEADS (balanced; the last run takes the heads left over), a
 * task a run, no more tasks than workers. (The cpu backend's threads take runs of such groups across
 * rows, native/addon/cpu_ops.cpp GroupHeads; a task here copies the kv per call, so a row's runs
 * are as many as the workers allow evenly.) A run's heap need is below its row's, which the
 * one-row check covers. Throws TOO_LARGE when a single row cannot fit.
 */
export function splitAttention(s: AttentionSplit, workers: number, heapBytes: number): AttentionPart[] {
  if (s.rows === 0) return [];
  checkTaskHeap(s, heapBytes, s.argument);
  const blocks = Math.floor(s.hQ / MIN_GROUP_HEADS);
  if (s.rows < workers && blocks >= 2) {
    const runsPerRow = Math.min(blocks, Math.floor(Math.min(workers, tasksWorthIt(s)) / s.rows));
    if (runsPerRow >= 2) return headRuns(s.rows, s.hQ, blocks, runsPerRow);
  }
  return rowRanges(s, workers, heapBytes, Infinity).map(([rowStart, rowEnd]) => ({ rowStart, rowEnd, headStart: 0, headEnd: s.hQ }));
}

/** Each of `rows` rows cut into `runs` runs of its `blocks` blocks of heads, row by row. */
function headRuns(rows: number, hQ: number, blocks: number, runs: number): AttentionPart[] {
  const base = Math.floor(blocks / runs);
  const extra = blocks % runs;
  const out: AttentionPart[] = [];
  for (let row = 0; row < rows; row++) {
    let block = 0;
    for (let i = 0; i < runs; i++) {
      const next = block + base + (i < extra ? 1 : 0);
      out.push({ rowStart: row, rowEnd: row + 1, headStart: block * MIN_GROUP_HEADS, headEnd: i === runs - 1 ? hQ : next * MIN_GROUP_HEADS });
      block = next;
    }
  }
  return out;
}

function compactTokenBytes(format: CacheFormat): number {
  return format === 'v32' ? V32_TOKEN_BYTES : V4_TOKEN_DATA_BYTES + V4_TOKEN_SCALE_BYTES;
}

/** Copies tokens ids[start..end) of `cache` into `into` as a compact cache (ids 0..m-1). */
export function gatherTokens(cache: CacheView, ids: Int32Array, start: number, end: number, into: Uint8Array): SharedCache {
  const m = end - start;
  const g = compactGeometry(cache.format, m);
  const data = into.subarray(0, g.bytes);
  const compact = { format: cache.format, pageSize: g.pageSize };
  for (let j = 0; j < m; j++) {
    const src = tokenByteRanges(cache, ids[start + j]!);
    const dst = tokenByteRanges(compact, j);
    if (cache.format === 'v32') {
      data.set(cache.data.subarray(src.data, src.data + V32_TOKEN_BYTES), dst.data);
    } else {
      data.set(cache.data.subarray(src.data, src.data + V4_TOKEN_DATA_BYTES), dst.data);
      data.set(cache.data.subarray(src.scales, src.scales + V4_TOKEN_SCALE_BYTES), dst.scales);
    }
  }
  return { format: cache.format, pageSize: g.pageSize, numPages: g.numPages, data };
}

/** Writes the tokens of a compact cache (ids 0..m-1) into `cache` at ids[start..start+m). */
function scatterTokens(compactData: Uint8Array, cache: CacheView, ids: Int32Array, start: number, m: number): void {
  const compact = { format: cache.format, pageSize: compactGeometry(cache.format, m).pageSize };
  for (let j = 0; j < m; j++) {
    const src = tokenByteRanges(compact, j);
    const dst = tokenByteRanges(cache, ids[start + j]!);
    if (cache.format === 'v32') {
      cache.data.set(compactData.subarray(src.data, src.data + V32_TOKEN_BYTES), dst.data);
    } else {
      cache.data.set(compactData.subarray(src.data, src.data + V4_TOKEN_DATA_BYTES), dst.data);
      cache.data.set(compactData.subarray(src.scales, src.scales + V4_TOKEN_SCALE_BYTES), dst.scales);
    }
  }
}

/** Rough scratch the core allocates per call (row lists, per-head accumulators), with slack. */
function scratchBytes(hQ: number, dQK: number, dV: number, entries: number): number {
  return entries * 16 + hQ * (dQK + dV) * 8 + 65536;
}

/** Where the rows and heads of one attention task go in the call's outputs. */
interface AttentionLayout {
  rows: number;
  /** heads per row (maxLogits / lse elements per row) */
  hQ: number;
  /** out elements per head */
  outPerHead: number;
}

export class WasmBackend implements Backend {
  readonly name = 'wasm' as const;
  readonly pool: WorkerPool;
  readonly heapBytes: number;
  /** host memory one call may use for staging and outputs (SPEC §9); also the staging's capacity */
  readonly memoryBudgetBytes: number;
  readonly staging: StagingArena;
  /** the sparsePrefill gather's plans, each used at its call (../prefill_gather.ts) */
  private readonly kvRows = new KvRowScratch();
  /** the paged op's plans of token ids, each out of the pool while its call may read it (../paged_gather.ts) */
  private readonly pagedScratches = new PagedScratchPool();
  /** the layer steps: the host planner and this backend's ops over a host workspace */
  readonly layer: LayerSteps = hostLayerSteps(this);
  /** what its ops count against the budget, from sizes (backend.ts, HostOpMemory): its ops' own checks and a layer's call these */
  readonly opMemory: HostOpMemory = {
    dequantizeKCache: (format, n, rowDim) => this.dequantizePlan(format, n, rowDim).parts,
    sparsePrefill: (inputs, sQ, hQ, dV) => sparsePrefillParts(inputs, sQ, hQ, dV),
    // the compact caches and ids are placed in the staging at aligned offsets
    pagedSparseAttention: (fixed, sets, n, hQ) => pagedSparseAttentionParts(fixed, sets, alignStaging, n, hQ),
    // every worker copies the cache it reads into its heap, after the staging's copy of one not shared
    pagedCopies: { whole: (cacheUnshared) => (cacheUnshared ? 1 : 0) + 1, compact: 2 },
    workerHeap: {
      dequantizeKCache: dequantTask,
      sparsePrefill: sparsePrefillTask,
      pagedSparseAttention: pagedTask,
      fits: (need) => taskFits(need, this.heapBytes),
      check: (need, argument, call) => checkTaskHeap(need, this.heapBytes, argument, call),
    },
  };

  private constructor(pool: WorkerPool, heapBytes: number, memoryBudgetBytes: number) {
    this.pool = pool;
    this.heapBytes = heapBytes;
    this.memoryBudgetBytes = memoryBudgetBytes;
    this.staging = new StagingArena(memoryBudgetBytes);
  }

  static async create(workers: number, compiled?: { module: WasmModule; maxMemoryBytes: number }, memoryBudgetBytes = defaultMemoryBudgetBytes()): Promise<WasmBackend> {
    const { module, maxMemoryBytes } = compiled ?? (await compileCoreModule());
    const pool = await WorkerPool.create(workers, { module, maxMemoryBytes });
    return new WasmBackend(pool, maxMemoryBytes, memoryBudgetBytes);
  }

  get workers(): number {
    return this.pool.size;
  }

  private alive(): void {
    if (this.pool.isDisposed) throw disposedError();
  }

  private stage<T extends readonly (StageableArray | null)[]>(inputs: T, names: readonly string[]) {
    return stageInputs(this.staging, inputs, names);
  }

  /**
   * Runs the tasks of one call, handing each value to place() as it arrives. Rejects with the
   * first failure (the call's tasks still queued are dropped); release() runs once every task has
   * settled, so staging is never reused while a worker may still read it.
   */
  private async runTasks<M extends TaskMethod>(
    method: M,
    tasks: readonly { arg: Parameters<WorkerPool['run']>[1] & object; label: string }[],
    place: (index: number, value: TaskValue<M>) => void,
    release: () => void,
  ): Promise<void> {
    const group: TaskGroup = { failed: false };
    const runs = tasks.map((t, i) =>
      this.pool.run(method, t.arg as never, t.label, group).then(
        (v) => place(i, v as TaskValue<M>),
        (e: unknown) => {
          group.failed = true;
          throw e;
        },
      ),
    );
    void Promise.allSettled(runs).then(release);
    await Promise.all(runs);
  }

  /** Runs attention tasks over rows (and heads) and assembles out / maxLogits / lse. */
  private async attention<M extends 'sparsePrefill' | 'pagedSparseAttention'>(
    method: M,
    parts: readonly AttentionPart[],
    arg: (part: AttentionPart) => Parameters<WorkerPool['run']>[1] & object,
    layout: AttentionLayout,
    release: () => void,
  ): Promise<SparsePrefillOutput> {
    const { rows, hQ, outPerHead } = layout;
    let result: SparsePrefillOutput | null = null;
    if (parts.length > 1) {
      try {
        result = {
          out: allocHostArray(Uint16Array, rows * hQ * outPerHead, 'out'),
          maxLogits: allocHostArray(Float32Array, rows * hQ, 'maxLogits'),
          lse: allocHostArray(Float32Array, rows * hQ, 'lse'),
        };
      } catch (e) {
        release();
        throw e;
      }
    }
    const label = (p: AttentionPart) =>
      p.headStart === 0 && p.headEnd === hQ ? `${method} rows ${p.rowStart}..${p.rowEnd - 1}` : `${method} row ${p.rowStart} heads ${p.headStart}..${p.headEnd - 1}`;
    const tasks = parts.map((p) => ({ arg: arg(p), label: label(p) }));
    await this.runTasks(method, tasks, (i, value) => {
      const v = value as AttentionOutput;
      if (!result) {
        result = v;
        return;
      }
      // Each part is copied into place as it arrives, so parts do not pile up until the end; a
      // part's rows and heads are contiguous in the outputs (whole rows, or heads of one row).
      const at = parts[i]!.rowStart * hQ + parts[i]!.headStart;
      result.out.set(v.out, at * outPerHead);
      result.maxLogits.set(v.maxLogits, at);
      result.lse.set(v.lse, at);
    }, release);
    return result!;
  }

  /**
   * Every task copies the kv it is handed into its worker's heap (after the staging's copy of an
   * unshared kv): when the rows the call's valid ids read cost less, they are gathered now (read at
   * the call) into a compact kv and the ids rewritten (prefill_gather.ts), and the tasks, and the
   * number of them the call's work is worth, get that one. Whether a call is refused (the heap, the
   * budget) is the whole kv's, never its ids': a layer's check from sizes (prefill_layer_checks.ts)
   * counts the same, and a compact kv is at most the whole one in a heap. The gather is taken only
   * where its own host bytes fit the budget too; else the call reads the whole kv, as counted.
   */
  async sparsePrefill(job: SparsePrefillJob): Promise<SparsePrefillOutput> {
    this.alive();
    const { sQ, hQ, dQK, dV, topk } = job;
    const split = (kvBytes: number) =>
      splitAttention(
        { rows: sQ, hQ, workPerRow: 2 * topk * hQ * (dQK + dV), ...sparsePrefillTask(kvBytes, hQ, dQK, dV, topk), argument: 'kv' },
        this.workers,
        this.heapBytes,
      );
    const parts = split(job.kv.byteLength);
    const inputs = [job.q, job.kv, job.indices, job.topkLength, job.attnSink] as const;
    const sizes = inputs.map(inputBytes);
    checkCallMemory('sparsePrefill', 'q', this.opMemory.sparsePrefill(sizes, sQ, hQ, dV, 'host'), this.memoryBudgetBytes);
    if (parts.length === 0) return { out: new Uint16Array(0), maxLogits: new Float32Array(0), lse: new Float32Array(0) };
    const gather = planPrefillGather(job, sizes, this.memoryBudgetBytes, wasmPrefillKvCopies(sizes, parts.length, this.workers), this.kvRows);
    if (gather) return this.sparsePrefillGathered(job, gather, sizes, split);
    const staged = await this.stage(inputs, ['q.data', 'kv.data', 'indices.data', 'topkLength.data', 'attnSink.data']);
    const [q, kv, indices, topkLength, attnSink] = staged.views;
    const shared: SparsePrefillJob = { ...job, q, kv, indices, topkLength, attnSink };
    return this.attention('sparsePrefill', parts, (part) => ({ job: shared, ...part }), { rows: sQ, hQ, outPerHead: dV }, staged.release);
  }

  /**
   * sparsePrefill over the compact kv of `plan`'s rows, placed now with the other inputs in one
   * slab (stageGathered: the staging's when one is free, else one it lends, which never waits), so
   * the gather always reads the kv at the call.
   */
  private sparsePrefillGathered(job: SparsePrefillJob, plan: KvRowPlan, sizes: readonly InputBytes[], split: (kvBytes: number) => AttentionPart[]): Promise<SparsePrefillOutput> {
    const gathered = stageGathered(this.staging, job, plan, sizes);
    const parts = split(gathered.job.kv.byteLength);
    return this.attention('sparsePrefill', parts, (part) => ({ job: gathered.job, ...part }), { rows: job.sQ, hQ: job.hQ, outPerHead: job.dV }, gathered.release);
  }

  async pagedSparseAttention(job: PagedSparseAttentionJob): Promise<PagedSparseAttentionOutput> {
    this.alive();
    const { n, hQ, main, extra } = job;
    // Every worker copies the caches it is handed into its heap (after the staging's copy of a
    // cache not in shared memory): when the tokens the call reads cost less, they are gathered
    // now (read at the call) into a compact cache, and the workers get that one.
    const reads = planPagedReads(job, this.opMemory.pagedCopies!, this.pagedScratches);
    const entries = main.topk + (extra?.topk ?? 0);
    const parts = splitAttention(
      {
        rows: n,
        hQ,
        workPerRow: 2 * entries * hQ * 1024 + entries * 1024,
        ...pagedTask(reads.mainCacheBytes + reads.extraCacheBytes, entries, hQ),
        argument: reads.extraCacheBytes > reads.mainCacheBytes ? 'extraKCache' : 'kCache',
      },
      this.workers,
      this.heapBytes,
    );
    const fixed = [job.q, main.topkLength, extra?.topkLength ?? null, job.attnSink].map(inputBytes);
    checkCallMemory('pagedSparseAttention', 'q', this.opMemory.pagedSparseAttention(fixed, reads.setBytes, n, hQ, 'host'), this.memoryBudgetBytes);
    if (parts.length === 0) return { out: new Uint16Array(0), maxLogits: new Float32Array(0), lse: new Float32Array(0) };
    const { main: mainRead, extra: extraRead } = reads.gather();
    const inputs = [job.q, mainRead.cache.data, mainRead.indices, main.topkLength, extraRead?.cache.data ?? null, extraRead?.indices ?? null, extra?.topkLength ?? null, job.attnSink] as const;
    const staged = await this.stage(inputs, [
      'q.data', 'kCache.data', 'indices.data', 'topkLength.data', 'extraKCache.data', 'extraIndices.data', 'extraTopkLength.data', 'attnSink.data',
    ]);
    const [q, mainCache, mainIndices, mainLength, extraCache, extraIndices, extraLength, attnSink] = staged.views;
    const set = (s: { cache: { format: CacheFormat; pageSize: number; numPages: number }; topk: number }, data: Uint8Array, indices: Int32Array, topkLength: Int32Array | null) => ({
      cache: { format: s.cache.format, pageSize: s.cache.pageSize, numPages: s.cache.numPages, data },
      indices,
      topk: s.topk,
      topkLength,
    });
    const shared = {
      q,
      n,
      hQ,
      main: set(mainRead, mainCache, mainIndices, mainLength),
      extra: extraRead ? set(extraRead, extraCache!, extraIndices!, extraLength) : null,
      attnSink,
      smScale: job.smScale,
    };
    return this.attention('pagedSparseAttention', parts, (part) => ({ job: shared, ...part }), { rows: n, hQ, outPerHead: 512 }, staged.release);
  }

  /**
   * Dequantizes in parts of bounded size: each part's tokens are gathered from the cache into a
   * staging region just before its task runs and its rows are copied into the output as soon as
   * they come back, so besides the output the call holds about one part per worker. The token ids
   * are copied at the call; the cache is read part by part while the call runs (a cache detached
   * meanwhile is an error; write to it only once the call has settled).
   */
  async dequantizeKCache(job: DequantizeKCacheJob): Promise<Uint16Array> {
    this.alive();
    const { cache, n, rowDim } = job;
    // the heap, then the budget (a layer checks its dequants' heap itself, then their budget by dequantizePlan)
    if (n > 0) checkTaskHeap(dequantTask(cache.format, rowDim), this.heapBytes, 'tokenIds');
    const { ranges, lanes, regionBytes, parts } = this.dequantizePlan(cache.format, n, rowDim);
    checkCallMemory('dequantizeKCachePaged', 'tokenIds', parts, this.memoryBudgetBytes);
    if (ranges.length === 0) return new Uint16Array(0);
    const out = allocHostArray(Uint16Array, n * rowDim, 'tokenIds');
    const ids = job.tokenIds.slice();
    const slabBytes = lanes * regionBytes;
    const slab = this.staging.tryAcquire(slabBytes) ?? (await this.staging.acquire(slabBytes));
    const group: TaskGroup = { failed: false };
    let next = 0;
    // One lane per worker, each with its own staging region: gather a part, run it, place its rows.
    const lane = async (k: number): Promise<void> => {
      const region = new Uint8Array(slab, k * regionBytes, regionBytes);
      try {
        while (next < ranges.length && !group.failed) {
          const [a, b] = ranges[next++]!;
          if (cache.data.byteLength !== cache.bytes) detached('cache.data', 'while the call ran');
          const compact = gatherTokens(cache, ids, a, b, region);
          const rowsOut = await this.pool.run('dequantizeKvCache', { cache: compact, numTokens: b - a, rowDim }, `dequantizeKCachePaged tokens ${a}..${b - 1}`, group);
          out.set(rowsOut, a * rowDim);
        }
      } catch (e) {
        group.failed = true;
        throw e;
      }
    };
    const settled = await Promise.allSettled(Array.from({ length: lanes }, (_, k) => lane(k)));
    this.staging.release(slab);
    const failure = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failure) throw failure.reason;
    return out;
  }

  /**
   * A dequant's parts (token ranges of bounded size, at most one in flight per worker, each lane a
   * staging region for its gathered tokens) and what it counts against the budget: its output, a
   * copy of the ids and the lanes' staging. Arithmetic only: its callers check the heap first.
   */
  private dequantizePlan(format: CacheFormat, n: number, rowDim: number) {
    const tokenBytes = compactTokenBytes(format);
    const partLimit = Math.max(1, Math.floor(DEQUANT_PART_BYTES / (tokenBytes + rowDim * 2)));
    const ranges = rowRanges({ rows: n, workPerRow: rowDim * 8, ...dequantTask(format, rowDim) }, this.workers, this.heapBytes, partLimit);
    const partTokens = ranges.reduce((m, [a, b]) => Math.max(m, b - a), 0);
    const lanes = Math.min(this.workers, ranges.length);
    const regionBytes = alignStaging(compactGeometry(format, partTokens).bytes);
    const parts = [
      { what: 'output', bytes: n * rowDim * 2 },
      { what: 'a copy of the token ids', bytes: n * 4 },
      { what: 'staging of the gathered tokens', bytes: lanes * regionBytes },
    ];
    return { ranges, lanes, regionBytes, parts };
  }

  async quantizeKCache(job: QuantizeKCacheJob): Promise<void> {
    this.alive();
    const { cache, tokenIds, n, rowDim, rows, rowsDtype } = job;
    const ranges = splitRows(
      { rows: n, workPerRow: rowDim * 32, fixedBytes: 0, bytesPerRow: rows.BYTES_PER_ELEMENT * rowDim + 8 + 2 * compactTokenBytes(cache.format), argument: 'rows' },
      this.workers,
      this.heapBytes,
    );
    const compactBytes = ranges.reduce((sum, [a, b]) => sum + compactGeometry(cache.format, b - a).bytes, 0);
    checkCallMemory(
      'quantizeKCache',
      'rows',
      [
        ...stagingParts([rows]),
        { what: 'a copy of the token ids', bytes: n * 4 },
        { what: 'the quantized tokens', bytes: compactBytes },
      ],
      this.memoryBudgetBytes,
    );
    if (ranges.length === 0) return;
    const ids = tokenIds.slice();
    const staged = await this.stage([rows], ['rows.data']);
    const [sharedRows] = staged.views;
    const parts: Uint8Array[] = [];
    const tasks = ranges.map(([rowStart, rowEnd]) => {
      const g = compactGeometry(cache.format, rowEnd - rowStart);
      return {
        arg: { format: cache.format, pageSize: g.pageSize, numPages: g.numPages, cacheBytes: g.bytes, rows: sharedRows, rowsDtype, rowDim, rowStart, rowEnd },
        label: `quantizeKCache rows ${rowStart}..${rowEnd - 1}`,
      };
    });
    await this.runTasks('quantizeKvCache', tasks, (i, v) => (parts[i] = v), staged.release);
    // Written only once every task succeeded, in row order: the cache is never left half-written
    // and the last of duplicate ids wins, as in a sequential loop.
    if (cache.data.byteLength !== cache.bytes) detached('cache.data', 'while the call ran; nothing was written');
    ranges.forEach(([a, b], i) => scatterTokens(parts[i]!, cache, ids, a, b - a));
  }

  async dispose(): Promise<void> {
    this.staging.close(disposedError());
    await this.pool.dispose();
  }
}

/** Default pool size: the machine's cores. */
export function defaultWorkerCount(): number {
  return typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
}

let compiledModule: Promise<{ module: WasmModule; bytes: number; maxMemoryBytes: number }> | null = null;
/** Compiles the module once per process; a failure is not cached so a fixed install can retry. */
function compiledOnce(): Promise<{ module: WasmModule; bytes: number; maxMemoryBytes: number }> {
  compiledModule ??= compileCoreModule().catch((e: unknown) => {
    compiledModule = null;
    throw e;
  });
  return compiledModule;
}

export const wasmBackendEntry: BackendEntry = {
  name: 'wasm',
  priority: 30,
  async probe(): Promise<BackendProbe> {
    try {
      const m = await compiledOnce();
      return {
        available: true,
        details: { module: WASM_PATH, moduleBytes: m.bytes, maxHeapMiB: m.maxMemoryBytes / 2 ** 20, defaultWorkers: defaultWorkerCount(), simd: 'SIMD128' },
      };
    } catch (e) {
      return { available: false, reason: (e as Error).message, details: { module: WASM_PATH } };
    }
  },
  async create(options) {
    return WasmBackend.create(options.workers ?? defaultWorkerCount(), await compiledOnce(), options.memoryBudgetBytes ?? defaultMemoryBudgetBytes());
  },
};
