/**
 * What a plan checks of its inputs before any work: a chunk's requests read once, id lists, v4
 * caches (host or device) and a c4 layer's top-k, with the refusals each check throws.
 */
import { fail } from '../errors.js';
import { checkTensor, describe, INT32_MAX, listCount, ownView, typedArrayKind } from '../ops/common.js';
import { allocHostArray, isDeviceBuffer } from '../tensor.js';
import type { DeviceBuffer } from '../types.js';
import { v4PageBytes } from '../kv_cache_layout.js';
import type { CacheView, DeviceOps } from '../backends/backend.js';
import type { CompressRatio, IdList } from './types.js';

export function cacheTokens(cache: { pageSize: number; numPages: number }): number {
  return cache.pageSize * cache.numPages;
}

function isIdList(v: unknown): v is IdList {
  if (Array.isArray(v) || (ArrayBuffer.isView(v) && !(v instanceof DataView))) return true;
  return typeof v === 'object' && v !== null && 'dtype' in v && 'data' in v && 'shape' in v;
}

/** An IdList's elements and their count, read once; no id read yet. */
export interface IdSource {
  readonly src: ArrayLike<number | bigint>;
  readonly n: number;
}

/** An IdList checked for its kind and its count read (a Proxy's length once), before any id is read. */
export function idSource(list: unknown, argument: string): IdSource {
  if (!isIdList(list)) fail('INVALID_VALUE', argument, 'an array, typed array or int32/int64 tensor of ids', describe(list));
  if (Array.isArray(list)) {
    // its length read once (a Proxy's may answer otherwise on each read, or not a count), each element once below
    return { n: listCount(list, argument, 'ids'), src: list as unknown as ArrayLike<number | bigint> };
  }
  if (ArrayBuffer.isView(list)) {
    // its memory as the intrinsics see it (a subclass's own length is no evidence of it)
    const kind = typedArrayKind(list) as 'Int32Array';
    const src = ownView(list, globalThis[kind], argument) as unknown as ArrayLike<number | bigint>;
    return { src, n: src.length };
  }
  const t = checkTensor(list, argument, ['int32', 'int64']);
  if (t.shape.length !== 1) fail('INVALID_SHAPE', argument, 'a tensor of shape [n]', `shape [${t.shape.join(', ')}]`);
  return { src: t.data, n: t.data.length };
}

/** A source's ids as numbers, each read once and checked: a safe integer ≥ 0. */
export function readIdValues({ src, n }: IdSource, argument: string): Float64Array {
  const out = allocHostArray(Float64Array, n, argument);
  for (let i = 0; i < n; i++) {
    const v = src[i];
    const x = typeof v === 'bigint' ? Number(v) : v;
    if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0 || (typeof v === 'bigint' && BigInt(x) !== v)) {
      fail('OUT_OF_RANGE', `${argument}[${i}]`, 'a non-negative integer id', describe(v));
    }
    out[i] = x;
  }
  return out;
}

/**
 * The ids of an IdList as numbers, each a safe integer ≥ 0 (checked). `checkCount`, given, runs on
 * their count before any id is read (a list claiming millions of ids where a few are wanted is
 * refused by its count, not after a read of every id).
 */
export function readIds(list: unknown, argument: string, checkCount?: (count: number) => void): Float64Array {
  const source = idSource(list, argument);
  checkCount?.(source.n);
  return readIdValues(source, argument);
}

/**
 * The most requests a chunk may have, refused from the count before any request is read. The planner
 * holds a few small objects per request in the V8 heap while it plans (the request's fields copied,
 * its layout, its id lists read): a Proxy claiming 2^31 − 1 requests exhausted a default heap and
 * crashed the process. 2^20 is as many requests as the default workspace budget has rows, and every
 * request with a query gathers at least one SWA row: no chunk the default budget admits has more
 * requests with queries. Split a larger chunk.
 */
export const MAX_CHUNK_REQUESTS = 2 ** 20;

/**
 * The most page-table entries past the pages its requests use that a chunk's tables of one compress
 * ratio may hold, refused from the tables' counts before any entry is read. A table may be longer than
 * its request needs (a row of a larger block table), and every entry is still read and checked; the
 * pages used are bounded by the workspace the budget admits, the entries past them by this. Without
 * it a list claiming 2^31 − 1 pages was read whole, and as many such tables as the chunk has requests.
 */
export const MAX_UNUSED_PAGE_TABLE_ENTRIES = 2 ** 24;

/** A request's fields as the planner reads them, each read once (checked by the Plan's constructor). */
export interface RequestFields {
  readonly seqLen: unknown;
  readonly extendLen: unknown;
  readonly swaTokenIds: unknown;
  readonly c4PageTable: unknown;
  readonly c128PageTable: unknown;
}

/** A chunk as the planner reads it: its fields, and each request's fields or (not an object) the request as it came. */
export interface ChunkFields {
  readonly requests: readonly (RequestFields | unknown)[];
  readonly c4PageSize: unknown;
  readonly c128PageSize: unknown;
}

/**
 * A chunk read once: its fields, its requests' count and each request's fields copied into plain
 * objects, so that a getter or Proxy asked again cannot answer otherwise (chunk.requests or a
 * request read again gave null: TypeError, or other requests than the ones checked). The Plan's
 * constructor checks what this read; createShardedPlan reads the chunk once for the whole plan and
 * its shards. null when `chunk` is no object or its requests no array; a request that is no object
 * ends the copy (the checks refuse it there). The count is checked here, where it is read, before
 * any request is: TOO_LARGE above MAX_CHUNK_REQUESTS.
 */
export function chunkOnce(chunk: unknown): ChunkFields | null {
  if (typeof chunk !== 'object' || chunk === null) return null;
  const c = chunk as Record<string, unknown>;
  const given = c.requests;
  if (!Array.isArray(given)) return null;
  const c4PageSize = c.c4PageSize, c128PageSize = c.c128PageSize;
  const n = listCount(given, 'chunk.requests', 'requests', MAX_CHUNK_REQUESTS, ' in a chunk (MAX_CHUNK_REQUESTS; split the chunk)');
  const requests: (RequestFields | unknown)[] = [];
  for (let r = 0; r < n; r++) {
    const q: unknown = given[r];
    if (typeof q !== 'object' || q === null) {
      requests.push(q);
      break;
    }
    const f = q as Record<string, unknown>;
    requests.push({ seqLen: f.seqLen, extendLen: f.extendLen, swaTokenIds: f.swaTokenIds, c4PageTable: f.c4PageTable, c128PageTable: f.c128PageTable });
  }
  return { requests, c4PageSize, c128PageSize };
}

export function checkInt(v: unknown, argument: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    fail('INVALID_VALUE', argument, `an integer in [${min}, ${max}]`, describe(v));
  }
  return v;
}

/**
 * A host cache or a device one (engine.uploadKvCache): its size is checked, its bytes never read.
 * Returns the view the layer steps read (host bytes as a plain view of the same memory).
 */
export function checkV4Cache(cache: unknown, argument: string, read?: CacheRead): CacheView<DeviceBuffer> {
  if (typeof cache !== 'object' || cache === null) notACache(cache, argument);
  // each field read once: what is checked is what the layer reads
  const c = read ?? (cache as CacheRead);
  const format = c.format, pageSize = c.pageSize, numPages = c.numPages, rawData = c.data;
  const data = isDeviceBuffer(rawData) ? (rawData.freed ? notACache(cache, argument) : rawData) : ownView(rawData, Uint8Array, `${argument}.data`);
  if (data === null) notACache(cache, argument);
  if (format !== 'v4') notV4(format, argument);
  if (!Number.isSafeInteger(pageSize) || (pageSize as number) < 1 || !Number.isSafeInteger(numPages) || (numPages as number) < 0) badCacheGeometry(pageSize, numPages, argument);
  const geometry = { pageSize: pageSize as number, numPages: numPages as number };
  const pageBytes = v4PageBytes(geometry.pageSize);
  if (data.byteLength !== pageBytes * geometry.numPages) badCacheBytes(geometry, data.byteLength, pageBytes, argument);
  return new V4CacheView(geometry.pageSize, geometry.numPages, data.byteLength, data);
}

/** A cache's fields as a layer's check without messages read them (format, pageSize, numPages, data), for checkCaches to go on from. */
export interface CacheRead {
  readonly format: unknown;
  readonly pageSize: unknown;
  readonly numPages: unknown;
  readonly data: unknown;
}

/**
 * What a device layer's check read of its caches before it stopped (prefill_layer_checks.ts), for
 * checkCaches to go on from: the SWA cache and its fields where read, the compressed cache
 * (NOT_READ where not read) and its fields where read.
 */
export interface CachesRead {
  readonly swa: unknown;
  readonly swaFields: CacheRead | undefined;
  readonly compressed: unknown;
  readonly compressedFields: CacheRead | undefined;
}

/** What a device layer's checks ask of its engine's device: a live buffer of its own, of exactly these bytes (DeviceOps.ownsLive). */
export type OwnedBufferCheck = Pick<DeviceOps, 'ownsLive'>;

/**
 * checkV4Cache for a cache in device memory, over its fields as the caller read them (format,
 * pageSize, numPages, data), without a message: its view where checkV4Cache accepts them and `data`
 * is a live device buffer of `device`'s own, else undefined (a host cache, another engine's, or
 * anything checkV4Cache refuses: call it for the error).
 */
export function deviceCacheView(format: unknown, pageSize: unknown, numPages: unknown, data: unknown, device: OwnedBufferCheck): CacheView<DeviceBuffer> | undefined {
  // int32s ((x | 0) === x: no builtin call; a larger one only falls back to checkV4Cache); numbers
  // first: `| 0` throws a TypeError on a BigInt or Symbol and runs an object's valueOf
  if (format !== 'v4' || typeof pageSize !== 'number' || typeof numPages !== 'number' || (pageSize | 0) !== pageSize || pageSize < 1 || (numPages | 0) !== numPages || numPages < 0) return undefined;
  const bytes = v4PageBytes(pageSize) * numPages;
  if (!device.ownsLive(data, bytes)) return undefined;
  return new V4CacheView(pageSize, numPages, bytes, data as DeviceBuffer);
}

// The messages of the checks a layer runs (checkV4Cache, Plan.checkCaches, Plan.checkTopk), built
// only to throw: those run on every layer, mostly before V8 has optimized them, and V8 gives a
// function its inline caches once it has run about eight times its own bytecode.
function notACache(cache: unknown, argument: string): never {
  fail('INVALID_VALUE', argument, 'a KvCache {format, pageSize, numPages, data}', describe(cache));
}
function notV4(format: unknown, argument: string): never {
  fail('INVALID_VALUE', `${argument}.format`, "'v4' (the planner's caches are DeepSeek V4 paged caches)", describe(format));
}
function badCacheGeometry(pageSize: unknown, numPages: unknown, argument: string): never {
  fail('INVALID_VALUE', argument, 'a positive integer pageSize and a non-negative numPages', `pageSize ${describe(pageSize)}, numPages ${describe(numPages)}`);
}
function badCacheBytes(c: { pageSize: number; numPages: number }, byteLength: number, pageBytes: number, argument: string): never {
  fail('INVALID_SHAPE', `${argument}.data`, `${pageBytes * c.numPages} bytes for ${c.numPages} pages of ${c.pageSize}`, `${byteLength} bytes`);
}
export function swaCacheTooSmall(maxSwaId: number, numTokens: number): never {
  fail('OUT_OF_RANGE', 'caches.swa', `a cache holding token id ${maxSwaId} (the plan's largest SWA id)`, `${numTokens} tokens`);
}
export function badCompressedCache(ratio: 4 | 128, st: { pageSize: number; maxPage: number }, compressed: { pageSize: number; numPages: number }): never {
  const key = ratio === 4 ? 'c4' : 'c128';
  if (compressed.pageSize !== st.pageSize) fail('INVALID_VALUE', `caches.${key}.pageSize`, `the plan's c${ratio} page size ${st.pageSize}`, `${compressed.pageSize}`);
  fail('OUT_OF_RANGE', `caches.${key}`, `a cache holding page ${st.maxPage} (the plan's largest c${ratio} page)`, `${compressed.numPages} pages`);
}
export function badTopkShape(numQueries: number, shape: readonly number[]): never {
  fail('INVALID_SHAPE', 'topkIndices', `[numQueries = ${numQueries}, topk]`, `[${shape.join(', ')}]`);
}
export function topkTooLarge(numQueries: number, width: number): never {
  fail('TOO_LARGE', 'topkIndices', `c4 index rows of at most ${INT32_MAX} entries`, `${numQueries} × ${width}`);
}
/** @internal The refusal of a compress ratio a plan does not serve (createPlan's layers and prefillLayer alike). */
export function ratioNotServed(ratio: unknown, argument: string, ratios: readonly CompressRatio[]): never {
  if (ratio === 4 || ratio === 128) fail('INVALID_VALUE', argument, `a ratio this plan serves (${ratios.join(', ')}); pass chunk.c${ratio}PageSize and page tables to createPlan`, `${ratio}`);
  fail('INVALID_VALUE', argument, 'a compress ratio 0, 4 or 128', describe(ratio));
}

export const INT32_DTYPE = ['int32'] as const;

/** A c4 layer's top-k checked against its plan (Plan.checkTopk): its data, [numQueries, topk] and its rows' width. */
export interface CheckedTopk<B = never> {
  readonly data: Int32Array | B;
  readonly shape: readonly [number, number];
  readonly topk: number;
  readonly width: number;
}

// The records a device layer makes before its first launch (its checked caches, top-k and queued
// job) are made by constructors, not object literals: they are made on every layer, mostly before
// V8 has given the functions that make them feedback (it does once a function has run about eight
// times its own bytecode), and without feedback V8 builds a literal property by property in its
// runtime, where a constructor's stores take its fast path.

/** A checked v4 cache (CacheView): what checkV4Cache and a device layer's cache check give. */
class V4CacheView<B> implements CacheView<B> {
  declare readonly format: 'v4';
  declare readonly pageSize: number;
  declare readonly numPages: number;
  declare readonly numTokens: number;
  declare readonly bytes: number;
  declare readonly data: Uint8Array | B;
  constructor(pageSize: number, numPages: number, bytes: number, data: Uint8Array | B) {
    this.format = 'v4';
    this.pageSize = pageSize;
    this.numPages = numPages;
    this.numTokens = pageSize * numPages;
    this.bytes = bytes;
    this.data = data;
  }
}

/** A layer's caches as checked (Plan.checkCaches, a device layer's checks): the SWA cache's view and the compressed cache's, if the ratio has one. */
export class CheckedCaches<B> {
  declare readonly swa: CacheView<B>;
  declare readonly compressed: CacheView<B> | undefined;
  constructor(swa: CacheView<B>, compressed: CacheView<B> | undefined) {
    this.swa = swa;
    this.compressed = compressed;
  }
}

/** A checked top-k (CheckedTopk), [numQueries, topk]. */
export class TopkRows<B> implements CheckedTopk<B> {
  declare readonly data: Int32Array | B;
  declare readonly shape: readonly [number, number];
  declare readonly topk: number;
  declare readonly width: number;
  constructor(data: Int32Array | B, numQueries: number, topk: number, width: number) {
    this.data = data;
    this.shape = [numQueries, topk];
    this.topk = topk;
    this.width = width;
  }
}
