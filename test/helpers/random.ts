/**
 * Seeded random inputs for the tests. Every run draws a fresh seed (or SPARSE_MLA_SEED) and logs it,
 * so a failure can be replayed with `SPARSE_MLA_SEED=<seed> npx vitest run test/<file>`.
 */
import { randomInt } from 'node:crypto';

export interface Rng {
  readonly seed: number;
  /** uniform uint32 */
  u32(): number;
  /** uniform in [0, 1) */
  uniform(): number;
  /** standard normal */
  normal(): number;
  /** integer in [lo, hi) */
  int(lo: number, hi: number): number;
  pick<T>(items: readonly T[]): T;
}

/** mulberry32: small, fast, good enough for test data. */
export function makeRng(seed: number): Rng {
  let a = seed >>> 0;
  const u32 = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const uniform = (): number => u32() / 2 ** 32;
  return {
    seed,
    u32,
    uniform,
    normal() {
      const u = 1 - uniform();
      return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * uniform());
    },
    int: (lo, hi) => lo + Math.floor(uniform() * (hi - lo)),
    pick: (items) => items[Math.floor(uniform() * items.length)]!,
  };
}

/** A fresh seed per test file (or SPARSE_MLA_SEED), logged so a failure can be replayed. */
export function testRng(label: string): Rng {
  const env = process.env.SPARSE_MLA_SEED;
  const seed = env !== undefined && env !== '' ? Number(env) >>> 0 : randomInt(0, 2 ** 32 - 1);
  console.log(`[seed] ${label}: SPARSE_MLA_SEED=${seed}`);
  return makeRng(seed);
}

const f32 = new Float32Array(1);
const u32v = new Uint32Array(f32.buffer);

/** float32 → bf16 bits (round to nearest even), local to the tests so it checks, not trusts, the library. */
function bf16Bits(x: number): number {
  f32[0] = x;
  const u = u32v[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return (u >>> 16) | 0x40;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** bf16 bits of normal(0, std) samples. */
export function randomBf16Bits(rng: Rng, n: number, std = 1): Uint16Array {
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = bf16Bits(rng.normal() * std);
  return out;
}

/** Float32 values spread over many binades (signs, magnitudes 2^lo..2^hi). */
export function randomWideFloat32(rng: Rng, n: number, lo = -20, hi = 20): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const e = lo + rng.uniform() * (hi - lo);
    out[i] = (rng.uniform() < 0.5 ? -1 : 1) * 2 ** e;
  }
  return out;
}

/** A uniformly random float32 bit pattern (all of NaN, inf, subnormals included). */
export function randomFloat32Bits(rng: Rng, n: number): Float32Array {
  const u = new Uint32Array(n);
  for (let i = 0; i < n; i++) u[i] = rng.u32();
  return new Float32Array(u.buffer);
}

/** The invalid index fillers of SPEC §4's test grid for a KV length sKV. */
export function invalidFillers(sKV: number): number[] {
  return [-(2 ** 31), -123456, -1, sKV, 2 ** 31 - 1];
}

export interface IndexOptions {
  /** fraction of entries replaced by an invalid filler */
  invalidFraction?: number;
  /** fraction of entries that repeat an earlier entry of the row */
  duplicateFraction?: number;
  /** rows that get only invalid entries */
  allInvalidRows?: readonly number[];
  fillers?: readonly number[];
}

/** [sQ, topk] int32 indices: mostly distinct valid rows, with invalid fillers and duplicates mixed in. */
export function randomIndices(rng: Rng, sQ: number, topk: number, sKV: number, opt: IndexOptions = {}): Int32Array {
  const fillers = opt.fillers ?? invalidFillers(sKV);
  const out = new Int32Array(sQ * topk);
  const allInvalid = new Set(opt.allInvalidRows ?? []);
  for (let i = 0; i < sQ; i++) {
    const row = out.subarray(i * topk, (i + 1) * topk);
    // a random selection (distinct while topk ≤ sKV) via a partial shuffle
    const pool = Array.from({ length: sKV }, (_, j) => j);
    for (let k = 0; k < topk; k++) {
      if (k < sKV) {
        const j = k + rng.int(0, sKV - k);
        [pool[k], pool[j]] = [pool[j]!, pool[k]!];
        row[k] = pool[k]!;
      } else {
        row[k] = rng.int(0, sKV);
      }
      if (k > 0 && rng.uniform() < (opt.duplicateFraction ?? 0)) row[k] = row[rng.int(0, k)]!;
      if (allInvalid.has(i) || rng.uniform() < (opt.invalidFraction ?? 0)) row[k] = rng.pick(fillers);
    }
  }
  return out;
}

/** Spread `count` query rows over [0, n), always including the first and last. */
export function sampleRows(rng: Rng, n: number, count: number): number[] {
  if (count >= n) return Array.from({ length: n }, (_, i) => i);
  const set = new Set<number>([0, n - 1]);
  while (set.size < count) set.add(rng.int(0, n));
  return [...set].sort((a, b) => a - b);
}
