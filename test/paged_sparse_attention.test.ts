/**
 * pagedSparseAttention (SPEC §5) through the engine: against its float64 reference, and against
 * sparsePrefill run on a workspace of the same entries dequantized (the two paths the router
 * chooses between must agree within §4's bounds). Main + extra caches of different page sizes,
 * out-of-range ids skipped; the grid's three data regimes.
 */
import { describe, expect, test } from 'vitest';
import { createKvCache, tensor } from '../dist/index.js';
import type { KvCache, PagedSparseAttentionArgs, Tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, sampleRows, type Rng } from './helpers/random.js';
import { regimeValues, type DataRegime } from '../dist/check/grid.js';
import { opSuite } from './helpers/suite.js';

const suite = opSuite('paged_sparse_attention.test');
const rng = suite.rng;

/** A v4 cache filled through the engine with random rows (per-token magnitudes vary). */
async function filledCache(pageSize: number, numPages: number, std: number, mean = 0): Promise<KvCache> {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const rows = tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512, std, mean));
  await suite.engine.quantizeKCache({ cache, tokenIds: Array.from({ length: n }, (_, i) => i), rows });
  return cache;
}

/** [n, topk] token ids: valid ids mixed with ids outside the cache (≥ tokens, negative, huge). */
function tokenIndices(r: Rng, n: number, topk: number, tokens: number, invalidFraction: number): Int32Array {
  const bad = [-1, -7, tokens, tokens + 1, 2 ** 31 - 1, -(2 ** 31), -123456];
  return Int32Array.from({ length: n * topk }, () => (r.uniform() < invalidFraction ? r.pick(bad) : r.int(0, tokens)));
}

/**
 * The same attention as a workspace: every valid entry of row i (main first, then extra, in order)
 * rebased into a dequantized kv and an index row padded with −1.
 */
async function asWorkspace(args: PagedSparseAttentionArgs): Promise<{ kv: Tensor<'bf16'>; indices: Tensor<'int32'> }> {
  const n = args.q.shape[0]!;
  const sets: { cache: KvCache; idx: Tensor<'int32'>; len?: Tensor<'int32'> }[] = [{ cache: args.kCache, idx: args.indices, len: args.topkLength }];
  if (args.extraKCache && args.extraIndices) sets.push({ cache: args.extraKCache, idx: args.extraIndices, len: args.extraTopkLength });
  const rowsPerQuery: number[][] = Array.from({ length: n }, () => []);
  const gathers: number[][] = sets.map(() => []);
  let width = 0;
  let offset = 0;
  const bases: number[] = [];
  for (let s = 0; s < sets.length; s++) {
    const { cache, idx, len } = sets[s]!;
    const tokens = cache.pageSize * cache.numPages;
    const topk = idx.shape[idx.shape.length - 1]!;
    width += topk;
    bases.push(offset);
    for (let i = 0; i < n; i++) {
      const lim = len ? Math.min(topk, len.data[i]!) : topk;
      for (let k = 0; k < lim; k++) {
        const id = idx.data[i * topk + k]!;
        if (id < 0 || id >= tokens) continue;
        rowsPerQuery[i]!.push(offset + gathers[s]!.length);
        gathers[s]!.push(id);
      }
    }
    offset += gathers[s]!.length;
  }
  const parts = await Promise.all(sets.map((s, j) => suite.engine.dequantizeKCachePaged({ cache: s.cache, tokenIds: gathers[j]! })));
  const kv = new Uint16Array(offset * 512);
  parts.forEach((p, j) => kv.set(p.data, bases[j]! * 512));
  const indices = new Int32Array(n * Math.max(1, width)).fill(-1);
  rowsPerQuery.forEach((rows, i) => indices.set(rows, i * Math.max(1, width)));
  return { kv: tensor('bf16', [offset, 512], kv), indices: tensor('int32', [n, Math.max(1, width)], indices) };
}

interface PagedCase {
  name: string;
  regime: DataRegime;
  n: number;
  hQ: number;
  main: [pageSize: number, numPages: number];
  topk: number;
  extra?: [pageSize: number, numPages: number, topkExtra: number];
  lengths: boolean;
  sink: boolean;
}

const CASES: PagedCase[] = [
  { name: 'unit: main only, P=64', regime: 'unit', n: 40, hQ: 16, main: [64, 4], topk: 128, lengths: false, sink: false },
  { name: 'flashmla: main P=256 + extra P=2, sink, lengths', regime: 'flashmla', n: 33, hQ: 64, main: [256, 2], topk: 128, extra: [2, 100, 64], lengths: true, sink: true },
  { name: 'cancel: main P=2 + extra P=64', regime: 'cancel', n: 17, hQ: 128, main: [2, 150], topk: 64, extra: [64, 3, 192], lengths: false, sink: true },
  { name: 'unit: main P=64 + extra P=256, hQ=1', regime: 'unit', n: 50, hQ: 1, main: [64, 3], topk: 256, extra: [256, 1, 128], lengths: true, sink: false },
];

describe('paged vs reference and vs sparse prefill on the dequantized entries', () => {
  for (const c of CASES) {
    test(c.name, async () => {
      const v = regimeValues(rng, c.regime, 512, c.topk + (c.extra?.[2] ?? 0));
      const kCache = await filledCache(c.main[0], c.main[1], v.std, v.kvMean);
      const args: PagedSparseAttentionArgs = {
        q: tensor('bf16', [c.n, c.hQ, 512], randomBf16Bits(rng, c.n * c.hQ * 512, v.std, v.qMean)),
        kCache,
        indices: tensor('int32', [c.n, c.topk], tokenIndices(rng, c.n, c.topk, c.main[0] * c.main[1], 0.15)),
        smScale: v.smScale,
      };
      if (c.extra) {
        const [P, pages, topkExtra] = c.extra;
        // unit data: the extra set at another magnitude, so per-token scales differ
        args.extraKCache = await filledCache(P, pages, c.regime === 'unit' ? 0.5 : v.std, v.kvMean);
        args.extraIndices = tensor('int32', [c.n, topkExtra], tokenIndices(rng, c.n, topkExtra, P * pages, 0.15));
        if (c.lengths) args.extraTopkLength = tensor('int32', [c.n], Int32Array.from({ length: c.n }, (_, i) => (i === 1 ? 0 : rng.int(0, topkExtra + 1))));
      }
      if (c.lengths) args.topkLength = tensor('int32', [c.n], Int32Array.from({ length: c.n }, (_, i) => (i === 0 ? 0 : rng.int(0, c.topk + 1))));
      if (c.sink) args.attnSink = tensor('float32', [c.hQ], Float32Array.from({ length: c.hQ }, (_, h) => (h === 0 ? Infinity : h === 1 ? -Infinity : rng.normal())));

      const paged = await suite.engine.pagedSparseAttention(args);
      expect(paged.out.shape).toEqual([c.n, c.hQ, 512]);
      expect(paged.lse.shape).toEqual([c.n, c.hQ]);

      // 1. against the paged reference (reference dequant of the same bytes)
      const perQuery = 2 * (c.topk + (c.extra?.[2] ?? 0)) * c.hQ * 1024;
      const queries = sampleRows(rng, c.n, Math.max(3, Math.min(c.n, Math.floor(3e8 / perQuery))));
      const ref = R.pagedSparseAttentionReference(args, { queries });
      expectWithinBounds(`${c.name} vs reference`, paged, ref, queries);

      // 2. against sparsePrefill over a workspace of the same entries, every query: the reference's
      // weights are known on the sample only, so out's bound takes mag <= max |V| of the workspace
      const ws = await asWorkspace(args);
      const sp = await suite.engine.sparsePrefill({ q: args.q, kv: ws.kv, indices: ws.indices, smScale: args.smScale, attnSink: args.attnSink });
      const all = Array.from({ length: c.n }, (_, i) => i);
      const magCeiling = R.tensorValues(ws.kv).reduce((m, x) => Math.max(m, Math.abs(x)), 0);
      const pair = R.compareAttention(R.attentionValues(paged, all), { ...R.attentionValues(sp, all), mag: magCeiling }, { heads: c.hQ, dV: 512 });
      expect(pair.pass, `${c.name} paged vs workspace: ${R.formatAttentionComparison(pair)}`).toBe(true);

      // and the workspace form equals the paged form in the reference too (exactly: same values, same order)
      const refWs = R.sparsePrefillReference({ q: args.q, kv: ws.kv, indices: ws.indices, smScale: args.smScale, attnSink: args.attnSink }, { queries });
      expect(Array.from(refWs.lse)).toEqual(Array.from(ref.lse));
    }, 120_000);
  }

  test('rows with no valid entry in either set: lse +inf, maxLogits -inf, out 0', async () => {
    const kCache = await filledCache(64, 1, 1);
    const extra = await filledCache(2, 8, 1);
    const n = 4, hQ = 8;
    const args: PagedSparseAttentionArgs = {
      q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)),
      kCache,
      indices: tensor('int32', [n, 3], Int32Array.from([64, -1, 2 ** 31 - 1, 0, 1, 2, -5, 100, 64, 3, 3, 3])),
      topkLength: tensor('int32', [n], Int32Array.from([3, 0, 3, 3])),
      extraKCache: extra,
      extraIndices: tensor('int32', [n, 2], Int32Array.from([16, -1, 0, 1, 99, -(2 ** 31), 5, 5])),
      attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(1)),
      smScale: 0.05,
    };
    const res = await suite.engine.pagedSparseAttention(args);
    // query 0: main all invalid, extra all invalid; query 2: both invalid
    for (const i of [0, 2]) {
      for (let h = 0; h < hQ; h++) {
        expect(res.lse.data[i * hQ + h]).toBe(Infinity);
        expect(res.maxLogits.data[i * hQ + h]).toBe(-Infinity);
      }
      expect(Array.from(res.out.data.subarray(i * hQ * 512, (i + 1) * hQ * 512)).every((b) => (b & 0x7fff) === 0)).toBe(true);
    }
    const ref = R.pagedSparseAttentionReference(args);
    expectWithinBounds('no-valid rows', res, ref, [0, 1, 2, 3]);
  });
});
