/**
 * The layer steps of the host backends (cpu, wasm): the rows and ids from the host planner
 * (./wasm/planner.ts), the workspace a shared-memory array, and the backend's own dequantize and
 * sparsePrefill ops over it. Everything stays in host memory, so placing and reading are no-ops.
 */
import { V4_ROW_DIMS, rowDimOf } from '../kv_cache_layout.js';
import type { Backend, LayerSteps } from './backend.js';
import { loadHostPlanner } from './wasm/planner.js';

/** The token ids the host ops take (int32): a plan's ids lie inside its caches, so each fits. */
function int32Ids(ids: BigInt64Array): Int32Array {
  const halves = new Int32Array(ids.buffer, ids.byteOffset, ids.length * 2);
  const out = new Int32Array(ids.length);
  for (let i = 0; i < out.length; i++) out[i] = halves[2 * i]!;
  return out;
}

/** The steps over `backend`'s host ops; its methods are looked up at each call. */
export function hostLayerSteps(backend: Pick<Backend, 'dequantizeKCache' | 'sparsePrefill'>): LayerSteps {
  return {
    memory: 'host',
    async planRows(job) {
      const planner = loadHostPlanner();
      const { seqLens, extendLens, window, ratio, topkIndices, topk, width } = job;
      if (topkIndices !== null) return planner.combineTopk(seqLens, extendLens, window, ratio, topkIndices, topk, width);
      return { ...planner.denseRows(seqLens, extendLens, window, ratio, width), dropped: null };
    },
    async planCompressedTokenIds(job) {
      return loadHostPlanner().compressedTokenIds(job.seqLens, job.extendLens, job.ratio, job.pageTables, job.pageTableOffsets, job.pageSize, job.total);
    },
    async placeIds(ids) {
      return ids;
    },
    allocWorkspace(bytes) {
      return new Uint16Array(new SharedArrayBuffer(bytes));
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
    async readCounts(counts) {
      return counts;
    },
  };
}
