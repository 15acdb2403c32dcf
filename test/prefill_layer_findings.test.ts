/**
 * What the API fuzzer found in prefillLayer and prefillLayerSharded on the host engines (wasm, and
 * cpu where the addon is built), one focused case each: every one threw an untyped error, read an
 * argument twice, or answered wrongly before its fix. Each test names its session in its describe,
 * or its commit in a comment. The cuda engine's layer findings are in cuda_layer_findings.test.ts.
 * Moved from test/fuzz_findings.test.ts.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, tensor } from '../dist/index.js';
import type { Tensor } from '../dist/index.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { judgeAttention, wholeQuery } from './fuzz/targets.mjs';
import { errorOf } from './helpers/errors.js';
import { addonBuilt, expectTyped, hostEngines } from './helpers/findings.js';

const rng = testRng('prefill_layer_findings');
const engines = hostEngines();

// fuzzer findings, 0eef3b7
describe('prefillLayer', () => {
  function layerCase() {
    const sc = randomScenario(rng, [rng.int(20, 60)], [rng.int(2, 5)]);
    const caches = { swa: randomCache(rng, 64, sc.swaPages) };
    const plan = createPlan(sc.chunk);
    const q = tensor('bf16', [sc.numQueries, 2, 512], randomBf16Bits(rng, sc.numQueries * 2 * 512));
    return { sc, caches, plan, q };
  }

  test('a Proxy of a Plan, or an object inheriting from one, is INVALID_VALUE (was TypeError reading its private state)', async () => {
    const { caches, plan, q } = layerCase();
    for (const engine of engines) {
      for (const fake of [new Proxy(plan, {}), Object.create(plan)]) {
        await expectTyped(() => prefillLayer(engine, { q, compressRatio: 0, plan: fake, caches, smScale: 0.04, path: 'paged' }), 'INVALID_VALUE', 'plan');
      }
    }
  });

  test('a cache whose data is a Proxy, or whose numPages is a Symbol, is a typed error (was TypeError)', async () => {
    const { caches, plan, q } = layerCase();
    for (const engine of engines) {
      const proxied = { ...caches.swa, data: new Proxy(caches.swa.data, {}) };
      await expectTyped(() => prefillLayer(engine, { q, compressRatio: 0, plan, caches: { swa: proxied }, smScale: 0.04 }), 'INVALID_VALUE', 'caches.swa');
      const symbolic = { ...caches.swa, numPages: Symbol('n') as unknown as number };
      await expectTyped(() => prefillLayer(engine, { q, compressRatio: 0, plan, caches: { swa: symbolic }, smScale: 0.04 }), 'INVALID_VALUE', 'caches.swa');
    }
  });

  test("a cache's fields are read once: data that shrinks on a second read is not what the layer reads", async () => {
    const { sc, caches, plan, q } = layerCase();
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 0, q, caches, smScale: 0.04 });
    for (const engine of engines) {
      let reads = 0;
      const swa = {
        format: 'v4' as const,
        pageSize: caches.swa.pageSize,
        numPages: caches.swa.numPages,
        get data() {
          return reads++ === 0 ? caches.swa.data : new Uint8Array(1);
        },
      };
      reads = 0;
      const got = await prefillLayer(engine, { q, compressRatio: 0, plan, caches: { swa }, smScale: 0.04, path: 'sparse' });
      expect(reads).toBe(1);
      expectWithinBounds(`${engine.backend}: a cache read once`, got, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
    }
  });
});

describe("the fuzzer's oracle and the reference against the API (session 46)", () => {
  test('prefillLayer and prefillLayerSharded take attnSink: null as no sink, as the ops and the reference do (they refused it: INVALID_VALUE)', async () => {
    const sc = randomScenario(rng, [rng.int(20, 60)], [rng.int(2, 5)]);
    const caches = { swa: randomCache(rng, 64, sc.swaPages) };
    const plan = createPlan(sc.chunk);
    const q = tensor('bf16', [sc.numQueries, 2, 512], randomBf16Bits(rng, sc.numQueries * 2 * 512));
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 0, q, caches, attnSink: null, smScale: 0.04 } as never);
    const rows = Array.from({ length: sc.numQueries }, (_, i) => i);
    for (const engine of engines) {
      for (const path of ['sparse', 'paged'] as const) {
        const got = await prefillLayer(engine, { q, compressRatio: 0, plan, caches, attnSink: null, smScale: 0.04, path } as never);
        expectWithinBounds(`${engine.backend} ${path}: attnSink null`, got, ref, rows);
      }
    }
    // two shards: the wasm and cpu engines, or a second wasm engine where the addon is not built
    const second = engines.length < 2 ? await createEngine({ backend: 'wasm', workers: 1 }) : undefined;
    const shardEngines = [engines[0]!, second ?? engines[1]!];
    const sharded = createShardedPlan(sc.chunk, { shards: 2, split: 'queries', window: 128 });
    const r = await prefillLayerSharded(shardEngines, { plan: sharded, compressRatio: 0, q, caches: shardEngines.map(() => caches), attnSink: null, smScale: 0.04 } as never);
    expectWithinBounds('sharded: attnSink null', r as never, ref, rows);
    plan.release();
    sharded.release();
    await second?.dispose();
  });
});

// fuzzer target layerAfterReturn, ba9c533 (session 46)
test("prefillLayer uses q, the sink and the indexer's top-k as they were at the call: rewritten or detached right after it returned its promise, on both paths (its steps read them after the plan's and the dequant's awaits: the new bytes, or a detached q reached the cpu addon as BACKEND_FAILURE; fuzzer target layerAfterReturn)", async () => {
  const sc = randomScenario(rng, [rng.int(200, 300), rng.int(20, 60)], [rng.int(2, 6), rng.int(1, 4)]);
  const hQ = 2;
  const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages) };
  const nq = sc.numQueries;
  const queries = Array.from({ length: nq }, (_, i) => i);
  for (const engine of engines) {
    for (const path of ['sparse', 'paged'] as const) {
      for (const act of ['rewrite', 'detach'] as const) {
        const q = tensor('bf16', [nq, hQ, 512], randomBf16Bits(rng, nq * hQ * 512));
        const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
        const topkIndices = randomTopk(rng, sc, 8);
        const atCall = { q: { ...q, data: q.data.slice() }, attnSink: { ...attnSink, data: attnSink.data.slice() }, topkIndices: { ...topkIndices, data: topkIndices.data.slice() } };
        const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 4, caches, smScale: 0.04, ...atCall });
        const plan = createPlan(sc.chunk);
        const pending = prefillLayer(engine, { plan, compressRatio: 4, q, attnSink, topkIndices, caches, smScale: 0.04, path });
        if (act === 'rewrite') {
          q.data.fill(0x7fc0); // NaN
          attnSink.data.fill(Infinity);
          topkIndices.data.fill(0);
        } else {
          for (const t of [q, attnSink, topkIndices]) structuredClone(t.data.buffer, { transfer: [t.data.buffer] });
        }
        const got = await pending;
        expectWithinBounds(`${engine.backend} ${path}, ${act} after the call`, got, ref, queries);
        expect(got.dropped, `${engine.backend} ${path}`).toBe(ref.dropped);
        plan.release();
      }
    }
  }
});

describe('hostile input on the host engines (session 48)', () => {
  test('a layer of a chunk without queries on a disposed engine rejects with DISPOSED, as every other call does (it resolved with empty outputs: fuzzer target layerDispose, seed 4813 case 1)', async () => {
    const sc = randomScenario(rng, [rng.int(20, 60)], [0]);
    const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages) };
    for (const backend of addonBuilt ? (['wasm', 'cpu'] as const) : (['wasm'] as const)) {
      const engine = await createEngine({ backend, workers: 1 });
      const plan = createPlan(sc.chunk), sharded = createShardedPlan(sc.chunk, { shards: 2, split: 'queries' });
      const args = { compressRatio: 0 as const, q: tensor('bf16', [0, 2, 512], new Uint16Array(0)), caches, smScale: 0.04 };
      const before = await prefillLayer(engine, { ...args, plan });
      expect(before.out.shape, backend).toEqual([0, 2, 512]);
      await engine.dispose();
      await expectTyped(() => prefillLayer(engine, { ...args, plan }), 'DISPOSED');
      await expectTyped(() => prefillLayer(engine, { ...args, plan }, { dropped: 'later' }), 'DISPOSED');
      await expectTyped(() => prefillLayerSharded([engine, engine], { ...args, plan: sharded }), 'DISPOSED');
    }
  });

  test("a layer's cache detached after the call returned (its dequant reads it later) is INVALID_VALUE naming the layer's argument, caches.swa.data or caches.c4.data (it named the op's cache.data)", async () => {
    const sc = randomScenario(rng, [rng.int(200, 300)], [rng.int(2, 6)]);
    const nq = sc.numQueries;
    for (const engine of engines) {
      for (const which of ['swa', 'c4'] as const) {
        const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages) };
        const plan = createPlan(sc.chunk);
        const q = tensor('bf16', [nq, 2, 512], randomBf16Bits(rng, nq * 2 * 512));
        const pending = prefillLayer(engine, { plan, compressRatio: 4, q, caches, topkIndices: randomTopk(rng, sc, 8), smScale: 0.04, path: 'sparse' });
        structuredClone(caches[which].data.buffer, { transfer: [caches[which].data.buffer] });
        await expectTyped(() => pending, 'INVALID_VALUE', `caches.${which}.data`);
        plan.release();
      }
    }
  });

  /** q [nq, hQ, 512]'s heads [h0, h1) as their own tensor. */
  function heads(q: Tensor<'bf16'>, h0: number, h1: number): Tensor<'bf16'> {
    const [nq, hQ] = q.shape as [number, number, number];
    const out = new Uint16Array(nq * (h1 - h0) * 512);
    for (let i = 0; i < nq; i++) out.set(q.data.subarray((i * hQ + h0) * 512, (i * hQ + h1) * 512), i * (h1 - h0) * 512);
    return tensor('bf16', [nq, h1 - h0, 512], out);
  }

  test("prefillLayerSharded, a q per shard split by heads: each shard's q and its shape are read once (a shape or an array element answering otherwise on a second read gave another chunk's heads, silently, or a RangeError / TypeError)", async () => {
    const sc = randomScenario(rng, [rng.int(40, 90)], [rng.int(2, 6)]);
    const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages) };
    const hQ = 3;
    const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 0, caches, smScale: 0.04, q });
    const queries = Array.from({ length: sc.numQueries }, (_, i) => i);
    // shard 0 holds heads [0, 1) and shard 1 [1, 3), or [0, 2) and [2, 3)
    const split1 = [heads(q, 0, 1), heads(q, 1, 3)], split2 = [heads(q, 0, 2), heads(q, 2, 3)];
    /** A tensor whose shape answers `shapes` read after read (the last one from then on). */
    const shifting = (t: Tensor<'bf16'>, ...shapes: number[][]) => {
      let reads = 0;
      return { dtype: t.dtype, data: t.data, get shape() { return shapes[Math.min(reads++, shapes.length - 1)]!; } } as unknown as Tensor<'bf16'>;
    };
    for (const engine of engines) {
      const plan = createShardedPlan(sc.chunk, { shards: 2, split: 'heads' });
      const nq = sc.numQueries;
      const cases: [string, unknown[]][] = [
        ['a shape of 1 head, then 2', [shifting(split1[0]!, [nq, 1, 512], [nq, 2, 512], [nq, 1, 512]), split1[1]]],
        ['a shape of 2 heads, then 1', [shifting(split2[0]!, [nq, 2, 512], [nq, 1, 512], [nq, 2, 512]), split2[1]]],
      ];
      const byGetter = [split1[0], split1[1]];
      let reads = 0;
      Object.defineProperty(byGetter, 0, { enumerable: true, get: () => (reads++ === 0 ? split1[0] : split2[0]) });
      cases.push(['an element that is another shard q the second time', byGetter]);
      const junk = [split1[0], split1[1]];
      let junkReads = 0;
      Object.defineProperty(junk, 0, { enumerable: true, get: () => (junkReads++ === 0 ? split1[0] : 'junk') });
      cases.push(['an element that is no tensor the second time', junk]);
      for (const [what, qs] of cases) {
        const got = await prefillLayerSharded([engine, engine], { plan, compressRatio: 0, q: qs as Tensor<'bf16'>[], caches, smScale: 0.04 });
        expectWithinBounds(`${engine.backend}: ${what}`, got, ref, queries);
      }
      plan.release();
    }
  });
});

describe('prefillLayerSharded against getters of its caches (session 50)', () => {
  test("a caches getter that detaches q's or the sink's memory is INVALID_VALUE before any work, whichever the split (the shards' slices came after shard 0's check had read the caches: TypeError, cpu fuzz seed 9 case 190)", async () => {
    const sc = randomScenario(rng, [rng.int(40, 90)], [rng.int(2, 6)]);
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
    const nq = sc.numQueries, hQ = 4;
    for (const engine of engines) {
      for (const split of ['heads', 'queries'] as const) {
        for (const victim of ['q', 'attnSink'] as const) {
          const q = tensor('bf16', [nq, hQ, 512], randomBf16Bits(rng, nq * hQ * 512));
          const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
          const plan = createShardedPlan(sc.chunk, { shards: 2, split });
          let reads = 0;
          const caches = {
            get swa() {
              if (reads++ === 0) {
                const buffer = (victim === 'q' ? q : attnSink).data.buffer;
                structuredClone(buffer, { transfer: [buffer] });
              }
              return swa;
            },
          };
          const what = `${engine.backend}, split by ${split}, ${victim} detached`;
          const e = await errorOf(() => prefillLayerSharded([engine, engine], { plan, compressRatio: 0, q, caches, attnSink, smScale: 0.04 }));
          expect(e, `${what}: ${String(e)}`).toBeInstanceOf(SparseMlaError);
          expect((e as SparseMlaError).code, what).toBe('INVALID_VALUE');
          expect((e as SparseMlaError).argument, what).toBe(victim === 'q' ? 'q.data' : 'attnSink.data');
          expect(reads, `${what}: caches.swa read once`).toBe(1);
          plan.release();
        }
      }
    }
  });

  test("the fuzzer's oracle reads the sharded API's per-shard q, top-k and caches as the one layer they split (it refused them: soft ref-refused, cuda fuzz seed 8 case 1506, cpu seed 9 case 904)", () => {
    const sc = randomScenario(rng, [rng.int(40, 90)], [rng.int(2, 6)]);
    const nq = sc.numQueries, hQ = 3, width = 8;
    const q = tensor('bf16', [nq, hQ, 512], randomBf16Bits(rng, nq * hQ * 512));
    const topk = randomTopk(rng, sc, width);
    const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages) };
    const cut = rng.int(1, nq);
    const rowsOf = <T extends Uint16Array | Int32Array>(t: { data: T; shape: readonly number[] }, a: number, b: number, per: number) => t.data.slice(a * per, b * per) as T;
    // by queries: rows [0, cut) and [cut, nq) of q and of the top-k
    const byQueries = wholeQuery({
      plan: { split: 'queries' },
      q: [tensor('bf16', [cut, hQ, 512], rowsOf(q, 0, cut, hQ * 512)), tensor('bf16', [nq - cut, hQ, 512], rowsOf(q, cut, nq, hQ * 512))],
      topkIndices: [tensor('int32', [cut, width], rowsOf(topk, 0, cut, width)), tensor('int32', [nq - cut, width], rowsOf(topk, cut, nq, width))],
      caches: [caches, caches],
    });
    expect(byQueries.q.shape).toEqual([nq, hQ, 512]);
    expect(Array.from(byQueries.q.data)).toEqual(Array.from(q.data));
    expect(byQueries.topkIndices.shape).toEqual([nq, width]);
    expect(Array.from(byQueries.topkIndices.data)).toEqual(Array.from(topk.data));
    expect(byQueries.caches).toBe(caches);
    // by heads: heads [0, 1) and [1, 3), every shard with the whole top-k
    const byHeads = wholeQuery({ plan: { split: 'heads' }, q: [heads(q, 0, 1), heads(q, 1, 3)], topkIndices: [topk, topk], caches });
    expect(byHeads.q.shape).toEqual([nq, hQ, 512]);
    expect(Array.from(byHeads.q.data)).toEqual(Array.from(q.data));
    expect(Array.from(byHeads.topkIndices.data)).toEqual(Array.from(topk.data));
    // shards given different top-ks or caches: no one layer to compare with
    const other = randomTopk(rng, sc, width);
    expect(wholeQuery({ plan: { split: 'heads' }, q: [heads(q, 0, 1), heads(q, 1, 3)], topkIndices: [topk, other], caches })).toBeNull();
    expect(wholeQuery({ plan: { split: 'queries' }, q, caches: [caches, { swa: randomCache(rng, sc.swaPageSize, sc.swaPages) }] })).toBeNull();
    // one layer as it is; a part not on the host: values unknown
    const one = { plan: { split: 'heads' }, q, caches };
    expect(wholeQuery(one)).toBe(one);
    expect(wholeQuery({ plan: { split: 'heads' }, q: [{ dtype: 'bf16', shape: [nq, hQ, 512], data: {} }], caches })).toBeNull();
  });

  /** q [nq, hQ, 512]'s heads [h0, h1) as their own tensor. */
  function heads(q: Tensor<'bf16'>, h0: number, h1: number): Tensor<'bf16'> {
    const [nq, hQ] = q.shape as [number, number, number];
    const out = new Uint16Array(nq * (h1 - h0) * 512);
    for (let i = 0; i < nq; i++) out.set(q.data.subarray((i * hQ + h0) * 512, (i * hQ + h1) * 512), i * (h1 - h0) * 512);
    return tensor('bf16', [nq, h1 - h0, 512], out);
  }
});

describe("hostile input the fuzzer's session-52 oracle and generators reach (session 52, helper-53)", () => {
  /** `cache` with a `field` getter that answers its own value on the first read and `later` from then on; reads counts them. */
  function answersOtherwiseLater<C extends object>(cache: C, field: keyof C, later: unknown, reads: { n: number }): C {
    const c = { ...cache };
    const first = cache[field];
    Object.defineProperty(c, field, { enumerable: true, get: () => (reads.n++ === 0 ? first : later) });
    return c;
  }

  test("prefillLayer's paged path attends the caches it checked: a caches.swa getter answering another cache (same geometry, other bytes) after its first read does not change the result (the paged op was handed the caller's caches object and read swa again: it attended the other cache's rows, silently)", async () => {
    const { judgeLayer, layerScenario } = await import('./fuzz/targets.mjs');
    const { CaseHooks } = await import('./fuzz/mutate.mjs');
    for (const engine of engines) {
      for (const ratio of [0, 4, 128] as const) {
        const { sc, layer, window } = layerScenario(rng, new CaseHooks(), ratio);
        const plan = createPlan(sc.chunk, { window });
        const other = { ...layer.caches.swa, data: new Uint8Array(layer.caches.swa.data.length).fill(0x38) };
        let reads = 0;
        const caches = { ...layer.caches };
        Object.defineProperty(caches, 'swa', { enumerable: true, get: () => (reads++ === 0 ? layer.caches.swa : other) });
        const got = await prefillLayer(engine, { ...layer, plan, caches, path: 'paged' });
        expect(reads, `${engine.backend} c${ratio}: caches.swa reads`).toBe(1);
        expect(judgeLayer(got, sc, layer), `${engine.backend} c${ratio}`).toBeNull();
        plan.release();
      }
    }
  });

  test("prefillLayerSharded reads each cache's fields once for all its shards: a data getter answering another cache's bytes after its first read gives every shard the cache checked (each shard's check, and each shard's paged op, read the cache again: 4 reads of each field for 2 shards split by queries, the second shard attending the other bytes, silently)", async () => {
    const { judgeLayer, layerScenario } = await import('./fuzz/targets.mjs');
    const { CaseHooks } = await import('./fuzz/mutate.mjs');
    for (const engine of engines) {
      for (const split of ['queries', 'heads'] as const) {
        let s;
        do s = layerScenario(rng, new CaseHooks(), rng.pick([0, 4, 128]));
        while (s.sc.numQueries < 2 || s.layer.q.shape[1] < 2);
        const { sc, layer, window } = s;
        const plan = createShardedPlan(sc.chunk, { shards: 2, split, window });
        const reads = { n: 0 };
        const swa = answersOtherwiseLater(layer.caches.swa, 'data', new Uint8Array(layer.caches.swa.data.length).fill(0x38), reads);
        const got = await prefillLayerSharded([engine, engine], { ...layer, plan, caches: { ...layer.caches, swa }, path: rng.pick(['paged', 'sparse']) });
        expect(reads.n, `${engine.backend} ${split}: caches.swa.data reads`).toBe(1);
        expect(judgeLayer(got, sc, layer), `${engine.backend} ${split}`).toBeNull();
        plan.release();
      }
    }
  });
});

describe("sharded layers over several engines, the fuzzer's shardedEngines target (session 57, helper-77)", () => {
  test.each(['queries', 'heads'] as const)('prefillLayerSharded (split by %s) over a list holding a disposed engine is DISPOSED before any shard runs (the live engines ran their whole shards first, for nothing: a task dispatched on a live wasm engine); the same layer over live engines is right', async (split) => {
    const { engineBackend } = await import('../dist/engine.js');
    const sc = randomScenario(rng, [rng.int(20, 80), rng.int(5, 30)], [rng.int(2, 6), rng.int(1, 4)]);
    const hQ = rng.int(2, 4);
    const caches = { swa: randomCache(rng, 64, sc.swaPages) };
    const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
    const live = await createEngine({ backend: 'wasm', workers: 1 });
    const victim = await createEngine({ backend: addonBuilt && rng.uniform() < 0.5 ? 'cpu' : 'wasm', workers: 1 });
    try {
      const pool = (engineBackend(live) as unknown as { pool: { testing: { onDispatch(f: () => void): () => void } } }).pool;
      let dispatched = 0;
      const off = pool.testing.onDispatch(() => dispatched++);
      await victim.dispose();
      const plan = createShardedPlan(sc.chunk, { shards: 2, split, window: 128 });
      const args = { q, compressRatio: 0 as const, plan, caches, smScale: 1 / Math.sqrt(576) };
      const list = rng.uniform() < 0.5 ? [live, victim] : [victim, live];
      await expectTyped(() => prefillLayerSharded(list, args), 'DISPOSED', 'engine');
      expect(dispatched, 'tasks dispatched on the live engine for a layer refused DISPOSED').toBe(0);
      const staging = (engineBackend(live) as unknown as { staging: { busyBytes: number; lentBytes: number } }).staging;
      expect([staging.busyBytes, staging.lentBytes]).toEqual([0, 0]);
      off();
      const got = await prefillLayerSharded([live, live], args);
      const problem = judgeAttention(got, () => prefillLayerReference({ chunk: sc.ref, compressRatio: 0, q, caches, smScale: args.smScale }), sc.numQueries, hQ, 512);
      expect(problem).toBeNull();
    } finally {
      await live.dispose();
    }
  });
});
