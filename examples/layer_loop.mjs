// A prefill chunk through the planner, layer after layer, the way a DeepSeek-V4 model runs it:
// one plan per chunk (SWA gather, compressed ids, workspace layout, c0/c128 index rows), reused
// by every layer; each layer brings its own caches and queries, c4 layers their indexer's top-k.
// The router picks the workspace (sparse) or paged path per chunk; one layer is also run down
// the other path to show both agree (within what SPEC §4's bounds allow two outputs to differ).
//   node examples/layer_loop.mjs
import { createEngine, createKvCache, createPlan, prefillLayer, swaGatherLength, tensor, toBf16, bf16ToFloat32 } from 'sparse-mla';
import { outBound } from 'sparse-mla/reference';

const engine = await createEngine();
const window = 128, hQ = 16, topk = 64, smScale = 1 / Math.sqrt(512);
const swaPageSize = 64, c4PageSize = 16, c128PageSize = 2;
const random = (n) => Float32Array.from({ length: n }, () => Math.random() - 0.5);
const range = (start, n) => Array.from({ length: n }, (_, i) => start + i);

// Two requests: one continuing mid-sequence (600 tokens cached, 200 new), one fresh 150-token prompt.
const lens = [{ seqLen: 800, extendLen: 200 }, { seqLen: 150, extendLen: 150 }];
let swaTokens = 0, c4Pages = 0, c128Pages = 0;
const requests = lens.map(({ seqLen, extendLen }) => {
  // SWA cache ids of positions [seqLen - g, seqLen); page tables of the compressed caches
  const g = swaGatherLength(seqLen, extendLen, window);
  const c4 = Math.ceil(Math.floor(seqLen / 4) / c4PageSize), c128 = Math.ceil(Math.floor(seqLen / 128) / c128PageSize);
  const r = { seqLen, extendLen, swaTokenIds: range(swaTokens, g), c4PageTable: range(c4Pages, c4), c128PageTable: range(c128Pages, c128) };
  swaTokens += g, c4Pages += c4, c128Pages += c128;
  return r;
});
const plan = createPlan({ requests, c4PageSize, c128PageSize }, { window });
const numQueries = lens.reduce((a, r) => a + r.extendLen, 0);

/** A v4 cache with random rows at every slot (a real model writes them as it goes). */
async function filledCache(pageSize, numPages) {
  const cache = createKvCache('v4', { pageSize, numPages: Math.max(1, numPages) });
  const n = cache.pageSize * cache.numPages;
  await engine.quantizeKCache({ cache, tokenIds: range(0, n), rows: toBf16({ shape: [n, 512], data: random(n * 512) }) });
  return cache;
}

/** An indexer's top-k: per query, request-local c4 positions it may see (< floor((pos + 1) / 4)), -1 padded. */
function indexerTopk() {
  const data = new Int32Array(numQueries * topk).fill(-1);
  let q = 0;
  for (const { seqLen, extendLen } of lens) {
    for (let i = 0; i < extendLen; i++, q++) {
      const visible = Math.floor((seqLen - extendLen + i + 1) / 4);
      for (let k = 0; k < Math.min(topk, visible); k++) data[q * topk + k] = Math.floor(Math.random() * visible);
    }
  }
  return tensor('int32', [numQueries, topk], data);
}

for (const [layer, ratio] of [0, 4, 128, 4].entries()) {
  const caches = { swa: await filledCache(swaPageSize, Math.ceil(swaTokens / swaPageSize)) };
  if (ratio === 4) caches.c4 = await filledCache(c4PageSize, c4Pages);
  if (ratio === 128) caches.c128 = await filledCache(c128PageSize, c128Pages);
  const args = {
    plan, compressRatio: ratio, caches, smScale,
    q: toBf16({ shape: [numQueries, hQ, 512], data: random(numQueries * hQ * 512) }),
    attnSink: tensor('float32', [hQ], new Float32Array(hQ)),
    ...(ratio === 4 ? { topkIndices: indexerTopk() } : {}),
  };
  const r = await prefillLayer(engine, args);
  console.log(`layer ${layer} (c${ratio}): ${r.path} path, because ${r.reason}; workspace ${r.workspaceBytes} bytes, out [${r.out.shape}]`);
  if (layer === 1) {
    const other = await prefillLayer(engine, { ...args, path: r.path === 'sparse' ? 'paged' : 'sparse' });
    const a = bf16ToFloat32(r.out).data, b = bf16ToFloat32(other.out).data;
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
    // Each path is within outBound(mag) of the float64 reference, and mag (a weighted mean of |v|,
    // weights summing to at most 1) is at most max |v| = 0.5 here: the two are at most twice that apart.
    const allowed = 2 * outBound(0.5);
    console.log(`  the same layer down the ${other.path} path: max |difference| ${worst.toExponential(2)}, allowed ${allowed.toExponential(2)} (each path rounds its own sums to bf16)`);
    if (!(worst <= allowed)) process.exitCode = 1;
  }
}
// The chunk-invariant work was done once: c0 and c128 rows built once for all their layers.
console.log('plan.stats', plan.stats);
plan.release(); // the chunk is done: what the plan kept for its layers goes now, not at a collection
await engine.dispose();
