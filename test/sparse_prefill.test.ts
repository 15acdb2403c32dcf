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

/**
 * Top logit minus the largest logit of any other kv row, per (query, head) in [sQ · hQ], in float64
 * (exact to far below a logit unit at any accepted smScale); +inf with fewer than two rows.
 */
function logitGaps(args: SparsePrefillArgs): Float64Array {
  const [sQ, hQ, dQK] = args.q.shape as [number, number, number];
  const sKV = args.kv.shape[0]!, topk = args.indices.shape[1]!;
  const q = R.tensorValues(args.q as Tensor<'bf16'>), kv = R.tensorValues(args.kv as Tensor<'bf16'>);
  const idx = args.indices.data as Int32Array;
  const gaps = new Float64Array(sQ * hQ);
  for (let i = 0; i < sQ; i++) {
    for (let h = 0; h < hQ; h++) {
      let best = -Infinity, bestRow = -1, second = -Infinity;
      for (let k = 0; k < topk; k++) {
        const r = idx[i * topk + k]!;
        if (r < 0 || r >= sKV) continue;
        let dot = 0;
        for (let c = 0; c < dQK; c++) dot += q[(i * hQ + h) * dQK + c]! * kv[r * dQK + c]!;
        const p = args.smScale * dot;
        if (r === bestRow) continue;
        if (p > best) [second, best, bestRow] = [best, p, r];
        else if (p > second) second = p;
      }
      gaps[i * hQ + h] = best - second;
    }
  }
  return gaps;
}

/**
 * §4's bounds on the (query, head) pairs `pairs` (flat indices query · hQ + head) only, as one
 * tensor of one-head rows: its row numbers in a failure message are those flat indices.
 */
function expectHeadsWithinBounds(label: string, res: SparsePrefillResult, ref: R.ReferenceAttentionResult, pairs: readonly number[]): void {
  const dV = res.out.shape[2]!;
  const got = R.attentionValues(res);
  const pick = (a: ArrayLike<number>, width: number): Float64Array => {
    const o = new Float64Array(pairs.length * width);
    pairs.forEach((p, j) => { for (let e = 0; e < width; e++) o[j * width + e] = a[p * width + e]!; });
    return o;
  };
  const c = R.compareAttention(
    { out: pick(got.out, dV), lse: pick(got.lse, 1), maxLogits: pick(got.maxLogits, 1) },
    { out: pick(ref.out, dV), lse: pick(ref.lse, 1), maxLogits: pick(ref.maxLogits, 1), mag: pick(ref.mag, dV) },
    { heads: 1, dV, queries: pairs },
  );
  expect(c.pass, `${label} (q = query · hQ + head): ${R.formatAttentionComparison(c)}`).toBe(true);
}

/**
 * q [sQ, hQ, 576] and kv [sKV, 576] whose every q·k a float32 kernel computes exactly, in any order:
 * q on a grid of 2^-18 and kv on one of 2^-6, so each product q_c·k_c is a multiple of 2^-24, and
 * Σ_c |q_c·k_c| < 1 (checked by maxAbsProductSum), so every partial sum is a multiple of 2^-24 below
 * 2^24 of them. The logits smScale · q·k (smScale ±2^16, a power of two) are then exact too; the only
 * logit rounding left to a kernel, folding the scale into log2 units, is at most |logit| · 2^-24
 * ≈ 2^-14, which moves out by under 2^-12 · mag, 1/32 of §4's bound, at any gap between logits.
 * Sizes: kv's V dims (0-511) N(0, 1) in steps of 1/64; its rope dims about 1; q's V dims a few
 * steps of 2^-18 and its rope dims ±64 steps (the sign alternating by head), so at smScale 2^16 the
 * logits are ±1024 plus a spread of about 14 units: a softmax over several rows, past exp's range.
 */
function exactLogitData(sQ: number, hQ: number, sKV: number): Pick<SparsePrefillArgs, 'q' | 'kv'> {
  const dQK = 576, dV = 512;
  const onGrid = (steps: number, step: number, limit: number): number => {
    const v = Math.max(-limit, Math.min(limit, Math.round(steps))) * step;
    if (R.decodeBf16(R.encodeBf16(v)) !== v) throw new Error(`${v} is not a bf16 value`);
    return R.encodeBf16(v);
  };
  const kv = new Uint16Array(sKV * dQK);
  for (let r = 0; r < sKV; r++) {
    for (let c = 0; c < dQK; c++) kv[r * dQK + c] = c < dV ? onGrid(rng.normal() * 64, 2 ** -6, 256) : onGrid(64 + rng.normal() * 4, 2 ** -6, 96);
  }
  const q = new Uint16Array(sQ * hQ * dQK);
  for (let s = 0; s < sQ * hQ; s++) {
    const rope = s % 2 ? -64 : 64;
    for (let c = 0; c < dQK; c++) q[s * dQK + c] = c < dV ? onGrid(rng.normal() * 2, 2 ** -18, 8) : onGrid(rope, 2 ** -18, 64);
  }
  return { q: tensor('bf16', [sQ, hQ, dQK], q), kv: tensor('bf16', [sKV, dQK], kv) };
}

/** max over (query, head, attended row) of Σ_c |q_c · k_c|. */
function maxAbsProductSum(args: SparsePrefillArgs): number {
  const [sQ, hQ, dQK] = args.q.shape as [number, number, number];
  const sKV = args.kv.shape[0]!, topk = args.indices.shape[1]!;
  const q = R.tensorValues(args.q as Tensor<'bf16'>), kv = R.tensorValues(args.kv as Tensor<'bf16'>);
  const idx = args.indices.data as Int32Array;
  let most = 0;
  for (let s = 0; s < sQ * hQ; s++) {
    const i = Math.floor(s / hQ);
    for (let k = 0; k < topk; k++) {
      const r = idx[i * topk + k]!;
      if (r < 0 || r >= sKV) continue;
      let sum = 0;
      for (let c = 0; c < dQK; c++) sum += Math.abs(q[s * dQK + c]! * kv[r * dQK + c]!);
      most = Math.max(most, sum);
    }
  }
  return most;
}

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

  // smScale ±2^16 on unit-scale q and kv puts the logits near 1e6. A float32 q·k there is off by up
  // to about smScale · 2^-24 · Σ|q_i·k_i|, a fraction of a logit unit (float32's own spacing at 2^21
  // is 0.25), while §4's out bound, from a bf16 kernel with float32 accumulation, leaves room for
  // logit errors far below 2^-8: where a head's top two logits nearly tie, no float32 kernel meets it
  // (FlashMLA's included). So this data judges lse and maxLogits (bounds relative to the logits)
  // everywhere, and out on the heads whose top logit leads every other row's by SEPARATED_GAP; the
  // next test judges out everywhere on data whose logits float32 holds exactly.
  test('smScale at ±2^16 (the largest accepted) on unit-scale data: finite, lse and maxLogits match the reference, out on separated heads', async () => {
    const sQ = 5;
    // Even a logit error of 16 units on each of two rows leaves a row 64 units behind the top one a
    // weight under topk · e^-32, so such a head's out is its top row's V to far below the bound's floor.
    const SEPARATED_GAP = 64;
    for (const smScale of [2 ** 16, -(2 ** 16)]) {
      const args: SparsePrefillArgs = {
        q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]),
        indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, { invalidFraction: 0.1 })),
        smScale,
      };
      const res = await suite.engine.sparsePrefill(args);
      expect(Array.from(res.lse.data).every(Number.isFinite), `smScale ${smScale}: lse finite`).toBe(true);
      expect(Array.from(res.out.data).every((b) => (b & 0x7f80) !== 0x7f80), `smScale ${smScale}: out without inf / NaN`).toBe(true);
      const all = Array.from({ length: sQ }, (_, i) => i);
      const ref = R.sparsePrefillReference(args, { queries: all });
      const stats = R.compareAttention(R.attentionValues(res, all), ref, { heads: hQ, dV: 512, queries: all });
      expect(stats.lse.pass && stats.maxLogits.pass, `smScale ${smScale}: ${R.formatAttentionComparison(stats)}`).toBe(true);
      expect(Math.min(...Array.from(ref.maxLogits, Math.abs))).toBeGreaterThan(1e5);
      const gaps = logitGaps(args);
      const separated = Array.from(gaps.keys()).filter((s) => gaps[s]! >= SEPARATED_GAP);
      expect(separated.length).toBeGreaterThan(sQ * hQ / 2); // the gaps are of order 1e5: nearly every head
      expectHeadsWithinBounds(`smScale ${smScale}, heads separated by ${SEPARATED_GAP}`, res, ref, separated);
    }
  });

  test('smScale at ±2^16 on data whose logits float32 holds exactly: every tensor within §4, logits far past exp\'s range', async () => {
    const sQ = 5;
    for (const smScale of [2 ** 16, -(2 ** 16)]) {
      const args: SparsePrefillArgs = {
        ...exactLogitData(sQ, hQ, sKV),
        indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, { invalidFraction: 0.1 })),
        smScale,
      };
      expect(maxAbsProductSum(args)).toBeLessThan(1); // the premise of exactLogitData's exactness
      const res = await suite.engine.sparsePrefill(args);
      expect(Array.from(res.lse.data).every(Number.isFinite), `smScale ${smScale}: lse finite`).toBe(true);
      expect(Array.from(res.out.data).every((b) => (b & 0x7f80) !== 0x7f80), `smScale ${smScale}: out without inf / NaN`).toBe(true);
      const all = Array.from({ length: sQ }, (_, i) => i);
      const c = judge(`smScale ${smScale}, exact logits`, args, res, all);
      // exp of every logit overflows (or underflows) float32, float64 too, unless the max is taken out
      const ref = R.sparsePrefillReference(args, { queries: all });
      expect(Math.max(...ref.maxLogits)).toBeGreaterThan(Math.log(Number.MAX_VALUE));
      expect(Math.min(...ref.maxLogits)).toBeLessThan(-Math.log(Number.MAX_VALUE));
      expect(Math.min(...Array.from(ref.maxLogits, Math.abs))).toBeGreaterThan(Math.log(Number.MAX_VALUE));
      expect(c.out.count).toBe(sQ * hQ * 512);
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
