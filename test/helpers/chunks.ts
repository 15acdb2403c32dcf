/**
 * Random prefill chunks for the planner and layer suites, from the shipped generator
 * (src/check/chunks.ts, the one `check` and `run` use): requests placed in paged caches, the
 * indexer's top-k, and a v4 cache of random rows (quantized by the reference).
 */
import { createKvCache, tensor } from '../../dist/index.js';
import { chunkScenario, indexerTopk, type ChunkScenario } from '../../dist/check/chunks.js';
import { quantizeKCacheReference } from '../../dist/reference/index.js';
import type { KvCache, Tensor } from '../../dist/types.js';
import { randomBf16Bits, type Rng } from './random.js';

const D = 512;

/** A v4 cache of pageSize × numPages random rows (quantized by the reference). */
export function randomCache(rng: Rng, pageSize: number, numPages: number): KvCache {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const rows = tensor('bf16', [n, D], randomBf16Bits(rng, n * D, 1));
  quantizeKCacheReference(cache, Array.from({ length: n }, (_, i) => i), rows);
  return cache;
}

/** Requests of the given lengths, with random c4 (16 or 64) and c128 (1 or 2) page sizes. */
export function randomScenario(rng: Rng, seqLens: number[], extendLens: number[]): ChunkScenario {
  const requests = seqLens.map((seqLen, r) => ({ seqLen, extendLen: extendLens[r]! }));
  return chunkScenario(rng, requests, { c4PageSize: rng.pick([16, 64]), c128PageSize: rng.pick([1, 2]) });
}

/** [numQueries, topk] request-local picks with many faults: −1 holes, and not-yet-visible entries in every query. */
export function randomTopk(rng: Rng, sc: ChunkScenario, topk: number): Tensor<'int32'> {
  return indexerTopk(rng, sc.requests, topk, { holes: 0.15, late: 1 }).indices;
}
