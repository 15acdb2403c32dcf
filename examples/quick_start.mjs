// Quick start: an FP8 paged KV cache, a dequantized gather, and a sparse prefill with a sink, on
// the best backend this machine has; one query checked against the float64 reference.
//   node examples/quick_start.mjs            (SPARSE_MLA_BACKEND=wasm|cpu|cuda to pick one)
import { createEngine, createKvCache, tensor, toBf16, bf16ToFloat32 } from 'sparse-mla';
import { sparsePrefillReference } from 'sparse-mla/reference';

const engine = await createEngine(); // auto: cuda, then cpu, then wasm
console.log(`backend: ${engine.backend}`);

const random = (n) => Float32Array.from({ length: n }, () => Math.random() - 0.5);

// 1. A v4 cache of 2 pages of 64 tokens; quantize 100 bf16 rows of 512 into it at token ids 0..99.
const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
const ids = Array.from({ length: 100 }, (_, i) => i);
await engine.quantizeKCache({ cache, tokenIds: ids, rows: toBf16({ shape: [100, 512], data: random(100 * 512) }) });

// 2. Dequantize a gather of those tokens into a bf16 workspace [100, 512].
const kv = await engine.dequantizeKCachePaged({ cache, tokenIds: ids });

// 3. Sparse prefill: 8 queries x 16 heads, each attending 32 rows of kv (-1: no entry).
const sQ = 8, hQ = 16, topk = 32;
const args = {
  q: toBf16({ shape: [sQ, hQ, 512], data: random(sQ * hQ * 512) }),
  kv,
  indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, (_, i) => (i % 7 === 6 ? -1 : Math.floor(Math.random() * 100)))),
  smScale: 1 / Math.sqrt(512),
  attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(0.5)),
};
const { out, lse, maxLogits } = await engine.sparsePrefill(args);
console.log(`out [${out.shape}] bf16, lse [${lse.shape}], maxLogits [${maxLogits.shape}]`);

// 4. Query 0 against the float64 reference.
const ref = sparsePrefillReference(args, { queries: [0] });
const got = bf16ToFloat32(out).data.subarray(0, hQ * 512);
let worst = 0;
for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - ref.out[i]));
console.log(`query 0: max |out - reference| = ${worst.toExponential(2)} (bf16 output), lse[0] ${lse.data[0].toFixed(5)} vs ${ref.lse[0].toFixed(5)}`);

await engine.dispose(); // ends the worker threads so the process can exit
