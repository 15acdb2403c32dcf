/**
 * prefillLayer on both paths (workspace + sparsePrefill, and paged FP8 attention) against the
 * brute-force float64 reference, which derives each query's attention set from SPEC §6 and attends
 * the caches' dequantized rows; random multi-request chunks and every ratio; a multi-layer chunk
 * reusing one plan; bad input refused before any engine work.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, tensor, SparseMlaError } from '../dist/index.js';
import { createPlan, prefillLayer, SPARSE_PREFILL_THRESHOLDS, type CompressRatio, type PlanChunk, type PrefillLayerResult, type PrefillPath } from '../dist/planner/index.js';
import { prefillLayerReference, type PrefillLayerReferenceResult } from '../dist/reference/index.js';
import type { Engine } from '../dist/types.js';
import { engineBackend } from '../dist/engine.js';
import { makeRng, randomBf16Bits } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { expectWithinBounds } from './helpers/judge.js';
import { opSuite } from './helpers/suite.js';

const suite = opSuite('prefill_layer.test', { backend: 'wasm', workers: 2 });
const { rng } = suite;
const HQ = 8;
const D = 512;
const SM_SCALE = 1 / Math.sqrt(D);

function expectMatches(got: PrefillLayerResult, ref: PrefillLayerReferenceResult, path: PrefillPath, label: string): void {
  expect(got.path, label).toBe(path);
  expectWithinBounds(label, got, ref, Array.from({ length: got.lse.shape[0]! }, (_, i) => i));
  expect(got.dropped, `${label} dropped`).toBe(ref.dropped);
}

describe('prefillLayer vs the brute-force reference', () => {
  const PATHS: PrefillPath[] = ['sparse', 'paged'];

  test.each([0, 4, 128] as const)('ratio %i, random multi-request chunk, both paths', async (ratio) => {
    // fresh short request, long mid-sequence request, one short of the ratio, an empty one, a random one
    const seqLens = [rng.int(5, 40), rng.int(300, 700), rng.int(100, 128), rng.int(10, 300), rng.int(130, 500)];
    const extendLens = [seqLens[0]!, rng.int(10, 30), rng.int(1, 8), 0, rng.int(1, 20)];
    const sc = randomScenario(rng, seqLens, extendLens);
    const caches = {
      swa: randomCache(rng, 64, sc.swaPages),
      c4: randomCache(rng, sc.c4PageSize, sc.c4Pages),
      c128: randomCache(rng, sc.c128PageSize, sc.c128Pages),
    };
    const plan = createPlan(sc.chunk, { caches });
    const q = tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1));
    const sinkVals = new Float32Array(HQ).map(() => rng.normal());
    sinkVals[1] = -Infinity; // a head with no sink
    const attnSink = tensor('float32', [HQ], sinkVals);
    const topkIndices = ratio === 4 ? randomTopk(rng, sc, 96) : undefined;
    const args = { q, compressRatio: ratio as CompressRatio, plan, caches, attnSink, smScale: SM_SCALE, ...(topkIndices ? { topkIndices } : {}) };
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, attnSink, smScale: SM_SCALE, ...(topkIndices ? { topkIndices } : {}) });
    if (ratio === 4) expect(ref.dropped).toBeGreaterThan(0);
    for (const path of PATHS) {
      const got = await prefillLayer(suite.engine, { ...args, path });
      expectMatches(got, ref, path, `ratio ${ratio} ${path}`);
      expect(got.reason).toBe(`forced by option path='${path}'`);
      expect(got.workspaceBytes).toBe(path === 'sparse' ? plan.layout(ratio).bytes : 0);
    }
  }, 60_000);

  test('a multi-layer chunk (ratios 0, 4, 128, 4) reuses one plan: c0/c128 rows are built once', async () => {
    const seqLens = [rng.int(200, 600), rng.int(20, 60), rng.int(129, 400)];
    const extendLens = [rng.int(5, 20), seqLens[1]!, rng.int(1, 10)];
    const sc = randomScenario(rng, seqLens, extendLens);
    const plan = createPlan(sc.chunk);
    const ratios: CompressRatio[] = [0, 4, 128, 4];
    // every layer has its own caches and its own indexer output
    const layers = ratios.map((ratio) => ({
      ratio,
      caches: {
        swa: randomCache(rng, 64, sc.swaPages),
        c4: ratio === 4 ? randomCache(rng, sc.c4PageSize, sc.c4Pages) : undefined,
        c128: ratio === 128 ? randomCache(rng, sc.c128PageSize, sc.c128Pages) : undefined,
      },
      topkIndices: ratio === 4 ? randomTopk(rng, sc, 64) : undefined,
      q: tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1)),
      attnSink: tensor('float32', [HQ], new Float32Array(HQ).map(() => rng.normal())),
    }));
    const refs = layers.map((l) =>
      prefillLayerReference({
        chunk: sc.ref,
        compressRatio: l.ratio,
        q: l.q,
        caches: { swa: l.caches.swa, ...(l.caches.c4 ? { c4: l.caches.c4 } : {}), ...(l.caches.c128 ? { c128: l.caches.c128 } : {}) },
        attnSink: l.attnSink,
        smScale: SM_SCALE,
        ...(l.topkIndices ? { topkIndices: l.topkIndices } : {}),
      }),
    );
    for (const path of ['sparse', 'paged'] as const) {
      for (let i = 0; i < layers.length; i++) {
        const l = layers[i]!;
        const got = await prefillLayer(suite.engine, {
          q: l.q,
          compressRatio: l.ratio,
          plan,
          caches: l.caches,
          attnSink: l.attnSink,
          smScale: SM_SCALE,
          path,
          ...(l.topkIndices ? { topkIndices: l.topkIndices } : {}),
        });
        expectMatches(got, refs[i]!, path, `layer ${i} (c${l.ratio}) ${path}`);
      }
    }
    // two passes over 4 layers: the chunk-invariant rows once, a c4 combine per c4 layer per pass,
    // one workspace buffer, one paged main set; extra sets: c128 once + one per c4 combine
    expect(plan.stats).toEqual({
      c0Builds: 1,
      c128Builds: 1,
      c4Combines: 4,
      c4Dropped: plan.stats.c4Dropped,
      pagedMainBuilds: 1,
      pagedExtraBuilds: 1 + 2,
      workspaceAllocations: 1,
    });
    expect(plan.stats.c4Dropped).toBe(2 * (refs[1]!.dropped + refs[3]!.dropped));
    // plan.release() drops what the plan keeps: the next layers build it again and give the same results
    plan.release();
    for (const i of [0, 2]) {
      const l = layers[i]!;
      const got = await prefillLayer(suite.engine, { q: l.q, compressRatio: l.ratio, plan, caches: l.caches, attnSink: l.attnSink, smScale: SM_SCALE, path: 'sparse' });
      expectMatches(got, refs[i]!, 'sparse', `layer ${i} (c${l.ratio}) after release`);
    }
    expect(plan.stats).toMatchObject({ c0Builds: 2, c128Builds: 2, workspaceAllocations: 2 });
  }, 60_000);

  test('layers running at once on one plan (a chunk sharded by heads) build its rows and ids once, each with its own workspace', async () => {
    const sc = randomScenario(rng, [rng.int(300, 700), rng.int(20, 60)], [rng.int(5, 30), 20]);
    const plan = createPlan(sc.chunk);
    const layer = (ratio: 0 | 128) => {
      const caches = { swa: randomCache(rng, 64, sc.swaPages), c128: randomCache(rng, sc.c128PageSize, sc.c128Pages) };
      const q = tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1));
      const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, smScale: SM_SCALE });
      return { run: () => prefillLayer(suite.engine, { q, compressRatio: ratio, plan, caches, smScale: SM_SCALE, path: 'sparse' }), ref };
    };
    const layers = [layer(128), layer(128), layer(0), layer(0)];
    const steps = engineBackend(suite.engine)!.layer;
    const planRows = steps.planRows.bind(steps);
    const built: number[] = [];
    steps.planRows = (job) => (built.push(job.ratio), planRows(job));
    let got: PrefillLayerResult[];
    try {
      got = await Promise.all(layers.map((l) => l.run()));
    } finally {
      steps.planRows = planRows;
    }
    got.forEach((g, i) => expectMatches(g, layers[i]!.ref, 'sparse', `concurrent layer ${i}`));
    expect(built.sort()).toEqual([0, 128]);
    expect(plan.stats).toMatchObject({ c0Builds: 1, c128Builds: 1 });
    expect(plan.stats.workspaceAllocations).toBeGreaterThan(1);
    expect(plan.compressedTokenIds(128).data).toBe(plan.compressedTokenIds(128).data); // the layers' ids, kept
  }, 60_000);

  test('the router picks the path by query count, option or SPARSE_MLA_PREFILL', async () => {
    const sc = randomScenario(rng, [40, 300], [40, 9]); // 49 queries
    const caches = { swa: randomCache(rng, 64, sc.swaPages), c128: randomCache(rng, sc.c128PageSize, sc.c128Pages) };
    const plan = createPlan(sc.chunk);
    const q = tensor('bf16', [49, HQ, D], randomBf16Bits(rng, 49 * HQ * D, 1));
    const base = { q, compressRatio: 128 as const, plan, caches, smScale: SM_SCALE };
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 128, q, caches, smScale: SM_SCALE });
    const above = await prefillLayer(suite.engine, { ...base, threshold: 48, env: {} });
    expect(above.reason).toBe('49 queries > threshold 48');
    expectMatches(above, ref, 'sparse', 'threshold 48');
    const below = await prefillLayer(suite.engine, { ...base, threshold: 49, env: {} });
    expect(below.reason).toBe('49 queries ≤ threshold 49');
    expectMatches(below, ref, 'paged', 'threshold 49');
    const dflt = await prefillLayer(suite.engine, { ...base, env: {} });
    const t = SPARSE_PREFILL_THRESHOLDS.wasm[128];
    expect(dflt.reason).toBe(`49 queries ${49 > t ? '>' : '≤'} threshold ${t} (wasm default)`);
    expectMatches(dflt, ref, 49 > t ? 'sparse' : 'paged', 'wasm default threshold');
    const saved = process.env.SPARSE_MLA_PREFILL;
    try {
      process.env.SPARSE_MLA_PREFILL = 'sparse';
      const forced = await prefillLayer(suite.engine, { ...base, threshold: 1000 });
      expect(forced.reason).toBe('forced by SPARSE_MLA_PREFILL=sparse');
      expectMatches(forced, ref, 'sparse', 'env sparse');
    } finally {
      if (saved === undefined) delete process.env.SPARSE_MLA_PREFILL;
      else process.env.SPARSE_MLA_PREFILL = saved;
    }
  }, 60_000);
});

describe('prefillLayer bad input: a typed error before any engine work', () => {
  /** A real engine whose backend fails the test if any op or layer step is reached. */
  let untouchable: Engine;
  beforeAll(async () => {
    untouchable = await createEngine({ backend: 'wasm', workers: 1 });
    const backend = engineBackend(untouchable)!;
    const trap = (name: string) => () => {
      throw new Error(`${name} must not be called`);
    };
    for (const m of ['sparsePrefill', 'pagedSparseAttention', 'quantizeKCache', 'dequantizeKCache'] as const) (backend as unknown as Record<string, unknown>)[m] = trap(`backend.${m}`);
    const steps = backend.layer as unknown as Record<string, unknown>;
    for (const m of Object.keys(steps)) if (typeof steps[m] === 'function') steps[m] = trap(`layer.${m}`);
  });
  afterAll(async () => {
    await untouchable?.dispose();
  });
  const sc = randomScenario(makeRng(12345), [20, 200], [20, 3]); // fixed: built at collection time, its values do not matter
  const caches = { swa: createKvCache('v4', { pageSize: 64, numPages: sc.swaPages }), c4: createKvCache('v4', { pageSize: sc.c4PageSize, numPages: sc.c4Pages }) };
  const plan = createPlan(sc.chunk);
  const q = tensor('bf16', [23, 2, D]);
  const topkIndices = tensor('int32', [23, 8], new Int32Array(23 * 8).fill(-1));
  const ok = { q, compressRatio: 4 as const, plan, caches, topkIndices, smScale: 0.1 };

  async function expectCode(args: object, code: string, pattern: RegExp): Promise<void> {
    const err = await prefillLayer(untouchable, args as never).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SparseMlaError);
    expect((err as SparseMlaError).code).toBe(code);
    expect((err as Error).message).toMatch(pattern);
  }

  test('an engine that createEngine did not make is refused', async () => {
    const fake = { backend: 'wasm', sparsePrefill: () => Promise.resolve() } as unknown as Engine;
    const err = await prefillLayer(fake, ok).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SparseMlaError);
    expect(err).toMatchObject({ code: 'INVALID_VALUE', argument: 'engine' });
  });
  test('a chunk without queries returns empty outputs without touching the engine', async () => {
    const empty = createPlan({ requests: [{ seqLen: 50, extendLen: 0, swaTokenIds: [] }] });
    const r = await prefillLayer(untouchable, { q: tensor('bf16', [0, 2, D]), compressRatio: 0, plan: empty, caches: { swa: caches.swa }, smScale: 0.1, env: {} });
    expect([r.out.shape, r.lse.shape, r.maxLogits.shape, r.workspaceBytes]).toEqual([[0, 2, D], [0, 2], [0, 2], 0]);
  });
  test('a q of more than 2^31 - 1 heads is TOO_LARGE as the ops refuse it, also on a chunk without queries (no op runs there)', async () => {
    const empty = createPlan({ requests: [{ seqLen: 50, extendLen: 0, swaTokenIds: [] }] });
    for (const hQ of [2 ** 31, 2 ** 32 + 1, 2 ** 40]) {
      await expectCode({ q: tensor('bf16', [0, hQ, D], new Uint16Array(0)), compressRatio: 0, plan: empty, caches: { swa: caches.swa }, smScale: 0.1 }, 'TOO_LARGE', new RegExp(`^q: expected hQ ≤ 2147483647 \\(32-bit sizes in the core ABI\\), got ${hQ}$`));
    }
    // the largest hQ the core takes: empty outputs of that many heads
    const r = await prefillLayer(untouchable, { q: tensor('bf16', [0, 2 ** 31 - 1, D], new Uint16Array(0)), compressRatio: 0, plan: empty, caches: { swa: caches.swa }, smScale: 0.1 });
    expect(r.lse.shape).toEqual([0, 2 ** 31 - 1]);
  });
  test('ids outside the caches', async () => {
    await expectCode({ ...ok, caches: { ...caches, swa: createKvCache('v4', { pageSize: 64, numPages: 1 }) } }, 'OUT_OF_RANGE', /caches\.swa/);
    await expectCode({ ...ok, caches: { ...caches, c4: createKvCache('v4', { pageSize: sc.c4PageSize, numPages: 1 }) } }, 'OUT_OF_RANGE', /caches\.c4/);
    await expectCode({ ...ok, caches: { ...caches, c4: createKvCache('v4', { pageSize: 2 * sc.c4PageSize, numPages: sc.c4Pages }) } }, 'INVALID_VALUE', /pageSize/);
  });
  test('mismatched shapes and missing pieces', async () => {
    await expectCode({ ...ok, q: tensor('bf16', [22, 2, D]) }, 'INVALID_SHAPE', /q: expected \[numQueries = 23/);
    await expectCode({ ...ok, q: tensor('bf16', [23, 2, 576]) }, 'INVALID_SHAPE', /q/);
    await expectCode({ ...ok, topkIndices: tensor('int32', [22, 8]) }, 'INVALID_SHAPE', /topkIndices/);
    await expectCode({ ...ok, topkIndices: undefined }, 'INVALID_VALUE', /topkIndices/);
    await expectCode({ ...ok, compressRatio: 128 }, 'INVALID_VALUE', /topkIndices/); // c128 layers have no indexer
    // a ratio the plan does not serve: the same refusal as the plan's own methods give (plan.combinedRows)
    const swaOnly = createPlan({ requests: [{ seqLen: 2, extendLen: 1, swaTokenIds: [0, 1] }] });
    expect(swaOnly.ratios).toEqual([0]);
    await expectCode({ q: tensor('bf16', [1, 2, D]), compressRatio: 128, plan: swaOnly, caches: { swa: caches.swa }, smScale: 0.1 }, 'INVALID_VALUE', /^compressRatio: expected a ratio this plan serves \(0\); pass chunk\.c128PageSize and page tables to createPlan, got 128/);
    await expectCode({ ...ok, attnSink: tensor('float32', [3]) }, 'INVALID_SHAPE', /attnSink/);
    await expectCode({ ...ok, smScale: Number.NaN }, 'INVALID_VALUE', /smScale/);
    await expectCode({ ...ok, smScale: 1e6 }, 'INVALID_VALUE', /smScale/); // finite, but not in float32 logits
    await expectCode({ ...ok, q: tensor('bf16', [23, 0, D]) }, 'INVALID_SHAPE', /q: expected hQ = shape\[1\] ≥ 1/);
    // device tensors on an engine without device memory (a branded stand-in: never read)
    const onDevice = (dtype: string, shape: number[], bytes: number) => ({ dtype, shape, data: { device: 'cuda', deviceIndex: 0, byteLength: bytes, freed: false, free() {}, [Symbol.for('sparse-mla.DeviceBuffer')]: true } });
    await expectCode({ ...ok, q: onDevice('bf16', [23, 2, D], 23 * 2 * D * 2) }, 'INVALID_VALUE', /q: expected a host bf16 tensor/);
    await expectCode({ ...ok, topkIndices: onDevice('int32', [23, 8], 23 * 8 * 4) }, 'INVALID_VALUE', /topkIndices: expected a host int32 tensor/);
    await expectCode({ ...ok, attnSink: onDevice('float32', [2], 2 * 4) }, 'INVALID_VALUE', /attnSink: expected a host float32 tensor/);
    for (const path of ['sparse', 'paged']) {
      await expectCode({ ...ok, path, caches: { ...caches, swa: { ...caches.swa, data: onDevice('uint8', [], caches.swa.data.byteLength).data } } }, 'BACKEND_UNAVAILABLE', /caches: expected host caches/);
    }
    await expectCode({ ...ok, plan: {} }, 'INVALID_VALUE', /plan/);
    await expectCode({ ...ok, path: 'fastest' }, 'INVALID_VALUE', /path/);
  });
});
