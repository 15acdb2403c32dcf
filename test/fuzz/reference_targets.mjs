/**
 * referenceApi (session 57, from seed REFERENCE_FROM_SEED, every backend; no engine): the public
 * `sparse-mla/reference` entry point called with the mutator's arguments. The fuzzer's other targets
 * hand the reference checked copies (it is their oracle), so its own checks of what a caller gives
 * it were reached by no case. SPEC §9 holds for it as for the library: bad input is a typed
 * SparseMlaError naming the argument, never a TypeError or RangeError from inside, a hang or a
 * write into a caller's array (quantizeKCacheReference writes its cache, which is `written`).
 *
 * The calls: the three attention references (with `opts.queries` or not), the layer reference, the
 * cache references (quantize, dequantize, sizes, token layout, checks, id lists, tile exponents),
 * the comparison (`compareAttention`, `attentionValues`, `tensorValues`, the bounds, `cosineGap`),
 * `emptyAttentionResult`, `widenBf16`, `logAddExp` and the format codecs. Judged: a neutral (or
 * stable) case gives exactly what the unmutated call gives (the reference is deterministic float64:
 * every number the same, NaN for NaN); a mutated one may resolve or refuse, typed.
 */
import * as R from '../../dist/reference/index.js';
import { tensor } from '../../dist/index.js';
import { randomBf16Bits } from '../../dist/check/grid.js';
import {
  byMemory,
  dequantizeKCachePagedTarget,
  layerScenario,
  pagedSparseAttentionTarget,
  quantizeKCacheTarget,
  sparsePrefillTarget,
} from './targets.mjs';

/** The first seed that draws referenceApi. */
export const REFERENCE_FROM_SEED = 194;

const TYPED_PROTO = Object.getPrototypeOf(Uint8Array.prototype);
const TYPED_KIND = Object.getOwnPropertyDescriptor(TYPED_PROTO, Symbol.toStringTag).get;

/** A number as text that tells NaN, -0 and ±inf apart. */
function numberText(x) {
  if (typeof x === 'bigint') return `${x}n`;
  if (Object.is(x, -0)) return '-0';
  return String(x);
}

/** A result as one string: typed arrays by kind and elements, objects by sorted keys (what the judge compares). */
function canon(v, depth = 0) {
  if (depth > 6) return '…';
  if (typeof v === 'number' || typeof v === 'bigint') return numberText(v);
  if (typeof v !== 'object' || v === null) return typeof v === 'string' ? JSON.stringify(v) : String(v);
  const kind = ArrayBuffer.isView(v) ? TYPED_KIND.call(v) : undefined;
  if (kind !== undefined) return `${kind}[${Array.from(v, numberText).join(',')}]`;
  if (Array.isArray(v)) return `[${v.map((x) => canon(x, depth + 1)).join(',')}]`;
  return `{${Object.keys(v).sort().map((k) => `${k}:${canon(v[k], depth + 1)}`).join(',')}}`;
}

/** Some rows of n (sorted or not, repeats allowed), as `opts.queries` / `rows` take them. */
function someRows(rng, n) {
  if (n === 0) return [];
  return Array.from({ length: rng.int(1, Math.min(n, 4) + 1) }, () => rng.int(0, n));
}

/**
 * A small attention reference and an engine's result for it (the reference rounded, a few lse
 * values off by 1): compareAttention's arguments. With `someOf`, the reference of some rows only
 * (`queries`; got and ref hold the same rows).
 */
function attentionPair(rng, hooks, someOf = false) {
  const a = sparsePrefillTarget.build(rng, { engine: null }, hooks).args[0];
  const nq = a.q.shape[0], hQ = a.q.shape[1], dV = a.dV ?? 512;
  const queries = someOf && nq > 0 ? someRows(rng, nq) : undefined;
  const ref = R.sparsePrefillReference(a, queries ? { queries } : {});
  const rows = queries ? queries.length : nq;
  const out = hooks.track(Uint16Array.from(ref.out, (x) => R.encodeBf16(x)));
  const lse = hooks.track(Float32Array.from(ref.lse, (x) => (rng.uniform() < 0.05 ? x + 1 : x)));
  const maxLogits = hooks.track(Float32Array.from(ref.maxLogits));
  const tensors = { out: tensor('bf16', [rows, hQ, dV], out), lse: tensor('float32', [rows, hQ], lse), maxLogits: tensor('float32', [rows, hQ], maxLogits) };
  return { ref, tensors, nq, hQ, dV, queries };
}

/** Each call: [name, build(rng, hooks) → { args, written? }]. */
const CALLS = [
  ['sparsePrefillReference', (rng, hooks) => {
    const a = sparsePrefillTarget.build(rng, { engine: null }, hooks).args[0];
    return { args: rng.uniform() < 0.4 ? [a, { queries: someRows(rng, a.q.shape[0]) }] : [a] };
  }],
  ['pagedSparseAttentionReference', (rng, hooks) => {
    const a = pagedSparseAttentionTarget.build(rng, { engine: null }, hooks).args[0];
    return { args: rng.uniform() < 0.4 ? [a, { queries: someRows(rng, a.q.shape[0]) }] : [a] };
  }],
  ['prefillLayerReference', (rng, hooks) => {
    const { sc, layer } = layerScenario(rng, hooks, rng.pick([0, 4, 128]));
    const a = { chunk: sc.ref, compressRatio: layer.compressRatio, q: layer.q, caches: layer.caches, smScale: layer.smScale };
    if (layer.topkIndices) a.topkIndices = layer.topkIndices;
    if (layer.attnSink) a.attnSink = layer.attnSink;
    return { args: rng.uniform() < 0.4 ? [a, { queries: someRows(rng, sc.numQueries) }] : [a] };
  }],
  ['dequantizeKCacheReference', (rng, hooks) => {
    const a = dequantizeKCachePagedTarget.build(rng, { engine: null }, hooks).args[0];
    return { args: [a.cache, a.tokenIds] };
  }],
  ['quantizeKCacheReference', (rng, hooks) => {
    const a = quantizeKCacheTarget.build(rng, { engine: null }, hooks).args[0];
    // judged by the cache's bytes after the call (read by the judge, as the quantizeKCache target reads them)
    return { args: [a.cache, a.tokenIds, a.rows], written: [a.cache.data], writes: true };
  }],
  ['kvCacheBytesReference', (rng) => {
    const format = rng.pick(['v4', 'v32']);
    return { args: [format, format === 'v32' ? 1 : rng.pick([1, 2, 64, 128]), rng.int(0, 9)] };
  }],
  ['v4PageBytesReference', (rng) => ({ args: [rng.pick([1, 2, 3, 64, 128])] })],
  ['tokenLayoutReference', (rng) => {
    const format = rng.pick(['v4', 'v32']);
    return { args: [{ format, pageSize: format === 'v32' ? 1 : rng.pick([1, 2, 64]) }, rng.int(0, 300)] };
  }],
  ['cacheTokenCount', (rng, hooks) => ({ args: [dequantizeKCachePagedTarget.build(rng, { engine: null }, hooks).args[0].cache] })],
  ['checkCacheReference', (rng, hooks) => {
    const cache = dequantizeKCachePagedTarget.build(rng, { engine: null }, hooks).args[0].cache;
    return { args: rng.uniform() < 0.5 ? [cache, 'kCache'] : [cache] };
  }],
  ['normalizeTokenIds', (rng, hooks) => {
    const limit = rng.int(1, 50);
    const ids = Array.from({ length: rng.int(0, 6) }, () => rng.int(0, limit));
    const form = rng.pick(['array', 'int32', 'int64']);
    const arg = form === 'array' ? ids : form === 'int32' ? tensor('int32', [ids.length], hooks.track(Int32Array.from(ids))) : tensor('int64', [ids.length], hooks.track(BigInt64Array.from(ids, BigInt)));
    return { args: rng.uniform() < 0.5 ? [arg, limit, 'ids'] : [arg, limit] };
  }],
  ['tileExponentReference', (rng) => ({ args: [rng.pick([0, 1, 448, 1e-30, 3.5, 2 ** 100, rng.uniform() * 1000])] })],
  ['compareAttention', (rng, hooks) => {
    const { ref, tensors, hQ, dV, queries } = attentionPair(rng, hooks, rng.uniform() < 0.4);
    const got = R.attentionValues(tensors);
    const shape = { heads: hQ, dV, ...(queries ? { queries } : {}) };
    return { args: [got, ref, shape] };
  }],
  ['attentionValues', (rng, hooks) => {
    const { tensors, nq } = attentionPair(rng, hooks);
    return { args: rng.uniform() < 0.5 ? [tensors, someRows(rng, nq)] : [tensors] };
  }],
  ['tensorValues', (rng, hooks) => {
    const { tensors, nq } = attentionPair(rng, hooks);
    const t = tensors[rng.pick(['out', 'lse', 'maxLogits'])];
    return { args: rng.uniform() < 0.5 ? [t, someRows(rng, nq)] : [t] };
  }],
  ['cosineGap', (rng) => {
    const n = rng.int(0, 20);
    return { args: [Array.from({ length: n }, () => rng.normal()), Float64Array.from({ length: n }, () => rng.normal())] };
  }],
  ['outBound', (rng) => ({ args: [Math.abs(rng.normal())] })],
  ['lseBound', (rng) => ({ args: [rng.normal() * 10, rng.normal() * 10] })],
  ['maxLogitsBound', (rng) => ({ args: [rng.normal() * 10] })],
  ['emptyAttentionResult', (rng) => ({ args: [rng.int(0, 4), rng.int(1, 4), rng.pick([64, 512])] })],
  ['widenBf16', (rng, hooks) => ({ args: [hooks.track(randomBf16Bits(rng, rng.int(0, 20)))] })],
  ['logAddExp', (rng) => ({ args: [rng.normal() * 10, rng.pick([rng.normal() * 10, -Infinity])] })],
  ['encodeBf16', (rng) => ({ args: [rng.normal() * 1e3] })],
  ['decodeBf16', (rng) => ({ args: [rng.u32() & 0xffff] })],
  ['roundToBf16', (rng) => ({ args: [rng.normal()] })],
  ['encodeE4m3', (rng) => ({ args: [rng.normal() * 100] })],
  ['decodeE4m3', (rng) => ({ args: [rng.u32() & 0xff] })],
  ['decodeUe8m0', (rng) => ({ args: [rng.u32() & 0xff] })],
  ['encodeUe8m0', (rng) => ({ args: [rng.int(-130, 131)] })],
  ['roundToFloat32', (rng) => ({ args: [rng.normal() * 1e30] })],
  ['roundHalfEven', (rng) => ({ args: [rng.int(-8, 9) / 2] })],
  ['exponentOf', (rng) => ({ args: [rng.pick([1, 0.75, 2 ** -1074, 1e300, -3])] })],
];

const referenceApi = {
  name: 'referenceApi',
  fromSeed: REFERENCE_FROM_SEED,
  build(rng, env, hooks) {
    const [name, make] = rng.pick(CALLS);
    const { args, written, writes } = make(rng, hooks);
    const fn = R[name];
    return {
      args,
      describe: `sparse-mla/reference ${name}`,
      ...(written ? { written } : {}),
      call: (x) => fn(...x),
      judge: (got, { refArgs, args: given, neutral }) => {
        // a mutated call may resolve with what its arguments give: only a neutral (or stable) one is judged
        if (!neutral) return null;
        let want;
        try {
          want = fn(...refArgs);
        } catch (e) {
          return `the unmutated call threw ${e?.name} ${e?.code ?? ''}: ${String(e?.message).slice(0, 200)}`;
        }
        // a written cache: its bytes as its memory holds them (a subclass's getters may lie)
        if (writes) [got, want] = [byMemory(given[0]).data, refArgs[0].data];
        const [g, w] = [canon(got), canon(want)];
        if (g === w) return null;
        let i = 0;
        while (i < g.length && g[i] === w[i]) i++;
        return `${name}: the result differs from the unmutated call's at character ${i}: got …${g.slice(Math.max(0, i - 40), i + 60)}…, want …${w.slice(Math.max(0, i - 40), i + 60)}…`;
      },
    };
  },
};

/** The targets of this file, with their weights (fuzz.mjs draws them with the session-53 ones). */
export const REFERENCE_TARGETS = [[referenceApi, 1]];
