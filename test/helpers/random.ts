/**
 * Seeded random inputs for the tests. Every run draws a fresh seed (or SPARSE_MLA_SEED) and logs it,
 * so a failure can be replayed with `SPARSE_MLA_SEED=<seed> npx vitest run test/<file>`.
 * The RNG and the input generators are the shipped grid's (src/check/grid.ts, built to
 * dist/check/grid.js), so the tests and `sparse-mla check` draw the same streams; only what the
 * grid does not need lives here.
 */
import { randomInt } from 'node:crypto';
import { tensor, type SparsePrefillArgs, type Tensor } from '../../dist/index.js';
import { makeRng, randomBf16Bits, randomIndices as gridIndices, type Rng } from '../../dist/check/grid.js';

export { invalidFillers, makeRng, randomBf16Bits, sampleRows, type Rng } from '../../dist/check/grid.js';

/** A fresh seed per test file (or SPARSE_MLA_SEED), logged so a failure can be replayed. */
export function testRng(label: string): Rng {
  const env = process.env.SPARSE_MLA_SEED;
  const seed = env !== undefined && env !== '' ? Number(env) >>> 0 : randomInt(0, 2 ** 32 - 1);
  console.log(`[seed] ${label}: SPARSE_MLA_SEED=${seed}`);
  return makeRng(seed);
}

/** A uniformly random float32 bit pattern (all of NaN, inf, subnormals included). */
export function randomFloat32Bits(rng: Rng, n: number): Float32Array {
  const u = new Uint32Array(n);
  for (let i = 0; i < n; i++) u[i] = rng.u32();
  return new Float32Array(u.buffer);
}

export interface IndexOptions {
  /** fraction of entries replaced by an invalid filler */
  invalidFraction?: number;
  /** fraction of entries that repeat an earlier entry of the row */
  duplicateFraction?: number;
  /** rows that get only invalid entries */
  allInvalidRows?: readonly number[];
}

/** [sQ, topk] int32 indices (the grid's generator, with named options). */
export function randomIndices(rng: Rng, sQ: number, topk: number, sKV: number, opt: IndexOptions = {}): Int32Array {
  return gridIndices(rng, sQ, topk, sKV, opt.invalidFraction ?? 0, opt.duplicateFraction ?? 0, opt.allInvalidRows ?? []);
}

export interface PrefillShape {
  sQ: number;
  hQ: number;
  dQK: number;
  sKV: number;
  topk: number;
}

/**
 * Random sparsePrefill arguments: q [sQ, hQ, dQK] and kv [sKV, dQK] N(0, 1) bf16, indices [sQ, topk]
 * into kv (with `faults`), smScale 1/√dQK; a test spreads it and adds or overrides the rest.
 */
export function randomPrefillArgs(rng: Rng, s: PrefillShape, faults: IndexOptions = {}): SparsePrefillArgs & { indices: Tensor<'int32'> } {
  return {
    q: tensor('bf16', [s.sQ, s.hQ, s.dQK], randomBf16Bits(rng, s.sQ * s.hQ * s.dQK)),
    kv: tensor('bf16', [s.sKV, s.dQK], randomBf16Bits(rng, s.sKV * s.dQK)),
    indices: tensor('int32', [s.sQ, s.topk], randomIndices(rng, s.sQ, s.topk, s.sKV, faults)),
    smScale: 1 / Math.sqrt(s.dQK),
  };
}

/** `count` distinct random ids in [0, n), in random order. */
export function randomDistinctIds(rng: Rng, n: number, count: number): number[] {
  const all = Array.from({ length: n }, (_, i) => i);
  for (let i = 0; i < count; i++) {
    const j = i + rng.int(0, n - i);
    [all[i], all[j]] = [all[j]!, all[i]!];
  }
  return all.slice(0, count);
}
