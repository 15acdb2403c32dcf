/**
 * The cpu backend's sparsePrefill over a compact kv of only the rows its valid ids read
 * (src/backends/prefill_gather.ts, gathered at the call into the staging). The same calls read
 * through the whole kv, through a compact one (forced) and as the estimate picks give the same
 * bits, within §4.1's bounds of the float64 reference, on fresh random inputs and the edge cases
 * (ids −1 and other negatives, ids ≥ sKV, duplicates, topkLength < topk and 0, all-invalid rows,
 * int64 ids, sQ 0, 1, 2 and 16, hQ 8, 64 and 128, dQK 512 and 576, 1, 2 and 3 threads); a kv in
 * shared memory is read in place, never gathered; the estimate gathers a few rows of a long kv and
 * reads a kv its ids cover whole; the gather is taken only where its bytes fit the budget, and
 * whether a call is refused stays the whole kv's; the caller's kv and ids are read at the call, so
 * rewriting them once the call has returned its promise changes nothing, whether or not the
 * staging was free; the plans made in the backend's reused scratch are the fresh plans, call after
 * call. The engine tests are skipped where the native addon is not built.
 */
import { afterAll, describe, expect, test } from 'vitest';
import { createEngine, tensor } from '../dist/index.js';
import type { Engine, SparsePrefillArgs } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import { cpuPrefillKvCopies, type CpuBackend } from '../dist/backends/native/cpu_backend.js';
import type { SparsePrefillJob } from '../dist/backends/backend.js';
import { inputBytes } from '../dist/backends/staging.js';
import { KvRowScratch, planKvRows, planPrefillGather, prefillGatherForTests } from '../dist/backends/prefill_gather.js';
import * as R from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { expectWithinBounds } from './helpers/judge.js';
import { enginesByWorkers, expectGatherCase, expectSameBits, expectSamePlan, expectStagingTooLarge, expectWideAndInvalidIds, fewIdsOverBigKv, forced, gatherCase, gatherEngineCases, mixedIds, oneRowOverLongKv, rowsCoveringKv, threeWays, type Outputs } from './helpers/kv_gather.js';
import { invalidFillers, randomBf16Bits, randomIndices, testRng } from './helpers/random.js';

const rng = testRng('cpu_prefill_kv_gather');
const ADDON = nativeAddonBuilt();

/** A copy of `a` in a SharedArrayBuffer. */
function shared<T extends Uint16Array | Int32Array>(a: T): T {
  const s = new (a.constructor as new (b: SharedArrayBuffer) => T)(new SharedArrayBuffer(a.byteLength));
  s.set(a as never);
  return s;
}

test('plans in a reused scratch (a map left all zero from plan to plan) are the fresh plans, over kvs long and short, plans cut short by a bound among them', () => {
  const scratch = new KvRowScratch();
  const lengths = [3000, 50, 20000, 700, 1, 20000, 4096, 0, 9000];
  for (let call = 0; call < 60; call++) {
    const sKV = lengths[call % lengths.length]!;
    const sQ = rng.int(0, 9), topk = rng.int(0, 300);
    const indices = mixedIds(rng, sQ * topk, sKV);
    const topkLength = rng.uniform() < 0.5 ? Int32Array.from({ length: sQ }, () => rng.int(-2, topk + 3)) : null;
    const rows = { indices, sQ, topk, topkLength, sKV };
    const fresh = planKvRows(rows);
    // a third of the plans bounded below their rows: null, having set part of the map
    const bound = fresh && fresh.rows.length > 1 && call % 3 === 0 ? rng.int(0, fresh.rows.length) : Infinity;
    const reused = planKvRows(rows, bound, scratch);
    if (bound !== Infinity) {
      expect(reused, `call ${call}: past its bound`).toBeNull();
      continue;
    }
    expect(reused, `call ${call}`).not.toBeNull();
    expectSamePlan(`call ${call}`, reused!, fresh!, rows);
  }
});

const THREADS = [1, 2, 3] as const;

describe.runIf(ADDON)("cpu sparsePrefill through a compact kv: the whole kv's bits, within the reference's bounds", () => {
  const engines = enginesByWorkers('cpu', THREADS);

  for (const c of gatherEngineCases(THREADS)) {
    test(`sQ=${c.sQ}, hQ=${c.hQ}, dQK=${c.dQK}, ${c.workers} thread(s)`, async () => {
      const { args, allInvalid } = gatherCase(rng, c, (sKV, topk, allInvalid) => {
        const indices = mixedIds(rng, c.sQ * topk, sKV);
        for (const i of allInvalid) for (let k = 0; k < topk; k++) indices[i * topk + k] = rng.pick(invalidFillers(sKV));
        return indices;
      });
      expectGatherCase(await threeWays(engines.get(c.workers)!, args, true), args, allInvalid);
    }, 60_000);
  }

  test('int64 ids (out-of-range ones made −1 by the op) and every entry invalid: the same bits each way', async () => {
    const engine = engines.get(2)!;
    await expectWideAndInvalidIds(rng, (args) => threeWays(engine, args, true));
  }, 60_000);

  test('the estimate: one row of 512 ids over a 32K-row kv gathers; 8 rows that each read every row of a 1024-row kv read it whole', async () => {
    const engine = engines.get(2)!;
    const sparse = oneRowOverLongKv(rng);
    const whole = await forced('whole', () => engine.sparsePrefill(sparse));
    const auto = await forced(null, () => engine.sparsePrefill(sparse));
    expect(auto.gathered, 'a few rows of a long kv: gathered').toBe(1);
    expectSameBits('estimate (compact) vs whole', auto.r, whole.r);
    expectWithinBounds('estimate (compact)', auto.r, R.sparsePrefillReference(sparse), [0]);

    const dense = rowsCoveringKv(rng);
    const covered = await forced(null, () => engine.sparsePrefill(dense));
    expect(covered.gathered, 'ids that cover the kv: read whole').toBe(0);
    expectWithinBounds('estimate (whole)', covered.r, R.sparsePrefillReference(dense), [0, 1, 2, 3, 4, 5, 6, 7]);
  }, 60_000);

  test('a kv in shared memory is read in place: never gathered, even forced; the same bits as its unshared copy gathered', async () => {
    const engine = engines.get(3)!;
    const sQ = 2, hQ = 16, dQK = 512, sKV = 8192, topk = 64;
    const args: SparsePrefillArgs = {
      q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
      kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
      indices: tensor('int32', [sQ, topk], mixedIds(rng, sQ * topk, sKV)),
      smScale: 0.05,
    };
    const inPlace: SparsePrefillArgs = { ...args, kv: tensor('bf16', [sKV, dQK], shared(args.kv.data as Uint16Array)) };
    for (const force of [null, 'compact'] as const) {
      const s = await forced(force, () => engine.sparsePrefill(inPlace));
      expect(s.gathered, `shared kv, force ${force}: gathered`).toBe(0);
      const u = await forced('compact', () => engine.sparsePrefill(args));
      expect(u.gathered).toBe(1);
      expectSameBits(`shared kv (${force}) vs unshared gathered`, s.r, u.r);
    }
    expectWithinBounds('shared kv', (await engine.sparsePrefill(inPlace)) as Outputs, R.sparsePrefillReference(args), [0, 1]);
  }, 60_000);
});

describe.runIf(ADDON)('cpu sparsePrefill gather: the kv and ids are read at the call (SPEC §9)', () => {
  afterAll(() => {
    prefillGatherForTests.force = null;
  });

  /** The call made, then its kv and ids rewritten (after `between`, before it settles): the result of the arguments as they were at the call. */
  async function rewrittenAfterCall(engine: Engine, args: SparsePrefillArgs, force: 'compact' | null, between: () => void = () => {}): Promise<{ r: Outputs; gathered: number }> {
    return forced(force, async () => {
      const p = engine.sparsePrefill(args);
      (args.kv.data as Uint16Array).fill(0x7f80); // +inf everywhere
      (args.indices.data as Int32Array).reverse();
      between();
      return p;
    });
  }

  function freshArgs(sQ: number, hQ: number, dQK: number, sKV: number, topk: number): SparsePrefillArgs {
    return {
      q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
      kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
      indices: tensor('int32', [sQ, topk], mixedIds(rng, sQ * topk, sKV)),
      smScale: 1 / Math.sqrt(dQK),
    };
  }

  const copyOf = (a: SparsePrefillArgs): SparsePrefillArgs => ({ ...a, kv: tensor('bf16', a.kv.shape, (a.kv.data as Uint16Array).slice()), indices: tensor('int32', a.indices.shape, (a.indices.data as Int32Array).slice()) });

  test('the staging free: kv and ids rewritten once the call returned its promise change nothing, gathered or read whole', async () => {
    const engine = await createEngine({ backend: 'cpu', workers: 2 });
    try {
      for (const force of ['compact', null] as const) {
        const args = freshArgs(3, 64, 576, 20000, 256);
        const untouched = copyOf(args);
        const want = await forced('whole', () => engine.sparsePrefill(untouched));
        const got = await rewrittenAfterCall(engine, args, force);
        expect(got.gathered, `force ${force}: gathered`).toBe(1);
        expectSameBits(`force ${force}: rewritten after the call vs untouched`, got.r, want.r);
        expectWithinBounds(`force ${force}`, got.r, R.sparsePrefillReference(untouched), [0, 1, 2]);
      }
    } finally {
      await engine.dispose();
    }
  }, 60_000);

  test('the staging all held by another call: the gather still reads the kv and ids at the call (a lent slab, no waiting), then gives the slab back', async () => {
    const engine = await createEngine({ backend: 'cpu', workers: 2, memoryBudgetBytes: 64 << 20 });
    const staging = (engineBackend(engine) as CpuBackend).staging;
    try {
      const args = freshArgs(2, 32, 512, 16384, 128);
      const untouched = copyOf(args);
      const want = await forced('whole', () => engine.sparsePrefill(untouched));
      const held = await staging.acquire(staging.capacityBytes);
      let released = false;
      const release = () => {
        if (!released) staging.release(held);
        released = true;
      };
      try {
        const got = await rewrittenAfterCall(engine, args, 'compact', () => setTimeout(release, 20));
        expect(got.gathered).toBe(1);
        expectSameBits('gathered while the staging was held', got.r, want.r);
      } finally {
        release();
      }
      expect(staging.lentBytes).toBe(0);
    } finally {
      await engine.dispose();
    }
  }, 60_000);
});

describe.runIf(ADDON)('cpu sparsePrefill gather and the memory budget', () => {
  const MiB = 2 ** 20;
  afterAll(() => {
    prefillGatherForTests.force = null;
  });
  const align = (n: number) => Math.ceil(n / 64) * 64;

  test("the gather's bytes: its plan, the compact kv, the ids, q, lengths and sink where unshared, the outputs; taken at exactly that budget, not a byte below", () => {
    const sQ = 3, hQ = 8, dQK = 576, dV = 512, sKV = 5000, topk = 200;
    const kv = randomBf16Bits(rng, sKV * dQK);
    const indices = mixedIds(rng, sQ * topk, sKV);
    const topkLength = Int32Array.from([topk, 17, 0]);
    const job: SparsePrefillJob = { q: randomBf16Bits(rng, sQ * hQ * dQK), kv, indices, topkLength, attnSink: null, sQ, hQ, dQK, dV, sKV, topk, smScale: 0.1 };
    const sizes = [job.q, job.kv, job.indices, job.topkLength, job.attnSink].map(inputBytes);
    const read = new Set<number>();
    for (let i = 0; i < sQ; i++) for (let k = 0; k < Math.min(topkLength[i]!, topk); k++) if (indices[i * topk + k]! >= 0 && indices[i * topk + k]! < sKV) read.add(indices[i * topk + k]!);
    const m = read.size;
    const bytes = align(m * dQK * 2) + align(sQ * topk * 4) + align(sQ * hQ * dQK * 2) + align(sQ * 4) + (4 * sKV + 4 * Math.min(sKV, sQ * topk)) + sQ * hQ * (dV * 2 + 8);
    try {
      prefillGatherForTests.force = 'compact';
      expect(planPrefillGather(job, sizes, bytes, cpuPrefillKvCopies)?.rows.length).toBe(m);
      expect(planPrefillGather(job, sizes, bytes - 1, cpuPrefillKvCopies)).toBeNull();
      prefillGatherForTests.force = null;
      expect(planPrefillGather(job, sizes, bytes, cpuPrefillKvCopies)?.rows.length, 'the estimate, within the budget').toBe(m);
      expect(planPrefillGather(job, sizes, bytes - 1, cpuPrefillKvCopies), 'the estimate, past the budget').toBeNull();
    } finally {
      prefillGatherForTests.force = null;
    }
  });

  test('the estimate over a 128K x 576 kv: 16 rows of 512 scattered ids gather, 16 rows of 2048 (about 29K scattered rows in some 22K runs) read it whole', () => {
    const sKV = 131072, dQK = 576, hQ = 64;
    const sizes = [{ unshared: 16 * hQ * dQK * 2, callCopy: 0 }, { unshared: sKV * dQK * 2, callCopy: 0 }, { unshared: 0, callCopy: 0 }, { unshared: 0, callCopy: 0 }, { unshared: 0, callCopy: 0 }];
    const jobOf = (topk: number): SparsePrefillJob => ({ q: new Uint16Array(0), kv: new Uint16Array(0), indices: randomIndices(rng, 16, topk, sKV), topkLength: null, attnSink: null, sQ: 16, hQ, dQK, dV: 512, sKV, topk, smScale: 0.05 });
    expect(planPrefillGather(jobOf(512), sizes, 2 ** 40, cpuPrefillKvCopies)).not.toBeNull();
    expect(planPrefillGather(jobOf(2048), sizes, 2 ** 40, cpuPrefillKvCopies)).toBeNull();
  });

  test("whether a call is refused is the whole kv's, not its ids': an unshared kv whose staging is over the budget is TOO_LARGE before any work, even where two rows of 16 ids would gather into a few KiB", async () => {
    const engine = await createEngine({ backend: 'cpu', workers: 2, memoryBudgetBytes: MiB });
    try {
      const args = fewIdsOverBigKv(rng);
      for (const force of [null, 'compact'] as const) {
        const { r: e, gathered } = await forced(force, () => engine.sparsePrefill(args).catch((x: unknown) => x));
        expectStagingTooLarge(e);
        expect(gathered).toBe(0);
      }
      // a budget the whole kv fits: the same call runs, gathered
      const roomy = await createEngine({ backend: 'cpu', workers: 2, memoryBudgetBytes: 8 * MiB });
      try {
        const ok = await forced(null, () => roomy.sparsePrefill(args));
        expect(ok.gathered).toBe(1);
        expectWithinBounds('within the budget', ok.r, R.sparsePrefillReference(args), [0, 1]);
      } finally {
        await roomy.dispose();
      }
    } finally {
      await engine.dispose();
    }
  }, 60_000);
});
