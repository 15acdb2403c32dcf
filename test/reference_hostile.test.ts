/**
 * Every export of `sparse-mla/reference` under hostile arguments (SPEC §9: a typed SparseMlaError
 * naming the argument before any work; never a TypeError or RangeError of the reference's own, a
 * hang, or NaN / zeros returned silently). A table lists, per export, a valid call and each
 * argument (or field of one) that is replaced in turn by every value of HOSTILE: null, undefined, a
 * Symbol, a BigInt, NaN, ±inf, a negative, a fraction, 2^53, 2^60, a string, an Array, objects
 * (plain, frozen, with throwing getters, Proxies whose traps throw, a revoked Proxy) and typed arrays
 * of the wrong kind, plus the argument's own cases (a wrong length, an out-of-range id, ...). Values
 * the argument may take (an optional one's undefined, any number of a codec) are listed with it and
 * must be accepted. A throwing getter or trap may throw its own error (the caller's, passed on).
 * Session 56 (helper-71): what failed on the code before (TypeErrors, RangeErrors, a stack
 * overflow, hangs, process crashes, results returned silently) is counted in the commit that added
 * this file.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { createReferencePool } from '../dist/reference/parallel.js';
import { randomBf16Bits, testRng } from './helpers/random.js';

const rng = testRng('reference_hostile');

/** The error a throwing getter or trap throws: the caller's own, which may pass through. */
class Boom extends Error {}
const boom = (): never => {
  throw new Boom('a getter of the caller threw');
};
const throwingTraps = new Proxy({}, { get: boom, has: boom, ownKeys: boom, getOwnPropertyDescriptor: boom, getPrototypeOf: boom });
const revoked = Proxy.revocable({}, {});
revoked.revoke();
const throwingGetters = (): object => {
  const o = {};
  for (const k of ['dtype', 'shape', 'data', 'format', 'pageSize', 'numPages', 'queries', 'heads', 'dV', 'out', 'lse', 'maxLogits', 'mag', 'chunk', 'requests', 'seqLen', 'extendLen', 'length', 'query', 'head', 'pass', 'q', 'kv', 'swa', 'indices', 'topkLength']) {
    Object.defineProperty(o, k, { get: boom, enumerable: true });
  }
  return o;
};

/** The hostile values every argument meets, by name (built fresh per case). */
const HOSTILE: Record<string, () => unknown> = {
  null: () => null,
  undefined: () => undefined,
  symbol: () => Symbol('v4'),
  bigint: () => 10n,
  NaN: () => NaN,
  '+inf': () => Infinity,
  '-inf': () => -Infinity,
  negative: () => -1,
  fraction: () => 1.5,
  '2^53': () => 2 ** 53,
  '2^60': () => 2 ** 60,
  string: () => '4',
  array: () => [1, 2, 3],
  object: () => ({}),
  frozen: () => Object.freeze({}),
  getters: throwingGetters,
  'throwing Proxy': () => throwingTraps,
  'revoked Proxy': () => revoked.proxy,
  Float64Array: () => new Float64Array(3),
  Int8Array: () => new Int8Array(3),
  'Proxy of a Uint16Array': () => new Proxy(new Uint16Array(3), {}),
};
const NUMBERS = ['NaN', '+inf', '-inf', 'negative', 'fraction', '2^53', '2^60'];
/** An options object may be any object that is no Array (its queries, the one field read, absent) or none. */
const OPTIONS = ['null', 'undefined', 'object', 'frozen', 'Float64Array', 'Int8Array', 'Proxy of a Uint16Array'];

type Path = readonly (string | number)[];

interface Field {
  /** where in the argument list: [0] the first argument, [0, 'pageSize'] its field */
  path: Path;
  /** HOSTILE values this argument may take (the call must succeed) */
  accepts?: readonly string[];
  /** values of its own: [label, value, codes allowed (default: any refusal code)] */
  extra?: readonly (readonly [string, () => unknown, readonly string[]?])[];
  /** extra values that are valid here */
  valid?: readonly (readonly [string, () => unknown])[];
}

interface Entry {
  name: string;
  /** a valid argument list, fresh */
  args: () => unknown[];
  /** the call (default: the export of that name) */
  call?: (...args: unknown[]) => unknown;
  fields: readonly Field[];
}

// ---------------------------------------------------------------- valid arguments

const bf16 = (shape: number[]): { dtype: string; shape: number[]; data: Uint16Array } => {
  const n = shape.reduce((a, b) => a * b, 1);
  // bf16 values of modest size (|x| < 2): random bits of the grid with the exponent bounded
  const bits = randomBf16Bits(rng, n).map((b) => (b & 0x807f) | (((b >> 7) & 0x7) + 120) << 7);
  return { dtype: 'bf16', shape, data: bits };
};
const i32 = (shape: number[], v: number[]): { dtype: string; shape: number[]; data: Int32Array } => ({ dtype: 'int32', shape, data: Int32Array.from(v) });
const f32 = (shape: number[], v: number[]): { dtype: string; shape: number[]; data: Float32Array } => ({ dtype: 'float32', shape, data: Float32Array.from(v) });
/** A v4 cache of 2 pages of 2 tokens, every token quantized from random rows. */
const v4Cache = (): { format: string; pageSize: number; numPages: number; data: Uint8Array } => {
  const cache = { format: 'v4' as const, pageSize: 2, numPages: 2, data: new Uint8Array(2 * 1728) };
  R.quantizeKCacheReference(cache, [0, 1, 2, 3], bf16([4, 512]) as never);
  return cache;
};
const prefillArgs = (): Record<string, unknown> => ({
  q: bf16([2, 2, 64]),
  kv: bf16([3, 64]),
  indices: i32([2, 2], [0, 2, 1, -1]),
  topkLength: i32([2], [2, 1]),
  attnSink: f32([2], [0.5, -1]),
  smScale: 0.125,
  dV: 64,
});
const pagedArgs = (): Record<string, unknown> => ({
  q: bf16([2, 2, 512]),
  kCache: v4Cache(),
  indices: i32([2, 2], [0, 3, 1, -1]),
  topkLength: i32([2], [2, 2]),
  extraKCache: v4Cache(),
  extraIndices: i32([2, 1], [2, 1]),
  attnSink: f32([2], [0.5, -1]),
  smScale: 0.05,
});
/** One request of 10 tokens, 2 of them new (2 c4 entries visible to each); c4 pages of 1 token; a window of 4. */
const chunk = (): Record<string, unknown> => ({
  requests: [{ seqLen: 10, extendLen: 2, swaTokenIdByPosition: [0, 1, 2, 3, 0, 1, 2, 3, 0, 1], c4PageTable: [1, 0], c128PageTable: [] }],
  c4PageSize: 1,
  c128PageSize: 1,
  window: 4,
});
const layerArgs = (): Record<string, unknown> => ({
  chunk: chunk(),
  compressRatio: 4,
  q: bf16([2, 1, 512]),
  caches: { swa: v4Cache(), c4: { ...v4Cache(), pageSize: 1, numPages: 4, data: new Uint8Array(4 * 1152) } },
  topkIndices: i32([2, 2], [0, -1, 1, 0]),
  attnSink: f32([1], [0.25]),
  smScale: 0.05,
});
const comparison = (): { got: Record<string, unknown>; ref: Record<string, unknown> } => ({
  got: { out: [0.5, 0.25, 1, 2], lse: [1, 2], maxLogits: [0.5, 1] },
  ref: { out: [0.5, 0.25, 1, 2.001], lse: [1, 2], maxLogits: [0.5, 1], mag: [0.5, 0.25, 1, 2] },
});

// ---------------------------------------------------------------- the table

const tensorFields = (at: Path, opts: { optional?: boolean; dtypes?: number } = {}): Field[] => [
  { path: at, accepts: opts.optional ? ['null', 'undefined'] : [] },
  { path: [...at, 'dtype'] },
  { path: [...at, 'shape'], extra: [['a shape of rank 4', () => [1, 1, 1, 1], ['INVALID_SHAPE']], ['a shape holding a Symbol', () => [Symbol('d'), 1]], ['an Array Proxy claiming 2^53 dims', () => new Proxy([1], { get: (t, k) => (k === 'length' ? 2 ** 53 : Reflect.get(t, k)) })]] },
  { path: [...at, 'data'], extra: [['data one element short', () => 'short', ['INVALID_SHAPE']], ['detached data', () => 'detached']] },
];
const cacheFields = (at: Path, opts: { optional?: boolean; data?: boolean } = {}): Field[] => [
  { path: at, accepts: opts.optional ? ['null', 'undefined'] : [] },
  { path: [...at, 'format'], extra: [['v5', () => 'v5', ['INVALID_VALUE']]] },
  { path: [...at, 'pageSize'], extra: [['0', () => 0, ['INVALID_VALUE']]] },
  { path: [...at, 'numPages'], extra: [['2^50 pages', () => 2 ** 50]] },
  ...(opts.data === false ? [] : [{ path: [...at, 'data'], extra: [['data one byte short', () => 'short', ['INVALID_SHAPE']], ['a Uint8Array Proxy', () => 'proxy'], ['detached data', () => 'detached']] } as Field]),
];

const ENTRIES: Entry[] = [
  // formats
  ...(['signBit', 'roundHalfEven', 'encodeBf16', 'roundToBf16', 'encodeE4m3', 'roundToFloat32'] as const).map((name) => ({ name, args: () => [1.25], fields: [{ path: [0], accepts: NUMBERS }] })),
  { name: 'exponentOf', args: () => [1.25], fields: [{ path: [0], accepts: ['negative', 'fraction', '2^53', '2^60'], extra: [['0 (recursed forever)', () => 0, ['INVALID_VALUE']]] }] },
  { name: 'decodeBf16', args: () => [0x3f80], fields: [{ path: [0], extra: [['0x10000', () => 0x10000, ['INVALID_VALUE']]] }] },
  { name: 'decodeE4m3', args: () => [0x38], fields: [{ path: [0], extra: [['256', () => 256, ['INVALID_VALUE']]] }] },
  { name: 'decodeUe8m0', args: () => [127], fields: [{ path: [0], extra: [['256', () => 256, ['INVALID_VALUE']]] }] },
  { name: 'encodeUe8m0', args: () => [3], fields: [{ path: [0], accepts: ['negative', '2^53', '2^60'] }] },
  // kv_cache
  { name: 'roundUp', args: () => [5, 4], fields: [{ path: [0], accepts: ['negative', 'fraction', '2^53', '2^60'] }, { path: [1], accepts: ['fraction', '2^53', '2^60'], extra: [['0', () => 0, ['INVALID_VALUE']]] }] },
  { name: 'v4PageBytesReference', args: () => [64], fields: [{ path: [0], extra: [['2^44 (bytes past 2^53)', () => 2 ** 44, ['TOO_LARGE']]] }] },
  {
    name: 'kvCacheBytesReference',
    args: () => ['v4', 64, 3],
    fields: [{ path: [0], extra: [['v5', () => 'v5', ['INVALID_VALUE']]] }, { path: [1] }, { path: [2], valid: [['0', () => 0]], extra: [['2^40 pages of 64', () => 2 ** 40, ['TOO_LARGE']]] }],
  },
  { name: 'kvCacheBytesReference (v32)', call: R.kvCacheBytesReference as never, args: () => ['v32', 1, 3], fields: [{ path: [1], extra: [['2 (v32 is contiguous)', () => 2, ['INVALID_VALUE']]] }] },
  { name: 'cacheTokenCount', args: () => [v4Cache()], fields: cacheFields([0], { data: false }) },
  { name: 'cacheRowDims', args: () => ['v32'], fields: [{ path: [0] }] },
  { name: 'checkCacheReference', args: () => [v4Cache(), 'kCache'], fields: [...cacheFields([0]), { path: [1], accepts: ['undefined', 'string'] }] },
  { name: 'tokenLayoutReference', args: () => [{ format: 'v4', pageSize: 64 }, 70], fields: [...cacheFields([0], { data: false }).filter((f) => f.path[1] !== 'numPages'), { path: [1], extra: [['2^52 (offsets past 2^53)', () => 2 ** 52, ['TOO_LARGE']]] }] },
  {
    name: 'normalizeTokenIds',
    args: () => [[0, 3], 4],
    fields: [
      { path: [0], accepts: ['array'], extra: [['an id out of range', () => [0, 4], ['OUT_OF_RANGE']], ['an id that is a string', () => ['1'], ['INVALID_VALUE']], ['an int32 tensor of rank 2', () => i32([1, 1], [0]), ['INVALID_SHAPE']]] },
      { path: [1] },
      { path: [2], accepts: ['undefined', 'string'] },
    ],
  },
  { name: 'normalizeTokenIds (tensor)', call: R.normalizeTokenIds as never, args: () => [i32([2], [0, 3]), 4], fields: tensorFields([0]).slice(1) },
  { name: 'tileExponentReference', args: () => [3.5], fields: [{ path: [0], accepts: ['+inf', 'fraction', '2^53', '2^60'] }] },
  {
    name: 'quantizeKCacheReference',
    args: () => [v4Cache(), [1, 2], bf16([2, 512])],
    fields: [...cacheFields([0]), { path: [1], extra: [['an id out of range', () => [0, 4], ['OUT_OF_RANGE']], ['an id that is a fraction', () => [0, 1.5], ['INVALID_VALUE']]] }, ...tensorFields([2])],
  },
  {
    name: 'dequantizeKCacheReference',
    args: () => [v4Cache(), [1, 2]],
    fields: [...cacheFields([0]), { path: [1], accepts: ['array'], extra: [['an id out of range', () => [0, 4], ['OUT_OF_RANGE']], ['an id that is NaN', () => [NaN], ['INVALID_VALUE']]] }],
  },
  { name: 'dequantizeKCacheReference (int64 ids)', call: R.dequantizeKCacheReference as never, args: () => [v4Cache(), { dtype: 'int64', shape: [2], data: BigInt64Array.from([1n, 3n]) }], fields: tensorFields([1]).slice(1) },
  {
    name: 'dequantizeTokenReference',
    args: () => [v4Cache(), 3, new Float64Array(600), 80],
    fields: [...cacheFields([0]), { path: [1], extra: [['4 (out of range)', () => 4, ['OUT_OF_RANGE']]] }, { path: [2], accepts: [], extra: [['a short dst', () => new Float64Array(100)]] }, { path: [3], extra: [['100 (past the end)', () => 100, ['INVALID_VALUE']]] }],
  },
  { name: 'new DequantizedRows', call: (c, w) => new R.DequantizedRows(c as never, w as never), args: () => [v4Cache(), 512], fields: [...cacheFields([0]), { path: [1], extra: [['576 (a v32 row)', () => 576, ['INVALID_VALUE']]] }] },
  { name: 'DequantizedRows.offsetOf', call: (c, id) => new R.DequantizedRows(c as never, 512).offsetOf(id as never), args: () => [v4Cache(), 3], fields: [{ path: [1], extra: [['4 (out of range)', () => 4, ['OUT_OF_RANGE']]] }] },
  // sparse_prefill
  { name: 'emptyAttentionResult', args: () => [2, 3, 4], fields: [{ path: [0], valid: [['0', () => 0]], extra: [['2^40 (no such allocation)', () => 2 ** 40, ['TOO_LARGE']]] }, { path: [1] }, { path: [2] }] },
  { name: 'widenBf16', args: () => [new Uint16Array([0x3f80, 0xc000])], fields: [{ path: [0] }] },
  {
    name: 'indexSet',
    args: () => [i32([2, 2], [0, 1, 2, 3]), i32([2], [1, 2]), 2],
    fields: [...tensorFields([0]), ...tensorFields([1], { optional: true }), { path: [2] }, { path: [3], accepts: ['undefined'] }],
  },
  { name: 'checkQueryTensor', args: () => [bf16([1, 2, 64]), '[sQ, hQ, dQK]'], fields: [...tensorFields([0]), { path: [1], accepts: ['string'] }] },
  // any object that is no Array (typed arrays included): its fields are the op's to check
  { name: 'checkArgsRecord', args: () => [{}], fields: [{ path: [0], accepts: ['object', 'frozen', 'getters', 'throwing Proxy', 'Float64Array', 'Int8Array', 'Proxy of a Uint16Array'] }] },
  // dV absent (null or undefined) is 512
  { name: 'checkDv', args: () => [64, 512], fields: [{ path: [0], accepts: ['null', 'undefined'], extra: [['513 (past dQK)', () => 513, ['INVALID_VALUE']]] }, { path: [1] }] },
  { name: 'checkSmScale', args: () => [0.5], fields: [{ path: [0], accepts: ['negative', 'fraction', '2^53', '2^60'] }] },
  {
    name: 'checkQueries',
    args: () => [[0, 3], 4],
    fields: [{ path: [0], accepts: ['null', 'undefined', 'array', 'Float64Array', 'Int8Array'], extra: [['a row out of range', () => [4], ['INVALID_VALUE']]] }, { path: [1], extra: [['2^40 rows, none named', () => 'all-of-2^40', ['TOO_LARGE']]] }],
  },
  { name: 'checkSink', args: () => [f32([2], [0, 1]), 2], fields: [...tensorFields([0], { optional: true }), { path: [1] }, { path: [2], accepts: ['undefined', 'string'] }] },
  { name: 'logAddExp', args: () => [1, 2], fields: [{ path: [0], accepts: NUMBERS }, { path: [1], accepts: NUMBERS }] },
  {
    name: 'attendQueryReference',
    args: () => {
      const hQ = 2, dQK = 64, dV = 32, n = 2;
      return [new Float32Array(hQ * dQK).fill(0.5), 0, hQ, dQK, dV, new Float32Array(3 * dQK).fill(0.25), [0, 128], n, 0.1, new Float32Array([0, 1]), new Float64Array(hQ * dV), new Float64Array(hQ * dV), 0, new Float64Array(hQ), new Float64Array(hQ), 0, new Float64Array(hQ * n)];
    },
    fields: [
      { path: [0] },
      { path: [1], extra: [['1 (q past its end)', () => 1, ['INVALID_VALUE']]] },
      { path: [2] },
      { path: [3] },
      { path: [4] },
      { path: [5] },
      { path: [6], accepts: ['array', 'Float64Array', 'Int8Array'], extra: [['an offset past the rows', () => [0, 129], ['INVALID_VALUE']]] },
      { path: [7] },
      { path: [8], accepts: ['negative', 'fraction', '2^53', '2^60'] },
      { path: [9], accepts: ['null', 'undefined'] },
      { path: [10], extra: [['out sharing mag\'s memory', () => 'alias-mag', ['INVALID_VALUE']]] },
      { path: [11] },
      { path: [12] },
      { path: [13], accepts: ['Float64Array'] }, // 3 elements: room for hQ = 2
      { path: [14], accepts: ['Float64Array'] },
      { path: [15] },
      { path: [16], extra: [['a short scratch', () => new Float64Array(3), ['INVALID_SHAPE']]] },
    ],
  },
  ...(['checkSparsePrefillArgs', 'prepareSparsePrefillReference', 'sparsePrefillReference'] as const).map((name) => ({
    name,
    args: () => [prefillArgs()],
    fields: [
      { path: [0] },
      ...tensorFields([0, 'q']),
      ...tensorFields([0, 'kv']),
      ...tensorFields([0, 'indices']),
      ...tensorFields([0, 'topkLength'], { optional: true }),
      ...tensorFields([0, 'attnSink'], { optional: true }),
      { path: [0, 'smScale'], accepts: ['negative', 'fraction', '2^53', '2^60'] },
      // absent, dV is 512: past this q's dQK of 64
      { path: [0, 'dV'], extra: [['65 (past dQK)', () => 65, ['INVALID_VALUE']]] },
    ],
  })),
  { name: 'sparsePrefillReference (opts)', call: R.sparsePrefillReference as never, args: () => [prefillArgs(), { queries: [1] }], fields: [{ path: [1], accepts: OPTIONS }, { path: [1, 'queries'], accepts: ['null', 'undefined', 'Float64Array', 'Int8Array'] }] },
  { name: 'prepareSparsePrefillReference().run', call: (a, q) => R.prepareSparsePrefillReference(a as never).run(q as never), args: () => [prefillArgs(), [1, 0]], fields: [{ path: [1], accepts: ['null', 'undefined', 'Float64Array', 'Int8Array'] }] },
  // paged
  {
    name: 'pagedSparseAttentionReference',
    args: () => [pagedArgs(), { queries: [1] }],
    fields: [
      { path: [0] },
      ...tensorFields([0, 'q']),
      ...cacheFields([0, 'kCache']),
      ...tensorFields([0, 'indices']),
      ...tensorFields([0, 'topkLength'], { optional: true }),
      ...cacheFields([0, 'extraKCache']).slice(1),
      ...tensorFields([0, 'extraIndices']).slice(1),
      ...tensorFields([0, 'attnSink'], { optional: true }),
      { path: [0, 'smScale'], accepts: ['negative', 'fraction', '2^53', '2^60'] },
      { path: [0, 'dV'], accepts: ['null', 'undefined'] }, // absent: 512
      { path: [1], accepts: OPTIONS },
      { path: [1, 'queries'], accepts: ['null', 'undefined', 'Float64Array', 'Int8Array'] },
    ],
  },
  // compare
  { name: 'outBound', args: () => [0.5], fields: [{ path: [0], accepts: ['+inf', 'fraction', '2^53', '2^60'] }] },
  { name: 'lseBound', args: () => [1, -2], fields: [{ path: [0], accepts: NUMBERS.filter((v) => v !== 'NaN') }, { path: [1], accepts: NUMBERS.filter((v) => v !== 'NaN') }] },
  { name: 'maxLogitsBound', args: () => [1], fields: [{ path: [0], accepts: NUMBERS.filter((v) => v !== 'NaN') }] },
  { name: 'cosineGap', args: () => [[1, 2, 3], [1, 2, 3.5]], fields: [{ path: [0], accepts: ['array', 'Float64Array', 'Int8Array'], extra: [['a list claiming 2^53 elements (looped forever)', () => ({ length: 2 ** 53 })]] }, { path: [1], accepts: ['array', 'Float64Array', 'Int8Array'], extra: [['a shorter list (ignored its tail)', () => [1, 2], ['INVALID_SHAPE']], ['strings', () => ['1', '2', '3'], ['INVALID_VALUE']]] }] },
  { name: 'tensorValues', args: () => [bf16([2, 3]), [1]], fields: [...tensorFields([0]).map((f) => (f.path[1] === 'shape' ? { ...f, extra: f.extra!.filter(([l]) => l !== 'a shape of rank 4') } : f)), { path: [1], accepts: ['null', 'undefined', 'Float64Array', 'Int8Array'], extra: [['a row out of range', () => [2], ['INVALID_VALUE']]] }] },
  {
    name: 'attentionValues',
    args: () => [{ out: bf16([2, 1, 4]), lse: f32([2, 1], [1, 2]), maxLogits: f32([2, 1], [0, 1]) }, [0]],
    fields: [{ path: [0] }, ...tensorFields([0, 'out']).slice(0, 1), ...tensorFields([0, 'lse']).slice(0, 1), ...tensorFields([0, 'maxLogits']), { path: [1], accepts: ['null', 'undefined', 'Float64Array', 'Int8Array'] }],
  },
  {
    name: 'compareAttention',
    args: () => {
      const { got, ref } = comparison();
      return [got, ref, { heads: 1, dV: 2 }];
    },
    fields: [
      { path: [0] },
      { path: [0, 'out'], extra: [['one element short', () => [1, 2, 3], ['INVALID_SHAPE']]] },
      { path: [0, 'lse'] },
      { path: [0, 'maxLogits'] },
      { path: [1] },
      { path: [1, 'out'] },
      { path: [1, 'lse'] },
      { path: [1, 'maxLogits'] },
      { path: [1, 'mag'], accepts: ['+inf', 'fraction', '2^53', '2^60'], extra: [['a negative magnitude', () => [0.5, -0.25, 1, 2], ['INVALID_VALUE']]] },
      { path: [2] },
      { path: [2, 'heads'] },
      { path: [2, 'dV'] },
      { path: [2, 'queries'], accepts: ['null', 'undefined'], valid: [['[7, 3]', () => [7, 3]]] },
    ],
  },
  { name: 'new AttentionComparator', call: (s) => new R.AttentionComparator(s as never), args: () => [{ heads: 2, dV: 8 }], fields: [{ path: [0] }, { path: [0, 'heads'] }, { path: [0, 'dV'] }] },
  {
    name: 'AttentionComparator.add',
    call: (got, ref, queries) => new R.AttentionComparator({ heads: 1, dV: 2 }).add(got as never, ref as never, queries as never),
    args: () => {
      const { got, ref } = comparison();
      return [got, ref, [4, 2]];
    },
    fields: [{ path: [0] }, { path: [1] }, { path: [1, 'mag'], accepts: ['+inf', 'fraction', '2^53', '2^60'] }, { path: [2], accepts: ['undefined', 'null'] }],
  },
  { name: 'formatFigure', args: () => [0.5], fields: [{ path: [0], accepts: NUMBERS }] },
  { name: 'formatPosition', args: () => [{ query: 1, head: 2, col: 3 }], fields: [{ path: [0], accepts: ['null', 'undefined'] }, { path: [0, 'query'] }, { path: [0, 'head'] }, { path: [0, 'col'], accepts: ['undefined'] }] },
  {
    name: 'formatTensorComparison',
    args: () => {
      const { got, ref } = comparison();
      return ['out', R.compareAttention(got as never, ref as never, { heads: 1, dV: 2 }).out];
    },
    fields: [{ path: [0], accepts: ['string'] }, { path: [1] }, { path: [1, 'worst'], accepts: ['null', 'undefined'] }, { path: [1, 'worst', 'at'] }, { path: [1, 'count'] }, { path: [1, 'worstRatio'], accepts: NUMBERS }],
  },
  {
    name: 'formatAttentionComparison',
    args: () => {
      const { got, ref } = comparison();
      return [R.compareAttention(got as never, ref as never, { heads: 1, dV: 2 })];
    },
    fields: [{ path: [0] }, { path: [0, 'lse'] }, { path: [0, 'maxLogits', 'pass'] }],
  },
  // planner
  {
    name: 'attentionSetReference',
    args: () => [chunk(), 4, 1, [0, 1, -1]],
    fields: [
      { path: [0] },
      { path: [0, 'requests'] },
      { path: [0, 'requests', 0] },
      { path: [0, 'requests', 0, 'seqLen'], extra: [['1 (shorter than extendLen)', () => 1, ['INVALID_VALUE']]] },
      { path: [0, 'requests', 0, 'extendLen'] },
      { path: [0, 'requests', 0, 'swaTokenIdByPosition'], accepts: [], extra: [['a table shorter than seqLen', () => [0, 1, 2], ['INVALID_VALUE']], ['a fractional id', () => [0, 1, 2, 3, 0, 1, 2, 3, 0.5, 1], ['INVALID_VALUE']]] },
      // page ids: any integers ≥ 0 (no cache to hold them against here)
      { path: [0, 'requests', 0, 'c4PageTable'], accepts: ['array', 'Float64Array', 'Int8Array'], extra: [['a page past the table', () => [1], ['INVALID_VALUE']]] },
      { path: [0, 'c4PageSize'] },
      { path: [0, 'window'], accepts: ['null', 'undefined'] },
      { path: [1], extra: [['5', () => 5, ['INVALID_VALUE']]] },
      { path: [2], extra: [['2 (past the chunk)', () => 2, ['INVALID_VALUE']]] },
      { path: [3], accepts: ['array', 'Float64Array', 'Int8Array'], extra: [['an entry that is a fraction', () => [0.5], ['INVALID_VALUE']]] },
    ],
  },
  {
    name: 'prefillLayerReference',
    args: () => [layerArgs(), { queries: [1] }],
    fields: [
      { path: [0] },
      { path: [0, 'chunk'] },
      { path: [0, 'chunk', 'requests', 0, 'extendLen'] },
      { path: [0, 'chunk', 'c4PageSize'], extra: [['2 (not the c4 cache\'s page size)', () => 2, ['INVALID_VALUE']]] },
      { path: [0, 'compressRatio'] },
      ...tensorFields([0, 'q']),
      { path: [0, 'caches'] },
      ...cacheFields([0, 'caches', 'swa']),
      ...cacheFields([0, 'caches', 'c4']),
      ...tensorFields([0, 'topkIndices']),
      ...tensorFields([0, 'attnSink'], { optional: true }),
      { path: [0, 'smScale'], accepts: ['negative', 'fraction', '2^53', '2^60'] },
      { path: [1], accepts: OPTIONS },
      { path: [1, 'queries'], accepts: ['null', 'undefined', 'Float64Array', 'Int8Array'] },
    ],
  },
];

// ---------------------------------------------------------------- running a case

/** Tokens of the extra cases that need the valid argument they replace. */
function resolve(value: unknown, old: unknown, args: unknown[]): unknown {
  if (value === 'short') {
    const d = old as Uint8Array;
    return d.subarray(0, d.length - 1);
  }
  if (value === 'proxy') return new Proxy(old as object, {});
  if (value === 'detached') {
    const d = old as Uint8Array;
    const copy = d.slice();
    structuredClone(copy.buffer, { transfer: [copy.buffer] });
    return copy;
  }
  if (value === 'alias-mag') return args[11];
  if (value === 'all-of-2^40') {
    args[0] = undefined;
    return 2 ** 40;
  }
  return value;
}

function withValue(args: unknown[], path: Path, make: () => unknown): unknown[] {
  let parent: Record<string | number, unknown> = args as unknown as Record<number, unknown>;
  for (const key of path.slice(0, -1)) parent = parent[key] as Record<string | number, unknown>;
  const key = path[path.length - 1]!;
  parent[key] = resolve(make(), parent[key], args);
  return args;
}

type Outcome = { kind: 'returned'; value: unknown } | { kind: 'refused'; code: string; argument: string | undefined } | { kind: 'caller error' } | { kind: 'other'; error: unknown };

function outcome(entry: Entry, args: unknown[]): Outcome {
  const fn = entry.call ?? ((R as unknown as Record<string, (...a: unknown[]) => unknown>)[entry.name]!);
  try {
    const value = fn(...args);
    return { kind: 'returned', value };
  } catch (e) {
    if (e instanceof SparseMlaError) return { kind: 'refused', code: e.code, argument: e.argument };
    if (e instanceof Boom) return { kind: 'caller error' };
    return { kind: 'other', error: e };
  }
}

const describeError = (e: unknown): string => (e instanceof Error ? `${e.constructor.name}: ${e.message.slice(0, 120)}` : String(e));

/** NaN anywhere in what a call returned (numbers, arrays, objects of them). */
function holdsNaN(v: unknown, depth = 0): boolean {
  if (typeof v === 'number') return Number.isNaN(v);
  if (depth > 3 || typeof v !== 'object' || v === null) return false;
  if (ArrayBuffer.isView(v)) return Array.prototype.some.call(v, (x: unknown) => typeof x === 'number' && Number.isNaN(x));
  return Object.values(v).some((x) => holdsNaN(x, depth + 1));
}

describe('every export of sparse-mla/reference under hostile arguments', () => {
  test('the table covers every function the subpath exports', () => {
    const functions = Object.entries(R).filter(([, v]) => typeof v === 'function').map(([k]) => k).sort();
    const covered = new Set(ENTRIES.map((e) => e.name.replace(/^new /, '').replace(/[ .].*$/, '')));
    covered.add('describeBounds'); // takes no argument: called below
    expect(functions.filter((f) => !covered.has(f))).toEqual([]);
    expect(R.describeBounds().length).toBe(4);
  });

  for (const entry of ENTRIES) {
    test(entry.name, () => {
      // the valid call itself succeeds, with no NaN in what it returns
      const base = outcome(entry, entry.args());
      expect(base.kind === 'returned' ? 'returned' : base.kind === 'other' ? describeError(base.error) : JSON.stringify(base), `${entry.name}: the valid call`).toBe('returned');
      const failures: string[] = [];
      for (const field of entry.fields) {
        const where = `${entry.name} ${JSON.stringify(field.path)}`;
        const cases: [string, () => unknown, readonly string[] | undefined, boolean][] = [
          ...Object.entries(HOSTILE).map(([label, make]) => [label, make, undefined, (field.accepts ?? []).includes(label)] as [string, () => unknown, undefined, boolean]),
          ...(field.extra ?? []).map(([label, make, codes]) => [label, make, codes, false] as [string, () => unknown, readonly string[] | undefined, boolean]),
          ...(field.valid ?? []).map(([label, make]) => [label, make, undefined, true] as [string, () => unknown, undefined, boolean]),
        ];
        for (const [label, make, codes, valid] of cases) {
          const o = outcome(entry, withValue(entry.args(), field.path, make));
          if (valid) {
            if (o.kind !== 'returned') failures.push(`${where} = ${label}: a valid value, but ${o.kind === 'other' ? describeError(o.error) : JSON.stringify(o)}`);
            continue;
          }
          if (o.kind === 'caller error') continue;
          if (o.kind === 'returned') failures.push(`${where} = ${label}: returned ${holdsNaN(o.value) ? 'NaN in its result' : 'a result'} instead of a refusal`);
          else if (o.kind === 'other') failures.push(`${where} = ${label}: ${describeError(o.error)}`);
          else if (codes !== undefined && !codes.includes(o.code)) failures.push(`${where} = ${label}: ${o.code} (${o.argument}), expected ${codes.join(' or ')}`);
          else if (typeof o.argument !== 'string' || o.argument.length === 0) failures.push(`${where} = ${label}: a refusal naming no argument`);
        }
      }
      expect(failures).toEqual([]);
    });
  }
});

describe('what the table does not reach', () => {
  const refused = (call: () => unknown): [string, string | undefined] => {
    try {
      call();
    } catch (e) {
      if (!(e instanceof SparseMlaError)) throw e;
      return [e.code, e.argument];
    }
    throw new Error('expected a refusal, the call returned');
  };

  test('a query attending 2^33 entries is TOO_LARGE before any is read (the loop pushed undefined ids until the heap ran out)', () => {
    const huge = { requests: [{ seqLen: 2 ** 40, extendLen: 1, swaTokenIdByPosition: { length: 2 ** 40 }, c128PageTable: [0] }], c128PageSize: 1 };
    expect(refused(() => R.attentionSetReference(huge, 128, 0))).toEqual(['TOO_LARGE', 'chunk.requests[0]']);
    const cache = v4Cache();
    const layer = { chunk: huge, compressRatio: 128, q: bf16([1, 1, 512]), caches: { swa: cache, c128: { ...cache, pageSize: 1, numPages: 4, data: new Uint8Array(4 * 1152) } }, smScale: 0.1 };
    expect(refused(() => R.prefillLayerReference(layer as never))).toEqual(['TOO_LARGE', 'chunk.requests[0]']);
  });

  test('the layer reference takes the indexer top-k as [numQueries, topk] or [numQueries, 1, topk], as the library does (31f2c23 refused the second: helper-72, wasm seed 176 case 1372)', () => {
    const flat = layerArgs();
    const rank3 = { ...flat, topkIndices: i32([2, 1, 2], [0, -1, 1, 0]) };
    const a = R.prefillLayerReference(flat as never), b = R.prefillLayerReference(rank3 as never);
    expect(Array.from(b.out)).toEqual(Array.from(a.out));
    expect(Array.from(b.lse)).toEqual(Array.from(a.lse));
    expect(a.out.some((x) => x !== 0)).toBe(true);
    const wide = { ...flat, topkIndices: i32([2, 2, 1], [0, -1, 1, 0]) };
    expect(refused(() => R.prefillLayerReference(wide as never))).toEqual(['INVALID_SHAPE', 'topkIndices']);
  });

  test('a layer with no queries and hQ 2^31 − 1 gives empty outputs (it allocated a query row of hQ · 512 floats first: an untyped RangeError; cpu seed 304 case 2688)', () => {
    const empty = { ...layerArgs(), chunk: { ...chunk(), requests: [{ seqLen: 10, extendLen: 0, swaTokenIdByPosition: [0, 1, 2, 3, 0, 1, 2, 3, 0, 1], c4PageTable: [1, 0], c128PageTable: [] }] }, q: { dtype: 'bf16', shape: [0, 2 ** 31 - 1, 512], data: new Uint16Array(0) }, topkIndices: i32([0, 2], []) };
    delete (empty as Record<string, unknown>).attnSink;
    const r = R.prefillLayerReference(empty as never);
    expect([r.out.length, r.lse.length, r.maxLogits.length, r.dropped]).toEqual([0, 0, 0, 0]);
  });

  test("an array detached by a getter read after its check is refused, not read as zeros (q's bits read as 0: every out silently the mean of its rows)", () => {
    const args = prefillArgs();
    const q = args.q as { data: Uint16Array };
    const sink = args.attnSink as Record<string, unknown>;
    const shape = sink.shape;
    Object.defineProperty(sink, 'shape', { get: () => (structuredClone(q.data.buffer, { transfer: [q.data.buffer] }), shape) });
    expect(refused(() => R.sparsePrefillReference(args as never))).toEqual(['INVALID_VALUE', 'q.data']);
  });

  test('each argument is read once: a getter answering another tensor on a second read changes nothing (kv read again came short: every out NaN)', () => {
    const args = prefillArgs();
    const want = R.sparsePrefillReference(args as never);
    let reads = 0;
    const kv = args.kv;
    const short = { dtype: 'bf16', shape: [3, 64], data: new Uint16Array(64) };
    const lying = { ...args };
    Object.defineProperty(lying, 'kv', { get: () => (reads++ === 0 ? kv : short), enumerable: true });
    const got = R.sparsePrefillReference(lying as never);
    expect(reads).toBe(1);
    expect(Array.from(got.out)).toEqual(Array.from(want.out));
    expect(Array.from(got.lse)).toEqual(Array.from(want.lse));
  });

  test('a Proxy of the arguments and frozen arguments give the same float64 results as the plain ones', () => {
    const freeze = <T extends object>(o: T): T => {
      for (const v of Object.values(o)) if (typeof v === 'object' && v !== null && !ArrayBuffer.isView(v)) freeze(v);
      return Object.freeze(o);
    };
    for (const [name, make, run] of [
      ['sparsePrefillReference', prefillArgs, (a: unknown) => R.sparsePrefillReference(a as never)],
      ['pagedSparseAttentionReference', pagedArgs, (a: unknown) => R.pagedSparseAttentionReference(a as never)],
      ['prefillLayerReference', layerArgs, (a: unknown) => R.prefillLayerReference(a as never)],
    ] as const) {
      const args = make();
      const want = run(args);
      expect(want.out.some(Number.isNaN), name).toBe(false);
      for (const variant of [new Proxy(args, {}), freeze(args)]) {
        const got = run(variant);
        expect(Array.from(got.out), name).toEqual(Array.from(want.out));
        expect(Array.from(got.lse), name).toEqual(Array.from(want.lse));
        expect(Array.from(got.maxLogits), name).toEqual(Array.from(want.maxLogits));
      }
    }
  });

  test('quantize: rows that are the cache\'s own memory are read as they were at the call (the quantize wrote over bytes it had still to read)', () => {
    const cache = v4Cache();
    const before = cache.data.slice();
    // rows [1, 512] of bf16 over bytes 1216..2239 of the cache: token 2's nope bytes (1728 on) are
    // written tile by tile while the row's later tiles (elements 256 on) are still to be read there
    const rows = { dtype: 'bf16', shape: [1, 512], data: new Uint16Array(cache.data.buffer, 1216, 512) };
    const copy = { dtype: 'bf16', shape: [1, 512], data: new Uint16Array(before.buffer, 1216, 512).slice() };
    const want = { ...cache, data: before.slice() };
    R.quantizeKCacheReference(want as never, [2], copy as never);
    R.quantizeKCacheReference(cache as never, [2], rows as never);
    expect(Array.from(cache.data)).toEqual(Array.from(want.data));
  });
});

describe("the reference pool (verify's; dist/reference/parallel.js, not in the subpath's index)", () => {
  test('a worker count that is no integer ≥ 1 is INVALID_VALUE (NaN started no worker: run() never settled)', async () => {
    for (const workers of [NaN, 0, 1.5, -1, 2 ** 53, '2']) {
      const e = await createReferencePool(prefillArgs() as never, workers as never).then(async (pool) => {
        // a pool that came up: its run must settle (not run here past a second)
        const settled = await Promise.race([pool.run([0]).then(() => 'resolved', () => 'rejected'), new Promise((r) => setTimeout(() => r('never settled'), 1000))]);
        await pool.close();
        return settled;
      }, (x: unknown) => x);
      expect(e, String(workers)).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], String(workers)).toEqual(['INVALID_VALUE', 'workers']);
    }
  });

  test("run's query rows are checked and copied before a worker gets them: INVALID_VALUE naming queries (a worker's refusal came back as BACKEND_FAILURE; a Proxy of an array could not be posted)", async () => {
    const pool = await createReferencePool(prefillArgs() as never, 2);
    try {
      const transparent = new Proxy([1, 0], {});
      for (const queries of [[2], [NaN], [0.5], null as never, transparent, 'x' as never]) {
        const e = await pool.run(queries as never).then(() => undefined, (x: unknown) => x);
        if (queries === null || queries === transparent) {
          // every row; the Proxy's rows as a plain copy (postMessage cannot clone a Proxy)
          expect(e, String(queries)).toBeUndefined();
          continue;
        }
        expect(e, String(queries)).toBeInstanceOf(SparseMlaError);
        expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], String(queries)).toEqual(['INVALID_VALUE', 'queries']);
      }
      const [want, got] = [R.sparsePrefillReference(prefillArgs() as never), await pool.run([1, 0])];
      expect(got.out.length).toBe(want.out.length);
    } finally {
      await pool.close();
    }
  });

  test('the workers get the arguments as checked: a kv getter answering a short kv on a second read changes nothing (the pool read it again: its workers got the short kv, refused it and died, WORKER_DIED)', async () => {
    const args = prefillArgs();
    const want = R.sparsePrefillReference(args as never);
    const kv = args.kv;
    let reads = 0;
    const lying = { ...args };
    Object.defineProperty(lying, 'kv', { get: () => (reads++ === 0 ? kv : { dtype: 'bf16', shape: [3, 64], data: new Uint16Array(64) }), enumerable: true });
    const pool = await createReferencePool(lying as never, 2);
    try {
      const got = await pool.run([0, 1]);
      expect(reads).toBe(1);
      expect(Array.from(got.out)).toEqual(Array.from(want.out));
      expect(Array.from(got.lse)).toEqual(Array.from(want.lse));
    } finally {
      await pool.close();
    }
  });
});
