/**
 * The planner's index math run by the C++ core (cpp/src/planner.cpp) in the WASM module. The
 * planner is small integer work done once per chunk (plus one top-k combine per c4 layer), so it
 * runs synchronously on the calling thread in a private instance of the module rather than
 * through the worker pool: a round trip to a worker would cost more than the work.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { SparseMlaError } from '../errors.js';
import { WASM_URL } from '../backends/wasm/binding.js';
import type { CoreLayout, CorePagedForm, CoreRows, CoreTopkRows, PlannerCore } from './core.js';

// TypeScript declares WebAssembly only in its DOM lib, which this package does not load; type the
// synchronous slice used here.
interface WasmSyncApi {
  Module: {
    new (bytes: Uint8Array): object;
    imports(m: object): { module: string; name: string; kind: string }[];
  };
  Instance: new (m: object, imports: Record<string, Record<string, unknown>>) => { exports: Record<string, unknown> };
}
const WA = (globalThis as unknown as { WebAssembly: WasmSyncApi }).WebAssembly;

interface PlanExports {
  memory: { readonly buffer: ArrayBuffer };
  smla_malloc(bytes: number): number;
  smla_free(ptr: number): void;
  smla_plan_layout(n: number, seq: number, ext: number, window: number, ratio: number, qo: number, so: number, co: number, totals: number): number;
  smla_plan_compressed_token_ids(n: number, seq: number, ext: number, ratio: number, tables: number, offsets: number, pageSize: number, out: number): number;
  smla_plan_dense_rows(n: number, seq: number, ext: number, window: number, ratio: number, width: number, rows: number, lens: number): number;
  smla_plan_combine_topk(
    n: number, seq: number, ext: number, window: number, ratio: number, topk: number, k: number, width: number,
    rows: number, lens: number, dropped: number, droppedTotal: number,
  ): number;
  smla_plan_paged_form(
    nq: number, rows: number, lens: number, width: number, compRows: number, swaRows: number, compIds: number, swaIds: number,
    main: number, mainWidth: number, mainLens: number, extra: number, extraWidth: number, extraLens: number,
  ): number;
}

const REQUIRED = [
  'smla_malloc',
  'smla_free',
  'smla_plan_layout',
  'smla_plan_compressed_token_ids',
  'smla_plan_dense_rows',
  'smla_plan_combine_topk',
  'smla_plan_paged_form',
] as const;

let cached: PlannerCore | null | undefined;

/** The WASM planner core, or undefined when the module (or its smla_plan_* exports) is missing. */
export function loadWasmPlannerCore(): PlannerCore | undefined {
  if (cached === undefined) {
    try {
      cached = instantiate();
    } catch {
      cached = null;
    }
  }
  return cached ?? undefined;
}

function instantiate(): PlannerCore | null {
  const module = new WA.Module(readFileSync(fileURLToPath(WASM_URL)));
  // The module imports nothing today; should a build import host functions, the planner calls none.
  const imports: Record<string, Record<string, unknown>> = {};
  for (const imp of WA.Module.imports(module)) {
    if (imp.kind !== 'function') return null;
    (imports[imp.module] ??= {})[imp.name] = () => {
      throw new Error(`sparse-mla planner: unexpected call to ${imp.module}.${imp.name}`);
    };
  }
  const make = (): PlanExports => new WA.Instance(module, imports).exports as unknown as PlanExports;
  let current: PlanExports | undefined = make();
  if (!(current.memory?.buffer instanceof ArrayBuffer)) return null;
  for (const name of REQUIRED) if (typeof current[name] !== 'function') return null;
  return makeCore(
    () => (current ??= make()),
    // a one-off huge plan must not pin its heap for the life of the process: drop the instance
    // (the compiled module stays) and start a fresh one on the next call
    () => {
      if (current && current.memory.buffer.byteLength > KEEP_HEAP_BYTES) current = undefined;
    },
  );
}

/** Heap size above which the private instance is dropped after a call. */
const KEEP_HEAP_BYTES = 256 * 2 ** 20;

const STATUS_NAMES = ['OK', 'INVALID_ARGUMENT', 'OUT_OF_RANGE', 'OUT_OF_MEMORY', 'UNSUPPORTED'];

function makeCore(acquire: () => PlanExports, release: () => void): PlannerCore {
  // the instance of the call in progress (calls are synchronous, never nested)
  let ex: PlanExports;
  /** Scratch allocations of one call, freed together. */
  class Frame {
    ptrs: number[] = [];
    alloc(bytes: number): number {
      const p = ex.smla_malloc(Math.max(bytes, 8)) >>> 0;
      if (p === 0) throw new SparseMlaError('TOO_LARGE', `planner: the WASM heap could not allocate ${bytes} bytes`, 'plan');
      this.ptrs.push(p);
      return p;
    }
    i32(src: Int32Array): number {
      const p = this.alloc(src.byteLength);
      new Int32Array(ex.memory.buffer, p, src.length).set(src);
      return p;
    }
    i64(src: BigInt64Array | Float64Array): number {
      const p = this.alloc(src.length * 8);
      const dst = new BigInt64Array(ex.memory.buffer, p, src.length);
      if (src instanceof BigInt64Array) dst.set(src);
      else for (let i = 0; i < src.length; i++) dst[i] = BigInt(src[i]!);
      return p;
    }
    free(): void {
      for (const p of this.ptrs) ex.smla_free(p);
      this.ptrs = [];
    }
  }
  const check = (status: number, fn: string): void => {
    if (status !== 0) throw new SparseMlaError('BACKEND_FAILURE', `planner: ${fn} returned ${STATUS_NAMES[status] ?? status}`, 'plan');
  };
  const readI32 = (p: number, n: number): Int32Array => new Int32Array(ex.memory.buffer, p, n).slice();
  const readI64 = (p: number, n: number): BigInt64Array => new BigInt64Array(ex.memory.buffer, p, n).slice();
  const run = <T>(f: (fr: Frame) => T): T => {
    ex = acquire();
    const fr = new Frame();
    try {
      return f(fr);
    } finally {
      fr.free();
      release();
    }
  };
  const sum = (a: Int32Array): number => a.reduce((x, y) => x + y, 0);

  return {
    name: 'wasm',
    layout(seqLens, extendLens, window, ratio): CoreLayout {
      return run((fr) => {
        const n = seqLens.length;
        const seq = fr.i32(seqLens), ext = fr.i32(extendLens);
        const qo = fr.alloc((n + 1) * 8), so = fr.alloc((n + 1) * 8), co = fr.alloc((n + 1) * 8), tot = fr.alloc(32);
        check(ex.smla_plan_layout(n, seq, ext, window, ratio, qo, so, co, tot), 'smla_plan_layout');
        const f64 = (p: number): Float64Array => Float64Array.from(readI64(p, n + 1), Number);
        const t = readI64(tot, 4);
        return {
          queryOffsets: f64(qo),
          swaOffsets: f64(so),
          compOffsets: f64(co),
          numQueries: Number(t[0]),
          swaRows: Number(t[1]),
          compRows: Number(t[2]),
          maxVisible: Number(t[3]),
        };
      });
    },
    compressedTokenIds(seqLens, extendLens, ratio, pageTables, pageTableOffsets, pageSize): BigInt64Array {
      return run((fr) => {
        const n = seqLens.length;
        let total = 0;
        for (let r = 0; r < n; r++) total += extendLens[r]! > 0 ? Math.floor(seqLens[r]! / ratio) : 0;
        const seq = fr.i32(seqLens), ext = fr.i32(extendLens), tab = fr.i32(pageTables), off = fr.i64(pageTableOffsets);
        const out = fr.alloc(total * 8);
        check(ex.smla_plan_compressed_token_ids(n, seq, ext, ratio, tab, off, pageSize, out), 'smla_plan_compressed_token_ids');
        return readI64(out, total);
      });
    },
    denseRows(seqLens, extendLens, window, ratio, width): CoreRows {
      return run((fr) => {
        const nq = sum(extendLens);
        const seq = fr.i32(seqLens), ext = fr.i32(extendLens);
        const rows = fr.alloc(nq * width * 4), lens = fr.alloc(nq * 4);
        check(ex.smla_plan_dense_rows(seqLens.length, seq, ext, window, ratio, width, rows, lens), 'smla_plan_dense_rows');
        return { rows: readI32(rows, nq * width), lens: readI32(lens, nq) };
      });
    },
    combineTopk(seqLens, extendLens, window, ratio, topkIndices, topk, width): CoreTopkRows {
      return run((fr) => {
        const nq = sum(extendLens);
        const seq = fr.i32(seqLens), ext = fr.i32(extendLens), k = fr.i32(topkIndices);
        const rows = fr.alloc(nq * width * 4), lens = fr.alloc(nq * 4), dropped = fr.alloc(nq * 4), total = fr.alloc(8);
        check(
          ex.smla_plan_combine_topk(seqLens.length, seq, ext, window, ratio, k, topk, width, rows, lens, dropped, total),
          'smla_plan_combine_topk',
        );
        return { rows: readI32(rows, nq * width), lens: readI32(lens, nq), dropped: readI32(dropped, nq), droppedTotal: Number(readI64(total, 1)[0]) };
      });
    },
    pagedForm(rows, lens, width, compRows, swaRows, compTokenIds, swaTokenIds, mainWidth, extraWidth): CorePagedForm {
      return run((fr) => {
        const nq = lens.length;
        const r = fr.i32(rows), l = fr.i32(lens), ci = fr.i64(compTokenIds), si = fr.i64(swaTokenIds);
        const main = mainWidth > 0 ? fr.alloc(nq * mainWidth * 4) : 0, mainLens = mainWidth > 0 ? fr.alloc(nq * 4) : 0;
        const extra = extraWidth > 0 ? fr.alloc(nq * extraWidth * 4) : 0, extraLens = extraWidth > 0 ? fr.alloc(nq * 4) : 0;
        check(
          ex.smla_plan_paged_form(nq, r, l, width, compRows, swaRows, ci, si, main, mainWidth, mainLens, extra, extraWidth, extraLens),
          'smla_plan_paged_form',
        );
        return {
          main: mainWidth > 0 ? { rows: readI32(main, nq * mainWidth), lens: readI32(mainLens, nq) } : undefined,
          extra: extraWidth > 0 ? { rows: readI32(extra, nq * extraWidth), lens: readI32(extraLens, nq) } : undefined,
        };
      });
    },
  };
}
