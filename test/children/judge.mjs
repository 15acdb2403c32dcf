// What the child processes share: an attention result judged by SPEC §4's bounds (the one bounds
// module, src/reference/compare.ts) and a random sparsePrefill call.
import { tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { randomBf16Bits, randomIndices } from '../../dist/check/grid.js';

/** A tensor's values as float64 (bf16 decoded). */
export const widen = (t) => (t.dtype === 'bf16' ? Float64Array.from(t.data, (b) => R.decodeBf16(b)) : Float64Array.from(t.data));

/** t's values, of the given leading-dim rows only when `rows` is given. */
const rowsOf = (t, rows) => {
  const all = widen(t);
  if (!rows) return all;
  const len = all.length / t.shape[0];
  return Float64Array.from({ length: rows.length * len }, (_, i) => all[rows[Math.floor(i / len)] * len + (i % len)]);
};

/** Per tensor, whether `res` is within the bounds of `ref` (of the given query rows only, when given). */
export function judgeAttention(res, ref, heads, queries) {
  const c = R.compareAttention({ out: rowsOf(res.out, queries), lse: rowsOf(res.lse, queries), maxLogits: rowsOf(res.maxLogits, queries) }, ref, { heads, dV: 512, queries });
  return { out: c.out.pass, lse: c.lse.pass, maxLogits: c.maxLogits.pass };
}

/** Whether every tensor of `res` is within the bounds of `ref`. */
export function withinBounds(res, ref, heads, queries) {
  const j = judgeAttention(res, ref, heads, queries);
  return j.out && j.lse && j.maxLogits;
}

/** A sparsePrefill call of dQK 512 with a sink: random bf16 q and kv, 10% invalid and 5% repeated ids. */
export function randomPrefillCall(rng, { sQ, hQ, sKV, topk }) {
  return {
    q: tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512)),
    kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)),
    indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.1, 0.05, [])),
    attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
    smScale: 1 / Math.sqrt(512),
  };
}
