/**
 * A chunk split across engines (SPEC §10): by heads and by queries, N = 2 and 3 engines of the
 * backend under test against one engine running the whole chunk — the same bits (out, lse,
 * maxLogits) and the same dropped count, on both paths and every ratio; the split itself
 * (ranges, sub-chunks) and bad input.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, tensor, SparseMlaError } from '../dist/index.js';
import { createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, type PrefillPath, type ShardSplit } from '../dist/planner/index.js';
import { evenRanges, MAX_SHARDS } from '../dist/planner/sharded_layer.js';
import type { Engine } from '../dist/types.js';
import { chunkScenario } from '../dist/check/chunks.js';
import { backendUnderTest } from './helpers/backends.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { refusalOf } from './helpers/errors.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { standInDevice } from './helpers/stand_in_device.js';

const rng = testRng('sharded_layer.test');
const HQ = 6;
const D = 512;
const SM_SCALE = 1 / Math.sqrt(D);

let engines: Engine[] = [];
beforeAll(async () => {
  engines = await Promise.all([0, 1, 2].map(() => createEngine({ backend: backendUnderTest(), workers: 1 })));
});
afterAll(async () => {
  await Promise.all(engines.map((e) => e.dispose()));
});

test('evenRanges: contiguous, covering, sizes differing by at most one', () => {
  expect(evenRanges(10, 3)).toEqual([[0, 4], [4, 7], [7, 10]]);
  expect(evenRanges(2, 3)).toEqual([[0, 1], [1, 2], [2, 2]]);
  for (let i = 0; i < 20; i++) {
    const total = rng.int(0, 500), parts = rng.int(1, 9);
    const r = evenRanges(total, parts);
    expect(r.length).toBe(parts);
    expect(r[0]![0]).toBe(0);
    expect(r[parts - 1]![1]).toBe(total);
    for (let p = 1; p < parts; p++) expect(r[p]![0]).toBe(r[p - 1]![1]);
    const sizes = r.map(([a, b]) => b - a);
    expect(Math.max(...sizes) - Math.min(...sizes)).toBeLessThanOrEqual(1);
  }
});

describe('N engines give the bits of one', () => {
  const cases: Array<[0 | 4 | 128, ShardSplit, number, PrefillPath]> = [];
  for (const ratio of [0, 4, 128] as const) for (const split of ['heads', 'queries'] as const) for (const n of [2, 3]) cases.push([ratio, split, n, n === 2 ? 'sparse' : 'paged']);
  test.each(cases)('ratio %i, split by %s over %i engines, %s path', async (ratio, split, n, path) => {
    // a fresh request, a long mid-sequence one, one short of the ratio, an empty one, a random one
    const seqLens = [rng.int(5, 40), rng.int(300, 700), rng.int(100, 128), rng.int(10, 300), rng.int(130, 500)];
    const extendLens = [seqLens[0]!, rng.int(10, 30), rng.int(1, 8), 0, rng.int(1, 20)];
    const sc = randomScenario(rng, seqLens, extendLens);
    const caches = { swa: randomCache(rng, 64, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages), c128: randomCache(rng, sc.c128PageSize, sc.c128Pages) };
    const q = tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1));
    const sinkVals = new Float32Array(HQ).map(() => rng.normal());
    sinkVals[1] = -Infinity;
    const attnSink = tensor('float32', [HQ], sinkVals);
    const topkIndices = ratio === 4 ? randomTopk(rng, sc, 24) : undefined;
    const args = { compressRatio: ratio, q, caches, smScale: SM_SCALE, attnSink, path, ...(topkIndices ? { topkIndices } : {}) };

    const one = await prefillLayer(engines[0]!, { ...args, plan: createPlan(sc.chunk, { caches }) });
    const sharded = createShardedPlan(sc.chunk, { shards: n, split, caches });
    expect(sharded.shards.length).toBe(n);
    if (split === 'queries') {
      expect(sharded.shards.map((s) => s.numQueries).reduce((a, b) => a + b, 0)).toBe(sc.numQueries);
      sharded.shards.forEach((s) => expect(s.plan.numQueries).toBe(s.numQueries));
    }
    const got = await prefillLayerSharded(engines.slice(0, n), { ...args, plan: sharded });
    expect(got.shards.every((s) => s.path === path)).toBe(true);
    expect(got.out!.data).toEqual(one.out.data);
    expect(got.lse!.data).toEqual(one.lse.data);
    expect(got.maxLogits!.data).toEqual(one.maxLogits.data);
    expect(got.dropped).toBe(one.dropped);
  });
});

test('options and args that inherit their fields (window, path, smScale) count as own fields, as for createPlan and prefillLayer', async () => {
  // a window other than the default, so a lost window changes the plan (before: the SWA ids' count was refused)
  const window = 64;
  const requests = [{ seqLen: rng.int(150, 400), extendLen: rng.int(5, 20) }, { seqLen: rng.int(20, 60), extendLen: rng.int(5, 20) }];
  const sc = chunkScenario(rng, requests, { window, c4PageSize: 16, c128PageSize: 2 });
  const caches = { swa: randomCache(rng, 64, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages), c128: randomCache(rng, sc.c128PageSize, sc.c128Pages) };
  const q = tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1));
  const one = await prefillLayer(engines[0]!, { compressRatio: 128, q, caches, smScale: SM_SCALE, path: 'paged', plan: createPlan(sc.chunk, { caches, window }) });
  const options = Object.create({ shards: 2, split: 'queries', caches, window });
  const sharded = createShardedPlan(sc.chunk, options);
  // before: smScale and path were dropped (INVALID_VALUE smScale ... got undefined)
  const args = Object.create({ compressRatio: 128, q, caches, smScale: SM_SCALE, path: 'paged', plan: sharded });
  const got = await prefillLayerSharded(engines.slice(0, 2), args);
  expect(got.shards.every((s) => s.path === 'paged')).toBe(true);
  expect(got.out!.data).toEqual(one.out.data);
  expect(got.lse!.data).toEqual(one.lse.data);
  sharded.release();
});

test('bad input: engine count, split, shard count', async () => {
  const sc = randomScenario(rng, [200], [20]);
  const caches = { swa: randomCache(rng, 64, sc.swaPages) };
  const plan = createShardedPlan(sc.chunk, { shards: 2, split: 'queries' });
  const q = tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1));
  const call = prefillLayerSharded(engines.slice(0, 3), { plan, compressRatio: 0, q, caches, smScale: SM_SCALE });
  await expect(call).rejects.toThrow(SparseMlaError);
  await expect(call).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'engines' });
  expect(() => createShardedPlan(sc.chunk, { shards: 0, split: 'heads' })).toThrow(/options\.shards/);
  expect(() => createShardedPlan(sc.chunk, { shards: 2, split: 'rows' as never })).toThrow(/options\.split/);
  const byHeads = createShardedPlan(sc.chunk, { shards: 3, split: 'heads' });
  const q2 = tensor('bf16', [sc.numQueries, 2, D], randomBf16Bits(rng, sc.numQueries * 2 * D, 1));
  await expect(prefillLayerSharded(engines, { plan: byHeads, compressRatio: 0, q: q2, caches, smScale: SM_SCALE })).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'engines' });
});

test('hostile input: shard count, per-shard q, a [numQueries, 1, topk] top-k split by queries, sink and top-k shapes', async () => {
  const sc = randomScenario(rng, [300, 150], [30, 12]);
  const caches = { swa: randomCache(rng, 64, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages) };
  // a shard per engine: a count no host has is refused before anything is built (2^53 − 1 was a RangeError, 1e9 an out-of-memory abort)
  for (const shards of [MAX_SHARDS + 1, 2 ** 53 - 1]) {
    const [code, argument] = refusalOf(() => createShardedPlan(sc.chunk, { shards, split: 'heads' }));
    expect({ code, argument }).toEqual({ code: 'INVALID_VALUE', argument: 'options.shards' });
  }
  const nq = sc.numQueries;
  const q = tensor('bf16', [nq, HQ, D], randomBf16Bits(rng, nq * HQ * D, 1));
  const topk = randomTopk(rng, sc, 16);
  const args = { compressRatio: 4 as const, q, caches, smScale: SM_SCALE, path: 'sparse' as const };
  const byQueries = createShardedPlan(sc.chunk, { shards: 2, split: 'queries' });
  // prefillLayer takes [numQueries, 1, topk] as [numQueries, topk]; the split by queries must cut it by its last dim
  const one = await prefillLayer(engines[0]!, { ...args, plan: createPlan(sc.chunk), topkIndices: topk });
  const rank3 = tensor('int32', [nq, 1, 16], topk.data);
  const got = await prefillLayerSharded(engines.slice(0, 2), { ...args, plan: byQueries, topkIndices: rank3 });
  expect(got.out!.data).toEqual(one.out.data);
  expect(got.dropped).toBe(one.dropped);
  // shapes that were sliced blindly (silently wrong outputs) or read unchecked (TypeError)
  const [n0, n1] = byQueries.shards.map((s) => s.numQueries) as [number, number];
  const shardQ = (n: number, h: number) => tensor('bf16', [n, h, D], randomBf16Bits(rng, n * h * D, 1));
  const byHeads = createShardedPlan(sc.chunk, { shards: 2, split: 'heads' });
  const refused: Array<[string, Promise<unknown>, string, string]> = [
    ['per-shard q of another head count', prefillLayerSharded(engines.slice(0, 2), { ...args, plan: byQueries, q: [shardQ(n0, HQ), shardQ(n1, HQ - 2)], topkIndices: topk }), 'INVALID_SHAPE', 'q[1]'],
    ['per-shard q null', prefillLayerSharded(engines.slice(0, 2), { ...args, plan: byQueries, q: [null, null] as never, topkIndices: topk }), 'INVALID_VALUE', 'q[0]'],
    ['host top-k of the wrong row count', prefillLayerSharded(engines.slice(0, 2), { ...args, plan: byQueries, topkIndices: tensor('int32', [nq - 1, 16]) }), 'INVALID_SHAPE', 'topkIndices'],
    ['sink of the wrong length, split by heads', prefillLayerSharded(engines.slice(0, 2), { ...args, plan: byHeads, topkIndices: topk, attnSink: tensor('float32', [HQ - 1]) }), 'INVALID_SHAPE', 'attnSink'],
  ];
  for (const [name, call, code, argument] of refused) {
    const err = await call.catch((e: unknown) => e);
    expect(err, name).toBeInstanceOf(SparseMlaError);
    expect(err, name).toMatchObject({ code, argument });
  }
});

test('cuda engines (a stand-in device): a shard that fails (its launch fails) frees the device outputs the other shards made and rejects with its error once all have settled; a disposed engine is refused before any shard runs; options are checked before any work', async () => {
  const device = standInDevice();
  const n = 256;
  const chunk = { requests: [{ seqLen: n, extendLen: n, swaTokenIds: Int32Array.from({ length: n }, (_, i) => i) }] };
  const plan = createShardedPlan(chunk, { shards: 2, split: 'heads' });
  const args = { plan, compressRatio: 0 as const, q: tensor('bf16', [n, 4, D]), caches: { swa: createKvCache('v4', { pageSize: 64, numPages: n / 64 }) }, smScale: SM_SCALE, path: 'sparse' as const };
  // the failing shard's prefill launch fails as the addon's op rejects
  const launchFailure = () => Object.assign(new Error('sparsePrefill: CUDA failed'), { code: 'SMLA_CUDA_ERROR', status: 'cudaErrorLaunchFailure: unspecified launch failure' });
  const live = device.engine(0), dead = device.engine(1, { sparsePrefill: () => Promise.reject(launchFailure()) });
  device.reset();
  const sizes: number[] = [];
  for (let call = 0; call < 3; call++) {
    await expect(prefillLayerSharded([live.engine, dead.engine], args, { output: 'device' })).rejects.toMatchObject({ code: 'BACKEND_FAILURE' });
    await new Promise((r) => setTimeout(r, 20)); // (a shard still running after the rejection would allocate its outputs now)
    sizes.push(device.live.size);
  }
  // what the plan keeps on the live engine after its first layer, and nothing per call
  expect(sizes[0]).toBeGreaterThan(0);
  expect(sizes).toEqual([sizes[0], sizes[0], sizes[0]]);
  // what the shards' plans keep goes with release()
  plan.release();
  expect(device.live.size).toBe(0);
  for (const options of [null, { output: 'gpu' }, 'device']) {
    device.reset();
    await expect(prefillLayerSharded([live.engine, dead.engine], args, options as never)).rejects.toMatchObject({ code: 'INVALID_VALUE' });
    expect(device.ops).toEqual([]);
  }
  // a disposed engine in the list: DISPOSED once the arguments are checked, before any shard runs
  await dead.engine.dispose();
  device.reset();
  await expect(prefillLayerSharded([live.engine, dead.engine], args, { output: 'device' })).rejects.toMatchObject({ code: 'DISPOSED' });
  expect(device.ops).toEqual([]);
  await live.engine.dispose();
});
