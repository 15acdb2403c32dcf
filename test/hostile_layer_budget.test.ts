/**
 * Hostile input on the host backends: a layer over the engine's memoryBudgetBytes, its plan's
 * engine a Proxy, its plan's methods called unbound. A host layer whose ops cannot fit the budget
 * is TOO_LARGE at the call, before any op or any plan work (the combine, the workspace, the paged
 * form); one whose ops all fit runs. Each budget edge is found from the library's own refusals
 * ("needs N bytes"): the layer is refused at N − 1 with nothing run, and runs at the least budget it
 * is not refused at, with the bits of the same layer on an engine of the default budget.
 */
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, tensor } from '../dist/index.js';
import type { Engine, KvCache, Plan, PrefillLayerArgs } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import { pagedReadForTests } from '../dist/backends/paged_gather.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { errorOf } from './helpers/errors.js';
import { plannerCalls } from './helpers/planner_calls.js';
import { expectWithinBounds } from './helpers/judge.js';
import { paddedCache, planWork, spyOps } from './helpers/layer_work.js';

const rng = testRng('hostile_layer_budget');
const addonBuilt = existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || 'build/addon/Release/sparse_mla_native.node');
const backends = addonBuilt ? (['cpu', 'wasm'] as const) : (['wasm'] as const);
const MiB = 2 ** 20;
const D = 512;

const roomy = new Map<string, Engine>();
beforeAll(async () => {
  for (const b of backends) roomy.set(b, await createEngine({ backend: b, workers: 2 }));
});
afterAll(async () => {
  for (const e of roomy.values()) await e.dispose();
});

/** A copy of a cache in a SharedArrayBuffer (read in place by the ops). */
function sharedCache(c: KvCache): KvCache {
  const data = new Uint8Array(new SharedArrayBuffer(c.data.byteLength));
  data.set(c.data);
  return { ...c, data };
}

/**
 * Raises the budget from 1 MiB to what each refusal says the layer needs until it runs; every
 * refusal must come before any op and any plan work. Returns the least budget it ran at and the
 * refusals' needs.
 */
async function budgetEdge(backend: 'cpu' | 'wasm', makePlan: () => Plan, args: (plan: Plan) => PrefillLayerArgs): Promise<{ budget: number; needs: number[] }> {
  const expected = await prefillLayer(roomy.get(backend)!, args(makePlan()));
  let budget = MiB;
  const needs: number[] = [];
  for (let attempt = 0; attempt < 8; attempt++) {
    const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: budget });
    try {
      const plan = makePlan();
      const spy = spyOps(engineBackend(engine));
      const before = planWork(plan.stats);
      const e = await errorOf(() => prefillLayer(engine, args(plan)));
      if (e === undefined) {
        const r = await prefillLayer(engine, args(plan));
        expect(Buffer.from(r.out.data.buffer, r.out.data.byteOffset, r.out.data.byteLength).equals(Buffer.from(expected.out.data.buffer, expected.out.data.byteOffset, expected.out.data.byteLength))).toBe(true);
        expect(Array.from(r.lse.data)).toEqual(Array.from(expected.lse.data));
        return { budget, needs };
      }
      expect(e, String(e)).toBeInstanceOf(SparseMlaError);
      expect((e as SparseMlaError).code).toBe('TOO_LARGE');
      expect(spy.calls, `refused at a budget of ${budget} after ops ran: ${(e as Error).message}`).toEqual([]);
      expect(planWork(plan.stats), `refused at a budget of ${budget} after the plan's work: ${(e as Error).message}`).toEqual(before);
      const need = Number(/needs (\d+) bytes/.exec((e as Error).message)?.[1]);
      expect(need).toBeGreaterThan(budget);
      needs.push(need);
      budget = need;
    } finally {
      await engine.dispose();
    }
  }
  throw new Error(`no budget up to ${budget} ran the layer`);
}

/** The layer at `budget`: refused before any op and any plan work. */
async function expectRefusedFirst(backend: 'cpu' | 'wasm', budget: number, plan: Plan, args: PrefillLayerArgs): Promise<void> {
  const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: budget });
  try {
    const spy = spyOps(engineBackend(engine));
    const before = planWork(plan.stats);
    const e = await errorOf(() => prefillLayer(engine, args));
    expect(e instanceof SparseMlaError && e.code, String(e)).toBe('TOO_LARGE');
    expect(spy.calls).toEqual([]);
    expect(planWork(plan.stats)).toEqual(before);
  } finally {
    await engine.dispose();
  }
}

/**
 * The op a layer runs, on its own (the public op), refused at `budget` − 1 and run at `budget`: the
 * layer's edge is the op's own, so the layer refuses nothing its ops would have run.
 */
async function expectOpEdge(backend: 'cpu' | 'wasm', budget: number, op: (engine: Engine) => Promise<unknown>): Promise<void> {
  for (const [b, fits] of [[budget - 1, false], [budget, true]] as const) {
    const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: b });
    try {
      const e = await errorOf(() => op(engine));
      if (fits) expect(e, `the op alone at the layer's edge ${b}`).toBeUndefined();
      else expect(e instanceof SparseMlaError && e.code, `the op alone at ${b}: ${String(e)}`).toBe('TOO_LARGE');
    } finally {
      await engine.dispose();
    }
  }
}

describe.each(backends)('%s: a layer over memoryBudgetBytes is TOO_LARGE before any work', (backend) => {
  test('workspace path, c4 layer of a long request: its dequant of the c4 rows needs more than the budget (was refused by the dequant, after the combine and the workspace)', async () => {
    const seqLen = rng.int(7000, 9000);
    const sc = randomScenario(rng, [seqLen], [2]);
    const hQ = 1;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
    const c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const q = tensor('bf16', [2, hQ, D], randomBf16Bits(rng, 2 * hQ * D, 1));
    const topk = randomTopk(rng, sc, 64);
    const args = (plan: Plan): PrefillLayerArgs => ({ plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, smScale: 0.04, path: 'sparse' });
    const { budget, needs } = await budgetEdge(backend, () => createPlan(sc.chunk), args);
    expect(needs.length).toBeGreaterThan(0);
    // just under: refused with nothing run; at the edge it ran (budgetEdge)
    await expectRefusedFirst(backend, budget - 1, createPlan(sc.chunk), args(createPlan(sc.chunk)));
    // the op that needs the most: the dequant of the c4 rows
    const ids = createPlan(sc.chunk).compressedTokenIds(4);
    await expectOpEdge(backend, budget, (engine) => engine.dequantizeKCachePaged({ cache: c4, tokenIds: ids }));
  }, 60_000);

  test('paged path, c4 layer of a wide top-k in shared caches: its paged op needs more than the budget (was refused by the op, after the combine and the paged form)', async () => {
    const sc = randomScenario(rng, [rng.int(2000, 3000)], [2]);
    const hQ = 1;
    const swa = sharedCache(randomCache(rng, sc.swaPageSize, sc.swaPages));
    const c4 = sharedCache(randomCache(rng, sc.c4PageSize, sc.c4Pages));
    // q in shared memory too (read in place by the layer and by the op alone alike)
    const qShared = new Uint16Array(new SharedArrayBuffer(2 * hQ * D * 2));
    qShared.set(randomBf16Bits(rng, 2 * hQ * D, 1));
    const q = tensor('bf16', [2, hQ, D], qShared);
    const topk = randomTopk(rng, sc, rng.int(150_000, 200_000));
    const args = (plan: Plan): PrefillLayerArgs => ({ plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, smScale: 0.04, path: 'paged' });
    // the op reads the caches whole (in place, they are shared): what the layer's bound counts exactly
    pagedReadForTests.force = 'whole';
    try {
      const { budget, needs } = await budgetEdge(backend, () => createPlan(sc.chunk), args);
      expect(needs.length).toBeGreaterThan(0);
      await expectRefusedFirst(backend, budget - 1, createPlan(sc.chunk), args(createPlan(sc.chunk)));
      const plan = createPlan(sc.chunk);
      const form = plan.pagedForm(plan.combineC4(topk));
      await expectOpEdge(backend, budget, (engine) =>
        engine.pagedSparseAttention({ q, kCache: swa, indices: form.main, topkLength: form.mainLengths, extraKCache: c4, extraIndices: form.extra!, extraTopkLength: form.extraLengths!, smScale: 0.04 }),
      );
    } finally {
      pagedReadForTests.force = null;
    }
  }, 60_000);

  test.each([4, 0, 128] as const)('paged path, c%i layer over caches not in shared memory, far larger than what it reads: its op reads compact caches of the tokens its ids name, counted exactly at the call, with a fresh plan or one that keeps the paged form (the layer counted a compact cache at its least, and was refused by the op after the combine and the paged form)', async (ratio) => {
    const sc = randomScenario(rng, [rng.int(2000, 3000)], [rng.int(8, 12)]);
    const hQ = 128;
    // the ids read a few hundred tokens of each cache: the op gathers them into compact caches
    const swa = paddedCache(randomCache(rng, sc.swaPageSize, sc.swaPages), rng.int(48, 64));
    const compressed = ratio === 4 ? paddedCache(randomCache(rng, sc.c4PageSize, sc.c4Pages), rng.int(24, 32)) : ratio === 128 ? paddedCache(randomCache(rng, sc.c128PageSize, sc.c128Pages), rng.int(24, 32)) : undefined;
    const caches = ratio === 4 ? { swa, c4: compressed } : ratio === 128 ? { swa, c128: compressed } : { swa };
    // q in shared memory (read in place by the layer and by the op alone alike)
    const nq = sc.numQueries;
    const qShared = new Uint16Array(new SharedArrayBuffer(nq * hQ * D * 2));
    qShared.set(randomBf16Bits(rng, nq * hQ * D, 1));
    const q = tensor('bf16', [nq, hQ, D], qShared);
    const topk = ratio === 4 ? randomTopk(rng, sc, rng.int(32, 96)) : undefined;
    const smScale = 0.04;
    const args = (plan: Plan): PrefillLayerArgs => ({ plan, compressRatio: ratio, q, caches, ...(topk ? { topkIndices: topk } : {}), smScale, path: 'paged' });
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, ...(topk ? { topkIndices: topk } : {}), smScale });
    const { budget, needs } = await budgetEdge(backend, () => createPlan(sc.chunk), args);
    expect(needs.length).toBeGreaterThan(0);
    // just under: refused with nothing run; exactly at it: runs, its op reading every set compact
    const label = `${backend} c${ratio} paged compact`;
    await expectRefusedFirst(backend, budget - 1, createPlan(sc.chunk), args(createPlan(sc.chunk)));
    const fresh = createPlan(sc.chunk);
    const built = await plannerCalls(async () => expect(await expectRunsAt(backend, budget, args(fresh), ref, label)).toBe(ratio === 0 ? 1 : 2));
    // the check peeked the paged form (the ids decide), and the layer ran with it: each part built once (a c4 layer's combine was run twice), counted once
    expect(built, label).toEqual({ combineTopk: ratio === 4 ? 1 : 0, denseRows: ratio === 4 ? 0 : 1, compressedTokenIds: ratio === 0 ? 0 : 1, pagedForm: 1 });
    expect(planWork(fresh.stats), label).toEqual([ratio === 4 ? 1 : 0, ratio === 0 ? 1 : 0, ratio === 128 ? 1 : 0, 1, ratio === 0 ? 0 : 1, 0]);
    // the same edge with a plan that keeps what the layer reads (its paged form, its rows), read by the check as it is
    const kept = createPlan(sc.chunk);
    await prefillLayer(roomy.get(backend)!, args(kept));
    await expectRefusedFirst(backend, budget - 1, kept, args(kept));
    const keptBefore = planWork(kept.stats);
    const keptBuilt = await plannerCalls(async () => expect(await expectRunsAt(backend, budget, args(kept), ref, `${label}, kept form`)).toBe(ratio === 0 ? 1 : 2));
    // a c4 layer combines its own top-k and builds its extra set, once; a c0 / c128 layer builds nothing
    expect(keptBuilt, `${label}, kept form`).toEqual({ combineTopk: ratio === 4 ? 1 : 0, denseRows: 0, compressedTokenIds: 0, pagedForm: ratio === 4 ? 1 : 0 });
    expect(planWork(kept.stats), `${label}, kept form`).toEqual(ratio === 4 ? [keptBefore[0]! + 1, 0, 0, 1, keptBefore[4]! + 1, 0] : keptBefore);
    // the layer's edge is its op's own (the op alone over the same form, caches and q)
    const plan = createPlan(sc.chunk);
    const form = plan.pagedForm(ratio === 4 ? plan.combineC4(topk!) : plan.combinedRows(ratio));
    const extra = compressed !== undefined ? { extraKCache: compressed, extraIndices: form.extra!, extraTopkLength: form.extraLengths! } : {};
    await expectOpEdge(backend, budget, (engine) => engine.pagedSparseAttention({ q, kCache: swa, indices: form.main, topkLength: form.mainLengths, ...extra, smScale }));
  }, 120_000);
});

/**
 * The layer at exactly `budget` on a fresh engine: it runs, within SPEC §4's bounds of the float64
 * reference, and gives the number of index sets its paged op read through compact caches.
 */
async function expectRunsAt(backend: 'cpu' | 'wasm', budget: number, args: PrefillLayerArgs, ref: ReturnType<typeof prefillLayerReference>, label: string): Promise<number> {
  const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: budget });
  try {
    const compactBefore = pagedReadForTests.compactSets;
    const r = await prefillLayer(engine, args);
    const compactSets = pagedReadForTests.compactSets - compactBefore;
    expectWithinBounds(`${label} at a budget of ${budget}`, r, ref, Array.from({ length: args.plan.numQueries }, (_, i) => i));
    expect(r.dropped).toBe(ref.dropped);
    return compactSets;
  } finally {
    await engine.dispose();
  }
}

describe('engines and plans are what they say', () => {
  test('an engine argument is an engine createEngine() made: a Proxy of one (which passes instanceof) or an object inheriting from one is INVALID_VALUE naming it, before any work', async () => {
    const sc = randomScenario(rng, [rng.int(20, 300)], [rng.int(1, 4)]);
    const plan = createPlan(sc.chunk);
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
    const q = tensor('bf16', [plan.numQueries, 2, D], randomBf16Bits(rng, plan.numQueries * 2 * D, 1));
    const args: PrefillLayerArgs = { plan, compressRatio: 0, q, caches: { swa }, smScale: 0.04 };
    for (const b of backends) {
      const engine = roomy.get(b)!;
      const reached = new Set<string | symbol>();
      const proxy = new Proxy(engine, {
        get(target, key, receiver) {
          reached.add(key);
          return Reflect.get(target, key, receiver);
        },
      });
      for (const fake of [proxy, Object.create(engine) as Engine]) {
        const e = await errorOf(() => prefillLayer(fake, args));
        expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, String(e)).toEqual({ code: 'INVALID_VALUE', argument: 'engine' });
        const sharded = createShardedPlan(sc.chunk, { shards: 2, split: 'heads' });
        const es = await errorOf(() => prefillLayerSharded([engine, fake], { plan: sharded, compressRatio: 0, q, caches: { swa }, smScale: 0.04 }));
        expect(es instanceof SparseMlaError && { code: es.code, argument: es.argument }, String(es)).toEqual({ code: 'INVALID_VALUE', argument: 'engines[1]' });
      }
      // nothing of the engine was used: only what the error message describes (a tensor's dtype)
      expect([...reached].filter((k) => k !== 'dtype')).toEqual([]);
      // the engine itself runs the layer
      expect((await prefillLayer(engine, args)).out.shape).toEqual([plan.numQueries, 2, D]);
    }
  });

  test("a plan's methods called unbound, or on a Proxy of a plan, are INVALID_VALUE naming this (settleDropped was a TypeError)", async () => {
    const sc = randomScenario(rng, [rng.int(20, 300)], [rng.int(1, 4)]);
    const plan = createPlan(sc.chunk);
    const settle = plan.settleDropped;
    const e = await errorOf(() => settle());
    expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, String(e)).toEqual({ code: 'INVALID_VALUE', argument: 'this' });
    const proxy = new Proxy(plan, {});
    for (const call of [() => proxy.settleDropped(), () => plan.release.call(undefined), () => plan.layout.call(proxy, 0), () => plan.combinedRows.call({}, 0), () => plan.checkCaches.call(undefined, { swa: createKvCache('v4', { pageSize: 64, numPages: 1 }) }, 0)]) {
      const x = await errorOf(call);
      expect(x instanceof SparseMlaError && { code: x.code, argument: x.argument }, String(x)).toEqual({ code: 'INVALID_VALUE', argument: 'this' });
    }
    // bound, they work
    expect(await plan.settleDropped()).toBe(0);
    expect(plan.layout(0).rows).toBe(plan.layout(0).swaRows + plan.layout(0).compressedRows);
  });
});

describe("the paged form a paged layer's budget check reads (Plan.peekPagedForm)", () => {
  test('equals the form the layer then builds (pagedForm of combinedRows / combineC4), for c0, c4 and c128 layers, and the peek keeps and counts nothing; with the form kept, the peek reads it', () => {
    const sc = randomScenario(rng, [rng.int(300, 900), rng.int(20, 200)], [rng.int(5, 40), rng.int(1, 20)]);
    const topk = randomTopk(rng, sc, rng.int(16, 96));
    const arrays = (f: { main: ArrayLike<number>; mainLengths: ArrayLike<number>; extra?: ArrayLike<number>; extraLengths?: ArrayLike<number> }) =>
      [f.main, f.mainLengths, f.extra ?? [], f.extraLengths ?? []].map((a) => Array.from(a));
    for (const ratio of [0, 4, 128] as const) {
      const plan = createPlan(sc.chunk);
      const checked = ratio === 4 ? plan.checkTopk(topk, false) : undefined;
      const before = JSON.stringify(plan.stats);
      const peeked = plan.peekPagedForm(ratio, checked);
      expect(JSON.stringify(plan.stats), `c${ratio}: the peek counted work`).toBe(before);
      const form = plan.pagedForm(ratio === 4 ? plan.combineC4(topk) : plan.combinedRows(ratio));
      const built = { main: form.main.data, mainLengths: form.mainLengths.data, extra: form.extra?.data, extraLengths: form.extraLengths?.data };
      expect(arrays(peeked), `c${ratio}`).toEqual(arrays(built));
      expect([peeked.mainWidth, peeked.extraWidth], `c${ratio}`).toEqual([form.main.shape[1], form.extra?.shape[1] ?? 0]);
      // kept: the same arrays (c4: the main set), nothing built again
      const after = JSON.stringify(plan.stats);
      const again = plan.peekPagedForm(ratio, checked);
      expect(arrays(again), `c${ratio}, kept`).toEqual(arrays(built));
      // (pagedForm hands out copies of the kept sets: each peek reads the plan's own arrays, not those)
      const third = plan.peekPagedForm(ratio, checked);
      expect(again.main, `c${ratio}: the kept main set read as it is`).toBe(third.main);
      expect(again.main, `c${ratio}: not the copy pagedForm handed out`).not.toBe(form.main.data);
      if (ratio !== 4 && form.extra) expect(again.extra, `c${ratio}: the kept extra set read as it is`).toBe(third.extra);
      expect(JSON.stringify(plan.stats)).toBe(after);
    }
  });

  test('kept by layerPagedForm (a layer whose check peeked runs with it): the peeked arrays themselves, the plan keeping and counting them as combinedRows / combineC4 and pagedForm would, once; a peek is kept at most once', async () => {
    const sc = randomScenario(rng, [rng.int(300, 900), rng.int(20, 200)], [rng.int(5, 40), rng.int(1, 20)]);
    const topk = randomTopk(rng, sc, rng.int(16, 96));
    for (const ratio of [0, 4, 128] as const) {
      // twin plans: one built the usual way, one through a peek that is then kept
      const usual = createPlan(sc.chunk), peeking = createPlan(sc.chunk);
      const rows = ratio === 4 ? usual.combineC4(topk) : usual.combinedRows(ratio);
      const form = usual.pagedForm(rows);
      const peeked = peeking.peekPagedForm(ratio, ratio === 4 ? peeking.checkTopk(topk, false) : undefined);
      let kept!: ReturnType<Plan['layerPagedForm']>;
      const calls = await plannerCalls(async () => (kept = peeking.layerPagedForm(ratio, undefined, peeked)));
      expect(calls, `c${ratio}: keeping built nothing again`).toEqual({ combineTopk: 0, denseRows: 0, compressedTokenIds: 0, pagedForm: 0 });
      expect(kept.form.main.data, `c${ratio}`).toBe(peeked.main);
      expect(kept.form.mainLengths.data, `c${ratio}`).toBe(peeked.mainLengths);
      if (peeked.extra) expect([kept.form.extra!.data, kept.form.extraLengths!.data], `c${ratio}`).toEqual([peeked.extra, peeked.extraLengths]);
      expect(kept.form.extra?.data, `c${ratio}`).toBe(peeked.extra);
      // the same form, dropped count and counts as the usual way
      expect(kept.dropped, `c${ratio}`).toBe(rows.dropped);
      expect([form.main, form.mainLengths, form.extra, form.extraLengths].map((t) => t && [t.shape, Array.from(t.data)]), `c${ratio}`).toEqual(
        [kept.form.main, kept.form.mainLengths, kept.form.extra, kept.form.extraLengths].map((t) => t && [t.shape, Array.from(t.data)]),
      );
      expect(peeking.stats, `c${ratio}`).toEqual(usual.stats);
      // the plan keeps them: a later c0 / c128 layer's form is the kept one, building and counting
      // nothing; a c4 layer's main set is kept (its extra set is its top-k's, combined per layer)
      if (ratio !== 4) {
        let later!: ReturnType<Plan['layerPagedForm']>;
        expect(await plannerCalls(async () => (later = peeking.layerPagedForm(ratio, undefined, undefined))), `c${ratio}: a later layer built nothing`).toEqual({ combineTopk: 0, denseRows: 0, compressedTokenIds: 0, pagedForm: 0 });
        expect(later.form.main.data, `c${ratio}`).toBe(peeked.main);
        expect(later.form.extra?.data, `c${ratio}`).toBe(peeked.extra);
      } else {
        expect(peeking.peekPagedForm(4, peeking.checkTopk(topk, false)).main, 'c4: the main set kept').toBe(peeked.main);
      }
      expect(peeking.stats, `c${ratio}`).toEqual(usual.stats);
      // a peek is kept once (a second keep would count its build again)
      const e = await errorOf(() => peeking.layerPagedForm(ratio, undefined, peeked));
      expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, String(e)).toEqual({ code: 'INVALID_VALUE', argument: 'peeked' });
      expect(peeking.stats, `c${ratio}`).toEqual(usual.stats);
    }
  });
});
