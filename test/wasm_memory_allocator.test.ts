/**
 * SPEC §9 (nothing may leak per call) inside the wasm workers' linear memory. The size of that
 * memory (test/wasm_memory_workers.test.ts) starts at 16 MiB and grows only when the allocator has
 * no free block left, so a block of a few KiB left allocated per call would not move it for
 * thousands of calls. Here each worker's allocator is read itself: the bytes dlmalloc holds in use
 * (WasmCore.allocatedBytes, through the pool's testing hook). Every task frees what it allocated,
 * the core's scratch included, so after any call — one that succeeds, a task the core refuses in
 * the worker, one whose heap allocations fail part way, a call whose worker is killed, a call
 * cancelled part way — every worker's allocator holds exactly what it held before the first call.
 */
import os from 'node:os';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, createPlan, tensor, type Engine } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import type { WorkerPool } from '../dist/backends/wasm/pool.js';
import { hostPlannerForTests } from '../dist/backends/wasm/planner.js';
import { randomBf16Bits, randomIndices } from '../dist/check/grid.js';
import { randomScenario, randomTopk } from './helpers/chunks.js';
import { testRng } from './helpers/random.js';

const rng = testRng('wasm_memory_allocator');

let engine: Engine;
let backend: WasmBackend;
let pool: WorkerPool;
/** Each worker's bytes in use before any call. */
let level: number[];

/** Waits until every worker is idle and nothing is queued (a failed call's siblings may still run), then reads each worker's allocator. */
async function allocatedWhenIdle(): Promise<number[]> {
  for (let i = 0; !(pool.testing.states().every((s) => s === 'idle') && pool.testing.queued() === 0); i++) {
    if (i > 3000) throw new Error(`the pool did not come back idle: ${pool.testing.states().join(', ')}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  return (await pool.testing.workerMemory()).map((w) => w.allocatedBytes);
}

const bf16 = (shape: number[]) => tensor('bf16', shape, randomBf16Bits(rng, shape.reduce((a, b) => a * b, 1)));

beforeAll(async () => {
  engine = await createEngine({ backend: 'wasm', workers: 2 });
  backend = engineBackend(engine) as WasmBackend;
  pool = backend.pool;
  level = await allocatedWhenIdle();
  expect(level).toHaveLength(2);
});
afterAll(() => engine?.dispose());

describe("the wasm core's allocators (the pool's workers, the main thread's planner) hold nothing a call left behind", () => {
  test('after every op, on one worker and split over both', async () => {
    const threads = pool.testing.threadIds();
    const hQ = 16, sKV = 300, topk = 64;
    for (const sQ of [3, 40]) {
      await engine.sparsePrefill({
        q: bf16([sQ, hQ, 576]), kv: bf16([sKV, 576]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.1, 0.05, [])),
        topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(0, topk + 1))),
        attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())), smScale: 0.04,
      });
      expect(await allocatedWhenIdle(), `sparsePrefill sQ ${sQ}`).toEqual(level);
    }
    const cache = createKvCache('v4', { pageSize: 16, numPages: 20 });
    const extra = createKvCache('v4', { pageSize: 4, numPages: 10 });
    await engine.quantizeKCache({ cache, tokenIds: tensor('int32', [320], Int32Array.from({ length: 320 }, (_, i) => i)), rows: bf16([320, 512]) });
    await engine.quantizeKCache({ cache: extra, tokenIds: tensor('int32', [40], Int32Array.from({ length: 40 }, (_, i) => i)), rows: tensor('float32', [40, 512], Float32Array.from({ length: 40 * 512 }, () => rng.normal())) });
    expect(await allocatedWhenIdle(), 'quantizeKCache').toEqual(level);
    await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [200], Int32Array.from({ length: 200 }, () => rng.int(0, 320))) });
    expect(await allocatedWhenIdle(), 'dequantizeKCachePaged').toEqual(level);
    for (const n of [2, 40]) {
      await engine.pagedSparseAttention({
        q: bf16([n, hQ, 512]), kCache: cache, indices: tensor('int32', [n, topk], randomIndices(rng, n, topk, 320, 0.1, 0.05, [])),
        extraKCache: extra, extraIndices: tensor('int32', [n, 16], randomIndices(rng, n, 16, 40, 0.1, 0, [])), smScale: 0.04,
      });
      expect(await allocatedWhenIdle(), `pagedSparseAttention n ${n}`).toEqual(level);
    }
    expect(pool.testing.threadIds()).toEqual(threads);
  });

  test('after tasks the core refuses in the worker, and one whose heap allocations fail part way', async () => {
    const threads = pool.testing.threadIds();
    const hQ = 4, sKV = 64, topk = 16, sQ = 4;
    const job = {
      q: randomBf16Bits(rng, sQ * hQ * 576), kv: randomBf16Bits(rng, sKV * 576), indices: randomIndices(rng, sQ, topk, sKV, 0, 0, []),
      topkLength: null, attnSink: new Float32Array(hQ), sQ, hQ, dQK: 576, dV: 512, sKV, topk, smScale: 0.04,
    };
    // The core's own checks, after the worker has put every argument into its heap: a dQK that is
    // no multiple of 64, a token outside the compact cache a task names.
    await expect(pool.run('sparsePrefill', { job: { ...job, dQK: 520 }, rowStart: 0, rowEnd: sQ })).rejects.toMatchObject({ code: 'BACKEND_FAILURE', message: expect.stringContaining('SMLA_ERR_INVALID_ARGUMENT') });
    expect(await allocatedWhenIdle(), 'sparsePrefill refused by the core').toEqual(level);
    const rows = randomBf16Bits(rng, 8 * 512);
    await expect(pool.run('quantizeKvCache', { format: 'v4', pageSize: 4, numPages: 1, cacheBytes: 4 * 584 + 128, rows, rowsDtype: 'bf16', rowDim: 512, rowStart: 0, rowEnd: 8 }))
      .rejects.toMatchObject({ code: 'BACKEND_FAILURE', message: expect.stringContaining('SMLA_ERR_OUT_OF_RANGE') });
    expect(await allocatedWhenIdle(), 'quantize refused by the core').toEqual(level);
    await expect(pool.run('dequantizeKvCache', { cache: { format: 'v4', pageSize: 4, numPages: 1, data: new Uint8Array(4 * 584 + 128) }, numTokens: 8, rowDim: 512 }))
      .rejects.toMatchObject({ code: 'BACKEND_FAILURE', message: expect.stringContaining('SMLA_ERR_OUT_OF_RANGE') });
    expect(await allocatedWhenIdle(), 'dequant refused by the core').toEqual(level);
    // 60,000 rows of 64 heads: the struct, q, kv, indices, lengths and sink are allocated, then the
    // 3.9 GB of out cannot be (wasm32's 4 GiB), so the task gives up with those blocks live. The
    // worker's output array of that size is never written, so its pages are never touched; a
    // machine under 8 GiB may refuse even to reserve it, and skips this case.
    if (os.totalmem() >= 8 * 2 ** 30) {
      const rowsBig = 60_000, hQBig = 64;
      await expect(pool.run('sparsePrefill', { job: { ...job, hQ: hQBig, attnSink: new Float32Array(hQBig), sQ: rowsBig }, rowStart: 0, rowEnd: rowsBig }))
        .rejects.toMatchObject({ code: 'TOO_LARGE', message: expect.stringContaining(`could not allocate ${rowsBig * hQBig * 512 * 2} bytes`) });
      expect(await allocatedWhenIdle(), 'sparsePrefill out of heap').toEqual(level);
    }
    // none of these was fatal: the same workers
    expect(pool.testing.threadIds()).toEqual(threads);
  }, 30_000);

  test('after a call whose worker is killed, and a call cancelled part way', async () => {
    const hQ = 16, sKV = 300, topk = 64, sQ = 40;
    const threads = pool.testing.threadIds();
    // A split sparsePrefill: the worker of its first part is terminated as that part is handed to
    // it (WORKER_DIED); the other part runs on, unobserved; the dead worker's replacement starts.
    const killed = pool.testing.onDispatch((worker, label) => {
      if (label.endsWith(' rows 0..19')) void pool.testing.terminateWorker(worker);
    });
    try {
      await expect(engine.sparsePrefill({ q: bf16([sQ, hQ, 512]), kv: bf16([sKV, 512]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.1, 0, [])), smScale: 0.04 }))
        .rejects.toMatchObject({ code: 'WORKER_DIED' });
    } finally {
      killed();
    }
    expect(await allocatedWhenIdle(), 'after a worker died').toEqual(level);
    expect(pool.testing.threadIds().filter((t) => threads.includes(t))).toHaveLength(1);
    // A dequant of four parts (at most one in flight per worker): its cache is detached once the
    // first part is handed out, so the next part's gather fails (INVALID_VALUE) and the parts not
    // yet started are dropped while the running ones finish.
    const cache = createKvCache('v4', { pageSize: 64, numPages: 640 });
    let dispatched = 0;
    const detach = pool.testing.onDispatch(() => {
      if (++dispatched === 1) structuredClone(cache.data.buffer, { transfer: [cache.data.buffer as ArrayBuffer] });
    });
    try {
      await expect(engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [40_960], Int32Array.from({ length: 40_960 }, (_, i) => i)) }))
        .rejects.toMatchObject({ code: 'INVALID_VALUE' });
    } finally {
      detach();
    }
    expect(dispatched).toBeGreaterThanOrEqual(1);
    expect(dispatched).toBeLessThan(4);
    expect(await allocatedWhenIdle(), 'after a cancelled dequant').toEqual(level);
  }, 30_000);

  test("the main thread's planner instance: after every plan step", () => {
    const sc = randomScenario(rng, [rng.int(300, 900), rng.int(100, 300)], [rng.int(20, 60), rng.int(5, 20)]);
    const plan = createPlan(sc.chunk);
    const inUse = () => hostPlannerForTests.allocatedBytes();
    expect(inUse(), 'createPlan').toBe(0);
    for (const ratio of [0, 128] as const) {
      plan.pagedForm(plan.combinedRows(ratio));
      expect(inUse(), `c${ratio} rows and paged form`).toBe(0);
    }
    const topk = randomTopk(rng, sc, 48);
    plan.pagedForm(plan.combineC4(topk));
    expect(inUse(), 'c4 combine and paged form').toBe(0);
    plan.release();
  });
});
