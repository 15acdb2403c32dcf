/**
 * What the API fuzzer found in the float64 reference (sparse-mla/reference), one focused case each:
 * every one threw an untyped error or answered wrongly (and so judged the library wrongly) before
 * its fix. Each test names its session in its describe, or its commit in a comment. Moved from
 * test/fuzz_findings.test.ts and test/fuzz_findings_s62.test.ts.
 *
 * The float64 reference (`sparse-mla/reference`, a public entry point) sized its per-query scratch by
 * the index set's width and q's head count, which a call without query rows does not bound by any data:
 * pagedSparseAttentionReference over indices of shape [0, 2^32] (or [0, 1, 2^32]) and
 * sparsePrefillReference over a q of shape [0, 2^31 − 1, 576] threw an untyped RangeError ("Invalid
 * typed array length") where its other scratch refuses TOO_LARGE. Found by the fuzzer's referenceApi
 * target: `node test/fuzz/run.mjs --backends cpu --seed 352 --case 2375`.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createKvCache, createPlan, prefillLayer, tensor, toBf16 } from '../dist/index.js';
import type { PagedSparseAttentionArgs, SparsePrefillArgs } from '../dist/index.js';
import { AttentionComparator, DequantizedRows, dequantizeKCacheReference, pagedSparseAttentionReference, prefillLayerReference, quantizeKCacheReference, sparsePrefillReference } from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { randomCache, randomScenario } from './helpers/chunks.js';
import { judgeAttention } from './fuzz/targets.mjs';
import { errorOf } from './helpers/errors.js';
import { hostEngines } from './helpers/findings.js';

const rng = testRng('reference_findings');
const engines = hostEngines();

// fuzzer finding, 8ea9b61 (long run, seed 200)
test('sparsePrefillReference: valid entries whose logits are all −inf give lse −inf as SPEC §4 says (ln Σ exp = ln 0; was NaN)', () => {
  const kv = tensor('float32', [3, 576], new Float32Array(3 * 576).fill(0.5));
  const q = new Uint16Array(576);
  q[0] = 0xff80; // −inf: every logit −inf against rows of 0.5
  const ref = sparsePrefillReference({ q: tensor('bf16', [1, 1, 576], q), kv: toBf16(kv), indices: tensor('int32', [1, 3], new Int32Array([0, 1, 2])), smScale: 1, dV: 512 });
  expect(ref.maxLogits[0]).toBe(-Infinity);
  expect(ref.lse[0]).toBe(-Infinity);
});

// fuzzer finding, 0eef3b7
test('prefillLayerReference: a +inf logit gives lse +inf as SPEC §4 says (was NaN), as sparsePrefillReference gives it', () => {
  const sc = randomScenario(rng, [8], [2]);
  // every cache row 0.5 (exact in e4m3 and bf16): +inf in one dim of q makes every logit +inf
  const swa = createKvCache('v4', { pageSize: 64, numPages: sc.swaPages });
  const tokens = 64 * sc.swaPages;
  quantizeKCacheReference(swa, Array.from({ length: tokens }, (_, i) => i), tensor('float32', [tokens, 512], new Float32Array(tokens * 512).fill(0.5)));
  const q = tensor('bf16', [sc.numQueries, 1, 512], new Uint16Array(sc.numQueries * 512));
  q.data[0] = 0x7f80;
  const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 0, q, caches: { swa }, smScale: 1 });
  expect(ref.maxLogits[0]).toBe(Infinity);
  expect(ref.lse[0]).toBe(Infinity);
  expect(Number.isFinite(ref.lse[1])).toBe(true);
});

describe("the fuzzer's oracle and the reference against the API (session 46)", () => {
  test('the reference reads a cache\'s bytes by byteLength, as the library does: a Uint8Array subclass whose length getter lies is no refusal (H100 cuda fuzz seed 3 case 3780, a soft ref-refused)', () => {
    const cache = randomCache(rng, 16, 3);
    class Lying extends Uint8Array {
      override get length(): number {
        return super.length + 1000;
      }
    }
    const lying = { ...cache, data: new Lying(cache.data) };
    const ids = [0, 2, 47, 2];
    expect(Array.from(dequantizeKCacheReference(lying, ids))).toEqual(Array.from(dequantizeKCacheReference(cache, ids)));
  });

  test('the reference takes an optional tensor given as null (attnSink, topkLength, the extra set) as absent, as the ops do (it threw TypeError on attnSink: null: the fuzzer\'s soft ref-refused, H200 seed 1)', async () => {
    const a = randomPrefillArgs(rng, { sQ: 3, hQ: 2, dQK: 512, sKV: 20, topk: 8 }, { invalidFraction: 0.2, duplicateFraction: 0.2 });
    const withNulls = { ...a, attnSink: null, topkLength: null } as unknown as SparsePrefillArgs;
    const ref = sparsePrefillReference(withNulls);
    expect(Array.from(ref.out)).toEqual(Array.from(sparsePrefillReference(a).out));
    const kCache = randomCache(rng, 16, 3);
    const paged = { q: tensor('bf16', [3, 2, 512], randomBf16Bits(rng, 3 * 2 * 512)), kCache, indices: tensor('int32', [3, 4], new Int32Array([0, 5, 47, -1, 3, 3, 48, 9, 1, 2, 3, 4])), smScale: 0.04 };
    const pagedNulls = { ...paged, topkLength: null, attnSink: null, extraKCache: null, extraIndices: null, extraTopkLength: null } as unknown as PagedSparseAttentionArgs;
    const pagedRef = pagedSparseAttentionReference(pagedNulls);
    expect(Array.from(pagedRef.out)).toEqual(Array.from(pagedSparseAttentionReference(paged).out));
    for (const engine of engines) {
      expectWithinBounds(`${engine.backend}: sparsePrefill with null sink and lengths`, await engine.sparsePrefill(withNulls), ref, [0, 1, 2]);
      expectWithinBounds(`${engine.backend}: pagedSparseAttention with null optional tensors`, await engine.pagedSparseAttention(pagedNulls), pagedRef, [0, 1, 2]);
    }
  });
});

describe("hostile input the fuzzer's session-51 generators reach (session 51, helper-52)", () => {
  test("the layer reference takes a sink of +inf by §4's math, as the ops' reference and every backend do: out = 0 over finite logits, NaN where a logit is +inf or NaN (it gave out = 0 whatever the logits: a false wrong-result, cpu seed 27 case 1068)", async () => {
    const sc = randomScenario(rng, [rng.int(20, 60)], [rng.int(2, 5)]);
    const caches = { swa: randomCache(rng, 64, sc.swaPages) };
    const plan = createPlan(sc.chunk);
    const hQ = 3;
    const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
    // head 1 (sink +inf) of query 0 gets a NaN q element (the fuzzer's case had −inf ones): its logits are NaN; head 2 (sink +inf) keeps finite logits
    q.data[(0 * hQ + 1) * 512 + rng.int(0, 512)] = 0x7fc0;
    const attnSink = tensor('float32', [hQ], Float32Array.from([rng.normal(), Infinity, Infinity]));
    const args = { q, compressRatio: 0 as const, plan, caches, smScale: 0.04, attnSink };
    const ref = prefillLayerReference({ chunk: sc.ref, ...args });
    const at = (h: number, i = 0) => ref.out[(i * hQ + h) * 512]!;
    expect(Number.isNaN(at(1)), 'query 0, head 1: a non-finite logit over a +inf sink').toBe(true);
    for (let i = 0; i < sc.numQueries; i++) expect(at(2, i), `query ${i}, head 2: finite logits over a +inf sink`).toBe(0);
    for (const engine of engines) {
      for (const path of ['sparse', 'paged'] as const) {
        const got = await prefillLayer(engine, { ...args, path });
        expectWithinBounds(`${engine.backend} ${path}`, got, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
      }
    }
  });
});

describe("the reference's classes (sparse-mla/reference) over memory that changes after they were made, and their methods unbound (session 57, helper-77, by hand after the fuzzer's referenceApi target)", () => {
  function v4Cache(pageSize: number, numPages: number, buffer?: ArrayBuffer) {
    const cache = randomCache(rng, pageSize, numPages);
    if (!buffer) return cache;
    const data = new Uint8Array(buffer, 0, cache.data.length);
    data.set(cache.data);
    return { ...cache, data };
  }

  test('DequantizedRows refuses a new token with INVALID_VALUE naming cache.data once the cache\'s buffer was detached or shrunk since it was made (was a TypeError, detached, or a RangeError, shrunk, from a DataView); tokens dequantized before keep their rows, and the rows are the reference\'s', () => {
    const pageSize = rng.pick([2, 16, 64]);
    const cache = v4Cache(pageSize, 2);
    const tokens = pageSize * 2;
    const want = dequantizeKCacheReference(cache, [0, tokens - 1]);
    const rows = new DequantizedRows(cache, 512);
    const first = rows.offsetOf(0);
    expect(Array.from(rows.rows.subarray(first, first + 512))).toEqual(Array.from(want.subarray(0, 512)));
    structuredClone(cache.data.buffer, { transfer: [cache.data.buffer] });
    expect(() => rows.offsetOf(tokens - 1)).toThrow(expect.objectContaining({ code: 'INVALID_VALUE', argument: 'cache.data' }));
    expect(rows.offsetOf(0)).toBe(first);

    const bytes = createKvCache('v4', { pageSize, numPages: 2 }).data.length;
    const resizable = new ArrayBuffer(bytes, { maxByteLength: bytes + 64 });
    const shrinking = v4Cache(pageSize, 2, resizable);
    const other = new DequantizedRows(shrinking, 512);
    const at = other.offsetOf(tokens - 1);
    expect(Array.from(other.rows.subarray(at, at + 512))).toEqual(Array.from(dequantizeKCacheReference(shrinking, [tokens - 1])));
    resizable.resize(bytes - 1);
    expect(() => other.offsetOf(0)).toThrow(expect.objectContaining({ code: 'INVALID_VALUE', argument: 'cache.data' }));
  });

  test("DequantizedRows.offsetOf and AttentionComparator's add / result called on anything but one of theirs are INVALID_VALUE naming this (were TypeError); bound, they work", () => {
    const cache = v4Cache(2, 1);
    const rows = new DequantizedRows(cache, 512);
    const comparator = new AttentionComparator({ heads: 1, dV: 1 });
    const values = { out: [1], lse: [0], maxLogits: [0] };
    const ref = { out: new Float64Array([1]), lse: new Float64Array([0]), maxLogits: new Float64Array([0]), mag: new Float64Array([1]) };
    const calls: Array<() => unknown> = [];
    for (const self of [undefined, {}, Object.create(DequantizedRows.prototype), new Proxy(rows, {})]) calls.push(() => DequantizedRows.prototype.offsetOf.call(self, 0));
    for (const self of [undefined, {}, Object.create(AttentionComparator.prototype), new Proxy(comparator, {})]) {
      calls.push(() => AttentionComparator.prototype.add.call(self, values, ref));
      calls.push(() => AttentionComparator.prototype.result.call(self));
    }
    for (const call of calls) expect(call).toThrow(expect.objectContaining({ code: 'INVALID_VALUE', argument: 'this' }));
    expect(rows.offsetOf(1)).toBe(0);
    comparator.add(values, ref);
    expect(comparator.result().pass).toBe(true);
  });
});

describe('the float64 reference over index sets and head counts no query row bounds (session 62, helper-96, the fuzzer\'s referenceApi target, cpu seed 352 case 2375)', () => {
  const bits = (n: number) => new Uint16Array(n);
  const cache = () => createKvCache('v4', { pageSize: 1, numPages: 2 });

  test('pagedSparseAttentionReference refuses TOO_LARGE naming indices where the index sets are too wide to gather (was a RangeError), 2-d and 3-d indices, the extra set too', async () => {
    const q = tensor('bf16', [0, 1, 512], bits(0));
    const calls: [string, () => unknown][] = [
      ['indices [0, 2^32]', () => pagedSparseAttentionReference({ q, kCache: cache(), indices: tensor('int32', [0, 2 ** 32], new Int32Array(0)), smScale: 0.1 })],
      ['indices [0, 1, 2^32]', () => pagedSparseAttentionReference({ q, kCache: cache(), indices: tensor('int32', [0, 1, 2 ** 32], new Int32Array(0)), smScale: 0.1 })],
      ['extraIndices [0, 2^32]', () => pagedSparseAttentionReference({ q, kCache: cache(), indices: tensor('int32', [0, 3], new Int32Array(0)), extraKCache: cache(), extraIndices: tensor('int32', [0, 2 ** 32], new Int32Array(0)), smScale: 0.1 })],
    ];
    for (const [what, call] of calls) {
      const e = await errorOf(call);
      expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, `${what}: ${String(e)}`).toEqual({ code: 'TOO_LARGE', argument: 'indices' });
    }
  });

  test('sparsePrefillReference refuses TOO_LARGE naming q where q has no rows and 2^31 − 1 heads (was a RangeError)', async () => {
    const e = await errorOf(() => sparsePrefillReference({ q: tensor('bf16', [0, 2 ** 31 - 1, 576], bits(0)), kv: tensor('bf16', [1, 576], bits(576)), indices: tensor('int32', [0, 1], new Int32Array(0)), smScale: 0.1 }));
    expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, String(e)).toEqual({ code: 'TOO_LARGE', argument: 'q' });
  });

  test('the same references at sizes they can hold still answer: no rows gives empty outputs; a fresh random call agrees with the engines within SPEC §4.1', async () => {
    const none = pagedSparseAttentionReference({ q: tensor('bf16', [0, 3, 512], bits(0)), kCache: cache(), indices: tensor('int32', [0, 1, 4096], new Int32Array(0)), smScale: 0.1 });
    expect([none.out.length, none.lse.length, none.maxLogits.length]).toEqual([0, 0, 0]);
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), sKV = rng.int(1, 30), topk = rng.int(1, 10);
    const args = randomPrefillArgs(rng, { sQ, hQ, dQK: 576, sKV, topk }, { invalidFraction: 0.2 });
    for (const engine of engines) expect(judgeAttention(await engine.sparsePrefill(args), () => sparsePrefillReference(args), sQ, hQ, 512), engine.backend).toBeNull();
  });
});
