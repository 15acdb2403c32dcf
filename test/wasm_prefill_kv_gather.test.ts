/**
 * The wasm backend's sparsePrefill over a compact kv of only the rows its valid ids read
 * (src/backends/prefill_gather.ts). The plan, the id rewrite and the gather against an
 * independent reading of SPEC §4's validity rule; then the same calls read through the whole kv and
 * through a compact one give the same bits, within §4.1's bounds of the float64 reference, on fresh
 * random inputs and the edge cases (ids −1 and other negatives, ids ≥ sKV, topkLength < topk and 0,
 * duplicates, all-invalid rows, sQ 0, 1, 2 and 16, hQ 8, 64 and 128, dQK 512 and 576, 1, 2 and 3
 * workers); the estimate reads a compact kv for a few rows over a long kv, whose smaller copies
 * make the call worth more tasks (split by heads), and the whole kv where the ids cover it; the
 * gather is taken only where its bytes fit the budget, and whether a call is refused stays the
 * whole kv's (never its ids'); the plans the backend makes in its kept map of kv rows are the fresh
 * plans, call after call.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, tensor } from '../dist/index.js';
import type { Engine, SparsePrefillArgs } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import { wasmPrefillKvCopies, type WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import type { SparsePrefillJob } from '../dist/backends/backend.js';
import { inputBytes } from '../dist/backends/staging.js';
import { gatherKvRows, planKvRows, planPrefillGather, prefillGatherForTests, remapKvIndices, type KvRowPlan, type KvRowScratch } from '../dist/backends/prefill_gather.js';
import * as R from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { enginesByWorkers, expectGatherCase, expectSameBits, expectSamePlan, expectStagingTooLarge, expectWideAndInvalidIds, fewIdsOverBigKv, forced, gatherCase, gatherEngineCases, mixedIds, oneRowOverLongKv, rowsCoveringKv, threeWays } from './helpers/kv_gather.js';
import { randomBf16Bits, randomIndices, testRng } from './helpers/random.js';

const rng = testRng('wasm_prefill_kv_gather');

describe('plan, remap and gather against an independent reading of SPEC §4', () => {
  const shapes: Array<[sKV: number, sQ: number, topk: number, lengths: boolean]> = [
    [900, 13, 40, true],
    [50, 7, 120, false],
    [4000, 5, 300, true],
    [1, 3, 8, true],
    [700, 0, 16, false],
    [700, 5, 0, false],
    [0, 4, 10, true],
  ];
  for (const [sKV, sQ, topk, lengths] of shapes) {
    test(`sKV=${sKV}, sQ=${sQ}, topk=${topk}${lengths ? ', lengths' : ''}`, () => {
      const dQK = rng.pick([512, 576]);
      const kv = randomBf16Bits(rng, sKV * dQK);
      const indices = mixedIds(rng, sQ * topk, sKV);
      // lengths 0, below topk, at it, and past it and negative (the op clamps them to [0, topk] first; the gather clamps them too)
      const topkLength = lengths ? Int32Array.from({ length: sQ }, (_, i) => (i === 0 ? 0 : i === 1 ? topk + 3 : i === 2 ? -4 : rng.int(0, topk + 1))) : null;
      const rows = { indices, sQ, topk, topkLength, sKV };
      // the expected reads: entries k < min(max(length, 0), topk) with 0 <= id < sKV, nothing else
      const limit = (i: number) => (topkLength ? Math.min(Math.max(topkLength[i]!, 0), topk) : topk);
      const read = new Set<number>();
      for (let i = 0; i < sQ; i++) {
        for (let k = 0; k < limit(i); k++) {
          const id = indices[i * topk + k]!;
          if (id >= 0 && id < sKV) read.add(id);
        }
      }
      const expected = [...read].sort((a, b) => a - b);
      const plan = planKvRows(rows)!;
      expect(Array.from(plan.rows)).toEqual(expected);
      expect(plan.runs).toBe(expected.filter((id, j) => j === 0 || expected[j - 1] !== id - 1).length);
      // more distinct rows than allowed: no plan; exactly as many: the plan
      if (expected.length > 0) expect(planKvRows(rows, expected.length - 1)).toBeNull();
      expect(planKvRows(rows, expected.length)?.rows.length).toBe(expected.length);

      // written over stale contents, as in a reused slab
      const remapped = remapKvIndices(rows, plan, new Int32Array(sQ * topk).fill(12345));
      for (let i = 0; i < sQ; i++) {
        for (let k = 0; k < topk; k++) {
          const id = indices[i * topk + k]!;
          const got = remapped[i * topk + k]!;
          if (k < limit(i) && id >= 0 && id < sKV) expect(expected[got], `row ${i} entry ${k}`).toBe(id);
          else expect(got, `row ${i} entry ${k} (id ${id})`).toBe(-1);
        }
      }

      // every gathered row is its source's; filler after them shows nothing else is written
      const into = new Uint16Array((expected.length + 1) * dQK).fill(0xa5a5);
      gatherKvRows(kv, dQK, plan, into.subarray(0, expected.length * dQK));
      expected.forEach((id, j) => expect(Buffer.compare(Buffer.from(into.subarray(j * dQK, (j + 1) * dQK).slice().buffer), Buffer.from(kv.subarray(id * dQK, (id + 1) * dQK).slice().buffer)), `compact row ${j} (id ${id})`).toBe(0));
      expect(into.subarray(expected.length * dQK).every((v) => v === 0xa5a5)).toBe(true);
    });
  }
});

const WORKERS = [1, 2, 3] as const;

describe('wasm sparsePrefill through a compact kv: the whole kv\'s bits, within the reference\'s bounds', () => {
  const engines = enginesByWorkers('wasm', WORKERS);

  for (const c of gatherEngineCases(WORKERS)) {
    test(`sQ=${c.sQ}, hQ=${c.hQ}, dQK=${c.dQK}, ${c.workers} worker(s)`, async () => {
      const { args, allInvalid } = gatherCase(rng, c, (sKV, topk, allInvalid) => randomIndices(rng, c.sQ, topk, sKV, { invalidFraction: 0.2, duplicateFraction: 0.1, allInvalidRows: allInvalid }));
      expectGatherCase(await threeWays(engines.get(c.workers)!, args, false), args, allInvalid);
    }, 60_000);
  }

  test('int64 ids (out-of-range ones made −1 by the op) and every entry invalid: the same bits both ways', async () => {
    const engine = engines.get(2)!;
    await expectWideAndInvalidIds(rng, (args) => threeWays(engine, args, false));
  }, 60_000);

  test('the estimate: one row of 512 ids over a 32K-row kv reads a compact kv, and its smaller copies make it worth a task per worker (split by heads) where the whole kv ran as one; ids that cover a kv read it whole', async () => {
    const engine = engines.get(2)!;
    const backend = engineBackend(engine) as WasmBackend;
    const labels: string[] = [];
    const stop = backend.pool.testing.onDispatch((_, l) => labels.push(l));
    try {
      const args = oneRowOverLongKv(rng);
      prefillGatherForTests.force = 'whole';
      const whole = await engine.sparsePrefill(args);
      expect(labels.splice(0)).toEqual(['sparsePrefill rows 0..0']);
      prefillGatherForTests.force = null;
      const before = prefillGatherForTests.gatheredCalls;
      const auto = await engine.sparsePrefill(args);
      expect(prefillGatherForTests.gatheredCalls - before).toBe(1);
      expect(labels.splice(0).sort()).toEqual(['sparsePrefill row 0 heads 0..31', 'sparsePrefill row 0 heads 32..63']);
      expectSameBits('split compact vs one-task whole', auto, whole);
      expectWithinBounds('compact, split by heads', auto, R.sparsePrefillReference(args), [0]);

      // 8 rows, each reading every row of a 1024-row kv: nothing to leave out, read whole
      const dense = rowsCoveringKv(rng);
      const denseBefore = prefillGatherForTests.gatheredCalls;
      await engine.sparsePrefill(dense);
      expect(prefillGatherForTests.gatheredCalls).toBe(denseBefore);
    } finally {
      prefillGatherForTests.force = null;
      stop();
    }
  }, 60_000);
});

describe('wasm sparsePrefill gather and the memory budget', () => {
  const MiB = 2 ** 20;
  afterAll(() => {
    prefillGatherForTests.force = null;
  });
  const engineWithBudget = (budget: number) => createEngine({ backend: 'wasm', workers: 2, memoryBudgetBytes: budget });

  test('a gather whose bytes (its plan, the compact kv and ids) do not fit the budget is not taken: the call reads the whole shared kv, as counted, with the same bits', async () => {
    const sKV = 16384, sQ = 4, hQ = 2, dQK = 512, topk = 1024;
    const shared = new Uint16Array(new SharedArrayBuffer(sKV * dQK * 2));
    shared.set(randomBf16Bits(rng, sKV * dQK));
    const args: SparsePrefillArgs = {
      q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
      kv: tensor('bf16', [sKV, dQK], shared),
      indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, { invalidFraction: 0.1 })),
      smScale: 0.05,
    };
    // a compact kv of ~3,600 rows (3.6 MiB): over a 1 MiB budget, within an 8 MiB one; the whole kv is read in place (no bytes)
    const small = await engineWithBudget(MiB), large = await engineWithBudget(8 * MiB);
    try {
      prefillGatherForTests.force = 'compact';
      const before = prefillGatherForTests.gatheredCalls;
      const tight = await small.sparsePrefill(args);
      expect(prefillGatherForTests.gatheredCalls, 'gathered past the budget').toBe(before);
      const roomy = await large.sparsePrefill(args);
      expect(prefillGatherForTests.gatheredCalls, 'not gathered within the budget').toBe(before + 1);
      expectSameBits('whole (budget) vs compact', tight, roomy);
      expectWithinBounds('shared kv', roomy, R.sparsePrefillReference(args), [0, 1, 2, 3]);
    } finally {
      prefillGatherForTests.force = null;
      await small.dispose();
      await large.dispose();
    }
  }, 60_000);

  test('whether a call is refused is the whole kv\'s, not its ids\': an unshared kv whose staging is over the budget is TOO_LARGE before any work even where two rows of 16 ids would gather into a few KiB', async () => {
    const engine = await engineWithBudget(MiB);
    const labels: string[] = [];
    const stop = (engineBackend(engine) as WasmBackend).pool.testing.onDispatch((_, l) => labels.push(l));
    try {
      const args = fewIdsOverBigKv(rng);
      for (const force of [null, 'compact'] as const) {
        const { r: e, gathered } = await forced(force, () => engine.sparsePrefill(args).catch((x: unknown) => x));
        expectStagingTooLarge(e);
        expect(gathered).toBe(0);
      }
      expect(labels).toEqual([]);
    } finally {
      prefillGatherForTests.force = null;
      stop();
      await engine.dispose();
    }
  }, 60_000);
});

describe("the wasm backend's plans in its kept map of kv rows", () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ backend: 'wasm', workers: 2 });
  });
  afterAll(async () => {
    prefillGatherForTests.force = null;
    await engine.dispose();
  });

  test('equal fresh plans over kvs long and short, by the estimate and forced, plans given up past their bound among them', () => {
    const backend = engineBackend(engine) as WasmBackend;
    // the backend's sparsePrefill plans as this does, in its own kept map
    const kept = (backend as unknown as { kvRows: KvRowScratch }).kvRows;
    const planKept = (job: SparsePrefillJob, sizes: ReturnType<typeof inputBytes>[], wholeTasks: number): KvRowPlan | null =>
      planPrefillGather(job, sizes, backend.memoryBudgetBytes, wasmPrefillKvCopies(sizes, wholeTasks, backend.workers), kept);
    // long kvs where a few rows' ids gather; short ones and many ids, where the estimate gives up part way, having set part of the map
    const lengths = [131072, 50, 20000, 700, 1, 32768, 4096, 0, 9000, 600];
    let gathered = 0, givenUp = 0;
    try {
      for (let call = 0; call < 80; call++) {
        const sKV = lengths[call % lengths.length]!;
        const dQK = rng.pick([512, 576]);
        const hQ = 8;
        const sQ = rng.pick([0, 1, 2, 3, 16]), topk = rng.pick([0, 8, 64, 300, 512]);
        const kv = new Uint16Array(sKV * dQK);
        const indices = mixedIds(rng, sQ * topk, sKV);
        const topkLength = rng.uniform() < 0.5 ? Int32Array.from({ length: sQ }, () => rng.int(-2, topk + 3)) : null;
        const job: SparsePrefillJob = { q: new Uint16Array(sQ * hQ * dQK), kv, indices, topkLength, attnSink: null, sQ, hQ, dQK, dV: 512, sKV, topk, smScale: 1 };
        const sizes = [job.q, job.kv, job.indices, job.topkLength, job.attnSink].map(inputBytes);
        const wholeTasks = rng.int(1, 4);
        prefillGatherForTests.force = call % 4 === 0 ? 'compact' : null;
        const fresh = planPrefillGather(job, sizes, backend.memoryBudgetBytes, wasmPrefillKvCopies(sizes, wholeTasks, backend.workers));
        const kept = planKept(job, sizes, wholeTasks);
        if (!fresh) {
          expect(kept, `call ${call} (sKV ${sKV}, ${sQ} x ${topk})`).toBeNull();
          givenUp++;
          continue;
        }
        gathered++;
        expect(kept, `call ${call} (sKV ${sKV}, ${sQ} x ${topk})`).not.toBeNull();
        expectSamePlan(`call ${call}`, kept!, fresh, job);
      }
    } finally {
      prefillGatherForTests.force = null;
    }
    // both kinds of call came up
    expect(gathered).toBeGreaterThan(10);
    expect(givenUp).toBeGreaterThan(10);
  });
});
