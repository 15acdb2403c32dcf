/**
 * A worker thread of the WASM pool: one instance of the core, exposed through comlink. It copies
 * its share of the (shared) inputs into its own heap, runs the core and transfers the outputs back.
 */
import { getHeapStatistics } from 'node:v8';
import { parentPort, workerData } from 'node:worker_threads';
import * as Comlink from 'comlink/dist/esm/comlink.mjs';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import { SparseMlaError } from '../../errors.js';
import { WasmCore } from './ops.js';
import type { AttentionOutput, TaskResult, WorkerApi, WorkerInit } from './protocol.js';

if (!parentPort) throw new Error('sparse-mla: worker.js must run as a worker thread');
const port = parentPort;
const init = workerData as WorkerInit;
const core = await WasmCore.instantiate(init.module, init.maxMemoryBytes);

function run<T>(fn: () => T, transfer: (v: T) => ArrayBuffer[]): TaskResult<T> {
  try {
    const value = fn();
    return Comlink.transfer({ ok: true, value, heapBytes: core.heapBytes } as TaskResult<T>, transfer(value));
  } catch (e) {
    if (e instanceof SparseMlaError) return { ok: false, error: { code: e.code, message: e.message, argument: e.argument, fatal: false } };
    // A trap (RuntimeError) or anything unexpected: the instance may be inconsistent.
    return { ok: false, error: { code: 'BACKEND_FAILURE', message: `wasm worker: ${(e as Error)?.message ?? String(e)}`, fatal: true } };
  }
}

const attentionBuffers = (o: AttentionOutput): ArrayBuffer[] => [o.out.buffer as ArrayBuffer, o.maxLogits.buffer as ArrayBuffer, o.lse.buffer as ArrayBuffer];

const api: WorkerApi = {
  ready: () => ({ abiVersion: core.abiVersion, heapBytes: core.heapBytes }),

  memory: (collect) => {
    const gc = (globalThis as { gc?: () => void }).gc;
    if (collect) gc?.();
    const v8 = getHeapStatistics();
    const m = process.memoryUsage();
    return { heapBytes: core.heapBytes, allocatedBytes: core.allocatedBytes, v8UsedBytes: v8.used_heap_size, v8TotalBytes: v8.total_heap_size, arrayBuffers: m.arrayBuffers, external: m.external, portListeners: port.listenerCount('message'), collected: collect && gc !== undefined };
  },

  sparsePrefill: ({ job, rowStart, rowEnd }) =>
    run(() => {
      const qRow = job.hQ * job.dQK;
      return core.sparsePrefill({
        ...job,
        sQ: rowEnd - rowStart,
        q: job.q.subarray(rowStart * qRow, rowEnd * qRow),
        indices: job.indices.subarray(rowStart * job.topk, rowEnd * job.topk),
        topkLength: job.topkLength?.subarray(rowStart, rowEnd) ?? null,
      });
    }, attentionBuffers),

  pagedSparseAttention: ({ job, rowStart, rowEnd }) =>
    run(() => {
      const qRow = job.hQ * 512;
      const set = <S extends { indices: Int32Array; topk: number; topkLength: Int32Array | null }>(s: S): S => ({
        ...s,
        indices: s.indices.subarray(rowStart * s.topk, rowEnd * s.topk),
        topkLength: s.topkLength?.subarray(rowStart, rowEnd) ?? null,
      });
      return core.pagedSparseAttention({
        q: job.q.subarray(rowStart * qRow, rowEnd * qRow),
        n: rowEnd - rowStart,
        hQ: job.hQ,
        main: set(job.main),
        extra: job.extra ? set(job.extra) : null,
        attnSink: job.attnSink,
        smScale: job.smScale,
      });
    }, attentionBuffers),

  dequantizeKvCache: ({ cache, numTokens, rowDim }) =>
    run(() => {
      const ids = new Int32Array(numTokens);
      for (let i = 0; i < numTokens; i++) ids[i] = i;
      return core.dequantizeKvCache({ format: cache.format, pageSize: cache.pageSize, numPages: cache.numPages, cache: cache.data, tokenIds: ids, rowDim });
    }, (v) => [v.buffer as ArrayBuffer]),

  quantizeKvCache: (t) =>
    run(() => {
      const m = t.rowEnd - t.rowStart;
      const ids = new Int32Array(m);
      for (let i = 0; i < m; i++) ids[i] = i;
      return core.quantizeKvCache({
        format: t.format,
        pageSize: t.pageSize,
        numPages: t.numPages,
        cacheBytes: t.cacheBytes,
        cache: null,
        tokenIds: ids,
        rows: t.rows.subarray(t.rowStart * t.rowDim, t.rowEnd * t.rowDim),
        rowsDtype: t.rowsDtype,
      });
    }, (v) => [v.buffer as ArrayBuffer]),
};

Comlink.expose(api, nodeEndpoint(port));
