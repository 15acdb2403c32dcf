/**
 * The byte layouts of SPEC §3 on the TS side, the twin of cpp/include/sparse_mla/kv_cache_layout.h:
 * every size, offset and width of a v4 or v32 cache the facade needs comes from here.
 */
import type { CacheFormat } from './types.js';

/** v4: bytes of one token's e4m3 nope + bf16 rope data. */
export const V4_TOKEN_DATA_BYTES = 576;
/** v4: bytes of one token's scales (7 ue8m0 + 1 pad). */
export const V4_TOKEN_SCALE_BYTES = 8;
/** v4: bytes per token before page padding. */
export const V4_TOKEN_BYTES = V4_TOKEN_DATA_BYTES + V4_TOKEN_SCALE_BYTES;
/** v4: dims of a dequantized row (448 nope + 64 rope). */
export const V4_ROW_DIMS = 512;
/** v32: contiguous bytes per token. */
export const V32_TOKEN_BYTES = 656;
/** v32: dims of a dequantized row (512 + 64 rope). */
export const V32_ROW_DIMS = 576;
/** v4 page size of a compact cache (ids 0..m−1) that holds only the tokens a call reads: 72 · 584 = 73 · 576, no padding. */
export const V4_COMPACT_PAGE_SIZE = 72;

/** Width of a dequantized row. */
export function rowDimOf(format: CacheFormat): number {
  return format === 'v4' ? V4_ROW_DIMS : V32_ROW_DIMS;
}

/** v4 page size in bytes: roundUp(P · 584, 576). */
export function v4PageBytes(pageSize: number): number {
  return Math.ceil((pageSize * V4_TOKEN_BYTES) / V4_TOKEN_DATA_BYTES) * V4_TOKEN_DATA_BYTES;
}

/** Bytes a quantize or dequant of n tokens reads and writes: their records and their bf16 rows. */
export function cacheOpBytes(format: CacheFormat, n: number): number {
  return n * ((format === 'v4' ? V4_TOKEN_BYTES : V32_TOKEN_BYTES) + 2 * rowDimOf(format));
}

/** Byte ranges of one token inside a cache: its data and (v4) its scales. */
export function tokenByteRanges(cache: { format: CacheFormat; pageSize: number }, tokenId: number): { data: number; scales: number } {
  if (cache.format === 'v32') return { data: tokenId * V32_TOKEN_BYTES, scales: -1 };
  const page = Math.floor(tokenId / cache.pageSize);
  const slot = tokenId - page * cache.pageSize;
  const base = page * v4PageBytes(cache.pageSize);
  return { data: base + slot * V4_TOKEN_DATA_BYTES, scales: base + cache.pageSize * V4_TOKEN_DATA_BYTES + slot * V4_TOKEN_SCALE_BYTES };
}

/** A compact cache of `numTokens` tokens (ids 0..numTokens-1): v4 pages without padding, v32 contiguous. */
export function compactGeometry(format: CacheFormat, numTokens: number): { pageSize: number; numPages: number; bytes: number } {
  if (format === 'v32') return { pageSize: 1, numPages: numTokens, bytes: numTokens * V32_TOKEN_BYTES };
  const numPages = Math.ceil(numTokens / V4_COMPACT_PAGE_SIZE);
  return { pageSize: V4_COMPACT_PAGE_SIZE, numPages, bytes: numPages * v4PageBytes(V4_COMPACT_PAGE_SIZE) };
}
