/**
 * sparsePrefill (SPEC §4) through the engine against the float64 reference, over a grid like
 * FlashMLA's test grid (sampled so it runs in about a minute on 2 cores) and over the edge cases
 * SPEC names. Fresh random inputs every run; the seed is logged.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, tensor } from '../dist/index.js';
import type { Engine, SparsePrefillArgs, SparsePrefillResult, Tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { expectWithin, rowsOf } from './helpers/judge.js';
import { backendUnderTest } from './helpers/backends.js';
import { invalidFillers, randomBf16Bits, randomIndices, sampleRows, testRng, type Rng } from './helpers/random.js';

const rng = testRng('sparse_prefill.test');
let engine: Engine;
beforeAll(async () => {
  engine = await createEngine({ backend: backendUnderTest() });
}, 60_000);
afterAll(async () => {
  await engine?.dispose();
});

/** Engine vs reference on `queries` (default: a sample sized to the reference's cost). */
function judge(label: string, args: SparsePrefillArgs, res: SparsePrefillResult, queries: number[]): void {
  const sQ = args.q.shape[0]!, hQ = args.q.shape[1]!, dV = args.dV ?? 512;
  expect(res.out.shape).toEqual([sQ, hQ, dV]);
  expect(res.lse.shape).toEqual([sQ, hQ]);
  expect(res.maxLogits.shape).toEqual([sQ, hQ]);
  expect([res.out.dtype, res.lse.dtype, res.maxLogits.dtype]).toEqual(['bf16', 'float32', 'float32']);
  const ref = R.sparsePrefillReference(args, { queries });
  expectWithin(`${label} out`, rowsOf(res.out, queries), ref.out, R.TOLERANCES.out);
  expectWithin(`${label} lse`, rowsOf(res.lse, queries), ref.lse, R.TOLERANCES.lse);
  expectWithin(`${label} maxLogits`, rowsOf(res.maxLogits, queries), ref.maxLogits, R.TOLERANCES.maxLogits);
}

function bf16Tensor(shape: number[], std = 1): Tensor<'bf16'> {
  return tensor('bf16', shape, randomBf16Bits(rng, shape.reduce((a, b) => a * b, 1), std));
}

// ------------------------------------------------------------------ the grid

const PAIRS: [number, number][] = [[128, 128], [592, 128], [1840, 256], [1521, 512], [95, 128], [114, 384]];
const HEADS = [1, 16, 64, 128];
const DQKS = [512, 576];
const SQS = [1, 62, 213];
const ENGINE_FLOP_CAP = 1.2e10; // per case; keeps the grid under a minute on 2 cores
const REF_FLOP_CAP = 4e8; // per case, for the float64 reference on sampled queries

interface GridCase {
  name: string;
  sKV: number;
  topk: number;
  hQ: number;
  dQK: number;
  sQ: number;
  sink: 'none' | 'finite' | 'with-inf';
  lengths: 'none' | 'random' | 'with-zero-and-over';
  int64: boolean;
  threeD: boolean;
  allInvalidRow: boolean;
}

function gridCases(): GridCase[] {
  const cases: GridCase[] = [];
  let c = 0;
  // every (sKV, topk) × hQ × dQK; sQ and the features rotate through the cases
  for (const [sKV, topk] of PAIRS) {
    for (const hQ of HEADS) for (const dQK of DQKS) {
      let s = (c * 2 + 1 + Math.floor(c / 3)) % SQS.length;
      const flops = (sq: number): number => 2 * sq * topk * hQ * (dQK + 512);
      while (s > 0 && flops(SQS[s]!) > ENGINE_FLOP_CAP) s--;
      const sQ = SQS[s]!;
      cases.push({
        name: `sKV=${sKV} topk=${topk} hQ=${hQ} dQK=${dQK} sQ=${sQ}`,
        sKV, topk, hQ, dQK, sQ,
        sink: (['none', 'finite', 'with-inf'] as const)[c % 3]!,
        lengths: (['none', 'random', 'with-zero-and-over', 'none'] as const)[c % 4]!,
        int64: c % 5 === 4,
        threeD: c % 6 === 5,
        allInvalidRow: c % 2 === 0 && sQ > 1,
      });
      c++;
    }
  }
  return cases;
}

function buildCase(g: GridCase, r: Rng): { args: SparsePrefillArgs; queries: number[] } {
  const { sKV, topk, hQ, dQK, sQ } = g;
  const allInvalidRows = g.allInvalidRow ? [r.int(0, sQ)] : [];
  const idx32 = randomIndices(r, sQ, topk, sKV, { invalidFraction: 0.15, duplicateFraction: 0.05, allInvalidRows });
  let indices: Tensor<'int32'> | Tensor<'int64'>;
  const shape = g.threeD ? [sQ, 1, topk] : [sQ, topk];
  if (g.int64) {
    // int64 adds fillers no int32 can hold, including ones that wrap into range if truncated
    const wide = [2n ** 31n, 2n ** 32n, 2n ** 32n + 5n, -(2n ** 32n) + 3n, 2n ** 40n, -(2n ** 63n), 2n ** 63n - 1n];
    const d = BigInt64Array.from(idx32, (v) => BigInt(v));
    for (let i = 0; i < d.length; i++) if (r.uniform() < 0.1) d[i] = r.pick(wide);
    indices = tensor('int64', shape, d);
  } else {
    indices = tensor('int32', shape, idx32);
  }
  const args: SparsePrefillArgs = {
    q: bf16Tensor([sQ, hQ, dQK]),
    kv: bf16Tensor([sKV, dQK]),
    indices,
    smScale: 1 / Math.sqrt(dQK),
  };
  if (g.sink !== 'none') {
    const s = Float32Array.from({ length: hQ }, () => r.normal() * 2);
    if (g.sink === 'with-inf') {
      s[0] = r.uniform() < 0.5 || hQ === 1 ? Infinity : -Infinity;
      if (hQ > 1) s[hQ - 1] = -s[0]!;
    }
    args.attnSink = tensor('float32', [hQ], s);
  }
  if (g.lengths !== 'none') {
    const l = Int32Array.from({ length: sQ }, () => r.int(0, topk + 1));
    if (g.lengths === 'with-zero-and-over') {
      l[0] = 0;
      if (sQ > 1) l[sQ - 1] = topk + 1000;
    }
    args.topkLength = tensor('int32', [sQ], l);
  }
  const perQuery = 2 * topk * hQ * (dQK + 512);
  const nRef = Math.max(2, Math.min(sQ, Math.floor(REF_FLOP_CAP / perQuery)));
  const queries = new Set(sampleRows(r, sQ, nRef));
  for (const q of allInvalidRows) queries.add(q);
  return { args, queries: [...queries].sort((a, b) => a - b) };
}

describe('grid vs the float64 reference', () => {
  for (const g of gridCases()) {
    const tags = [g.sink !== 'none' ? `sink:${g.sink}` : '', g.lengths !== 'none' ? `topkLength:${g.lengths}` : '', g.int64 ? 'int64' : '', g.threeD ? '[sQ,1,topk]' : '', g.allInvalidRow ? 'all-invalid row' : '']
      .filter(Boolean)
      .join(' ');
    test(`${g.name} ${tags}`, async () => {
      const { args, queries } = buildCase(g, rng);
      const res = await engine.sparsePrefill(args);
      judge(g.name, args, res, queries);
    }, 120_000);
  }
});

// ------------------------------------------------------------------ edge cases

describe('edge cases', () => {
  const hQ = 8, dQK = 576, sKV = 300, topk = 64;

  test('sQ = 0 gives empty outputs of the right shapes', async () => {
    const res = await engine.sparsePrefill({ q: bf16Tensor([0, hQ, dQK]), kv: bf16Tensor([sKV, dQK]), indices: tensor('int32', [0, topk]), smScale: 0.05 });
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
      const res = await engine.sparsePrefill(args);
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
    const plain = await engine.sparsePrefill(base);
    const neg = await engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(-Infinity)) });
    const pos = await engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(Infinity)) });
    const mixed = await engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h % 2 ? 1.5 : -2))) });
    expect(Array.from(neg.out.data)).toEqual(Array.from(plain.out.data));
    expect(Array.from(pos.out.data).every((b) => (b & 0x7fff) === 0)).toBe(true);
    for (const r of [neg, pos, mixed]) {
      expect(Array.from(r.lse.data)).toEqual(Array.from(plain.lse.data));
      expect(Array.from(r.maxLogits.data)).toEqual(Array.from(plain.maxLogits.data));
    }
    const all = Array.from({ length: sQ }, (_, i) => i);
    judge('mixed sink', { ...base, attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h % 2 ? 1.5 : -2))) }, mixed, all);
  });

  test('duplicates count: a row of one repeated index gives out = that V row, lse = logit + ln(count)', async () => {
    const sQ = 4, reps = 37;
    const args: SparsePrefillArgs = {
      q: bf16Tensor([sQ, hQ, dQK]), kv: bf16Tensor([sKV, dQK]),
      indices: tensor('int32', [sQ, reps], Int32Array.from({ length: sQ * reps }, (_, i) => [5, 0, sKV - 1, 123][Math.floor(i / reps)]!)),
      smScale: 0.05,
    };
    const res = await engine.sparsePrefill(args);
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
    const res = await engine.sparsePrefill(args);
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
      judge(`hQ=${h} sKV=${s}`, args, await engine.sparsePrefill(args), [0, 1, 2, 3, 4]);
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
    const res = await engine.sparsePrefill(args);
    judge('NaN', args, res, [0, 1, 2, 3, 4, 5]);
    expect(Number.isNaN(res.lse.data[2 * hQ + 3]!)).toBe(true);
    expect(Number.isNaN(res.lse.data[5 * hQ]!)).toBe(true);
    expect(Number.isFinite(res.lse.data[4 * hQ]!)).toBe(true);
  });
});
