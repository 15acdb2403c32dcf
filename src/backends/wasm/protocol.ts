/**
 * What the pool sends its workers and what comes back. Input arrays are views of
 * SharedArrayBuffers (see pool.ts for why); a task names the row range a worker computes, and an
 * attention task the heads of those rows too.
 */
import type { ErrorCode } from '../../errors.js';
import type { CacheFormat } from '../../types.js';
import type { WasmModule } from './loader.js';
import type { PagedSparseAttentionJob, SparsePrefillJob } from '../backend.js';

export interface RowRange {
  rowStart: number;
  rowEnd: number;
}

/** A cache the worker receives whole (shared), with its geometry. */
export interface SharedCache {
  format: CacheFormat;
  pageSize: number;
  numPages: number;
  data: Uint8Array;
}

/**
 * The heads [headStart, headEnd) of an attention task's rows: all of them when absent, or, for a
 * call split by heads, a run of them in a task of one row (so its q, sink and outputs are contiguous).
 */
export interface HeadRange {
  headStart?: number;
  headEnd?: number;
}

export interface SparsePrefillTask extends RowRange, HeadRange {
  job: SparsePrefillJob;
}

export interface PagedSparseAttentionTask extends RowRange, HeadRange {
  job: Omit<PagedSparseAttentionJob, 'main' | 'extra'> & {
    main: { cache: SharedCache; indices: Int32Array; topk: number; topkLength: Int32Array | null };
    extra: { cache: SharedCache; indices: Int32Array; topk: number; topkLength: Int32Array | null } | null;
  };
}

/** Dequantize every token of a compact cache (ids 0..numTokens-1). */
export interface DequantizeTask {
  cache: SharedCache;
  numTokens: number;
  rowDim: number;
}

/** Quantize rows [rowStart, rowEnd) into a fresh compact cache (ids 0..m-1) and return its bytes. */
export interface QuantizeTask extends RowRange {
  format: CacheFormat;
  pageSize: number;
  numPages: number;
  cacheBytes: number;
  rows: Uint16Array | Float32Array;
  rowsDtype: 'bf16' | 'float32';
  rowDim: number;
}

export interface AttentionOutput {
  out: Uint16Array;
  maxLogits: Float32Array;
  lse: Float32Array;
}

export interface TaskError {
  code: ErrorCode;
  message: string;
  argument?: string;
  /** true when the error came from the instance itself (a trap), so the worker should be replaced */
  fatal: boolean;
}

/** Workers answer with a value or a typed error (comlink would drop an Error's `code`). */
export type TaskResult<T> = { ok: true; value: T; heapBytes: number } | { ok: false; error: TaskError };

/**
 * What a worker holds, for diagnostics (the pool's testing hooks): its instance's linear memory
 * and the bytes its allocator holds in use there, its own V8 heap, the ArrayBuffers its isolate tracks and its port's listeners. `collected`: a
 * full collection ran in the worker first (only where the process runs with --expose-gc).
 */
export interface WorkerMemory {
  heapBytes: number;
  /** bytes in use in the linear memory's allocator (WasmCore.allocatedBytes): 0 between tasks */
  allocatedBytes: number;
  v8UsedBytes: number;
  v8TotalBytes: number;
  arrayBuffers: number;
  external: number;
  /** 'message' listeners on the worker's port (comlink's one) */
  portListeners: number;
  collected: boolean;
}

export interface WorkerApi {
  ready(): { abiVersion: number; heapBytes: number };
  /** Diagnostics only, never a task: see WorkerMemory. */
  memory(collect: boolean): WorkerMemory;
  sparsePrefill(task: SparsePrefillTask): TaskResult<AttentionOutput>;
  pagedSparseAttention(task: PagedSparseAttentionTask): TaskResult<AttentionOutput>;
  dequantizeKvCache(task: DequantizeTask): TaskResult<Uint16Array>;
  quantizeKvCache(task: QuantizeTask): TaskResult<Uint8Array>;
}

export interface WorkerInit {
  module: WasmModule;
  maxMemoryBytes: number;
}
