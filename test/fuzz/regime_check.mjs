#!/usr/bin/env node
/**
 * A check of the fuzzer's judge against regime.mjs (`node test/fuzz/regime_check.mjs`, a few
 * seconds; exit 1 on a failed check). "got" is an emulated correct float32 kernel (each logit a
 * float32 sum of exact bf16 products in dim order, its lse and maxLogits rounded to float32, the
 * softmax in float64, out rounded to bf16), independent of the library and of the reference's code:
 *
 * 1. at smScale ±4096 over unit-scale data (the mutator's value; wasm seed 31 case 1488's regime),
 *    SPEC §4's bounds taken everywhere flag the correct kernel on some heads, and the judge
 *    (judgeAttention with withDotScales) passes every case;
 * 2. at the usual scale the judge passes the correct kernel and flags each planted bug on most
 *    cases: smScale's sign flipped, the first entry dropped, smScale off by 2^-12, lse off by
 *    2^-13 of itself, out's last dim zeroed.
 */
import { tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits } from '../../dist/check/grid.js';
import { judgeAttention } from './targets.mjs';
import { withDotScales } from './regime.mjs';

const f32 = Math.fround;

/** The emulated float32 kernel over a sparse prefill's arguments (with the plants of `bug`). */
function float32Kernel(a, bug = {}) {
  const [sQ, hQ, dQK] = a.q.shape, dV = a.dV, topk = a.indices.shape[1], sKV = a.kv.shape[0];
  const q = Array.from(a.q.data, R.decodeBf16), kv = Array.from(a.kv.data, R.decodeBf16);
  const scale = f32(a.smScale * (bug.sign ? -1 : 1) * (bug.jitter ? 1 + 2 ** -12 : 1));
  const out = new Uint16Array(sQ * hQ * dV), lse = new Float32Array(sQ * hQ), maxLogits = new Float32Array(sQ * hQ);
  for (let i = 0; i < sQ; i++) {
    const rows = [];
    for (let k = bug.drop ? 1 : 0; k < topk; k++) {
      const id = a.indices.data[i * topk + k];
      if (id >= 0 && id < sKV) rows.push(id);
    }
    for (let h = 0; h < hQ; h++) {
      const s = i * hQ + h, qo = s * dQK;
      const logits = rows.map((r) => {
        let acc = 0;
        for (let c = 0; c < dQK; c++) acc = f32(acc + q[qo + c] * kv[r * dQK + c]); // bf16 × bf16 is exact in float32
        return f32(acc * scale);
      });
      const m = logits.length ? Math.max(...logits) : -Infinity;
      const sum = logits.reduce((t, p) => t + Math.exp(p - m), 0);
      const l = logits.length ? m + Math.log(sum) : Infinity;
      maxLogits[s] = m;
      lse[s] = bug.lse ? l * (1 + 2 ** -13) : l;
      for (let c = 0; c < dV; c++) {
        let o = 0;
        logits.forEach((p, k) => (o += Math.exp(p - l) * kv[rows[k] * dQK + c]));
        out[s * dV + c] = R.encodeBf16(bug.out && c === dV - 1 ? 0 : o);
      }
    }
  }
  return { out: tensor('bf16', [sQ, hQ, dV], out), lse: tensor('float32', [sQ, hQ], lse), maxLogits: tensor('float32', [sQ, hQ], maxLogits) };
}

function randomCall(rng, smScale) {
  const sQ = rng.int(1, 4), hQ = rng.int(1, 5), dQK = rng.pick([512, 576]), sKV = rng.pick([1, 3, 40]), topk = rng.pick([1, 2, 8]);
  const a = {
    q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK, rng.pick([1, 1e-3]))),
    indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.int(0, sKV))),
    smScale: smScale * (rng.uniform() < 0.5 ? -1 : 1),
    dV: 512,
  };
  return a;
}

const judge = (got, a) => judgeAttention(got, () => withDotScales('sparsePrefill', R.sparsePrefillReference, a), a.q.shape[0], a.q.shape[1], a.dV);
const everywhere = (got, a) => judgeAttention(got, () => R.sparsePrefillReference(a), a.q.shape[0], a.q.shape[1], a.dV);

let failed = 0;
const check = (ok, what) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failed++;
};

const rng = makeRng(20261207);
const CASES = 150;
{
  let flaggedEverywhere = 0, flagged = 0;
  for (let n = 0; n < CASES; n++) {
    const a = randomCall(rng, 4096);
    const got = float32Kernel(a);
    if (everywhere(got, a)) flaggedEverywhere++;
    const p = judge(got, a);
    if (p && flagged++ === 0) console.log(`  first: ${p}`);
  }
  check(flaggedEverywhere > 0, `smScale ±4096: the bounds taken everywhere flag the correct float32 kernel on ${flaggedEverywhere}/${CASES} cases`);
  check(flagged === 0, `smScale ±4096: the judge flags it on ${flagged}/${CASES} cases`);
}
{
  let flagged = 0;
  const bugs = ['sign', 'drop', 'jitter', 'lse', 'out'];
  const caught = Object.fromEntries(bugs.map((b) => [b, 0])), caughtEverywhere = { ...caught };
  for (let n = 0; n < CASES; n++) {
    const a = randomCall(rng, 1 / Math.sqrt(576));
    if (judge(float32Kernel(a), a)) flagged++;
    for (const bug of bugs) {
      const got = float32Kernel(a, { [bug]: true });
      if (judge(got, a)) caught[bug]++;
      if (everywhere(got, a)) caughtEverywhere[bug]++;
    }
  }
  check(flagged === 0, `usual scale: the judge flags the correct float32 kernel on ${flagged}/${CASES} cases`);
  // the jitter and the lse plant hide under the bounds' 1e-6 floor where kv is of scale 1e-3 (logits ~1e-3): the bounds
  // taken everywhere miss those cases too; the judge must catch what they catch
  for (const bug of bugs) check(caughtEverywhere[bug] > CASES / 3 && caught[bug] === caughtEverywhere[bug], `usual scale: planted ${bug} caught on ${caught[bug]}/${CASES} cases (the bounds taken everywhere: ${caughtEverywhere[bug]})`);
}
process.exitCode = failed ? 1 : 0;
