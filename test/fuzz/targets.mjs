/**
 * The fuzzer's targets: for every public entry point, a builder of a random valid call (small
 * shapes, seeded) and a judge of its result against the float64 reference (sparse-mla/reference)
 * or an independent rule. The mutator (mutate.mjs) then breaks one or two things of the call.
 *
 * build(rng, env, hooks) → { args: positional arguments, call(args), judge?(result, ctx) }
 * judge returns null when the result is right, else a description of what is wrong.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  createEngine,
  bf16BitsToFloat32,
  bf16ToFloat32,
  combinedWidth,
  float32ToBf16Bits,
  numel,
  requestVisible,
  swaGatherLength,
  swaTokenIdsFromTable,
  createKvCache,
  createPlan,
  createShardedPlan,
  kvCacheBytes,
  prefillLayer,
  prefillLayerSharded,
  routePrefill,
  tensor,
  toBf16,
} from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { randomBf16Bits } from '../../dist/check/grid.js';
import { chunkScenario, indexerTopk } from '../../dist/check/chunks.js';
import { encodeNpy, encodeSafetensors, parseNpy, parseSafetensors, readNpyFile, readSafetensorsFile, tensorToNpy } from '../../dist/io/index.js';
import { isTyped } from './mutate.mjs';
import { judgedPart, withDotScales } from './regime.mjs';

const TYPED_PROTO = Object.getPrototypeOf(Uint8Array.prototype);
const [TYPED_KIND, TYPED_BUFFER, TYPED_OFFSET, TYPED_LENGTH] = [Symbol.toStringTag, 'buffer', 'byteOffset', 'length'].map((k) => Object.getOwnPropertyDescriptor(TYPED_PROTO, k).get);

/**
 * A tensor as the reference should read it: its data a plain view of the array's memory (the
 * library reads a typed array by its memory; a subclass's getters may lie: stub seed 4815 case 1805);
 * anything else as it is.
 */
function byMemory(t) {
  if (typeof t !== 'object' || t === null || !isTyped(t.data)) return t;
  const d = t.data, kind = TYPED_KIND.call(d);
  let data;
  try {
    data = new globalThis[kind](TYPED_BUFFER.call(d), TYPED_OFFSET.call(d), TYPED_LENGTH.call(d));
  } catch {
    return t; // detached
  }
  // a KvCache too: the reference views its bytes through .buffer / .byteOffset, which a subclass may lie about (a createPlan case of cpu seed 24)
  if (t.format !== undefined) return { format: t.format, pageSize: t.pageSize, numPages: t.numPages, data };
  // the shape a plain array of its dims, read by index (the reference destructures it: a shape whose prototype is Object's has no iterator, cpu seed 107 case 641)
  const shape = Array.isArray(t.shape) ? Array.from({ length: t.shape.length }, (_, i) => t.shape[i]) : t.shape;
  return { dtype: t.dtype, shape, data };
}

/** `args` (an op's or a layer's argument object) with the named fields read by their memory (byMemory); the rest inherited as they are. */
function fieldsByMemory(args, keys) {
  if (typeof args !== 'object' || args === null) return args;
  const out = Object.create(args);
  // defined, not assigned: a frozen args object's fields are read-only, and an assignment to an inherited
  // read-only field throws (cpu seed 212 case 384, a false ref-refused)
  for (const k of keys) if (args[k] !== undefined) Object.defineProperty(out, k, { value: byMemory(args[k]), enumerable: true, writable: true, configurable: true });
  return out;
}

/** A layer's caches ({ swa, c4?, c128? }) read by their memory; an array of sets (a sharded call's) as it is. */
function cachesByMemory(caches) {
  if (typeof caches !== 'object' || caches === null || Array.isArray(caches)) return caches;
  const out = {};
  for (const k of ['swa', 'c4', 'c128']) if (caches[k] !== undefined) out[k] = byMemory(caches[k]);
  return out;
}

const D = 512;

function int32Tensor(hooks, shape, values) {
  return tensor('int32', shape, hooks.track(Int32Array.from(values)));
}

function randomIdx(rng, n, bound, invalid = 0.2) {
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.uniform() < invalid ? rng.pick([-1, bound, bound + 3, -7, 2 ** 31 - 1]) : bound > 0 ? rng.int(0, bound) : -1;
  return out;
}

/** indices as the ops take them: int32 or int64, [rows, topk] or [rows, 1, topk]. */
function indexTensor(rng, hooks, rows, topk, values, allowInt64 = true) {
  const shape = rng.uniform() < 0.2 ? [rows, 1, topk] : [rows, topk];
  if (allowInt64 && rng.uniform() < 0.25) return tensor('int64', shape, hooks.track(BigInt64Array.from(values, (v) => BigInt(v))));
  return tensor('int32', shape, hooks.track(values));
}

function sinkTensor(rng, hooks, hQ) {
  const s = new Float32Array(hQ).map(() => (rng.uniform() < 0.15 ? rng.pick([Infinity, -Infinity]) : rng.normal()));
  return tensor('float32', [hQ], hooks.track(s));
}

function lengthTensor(rng, hooks, rows, topk) {
  return int32Tensor(hooks, [rows], Array.from({ length: rows }, () => rng.int(0, topk + 3)));
}

function randomV4Cache(rng, hooks, pageSize, numPages) {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const rows = tensor('bf16', [n, D], randomBf16Bits(rng, n * D, rng.pick([1, 1, 1e-3])));
  R.quantizeKCacheReference(cache, Array.from({ length: n }, (_, i) => i), rows);
  hooks.track(cache.data);
  return cache;
}

/**
 * A judged attention result: shapes and SPEC §4.1's bounds against the reference (`ref`: a function
 * giving it). valuesUnknown (a stub device computes nothing): the shapes only. A reference made by
 * withDotScales (regime.mjs) has each tensor judged only on the heads where a float32 kernel's logit
 * error lies within its bound; ±inf and NaN are judged by place on every head.
 */
function judgeAttention(got, ref, rows, hQ, dV, valuesUnknown = false) {
  if (!got || typeof got !== 'object') return `result is ${typeof got}`;
  for (const [k, shape] of [['out', [rows, hQ, dV]], ['lse', [rows, hQ]], ['maxLogits', [rows, hQ]]]) {
    const t = got[k];
    if (!t || JSON.stringify(t.shape) !== JSON.stringify(shape)) return `${k} has shape ${t && JSON.stringify(t.shape)}, expected ${JSON.stringify(shape)}`;
    if (t.data.length !== shape.reduce((a, b) => a * b, 1)) return `${k} has ${t.data.length} elements for shape ${JSON.stringify(shape)}`;
  }
  if (rows === 0 || valuesUnknown) return null;
  ref = ref();
  const vals = {
    out: Array.from(got.out.data, (b) => R.decodeBf16(b)),
    lse: Array.from(got.lse.data),
    maxLogits: Array.from(got.maxLogits.data),
  };
  const part = judgedPart(vals, ref, hQ, dV);
  const c = R.compareAttention(part.vals, part.ref, { heads: hQ, dV });
  // the cosine leaves out elements below bf16's smallest normal (R.BF16_MIN_NORMAL; seed 1 case 5676)
  if (c.pass) return null;
  const { out, lse, maxLogits } = part.skipped;
  const unjudged = out + lse + maxLogits > 0 ? ` (of ${hQ * rows} heads, out ${out}, lse ${lse} and maxLogits ${maxLogits} judged by place only: float32's logit error past their bounds)` : '';
  return `outside SPEC §4.1's bounds: ${R.formatAttentionComparison(c).replace(/\s+/g, ' ').slice(0, 400)}${unjudged}`;
}

const sparsePrefill = {
  name: 'sparsePrefill',
  engine: true,
  build(rng, env, hooks) {
    const sQ = rng.pick([0, 1, 1, 2, 3, 5]);
    const hQ = rng.pick([1, 2, 3, 4]);
    const dQK = rng.pick([512, 576, 576, 64, 128]);
    const sKV = rng.pick([0, 1, 5, 17, 40]);
    const topk = rng.pick([0, 1, 3, 8, 20]);
    const a = {
      q: tensor('bf16', [sQ, hQ, dQK], hooks.track(randomBf16Bits(rng, sQ * hQ * dQK))),
      kv: tensor('bf16', [sKV, dQK], hooks.track(randomBf16Bits(rng, sKV * dQK))),
      indices: indexTensor(rng, hooks, sQ, topk, randomIdx(rng, sQ * topk, sKV)),
      smScale: (1 / Math.sqrt(dQK)) * rng.pick([1, 0.5, 4]),
    };
    if (dQK < 512) a.dV = 64 * rng.int(1, dQK / 64 + 1);
    else if (rng.uniform() < 0.3) a.dV = 512;
    if (rng.uniform() < 0.5) a.attnSink = sinkTensor(rng, hooks, hQ);
    if (rng.uniform() < 0.4) a.topkLength = lengthTensor(rng, hooks, sQ, topk);
    const args = [a];
    if (rng.uniform() < 0.3) args.push({ output: 'host' });
    return {
      args,
      call: (x) => env.engine.sparsePrefill(...x),
      judge: (got, { refArgs, stub }) => {
        const r = refArgs[0];
        return judgeAttention(got, () => withDotScales('sparsePrefill', R.sparsePrefillReference, fieldsByMemory(r, ['q', 'kv', 'indices', 'topkLength', 'attnSink'])), r.q.shape[0], r.q.shape[1], r.dV ?? 512, stub);
      },
    };
  },
};

const pagedSparseAttention = {
  name: 'pagedSparseAttention',
  engine: true,
  build(rng, env, hooks) {
    const n = rng.pick([0, 1, 2, 3]);
    const hQ = rng.pick([1, 2, 3]);
    const pageSize = rng.pick([1, 2, 16, 64]);
    const numPages = Math.max(1, Math.ceil(rng.int(1, 80) / pageSize));
    const kCache = randomV4Cache(rng, hooks, pageSize, numPages);
    const tokens = pageSize * numPages;
    const topk = rng.pick([0, 1, 4, 9]);
    const a = {
      q: tensor('bf16', [n, hQ, D], hooks.track(randomBf16Bits(rng, n * hQ * D))),
      kCache,
      indices: tensor('int32', rng.uniform() < 0.2 ? [n, 1, topk] : [n, topk], hooks.track(randomIdx(rng, n * topk, tokens))),
      smScale: 1 / Math.sqrt(576),
    };
    if (rng.uniform() < 0.4) a.topkLength = lengthTensor(rng, hooks, n, topk);
    if (rng.uniform() < 0.4) {
      const ePage = rng.pick([1, 4, 64]);
      const eCache = randomV4Cache(rng, hooks, ePage, Math.max(1, Math.ceil(rng.int(1, 40) / ePage)));
      const etopk = rng.pick([0, 2, 5]);
      a.extraKCache = eCache;
      a.extraIndices = tensor('int32', [n, etopk], hooks.track(randomIdx(rng, n * etopk, eCache.pageSize * eCache.numPages)));
      if (rng.uniform() < 0.5) a.extraTopkLength = lengthTensor(rng, hooks, n, etopk);
    }
    if (rng.uniform() < 0.5) a.attnSink = sinkTensor(rng, hooks, hQ);
    if (rng.uniform() < 0.2) a.dV = 512;
    return {
      args: [a],
      call: (x) => env.engine.pagedSparseAttention(...x),
      judge: (got, { refArgs, stub }) => {
        const r = refArgs[0];
        return judgeAttention(got, () => withDotScales('pagedSparseAttention', R.pagedSparseAttentionReference, fieldsByMemory(r, ['q', 'kCache', 'indices', 'topkLength', 'attnSink', 'extraKCache', 'extraIndices', 'extraTopkLength'])), r.q.shape[0], r.q.shape[1], 512, stub);
      },
    };
  },
};

function randomCacheBytes(rng, hooks, format) {
  const pageSize = format === 'v32' ? 1 : rng.pick([1, 2, 3, 16, 64]);
  const numPages = format === 'v32' ? rng.int(1, 20) : rng.int(1, 4);
  const cache = createKvCache(format, { pageSize, numPages });
  for (let i = 0; i < cache.data.length; i++) cache.data[i] = rng.u32() & 0xff;
  hooks.track(cache.data);
  return cache;
}

function tokenIdsArg(rng, hooks, ids) {
  const form = rng.pick(['array', 'int32', 'int64']);
  if (form === 'array') return Array.from(ids);
  if (form === 'int32') return tensor('int32', [ids.length], hooks.track(Int32Array.from(ids)));
  return tensor('int64', [ids.length], hooks.track(BigInt64Array.from(ids, (v) => BigInt(v))));
}

function distinctIds(rng, count, bound) {
  const all = Array.from({ length: bound }, (_, i) => i);
  for (let i = all.length - 1; i > 0; i--) {
    const j = rng.int(0, i + 1);
    [all[i], all[j]] = [all[j], all[i]];
  }
  return all.slice(0, count);
}

const quantizeKCache = {
  name: 'quantizeKCache',
  engine: true,
  build(rng, env, hooks) {
    const format = rng.pick(['v4', 'v32']);
    const cache = randomCacheBytes(rng, hooks, format);
    const tokens = cache.pageSize * cache.numPages;
    const n = rng.int(0, Math.min(tokens, 6) + 1);
    const ids = distinctIds(rng, n, tokens);
    const width = format === 'v4' ? 512 : 576;
    const scale = rng.pick([1, 1e-3, 300, 1e-30]);
    const f = new Float32Array(n * width).map(() => rng.normal() * scale);
    if (n > 0 && rng.uniform() < 0.2) f[rng.int(0, f.length)] = rng.pick([NaN, Infinity, -Infinity, 1e38]);
    const rows = rng.uniform() < 0.5 ? tensor('float32', [n, width], hooks.track(f)) : tensor('bf16', [n, width], hooks.track(Uint16Array.from(f, (x) => R.encodeBf16(x))));
    return {
      args: [{ cache, tokenIds: tokenIdsArg(rng, hooks, ids), rows }],
      // the cache is written by a resolved call: judged against the reference, not its bytes before
      written: [cache.data],
      call: (x) => env.engine.quantizeKCache(...x),
      judge: (got, { refArgs, args, pre }) => {
        if (got !== undefined) return `resolved with ${typeof got}, expected undefined`;
        const r = refArgs[0];
        const before = pre(r.cache.data);
        // fields read, not spread: a cache object that inherits them (a neutral mutation) has none of its own
        const want = { format: r.cache.format, pageSize: r.cache.pageSize, numPages: r.cache.numPages, data: before.slice() };
        R.quantizeKCacheReference(want, byMemory(r.tokenIds), byMemory(r.rows));
        // the cache's bytes by its memory (a subclass may lie about its buffer, offset and length: stub seed 26 case 2318)
        const bytes = byMemory(args[0].cache).data;
        const i = bytes.findIndex((b, k) => b !== want.data[k]);
        return i === -1 && bytes.length === want.data.length ? null : `cache byte ${i}: got ${bytes[i]}, want ${want.data[i]}`;
      },
    };
  },
};

const dequantizeKCachePaged = {
  name: 'dequantizeKCachePaged',
  engine: true,
  build(rng, env, hooks) {
    const format = rng.pick(['v4', 'v32']);
    let cache;
    if (format === 'v4') cache = randomV4Cache(rng, hooks, rng.pick([1, 3, 16]), rng.int(1, 4));
    else {
      cache = createKvCache('v32', { numTokens: rng.int(1, 12) });
      const rows = tensor('bf16', [cache.numPages, 576], randomBf16Bits(rng, cache.numPages * 576));
      R.quantizeKCacheReference(cache, Array.from({ length: cache.numPages }, (_, i) => i), rows);
      hooks.track(cache.data);
    }
    const tokens = cache.pageSize * cache.numPages;
    const ids = Array.from({ length: rng.int(0, 9) }, () => rng.int(0, tokens));
    const args = [{ cache, tokenIds: tokenIdsArg(rng, hooks, ids) }];
    if (rng.uniform() < 0.3) args.push({ output: 'host' });
    return {
      args,
      call: (x) => env.engine.dequantizeKCachePaged(...x),
      judge: (got, { refArgs, stub }) => {
        const r = refArgs[0];
        const width = r.cache.format === 'v4' ? 512 : 576;
        if (stub) {
          // the ids' length by their memory (a subclass's length may lie: stub seed 52 case 6399)
          const n = Array.isArray(r.tokenIds) ? r.tokenIds.length : isTyped(r.tokenIds.data) ? TYPED_LENGTH.call(r.tokenIds.data) : r.tokenIds.data.length;
          return got?.dtype === 'bf16' && JSON.stringify(got.shape) === JSON.stringify([n, width]) && got.data.length === n * width ? null : `got ${got?.dtype} ${JSON.stringify(got?.shape)}, expected bf16 [${n}, ${width}]`;
        }
        // the ids by their memory too, as the quantizeKCache judge reads them (a subclass's length may lie: cpu seed 95 case 975)
        const want = R.dequantizeKCacheReference(byMemory(r.cache), byMemory(r.tokenIds));
        if (!got || got.dtype !== 'bf16' || JSON.stringify(got.shape) !== JSON.stringify([want.length / width, width])) return `got ${got?.dtype} ${JSON.stringify(got?.shape)}`;
        for (let i = 0; i < want.length; i++) {
          const v = R.decodeBf16(got.data[i]);
          if (!(Number.isNaN(v) ? Number.isNaN(want[i]) : v === want[i])) return `element ${i}: got ${v}, want ${want[i]}`;
        }
        return null;
      },
    };
  },
};

const createKvCacheTarget = {
  name: 'createKvCache',
  build(rng) {
    const format = rng.pick(['v4', 'v32']);
    const geometry =
      format === 'v32'
        ? rng.uniform() < 0.5
          ? { numTokens: rng.int(0, 50) }
          : { pageSize: 1, numPages: rng.int(0, 50) }
        : rng.uniform() < 0.5
          ? { numTokens: rng.int(0, 300), ...(rng.uniform() < 0.5 ? { pageSize: rng.pick([1, 7, 64]) } : {}) }
          : { pageSize: rng.pick([1, 2, 64, 128]), numPages: rng.int(0, 5) };
    return {
      args: [format, geometry],
      rereads: true, // two calls read the geometry: a getter answering otherwise gives the second another one (stub seed 46 case 4085)
      call: (x) => ({ cache: createKvCache(...x), bytes: kvCacheBytes(...x) }),
      judge: ({ cache, bytes }) => {
        const want = R.kvCacheBytesReference(cache.format, cache.pageSize, cache.numPages);
        if (bytes !== want || cache.data.length !== want) return `bytes ${bytes} / data ${cache.data.length}, reference ${want} for ${cache.format} ${cache.pageSize}×${cache.numPages}`;
        if (!(cache.data instanceof Uint8Array)) return 'data is not a Uint8Array';
        if (want <= 1 << 26 && cache.data.some((b) => b !== 0)) return 'not zero-filled';
        return null;
      },
    };
  },
};

/** A typed array's length as its memory has it (a subclass's length getter may lie: the library reads the memory). */
function realLength(a) {
  // a typed array by the intrinsic: its prototype's BYTES_PER_ELEMENT may be another kind's (stub seed 66 case 5800)
  if (isTyped(a)) return TYPED_LENGTH.call(a);
  return ArrayBuffer.isView(a) ? a.byteLength / a.BYTES_PER_ELEMENT : a.length;
}

/** A caller's array read by its length and indices (its own methods, iterator or species may lie: stub seed 66 case 817). */
function byIndex(a) {
  return Array.from({ length: a.length }, (_, i) => a[i]);
}

const DTYPES = { bf16: Uint16Array, float32: Float32Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array };

const tensorTarget = {
  name: 'tensor',
  build(rng, env, hooks) {
    const dtype = rng.pick(Object.keys(DTYPES));
    const shape = Array.from({ length: rng.int(0, 4) }, () => rng.int(0, 5));
    const n = shape.reduce((a, b) => a * b, 1);
    const args = [dtype, shape];
    if (rng.uniform() < 0.7) args.push(hooks.track(new DTYPES[dtype](n)));
    return {
      args,
      call: (x) => tensor(...x),
      judge: (t, { refArgs }) => {
        const [d, given, data] = refArgs;
        const s = byIndex(given);
        if (t.dtype !== d || JSON.stringify(t.shape) !== JSON.stringify(s)) return `got ${t.dtype} ${JSON.stringify(t.shape)}`;
        if (data !== undefined && t.data !== data && !isTyped(t.data)) return 'data not kept';
        if (t.data.length !== s.reduce((a, b) => a * b, 1)) return `data length ${t.data.length}`;
        return null;
      },
    };
  },
};

const toBf16Target = {
  name: 'toBf16',
  build(rng, env, hooks) {
    const n = rng.int(0, 20);
    const data = hooks.track(new Float32Array(n).map(() => (rng.uniform() < 0.1 ? rng.pick([NaN, Infinity, -0, 3.4e38, 1e-45]) : rng.normal() * 100)));
    return {
      args: [{ shape: [n], data }],
      call: (x) => toBf16(...x),
      judge: (t, { refArgs }) => {
        const src = refArgs[0].data;
        const n = realLength(src);
        if (t.dtype !== 'bf16' || t.data.length !== n) return `got ${t.dtype} of ${t.data.length}, want ${n}`;
        for (let i = 0; i < n; i++) {
          const want = R.encodeBf16(src[i]);
          if (t.data[i] !== want && !(Number.isNaN(R.decodeBf16(want)) && Number.isNaN(R.decodeBf16(t.data[i])))) return `element ${i}: got 0x${t.data[i].toString(16)}, want 0x${want.toString(16)}`;
        }
        return null;
      },
    };
  },
};

const bf16ToFloat32Target = {
  name: 'bf16ToFloat32',
  build(rng, env, hooks) {
    const n = rng.int(0, 20);
    const bits = hooks.track(Uint16Array.from({ length: n }, () => rng.u32() & 0xffff));
    return {
      args: [tensor('bf16', [n], bits)],
      call: (x) => bf16ToFloat32(...x),
      judge: (t, { refArgs }) => {
        const src = refArgs[0].data;
        const n = realLength(src);
        if (t.dtype !== 'float32' || t.data.length !== n) return `got ${t.dtype} of ${t.data.length}, want ${n}`;
        for (let i = 0; i < n; i++) {
          const want = R.decodeBf16(src[i]);
          if (!Object.is(t.data[i], want) && !(Number.isNaN(want) && Number.isNaN(t.data[i]))) return `element ${i}: got ${t.data[i]}, want ${want}`;
        }
        return null;
      },
    };
  },
};

/**
 * The path routePrefill must pick for (numQueries, options), or undefined where the per-backend
 * threshold table decides (helper-26's: only the forced and explicit cases are judged). The
 * environment is read only where no path is forced (RouteOptions' precedence): a forced call with
 * any env resolves (seed 13 case 3090: the oracle trimmed an env value of {} the library never
 * reads); a value read that is no string throws, as the library must refuse it.
 */
export function routeExpected(numQueries, o = {}) {
  if (o.path === 'sparse' || o.path === 'paged') return o.path;
  const raw = (o.env ?? process.env).SPARSE_MLA_PREFILL;
  if (raw !== undefined && typeof raw !== 'string') throw new TypeError(`SPARSE_MLA_PREFILL is a ${typeof raw}, not a string`);
  const env = (raw ?? '').trim().toLowerCase();
  if (env === 'sparse' || env === 'paged') return env;
  if (typeof o.threshold === 'number') return numQueries > o.threshold ? 'sparse' : 'paged';
  return undefined;
}

const routePrefillTarget = {
  name: 'routePrefill',
  build(rng) {
    const numQueries = rng.int(0, 2000);
    const options = {};
    if (rng.uniform() < 0.3) options.path = rng.pick(['sparse', 'paged', 'auto']);
    if (rng.uniform() < 0.4) options.threshold = rng.int(0, 1000);
    if (rng.uniform() < 0.4) options.compressRatio = rng.pick([0, 4, 128]);
    if (rng.uniform() < 0.4) options.backend = rng.pick(['cpu', 'wasm', 'cuda']);
    options.env = rng.uniform() < 0.3 ? { SPARSE_MLA_PREFILL: rng.pick(['sparse', 'paged', 'auto', ' Paged ']) } : {};
    return {
      args: [numQueries, options],
      call: (x) => routePrefill(...x),
      judge: (d, { refArgs }) => {
        const want = routeExpected(...refArgs);
        if (d.path !== 'sparse' && d.path !== 'paged') return `path ${d.path}`;
        if (typeof d.reason !== 'string') return 'no reason';
        return want === undefined || d.path === want ? null : `path ${d.path}, expected ${want}`;
      },
    };
  },
};

/** A small chunk with caches, q and the indexer's top-k, and its reference. */
function layerScenario(rng, hooks, ratio) {
  const nReq = rng.int(1, 4);
  const requests = Array.from({ length: nReq }, () => {
    const seqLen = rng.pick([rng.int(1, 20), rng.int(100, 300)]);
    return { seqLen, extendLen: rng.uniform() < 0.15 ? 0 : rng.int(1, Math.min(seqLen, 6) + 1) };
  });
  const window = rng.pick([128, 16, 1]);
  const sc = chunkScenario(rng, requests, { window, swaPageSize: rng.pick([16, 64]), c4PageSize: rng.pick([4, 16]), c128PageSize: rng.pick([1, 2]) });
  const hQ = rng.int(1, 4);
  const caches = { swa: randomV4Cache(rng, hooks, sc.swaPageSize, sc.swaPages) };
  if (ratio === 4) caches.c4 = randomV4Cache(rng, hooks, sc.c4PageSize, sc.c4Pages);
  if (ratio === 128) caches.c128 = randomV4Cache(rng, hooks, sc.c128PageSize, sc.c128Pages);
  const q = tensor('bf16', [sc.numQueries, hQ, D], hooks.track(randomBf16Bits(rng, sc.numQueries * hQ * D)));
  const topkIndices = ratio === 4 ? indexerTopk(rng, sc.requests, rng.pick([1, 8, 33]), { holes: 0.15, late: 1 }).indices : undefined;
  if (topkIndices) hooks.track(topkIndices.data);
  const attnSink = rng.uniform() < 0.5 ? sinkTensor(rng, hooks, hQ) : undefined;
  const layer = { q, compressRatio: ratio, caches, smScale: 1 / Math.sqrt(576), ...(topkIndices ? { topkIndices } : {}), ...(attnSink ? { attnSink } : {}) };
  if (rng.uniform() < 0.7) layer.path = rng.pick(['sparse', 'paged']);
  return { sc, hQ, layer, window };
}

function layerReference(sc, layer) {
  return withDotScales('prefillLayer', R.prefillLayerReference, {
    chunk: sc.ref,
    compressRatio: layer.compressRatio,
    q: layer.q,
    caches: layer.caches,
    smScale: layer.smScale,
    ...(layer.topkIndices ? { topkIndices: layer.topkIndices } : {}),
    ...(layer.attnSink ? { attnSink: layer.attnSink } : {}),
  });
}

function judgeLayer(got, sc, given, valuesUnknown = false) {
  // q, the top-k and the sink as the library reads them, by their memory (a subclass's length may lie: wasm seed 19 case 4371)
  // every field read as the library reads it (an inherited one too: a spread copies own fields only, cuda seed 66 case 3276)
  const layer = { ...given, compressRatio: given.compressRatio, smScale: given.smScale, q: byMemory(given.q), topkIndices: byMemory(given.topkIndices), attnSink: byMemory(given.attnSink), caches: cachesByMemory(given.caches) };
  let ref;
  const problem = judgeAttention(got, () => (ref = layerReference(sc, layer)), sc.numQueries, layer.q.shape[1], D, valuesUnknown);
  if (problem) return problem;
  if (valuesUnknown) return Number.isSafeInteger(got.dropped) && got.dropped >= 0 ? null : `dropped ${got.dropped}`;
  ref ??= layerReference(sc, layer);
  if (got.dropped !== ref.dropped) return `dropped ${got.dropped}, reference ${ref.dropped}`;
  return null;
}

const prefillLayerTarget = {
  name: 'prefillLayer',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    layer.plan = createPlan(sc.chunk, { window, ...(rng.uniform() < 0.3 ? { caches: layer.caches } : {}) });
    hooks.plans.push(layer.plan);
    const args = [env.engine, layer];
    if (rng.uniform() < 0.3) args.push({ output: 'host' });
    return {
      args,
      call: (x) => prefillLayer(...x),
      judge: (got, { refArgs, stub }) => judgeLayer(got, sc, refArgs[1], stub),
    };
  },
};

const createPlanTarget = {
  name: 'createPlan',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    const options = { window };
    if (rng.uniform() < 0.3) options.caches = layer.caches;
    if (rng.uniform() < 0.2) options.align = rng.pick([1, 64, 128]);
    if (rng.uniform() < 0.2) options.core = rng.pick(['auto', 'wasm']);
    // given only to be mutated (NaN, -1, a BigInt, a getter), each a budget the plan fits; drawn from
    // the side stream (mutate.mjs orSide), so a case without it builds what it built before
    const side = hooks.side;
    if (side && side.uniform() < 0.25) options.workspaceBudgetBytes = side.pick([2 ** 30, 2 ** 40, Number.MAX_SAFE_INTEGER]);
    return {
      args: [sc.chunk, options],
      // options.caches are the layer's: the layer after createPlan reads them again (cpu seed 47 case 1944)
      rereads: options.caches !== undefined,
      call: async (x) => {
        const plan = createPlan(...x);
        // the plan is used by a layer: what it holds is judged by the layer's result
        return { plan, layer: await prefillLayer(env.engine, { ...layer, plan }) };
      },
      judge: ({ plan, layer: got }, { neutral, stub }) => {
        // a mutated chunk means other rows than the scenario's reference reads: only a neutral one is judged
        if (!neutral) return null;
        if (plan.numQueries !== sc.numQueries) return `numQueries ${plan.numQueries}, expected ${sc.numQueries}`;
        return judgeLayer(got, sc, layer, stub);
      },
    };
  },
};

const createShardedPlanTarget = {
  name: 'createShardedPlan',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    const split = rng.pick(['heads', 'queries']);
    const shards = rng.int(1, split === 'heads' ? hQ + 1 : 4); // a head split has at most hQ shards
    const options = { shards, split, window };
    return {
      args: [sc.chunk, options],
      call: async (x) => {
        const plan = createShardedPlan(...x);
        const engines = Array.from({ length: plan.shards.length }, () => env.engine);
        return { plan, layer: await prefillLayerSharded(engines, { ...layer, plan }) };
      },
      judge: ({ plan, layer: got }, { refArgs, neutral, stub }) => {
        if (plan.shards.length !== refArgs[1].shards) return `${plan.shards.length} shards, ${refArgs[1].shards} asked for`;
        if (!neutral) return null; // a mutated chunk: other rows than the scenario's reference reads
        if (plan.numQueries !== sc.numQueries) return `numQueries ${plan.numQueries}`;
        return judgeLayer(got, sc, layer, stub);
      },
    };
  },
};

/** Shards' host outputs (downloaded) put together as one chunk's: rows by query range, heads within rows. */
function gatherShards(shards, nq, hQ) {
  const out = new Uint16Array(nq * hQ * D), lse = new Float32Array(nq * hQ), maxLogits = new Float32Array(nq * hQ);
  for (const r of shards) {
    for (let i = 0; i < r.numQueries; i++) {
      const row = (r.queryOffset + i) * hQ + r.headOffset;
      out.set(r.out.data.subarray(i * r.heads * D, (i + 1) * r.heads * D), row * D);
      lse.set(r.lse.data.subarray(i * r.heads, (i + 1) * r.heads), row);
      maxLogits.set(r.maxLogits.data.subarray(i * r.heads, (i + 1) * r.heads), row);
    }
  }
  return { out: tensor('bf16', [nq, hQ, D], out), lse: tensor('float32', [nq, hQ], lse), maxLogits: tensor('float32', [nq, hQ], maxLogits), dropped: shards.reduce((t, r) => t + r.dropped, 0) / (shards.length > 1 && shards.every((r) => r.queryOffset === 0) ? shards.length : 1) };
}

const prefillLayerShardedTarget = {
  name: 'prefillLayerSharded',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    const split = rng.pick(['heads', 'queries']);
    const shards = rng.int(1, split === 'heads' ? hQ + 1 : 4);
    layer.plan = createShardedPlan(sc.chunk, { shards, split, window });
    hooks.plans.push(layer.plan);
    const args = [Array.from({ length: shards }, () => env.engine), layer];
    if (rng.uniform() < 0.3) args.push({ output: 'host' });
    return {
      args,
      call: (x) => prefillLayerSharded(...x),
      // { output: 'device' } (a mutation, on a cuda engine): the shards' outputs, read back, put together here
      judge: (got, { refArgs, stub }) => {
        const whole = wholeQuery(refArgs[1]);
        return judgeLayer(got?.out === undefined && Array.isArray(got?.shards) ? gatherShards(got.shards, sc.numQueries, hQ) : got, sc, whole ?? refArgs[1], stub || whole === null);
      },
    };
  },
};

/**
 * The layer as the reference reads it (one q, one top-k, one set of caches) when given the sharded
 * API's per-shard forms: one q per shard ([shard queries, shard heads, D], joined by the plan's
 * split), one top-k per shard (its queries' rows; a split by heads gives each shard all of them)
 * and one set of caches per engine (the same caches each). The layer as it is without them; null
 * when a per-shard part is not on the host or the parts differ where the reference reads one (its
 * values unknown here).
 */
function wholeQuery(layer) {
  const byHeads = layer.plan?.split === 'heads';
  let whole = layer;
  if (Array.isArray(layer.caches)) {
    if (layer.caches.some((c) => c !== layer.caches[0])) return null; // sets that may differ: which one each shard read is its own
    whole = { ...whole, caches: layer.caches[0] };
  }
  if (Array.isArray(layer.q)) {
    const parts = layer.q.map(byMemory);
    if (!parts.every((t) => isTyped(t?.data) && Array.isArray(t.shape) && t.shape.length === 3)) return null;
    const rows = byHeads ? parts[0].shape[0] : parts.reduce((n, t) => n + t.shape[0], 0);
    const heads = byHeads ? parts.reduce((n, t) => n + t.shape[1], 0) : parts[0].shape[1];
    const data = new Uint16Array(rows * heads * D);
    let at = 0; // the heads (or rows) placed so far
    for (const t of parts) {
      const [n, h] = t.shape;
      if (byHeads) {
        for (let r = 0; r < n; r++) data.set(t.data.subarray(r * h * D, (r + 1) * h * D), (r * heads + at) * D);
        at += h;
      } else {
        data.set(t.data.subarray(0, n * h * D), at * heads * D);
        at += n;
      }
    }
    whole = { ...whole, q: tensor('bf16', [rows, heads, D], data) };
  }
  if (Array.isArray(layer.topkIndices)) {
    const parts = layer.topkIndices.map(byMemory);
    if (!parts.every((t) => isTyped(t?.data) && Array.isArray(t.shape) && t.shape.length >= 2)) return null;
    const width = parts[0].shape[parts[0].shape.length - 1];
    if (byHeads) {
      // every shard's queries are all of them: one top-k, unless the shards were given different ones
      if (parts.some((t) => t.data.length !== parts[0].data.length || t.data.some((v, i) => v !== parts[0].data[i]))) return null;
      whole = { ...whole, topkIndices: parts[0] };
    } else {
      const rows = parts.reduce((n, t) => n + t.shape[0], 0);
      const data = new Int32Array(rows * width);
      let at = 0;
      for (const t of parts) {
        data.set(t.data.subarray(0, t.shape[0] * width), at * width);
        at += t.shape[0];
      }
      whole = { ...whole, topkIndices: tensor('int32', [rows, width], data) };
    }
  }
  return whole;
}

function randomHostTensor(rng, hooks) {
  const dtype = rng.pick(Object.keys(DTYPES));
  const shape = Array.from({ length: rng.int(0, 4) }, () => rng.int(0, 4));
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new DTYPES[dtype](n);
  for (let i = 0; i < n; i++) data[i] = dtype === 'int64' ? BigInt.asIntN(64, (BigInt(rng.u32()) << 32n) | BigInt(rng.u32())) : rng.u32();
  return tensor(dtype, shape, hooks.track(data));
}

/** Byte-level damage to an encoded file: header text, length fields, truncation, random bytes. */
function damageBytes(bytes, rng, headerEnd, lengthField) {
  const text = () => new TextDecoder('latin1').decode(bytes.subarray(0, headerEnd));
  const choice = rng.int(0, 8);
  if (choice === 0) return bytes.subarray(0, rng.int(0, bytes.length));
  if (choice === 1) {
    const b = bytes.slice();
    for (let k = rng.int(1, 4); k > 0; k--) b[rng.int(0, Math.min(b.length, headerEnd + 8))] = rng.u32() & 0xff;
    return b;
  }
  if (choice === 2) {
    const b = bytes.slice();
    lengthField(b, rng.pick([0, 1, 7, 0xffff, 0x7fffffff, 2 ** 32 - 1, headerEnd + 1]));
    return b;
  }
  if (choice === 3) {
    const extra = new Uint8Array(rng.int(1, 9));
    const b = new Uint8Array(bytes.length + extra.length);
    b.set(bytes);
    return b;
  }
  // header text edits of the same length where possible
  const t = text();
  const edits = [
    [/\d+/, rng.pick(['99999999999999999999', '9007199254740993', '4294967296', '2147483648', '-1', '1e3', '0x10', ''])],
    [/'<u2'|'<f4'|'<i4'|'<i8'|'\|u1'|"BF16"|"F32"|"I32"|"I64"|"U8"/, rng.pick(["'<f8'", "'>i4'", "'toString'", '"F64"', '"__proto__"', '"constructor"', "'|b1'", '"BOOL"'])],
    [/False|True/, rng.pick(['True', 'false', 'None', '1'])],
    [/\[|\(/, rng.pick(['[[[[[[', '((', '{', ''])],
    [/data_offsets/, rng.pick(['data_offsetz', '__proto__', 'shape'])],
  ];
  const [re, rep] = rng.pick(edits);
  const edited = t.replace(re, rep);
  const head = Uint8Array.from(edited, (c) => c.charCodeAt(0) & 0xff);
  const b = new Uint8Array(head.length + bytes.length - headerEnd);
  b.set(head);
  b.set(bytes.subarray(headerEnd), head.length);
  if (head.length !== headerEnd && rng.uniform() < 0.7) lengthField(b, null, head.length);
  return b;
}

function npyBuild(rng, env, hooks, fromFile) {
  const t = randomHostTensor(rng, hooks);
  const good = encodeNpy(tensorToNpy(t));
  const headerEnd = 10 + new DataView(good.buffer).getUint16(8, true);
  const damaged = rng.uniform() < 0.7;
  const bytes = damaged
    ? damageBytes(good, rng, headerEnd, (b, v, headerTotal) => {
        if (b.length < 10) return;
        new DataView(b.buffer, b.byteOffset).setUint16(8, (v ?? headerTotal - 10) & 0xffff, true);
      })
    : good;
  return {
    args: fromFile ? [tempFile(bytes)] : [hooks.track(bytes)],
    mayRefuse: damaged,
    call: fromFile ? (x) => readNpyFile(...x) : (x) => parseNpy(...x),
    judge: (got) => {
      if (damaged) return got.data.length === got.shape.reduce((a, b) => a * b, 1) ? null : `data ${got.data.length} for shape ${got.shape}`;
      if (JSON.stringify(got.shape) !== JSON.stringify(t.shape) || got.data.length !== t.data.length) return `shape ${got.shape}`;
      for (let i = 0; i < t.data.length; i++) if (got.data[i] !== t.data[i] && !(Number.isNaN(got.data[i]) && Number.isNaN(t.data[i]))) return `element ${i}`;
      return null;
    },
  };
}

function safetensorsBuild(rng, env, hooks, fromFile) {
  const tensors = {};
  for (let k = rng.int(0, 4); k > 0; k--) tensors[rng.pick(['a', 'b', 'q', 'kv', 'idx'])] = randomHostTensor(rng, hooks);
  const good = encodeSafetensors(tensors, rng.uniform() < 0.5 ? { note: 'x' } : undefined);
  const headerEnd = 8 + Number(new DataView(good.buffer).getBigUint64(0, true));
  const damaged = rng.uniform() < 0.7;
  const bytes = damaged
    ? damageBytes(good, rng, headerEnd, (b, v, headerTotal) => {
        if (b.length < 8) return;
        new DataView(b.buffer, b.byteOffset).setBigUint64(0, BigInt(v ?? headerTotal - 8), true);
      })
    : good;
  return {
    args: fromFile ? [tempFile(bytes)] : [hooks.track(bytes)],
    mayRefuse: damaged,
    call: fromFile ? (x) => readSafetensorsFile(...x) : (x) => parseSafetensors(...x),
    judge: (got) => {
      for (const [k, t] of got.tensors) {
        if (t.data.length !== t.shape.reduce((a, b) => a * b, 1)) return `${k}: data ${t.data.length} for shape ${t.shape}`;
        if (!damaged && (tensors[k] === undefined || tensors[k].data.length !== t.data.length)) return `${k} differs`;
      }
      if (!damaged && got.tensors.size !== Object.keys(tensors).length) return `${got.tensors.size} tensors`;
      return null;
    },
  };
}

let tempDir;
/** The bytes as a file (one per process, rewritten by each case): the readers take a path. */
function tempFile(bytes) {
  // (under the runner's folder when a runner started this child: a child that dies leaves nothing behind)
  tempDir ??= mkdtempSync(join(process.env.SPARSE_MLA_FUZZ_TMPDIR || tmpdir(), 'sparse-mla-fuzz-'));
  const path = join(tempDir, 'f.bin');
  writeFileSync(path, bytes);
  return path;
}
export function removeTempDir() {
  if (tempDir) rmSync(tempDir, { recursive: true, force: true });
}

const parseNpyTarget = { name: 'parseNpy', build: (rng, env, hooks) => npyBuild(rng, env, hooks, false) };
const readNpyFileTarget = { name: 'readNpyFile', build: (rng, env, hooks) => npyBuild(rng, env, hooks, true) };
const parseSafetensorsTarget = { name: 'parseSafetensors', build: (rng, env, hooks) => safetensorsBuild(rng, env, hooks, false) };
const readSafetensorsFileTarget = { name: 'readSafetensorsFile', build: (rng, env, hooks) => safetensorsBuild(rng, env, hooks, true) };

/** Plan's public methods on a plan of a random chunk: layouts, page sizes, ids, rows and their paged form. */
const planMethodsTarget = {
  name: 'planMethods',
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    const plan = createPlan(sc.chunk, { window });
    hooks.plans.push(plan);
    const method = rng.pick(['layout', 'pageSize', 'compressedTokenIds', 'combinedRows', 'combineC4', 'pagedForm', 'checkCaches']);
    const rowsArg = () => (ratio === 4 ? plan.combineC4(layer.topkIndices) : plan.combinedRows(ratio));
    const args =
      method === 'combineC4'
        ? [ratio === 4 ? layer.topkIndices : int32Tensor(hooks, [sc.numQueries, 2], new Int32Array(sc.numQueries * 2))]
        : method === 'pagedForm'
          ? [{ ...rowsArg() }] // a copy of rows the plan made is not rows it made: refused, or (mutated back) judged
          : method === 'checkCaches'
            ? [layer.caches, ratio]
            : [method === 'layout' || method === 'combinedRows' ? (ratio === 4 ? 0 : ratio) : ratio === 0 ? 4 : ratio];
    return {
      args,
      mayRefuse: method === 'pagedForm' || ((method === 'pageSize' || method === 'compressedTokenIds') && ratio === 0),
      call: (x) => plan[method](...x),
    };
  },
};

/** The small exported helpers: bf16 bits, numel, the planner's size rules, SWA ids from a token table. */
const helpersTarget = {
  name: 'helpers',
  build(rng) {
    const which = rng.pick(['float32ToBf16Bits', 'bf16BitsToFloat32', 'numel', 'swaGatherLength', 'requestVisible', 'combinedWidth', 'swaTokenIdsFromTable']);
    const seqLen = rng.int(0, 300);
    const extendLen = rng.int(0, seqLen + 1);
    const window = rng.pick([1, 16, 128]);
    let args;
    if (which === 'float32ToBf16Bits') args = [rng.normal() * 1e3];
    else if (which === 'bf16BitsToFloat32') args = [rng.u32() & 0xffff];
    else if (which === 'numel') args = [[rng.int(0, 5), rng.int(0, 5)]];
    else if (which === 'swaGatherLength') args = [seqLen, extendLen, window];
    else if (which === 'requestVisible') args = [seqLen, extendLen, rng.pick([4, 128])];
    else if (which === 'combinedWidth') args = [rng.pick([0, 4, 128]), rng.int(0, 64), rng.int(0, 100), window, rng.pick([1, 64, 128])];
    else {
      const reqToToken = Array.from({ length: seqLen }, (_, i) => i + 3);
      const fullToSwa = Array.from({ length: seqLen + 3 }, (_, i) => (i * 7) % 1000);
      args = [reqToToken, fullToSwa, seqLen, extendLen, window];
    }
    const fns = { float32ToBf16Bits, bf16BitsToFloat32, numel, swaGatherLength, requestVisible, combinedWidth, swaTokenIdsFromTable };
    return {
      args,
      call: (x) => fns[which](...x),
      judge: (got, { refArgs }) => {
        if (which === 'float32ToBf16Bits') return got === R.encodeBf16(refArgs[0]) || Number.isNaN(Number(refArgs[0])) ? null : `0x${got.toString(16)} for ${refArgs[0]}`;
        if (which === 'bf16BitsToFloat32') return Object.is(got, R.decodeBf16(refArgs[0] & 0xffff)) || Number.isNaN(got) ? null : `${got} for 0x${refArgs[0].toString(16)}`;
        if (which === 'swaTokenIdsFromTable') {
          const [rt, fs, sl, el, w = 128] = refArgs; // DEFAULT_WINDOW
          const g = el > 0 ? Math.min(sl, el + w - 1) : 0;
          const want = Array.from({ length: g }, (_, k) => fs[rt[sl - g + k]]);
          return JSON.stringify(got) === JSON.stringify(want) ? null : `got ${JSON.stringify(got).slice(0, 80)}`;
        }
        return null; // arithmetic helpers: only what they throw is judged
      },
    };
  },
};

/** Device-memory methods on a host engine: BACKEND_UNAVAILABLE whatever they are given (after the argument checks, or before them). */
const deviceMethodsTarget = {
  name: 'deviceMethods',
  engine: true,
  hostEngineOnly: true, // a cuda engine's are device_targets.mjs's
  build(rng, env, hooks) {
    const method = rng.pick(['upload', 'download', 'uploadKvCache', 'copyFrom']);
    const arg = method === 'uploadKvCache' ? randomCacheBytes(rng, hooks, 'v4') : tensor('float32', [2, 3], hooks.track(new Float32Array(6)));
    return { args: [arg], mayRefuse: true, call: (x) => env.engine[method](...x), judge: () => `${method} resolved on a host engine` };
  },
};

const SKIP = Symbol('skipped');

/** createEngine's options, then one small op on the new engine (sometimes disposed first: DISPOSED). */
const createEngineTarget = {
  name: 'createEngine',
  noStub: true, // createEngine({ backend: 'cuda' }) needs a GPU
  build(rng, env, hooks) {
    const options = { backend: env.backend ?? 'wasm' };
    if (options.backend === 'wasm' || rng.uniform() < 0.3) options.workers = rng.int(1, 3);
    if (rng.uniform() < 0.4) options.memoryBudgetBytes = rng.pick([2 ** 20, 2 ** 24, 2 ** 30]);
    if (rng.uniform() < 0.2) options.device = 0;
    const dispose = rng.uniform() < 0.2;
    const local = { backend: options.backend, engine: null };
    const op = sparsePrefill.build(rng, local, hooks); // its call runs on the engine made here
    return {
      args: [options],
      mayRefuse: dispose || options.memoryBudgetBytes !== undefined,
      rereads: true, // the call reads options.workers itself before createEngine does
      call: async ([o]) => {
        // a pool of hundreds of workers is what was asked (MAX_WORKERS 1024): ~9 MiB and ~0.1 s each
        // here, past the case timeout; such counts are left out, not reported as hangs
        let workers;
        try {
          workers = o?.workers;
        } catch {
          /* a throwing getter: createEngine's own read decides */
        }
        if (typeof workers === 'number' && workers > 16 && workers <= 1024) return SKIP;
        local.engine = await createEngine(o);
        try {
          if (dispose) await local.engine.dispose();
          return await op.call(op.args);
        } finally {
          await local.engine.dispose();
        }
      },
      judge: (got) => (got === SKIP ? null : op.judge(got, { refArgs: op.args })),
    };
  },
};

/** Every target with its weight in the mix (the engine ops and the layer API most). */
export const TARGETS = [
  [sparsePrefill, 6],
  [pagedSparseAttention, 5],
  [quantizeKCache, 4],
  [dequantizeKCachePaged, 3],
  [prefillLayerTarget, 4],
  [createPlanTarget, 2],
  [createShardedPlanTarget, 1],
  [prefillLayerShardedTarget, 2],
  [createKvCacheTarget, 2],
  [tensorTarget, 2],
  [toBf16Target, 1],
  [bf16ToFloat32Target, 1],
  [routePrefillTarget, 1],
  [parseNpyTarget, 2],
  [readNpyFileTarget, 1],
  [parseSafetensorsTarget, 2],
  [readSafetensorsFileTarget, 1],
  [planMethodsTarget, 2],
  [helpersTarget, 1],
  [deviceMethodsTarget, 1],
  [createEngineTarget, 1],
];

/** What the device targets (device_targets.mjs) build on. */
export { D, DTYPES, byMemory, fieldsByMemory, gatherShards, judgeAttention, judgeLayer, layerScenario, wholeQuery, randomHostTensor, randomV4Cache, sparsePrefill as sparsePrefillTarget, pagedSparseAttention as pagedSparseAttentionTarget, dequantizeKCachePaged as dequantizeKCachePagedTarget, quantizeKCache as quantizeKCacheTarget };
