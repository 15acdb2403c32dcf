/**
 * The WASM backend: runs validated jobs on the worker pool. It splits a call into row ranges
 * (query rows for attention, token rows for the cache ops), checks that each task fits a worker's
 * heap before any work, shares the inputs (see pool.ts) and stitches the outputs. The main thread
 * only copies bytes; all math runs in the workers.
 */
import os from 'node:os';
import { SparseMlaError, fail } from '../../errors.js';
import type { CacheFormat } from '../../types.js';
import type {
  Backend,
  BackendEntry,
  BackendProbe,
  CacheView,
  DequantizeKCacheJob,
  PagedSparseAttentionJob,
  PagedSparseAttentionOutput,
  QuantizeKCacheJob,
  SparsePrefillJob,
  SparsePrefillOutput,
} from '../backend.js';
import { V32_TOKEN_BYTES, V4_TOKEN_DATA_BYTES, V4_TOKEN_SCALE_BYTES, tokenByteRanges, v4PageBytes } from '../../ops/kv_cache.js';
import { WASM_URL, compileCoreModule, type WasmModule } from './binding.js';
import { WorkerPool } from './pool.js';
import type { AttentionOutput, SharedCache } from './protocol.js';

/** Heap kept free for the stack, static data, allocator overhead and the core's scratch. */
const HEAP_RESERVE_BYTES = 64 * 2 ** 20;
/**
 * Smallest amount of work (in flop-equivalents) worth a task of its own: below it the dispatch
 * and copies cost more than another worker saves, so tiny calls stay on one worker.
 */
const MIN_TASK_WORK = 2e7;
/** Work-equivalent of copying one replicated byte (kv, caches) into another worker's heap. */
const COPY_WORK_PER_BYTE = 2;
/** v4 page size of the compact caches the cache ops use: 72 · 584 = 73 · 576, no padding. */
const COMPACT_V4_PAGE_SIZE = 72;

type Typed = Uint8Array | Uint16Array | Int32Array | Float32Array;

/** The same array backed by a SharedArrayBuffer (itself when it already is). */
function toShared<T extends Typed>(a: T): T {
  if (a.buffer instanceof SharedArrayBuffer) return a;
  const ctor = a.constructor as new (buffer: SharedArrayBuffer) => T;
  const out = new ctor(new SharedArrayBuffer(a.byteLength));
  (out as Uint8Array).set(a as Uint8Array);
  return out;
}

function sharedOrNull<T extends Typed>(a: T | null): T | null {
  return a ? toShared(a) : null;
}

export interface RowSplit {
  rows: number;
  /** work of one row, flop-equivalents */
  workPerRow: number;
  /** heap bytes every task needs whatever its rows (replicated inputs + scratch) */
  fixedBytes: number;
  /** heap bytes per row (inputs + outputs) */
  bytesPerRow: number;
  /** the argument to blame when even one row does not fit */
  argument: string;
}

/**
 * Balanced [start, end) row ranges: as many as the workers, no more than the work justifies
 * (replicated bytes count as work, since each extra task copies them again), and enough that every
 * range fits a worker heap. Throws TOO_LARGE when a single row cannot fit.
 */
export function splitRows(s: RowSplit, workers: number, heapBytes: number): Array<[number, number]> {
  if (s.rows === 0) return [];
  const usable = heapBytes - HEAP_RESERVE_BYTES - s.fixedBytes;
  if (usable < s.bytesPerRow) {
    fail(
      'TOO_LARGE',
      s.argument,
      `a call whose per-worker heap share fits the ${heapBytes / 2 ** 20} MiB WASM heap (wasm32, no MEMORY64)`,
      `${s.fixedBytes + s.bytesPerRow} bytes for the shared inputs and one row (${s.fixedBytes} shared + ${s.bytesPerRow} per row)`,
    );
  }
  const maxRows = Math.max(1, Math.floor(usable / s.bytesPerRow));
  const minWork = Math.max(MIN_TASK_WORK, s.fixedBytes * COPY_WORK_PER_BYTE);
  let count = Math.min(workers, s.rows, Math.max(1, Math.floor((s.rows * s.workPerRow) / minWork)));
  count = Math.max(count, Math.ceil(s.rows / maxRows));
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

function compactGeometry(format: CacheFormat, numTokens: number): { pageSize: number; numPages: number; bytes: number } {
  if (format === 'v32') return { pageSize: 1, numPages: numTokens, bytes: numTokens * V32_TOKEN_BYTES };
  const numPages = Math.ceil(numTokens / COMPACT_V4_PAGE_SIZE);
  return { pageSize: COMPACT_V4_PAGE_SIZE, numPages, bytes: numPages * v4PageBytes(COMPACT_V4_PAGE_SIZE) };
}

function compactTokenBytes(format: CacheFormat): number {
  return format === 'v32' ? V32_TOKEN_BYTES : V4_TOKEN_DATA_BYTES + V4_TOKEN_SCALE_BYTES;
}

/** Copies tokens ids[start..end) of `cache` into a compact shared cache (ids 0..m-1). */
function gatherTokens(cache: CacheView, ids: Int32Array, start: number, end: number): SharedCache {
  const m = end - start;
  const g = compactGeometry(cache.format, m);
  const data = new Uint8Array(new SharedArrayBuffer(g.bytes));
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

/** Concatenates per-task outputs (rows in order); a single task's arrays are used as they are. */
function concatAttention(parts: AttentionOutput[], outLen: number, statLen: number): SparsePrefillOutput {
  if (parts.length === 1) return parts[0]!;
  const out = new Uint16Array(outLen);
  const maxLogits = new Float32Array(statLen);
  const lse = new Float32Array(statLen);
  let o = 0;
  let s = 0;
  for (const p of parts) {
    out.set(p.out, o);
    maxLogits.set(p.maxLogits, s);
    lse.set(p.lse, s);
    o += p.out.length;
    s += p.lse.length;
  }
  return { out, maxLogits, lse };
}

/** Rough scratch the core allocates per call (row lists, per-head accumulators), with slack. */
function scratchBytes(hQ: number, dQK: number, dV: number, entries: number): number {
  return entries * 16 + hQ * (dQK + dV) * 8 + 65536;
}

export class WasmBackend implements Backend {
  readonly name = 'wasm' as const;
  readonly pool: WorkerPool;
  readonly heapBytes: number;

  private constructor(pool: WorkerPool, heapBytes: number) {
    this.pool = pool;
    this.heapBytes = heapBytes;
  }

  static async create(workers: number, compiled?: { module: WasmModule; maxMemoryBytes: number }): Promise<WasmBackend> {
    const { module, maxMemoryBytes } = compiled ?? (await compileCoreModule());
    const pool = await WorkerPool.create(workers, { module, maxMemoryBytes });
    return new WasmBackend(pool, maxMemoryBytes);
  }

  get workers(): number {
    return this.pool.size;
  }

  private alive(): void {
    if (this.pool.isDisposed) throw new SparseMlaError('DISPOSED', 'the engine was disposed; create a new one with createEngine()', 'engine');
  }

  async sparsePrefill(job: SparsePrefillJob): Promise<SparsePrefillOutput> {
    this.alive();
    const { sQ, hQ, dQK, dV, topk } = job;
    const ranges = splitRows(
      {
        rows: sQ,
        workPerRow: 2 * topk * hQ * (dQK + dV),
        fixedBytes: job.kv.byteLength + hQ * 4 + scratchBytes(hQ, dQK, dV, topk),
        bytesPerRow: hQ * dQK * 2 + topk * 4 + 4 + hQ * dV * 2 + hQ * 8,
        argument: 'kv',
      },
      this.workers,
      this.heapBytes,
    );
    if (ranges.length === 0) return { out: new Uint16Array(0), maxLogits: new Float32Array(0), lse: new Float32Array(0) };
    const shared: SparsePrefillJob = {
      ...job,
      q: toShared(job.q),
      kv: toShared(job.kv),
      indices: toShared(job.indices),
      topkLength: sharedOrNull(job.topkLength),
      attnSink: sharedOrNull(job.attnSink),
    };
    const parts = await this.pool.runAll(
      'sparsePrefill',
      ranges.map(([rowStart, rowEnd]) => ({ arg: { job: shared, rowStart, rowEnd }, label: `sparsePrefill rows ${rowStart}..${rowEnd - 1}` })),
    );
    return concatAttention(parts, sQ * hQ * dV, sQ * hQ);
  }

  async pagedSparseAttention(job: PagedSparseAttentionJob): Promise<PagedSparseAttentionOutput> {
    this.alive();
    const { n, hQ, main, extra } = job;
    const entries = main.topk + (extra?.topk ?? 0);
    const ranges = splitRows(
      {
        rows: n,
        workPerRow: 2 * entries * hQ * 1024 + entries * 1024,
        fixedBytes: main.cache.bytes + (extra?.cache.bytes ?? 0) + hQ * 4 + scratchBytes(hQ, 512, 512, entries),
        bytesPerRow: hQ * 512 * 2 + entries * 4 + 8 + hQ * 512 * 2 + hQ * 8,
        argument: extra && extra.cache.bytes > main.cache.bytes ? 'extraKCache' : 'kCache',
      },
      this.workers,
      this.heapBytes,
    );
    if (ranges.length === 0) return { out: new Uint16Array(0), maxLogits: new Float32Array(0), lse: new Float32Array(0) };
    const shareSet = (s: NonNullable<PagedSparseAttentionJob['extra']>) => ({
      cache: { format: s.cache.format, pageSize: s.cache.pageSize, numPages: s.cache.numPages, data: toShared(s.cache.data) },
      indices: toShared(s.indices),
      topk: s.topk,
      topkLength: sharedOrNull(s.topkLength),
    });
    const shared = { q: toShared(job.q), n, hQ, main: shareSet(main), extra: extra ? shareSet(extra) : null, attnSink: sharedOrNull(job.attnSink), smScale: job.smScale };
    const parts = await this.pool.runAll(
      'pagedSparseAttention',
      ranges.map(([rowStart, rowEnd]) => ({ arg: { job: shared, rowStart, rowEnd }, label: `pagedSparseAttention rows ${rowStart}..${rowEnd - 1}` })),
    );
    return concatAttention(parts, n * hQ * 512, n * hQ);
  }

  async dequantizeKCache(job: DequantizeKCacheJob): Promise<Uint16Array> {
    this.alive();
    const { cache, tokenIds, n, rowDim } = job;
    const ranges = splitRows(
      { rows: n, workPerRow: rowDim * 8, fixedBytes: 0, bytesPerRow: 2 * compactTokenBytes(cache.format) + 8 + rowDim * 2, argument: 'tokenIds' },
      this.workers,
      this.heapBytes,
    );
    if (ranges.length === 0) return new Uint16Array(0);
    const parts = await this.pool.runAll(
      'dequantizeKvCache',
      ranges.map(([a, b]) => ({ arg: { cache: gatherTokens(cache, tokenIds, a, b), numTokens: b - a, rowDim }, label: `dequantizeKCachePaged tokens ${a}..${b - 1}` })),
    );
    if (parts.length === 1) return parts[0]!;
    const out = new Uint16Array(n * rowDim);
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }

  async quantizeKCache(job: QuantizeKCacheJob): Promise<void> {
    this.alive();
    const { cache, tokenIds, n, rowDim, rows, rowsDtype } = job;
    const ranges = splitRows(
      { rows: n, workPerRow: rowDim * 32, fixedBytes: 0, bytesPerRow: rows.BYTES_PER_ELEMENT * rowDim + 8 + 2 * compactTokenBytes(cache.format), argument: 'rows' },
      this.workers,
      this.heapBytes,
    );
    if (ranges.length === 0) return;
    const sharedRows = toShared(rows);
    const parts = await this.pool.runAll(
      'quantizeKvCache',
      ranges.map(([rowStart, rowEnd]) => {
        const g = compactGeometry(cache.format, rowEnd - rowStart);
        return {
          arg: { format: cache.format, pageSize: g.pageSize, numPages: g.numPages, cacheBytes: g.bytes, rows: sharedRows, rowsDtype, rowDim, rowStart, rowEnd },
          label: `quantizeKCache rows ${rowStart}..${rowEnd - 1}`,
        };
      }),
    );
    // Written only once every task succeeded, in row order: the cache is never left half-written
    // and the last of duplicate ids wins, as in a sequential loop.
    ranges.forEach(([a, b], i) => scatterTokens(parts[i]!, cache, tokenIds, a, b - a));
  }

  async dispose(): Promise<void> {
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
        details: { module: WASM_URL.pathname, moduleBytes: m.bytes, maxHeapMiB: m.maxMemoryBytes / 2 ** 20, defaultWorkers: defaultWorkerCount(), simd: 'SIMD128' },
      };
    } catch (e) {
      return { available: false, reason: (e as Error).message, details: { module: WASM_URL.pathname } };
    }
  },
  async create(options) {
    return WasmBackend.create(options.workers ?? defaultWorkerCount(), await compiledOnce());
  },
};
