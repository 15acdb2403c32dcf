// Child process of test/threads.test.ts (run with --expose-gc): 50 overlapping calls of mixed ops
// on one engine — quantizes into one cache while other ids of it are dequantized, sparsePrefill,
// pagedSparseAttention, and prefillLayer of every ratio down both paths on one plan — compared
// with the same calls run one at a time, round after round (memory measured after each), then
// dispose() while a round is in flight. One JSON report on stdout.
//   node --expose-gc concurrency.mjs <backend> <seed> <rounds> [memoryBudgetMiB]
import { readdirSync } from 'node:fs';
import { createEngine, createKvCache, createPlan, prefillLayer, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits, randomIndices } from '../../dist/check/grid.js';
import { randomPrefillCall, withinBounds } from './judge.mjs';
import { chunkScenario, indexerTopk, shuffled } from '../../dist/check/chunks.js';

const [backend, seedArg, roundsArg, budgetArg] = process.argv.slice(2);
const rng = makeRng(Number(seedArg) >>> 0);
const rounds = Number(roundsArg);
const threadCount = () => readdirSync('/proc/self/task').length;
const threadsAtStart = threadCount();
const engine = await createEngine({ backend, workers: 2, ...(budgetArg ? { memoryBudgetBytes: Number(budgetArg) * 2 ** 20 } : {}) });
const hex = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');
const attentionBits = (r) => `${hex(r.out.data)}|${hex(r.lse.data)}|${hex(r.maxLogits.data)}`;

/** A v4 cache whose first `filled` tokens hold random rows (quantized by the reference). */
function referenceCache(pageSize, numPages, filled = pageSize * numPages) {
  const cache = createKvCache('v4', { pageSize, numPages });
  R.quantizeKCacheReference(cache, Array.from({ length: filled }, (_, i) => i), tensor('bf16', [filled, 512], randomBf16Bits(rng, filled * 512)));
  return cache;
}

// The cache the quantizes write (its second half, disjoint ids per call) while the dequants read its first half.
const pageSize = 64, numPages = 40, half = (pageSize * numPages) / 2;
const initialCache = referenceCache(pageSize, numPages, half);
const freeIds = shuffled(rng, half).map((x) => x + half);
const pagedCache = referenceCache(16, 30);
const sc = chunkScenario(rng, [{ seqLen: 900, extendLen: 40 }, { seqLen: 300, extendLen: 30 }]);
const layerCaches = { swa: referenceCache(sc.swaPageSize, sc.swaPages), c4: referenceCache(sc.c4PageSize, sc.c4Pages), c128: referenceCache(sc.c128PageSize, sc.c128Pages) };
const plan = createPlan(sc.chunk, { window: sc.window });

/**
 * The calls, each run(cache) → a string of its result's bits, and check(cache) → whether a result
 * agrees with the float64 reference (for the first call of each kind; `cache` as the calls left it).
 */
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
    calls.push({ kind, run: (cache) => engine.quantizeKCache({ cache, tokenIds: tensor('int32', [100], ids), rows }).then(() => ''), check });
  } else if (kind === 'dequant') {
    const ids = Array.from({ length: 200 }, () => rng.int(0, half));
    let last;
    const check = () => {
      const ref = R.dequantizeKCacheReference(initialCache, ids);
      return last.data.every((b, j) => R.decodeBf16(b) === ref[j]);
    };
    calls.push({ kind, run: (cache) => engine.dequantizeKCachePaged({ cache, tokenIds: ids }).then((t) => ((last = t), hex(t.data))), check });
  } else if (kind === 'prefill') {
    const sQ = 1 + rng.int(0, 20), hQ = 8, sKV = 300, topk = 64;
    const a = randomPrefillCall(rng, { sQ, hQ, sKV, topk });
    let last;
    calls.push({ kind, run: () => engine.sparsePrefill(a).then((r) => ((last = r), attentionBits(r))), check: () => withinBounds(last, R.sparsePrefillReference(a), 8) });
  } else if (kind === 'paged') {
    const n = 1 + rng.int(0, 16), hQ = 4, topk = 64;
    const a = { q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)), kCache: pagedCache, indices: tensor('int32', [n, topk], randomIndices(rng, n, topk, 480, 0.1, 0, [])), smScale: 1 / Math.sqrt(512) };
    let last;
    calls.push({ kind, run: () => engine.pagedSparseAttention(a).then((r) => ((last = r), attentionBits(r))), check: () => withinBounds(last, R.pagedSparseAttentionReference(a), 4) });
  } else {
    const ratio = [0, 4, 128][k % 3];
    const path = k % 2 ? 'paged' : 'sparse';
    const hQ = 4;
    const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
    const topkIndices = ratio === 4 ? indexerTopk(rng, sc.requests, 32, { holes: 0.15, late: 1 }).indices : undefined;
    const caches = { swa: layerCaches.swa, ...(ratio === 4 ? { c4: layerCaches.c4 } : ratio === 128 ? { c128: layerCaches.c128 } : {}) };
    const args = { q, compressRatio: ratio, plan, caches, topkIndices, smScale: 1 / Math.sqrt(512), path };
    let last;
    // a few queries of each request (the whole layer's reference is slow in float64)
    const queries = [0, 17, 39, 40, 55, 69];
    const check = () => {
      const ref = R.prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, topkIndices, smScale: args.smScale }, { queries });
      return withinBounds(last, ref, hQ, queries);
    };
    calls.push({ kind: `layer c${ratio} ${path}`, run: () => prefillLayer(engine, args).then((r) => ((last = r), `${attentionBits(r)}|${r.dropped}|${r.path}`)), check });
  }
}

// One at a time, each kind's first call checked against the reference.
const sequentialCache = structuredClone(initialCache);
const sequential = [];
const referenceFailures = [];
const checked = new Set();
for (const c of calls) {
  sequential.push(await c.run(sequentialCache));
  if (!checked.has(c.kind)) {
    checked.add(c.kind);
    if (!c.check(sequentialCache)) referenceFailures.push(c.kind);
  }
}

// All at once, `rounds` times: the same bits, and memory after each round.
const mismatches = [];
const memory = [];
for (let round = 0; round < rounds; round++) {
  const cache = structuredClone(initialCache);
  const results = await Promise.all(calls.map((c) => c.run(cache)));
  results.forEach((r, i) => r !== sequential[i] && mismatches.push(`round ${round}: call ${i} (${calls[i].kind})`));
  if (Buffer.compare(cache.data, sequentialCache.data) !== 0) mismatches.push(`round ${round}: the quantized cache`);
  globalThis.gc();
  const m = process.memoryUsage();
  memory.push({ rss: m.rss, arrayBuffers: m.arrayBuffers, heapUsed: m.heapUsed });
}

// dispose() with a round in flight: every call settles (a result or DISPOSED), later calls are DISPOSED.
const cache = structuredClone(initialCache);
const inFlight = calls.map((c) => c.run(cache).then(() => 'resolved', (e) => e?.code ?? String(e)));
await new Promise((r) => setTimeout(r, 2));
const t0 = Date.now();
await engine.dispose();
const hang = new Promise((r) => setTimeout(() => r(null), 20_000).unref());
const settledAfterDispose = await Promise.race([Promise.all(inFlight), hang]);
const disposeMs = Date.now() - t0;
const afterDispose = [];
for (const c of [calls[0], calls[1], calls[2], calls[3], calls[4]]) afterDispose.push(await c.run(structuredClone(initialCache)).then(() => 'resolved', (e) => e?.code ?? String(e)));
// The engine's threads end: polled, not looked at once, since the cpu addon's last idle thread
// waits a while (a second) for a next call before it ends, and a thread done with its work takes a
// moment more to leave (longer on a loaded machine). Up to 5 s after dispose()'s calls settled.
const disposed = t0 + disposeMs;
let threadsAfterDispose = threadCount();
while (threadsAfterDispose > threadsAtStart && Date.now() < disposed + 5000) {
  await new Promise((r) => setTimeout(r, 10));
  threadsAfterDispose = threadCount();
}
const threadsEndedMs = Date.now() - disposed;
process.stdout.write(
  `${JSON.stringify({ referenceFailures, checkedKinds: [...checked], mismatches, memory, settledAfterDispose, disposeMs, afterDispose, threadsAtStart, threadsAfterDispose, threadsEndedMs })}\n`,
);
