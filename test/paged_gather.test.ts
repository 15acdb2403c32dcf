/**
 * The host backends' paged op over a compact cache of only the tokens it reads
 * (src/backends/paged_gather.ts). The gather and the id rewrite against an independent reading of
 * SPEC §5's validity rule; then, on wasm and (when the addon is built) cpu, the same calls read
 * through the whole caches and through compact ones give the same bits, both within §4.1's bounds
 * of the float64 reference, on fresh random inputs and the edge cases; the estimate picks the
 * compact form where a few tokens of a large cache are read, and the cache is read at the call.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine, KvCache, PagedSparseAttentionArgs } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { planPagedRead, remapIndices, gatherCompact, pagedReadForTests, type HostPagedSet } from '../dist/backends/paged_gather.js';
import { tokenByteRanges, v4PageBytes, V4_COMPACT_PAGE_SIZE, V4_TOKEN_DATA_BYTES, V4_TOKEN_SCALE_BYTES } from '../dist/kv_cache_layout.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, sampleRows, testRng, type Rng } from './helpers/random.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { mixedIds, resultBits } from './helpers/kv_gather.js';

const rng = testRng('paged_gather.test');


function cacheView(pageSize: number, numPages: number, r: Rng) {
  const bytes = numPages * v4PageBytes(pageSize);
  const data = Uint8Array.from({ length: bytes }, () => r.int(0, 256));
  return { format: 'v4' as const, pageSize, numPages, numTokens: pageSize * numPages, bytes, data };
}

describe('plan, remap and gather against an independent reading of SPEC §5', () => {
  const shapes: Array<[pageSize: number, numPages: number, n: number, topk: number, lengths: boolean]> = [
    [64, 9, 13, 40, true],
    [2, 150, 7, 33, false],
    [256, 2, 5, 300, true],
    [V4_COMPACT_PAGE_SIZE, 3, 6, 90, true],
    [64, 4, 0, 16, false],
    [64, 4, 5, 0, false],
  ];
  for (const [P, pages, n, topk, lengths] of shapes) {
    test(`P=${P} × ${pages} pages, n=${n}, topk=${topk}${lengths ? ', lengths' : ''}`, () => {
      const cache = cacheView(P, pages, rng);
      const tokens = P * pages;
      const indices = mixedIds(rng, n * topk, tokens);
      const topkLength = lengths ? Int32Array.from({ length: n }, (_, i) => (i === 0 ? 0 : rng.int(0, topk + 1))) : null;
      const set: HostPagedSet = { cache, indices, topk, topkLength };
      // the expected reads: entries k < length with 0 <= id < tokens, nothing else
      const read = new Set<number>();
      for (let i = 0; i < n; i++) {
        const lim = topkLength ? topkLength[i]! : topk;
        for (let k = 0; k < lim; k++) {
          const id = indices[i * topk + k]!;
          if (id >= 0 && id < tokens) read.add(id);
        }
      }
      const expected = [...read].sort((a, b) => a - b);
      const plan = planPagedRead(set, n)!;
      expect(Array.from(plan.tokens)).toEqual(expected);
      expect(plan.pageSize).toBe(V4_COMPACT_PAGE_SIZE);
      expect(plan.numPages).toBe(Math.ceil(expected.length / V4_COMPACT_PAGE_SIZE));
      expect(plan.bytes).toBe(plan.numPages * v4PageBytes(V4_COMPACT_PAGE_SIZE));
      // more distinct tokens than allowed: no plan; exactly as many: the plan
      if (expected.length > 0) expect(planPagedRead(set, n, expected.length - 1)).toBeNull();
      expect(planPagedRead(set, n, expected.length)?.tokens.length).toBe(expected.length);

      const remapped = remapIndices(set, n, plan);
      expect(remapped.length).toBe(n * topk);
      for (let i = 0; i < n; i++) {
        const lim = topkLength ? topkLength[i]! : topk;
        for (let k = 0; k < topk; k++) {
          const id = indices[i * topk + k]!;
          const got = remapped[i * topk + k]!;
          if (k < lim && id >= 0 && id < tokens) expect(expected[got]).toBe(id);
          else expect(got).toBe(-1);
        }
      }

      // every gathered token's bytes are its source's; filler around them shows nothing else is written
      const into = new Uint8Array(plan.bytes + 64).fill(0xa5);
      const data = gatherCompact(cache, plan, into);
      expect(data.byteLength).toBe(plan.bytes);
      const compact = { format: 'v4' as const, pageSize: V4_COMPACT_PAGE_SIZE };
      const written = new Uint8Array(plan.bytes);
      expected.forEach((id, j) => {
        const src = tokenByteRanges(cache, id);
        const dst = tokenByteRanges(compact, j);
        expect(Buffer.from(data.subarray(dst.data, dst.data + V4_TOKEN_DATA_BYTES)).equals(Buffer.from(cache.data.subarray(src.data, src.data + V4_TOKEN_DATA_BYTES)))).toBe(true);
        expect(Buffer.from(data.subarray(dst.scales, dst.scales + V4_TOKEN_SCALE_BYTES)).equals(Buffer.from(cache.data.subarray(src.scales, src.scales + V4_TOKEN_SCALE_BYTES)))).toBe(true);
        written.fill(1, dst.data, dst.data + V4_TOKEN_DATA_BYTES);
        written.fill(1, dst.scales, dst.scales + V4_TOKEN_SCALE_BYTES);
      });
      for (let b = 0; b < into.length; b++) if (b >= plan.bytes || written[b] === 0) expect(into[b], `byte ${b}`).toBe(0xa5);
    });
  }

  test('ids only past topkLength or outside the cache are never gathered', () => {
    const cache = cacheView(64, 2, rng);
    const indices = Int32Array.from([5, 6, 7, 100, 101, -1, 128, 127, 9, 9, 2 ** 31 - 1, 3]);
    const plan = planPagedRead({ cache, indices, topk: 4, topkLength: Int32Array.from([2, 4, 0]) }, 3)!;
    // row 0 reads 5, 6 (7, 100 past its length); row 1: 101, 127 (−1, 128 invalid); row 2 nothing
    expect(Array.from(plan.tokens)).toEqual([5, 6, 101, 127]);
    expect(plan.runs).toBe(3);
  });
});


const backends = ['wasm' as const, ...(nativeAddonBuilt() ? ['cpu' as const] : [])];

describe.each(backends)('pagedSparseAttention through compact caches on %s', (backend) => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ backend, workers: 2 });
  }, 60_000);
  afterAll(async () => {
    pagedReadForTests.force = null;
    await engine?.dispose();
  });

  /** A v4 cache whose tokens `fill` (default all) hold quantized random rows; the rest stay zero. */
  async function cacheOf(pageSize: number, numPages: number, std: number, fill?: number[]): Promise<KvCache> {
    const cache = createKvCache('v4', { pageSize, numPages });
    const ids = fill ?? Array.from({ length: pageSize * numPages }, (_, i) => i);
    if (ids.length > 0) await engine.quantizeKCache({ cache, tokenIds: ids, rows: tensor('bf16', [ids.length, 512], randomBf16Bits(rng, ids.length * 512, std)) });
    return cache;
  }

  /** Runs args whole, compact and by the estimate: same bits each time, within the bounds of the reference. */
  async function expectSameAndCorrect(label: string, args: PagedSparseAttentionArgs, sets: number): Promise<void> {
    const runs = [];
    for (const force of ['whole', 'compact'] as const) {
      pagedReadForTests.force = force;
      const before = pagedReadForTests.compactSets;
      runs.push(await engine.pagedSparseAttention(args));
      expect(pagedReadForTests.compactSets - before, `${label}: sets read compact when forced ${force}`).toBe(force === 'compact' ? sets : 0);
    }
    pagedReadForTests.force = null;
    runs.push(await engine.pagedSparseAttention(args));
    const [whole, compact, chosen] = runs.map(resultBits);
    expect(compact!.every((b, i) => b.equals(whole![i]!)), `${label}: compact and whole bits`).toBe(true);
    expect(chosen!.every((b, i) => b.equals(whole![i]!)), `${label}: the estimate's choice and whole bits`).toBe(true);
    const n = args.q.shape[0]!;
    const queries = sampleRows(rng, n, Math.min(n, 12));
    expectWithinBounds(`${label} vs reference`, runs[1]!, R.pagedSparseAttentionReference(args, { queries }), queries);
  }

  test('random main + extra sets, lengths and sink', async () => {
    const n = 24, hQ = 16, topk = 96, topkExtra = 48;
    const kCache = await cacheOf(64, 12, 1);
    const extraKCache = await cacheOf(2, 150, 0.5);
    await expectSameAndCorrect('random', {
      q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512, 1)),
      kCache,
      indices: tensor('int32', [n, topk], mixedIds(rng, n * topk, 64 * 12)),
      topkLength: tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => (i === 0 ? 0 : rng.int(1, topk + 8)))),
      extraKCache,
      extraIndices: tensor('int32', [n, topkExtra], mixedIds(rng, n * topkExtra, 300)),
      extraTopkLength: tensor('int32', [n], Int32Array.from({ length: n }, () => rng.int(0, topkExtra + 1))),
      attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h === 0 ? Infinity : h === 1 ? -Infinity : rng.normal()))),
      smScale: 0.044,
    }, 2);
  });

  test('edge cases: all ids invalid, duplicates, topkLength 0, the last token, no extra set, int64 ids, topk 0, n = 0', async () => {
    const hQ = 4;
    const kCache = await cacheOf(64, 3, 1);
    const extraKCache = await cacheOf(256, 1, 1);
    const last = 64 * 3 - 1;
    const q = (n: number) => tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512, 1));
    await expectSameAndCorrect('all invalid', {
      q: q(3), kCache, indices: tensor('int32', [3, 4], Int32Array.from([-1, last + 1, 2 ** 31 - 1, -(2 ** 31), -5, -5, 999, 192, 193, -1, -1, -1])),
      extraKCache, extraIndices: tensor('int32', [3, 2], Int32Array.from([256, -1, 300, 256, -1, 1000])), smScale: 0.05,
    }, 2);
    await expectSameAndCorrect('duplicates', {
      q: q(4), kCache, indices: tensor('int32', [4, 6], Int32Array.from([7, 7, 7, 7, 7, 7, 1, 2, 1, 2, 1, 2, last, last, 0, 0, -1, last, 5, 6, 7, 5, 6, 7])), smScale: 0.05,
    }, 1);
    await expectSameAndCorrect('topkLength 0', {
      q: q(3), kCache, indices: tensor('int32', [3, 4], Int32Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])), topkLength: tensor('int32', [3], new Int32Array(3)),
      extraKCache, extraIndices: tensor('int32', [3, 2], Int32Array.from([0, 1, 2, 3, 4, 5])), extraTopkLength: tensor('int32', [3], Int32Array.from([0, 2, 1])), smScale: 0.05,
    }, 2);
    await expectSameAndCorrect('the last token, no extra set', {
      q: q(3), kCache, indices: tensor('int32', [3, 3], Int32Array.from([last, last + 1, last - 1, 0, last, 64, last, last, last])), smScale: 0.05,
    }, 1);
    await expectSameAndCorrect('int64 ids', {
      q: q(2), kCache, indices: tensor('int64', [2, 3], BigInt64Array.from([3n, BigInt(last), 2n ** 40n, -1n, BigInt(last + 1), 9n])), smScale: 0.05,
    }, 1);
    await expectSameAndCorrect('topk 0 with an extra set', {
      q: q(2), kCache, indices: tensor('int32', [2, 0], new Int32Array(0)), extraKCache, extraIndices: tensor('int32', [2, 2], Int32Array.from([255, 0, 256, 17])), smScale: 0.05,
    }, 2);
    for (const force of ['whole', 'compact'] as const) {
      pagedReadForTests.force = force;
      const r = await engine.pagedSparseAttention({ q: q(0), kCache, indices: tensor('int32', [0, 5], new Int32Array(0)), smScale: 0.05 });
      expect([r.out.shape, r.lse.shape, r.out.data.length]).toEqual([[0, hQ, 512], [0, hQ], 0]);
    }
    pagedReadForTests.force = null;
  });

  test('a few tokens of a large cache: read compact by the estimate, and read at the call', async () => {
    const n = 16, hQ = 8, window = 128, pageSize = 64, numPages = 96;
    const tokens = pageSize * numPages;
    // a sliding window at the end of the cache, as a c0 chunk reads its SWA cache
    const first = tokens - n - window + 1;
    const used = Array.from({ length: n + window - 1 }, (_, i) => first + i);
    const kCache = await cacheOf(pageSize, numPages, 1, used);
    const indices = Int32Array.from({ length: n * window }, (_, e) => first + Math.floor(e / window) + (e % window));
    const args: PagedSparseAttentionArgs = { q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512, 1)), kCache, indices: tensor('int32', [n, window], indices), smScale: 0.05 };
    await expectSameAndCorrect('window', args, 1);
    const expected = resultBits(await engine.pagedSparseAttention(args));
    const before = pagedReadForTests.compactSets;
    const pending = engine.pagedSparseAttention(args);
    // README: arrays not in shared memory may be reused once the call has returned its promise
    const saved = kCache.data.slice();
    kCache.data.fill(0x7f);
    indices.fill(0);
    const got = resultBits(await pending);
    expect(pagedReadForTests.compactSets - before).toBe(1);
    expect(got.every((b, i) => b.equals(expected[i]!))).toBe(true);
    kCache.data.set(saved);
    indices.set(Int32Array.from({ length: n * window }, (_, e) => first + Math.floor(e / window) + (e % window)));
    // in a SharedArrayBuffer: cpu reads it in place (no gather), wasm still gathers (each worker would copy it whole)
    const shared = new Uint8Array(new SharedArrayBuffer(kCache.data.byteLength));
    shared.set(kCache.data);
    const sharedBefore = pagedReadForTests.compactSets;
    const inPlace = resultBits(await engine.pagedSparseAttention({ ...args, kCache: { ...kCache, data: shared } }));
    expect(pagedReadForTests.compactSets - sharedBefore).toBe(backend === 'cpu' ? 0 : 1);
    expect(inPlace.every((b, i) => b.equals(expected[i]!))).toBe(true);
  });
});
