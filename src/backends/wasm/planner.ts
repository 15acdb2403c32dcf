/**
 * The planner's index math (SPEC §6) on the host: the C++ core (cpp/src/planner.cpp, the per-row
 * functions of planner.h that the CUDA planner kernels call too) through the smla_plan_* calls of
 * ops.ts. It lays out a plan, builds its paged form for every backend, and builds the rows and ids
 * of the host backends' layer steps (hostLayerSteps, below: the cpu and wasm backends'). The work
 * is small integer work done once per chunk (plus one top-k combine per c4 layer), so it runs
 * synchronously on the calling thread in a private instance of the module rather than through the
 * worker pool: a round trip to a worker would cost more than the work. Inputs are a plan's,
 * already validated and sized.
 */
import { SparseMlaError } from '../../errors.js';
import { V4_ROW_DIMS, rowDimOf } from '../../kv_cache_layout.js';
import type { Backend, LayerSteps } from '../backend.js';
import { compileCoreModuleSync, WasmCore, type CompiledCore } from './ops.js';

/** Totals of a chunk's layout for one compress ratio. */
export interface PlanLayoutTotals {
  /** prefix sums, numRequests + 1 entries each */
  queryOffsets: Float64Array;
  swaOffsets: Float64Array;
  compOffsets: Float64Array;
  numQueries: number;
  swaRows: number;
  compRows: number;
  /** largest floor(seqLen / ratio) of any request with queries */
  maxVisible: number;
}

export interface HostRows {
  rows: Int32Array;
  lens: Int32Array;
}

export interface HostTopkRows extends HostRows {
  dropped: Int32Array;
  droppedTotal: number;
}

/** Heap size above which the private instance is dropped after a call. */
const KEEP_HEAP_BYTES = 256 * 2 ** 20;

let compiled: CompiledCore | undefined;
let instance: WasmCore | undefined;

/**
 * Runs f on the private instance. A one-off huge plan must not pin its heap for the life of the
 * process: after a call that grew it past KEEP_HEAP_BYTES the instance is dropped (the compiled
 * module stays) and the next call starts a fresh one. Calls are synchronous, never nested.
 */
function withCore<T>(f: (core: WasmCore) => T): T {
  const core = (instance ??= WasmCore.instantiateSync(compiled!.module, compiled!.maxMemoryBytes));
  try {
    return f(core);
  } finally {
    if (core.heapBytes > KEEP_HEAP_BYTES) instance = undefined;
  }
}

/** @internal Tests only: the bytes the private instance's allocator holds in use (0 between calls), null before its first call. */
export const hostPlannerForTests = { allocatedBytes: (): number | null => instance?.allocatedBytes ?? null };

const numQueries = (extendLens: Int32Array): number => extendLens.reduce((a, b) => a + b, 0);

export const hostPlanner = {
  layout(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number): PlanLayoutTotals {
    const r = withCore((c) => c.planLayout(seqLens, extendLens, window, ratio));
    const f64 = (a: BigInt64Array): Float64Array => Float64Array.from(a, Number);
    return {
      queryOffsets: f64(r.queryOffsets),
      swaOffsets: f64(r.swaOffsets),
      compOffsets: f64(r.compOffsets),
      numQueries: Number(r.totals[0]),
      swaRows: Number(r.totals[1]),
      compRows: Number(r.totals[2]),
      maxVisible: Number(r.totals[3]),
    };
  },
  /** compRows: the ratio's layout total, the length of the result */
  compressedTokenIds(seqLens: Int32Array, extendLens: Int32Array, ratio: number, pageTables: Int32Array, pageTableOffsets: Float64Array, pageSize: number, compRows: number): BigInt64Array {
    const offsets = BigInt64Array.from(pageTableOffsets, (x) => BigInt(x));
    return withCore((c) => c.planCompressedTokenIds({ seqLens, extendLens, ratio, pageTables, pageTableOffsets: offsets, pageSize, compRows }));
  },
  denseRows(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number, width: number): HostRows {
    return withCore((c) => c.planDenseRows({ seqLens, extendLens, window, ratio, width, numQueries: numQueries(extendLens) }));
  },
  combineTopk(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number, topkIndices: Int32Array, topk: number, width: number): HostTopkRows {
    return withCore((c) => c.planCombineTopk({ seqLens, extendLens, window, ratio, topkIndices, topk, width, numQueries: numQueries(extendLens) }));
  },
  /** mainWidth / extraWidth 0 leaves that set out. */
  pagedForm(
    rows: Int32Array,
    lens: Int32Array,
    width: number,
    compRows: number,
    swaRows: number,
    compTokenIds: BigInt64Array,
    swaTokenIds: BigInt64Array,
    mainWidth: number,
    extraWidth: number,
  ): { main?: HostRows; extra?: HostRows } {
    return withCore((c) => c.planPagedForm({ rows, lens, width, compRows, swaRows, compTokenIds, swaTokenIds, mainWidth, extraWidth }));
  },
};

export type HostPlanner = typeof hostPlanner;

/**
 * The host planner. Compiles the module on first use; throws BACKEND_UNAVAILABLE when it is
 * missing or unusable, and BACKEND_FAILURE (naming `op`) where its memory cannot be reserved (an
 * address-space limit such as `ulimit -v`), as a wasm engine that cannot start its workers rejects,
 * not the engine's RangeError. Neither is cached, so a fixed install or a later call can retry.
 */
export function loadHostPlanner(op = 'the host planner'): HostPlanner {
  compiled ??= compileCoreModuleSync();
  try {
    instance ??= WasmCore.instantiateSync(compiled.module, compiled.maxMemoryBytes); // surfaces an ABI mismatch here
  } catch (e) {
    if (e instanceof SparseMlaError) throw e;
    throw new SparseMlaError('BACKEND_FAILURE', `${op}: the host planner (the package's WebAssembly core) could not be instantiated: ${e instanceof Error ? e.message : String(e)}`);
  }
  return hostPlanner;
}

/** Most bytes of free host workspaces kept for later plans; a larger workspace is never kept. */
const KEEP_FREE_WORKSPACE_BYTES = 256 * 2 ** 20;

/** Workspace buffers are rounded up to 1/8 of the next power of two (at least 64 KiB), so nearby sizes share one. */
function workspaceBufferBytes(bytes: number): number {
  const step = 2 ** Math.max(16, Math.ceil(Math.log2(Math.max(bytes, 1))) - 3);
  return Math.ceil(bytes / step) * step;
}

/**
 * @internal The host workspaces (the cpu and wasm engines' layer steps), reused from plan to plan.
 *
 * Why: a plan keeps its workspace, a SharedArrayBuffer that the wasm workers read in place, for as
 * long as the plan lives, and a server makes one plan per chunk and drops it. A SharedArrayBuffer
 * posted to a worker stays alive until that worker's garbage collector runs, which an idle worker
 * hardly does (see staging.ts): one fresh buffer per plan kept every dropped plan's workspace alive,
 * so the process grew by a workspace per chunk that the main thread's collector could not free.
 * Here the buffer of a workspace goes back to a free list once the array handed out is collected
 * (its plan was dropped) and serves a later plan whose workspace fits (at most twice its size), so
 * what the workers still reference is memory in use, not piled up. Free buffers are kept up to
 * KEEP_FREE_WORKSPACE_BYTES, the smallest dropped first. Reused buffers are not cleared: a layer
 * writes every workspace row it reads.
 */
export const hostWorkspaces = {
  /** buffers allocated so far (a steady workload stops adding to it) */
  allocations: 0,
  /** workspaces served from a free buffer */
  reuses: 0,
  free: [] as SharedArrayBuffer[],
  get freeBytes(): number {
    return this.free.reduce((a, b) => a + b.byteLength, 0);
  },
  /** A bf16 workspace of `bytes` bytes in shared memory, its buffer given back when it is collected. */
  take(bytes: number): Uint16Array {
    const size = workspaceBufferBytes(bytes);
    let best = -1;
    this.free.forEach((b, i) => {
      if (b.byteLength >= size && b.byteLength <= 2 * size && (best < 0 || b.byteLength < this.free[best]!.byteLength)) best = i;
    });
    let buffer: SharedArrayBuffer;
    if (best >= 0) {
      buffer = this.free.splice(best, 1)[0]!;
      this.reuses++;
    } else {
      buffer = new SharedArrayBuffer(size);
      this.allocations++;
    }
    const workspace = new Uint16Array(buffer, 0, bytes / 2);
    workspaceReturns.register(workspace, buffer);
    return workspace;
  },
  giveBack(buffer: SharedArrayBuffer): void {
    if (buffer.byteLength > KEEP_FREE_WORKSPACE_BYTES) return;
    this.free.push(buffer);
    this.free.sort((a, b) => b.byteLength - a.byteLength);
    let bytes = this.freeBytes;
    while (bytes > KEEP_FREE_WORKSPACE_BYTES) bytes -= this.free.pop()!.byteLength;
  },
};
const workspaceReturns = new FinalizationRegistry<SharedArrayBuffer>((buffer) => hostWorkspaces.giveBack(buffer));

/** The token ids the host ops take (int32): a plan's ids lie inside its caches, so each fits. */
function int32Ids(ids: BigInt64Array): Int32Array {
  const halves = new Int32Array(ids.buffer, ids.byteOffset, ids.length * 2);
  const out = new Int32Array(ids.length);
  for (let i = 0; i < out.length; i++) out[i] = halves[2 * i]!;
  return out;
}

/**
 * The layer steps of a host backend (cpu, wasm): rows and ids from the host planner, the workspace
 * a shared-memory array (workers read it in place), and `backend`'s own dequantize and
 * sparsePrefill over it (its methods looked up at each call). Everything stays in host memory, so
 * placing and reading are no-ops; the workspace comes from hostWorkspaces.
 */
export function hostLayerSteps(backend: Pick<Backend, 'dequantizeKCache' | 'sparsePrefill'>): LayerSteps {
  return {
    memory: 'host',
    async planRows(job) {
      const planner = loadHostPlanner();
      const { seqLens, extendLens, window, ratio, topkIndices, topk, width } = job;
      if (topkIndices !== null) {
        const r = planner.combineTopk(seqLens, extendLens, window, ratio, topkIndices, topk, width);
        return { rows: r.rows, lens: r.lens, droppedTotal: r.droppedTotal };
      }
      return { ...planner.denseRows(seqLens, extendLens, window, ratio, width), droppedTotal: null };
    },
    async planCompressedTokenIds(job) {
      return loadHostPlanner().compressedTokenIds(job.seqLens, job.extendLens, job.ratio, job.pageTables, job.pageTableOffsets, job.pageSize, job.total);
    },
    async placeIds(ids) {
      return ids;
    },
    async placeRows(rows) {
      return rows;
    },
    allocWorkspace(bytes) {
      return hostWorkspaces.take(bytes);
    },
    async dequantizeKCacheInto({ cache, tokenIds, n, workspace, rowOffset }) {
      const rowDim = rowDimOf(cache.format);
      const rows = await backend.dequantizeKCache({ cache, tokenIds: int32Ids(tokenIds), n, rowDim });
      workspace.set(rows, rowOffset * rowDim);
    },
    async prefill(job) {
      const { q, workspace, rows, indices, lengths, attnSink, numQueries, hQ, width, smScale } = job;
      const kv = workspace.subarray(0, rows * V4_ROW_DIMS);
      return backend.sparsePrefill({ q, kv, indices, topkLength: lengths, attnSink, sQ: numQueries, hQ, dQK: V4_ROW_DIMS, dV: V4_ROW_DIMS, sKV: rows, topk: width, smScale });
    },
    async readDroppedTotal(total) {
      return total;
    },
  };
}
