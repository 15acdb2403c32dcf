/**
 * The `cpu` and `wasm` backends split a call with fewer query rows than threads (workers) by heads
 * as well: the addon's threads take runs of one row's consecutive heads (native/addon/cpu_ops.cpp,
 * GroupHeads), the wasm backend's tasks one row's run of whole blocks of 8 heads each
 * (src/backends/wasm/wasm_backend.ts, splitAttention). sparsePrefill and pagedSparseAttention at head
 * counts that split evenly, unevenly, with a remainder of fewer than 8 heads, and not at all, judged
 * against the float64 reference with SPEC §4's bounds, and equal bit for bit to what one thread
 * (one worker) computes. Each head has its own sink (±inf on a few), so a run reading another's
 * heads shows. The wasm tasks each call dispatched are checked too: how many runs a row was cut
 * into, and that the runs tile the row's heads on block edges; and a wasm call split by heads whose
 * worker dies, or whose engine is disposed, mid-call rejects saying so and gives its staging back.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine, KvCache, PagedSparseAttentionArgs, SparsePrefillArgs, Tensor } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import * as R from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, testRng, type Rng } from './helpers/random.js';

const rng = testRng('head_groups');
// wasm first: an addon that is there but cannot load fails each case's cpu part after its wasm part ran
const BACKENDS = nativeAddonBuilt() ? (['wasm', 'cpu'] as const) : (['wasm'] as const);
type TestedBackend = (typeof BACKENDS)[number];
const WORKERS = [2, 3, 16] as const;
/** Runs a wasm engine of each of WORKERS cuts one row's heads into (1: not split by heads). */
type WasmRuns = readonly [number, number, number];

type Outputs = { out: Tensor<'bf16'>; lse: Tensor<'float32'>; maxLogits: Tensor<'float32'> };

/** A sink per head, N(0, 1) but +inf on head 0 and head 9 (after a group's edge) and −inf on the last. */
function edgeSink(r: Rng, hQ: number): Tensor<'float32'> {
  return tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h === 0 || h === 9 ? Infinity : h === hQ - 1 ? -Infinity : r.normal())));
}

/** [n, topk] ids into `tokens`, a fifth of them outside it (skipped, never read). */
function ids(r: Rng, n: number, topk: number, tokens: number): Tensor<'int32'> {
  return tensor('int32', [n, topk], Int32Array.from({ length: n * topk }, () => (r.uniform() < 0.2 ? r.pick([-1, tokens, 2 ** 31 - 1]) : r.int(0, tokens))));
}

function expectSameBits(label: string, got: Outputs, one: Outputs): void {
  for (const k of ['out', 'lse', 'maxLogits'] as const) {
    const a = new Uint8Array(got[k].data.buffer, got[k].data.byteOffset, got[k].data.byteLength);
    const b = new Uint8Array(one[k].data.buffer, one[k].data.byteOffset, one[k].data.byteLength);
    expect(Buffer.compare(Buffer.from(a), Buffer.from(b)), `${label}: ${k} differs from one thread's`).toBe(0);
  }
}

/**
 * The tasks a wasm call dispatched (their labels): with `runs` 1, whole rows only; else each row cut
 * into `runs` runs that tile its heads in order, each starting on a block of 8 and all but the
 * last a whole number of blocks, one task per run and no more tasks than workers.
 */
function expectWasmTasks(label: string, labels: readonly string[], rows: number, hQ: number, runs: number, workers: number): void {
  const byRow = new Map<number, Array<[number, number]>>();
  for (const l of labels) {
    const m = /row (\d+) heads (\d+)\.\.(\d+)$/.exec(l);
    if (!m) continue;
    const row = Number(m[1]);
    byRow.set(row, [...(byRow.get(row) ?? []), [Number(m[2]), Number(m[3]) + 1]]);
  }
  if (runs === 1) {
    expect(byRow.size, `${label}: tasks ${labels.join(', ')}`).toBe(0);
    return;
  }
  expect(labels.length, `${label}: tasks ${labels.join(', ')}`).toBe(rows * runs);
  expect(labels.length, `${label}: more tasks than workers`).toBeLessThanOrEqual(workers);
  for (let row = 0; row < rows; row++) {
    const got = (byRow.get(row) ?? []).sort((a, b) => a[0] - b[0]);
    expect(got.length, `${label}: runs of row ${row}`).toBe(runs);
    got.forEach(([start, end], i) => {
      expect(start, `${label}: row ${row} run ${i}`).toBe(i === 0 ? 0 : got[i - 1]![1]);
      expect(start % 8, `${label}: row ${row} run ${i} starts off a block`).toBe(0);
      expect(end - start, `${label}: row ${row} run ${i}`).toBeGreaterThanOrEqual(8);
      if (i < runs - 1) expect((end - start) % 8, `${label}: row ${row} run ${i} not whole blocks`).toBe(0);
    });
    expect(got[runs - 1]![1], `${label}: row ${row}'s last run`).toBe(hQ);
  }
}

describe('few query rows split by heads over the threads (cpu) and workers (wasm)', () => {
  const one = new Map<TestedBackend, Engine>();
  const engines = new Map<TestedBackend, Map<number, Engine>>();
  const dispatched = new Map<Engine, string[]>();
  const unavailable = new Map<TestedBackend, unknown>();
  beforeAll(async () => {
    for (const backend of BACKENDS) {
      const byWorkers = new Map<number, Engine>();
      engines.set(backend, byWorkers);
      try {
        one.set(backend, await createEngine({ backend, workers: 1 }));
        for (const w of WORKERS) {
          const e = await createEngine({ backend, workers: w });
          byWorkers.set(w, e);
          if (backend === 'wasm') {
            const labels: string[] = [];
            dispatched.set(e, labels);
            (engineBackend(e) as WasmBackend).pool.testing.onDispatch((_, l) => labels.push(l));
          }
        }
      } catch (e) {
        if (backend === 'wasm') throw e;
        unavailable.set(backend, e);
      }
    }
  }, 60_000);
  afterAll(async () => {
    await Promise.all([...one.values(), ...[...engines.values()].flatMap((m) => [...m.values()])].map((e) => e.dispose()));
  });

  /** Runs `call` on every engine: within the reference's bounds, one thread's (worker's) bits, and the wasm tasks as `wasmRuns` says. */
  async function expectSplitsRight(call: (e: Engine) => Promise<Outputs>, ref: Parameters<typeof expectWithinBounds>[2], rows: number, hQ: number, wasmRuns: WasmRuns): Promise<void> {
    const queries = Array.from({ length: rows }, (_, i) => i);
    for (const backend of BACKENDS) {
      if (unavailable.has(backend)) throw unavailable.get(backend);
      const single = await call(one.get(backend)!);
      expectWithinBounds(`${backend}, 1 thread`, single, ref, queries);
      for (const [w, e] of engines.get(backend)!) {
        const label = `${backend}, ${w} threads`;
        const labels = dispatched.get(e);
        labels?.splice(0);
        const got = await call(e);
        expectWithinBounds(label, got, ref, queries);
        expectSameBits(label, got, single);
        if (labels) expectWasmTasks(label, labels, rows, hQ, wasmRuns[WORKERS.indexOf(w as (typeof WORKERS)[number])]!, w);
      }
    }
  }

  // The first six are sized for the addon's threads (hQ 8 never splits); the wasm backend, whose
  // tasks each copy the kv and cost a worker round trip, splits only the first of them by heads,
  // so the last four are sized for it (an even split, an uneven one, a remainder of 4 heads).
  const prefillShapes: Array<{ sQ: number; hQ: number; dQK: number; sKV: number; topk: number; wasm: WasmRuns }> = [
    { sQ: 1, hQ: 128, dQK: 576, sKV: 700, topk: 300, wasm: [2, 3, 4] },
    { sQ: 2, hQ: 64, dQK: 512, sKV: 400, topk: 200, wasm: [1, 1, 1] },
    { sQ: 1, hQ: 20, dQK: 576, sKV: 500, topk: 300, wasm: [1, 1, 1] },
    { sQ: 3, hQ: 24, dQK: 512, sKV: 500, topk: 400, wasm: [1, 1, 1] },
    { sQ: 1, hQ: 16, dQK: 512, sKV: 500, topk: 400, wasm: [1, 1, 1] },
    { sQ: 1, hQ: 8, dQK: 576, sKV: 200, topk: 70, wasm: [1, 1, 1] },
    { sQ: 1, hQ: 128, dQK: 576, sKV: 3000, topk: 2400, wasm: [2, 3, 16] },
    { sQ: 2, hQ: 64, dQK: 512, sKV: 1000, topk: 800, wasm: [1, 1, 5] },
    { sQ: 1, hQ: 20, dQK: 576, sKV: 1200, topk: 1000, wasm: [2, 2, 2] },
    { sQ: 3, hQ: 24, dQK: 512, sKV: 1200, topk: 1200, wasm: [1, 1, 2] },
  ];
  for (const s of prefillShapes) {
    test(`sparsePrefill sQ ${s.sQ}, hQ ${s.hQ}, dQK ${s.dQK}, topk ${s.topk}: within bounds and one thread's bits`, async () => {
      const args: SparsePrefillArgs = { ...randomPrefillArgs(rng, s, { invalidFraction: 0.2 }), attnSink: edgeSink(rng, s.hQ) };
      args.topkLength = tensor('int32', [s.sQ], Int32Array.from({ length: s.sQ }, () => rng.int(s.topk >> 1, s.topk + 1)));
      await expectSplitsRight((e) => e.sparsePrefill(args), R.sparsePrefillReference(args), s.sQ, s.hQ, s.wasm);
    });
  }

  // The core takes the fp32 dots for every head of a query holding a bf16 subnormal (the AVX-512 bf16
  // dot reads it as 0): a head group without it would take the bf16 dots, so the addon does not split
  // such a call, and the bits stay one thread's.
  for (const shape of [{ sQ: 1, hQ: 16, dQK: 576, sKV: 500, topk: 300 }, { sQ: 2, hQ: 64, dQK: 512, sKV: 400, topk: 200 }]) {
    test(`sparsePrefill sQ ${shape.sQ}, hQ ${shape.hQ}: one bf16 subnormal in one head of the query: one thread's bits`, async () => {
      const args: SparsePrefillArgs = { ...randomPrefillArgs(rng, shape), attnSink: edgeSink(rng, shape.hQ) };
      const q = args.q.data as Uint16Array;
      q[(shape.hQ * (shape.sQ - 1) + 12) * shape.dQK + 5] = 0x0040; // head 12 of the last row: 2^-127
      await expectSplitsRight((e) => e.sparsePrefill(args), R.sparsePrefillReference(args), shape.sQ, shape.hQ, [1, 1, 1]);
    });
  }

  async function filledCache(r: Rng, pageSize: number, numPages: number): Promise<KvCache> {
    const cache = createKvCache('v4', { pageSize, numPages });
    const n = pageSize * numPages;
    await one.get('wasm')!.quantizeKCache({ cache, tokenIds: Array.from({ length: n }, (_, i) => i), rows: tensor('bf16', [n, 512], randomBf16Bits(r, n * 512)) });
    return cache;
  }

  // as above: the first four sized for the addon, the last two for the wasm backend
  const pagedShapes: Array<{ n: number; hQ: number; topk: number; extra: number; wasm: WasmRuns }> = [
    { n: 1, hQ: 128, topk: 128, extra: 256, wasm: [2, 3, 5] },
    { n: 2, hQ: 64, topk: 64, extra: 0, wasm: [1, 1, 1] },
    { n: 1, hQ: 40, topk: 96, extra: 64, wasm: [1, 1, 1] },
    { n: 1, hQ: 8, topk: 64, extra: 32, wasm: [1, 1, 1] },
    { n: 2, hQ: 64, topk: 640, extra: 0, wasm: [1, 1, 4] },
    { n: 1, hQ: 40, topk: 512, extra: 256, wasm: [2, 3, 3] },
  ];
  for (const s of pagedShapes) {
    test(`pagedSparseAttention n ${s.n}, hQ ${s.hQ}, topk ${s.topk}${s.extra ? ` + extra ${s.extra}` : ''}: within bounds and one thread's bits`, async () => {
      const kCache = await filledCache(rng, 64, 5);
      const args: PagedSparseAttentionArgs = {
        q: tensor('bf16', [s.n, s.hQ, 512], randomBf16Bits(rng, s.n * s.hQ * 512)),
        kCache,
        indices: ids(rng, s.n, s.topk, 64 * 5),
        smScale: 1 / Math.sqrt(512),
        attnSink: edgeSink(rng, s.hQ),
      };
      if (s.extra) {
        args.extraKCache = await filledCache(rng, 128, 2);
        args.extraIndices = ids(rng, s.n, s.extra, 128 * 2);
        args.extraTopkLength = tensor('int32', [s.n], Int32Array.from({ length: s.n }, () => rng.int(0, s.extra + 1)));
      }
      await expectSplitsRight((e) => e.pagedSparseAttention(args), R.pagedSparseAttentionReference(args), s.n, s.hQ, s.wasm);
    });
  }

  test('wasm: a call split by heads whose worker dies rejects with WORKER_DIED, its staging comes back, the pool is whole and the next call is right; one disposed mid-call rejects with DISPOSED', async () => {
    const s = { sQ: 1, hQ: 128, dQK: 576, sKV: 3000, topk: 2400 };
    const args: SparsePrefillArgs = { ...randomPrefillArgs(rng, s, { invalidFraction: 0.2 }), attnSink: edgeSink(rng, s.hQ) };
    const settle = (p: Promise<unknown>) => p.then(() => 'resolved', (e: unknown) => (e instanceof SparseMlaError ? e.code : String(e)));
    // slabs handed to calls now (StagingArena's private count: heldBytes also counts the free slabs kept for reuse)
    const busy = (impl: WasmBackend) => (impl.staging as unknown as { busyBytes: number }).busyBytes;
    const engine = await createEngine({ backend: 'wasm', workers: 2 });
    try {
      const impl = engineBackend(engine) as WasmBackend;
      const labels: string[] = [];
      const off = impl.pool.testing.onDispatch((w, label) => {
        labels.push(label);
        if (label.endsWith(' heads 0..63')) void impl.pool.testing.terminateWorker(w); // as the task reaches it: surely in flight
      });
      expect(await settle(engine.sparsePrefill(args))).toBe('WORKER_DIED');
      off();
      expect(labels).toEqual(['sparsePrefill row 0 heads 0..63', 'sparsePrefill row 0 heads 64..127']);
      const t0 = Date.now();
      while ((impl.pool.testing.idleWorkers().length < 2 || busy(impl) > 0) && Date.now() - t0 < 20_000) await new Promise((r) => setTimeout(r, 10));
      expect(impl.pool.testing.idleWorkers()).toHaveLength(2);
      expect(busy(impl)).toBe(0);
      expectSameBits('after a worker died', await engine.sparsePrefill(args), await one.get('wasm')!.sparsePrefill(args));
    } finally {
      await engine.dispose();
    }
    const disposed = await createEngine({ backend: 'wasm', workers: 2 });
    const impl = engineBackend(disposed) as WasmBackend;
    impl.pool.testing.onDispatch((_, label) => {
      if (label.endsWith(' heads 0..63')) void disposed.dispose();
    });
    expect(await settle(disposed.sparsePrefill(args))).toBe('DISPOSED');
    expect(await settle(disposed.sparsePrefill(args))).toBe('DISPOSED');
    expect(impl.staging.heldBytes).toBe(0); // the call's slab given back, and dropped: the arena is closed
  });
});
