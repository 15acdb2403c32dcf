// Per-call wall time of small cpu calls made one after another (where a call's own start-up and
// settling costs show): a 64-token dequant and a 4-query sparsePrefill, each awaited before the
// next. Compare two builds by pointing SPARSE_MLA_DIST at another dist/ (alternate the runs).
//   node bench/cpu_small_calls.mjs [calls=2000]
import { benchDist, median } from './lib.mjs';

const dist = benchDist();
const { createEngine, createKvCache, tensor } = await import(`${dist}index.js`);
const { makeRng, randomBf16Bits, randomIndices } = await import(`${dist}check/grid.js`);
const [count = 2000] = process.argv.slice(2).map(Number);
const engine = await createEngine({ backend: 'cpu', workers: 2 });
const rng = makeRng(1);
const n = 1024;
const cache = createKvCache('v4', { pageSize: 64, numPages: n / 64 });
await engine.quantizeKCache({ cache, tokenIds: tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => i)), rows: tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512)) });
const ids = tensor('int32', [64], Int32Array.from({ length: 64 }, () => rng.int(0, n)));
const sQ = 4, hQ = 16, sKV = 512, topk = 64;
const prefill = {
  q: tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512)),
  kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)),
  indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0, 0, [])),
  smScale: 0.05,
};
const perCall = async (f) => {
  for (let i = 0; i < 200; i++) await f(); // warm-up
  const t = [];
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    for (let i = 0; i < count / 5; i++) await f();
    t.push(((performance.now() - t0) * 1000) / (count / 5));
  }
  return +median(t).toFixed(1);
};
const dequantUs = await perCall(() => engine.dequantizeKCachePaged({ cache, tokenIds: ids }));
const prefillUs = await perCall(() => engine.sparsePrefill(prefill));
console.log(JSON.stringify({ calls: count, dequantUsPerCall: dequantUs, prefillUsPerCall: prefillUs }));
await engine.dispose();
