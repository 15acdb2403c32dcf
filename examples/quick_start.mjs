// Quick start: an FP8 paged KV cache, a dequantized gather, and a sparse prefill with a sink, on
// the best backend this machine has; the outputs judged against the float64 reference with the
// SPEC §4 bounds (exit 1 if any is outside them).
//   node examples/quick_start.mjs            (SPARSE_MLA_BACKEND=wasm|cpu|cuda to pick one)
import { createEngine, createKvCache, tensor, toBf16 } from 'sparse-mla';
import { attentionValues, compareAttention, sparsePrefillReference } from 'sparse-mla/reference';

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
const result = await engine.sparsePrefill(args);
const { out, lse, maxLogits } = result;
console.log(`out ${out.dtype} [${out.shape}], lse ${lse.dtype} [${lse.shape}], maxLogits ${maxLogits.dtype} [${maxLogits.shape}]`);

// 4. Every output against the float64 reference, with SPEC §4's bounds (pass: worst error/bound <= 1).
const ref = sparsePrefillReference(args);
const verdict = compareAttention(attentionValues(result), ref, { heads: hQ, dV: 512 });
console.log(`worst error/bound: out ${verdict.out.worstRatio.toFixed(3)}, lse ${verdict.lse.worstRatio.toFixed(3)}, maxLogits ${verdict.maxLogits.worstRatio.toFixed(3)}`);
console.log(verdict.pass ? 'PASS: within the SPEC §4 bounds' : 'FAIL: outside the SPEC §4 bounds');
if (!verdict.pass) process.exitCode = 1;

await engine.dispose(); // ends the worker threads so the process can exit
