/**
 * The ops of wasm/sparse_mla.wasm. Every op of the C ABI takes one params struct, described field
 * by field in ../abi.ts; call() writes that struct and the arrays it points to into the module's
 * heap, calls the op, checks its status and copies the outputs out. WasmCore wraps one instance
 * and gives each op the shape its callers (the worker, the planner) use. Loading is loader.ts's.
 *
 * Memory growth: any smla_malloc or core call may grow the memory, which detaches every
 * typed-array view of the old buffer, so views are re-created from `memory.buffer` after each such
 * call and never kept across one.
 */
import { SparseMlaError } from '../../errors.js';
import type { CacheFormat } from '../../types.js';
import { OP_PARAMS, cFunctionName, fieldsOf, type FieldKind, type OpName, type OpParams } from '../abi.js';
import { pagedSparseAttentionFields } from '../backend.js';
import {
  WASM32_MAX_BYTES,
  compileModule,
  compileModuleSync,
  instantiateModule,
  instantiateModuleSync,
  type CompiledCore,
  type WasmMemory,
  type WasmModule,
} from './loader.js';

/** The ABI version this binding is written against (SMLA_ABI_VERSION). */
export const ABI_VERSION = 2;

const REQUIRED_EXPORTS = ['memory', 'smla_abi_version', 'smla_malloc', 'smla_free', 'smla_heap_bytes_in_use', ...(Object.keys(OP_PARAMS) as OpName[]).map(cFunctionName)];

/** Compiles the module and checks it has every export WasmCore calls (the worker pool's way). */
export const compileCoreModule = (): Promise<CompiledCore> => compileModule(REQUIRED_EXPORTS);

/** compileCoreModule, synchronously (the planner's way). */
export const compileCoreModuleSync = (): CompiledCore => compileModuleSync(REQUIRED_EXPORTS);

export type { CompiledCore, WasmModule };

type Ptr = number;

/** One index set of a paged attention call, in this instance's heap's terms (host arrays). */
interface PagedHostSet {
  cache: { data: Uint8Array; pageSize: number; numPages: number };
  indices: Int32Array;
  topk: number;
  topkLength: Int32Array | null;
}
interface CoreExports {
  memory: WasmMemory;
  smla_abi_version(): number;
  smla_malloc(bytes: number): Ptr;
  smla_free(ptr: Ptr): void;
  smla_heap_bytes_in_use(): number;
  [op: string]: unknown;
}

const STATUS_NAMES: Record<number, string> = {
  1: 'SMLA_ERR_INVALID_ARGUMENT',
  2: 'SMLA_ERR_OUT_OF_RANGE',
  3: 'SMLA_ERR_OUT_OF_MEMORY',
  4: 'SMLA_ERR_UNSUPPORTED',
};
const CACHE_FORMAT: Record<CacheFormat, number> = { v4: 0, v32: 1 };
const ROWS_DTYPE = { float32: 0, bf16: 1 } as const;

/** In wasm32 every field of a params struct (a pointer, an int32 or a float) takes 4 bytes. */
const FIELD_BYTES = 4;

type HeapArray = Uint8Array | Uint16Array | Int32Array | Float32Array | BigInt64Array;
const isScalar = (kind: FieldKind): boolean => kind === 'i32' || kind === 'f32';
/** Fields whose contents go into the heap before the call, and those copied out after it. */
const copiedIn = (kind: FieldKind): boolean => kind === 'ids' || kind === 'rows' || kind.startsWith('in');
const copiedOut = (kind: FieldKind): boolean => kind.startsWith('out') || kind.startsWith('inout');

/** Index rows and their lengths, as the smla_plan_* calls write them. */
export interface PlanRows {
  rows: Int32Array;
  lens: Int32Array;
}

/** One instance of the core. Not thread-safe (one per worker; the planner keeps its own). */
export class WasmCore {
  private readonly x: CoreExports;
  readonly maxMemoryBytes: number;

  private constructor(exports: Record<string, unknown>, maxMemoryBytes: number) {
    this.x = exports as unknown as CoreExports;
    this.maxMemoryBytes = maxMemoryBytes;
    const v = this.x.smla_abi_version();
    if (v !== ABI_VERSION) throw new SparseMlaError('BACKEND_FAILURE', `wasm: module ABI version ${v}, this facade expects ${ABI_VERSION}; rebuild with \`npm run build:wasm\``, 'backend');
  }

  /** An instance for a worker of the pool. */
  static async instantiate(module: WasmModule, maxMemoryBytes = WASM32_MAX_BYTES): Promise<WasmCore> {
    return new WasmCore(await instantiateModule(module), maxMemoryBytes);
  }

  /** An instance on the calling thread, synchronously (the planner's). */
  static instantiateSync(module: WasmModule, maxMemoryBytes = WASM32_MAX_BYTES): WasmCore {
    return new WasmCore(instantiateModuleSync(module), maxMemoryBytes);
  }

  get abiVersion(): number {
    return this.x.smla_abi_version();
  }

  /** Current size of the instance's linear memory. */
  get heapBytes(): number {
    return this.x.memory.buffer.byteLength;
  }

  /**
   * Bytes the module's allocator holds in use (every live block, the core's scratch included):
   * 0 between calls, since each call frees what it allocated. Walks the heap: diagnostics only.
   */
  get allocatedBytes(): number {
    return this.x.smla_heap_bytes_in_use() >>> 0;
  }

  /** Allocates every size (≥ 1 byte each) or none; frees them after fn, whatever happens. */
  private withHeap<T>(sizes: readonly number[], fn: (ptrs: Ptr[]) => T): T {
    const ptrs: Ptr[] = [];
    try {
      for (const size of sizes) {
        const p = size > 0xffffffff ? 0 : this.x.smla_malloc(Math.max(size, 1)) >>> 0;
        if (p === 0) {
          const total = sizes.reduce((a, b) => a + b, 0);
          throw new SparseMlaError('TOO_LARGE', `wasm heap: could not allocate ${size} bytes (this call needs ${total} bytes; the heap is ${this.heapBytes} bytes of at most ${this.maxMemoryBytes})`, 'heap');
        }
        ptrs.push(p);
      }
      return fn(ptrs);
    } finally {
      for (const p of ptrs) this.x.smla_free(p);
    }
  }

  private check(status: number, op: string): void {
    if (status === 0) return;
    const name = STATUS_NAMES[status] ?? `status ${status}`;
    if (status === 3) throw new SparseMlaError('TOO_LARGE', `wasm ${op}: the core ran out of heap (${name}; heap ${this.heapBytes} bytes)`, 'heap');
    throw new SparseMlaError('BACKEND_FAILURE', `wasm ${op}: the core returned ${name} for arguments the facade had validated (a bug: please report it)`, 'backend');
  }

  /**
   * Runs one op of the C ABI: its params struct and every array it points to in the heap (token
   * ids widened to int64), the call, the status, the outputs copied into the arrays given.
   * `label` names the op in errors.
   */
  private call<Op extends OpName>(op: Op, params: OpParams<Op>, label: string): void {
    const fields = fieldsOf(op);
    const values = params as unknown as Record<string, number | HeapArray | null>;
    const arrays = fields.map(([name, kind]) => (isScalar(kind) ? null : (values[name] as HeapArray | null)));
    const bytes = arrays.map((a, i) => (a === null ? 0 : fields[i]![1] === 'ids' ? a.length * 8 : a.byteLength));
    this.withHeap([fields.length * FIELD_BYTES, ...bytes], ([struct, ...ptrs]) => {
      arrays.forEach((a, i) => {
        if (a === null || !copiedIn(fields[i]![1])) return;
        if (fields[i]![1] === 'ids') {
          const halves = new Int32Array(this.x.memory.buffer, ptrs[i]!, a.length * 2); // little-endian int64
          for (let k = 0; k < a.length; k++) {
            const v = a[k] as number;
            halves[2 * k] = v;
            halves[2 * k + 1] = v >> 31;
          }
        } else {
          new Uint8Array(this.x.memory.buffer).set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength), ptrs[i]!);
        }
      });
      const view = new DataView(this.x.memory.buffer);
      fields.forEach(([name, kind], i) => {
        const at = struct! + i * FIELD_BYTES;
        if (kind === 'i32') view.setInt32(at, values[name] as number, true);
        else if (kind === 'f32') view.setFloat32(at, values[name] as number, true);
        else view.setUint32(at, arrays[i] === null ? 0 : ptrs[i]!, true);
      });
      this.check((this.x[cFunctionName(op)] as (p: Ptr) => number)(struct!), label);
      const heap = new Uint8Array(this.x.memory.buffer);
      arrays.forEach((a, i) => {
        if (a !== null && copiedOut(fields[i]![1])) new Uint8Array(a.buffer, a.byteOffset, a.byteLength).set(heap.subarray(ptrs[i]!, ptrs[i]! + a.byteLength));
      });
    });
  }

  /** Quantizes rows into `cache` (a copy of it; null = zero-filled) and returns the cache bytes. */
  quantizeKvCache(a: {
    format: CacheFormat; pageSize: number; numPages: number; cacheBytes: number; cache: Uint8Array | null;
    tokenIds: Int32Array; rows: Uint16Array | Float32Array; rowsDtype: 'bf16' | 'float32';
  }): Uint8Array {
    const cache = a.cache ? a.cache.slice() : new Uint8Array(a.cacheBytes);
    const { format, pageSize, numPages, tokenIds, rows, rowsDtype } = a;
    this.call('quantizeKvCache', { format: CACHE_FORMAT[format], cache, pageSize, numPages, tokenIds, numTokens: tokenIds.length, rows, rowsDtype: ROWS_DTYPE[rowsDtype] }, 'quantizeKCache');
    return cache;
  }

  /** bf16 [n, rowDim] rows of the given token ids. */
  dequantizeKvCache(a: { format: CacheFormat; pageSize: number; numPages: number; cache: Uint8Array; tokenIds: Int32Array; rowDim: number }): Uint16Array {
    const out = new Uint16Array(a.tokenIds.length * a.rowDim);
    const { pageSize, numPages, cache, tokenIds } = a;
    this.call('dequantizeKvCache', { format: CACHE_FORMAT[a.format], cache, pageSize, numPages, tokenIds, numTokens: tokenIds.length, out }, 'dequantizeKCachePaged');
    return out;
  }

  sparsePrefill(a: {
    q: Uint16Array; kv: Uint16Array; indices: Int32Array; topkLength: Int32Array | null; attnSink: Float32Array | null;
    sQ: number; hQ: number; dQK: number; dV: number; sKV: number; topk: number; smScale: number;
  }): { out: Uint16Array; maxLogits: Float32Array; lse: Float32Array } {
    const r = { out: new Uint16Array(a.sQ * a.hQ * a.dV), maxLogits: new Float32Array(a.sQ * a.hQ), lse: new Float32Array(a.sQ * a.hQ) };
    const { q, kv, indices, topkLength, attnSink, sQ, hQ, dQK, dV, sKV, topk, smScale } = a;
    this.call('sparsePrefill', { q, kv, indices, topkLength, attnSink, sQ, hQ, dQK, dV, sKV, topk, smScale, ...r }, 'sparsePrefill');
    return r;
  }

  pagedSparseAttention(a: {
    q: Uint16Array; n: number; hQ: number;
    main: PagedHostSet;
    extra: PagedHostSet | null;
    attnSink: Float32Array | null; smScale: number;
  }): { out: Uint16Array; maxLogits: Float32Array; lse: Float32Array } {
    const D = 512;
    const r = { out: new Uint16Array(a.n * a.hQ * D), maxLogits: new Float32Array(a.n * a.hQ), lse: new Float32Array(a.n * a.hQ) };
    this.call('pagedSparseAttention', { ...pagedSparseAttentionFields(a), ...r }, 'pagedSparseAttention');
    return r;
  }

  // ---- planner (SPEC §6): small integer work; sizes come from the caller, which validated them ----

  /** Prefix sums (int64 [n + 1] each) and totals [queries, SWA rows, compressed rows, max visible] of one ratio. */
  planLayout(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number): {
    queryOffsets: BigInt64Array; swaOffsets: BigInt64Array; compOffsets: BigInt64Array; totals: BigInt64Array;
  } {
    const n = seqLens.length;
    const r = { queryOffsets: new BigInt64Array(n + 1), swaOffsets: new BigInt64Array(n + 1), compOffsets: new BigInt64Array(n + 1), totals: new BigInt64Array(4) };
    this.call('planLayout', { numRequests: n, seqLens, extendLens, window, ratio, ...r }, 'planLayout');
    return r;
  }

  /** int64 [compRows] compressed gather ids through the page tables (request r's: pageTables[offsets[r] .. offsets[r + 1])). */
  planCompressedTokenIds(a: {
    seqLens: Int32Array; extendLens: Int32Array; ratio: number; pageTables: Int32Array; pageTableOffsets: BigInt64Array; pageSize: number; compRows: number;
  }): BigInt64Array {
    const tokenIds = new BigInt64Array(a.compRows);
    const { seqLens, extendLens, ratio, pageTables, pageTableOffsets, pageSize } = a;
    this.call('planCompressedTokenIds', { numRequests: seqLens.length, seqLens, extendLens, ratio, pageTables, pageTableOffsets, pageSize, tokenIds }, 'planCompressedTokenIds');
    return tokenIds;
  }

  /** Combined rows of ratio 0 or 128: int32 [numQueries, width] (−1 padded) and their lengths. */
  planDenseRows(a: { seqLens: Int32Array; extendLens: Int32Array; window: number; ratio: number; width: number; numQueries: number }): PlanRows {
    const r = { rows: new Int32Array(a.numQueries * a.width), lens: new Int32Array(a.numQueries) };
    const { seqLens, extendLens, window, ratio, width } = a;
    this.call('planDenseRows', { numRequests: seqLens.length, seqLens, extendLens, window, ratio, width, ...r }, 'planDenseRows');
    return r;
  }

  /** Combined rows of a top-k layer, with the not-yet-visible entries dropped and counted. */
  planCombineTopk(a: {
    seqLens: Int32Array; extendLens: Int32Array; window: number; ratio: number; topkIndices: Int32Array; topk: number; width: number; numQueries: number;
  }): PlanRows & { dropped: Int32Array; droppedTotal: number } {
    const r = { rows: new Int32Array(a.numQueries * a.width), lens: new Int32Array(a.numQueries), dropped: new Int32Array(a.numQueries) };
    const droppedTotal = new BigInt64Array(1);
    const { seqLens, extendLens, window, ratio, topkIndices, topk, width } = a;
    this.call('planCombineTopk', { numRequests: seqLens.length, seqLens, extendLens, window, ratio, topkIndices, topk, width, ...r, droppedTotal }, 'planCombineTopk');
    return { ...r, droppedTotal: Number(droppedTotal[0]) };
  }

  /** The paged form of combined rows: the main (SWA) and extra (compressed) token-id sets; a width of 0 leaves that set out. */
  planPagedForm(a: {
    rows: Int32Array; lens: Int32Array; width: number; compRows: number; swaRows: number;
    compTokenIds: BigInt64Array; swaTokenIds: BigInt64Array; mainWidth: number; extraWidth: number;
  }): { main?: PlanRows; extra?: PlanRows } {
    const nq = a.lens.length;
    const set = (width: number): PlanRows | undefined => (width > 0 ? { rows: new Int32Array(nq * width), lens: new Int32Array(nq) } : undefined);
    const main = set(a.mainWidth), extra = set(a.extraWidth);
    const { rows, lens, width, compRows, swaRows, compTokenIds, swaTokenIds, mainWidth, extraWidth } = a;
    this.call(
      'planPagedForm',
      {
        numQueries: nq, rows, lens, width, compRows, swaRows, compTokenIds, swaTokenIds,
        mainRows: main?.rows ?? null, mainWidth, mainLens: main?.lens ?? null, extraRows: extra?.rows ?? null, extraWidth, extraLens: extra?.lens ?? null,
      },
      'planPagedForm',
    );
    return { main, extra };
  }
}
