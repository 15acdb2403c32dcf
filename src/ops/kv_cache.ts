/**
 * kv_cache op: validation and normalization of quantizeKCache / dequantizeKCachePaged (SPEC §3,
 * §9), cache geometry and allocating caches in the layouts of SPEC §3. Every backend receives the
 * validated jobs below; the byte layout is ../kv_cache_layout.ts's.
 */
import { fail } from '../errors.js';
import { allocHostArray, isDeviceBuffer } from '../tensor.js';
import type { CacheFormat, DequantizeKCacheArgs, DeviceBuffer, KvCache, OnDevice, Placement, QuantizeKCacheArgs, TokenIds } from '../types.js';
import type { CacheView, DequantizeKCacheJob, HostOpMemory, QuantizeKCacheJob } from '../backends/backend.js';
import { checkCallMemory } from '../backends/memory.js';
import { inputBytes } from '../backends/staging.js';
import { INT32_MAX, checkArgsObject, checkRank, checkTensor, describe, listCount, ownView, shapeStr } from './common.js';
import { V32_TOKEN_BYTES, rowDimOf, v4PageBytes } from '../kv_cache_layout.js';

export type KvCacheGeometry = { pageSize: number; numPages: number } | { numTokens: number; pageSize?: number };

/** Resolved cache geometry; v32 is always pageSize 1, numPages = tokens. */
export interface CacheShape {
  format: CacheFormat;
  pageSize: number;
  numPages: number;
  numTokens: number;
  bytes: number;
}

/** The default v4 page size when only a token count is given. */
export const DEFAULT_V4_PAGE_SIZE = 64;

function checkCount(value: unknown, argument: string, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    fail('INVALID_VALUE', argument, `an integer ≥ ${min}`, describe(value));
  }
  if (value > INT32_MAX) fail('TOO_LARGE', argument, `≤ ${INT32_MAX} (32-bit sizes in the core ABI)`, String(value));
  return value;
}

function checkFormat(format: unknown, argument: string): CacheFormat {
  if (format !== 'v4' && format !== 'v32') fail('INVALID_VALUE', argument, `"v4" or "v32"`, describe(format));
  return format;
}

function shapeFrom(format: CacheFormat, pageSize: number, numPages: number, argument: string): CacheShape {
  const numTokens = pageSize * numPages;
  if (numTokens > INT32_MAX) {
    fail('TOO_LARGE', argument, `pageSize × numPages ≤ ${INT32_MAX} tokens (32-bit token ids)`, `${pageSize} × ${numPages} = ${numTokens}`);
  }
  const bytes = format === 'v4' ? v4PageBytes(pageSize) * numPages : V32_TOKEN_BYTES * numTokens;
  return { format, pageSize, numPages, numTokens, bytes };
}

/** Resolve {pageSize, numPages} | {numTokens[, pageSize]} for a format (createKvCache, kvCacheBytes). */
export function resolveCacheShape(format: unknown, geometry: unknown): CacheShape {
  const fmt = checkFormat(format, 'format');
  checkArgsObject(geometry, 'geometry');
  if ('numTokens' in geometry && geometry.numTokens !== undefined) {
    const numTokens = checkCount(geometry.numTokens, 'geometry.numTokens', 0);
    if (fmt === 'v32') {
      if (geometry.pageSize !== undefined && geometry.pageSize !== 1) fail('INVALID_VALUE', 'geometry.pageSize', '1 (v32 is contiguous)', describe(geometry.pageSize));
      return shapeFrom(fmt, 1, numTokens, 'geometry');
    }
    const pageSize = geometry.pageSize === undefined ? DEFAULT_V4_PAGE_SIZE : checkCount(geometry.pageSize, 'geometry.pageSize', 1);
    return shapeFrom(fmt, pageSize, Math.ceil(numTokens / pageSize), 'geometry');
  }
  const pageSize = checkCount(geometry.pageSize, 'geometry.pageSize', 1);
  const numPages = checkCount(geometry.numPages, 'geometry.numPages', 0);
  if (fmt === 'v32' && pageSize !== 1) fail('INVALID_VALUE', 'geometry.pageSize', '1 (v32 is contiguous; numPages counts tokens)', String(pageSize));
  return shapeFrom(fmt, pageSize, numPages, 'geometry');
}

/** A cache argument of an op: checks format, geometry and that data holds exactly the right bytes. */
export function checkCache(value: unknown, argument: string, formats?: readonly CacheFormat[]): CacheView;
export function checkCache(value: unknown, argument: string, formats: readonly CacheFormat[] | undefined, allowDevice: true): CacheView<DeviceBuffer>;
/** allowDevice: the cache's bytes may be a DeviceBuffer (cuda ops that only read the cache). */
export function checkCache(value: unknown, argument: string, formats: readonly CacheFormat[] = ['v4', 'v32'], allowDevice = false): CacheView<DeviceBuffer> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    fail('INVALID_VALUE', argument, 'a KvCache {format, pageSize, numPages, data}', describe(value));
  }
  // Each field read once: what is checked here is what the backend gets.
  const c = value as Partial<KvCache> & Record<string, unknown>;
  const rawFormat = c.format;
  const rawPageSize = c.pageSize;
  const rawNumPages = c.numPages;
  const rawData: unknown = c.data;
  const format = checkFormat(rawFormat, `${argument}.format`);
  if (!formats.includes(format)) fail('INVALID_VALUE', `${argument}.format`, formats.map((f) => `"${f}"`).join(' or '), `"${format}"`);
  const pageSize = checkCount(rawPageSize, `${argument}.pageSize`, 1);
  const numPages = checkCount(rawNumPages, `${argument}.numPages`, 0);
  if (format === 'v32' && pageSize !== 1) fail('INVALID_VALUE', `${argument}.pageSize`, '1 for a v32 cache', String(pageSize));
  const shape = shapeFrom(format, pageSize, numPages, argument);
  if (isDeviceBuffer(rawData)) {
    if (!allowDevice) fail('INVALID_VALUE', `${argument}.data`, 'host bytes (this op writes the cache on the host)', 'a device buffer');
    if (rawData.freed) fail('INVALID_VALUE', `${argument}.data`, 'a live device buffer', 'a freed one');
    if (rawData.byteLength !== shape.bytes) fail('INVALID_SHAPE', `${argument}.data`, `${shape.bytes} bytes`, `a device buffer of ${rawData.byteLength} bytes`);
    return { ...shape, data: rawData };
  }
  const data = ownView(rawData, Uint8Array, `${argument}.data`);
  if (!data) fail('INVALID_DTYPE', `${argument}.data`, 'a Uint8Array', describe(rawData));
  if (data.length !== shape.bytes) {
    const how = format === 'v4' ? `${numPages} pages × ${v4PageBytes(pageSize)} B (pageSize ${pageSize})` : `${numPages} tokens × ${V32_TOKEN_BYTES} B`;
    fail('INVALID_SHAPE', `${argument}.data`, `${shape.bytes} bytes = ${how}`, `${data.length} bytes`);
  }
  return { ...shape, data };
}

/** A caller's token ids counted, none read yet: `read` reads each id once and checks it (range, integer). */
interface CountedTokenIds {
  readonly count: number;
  read(): Int32Array;
}

/**
 * Token ids for the cache ops, in two steps: their count now (an array's length read once; a
 * tensor's dtype and shape, its ids copied, which runs no caller's code), so that a check that needs
 * only the count (rows against ids, the memory budget) refuses a list claiming millions of ids
 * before any id is read; then `read` (once) → Int32Array, each id checked to lie in [0, numTokens).
 * An id outside is an error (SPEC §3.3) naming the first bad position and its value.
 */
export function countTokenIds(value: unknown, argument: string, cache: CacheShape, cacheArgument: string): CountedTokenIds {
  const n = cache.numTokens;
  const expected = (): string => `token ids in [0, ${n}) for ${cacheArgument} (${cache.format}, pageSize ${cache.pageSize} × numPages ${cache.numPages})`;
  if (Array.isArray(value)) {
    // its length read once (a Proxy's may answer otherwise on a second read: the loop ran to that,
    // leaving the last ids 0, silently), each element once in read()
    const count = listCount(value, argument, 'token ids');
    const read = (): Int32Array => {
      const out = allocHostArray(Int32Array, count, argument);
      for (let i = 0; i < count; i++) {
        const v: unknown = value[i];
        if (typeof v !== 'number' || !Number.isInteger(v)) fail('INVALID_VALUE', argument, 'integer token ids', `${describe(v)} at position ${i}`);
        if (v < 0 || v >= n) fail('OUT_OF_RANGE', argument, expected(), `${v} at position ${i}`);
        out[i] = v;
      }
      return out;
    };
    return { count, read };
  }
  const t = checkTensor(value, argument, ['int32', 'int64'] as const);
  if (t.shape.length !== 1) fail('INVALID_SHAPE', argument, 'shape [n]', `shape ${shapeStr(t.shape)}`);
  // a copy now, checked in read(): the caller's ids may be rewritten before the backend reads them (a
  // getter of a later argument, another thread on shared memory), and an id the check passed must be
  // the id used; a typed array's copy reads no caller's code
  if (t.dtype === 'int32') {
    const d = (t.data as Int32Array).slice();
    const read = (): Int32Array => {
      for (let i = 0; i < d.length; i++) {
        const v = d[i]!;
        if (v < 0 || v >= n) fail('OUT_OF_RANGE', argument, expected(), `${v} at position ${i}`);
      }
      return d;
    };
    return { count: d.length, read };
  }
  // int64 narrowed now, an id no int32 holds (negative or ≥ 2^31) kept as −1 and the first such
  // remembered for the message
  const src = t.data as BigInt64Array;
  const halves = new Int32Array(src.buffer, src.byteOffset, src.length * 2);
  const out = new Int32Array(src.length);
  let firstWide: bigint | undefined;
  for (let i = 0; i < out.length; i++) {
    const lo = halves[2 * i]!;
    if (halves[2 * i + 1] === 0 && lo >= 0) out[i] = lo;
    else {
      out[i] = -1;
      firstWide ??= src[i];
    }
  }
  const read = (): Int32Array => {
    for (let i = 0; i < out.length; i++) {
      const v = out[i]!;
      if (v < 0 || v >= n) fail('OUT_OF_RANGE', argument, expected(), `${v < 0 ? firstWide : v} at position ${i}`);
    }
    return out;
  };
  return { count: out.length, read };
}

export function prepareQuantizeKCache(args: QuantizeKCacheArgs): QuantizeKCacheJob {
  checkArgsObject(args, 'quantizeKCache arguments');
  const cache = checkCache(args.cache, 'cache');
  const ids = countTokenIds(args.tokenIds as TokenIds, 'tokenIds', cache, 'cache');
  const rows = checkTensor(args.rows, 'rows', ['bf16', 'float32'] as const);
  const rowDim = rowDimOf(cache.format);
  const [n, d] = checkRank(rows, 'rows', 2, `[n, ${rowDim}]`);
  // rows against the ids' count before any id is read
  if (n !== ids.count || d !== rowDim) {
    fail('INVALID_SHAPE', 'rows', `shape [n, ${rowDim}] with n = tokenIds length ${ids.count} (${cache.format} cache)`, `shape ${shapeStr(rows.shape)}`);
  }
  const tokenIds = ids.read();
  return { cache, tokenIds, rows: rows.data, rowsDtype: rows.dtype, n: tokenIds.length, rowDim };
}

/**
 * An engine's host memory as its dequant counts it: its budget, what its ops count against it (the
 * backend's own arithmetic, HostOpMemory, with the worker heap where its ops run in workers of a
 * bounded heap), and whether it has device memory. Given to prepareDequantizeKCache, the call is
 * checked against them from the ids' count, before any id is read.
 */
export interface DequantizeMemory {
  budgetBytes: number | undefined;
  ops: HostOpMemory | undefined;
  hasDevice: boolean;
}

/**
 * The refusals of a dequant of `count` ids that need only the count, as its backend makes them
 * after the ids are read (wasm: a worker's heap, then the budget; cpu and cuda: the budget): the
 * same arithmetic, so the same error, before any id is read. The ids become a fresh int32 array
 * (not shared). A call that needs device memory the engine has not is left to the engine's
 * BACKEND_UNAVAILABLE, as before.
 */
function checkDequantizeCount(memory: DequantizeMemory, cache: CacheView<DeviceBuffer>, count: number, rowDim: number, output: Placement): void {
  const { budgetBytes, ops } = memory;
  const onDevice = isDeviceBuffer(cache.data);
  if (ops === undefined || budgetBytes === undefined || ((onDevice || output === 'device') && !memory.hasDevice)) return;
  const heap = ops.workerHeap;
  if (heap !== undefined && count > 0) heap.check(heap.dequantizeKCache(cache.format, rowDim), 'tokenIds');
  const cacheBytes = onDevice ? { unshared: 0, callCopy: 0 } : inputBytes(cache.data as Uint8Array);
  checkCallMemory('dequantizeKCachePaged', 'tokenIds', ops.dequantizeKCache(cache.format, count, rowDim, cacheBytes, { unshared: count * 4, callCopy: 0 }, output), budgetBytes);
}

/**
 * `memory`: the engine's (SparseMlaEngine.hostMemory and hasDevice), to refuse a call over it from the
 * ids' count before any id is read; `output`: where its rows go.
 */
export function prepareDequantizeKCache(args: OnDevice<DequantizeKCacheArgs>, memory?: DequantizeMemory, output: Placement = 'host'): DequantizeKCacheJob<DeviceBuffer> {
  checkArgsObject(args, 'dequantizeKCachePaged arguments');
  const cache = checkCache(args.cache, 'cache', undefined, true);
  const ids = countTokenIds(args.tokenIds as TokenIds, 'tokenIds', cache, 'cache');
  const rowDim = rowDimOf(cache.format);
  if (memory !== undefined) checkDequantizeCount(memory, cache, ids.count, rowDim, output);
  const tokenIds = ids.read();
  return { cache, tokenIds, n: tokenIds.length, rowDim };
}

/**
 * Bytes of a cache: v4 `numPages · roundUp(pageSize · 584, 576)`, v32 `numTokens · 656`.
 * Geometry: {pageSize, numPages}, or {numTokens} (v32; v4 rounds up to whole pages of
 * `pageSize`, default 64).
 */
export function kvCacheBytes(format: CacheFormat, geometry: KvCacheGeometry): number {
  return resolveCacheShape(format, geometry).bytes;
}

/** A zero-filled cache of the given format and geometry. */
export function createKvCache(format: CacheFormat, geometry: KvCacheGeometry): KvCache {
  const s = resolveCacheShape(format, geometry);
  return { format: s.format, pageSize: s.pageSize, numPages: s.numPages, data: allocHostArray(Uint8Array, s.bytes, 'geometry') };
}
