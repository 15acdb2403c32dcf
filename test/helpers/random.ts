/**
 * Seeded random inputs for the tests. Every run draws a fresh seed (or SPARSE_MLA_SEED) and logs it,
 * so a failure can be replayed with `SPARSE_MLA_SEED=<seed> npx vitest run test/<file>`.
 * The RNG and the input generators are the shipped grid's (src/check/grid.ts, built to
 * dist/check/grid.js), so the tests and `sparse-mla check` draw the same streams; only what the
 * grid does not need lives here.
 */
import { randomInt } from 'node:crypto';
import { makeRng, randomIndices as gridIndices, type Rng } from '../../dist/check/grid.js';

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
