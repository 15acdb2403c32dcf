/** Allocating FP8 KV caches in the layouts of SPEC §3. */
import { resolveCacheShape, type KvCacheGeometry } from './ops/kv_cache.js';
import type { CacheFormat, KvCache } from './types.js';

export type { KvCacheGeometry } from './ops/kv_cache.js';

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
  return { format: s.format, pageSize: s.pageSize, numPages: s.numPages, data: new Uint8Array(s.bytes) };
}
