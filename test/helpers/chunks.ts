/**
 * Random prefill chunks for the planner and layer suites: a v4 cache of random rows (quantized by
 * the reference), requests of given lengths with shuffled SWA slots and page tables, and the
 * indexer's top-k (mostly visible entries, some −1, a few not yet visible).
 */
import { createKvCache, tensor } from '../../dist/index.js';
import type { PlanChunk } from '../../dist/planner/index.js';
import { quantizeKCacheReference, type PlanReferenceChunk } from '../../dist/reference/index.js';
import type { KvCache, Tensor } from '../../dist/types.js';
import { randomBf16Bits, type Rng } from './random.js';

const D = 512;
export const WINDOW = 128;

export function shuffle(rng: Rng, a: number[]): number[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = rng.int(0, i + 1);
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

/** A v4 cache of `tokens` random rows (quantized by the reference). */
export function randomCache(rng: Rng, pageSize: number, numPages: number): KvCache {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const rows = tensor('bf16', [n, D], randomBf16Bits(rng, n * D, 1));
  quantizeKCacheReference(cache, Array.from({ length: n }, (_, i) => i), rows);
  return cache;
}

export interface Scenario {
  chunk: PlanChunk;
  ref: PlanReferenceChunk;
  numQueries: number;
  swaPages: number;
  c4Pages: number;
  c128Pages: number;
  c4PageSize: number;
  c128PageSize: number;
}

/** Requests with random lengths: fresh, mid-sequence, short of the window, below a ratio, empty. */
export function randomScenario(rng: Rng, seqLens: number[], extendLens: number[]): Scenario {
  const swaPageSize = 64;
  const c4PageSize = rng.pick([16, 64]);
  const c128PageSize = rng.pick([1, 2]);
  const totalSeq = seqLens.reduce((a, b) => a + b, 0);
  const swaPages = Math.ceil(totalSeq / swaPageSize) + 1;
  const c4Need = seqLens.reduce((a, s) => a + Math.ceil(Math.floor(s / 4) / c4PageSize), 0);
  const c128Need = seqLens.reduce((a, s) => a + Math.ceil(Math.floor(s / 128) / c128PageSize), 0);
  const c4Pages = c4Need + 2, c128Pages = c128Need + 2;
  const swaSlots = shuffle(rng, Array.from({ length: swaPages * swaPageSize }, (_, i) => i));
  const c4Free = shuffle(rng, Array.from({ length: c4Pages }, (_, i) => i));
  const c128Free = shuffle(rng, Array.from({ length: c128Pages }, (_, i) => i));
  const chunk: PlanChunk = { requests: [], c4PageSize, c128PageSize };
  const ref: PlanReferenceChunk = { requests: [], c4PageSize, c128PageSize, window: WINDOW };
  let slot = 0;
  for (let r = 0; r < seqLens.length; r++) {
    const s = seqLens[r]!, e = extendLens[r]!;
    const byPos = swaSlots.slice(slot, slot + s);
    slot += s;
    const c4PageTable = c4Free.splice(0, Math.ceil(Math.floor(s / 4) / c4PageSize));
    const c128PageTable = c128Free.splice(0, Math.ceil(Math.floor(s / 128) / c128PageSize));
    const g = e > 0 ? Math.min(s, e + WINDOW - 1) : 0;
    (chunk.requests as object[]).push({ seqLen: s, extendLen: e, swaTokenIds: byPos.slice(s - g), c4PageTable, c128PageTable });
    ref.requests.push({ seqLen: s, extendLen: e, swaTokenIdByPosition: byPos, c4PageTable, c128PageTable });
  }
  return {
    chunk,
    ref,
    numQueries: extendLens.reduce((a, b) => a + b, 0),
    swaPages,
    c4Pages,
    c128Pages,
    c4PageSize,
    c128PageSize,
  };
}

/** [nq, topk] request-local picks: mostly visible entries, some −1, a few not yet visible. */
export function randomTopk(rng: Rng, sc: Scenario, topk: number): Tensor<'int32'> {
  const out = new Int32Array(sc.numQueries * topk);
  let q = 0;
  for (const r of sc.ref.requests) {
    for (let i = 0; i < r.extendLen; i++, q++) {
      const pos = r.seqLen - r.extendLen + i;
      const visible = Math.floor((pos + 1) / 4);
      const pick = shuffle(rng, Array.from({ length: visible }, (_, j) => j));
      for (let k = 0; k < topk; k++) {
        const u = rng.uniform();
        out[q * topk + k] = u < 0.15 ? -1 : u < 0.2 ? visible + rng.int(0, 50) : k < pick.length ? pick[k]! : -1;
      }
    }
  }
  return tensor('int32', [sc.numQueries, topk], out);
}

