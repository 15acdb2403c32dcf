// Child process of test/native_isa_paths.test.ts: the `cpu` backend on the SIMD path its
// SPARSE_MLA_CPU_ISA picks (read once a process, so a process a path). sparsePrefill (dQK 576 and
// 512) and pagedSparseAttention at head counts either side of the BF16 dot's threshold (8 heads),
// each judged by SPEC §4's bounds against the float64 reference. One JSON report on stdout: the
// path build.simd names in this process, and per call whether it passed and its worst error / bound.
//   node isa_path.mjs <seed>
import { createEngine, createKvCache, listBackends, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits, randomIndices, sampleRows } from '../../dist/check/grid.js';

const rng = makeRng(Number(process.argv[2]) >>> 0);
const engine = await createEngine({ backend: 'cpu', workers: 2 });
const simd = (await listBackends()).find((b) => b.name === 'cpu')?.details?.simd ?? null;

const widen = (t) => (t.dtype === 'bf16' ? Float64Array.from(t.data, (b) => R.decodeBf16(b)) : Float64Array.from(t.data));
const rowsOf = (t, rows) => {
  const all = widen(t);
  const len = all.length / t.shape[0];
  return Float64Array.from({ length: rows.length * len }, (_, i) => all[rows[Math.floor(i / len)] * len + (i % len)]);
};
const judge = (name, res, ref, queries) => {
  const heads = res.lse.shape[1];
  const c = R.compareAttention({ out: rowsOf(res.out, queries), lse: rowsOf(res.lse, queries), maxLogits: rowsOf(res.maxLogits, queries) }, ref, { heads, dV: 512, queries });
  return { name, pass: c.pass, worst: { out: c.out.worstRatio, lse: c.lse.worstRatio, maxLogits: c.maxLogits.worstRatio } };
};
const sink = (hQ) => tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));

const calls = [];
for (const [sQ, hQ, dQK, sKV, topk] of [[6, 64, 576, 700, 512], [5, 128, 512, 400, 256], [9, 8, 576, 300, 200], [7, 1, 512, 90, 64]]) {
  const args = {
    q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
    indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.1, 0.05, [])),
    attnSink: sink(hQ),
    smScale: 1 / Math.sqrt(dQK),
  };
  const queries = sampleRows(rng, sQ, 3);
  calls.push(judge(`sparsePrefill hQ ${hQ} dQK ${dQK} topk ${topk}`, await engine.sparsePrefill(args), R.sparsePrefillReference(args, { queries }), queries));
}

const pageSize = 64, numPages = 6, tokens = pageSize * numPages;
const cache = createKvCache('v4', { pageSize, numPages });
await engine.quantizeKCache({ cache, tokenIds: Array.from({ length: tokens }, (_, i) => i), rows: tensor('bf16', [tokens, 512], randomBf16Bits(rng, tokens * 512, 2)) });
for (const [n, hQ, topk] of [[4, 64, 256], [5, 16, 128], [6, 4, 100]]) {
  const args = {
    q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)),
    kCache: cache,
    indices: tensor('int32', [n, topk], randomIndices(rng, n, topk, tokens, 0.1, 0.05, [])),
    attnSink: sink(hQ),
    smScale: 1 / Math.sqrt(512),
  };
  const queries = sampleRows(rng, n, 3);
  calls.push(judge(`pagedSparseAttention hQ ${hQ} topk ${topk}`, await engine.pagedSparseAttention(args), R.pagedSparseAttentionReference(args, { queries }), queries));
}
await engine.dispose();
process.stdout.write(JSON.stringify({ simd, calls }));
