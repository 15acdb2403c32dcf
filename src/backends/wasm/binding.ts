/**
 * The typed binding of wasm/sparse_mla.wasm — the only file that knows the module's export names
 * and signatures (cpp/include/sparse_mla/sparse_mla.h). It compiles the module, asynchronously for
 * the worker pool (main thread) or synchronously for the planner, and wraps one instance: allocate,
 * copy inputs into the heap, call, check the status, copy outputs out, free. Both paths share the
 * export check, the import stubs and the ABI version check.
 *
 * Memory growth: any smla_malloc or core call may grow the memory, which detaches every
 * typed-array view of the old buffer, so views are re-created from `memory.buffer` after each such
 * call and never kept across one.
 */
import { readFileSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { readFile } from 'node:fs/promises';
import { SparseMlaError } from '../../errors.js';
import type { CacheFormat } from '../../types.js';

/**
 * The slice of the WebAssembly JS API used here. TypeScript declares WebAssembly only in its DOM
 * lib, which this Node package does not load, so the binding types what it touches itself.
 */
export interface WasmModule {
  readonly [Symbol.toStringTag]: string;
}
interface WasmMemory {
  readonly buffer: ArrayBuffer;
}
interface WasmDescriptor {
  module: string;
  name: string;
  kind: string;
}
type WasmImports = Record<string, Record<string, unknown>>;
interface WasmInstance {
  exports: Record<string, unknown>;
}
interface WasmApi {
  compile(bytes: Uint8Array): Promise<WasmModule>;
  instantiate(module: WasmModule, imports: WasmImports): Promise<WasmInstance>;
  Module: {
    new (bytes: Uint8Array): WasmModule;
    exports(m: WasmModule): Omit<WasmDescriptor, 'module'>[];
    imports(m: WasmModule): WasmDescriptor[];
  };
  Instance: new (module: WasmModule, imports: WasmImports) => WasmInstance;
}
const WA = (globalThis as unknown as { WebAssembly: WasmApi }).WebAssembly;

/** wasm/sparse_mla.wasm at the package root: ../../../ from dist/backends/wasm/ (and src/…). */
export const WASM_URL = new URL('../../../wasm/sparse_mla.wasm', import.meta.url);

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

/** Largest linear memory a wasm32 module can have. */
const WASM32_MAX_BYTES = 2 ** 32;

/** A compiled module, with its size and the most memory an instance of it can grow to. */
export interface CompiledCore {
  module: WasmModule;
  bytes: number;
  maxMemoryBytes: number;
}

const unavailable = (message: string): SparseMlaError => new SparseMlaError('BACKEND_UNAVAILABLE', `wasm: ${message}`, 'backend');
const unreadable = (e: unknown): SparseMlaError =>
  unavailable(`cannot read ${WASM_URL.pathname} (${(e as Error).message}); reinstall the package or rebuild it with \`npm run build:wasm\``);
const uncompilable = (e: unknown): SparseMlaError =>
  unavailable(`${WASM_URL.pathname} does not compile on this Node (${(e as Error).message}); it needs WebAssembly SIMD128 (Node ≥ 16.4)`);

/** The export check shared by both ways of compiling. */
function compiled(module: WasmModule, bytes: Uint8Array): CompiledCore {
  const names = new Set(WA.Module.exports(module).map((e) => e.name));
  const missing = REQUIRED_EXPORTS.filter((n) => !names.has(n));
  if (missing.length > 0) throw unavailable(`${WASM_URL.pathname} lacks exports ${missing.join(', ')}; rebuild it with \`npm run build:wasm\``);
  return { module, bytes: bytes.length, maxMemoryBytes: declaredMaxMemory(bytes) };
}

/** Reads and compiles the module (the worker pool's way); throws BACKEND_UNAVAILABLE when it is missing or unusable. */
/**
 * V8 compiles WebAssembly lazily in its baseline tier and moves a function to the optimizing tier
 * only on a later call, so one long core call on a fresh worker ran entirely in baseline code
 * (measured ~3.5x slower: 334 ms vs 88 ms for a 32-query prefill). The core is small (~55 KB), so
 * it is compiled eagerly with the optimizing tier; V8's defaults are restored right after, so the
 * application's other modules are not affected.
 */
function enterEagerOptimizedCompile(): void {
  setFlagsFromString('--no-wasm-lazy-compilation');
  setFlagsFromString('--no-wasm-dynamic-tiering');
}
function leaveEagerOptimizedCompile(): void {
  setFlagsFromString('--wasm-lazy-compilation');
  setFlagsFromString('--wasm-dynamic-tiering');
}

export async function compileCoreModule(): Promise<CompiledCore> {
  const bytes = await readFile(WASM_URL).catch((e: unknown) => Promise.reject(unreadable(e)));
  enterEagerOptimizedCompile();
  const module = await WA.compile(bytes)
    .catch((e: unknown) => Promise.reject(uncompilable(e)))
    .finally(leaveEagerOptimizedCompile);
  return compiled(module, bytes);
}

/** compileCoreModule, synchronously (the planner's way: it runs on the calling thread, outside any promise). */
export function compileCoreModuleSync(): CompiledCore {
  const orThrow = <T>(f: () => T, error: (e: unknown) => SparseMlaError): T => {
    try {
      return f();
    } catch (e) {
      throw error(e);
    }
  };
  const bytes = orThrow(() => readFileSync(WASM_URL), unreadable);
  enterEagerOptimizedCompile();
  let module: WasmModule;
  try {
    module = orThrow(() => new WA.Module(bytes), uncompilable);
  } finally {
    leaveEagerOptimizedCompile();
  }
  return compiled(module, bytes);
}

function readLeb(bytes: Uint8Array, at: { pos: number }): number {
  let result = 0;
  let mul = 1;
  for (;;) {
    const b = bytes[at.pos++]!;
    result += (b & 0x7f) * mul;
    if ((b & 0x80) === 0) return result;
    mul *= 128;
  }
}

/** The maximum of the module's own memory (memory section, id 5); wasm32's 4 GiB when unbounded. */
export function declaredMaxMemory(bytes: Uint8Array): number {
  const at = { pos: 8 };
  while (at.pos < bytes.length) {
    const id = bytes[at.pos++]!;
    const size = readLeb(bytes, at);
    const end = at.pos + size;
    if (id === 5) {
      const count = readLeb(bytes, at);
      if (count < 1) break;
      const flags = bytes[at.pos++]!;
      readLeb(bytes, at); // initial pages
      if (flags & 1) return Math.min(readLeb(bytes, at) * 65536, WASM32_MAX_BYTES);
      break;
    }
    at.pos = end;
  }
  return WASM32_MAX_BYTES;
}

/**
 * Host functions for whatever the module imports. The reference build imports nothing; a build
 * with WASI or Emscripten hooks still instantiates, and a call that cannot be honoured fails.
 */
function importStubs(module: WasmModule): WasmImports {
  const imports: WasmImports = {};
  for (const imp of WA.Module.imports(module)) {
    const ns = (imports[imp.module] ??= {});
    if (imp.kind !== 'function') {
      throw new SparseMlaError('BACKEND_FAILURE', `wasm: the module imports ${imp.kind} ${imp.module}.${imp.name}, which this host does not provide`, 'backend');
    }
    if (imp.name === 'emscripten_notify_memory_growth') ns[imp.name] = () => {}; // views are refreshed per call
    else if (imp.name === 'proc_exit') ns[imp.name] = (code: number) => { throw new Error(`wasm: the core called proc_exit(${code})`); };
    else if (imp.module === 'wasi_snapshot_preview1') ns[imp.name] = () => 52; // ENOSYS
    else ns[imp.name] = () => { throw new Error(`wasm: the core called unsupported import ${imp.module}.${imp.name}`); };
  }
  return imports;
}

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

  private constructor(instance: WasmInstance, maxMemoryBytes: number) {
    this.x = instance.exports as unknown as CoreExports;
    this.maxMemoryBytes = maxMemoryBytes;
    const v = this.x.smla_abi_version();
    if (v !== ABI_VERSION) throw new SparseMlaError('BACKEND_FAILURE', `wasm: module ABI version ${v}, this facade expects ${ABI_VERSION}; rebuild with \`npm run build:wasm\``, 'backend');
  }

  /** An instance for a worker of the pool. */
  static async instantiate(module: WasmModule, maxMemoryBytes = WASM32_MAX_BYTES): Promise<WasmCore> {
    return new WasmCore(await WA.instantiate(module, importStubs(module)), maxMemoryBytes);
  }

  /** An instance on the calling thread, synchronously (the planner's). */
  static instantiateSync(module: WasmModule, maxMemoryBytes = WASM32_MAX_BYTES): WasmCore {
    return new WasmCore(new WA.Instance(module, importStubs(module)), maxMemoryBytes);
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
