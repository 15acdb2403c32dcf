/**
 * sparsePrefill (SPEC §4) through the engine against the float64 reference, over a grid like
 * FlashMLA's test grid (sampled so it runs in about a minute on 2 cores) and over the edge cases
 * SPEC names. Fresh random inputs every run; the seed is logged.
 */
import { afterAll, describe, expect, test } from 'vitest';
import { tensor } from '../dist/index.js';
import type { SparsePrefillArgs, SparsePrefillResult, Tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { invalidFillers, randomIndices } from './helpers/random.js';
import { opSuite } from './helpers/suite.js';
import { backendUnderTest } from './helpers/backends.js';
import { fixtureNames, loadFixture } from './helpers/fixtures.js';
import { buildPrefillCase, prefillCases, randomBf16 } from '../dist/check/grid.js';

const suite = opSuite('sparse_prefill.test');
const rng = suite.rng;

/** Engine vs reference on `queries` (default: a sample sized to the reference's cost). */
function judge(label: string, args: SparsePrefillArgs, res: SparsePrefillResult, queries: number[]): R.AttentionComparison {
  const sQ = args.q.shape[0]!, hQ = args.q.shape[1]!, dV = args.dV ?? 512;
  expect(res.out.shape).toEqual([sQ, hQ, dV]);
  expect(res.lse.shape).toEqual([sQ, hQ]);
  expect(res.maxLogits.shape).toEqual([sQ, hQ]);
  expect([res.out.dtype, res.lse.dtype, res.maxLogits.dtype]).toEqual(['bf16', 'float32', 'float32']);
  const ref = R.sparsePrefillReference(args, { queries });
  return expectWithinBounds(label, res, ref, queries);
}

const bf16Tensor = (shape: number[], std = 1): Tensor<'bf16'> => randomBf16(rng, shape, std);

// ------------------------------------------------------------------ the grid

// The shipped grid (src/check/grid.ts), so `sparse-mla check` runs these very cases on a GPU.
const ENGINE_FLOP_CAP = 1.2e10; // per case; keeps the grid under a minute on 2 cores
const REF_FLOP_CAP = 4e8; // per case, for the float64 reference on sampled queries

describe('grid vs the float64 reference', () => {
  // worst ratio per data regime and tensor, printed for the record
  const worst = new Map<string, { cases: number; out: number; lse: number; maxLogits: number; cos: number }>();
  afterAll(() => {
    const lines = [...worst].map(([r, w]) => `${r} (${w.cases} cases): out ${w.out.toFixed(3)}, lse ${w.lse.toExponential(2)}, maxLogits ${w.maxLogits.toExponential(2)}, out 1-cos ${w.cos.toExponential(2)}`);
    console.log(`worst error/bound ratios on the grid per data regime, ${backendUnderTest()} backend:\n${lines.join('\n')}`);
  });
  for (const g of prefillCases(ENGINE_FLOP_CAP)) {
    test(g.name, async () => {
      const { args, queries } = buildPrefillCase(g, rng, REF_FLOP_CAP);
      const res = await suite.engine.sparsePrefill(args);
      const c = judge(g.name, args, res, queries);
      const w = worst.get(g.regime) ?? { cases: 0, out: 0, lse: 0, maxLogits: 0, cos: 0 };
      worst.set(g.regime, { cases: w.cases + 1, out: Math.max(w.out, c.out.worstRatio), lse: Math.max(w.lse, c.lse.worstRatio), maxLogits: Math.max(w.maxLogits, c.maxLogits.worstRatio), cos: Math.max(w.cos, c.out.cosineGap!) });
    }, 120_000);
  }
});

// ------------------------------------------------------------------ edge cases

describe('edge cases', () => {
  const hQ = 8, dQK = 576, sKV = 300, topk = 64;

  test('sQ = 0 gives empty outputs of the right shapes', async () => {
    const res = await suite.engine.sparsePrefill({ q: bf16Tensor([0, hQ, dQK]), kv: bf16Tensor([sKV, dQK]), indices: tensor('int32', [0, topk]), smScale: 0.05 });
    expect(res.out.shape).toEqual([0, hQ, 512]);
    expect(res.lse.shape).toEqual([0, hQ]);
    expect(res.maxLogits.shape).toEqual([0, hQ]);
  });

  test('topk = 0 and all-invalid rows (every filler, int32 and int64): lse +inf, maxLogits -inf, out 0 whatever the sink', async () => {
    const sQ = 7;
    const fillers = invalidFillers(sKV);
    const rows = Int32Array.from({ length: sQ * fillers.length }, (_, i) => fillers[i % fillers.length]!);
    const sink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => [0, 3, Infinity, -Infinity][h % 4]!));
    const variants: SparsePrefillArgs[] = [
      { q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]), indices: tensor('int32', [sQ, 0]), smScale: 0.05 },
      { q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]), indices: tensor('int32', [sQ, fillers.length], rows), smScale: 0.05, attnSink: sink },
      {
        q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]),
        indices: tensor('int64', [sQ, 4], BigInt64Array.from({ length: sQ * 4 }, (_, i) => [2n ** 32n, 2n ** 32n + 1n, -(2n ** 63n), BigInt(sKV)][i % 4]!)),
        smScale: 0.05, attnSink: sink,
      },
      { q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV)), smScale: 0.05, topkLength: tensor('int32', [sQ]), attnSink: sink },
      { q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([0, dQK]), indices: tensor('int32', [sQ, 3], Int32Array.from({ length: sQ * 3 }, () => 0)), smScale: 0.05 },
    ];
    for (const args of variants) {
      const res = await suite.engine.sparsePrefill(args);
      expect(Array.from(res.lse.data).every((v) => v === Infinity)).toBe(true);
      expect(Array.from(res.maxLogits.data).every((v) => v === -Infinity)).toBe(true);
      expect(Array.from(res.out.data).every((b) => (b & 0x7fff) === 0)).toBe(true);
      const ref = R.sparsePrefillReference(args);
      expect(Array.from(ref.lse).every((v) => v === Infinity)).toBe(true);
    }
  });

  test('sink = -inf changes nothing, sink = +inf gives out 0; the sink never changes lse or maxLogits', async () => {
    const sQ = 9;
    const base: SparsePrefillArgs = {
      q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]),
      indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, { invalidFraction: 0.2 })),
      smScale: 0.05,
    };
    const plain = await suite.engine.sparsePrefill(base);
    const neg = await suite.engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(-Infinity)) });
    const pos = await suite.engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(Infinity)) });
    const mixed = await suite.engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h % 2 ? 1.5 : -2))) });
    expect(Array.from(neg.out.data)).toEqual(Array.from(plain.out.data));
    expect(Array.from(pos.out.data).every((b) => (b & 0x7fff) === 0)).toBe(true);
    for (const r of [neg, pos, mixed]) {
      expect(Array.from(r.lse.data)).toEqual(Array.from(plain.lse.data));
      expect(Array.from(r.maxLogits.data)).toEqual(Array.from(plain.maxLogits.data));
    }
    const all = Array.from({ length: sQ }, (_, i) => i);
    judge('mixed sink', { ...base, attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h % 2 ? 1.5 : -2))) }, mixed, all);
  });

  test('smScale at ±2^16 (the largest accepted) stays finite and matches the reference', async () => {
    const sQ = 5;
    for (const smScale of [2 ** 16, -(2 ** 16)]) {
      const args: SparsePrefillArgs = {
        q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]),
        indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, { invalidFraction: 0.1 })),
        smScale,
      };
      const res = await suite.engine.sparsePrefill(args);
      expect(Array.from(res.lse.data).every(Number.isFinite)).toBe(true);
      expect(Array.from(res.out.data).every((b) => (b & 0x7f80) !== 0x7f80)).toBe(true); // no inf / NaN
      judge(`smScale ${smScale}`, args, res, Array.from({ length: sQ }, (_, i) => i));
    }
  });

  test('duplicates count: a row of one repeated index gives out = that V row, lse = logit + ln(count)', async () => {
    const sQ = 4, reps = 37;
    const args: SparsePrefillArgs = {
      q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]),
      indices: tensor('int32', [sQ, reps], Int32Array.from({ length: sQ * reps }, (_, i) => [5, 0, sKV - 1, 123][Math.floor(i / reps)]!)),
      smScale: 0.05,
    };
    const res = await suite.engine.sparsePrefill(args);
    judge('one repeated index', args, res, [0, 1, 2, 3]);
    const ref = R.sparsePrefillReference(args);
    for (let i = 0; i < sQ * hQ; i++) expect(Math.abs(ref.lse[i]! - ref.maxLogits[i]! - Math.log(reps))).toBeLessThan(1e-12);
  });

  test('large logits (smScale 10) stay finite and exact: no overflow in the softmax', async () => {
    const sQ = 6;
    const args: SparsePrefillArgs = {
      q: bf16Tensor([sQ, hQ, dQK], 2), kv: bf16Tensor([sKV, dQK], 2),
      indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV)), smScale: 10,
      attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal() * 500)),
    };
    const res = await suite.engine.sparsePrefill(args);
    expect(Math.max(...Array.from(res.maxLogits.data))).toBeGreaterThan(500);
    judge('smScale 10', args, res, Array.from({ length: sQ }, (_, i) => i));
  });

  test('odd head counts and a very small dV-sized problem (hQ = 3, 7; sKV = 1)', async () => {
    for (const [h, s] of [[3, 1], [7, 20]] as const) {
      const sQ = 5;
      const args: SparsePrefillArgs = {
        q: bf16Tensor([sQ, h, 512]), kv: bf16Tensor([s, 512]),
        indices: tensor('int32', [sQ, 10], Int32Array.from({ length: sQ * 10 }, () => rng.int(-1, s + 1))), smScale: 0.04,
      };
      judge(`hQ=${h} sKV=${s}`, args, await suite.engine.sparsePrefill(args), [0, 1, 2, 3, 4]);
    }
  });

  test('every head count up to 13 (each remainder of the CPU core\'s 2-, 4- and 6-head tiles), a whole KV block and a short one', async () => {
    for (let h = 1; h <= 13; h++) {
      const sQ = 2, sKV = 70, topk = 45, dQK = h % 2 ? 512 : 576;
      const args: SparsePrefillArgs = {
        q: bf16Tensor([sQ, h, dQK]), kv: bf16Tensor([sKV, dQK]),
        indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV)), smScale: 0.04,
        attnSink: tensor('float32', [h], Float32Array.from({ length: h }, () => rng.normal())),
      };
      judge(`hQ=${h} dQK=${dQK}`, args, await suite.engine.sparsePrefill(args), [0, 1]);
    }
  });

  test('NaN propagates: a NaN in q poisons that query, a NaN in a kv row poisons every query that attends it', async () => {
    const sQ = 6;
    const q = bf16Tensor([sQ, hQ, dQK]);
    const kv = bf16Tensor([sKV, dQK]);
    q.data[(2 * hQ + 3) * dQK + 17] = 0x7fc0; // query 2, head 3
    kv.data[42 * dQK + 560] = 0x7fc0; // kv row 42, a rope dim: only the logits see it
    const idx = randomIndices(rng, sQ, topk, sKV).map((v) => (v === 42 ? 43 : v));
    idx[5 * topk + 7] = 42; // only query 5 attends row 42
    const args: SparsePrefillArgs = { q, kv, indices: tensor('int32', [sQ, topk], idx), smScale: 0.05 };
    const res = await suite.engine.sparsePrefill(args);
    judge('NaN', args, res, [0, 1, 2, 3, 4, 5]);
    expect(Number.isNaN(res.lse.data[2 * hQ + 3]!)).toBe(true);
    expect(Number.isNaN(res.lse.data[5 * hQ]!)).toBe(true);
    expect(Number.isFinite(res.lse.data[4 * hQ]!)).toBe(true);
  });
});

// ------------------------------------------------------------------ FlashMLA's inputs

describe("the FlashMLA fixtures' inputs (test/fixtures/flashmla-h200) through this backend", () => {
  const measured: string[] = [];
  afterAll(() => console.log(`worst error/bound ratios on the FlashMLA fixtures' inputs, ${backendUnderTest()} backend (out, lse, maxLogits, out 1-cos):\n${measured.join('\n')}`));

  for (const name of fixtureNames()) {
    test(name, async () => {
      const f = await loadFixture(name);
      const res = await suite.engine.sparsePrefill(f.args);
      const all = Array.from({ length: f.shapes.sQ }, (_, i) => i);
      const c = expectWithinBounds(name, res, R.sparsePrefillReference(f.args), all);
      measured.push(`${name}: ${c.out.worstRatio.toFixed(3)}, ${c.lse.worstRatio.toExponential(2)}, ${c.maxLogits.worstRatio.toExponential(2)}, ${c.out.cosineGap!.toExponential(2)}`);
      if (backendUnderTest() !== 'cuda') {
        // The CPU core is float32 throughout: its one out error of note is the final bf16 rounding,
        // at most 2^-8·|out| ≤ 2^-8·mag, half the bound; lse and maxLogits have float32 accuracy.
        expect(c.out.worstRatio).toBeLessThanOrEqual(0.51);
        expect(c.out.cosineGap!).toBeLessThanOrEqual(R.OUT_COSINE_GAP_BOUND / 2);
        expect(c.lse.worstRatio).toBeLessThanOrEqual(0.02);
        expect(c.maxLogits.worstRatio).toBeLessThanOrEqual(0.02);
      }
    });
  }
});
