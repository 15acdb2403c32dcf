// The mixed workload of concurrency.mjs (test/threads.test.ts) and bench/wasm_memory_creep.mjs: 50
// calls on one engine — quantizes into one cache while other ids of it are dequantized,
// sparsePrefill, pagedSparseAttention, and prefillLayer of every ratio down both paths on one plan.
import { createKvCache, createPlan, prefillLayer, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { randomBf16Bits, randomIndices } from '../../dist/check/grid.js';
import { randomPrefillCall, withinBounds } from './judge.mjs';
import { chunkScenario, indexerTopk, shuffled } from '../../dist/check/chunks.js';

const hex = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');
const attentionBits = (r) => `${hex(r.out.data)}|${hex(r.lse.data)}|${hex(r.maxLogits.data)}`;

/**
 * The workload's caches and plan, made once from `rng`: `initialCache` (the cache the quantizes
 * write, its second half, disjoint ids per call, while the dequants read its first half; each round
 * runs on a copy) and `makeCalls()`, 50 calls of fresh inputs, each { kind, run(cache) → its
 * result, bits(result) → a string of its bits, check(cache, result) → whether it agrees with the
 * float64 reference (`cache` as the calls left it) }.
 */
export function mixedWorkload(engine, rng) {
  /** A v4 cache whose first `filled` tokens hold random rows (quantized by the reference). */
  const referenceCache = (pageSize, numPages, filled = pageSize * numPages) => {
    const cache = createKvCache('v4', { pageSize, numPages });
    R.quantizeKCacheReference(cache, Array.from({ length: filled }, (_, i) => i), tensor('bf16', [filled, 512], randomBf16Bits(rng, filled * 512)));
    return cache;
  };
  const pageSize = 64, numPages = 40, half = (pageSize * numPages) / 2;
  const initialCache = referenceCache(pageSize, numPages, half);
  const freeIds = shuffled(rng, half).map((x) => x + half);
  const pagedCache = referenceCache(16, 30);
  const sc = chunkScenario(rng, [{ seqLen: 900, extendLen: 40 }, { seqLen: 300, extendLen: 30 }]);
  const layerCaches = { swa: referenceCache(sc.swaPageSize, sc.swaPages), c4: referenceCache(sc.c4PageSize, sc.c4Pages), c128: referenceCache(sc.c128PageSize, sc.c128Pages) };
  const plan = createPlan(sc.chunk, { window: sc.window });

  const makeCalls = () => {
    const calls = [];
    for (let i = 0; i < 50; i++) {
      const kind = ['quantize', 'dequant', 'prefill', 'paged', 'layer'][i % 5];
      const k = Math.floor(i / 5);
      if (kind === 'quantize') {
        const ids = freeIds.slice(k * 100, k * 100 + 100);
        const rows = tensor('bf16', [100, 512], randomBf16Bits(rng, 100 * 512));
        const check = (cache) => {
          const want = createKvCache('v4', { pageSize, numPages });
          R.quantizeKCacheReference(want, Array.from(ids), rows);
          const got = R.dequantizeKCacheReference(cache, Array.from(ids));
          const ref = R.dequantizeKCacheReference(want, Array.from(ids));
          return got.every((x, j) => Object.is(x, ref[j]));
        };
        calls.push({ kind, run: (cache) => engine.quantizeKCache({ cache, tokenIds: tensor('int32', [100], ids), rows }), bits: () => '', check });
      } else if (kind === 'dequant') {
        const ids = Array.from({ length: 200 }, () => rng.int(0, half));
        const check = (_, t) => {
          const ref = R.dequantizeKCacheReference(initialCache, ids);
          return t.data.every((b, j) => R.decodeBf16(b) === ref[j]);
        };
        calls.push({ kind, run: (cache) => engine.dequantizeKCachePaged({ cache, tokenIds: ids }), bits: (t) => hex(t.data), check });
      } else if (kind === 'prefill') {
        const sQ = 1 + rng.int(0, 20), hQ = 8, sKV = 300, topk = 64;
        const a = randomPrefillCall(rng, { sQ, hQ, sKV, topk });
        calls.push({ kind, run: () => engine.sparsePrefill(a), bits: attentionBits, check: (_, r) => withinBounds(r, R.sparsePrefillReference(a), 8) });
      } else if (kind === 'paged') {
        const n = 1 + rng.int(0, 16), hQ = 4, topk = 64;
        const a = { q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)), kCache: pagedCache, indices: tensor('int32', [n, topk], randomIndices(rng, n, topk, 480, 0.1, 0, [])), smScale: 1 / Math.sqrt(512) };
        calls.push({ kind, run: () => engine.pagedSparseAttention(a), bits: attentionBits, check: (_, r) => withinBounds(r, R.pagedSparseAttentionReference(a), 4) });
      } else {
        const ratio = [0, 4, 128][k % 3];
        const path = k % 2 ? 'paged' : 'sparse';
        const hQ = 4;
        const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
        const topkIndices = ratio === 4 ? indexerTopk(rng, sc.requests, 32, { holes: 0.15, late: 1 }).indices : undefined;
        const caches = { swa: layerCaches.swa, ...(ratio === 4 ? { c4: layerCaches.c4 } : ratio === 128 ? { c128: layerCaches.c128 } : {}) };
        const args = { q, compressRatio: ratio, plan, caches, topkIndices, smScale: 1 / Math.sqrt(512), path };
        // a few queries of each request (the whole layer's reference is slow in float64)
        const queries = [0, 17, 39, 40, 55, 69];
        const check = (_, r) => {
          const ref = R.prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, topkIndices, smScale: args.smScale }, { queries });
          return withinBounds(r, ref, hQ, queries);
        };
        calls.push({ kind: `layer c${ratio} ${path}`, run: () => prefillLayer(engine, args), bits: (r) => `${attentionBits(r)}|${r.dropped}|${r.path}`, check });
      }
    }
    return calls;
  };
  return { initialCache, makeCalls };
}
