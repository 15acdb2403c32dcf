/**
 * Where SPEC §4's bounds can judge a float32 kernel (session 60). The out bound (2^-7 · mag) is the
 * room of two bf16 roundings, and the lse / maxLogits bounds (1e-6 + 2^-15 · |value|) are relative to
 * the logits; but a float32 logit P = smScale · Σ_c q_c·k_c is off by a multiple of
 *
 *   E = |smScale| · 2^-24 · S,   S = Σ_c |q_c · k_c|  (float32's unit roundoff times the dot's own scale),
 *
 * which grows with S, not with |P|: at a large |smScale| over unit-scale data (the mutator's 4096 or
 * v · 2^20), or where the logit cancels (|P| ≪ |smScale| · S), a correct float32 kernel is outside the
 * bounds. So the judge takes, per (query, head), S_max = max_k S_k over the valid entries (computed in
 * float64 by the reference itself on |q|, |kv| or a cache of |values|, smScale 1, no sink: its
 * maxLogits), and judges each tensor only where a float32 kernel can meet it:
 *
 * - The logit error allowed for is DOT_ERROR_ALLOWANCE · E = 4 E. The worst case over summation
 *   orders is (d − 1) · E (Higham, Accuracy and Stability of Numerical Algorithms, §3.1: a sum of d
 *   exact products, bf16 × bf16 being exact in float32), which no kernel comes near and which would
 *   leave almost nothing judged at the usual scale, where |smScale| · S is about 15 |P| and so
 *   (d − 1) · E is past 2^-15 · |P|. Rounding errors of both signs add up as a random walk: a
 *   sequential float32 sum of 576 unit-normal products errs by 0.08 E at the median and 2.1 E at
 *   worst over 20,000 sums; the cpu and wasm backends' lse and maxLogits erred by at most
 *   0.68 · (E + 4 · 2^-24 · max(|lse|, |maxLogits|)) over 850,000 heads (dQK 64-576, smScale ±1/24
 *   to ±2^16, topk 1-20; the second term is the rounding of the value itself, inside the bound's
 *   2^-15 · |value|). 4 E is 6x the backends' worst and 2x the sequential sum's; 16 E left gross
 *   errors unjudged at the usual scale (a sign-flipped smScale on a head whose one logit is −0.14,
 *   seed 9260 case 110 of pagedSparseAttention: bound 5.3e-6 = 6.6 E).
 * - lse and maxLogits are judged where their bound is at least 4 E: a logit error δ_k moves maxLogits
 *   by at most max_k |δ_k| and lse by at most Σ_k w_k |δ_k| ≤ max_k |δ_k| (∂lse/∂P_k is the softmax
 *   weight). Elsewhere (wasm seed 31 case 1488: maxLogits 4096 · ⟨q, k⟩ = −301 where S_max = 337, so
 *   the bound 9.2e-3 is 0.11 E) they are judged only by where ±inf and NaN are.
 * - out is judged where E ≤ 2^-12 (OUT_REGIME): a logit error δ changes each weight by a factor
 *   within e^(±2δ), so out by at most about 2δ · mag, and there the allowance (4 E ≤ 2^-10) moves it
 *   by at most 2^-9 · mag, a quarter of the bound; the cpu and wasm backends' out stayed within half
 *   its bound there. Elsewhere (two logits within a few E of each other: a float32 kernel may give
 *   either one the weight) only ±inf / NaN places are judged.
 * - where S or |smScale| · S reaches 2^127, a float32 dot may overflow where the float64 one does not:
 *   nothing of that head is judged (no generator reaches it: bf16 data near 2^126 meets subnormals or
 *   zeros in numericEdges).
 *
 * A head whose tensors are not judged is still called and its result shaped, typed and checked by
 * every other rule of its target (finiteness where the reference is finite, no crash, typed refusals).
 */
import * as R from '../../dist/reference/index.js';

/** float32's unit roundoff. */
const F32_UNIT = 2 ** -24;
/** The float32 logit error allowed for, in units of E (above). */
export const DOT_ERROR_ALLOWANCE = 4;
/** out is judged where E is at most this. */
export const OUT_REGIME = 2 ** -12;
/** From here a float32 dot or logit may overflow. */
const F32_OVERFLOW_RISK = 2 ** 127;

const TYPED_PROTO = Object.getPrototypeOf(Uint8Array.prototype);
const [TYPED_KIND, TYPED_BUFFER, TYPED_OFFSET, TYPED_LENGTH] = [Symbol.toStringTag, 'buffer', 'byteOffset', 'length'].map((k) => Object.getOwnPropertyDescriptor(TYPED_PROTO, k).get);

/** A copy of a typed array's elements read by its memory (the intrinsics), or null for anything else. */
function copyOf(data, kind) {
  if (typeof data !== 'object' || data === null || TYPED_KIND.call(data) !== kind) return null;
  return new globalThis[kind](TYPED_BUFFER.call(data), TYPED_OFFSET.call(data), TYPED_LENGTH.call(data)).slice();
}

/** A bf16 tensor of the magnitudes (sign bits cleared; NaN stays NaN). */
function absBf16(t) {
  const bits = copyOf(t?.data, 'Uint16Array');
  if (!bits) throw new Error('no bf16 data');
  for (let i = 0; i < bits.length; i++) bits[i] &= 0x7fff;
  return { dtype: t.dtype, shape: Array.from(t.shape), data: bits };
}

/** A KV cache of the same geometry whose values are the magnitudes of the given one's (e4m3 codes, bf16 rope, v32's float32 scales). */
function absCache(c) {
  const bytes = copyOf(c?.data, 'Uint8Array');
  if (!bytes) throw new Error('no cache bytes');
  const { format, pageSize, numPages } = c;
  const v4 = format === 'v4';
  const L = v4 ? R.V4_LAYOUT : R.V32_LAYOUT;
  const quantDims = v4 ? R.V4_LAYOUT.nopeDims : R.V32_LAYOUT.quantDims;
  const tokens = pageSize * numPages;
  for (let t = 0; t < tokens; t++) {
    const at = R.tokenLayoutReference({ format, pageSize }, t);
    if (at.rope + 2 * L.ropeDims > bytes.length) break;
    for (let j = 0; j < quantDims; j++) bytes[at.nope + j] &= 0x7f;
    for (let j = 0; j < L.ropeDims; j++) bytes[at.rope + 2 * j + 1] &= 0x7f; // little-endian bf16: the sign is in the high byte
    if (!v4) for (let j = 0; j < R.V32_LAYOUT.tiles; j++) bytes[at.scales + 4 * j + 3] &= 0x7f; // float32 scales (v4's are ue8m0, unsigned)
  }
  return { format, pageSize, numPages, data: bytes };
}

/** The fields of each call kind that hold values, and how their magnitudes are made. */
const VALUE_FIELDS = {
  sparsePrefill: { q: absBf16, kv: absBf16 },
  pagedSparseAttention: { q: absBf16, kCache: absCache, extraKCache: absCache },
  prefillLayer: {
    q: absBf16,
    caches: (c) => {
      if (typeof c !== 'object' || c === null || Array.isArray(c)) throw new Error('no cache set');
      const out = {};
      for (const k of ['swa', 'c4', 'c128']) if (c[k] !== undefined) out[k] = absCache(c[k]);
      return out;
    },
  },
};

/**
 * S_max per (query, head) ([rows · hQ], float64: the largest Σ_c |q_c · k_c| over the query's valid
 * entries, −inf where there is none) of a call of `kind` whose arguments the reference `reference`
 * reads; null where they cannot be read again as plain values (a mutated call: then every tensor is
 * judged as before). The arguments are read once more here, after the reference read them.
 */
export function dotScales(kind, reference, args) {
  try {
    const smScale = args.smScale;
    if (typeof smScale !== 'number' || !Number.isFinite(smScale)) return null;
    const abs = Object.create(args);
    const define = (k, value) => Object.defineProperty(abs, k, { value, enumerable: true, writable: true, configurable: true });
    for (const [k, make] of Object.entries(VALUE_FIELDS[kind])) {
      const v = args[k];
      if (v !== undefined && v !== null) define(k, make(v));
    }
    define('smScale', 1);
    define('attnSink', undefined);
    return { S: reference(abs).maxLogits, smScale };
  } catch {
    return null;
  }
}

/** The reference's result with its dot scales (dotScales) beside it, for judgeAttention. */
export function withDotScales(kind, reference, args) {
  const result = reference(args);
  result.dotScales = dotScales(kind, reference, args);
  return result;
}

/** Heads judged through judgedPart in this process, those each tensor judged by place only, and those of them whose S is ±inf or NaN (q or a row holds them); the runner reports them. */
export const REGIME_COUNTS = { heads: 0, out: 0, lse: 0, maxLogits: 0, nonFinite: 0 };

/**
 * got's values and the reference's, with what is not judged (above) made equal: both 0 for an out
 * element (so that the cosine leaves it out too), got the reference's value for an lse or maxLogits
 * one; ±inf and NaN kept where either has them (their places are judged). Also the count of heads
 * each tensor leaves unjudged.
 */
export function judgedPart(vals, ref, hQ, dV) {
  const scales = ref.dotScales;
  const skipped = { out: 0, lse: 0, maxLogits: 0, nonFinite: 0 };
  if (!scales || !scales.S) return { vals, ref, skipped };
  const { S, smScale } = scales;
  const out = Float64Array.from(vals.out), lse = Float64Array.from(vals.lse), maxLogits = Float64Array.from(vals.maxLogits);
  const refOut = Float64Array.from(ref.out), mag = Float64Array.from(ref.mag), refLse = Float64Array.from(ref.lse), refMax = Float64Array.from(ref.maxLogits);
  const finite = (a, b) => Number.isFinite(a) && Number.isFinite(b);
  for (let s = 0; s < S.length && s < lse.length; s++) {
    // S is −inf where no entry is valid (nothing summed), ±inf or NaN where q or a row holds them (the
    // logits are then as non-finite in float32 as in float64: judged by place)
    const dot = S[s] === -Infinity ? 0 : S[s], logit = Math.abs(smScale) * dot;
    if (!Number.isFinite(dot)) skipped.nonFinite++;
    const overflow = (Number.isFinite(dot) && dot >= F32_OVERFLOW_RISK) || (Number.isFinite(logit) && logit >= F32_OVERFLOW_RISK);
    const allowance = DOT_ERROR_ALLOWANCE * F32_UNIT * logit; // NaN where q or a row holds NaN: nothing judged but places
    // a reference value that is ±inf or NaN is judged by place whatever the allowance
    const judgeMax = !overflow && (!Number.isFinite(refMax[s]) || allowance <= R.maxLogitsBound(refMax[s]));
    const judgeLse = !overflow && (!Number.isFinite(refLse[s]) || allowance <= R.lseBound(refLse[s], refMax[s]));
    if (!judgeMax) {
      skipped.maxLogits++;
      if (overflow || finite(maxLogits[s], refMax[s])) maxLogits[s] = refMax[s];
    }
    if (!judgeLse) {
      skipped.lse++;
      if (overflow || finite(lse[s], refLse[s])) lse[s] = refLse[s];
    }
    if (overflow || !(F32_UNIT * logit <= OUT_REGIME)) {
      skipped.out++;
      for (let c = s * dV; c < (s + 1) * dV; c++) {
        if (overflow || finite(out[c], refOut[c])) {
          out[c] = 0;
          refOut[c] = 0;
        }
        mag[c] = 0;
      }
    }
  }
  REGIME_COUNTS.heads += lse.length;
  for (const k of ['out', 'lse', 'maxLogits', 'nonFinite']) REGIME_COUNTS[k] += skipped[k];
  return { vals: { out, lse, maxLogits }, ref: { out: refOut, mag, lse: refLse, maxLogits: refMax }, skipped };
}
