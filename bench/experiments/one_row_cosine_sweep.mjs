// One-row tensors of few keys: how often a single-bf16-P kernel (SPEC §4's own error model, emulated
// here) and an engine exceed SPEC §4.1's tensor-wide 1 − cos ≤ 7e-6 when each query row is judged as
// its own tensor, and how many of the engine's rows equal the emulation bit for bit. Rows of the kv
// have norms spread over 2^-8..2^8 (as a v4 cache's tile scales spread them), so one key that is not
// the row's max can carry most of the output; its weight's bf16 rounding (up to 2^-8 relative) is
// then a scale error of the whole row, which the symmetric cosine counts.
//   node bench/experiments/one_row_cosine_sweep.mjs [backend=cuda] [rows=4096] [seed=1]
import { createEngine, tensor, toBf16 } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
const backend = process.argv[2] ?? 'cuda', n = Number(process.argv[3] ?? 4096), seed = Number(process.argv[4] ?? 1);
let st = seed >>> 0 || 1;
const rnd = () => ((st = (st * 1664525 + 1013904223) >>> 0) / 2 ** 32);
const gauss = () => Math.sqrt(-2 * Math.log(rnd() + 1e-12)) * Math.cos(2 * Math.PI * rnd());
const D = 512, f32 = Math.fround, bf = R.roundToBf16;
const nKv = 8192, topk = 4;
const kvF = new Float32Array(nKv * D);
for (let r = 0; r < nKv; r++) { const s = 2 ** (16 * rnd() - 8); for (let d = 0; d < D; d++) kvF[r * D + d] = s * gauss(); }
const kv = toBf16({ shape: [nKv, D], data: kvF });
const kvD = Float64Array.from(kv.data, (b) => R.decodeBf16(b));
const qF = new Float32Array(n * D), idx = new Int32Array(n * topk);
const smScale = 1 / Math.sqrt(D);
for (let i = 0; i < n; i++) {
  for (let k = 0; k < topk; k++) idx[i * topk + k] = k < 2 + (i % 3) ? Math.floor(rnd() * nKv) : -1;
  // q aimed so the logits spread over a few units: q ∝ a mix of its first two keys' directions
  const a = idx[i * topk], b = idx[i * topk + 1], ca = gauss() * 3, cb = gauss() * 3;
  const na = Math.hypot(...kvD.subarray(a * D, a * D + D)), nb = Math.hypot(...kvD.subarray(b * D, b * D + D));
  for (let d = 0; d < D; d++) qF[i * D + d] = (ca * kvD[a * D + d] / na ** 2 + cb * kvD[b * D + d] / nb ** 2) / smScale + 1e-3 * gauss();
}
const q = toBf16({ shape: [n, 1, D], data: qF });
const engine = await createEngine({ backend });
const got = await engine.sparsePrefill({ q, kv, indices: tensor('int32', [n, topk], idx), smScale }, { output: 'host' });
await engine.dispose();
const qD = Float64Array.from(q.data, (b) => R.decodeBf16(b));
const stats = { rows: n, got_over: 0, emu_over: 0, got_max: 0, emu_max: 0, both_over: 0, rowsBitEqual: 0, elemsDiffer: 0, worstRow: null };
for (let i = 0; i < n; i++) {
  const ks = [...idx.subarray(i * topk, i * topk + topk)].filter((x) => x >= 0);
  const logits = ks.map((r) => { let s = 0; for (let d = 0; d < D; d++) s += qD[i * D + d] * kvD[r * D + d]; return s * smScale; });
  const m = Math.max(...logits);
  const L = logits.reduce((a, l) => a + Math.exp(l - m), 0);
  const ref = new Float64Array(D), acc = new Float64Array(D);
  const p = logits.map((l) => f32(Math.exp(l - m)));
  const sum = p.reduce((a, x) => f32(a + x), 0);
  ks.forEach((r, k) => { const w = Math.exp(logits[k] - m) / L; for (let d = 0; d < D; d++) { ref[d] += w * kvD[r * D + d]; acc[d] = f32(acc[d] + f32(bf(p[k]) * kvD[r * D + d])); } });
  const emu = acc.map((x) => bf(f32(x / sum)));
  const g = Array.from(got.out.data.subarray(i * D, i * D + D), (b) => R.decodeBf16(b));
  const cg = R.cosineGap(g, ref), ce = R.cosineGap(emu, ref);
  let diff = 0; for (let d = 0; d < D; d++) if (g[d] !== emu[d]) diff++;
  stats.elemsDiffer += diff; if (!diff) stats.rowsBitEqual++;
  if (cg > 7e-6) stats.got_over++; if (ce > 7e-6) stats.emu_over++; if (cg > 7e-6 && ce > 7e-6) stats.both_over++;
  if (cg > stats.got_max) { stats.got_max = cg; stats.worstRow = { i, keys: ks.length, emuGap: ce, elemsDiffer: diff }; }
  stats.emu_max = Math.max(stats.emu_max, ce);
}
console.log(JSON.stringify({ backend, seed, ...stats }));
