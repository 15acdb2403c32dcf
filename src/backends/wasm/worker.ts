/**
 * A worker thread of the WASM pool: one instance of the core, exposed through comlink. It copies
 * its share of the (shared) inputs into its own heap, runs the core and transfers the outputs back.
 * An attention task's share is its rows, and of them its heads (q, sink and outputs cut to them;
 * the row's ids and the whole kv or caches, which every head reads).
 */
import { getHeapStatistics } from 'node:v8';
import { parentPort, workerData } from 'node:worker_threads';
import * as Comlink from 'comlink/dist/esm/comlink.mjs';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
import { SparseMlaError } from '../../errors.js';
import { WasmCore } from './ops.js';
import type { AttentionOutput, HeadRange, RowRange, TaskResult, WorkerApi, WorkerInit } from './protocol.js';

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

/**
 * A task's rows and heads (every head unless it names a run of them), checked: a task takes either
 * all of its rows' heads or one row's run, so its part of q, sink and outputs is contiguous.
 */
function taskHeads(t: RowRange & HeadRange, hQ: number): { rowStart: number; rowEnd: number; headStart: number; headEnd: number } {
  const { rowStart, rowEnd, headStart = 0, headEnd = hQ } = t;
  const allHeads = headStart === 0 && headEnd === hQ;
  if (!(Number.isInteger(headStart) && Number.isInteger(headEnd) && 0 <= headStart && headStart <= headEnd && headEnd <= hQ) || (!allHeads && rowEnd - rowStart !== 1)) {
    throw new SparseMlaError('BACKEND_FAILURE', `wasm worker: a task of rows ${rowStart}..${rowEnd - 1} was given heads ${headStart}..${headEnd - 1} of ${hQ} (a bug: please report it)`, 'backend');
  }
  return { rowStart, rowEnd, headStart, headEnd };
}

/** Rows [rowStart, rowEnd), heads [headStart, headEnd) of a [rows, hQ, width] array (contiguous: taskHeads). */
function cut(a: Uint16Array, t: ReturnType<typeof taskHeads>, hQ: number, width: number): Uint16Array {
  return a.subarray((t.rowStart * hQ + t.headStart) * width, ((t.rowEnd - 1) * hQ + t.headEnd) * width);
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

  sparsePrefill: ({ job, ...task }) =>
    run(() => {
      const t = taskHeads(task, job.hQ);
      const { rowStart, rowEnd, headStart, headEnd } = t;
      return core.sparsePrefill({
        ...job,
        sQ: rowEnd - rowStart,
        hQ: headEnd - headStart,
        q: cut(job.q, t, job.hQ, job.dQK),
        indices: job.indices.subarray(rowStart * job.topk, rowEnd * job.topk),
        topkLength: job.topkLength?.subarray(rowStart, rowEnd) ?? null,
        attnSink: job.attnSink?.subarray(headStart, headEnd) ?? null,
      });
    }, attentionBuffers),

  pagedSparseAttention: ({ job, ...task }) =>
    run(() => {
      const t = taskHeads(task, job.hQ);
      const { rowStart, rowEnd, headStart, headEnd } = t;
      const set = <S extends { indices: Int32Array; topk: number; topkLength: Int32Array | null }>(s: S): S => ({
        ...s,
        indices: s.indices.subarray(rowStart * s.topk, rowEnd * s.topk),
        topkLength: s.topkLength?.subarray(rowStart, rowEnd) ?? null,
      });
      return core.pagedSparseAttention({
        q: cut(job.q, t, job.hQ, 512),
        n: rowEnd - rowStart,
        hQ: headEnd - headStart,
        main: set(job.main),
        extra: job.extra ? set(job.extra) : null,
        attnSink: job.attnSink?.subarray(headStart, headEnd) ?? null,
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
