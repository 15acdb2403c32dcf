// Wall time of cpu (or wasm) attention calls over fewer query rows than threads (a decode step of
// one or two requests, a chunk's last few queries), where the addon splits each row's heads over its
// threads and the wasm backend over its workers: sparsePrefill and pagedSparseAttention at V4
// shapes, each awaited before the next. Compare two builds by pointing SPARSE_MLA_DIST at another
// dist/ (and, for cpu, SPARSE_MLA_NATIVE_ADDON at its addon).
//   node bench/cpu_few_rows.mjs [rows=1] [calls=20] [workers=os cores] [--backend cpu|wasm]
import { availableParallelism } from 'node:os';
import { benchDist, medianCallMs, takeOption } from './lib.mjs';

const dist = benchDist();
const { createEngine, createKvCache, tensor } = await import(`${dist}index.js`);
const { makeRng, randomBf16Bits, randomIndices } = await import(`${dist}check/grid.js`);
const args = process.argv.slice(2);
const backend = takeOption(args, '--backend') ?? 'cpu';
const [rows = 1, calls = 20, workers = availableParallelism()] = args.map(Number);
const engine = await createEngine({ backend, workers });
const rng = makeRng(7);
const tokens = 8192;
const cache = createKvCache('v4', { pageSize: 64, numPages: tokens / 64 });
await engine.quantizeKCache({ cache, tokenIds: tensor('int32', [tokens], Int32Array.from({ length: tokens }, (_, i) => i)), rows: tensor('bf16', [tokens, 512], randomBf16Bits(rng, tokens * 512)) });
const kv = tensor('bf16', [tokens, 512], randomBf16Bits(rng, tokens * 512));
const ids = (n, k) => tensor('int32', [n, k], randomIndices(rng, n, k, tokens, 0, 0, []));
const sink = (h) => tensor('float32', [h], Float32Array.from({ length: h }, () => rng.normal()));
const perCall = (f) => medianCallMs(f, calls, 3);
const out = { backend, rows, workers, calls };
for (const [hQ, topk, extra] of [[64, 128, 512], [128, 128, 1024]]) {
  const q = tensor('bf16', [rows, hQ, 512], randomBf16Bits(rng, rows * hQ * 512));
  const paged = { q, kCache: cache, indices: ids(rows, topk), extraKCache: cache, extraIndices: ids(rows, extra), attnSink: sink(hQ), smScale: 1 / Math.sqrt(512) };
  out[`pagedMs_hQ${hQ}`] = await perCall(() => engine.pagedSparseAttention(paged));
  const prefill = { q, kv, indices: ids(rows, topk + extra), attnSink: sink(hQ), smScale: 1 / Math.sqrt(512) };
  out[`prefillMs_hQ${hQ}`] = await perCall(() => engine.sparsePrefill(prefill));
}
console.log(JSON.stringify(out));
await engine.dispose();
