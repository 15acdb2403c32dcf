// A single-bf16-P kernel on one prefillLayer call, emulated in float32 (SPEC §4's error model: the
// weights P = exp(s − max) rounded to bf16 before P·V, float32 sums of the unrounded P, out rounded
// to bf16), against the float64 reference: each row's 1 − cos for the emulation, for float32 P, for
// the rounded reference, and, given the engine's result, its own and how many elements differ from
// the emulation. Used through bench/experiments/fuzz-judge-single-bf16p.patch (a fuzz case's replay).
import * as R from '../../dist/reference/index.js';

const D = 512;
const f32 = Math.fround;
const bf = R.roundToBf16;

export function emulateLayer(sc, layer, got) {
  const chunk = sc.ref, ratio = layer.compressRatio, q = layer.q, caches = layer.caches, smScale = layer.smScale;
  const total = chunk.requests.reduce((a, r) => a + r.extendLen, 0);
  const hQ = q.shape[1];
  const topk = layer.topkIndices ? layer.topkIndices.shape[layer.topkIndices.shape.length - 1] : 0;
  const comp = ratio === 4 ? caches.c4 : ratio === 128 ? caches.c128 : undefined;
  const rowOf = (c, id) => { const r = new Float64Array(D); R.dequantizeTokenReference(c, id, r, 0); return r; };
  const rowsOut = [];
  for (let qi = 0; qi < total; qi++) {
    const set = R.attentionSetReference(chunk, ratio, qi, layer.topkIndices?.data.subarray(qi * topk, (qi + 1) * topk));
    const rows = [...set.compressed.map((id) => rowOf(comp, id)), ...set.window.map((id) => rowOf(caches.swa, id))];
    for (let h = 0; h < hQ; h++) {
      if (!rows.length) continue;
      const qv = Array.from({ length: D }, (_, d) => R.decodeBf16(q.data[(qi * hQ + h) * D + d]));
      const logits = rows.map((k) => { let s = 0; for (let d = 0; d < D; d++) s += qv[d] * k[d]; return s * smScale; });
      const m = Math.max(...logits);
      const lse = m + Math.log(logits.reduce((a, l) => a + Math.exp(l - m), 0));
      const sink = layer.attnSink ? layer.attnSink.data[h] : -Infinity;
      const lseSink = R.logAddExp(lse, sink);
      const ref = new Float64Array(D), accBf16P = new Float64Array(D), accF32P = new Float64Array(D);
      const w = logits.map((l) => Math.exp(l - lseSink));
      const p = logits.map((l) => f32(Math.exp(l - m)));
      const denom = f32(p.reduce((a, x) => f32(a + x), 0) + f32(Math.exp(sink - m)));
      for (let k = 0; k < rows.length; k++) for (let d = 0; d < D; d++) {
        ref[d] += w[k] * rows[k][d];
        accBf16P[d] = f32(accBf16P[d] + f32(bf(p[k]) * rows[k][d]));
        accF32P[d] = f32(accF32P[d] + f32(p[k] * rows[k][d]));
      }
      const emu = accBf16P.map((x) => bf(f32(x / denom)));
      const row = {
        query: qi, head: h, keys: rows.length, maxLogit: m, lse,
        weights: w.map((x) => +x.toPrecision(4)),
        pRoundingRelative: p.map((x) => +(bf(x) / x - 1).toPrecision(4)),
        keyNorms: rows.map((r) => +Math.hypot(...r).toPrecision(4)),
        cosGapSingleBf16P: R.cosineGap(emu, ref),
        cosGapFloat32P: R.cosineGap(accF32P.map((x) => bf(f32(x / denom))), ref),
        cosGapReferenceRounded: R.cosineGap(ref.map((x) => bf(x)), ref),
      };
      if (got) {
        const g = Array.from({ length: D }, (_, d) => R.decodeBf16(got.out.data[(qi * hQ + h) * D + d]));
        row.cosGapEngine = R.cosineGap(g, ref);
        row.elementsDifferingFromEmulation = g.filter((x, d) => x !== emu[d]).length;
      }
      rowsOut.push(row);
    }
  }
  return rowsOut;
}
