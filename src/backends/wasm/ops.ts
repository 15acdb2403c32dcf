/**
 * The ops of wasm/sparse_mla.wasm — the only file that knows the module's export names and
 * signatures (cpp/include/sparse_mla/sparse_mla.h). WasmCore wraps one instance: allocate, copy
 * inputs into the heap, call, check the status, copy outputs out, free. Loading is loader.ts's.
 *
 * Memory growth: any smla_malloc or core call may grow the memory, which detaches every
 * typed-array view of the old buffer, so views are re-created from `memory.buffer` after each such
 * call and never kept across one.
 */
import { SparseMlaError } from '../../errors.js';
import type { CacheFormat } from '../../types.js';
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
export const ABI_VERSION = 1;

const REQUIRED_EXPORTS = [
  'memory',
  'smla_abi_version',
  'smla_malloc',
  'smla_free',
  'smla_quantize_kv_cache',
  'smla_dequantize_kv_cache',
  'smla_sparse_prefill',
  'smla_paged_sparse_attention',
  'smla_plan_layout',
  'smla_plan_compressed_token_ids',
  'smla_plan_dense_rows',
  'smla_plan_combine_topk',
  'smla_plan_paged_form',
] as const;

type Ptr = number;
interface CoreExports {
  memory: WasmMemory;
  smla_abi_version(): number;
  smla_malloc(bytes: number): Ptr;
  smla_free(ptr: Ptr): void;
  smla_quantize_kv_cache(format: number, cache: Ptr, pageSize: number, numPages: number, tokenIds: Ptr, numTokens: number, rows: Ptr, rowsDtype: number): number;
  smla_dequantize_kv_cache(format: number, cache: Ptr, pageSize: number, numPages: number, tokenIds: Ptr, numTokens: number, out: Ptr): number;
  smla_sparse_prefill(
    q: Ptr, kv: Ptr, indices: Ptr, topkLength: Ptr, attnSink: Ptr,
    sQ: number, hQ: number, dQK: number, dV: number, sKV: number, topk: number, smScale: number,
    out: Ptr, maxLogits: Ptr, lse: Ptr,
  ): number;
  smla_paged_sparse_attention(
    q: Ptr, n: number, hQ: number, kCache: Ptr, pageSize: number, numPages: number,
    indices: Ptr, topk: number, topkLength: Ptr,
    extraKCache: Ptr, extraPageSize: number, extraNumPages: number,
    extraIndices: Ptr, extraTopk: number, extraTopkLength: Ptr,
    attnSink: Ptr, smScale: number, out: Ptr, lse: Ptr, maxLogits: Ptr,
  ): number;
  smla_plan_layout(n: number, seqLens: Ptr, extendLens: Ptr, window: number, ratio: number, queryOffsets: Ptr, swaOffsets: Ptr, compOffsets: Ptr, totals: Ptr): number;
  smla_plan_compressed_token_ids(n: number, seqLens: Ptr, extendLens: Ptr, ratio: number, pageTables: Ptr, pageTableOffsets: Ptr, pageSize: number, tokenIds: Ptr): number;
  smla_plan_dense_rows(n: number, seqLens: Ptr, extendLens: Ptr, window: number, ratio: number, width: number, rows: Ptr, lens: Ptr): number;
  smla_plan_combine_topk(
    n: number, seqLens: Ptr, extendLens: Ptr, window: number, ratio: number, topkIndices: Ptr, topk: number, width: number,
    rows: Ptr, lens: Ptr, dropped: Ptr, droppedTotal: Ptr,
  ): number;
  smla_plan_paged_form(
    nq: number, rows: Ptr, lens: Ptr, width: number, compRows: number, swaRows: number, compTokenIds: Ptr, swaTokenIds: Ptr,
    mainRows: Ptr, mainWidth: number, mainLens: Ptr, extraRows: Ptr, extraWidth: number, extraLens: Ptr,
  ): number;
}

const STATUS_NAMES: Record<number, string> = {
  1: 'SMLA_ERR_INVALID_ARGUMENT',
  2: 'SMLA_ERR_OUT_OF_RANGE',
  3: 'SMLA_ERR_OUT_OF_MEMORY',
  4: 'SMLA_ERR_UNSUPPORTED',
};
const CACHE_FORMAT: Record<CacheFormat, number> = { v4: 0, v32: 1 };
const ROWS_DTYPE = { float32: 0, bf16: 1 } as const;

/** Compiles the module and checks it has every export WasmCore calls (the worker pool's way). */
export const compileCoreModule = (): Promise<CompiledCore> => compileModule(REQUIRED_EXPORTS);

/** compileCoreModule, synchronously (the planner's way). */
export const compileCoreModuleSync = (): CompiledCore => compileModuleSync(REQUIRED_EXPORTS);

export type { CompiledCore, WasmModule };

type Typed = Uint8Array | Uint16Array | Int32Array | Float32Array | BigInt64Array;

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

  private u8(): Uint8Array {
    return new Uint8Array(this.x.memory.buffer);
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

  private put(ptr: Ptr, src: Typed | null): void {
    if (src && src.byteLength > 0) this.u8().set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength), ptr);
  }

  /** Writes int32 ids as the int64 array the ABI takes. */
  private putIdsAsInt64(ptr: Ptr, ids: Int32Array): void {
    const h = new Int32Array(this.x.memory.buffer, ptr, ids.length * 2);
    for (let i = 0; i < ids.length; i++) {
      const v = ids[i]!;
      h[2 * i] = v;
      h[2 * i + 1] = v >> 31;
    }
  }

  private take(ptr: Ptr, bytes: number): ArrayBuffer {
    return this.u8().slice(ptr, ptr + bytes).buffer;
  }

  private check(status: number, op: string): void {
    if (status === 0) return;
    const name = STATUS_NAMES[status] ?? `status ${status}`;
    if (status === 3) throw new SparseMlaError('TOO_LARGE', `wasm ${op}: the core ran out of heap (${name}; heap ${this.heapBytes} bytes)`, 'heap');
    throw new SparseMlaError('BACKEND_FAILURE', `wasm ${op}: the core returned ${name} for arguments the facade had validated (a bug: please report it)`, 'backend');
  }

  /** Quantizes rows into `cache` (a copy of it; null = zero-filled) and returns the cache bytes. */
  quantizeKvCache(a: {
    format: CacheFormat; pageSize: number; numPages: number; cacheBytes: number; cache: Uint8Array | null;
    tokenIds: Int32Array; rows: Uint16Array | Float32Array; rowsDtype: 'bf16' | 'float32';
  }): Uint8Array {
    const n = a.tokenIds.length;
    return this.withHeap([a.cacheBytes, n * 8, a.rows.byteLength], ([cache, ids, rows]) => {
      if (a.cache) this.put(cache!, a.cache);
      else this.u8().fill(0, cache!, cache! + a.cacheBytes);
      this.putIdsAsInt64(ids!, a.tokenIds);
      this.put(rows!, a.rows);
      this.check(this.x.smla_quantize_kv_cache(CACHE_FORMAT[a.format], cache!, a.pageSize, a.numPages, ids!, n, rows!, ROWS_DTYPE[a.rowsDtype]), 'quantizeKCache');
      return new Uint8Array(this.take(cache!, a.cacheBytes));
    });
  }

  /** bf16 [n, rowDim] rows of the given token ids. */
  dequantizeKvCache(a: { format: CacheFormat; pageSize: number; numPages: number; cache: Uint8Array; tokenIds: Int32Array; rowDim: number }): Uint16Array {
    const n = a.tokenIds.length;
    const outBytes = n * a.rowDim * 2;
    return this.withHeap([a.cache.byteLength, n * 8, outBytes], ([cache, ids, out]) => {
      this.put(cache!, a.cache);
      this.putIdsAsInt64(ids!, a.tokenIds);
      this.check(this.x.smla_dequantize_kv_cache(CACHE_FORMAT[a.format], cache!, a.pageSize, a.numPages, ids!, n, out!), 'dequantizeKCachePaged');
      return new Uint16Array(this.take(out!, outBytes));
    });
  }

  sparsePrefill(a: {
    q: Uint16Array; kv: Uint16Array; indices: Int32Array; topkLength: Int32Array | null; attnSink: Float32Array | null;
    sQ: number; hQ: number; dQK: number; dV: number; sKV: number; topk: number; smScale: number;
  }): { out: Uint16Array; maxLogits: Float32Array; lse: Float32Array } {
    const outBytes = a.sQ * a.hQ * a.dV * 2;
    const statBytes = a.sQ * a.hQ * 4;
    const sizes = [a.q.byteLength, a.kv.byteLength, a.indices.byteLength, a.topkLength?.byteLength ?? 0, a.attnSink?.byteLength ?? 0, outBytes, statBytes, statBytes];
    return this.withHeap(sizes, ([q, kv, idx, tl, sink, out, ml, lse]) => {
      this.put(q!, a.q);
      this.put(kv!, a.kv);
      this.put(idx!, a.indices);
      this.put(tl!, a.topkLength);
      this.put(sink!, a.attnSink);
      this.check(
        this.x.smla_sparse_prefill(q!, kv!, idx!, a.topkLength ? tl! : 0, a.attnSink ? sink! : 0, a.sQ, a.hQ, a.dQK, a.dV, a.sKV, a.topk, a.smScale, out!, ml!, lse!),
        'sparsePrefill',
      );
      return { out: new Uint16Array(this.take(out!, outBytes)), maxLogits: new Float32Array(this.take(ml!, statBytes)), lse: new Float32Array(this.take(lse!, statBytes)) };
    });
  }

  pagedSparseAttention(a: {
    q: Uint16Array; n: number; hQ: number;
    main: { cache: Uint8Array; pageSize: number; numPages: number; indices: Int32Array; topk: number; topkLength: Int32Array | null };
    extra: { cache: Uint8Array; pageSize: number; numPages: number; indices: Int32Array; topk: number; topkLength: Int32Array | null } | null;
    attnSink: Float32Array | null; smScale: number;
  }): { out: Uint16Array; maxLogits: Float32Array; lse: Float32Array } {
    const D = 512;
    const outBytes = a.n * a.hQ * D * 2;
    const statBytes = a.n * a.hQ * 4;
    const e = a.extra;
    const sizes = [
      a.q.byteLength, a.main.cache.byteLength, a.main.indices.byteLength, a.main.topkLength?.byteLength ?? 0,
      e?.cache.byteLength ?? 0, e?.indices.byteLength ?? 0, e?.topkLength?.byteLength ?? 0,
      a.attnSink?.byteLength ?? 0, outBytes, statBytes, statBytes,
    ];
    return this.withHeap(sizes, ([q, kc, idx, tl, ekc, eidx, etl, sink, out, lse, ml]) => {
      this.put(q!, a.q);
      this.put(kc!, a.main.cache);
      this.put(idx!, a.main.indices);
      this.put(tl!, a.main.topkLength);
      if (e) {
        this.put(ekc!, e.cache);
        this.put(eidx!, e.indices);
        this.put(etl!, e.topkLength);
      }
      this.put(sink!, a.attnSink);
      this.check(
        this.x.smla_paged_sparse_attention(
          q!, a.n, a.hQ, kc!, a.main.pageSize, a.main.numPages, idx!, a.main.topk, a.main.topkLength ? tl! : 0,
          e ? ekc! : 0, e?.pageSize ?? 0, e?.numPages ?? 0, e ? eidx! : 0, e?.topk ?? 0, e?.topkLength ? etl! : 0,
          a.attnSink ? sink! : 0, a.smScale, out!, lse!, ml!,
        ),
        'pagedSparseAttention',
      );
      return { out: new Uint16Array(this.take(out!, outBytes)), maxLogits: new Float32Array(this.take(ml!, statBytes)), lse: new Float32Array(this.take(lse!, statBytes)) };
    });
  }

  // ---- planner (SPEC §6): small integer work; sizes come from the caller, which validated them ----

  /** Prefix sums (int64 [n + 1] each) and totals [queries, SWA rows, compressed rows, max visible] of one ratio. */
  planLayout(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number): {
    queryOffsets: BigInt64Array; swaOffsets: BigInt64Array; compOffsets: BigInt64Array; totals: BigInt64Array;
  } {
    const n = seqLens.length;
    const offBytes = (n + 1) * 8;
    return this.withHeap([seqLens.byteLength, extendLens.byteLength, offBytes, offBytes, offBytes, 4 * 8], ([seq, ext, qo, so, co, tot]) => {
      this.put(seq!, seqLens);
      this.put(ext!, extendLens);
      this.check(this.x.smla_plan_layout(n, seq!, ext!, window, ratio, qo!, so!, co!, tot!), 'planLayout');
      return {
        queryOffsets: new BigInt64Array(this.take(qo!, offBytes)),
        swaOffsets: new BigInt64Array(this.take(so!, offBytes)),
        compOffsets: new BigInt64Array(this.take(co!, offBytes)),
        totals: new BigInt64Array(this.take(tot!, 4 * 8)),
      };
    });
  }

  /** int64 [compRows] compressed gather ids through the page tables (request r's: pageTables[offsets[r] .. offsets[r + 1])). */
  planCompressedTokenIds(a: {
    seqLens: Int32Array; extendLens: Int32Array; ratio: number; pageTables: Int32Array; pageTableOffsets: BigInt64Array; pageSize: number; compRows: number;
  }): BigInt64Array {
    const outBytes = a.compRows * 8;
    const sizes = [a.seqLens.byteLength, a.extendLens.byteLength, a.pageTables.byteLength, a.pageTableOffsets.byteLength, outBytes];
    return this.withHeap(sizes, ([seq, ext, tab, off, out]) => {
      this.put(seq!, a.seqLens);
      this.put(ext!, a.extendLens);
      this.put(tab!, a.pageTables);
      this.put(off!, a.pageTableOffsets);
      this.check(this.x.smla_plan_compressed_token_ids(a.seqLens.length, seq!, ext!, a.ratio, tab!, off!, a.pageSize, out!), 'planCompressedTokenIds');
      return new BigInt64Array(this.take(out!, outBytes));
    });
  }

  /** Combined rows of ratio 0 or 128: int32 [numQueries, width] (−1 padded) and their lengths. */
  planDenseRows(a: { seqLens: Int32Array; extendLens: Int32Array; window: number; ratio: number; width: number; numQueries: number }): PlanRows {
    const rowBytes = a.numQueries * a.width * 4;
    const lenBytes = a.numQueries * 4;
    return this.withHeap([a.seqLens.byteLength, a.extendLens.byteLength, rowBytes, lenBytes], ([seq, ext, rows, lens]) => {
      this.put(seq!, a.seqLens);
      this.put(ext!, a.extendLens);
      this.check(this.x.smla_plan_dense_rows(a.seqLens.length, seq!, ext!, a.window, a.ratio, a.width, rows!, lens!), 'planDenseRows');
      return { rows: new Int32Array(this.take(rows!, rowBytes)), lens: new Int32Array(this.take(lens!, lenBytes)) };
    });
  }

  /** Combined rows of a top-k layer, with the not-yet-visible entries dropped and counted. */
  planCombineTopk(a: {
    seqLens: Int32Array; extendLens: Int32Array; window: number; ratio: number; topkIndices: Int32Array; topk: number; width: number; numQueries: number;
  }): PlanRows & { dropped: Int32Array; droppedTotal: number } {
    const rowBytes = a.numQueries * a.width * 4;
    const lenBytes = a.numQueries * 4;
    const sizes = [a.seqLens.byteLength, a.extendLens.byteLength, a.topkIndices.byteLength, rowBytes, lenBytes, lenBytes, 8];
    return this.withHeap(sizes, ([seq, ext, k, rows, lens, dropped, total]) => {
      this.put(seq!, a.seqLens);
      this.put(ext!, a.extendLens);
      this.put(k!, a.topkIndices);
      this.check(
        this.x.smla_plan_combine_topk(a.seqLens.length, seq!, ext!, a.window, a.ratio, k!, a.topk, a.width, rows!, lens!, dropped!, total!),
        'planCombineTopk',
      );
      return {
        rows: new Int32Array(this.take(rows!, rowBytes)),
        lens: new Int32Array(this.take(lens!, lenBytes)),
        dropped: new Int32Array(this.take(dropped!, lenBytes)),
        droppedTotal: Number(new BigInt64Array(this.take(total!, 8))[0]),
      };
    });
  }

  /** The paged form of combined rows: the main (SWA) and extra (compressed) token-id sets; a width of 0 leaves that set out. */
  planPagedForm(a: {
    rows: Int32Array; lens: Int32Array; width: number; compRows: number; swaRows: number;
    compTokenIds: BigInt64Array; swaTokenIds: BigInt64Array; mainWidth: number; extraWidth: number;
  }): { main?: PlanRows; extra?: PlanRows } {
    const nq = a.lens.length;
    const mainBytes = a.mainWidth > 0 ? nq * a.mainWidth * 4 : 0, mainLenBytes = a.mainWidth > 0 ? nq * 4 : 0;
    const extraBytes = a.extraWidth > 0 ? nq * a.extraWidth * 4 : 0, extraLenBytes = a.extraWidth > 0 ? nq * 4 : 0;
    const sizes = [a.rows.byteLength, a.lens.byteLength, a.compTokenIds.byteLength, a.swaTokenIds.byteLength, mainBytes, mainLenBytes, extraBytes, extraLenBytes];
    return this.withHeap(sizes, ([rows, lens, comp, swa, main, mainLens, extra, extraLens]) => {
      this.put(rows!, a.rows);
      this.put(lens!, a.lens);
      this.put(comp!, a.compTokenIds);
      this.put(swa!, a.swaTokenIds);
      const withMain = a.mainWidth > 0, withExtra = a.extraWidth > 0;
      this.check(
        this.x.smla_plan_paged_form(
          nq, rows!, lens!, a.width, a.compRows, a.swaRows, comp!, swa!,
          withMain ? main! : 0, a.mainWidth, withMain ? mainLens! : 0, withExtra ? extra! : 0, a.extraWidth, withExtra ? extraLens! : 0,
        ),
        'planPagedForm',
      );
      return {
        main: withMain ? { rows: new Int32Array(this.take(main!, mainBytes)), lens: new Int32Array(this.take(mainLens!, mainLenBytes)) } : undefined,
        extra: withExtra ? { rows: new Int32Array(this.take(extra!, extraBytes)), lens: new Int32Array(this.take(extraLens!, extraLenBytes)) } : undefined,
      };
    });
  }
}
