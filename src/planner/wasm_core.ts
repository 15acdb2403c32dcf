/**
 * The planner's index math run by the C++ core (cpp/src/planner.cpp) in the WASM module, through
 * the smla_plan_* calls of backends/wasm/ops.ts. The planner is small integer work done once per
 * chunk (plus one top-k combine per c4 layer), so it runs synchronously on the calling thread in a
 * private instance of the module rather than through the worker pool: a round trip to a worker
 * would cost more than the work. This file only adapts those calls to PlannerCore and owns that instance.
 */
import { compileCoreModuleSync, WasmCore, type CompiledCore } from '../backends/wasm/ops.js';
import type { PlannerCore } from './core.js';

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

const numQueries = (extendLens: Int32Array): number => extendLens.reduce((a, b) => a + b, 0);

const wasmPlannerCore: PlannerCore = {
  name: 'wasm',
  layout(seqLens, extendLens, window, ratio) {
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
  compressedTokenIds(seqLens, extendLens, ratio, pageTables, pageTableOffsets, pageSize, compRows) {
    const offsets = BigInt64Array.from(pageTableOffsets, (x) => BigInt(x));
    return withCore((c) => c.planCompressedTokenIds({ seqLens, extendLens, ratio, pageTables, pageTableOffsets: offsets, pageSize, compRows }));
  },
  denseRows(seqLens, extendLens, window, ratio, width) {
    return withCore((c) => c.planDenseRows({ seqLens, extendLens, window, ratio, width, numQueries: numQueries(extendLens) }));
  },
  combineTopk(seqLens, extendLens, window, ratio, topkIndices, topk, width) {
    return withCore((c) => c.planCombineTopk({ seqLens, extendLens, window, ratio, topkIndices, topk, width, numQueries: numQueries(extendLens) }));
  },
  pagedForm(rows, lens, width, compRows, swaRows, compTokenIds, swaTokenIds, mainWidth, extraWidth) {
    return withCore((c) => c.planPagedForm({ rows, lens, width, compRows, swaRows, compTokenIds, swaTokenIds, mainWidth, extraWidth }));
  },
};

/**
 * The WASM planner core. Compiles the module on first use; throws BACKEND_UNAVAILABLE when it is
 * missing or unusable (not cached, so a fixed install can retry).
 */
export function loadWasmPlannerCore(): PlannerCore {
  compiled ??= compileCoreModuleSync();
  instance ??= WasmCore.instantiateSync(compiled.module, compiled.maxMemoryBytes); // surfaces an ABI mismatch here
  return wasmPlannerCore;
}
