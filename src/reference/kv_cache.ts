/**
 * Reference FP8 KV-cache layouts and per-token quantize / dequantize (SPEC §3), written from the
 * SPEC in float64 arithmetic, independent of the C++ core.
 */
import { SparseMlaError } from '../errors.js';
import type { KvCache, Tensor, TokenIds } from '../types.js';
import { decodeBf16, decodeE4m3, decodeUe8m0, encodeBf16, encodeE4m3, exponentOf, roundToBf16 } from './formats.js';

/** DeepSeek V4 paged layout constants (§3.1). */
export const V4_LAYOUT = {
  nopeDims: 448,
  ropeDims: 64,
  tile: 64,
  tiles: 7,
  /** [448 e4m3 nope][64 bf16 rope] */
  dataBytes: 576,
  /** [7 ue8m0][1 pad] */
  scaleBytes: 8,
  bytesPerToken: 584,
  rowDims: 512,
} as const;

/** DeepSeek V3.2 contiguous layout constants (§3.2). */
export const V32_LAYOUT = {
  quantDims: 512,
  ropeDims: 64,
  tile: 128,
  tiles: 4,
  /** [512 e4m3][4 float32 scales][64 bf16 rope] */
  bytesPerToken: 656,
  rowDims: 576,
} as const;

/** Where one token's bytes live in a cache. */
export interface TokenLayout {
  /** first e4m3 byte of the quantized dims */
  nope: number;
  /** first byte of the bf16 rope dims */
  rope: number;
  /** first scale byte (v4: 7 ue8m0 + 1 pad; v32: 4 little-endian float32) */
  scales: number;
}

export function roundUp(x: number, m: number): number {
  return Math.ceil(x / m) * m;
}

/** Bytes of one v4 page of `pageSize` tokens: roundUp(P * 584, 576). */
export function v4PageBytesReference(pageSize: number): number {
  return roundUp(pageSize * V4_LAYOUT.bytesPerToken, V4_LAYOUT.dataBytes);
}

/** Total bytes a cache of this shape occupies. */
export function kvCacheBytesReference(format: KvCache['format'], pageSize: number, numPages: number): number {
  return format === 'v4' ? numPages * v4PageBytesReference(pageSize) : numPages * V32_LAYOUT.bytesPerToken;
}

/** Number of token ids a cache holds. */
export function cacheTokenCount(cache: KvCache): number {
  return cache.format === 'v4' ? cache.numPages * cache.pageSize : cache.numPages;
}

/** Width of a dequantized row: 512 (v4) or 576 (v32). */
export function cacheRowDims(format: KvCache['format']): number {
  return format === 'v4' ? V4_LAYOUT.rowDims : V32_LAYOUT.rowDims;
}

/** A cache's format, and its data's byte length for its shape (SPEC §3). */
export function checkCacheReference(cache: KvCache, name = 'cache'): void {
  if (typeof cache !== 'object' || cache === null) throw new SparseMlaError('INVALID_VALUE', `${name}: expected a KV cache {format, pageSize, numPages, data}, got ${String(cache)}`, name);
  if (cache.format !== 'v4' && cache.format !== 'v32') {
    throw new SparseMlaError('INVALID_VALUE', `${name}.format: expected 'v4' or 'v32', got ${typeof cache.format === 'symbol' ? 'a Symbol' : String(cache.format)}`, name);
  }
  const bytes = kvCacheBytesReference(cache.format, cache.pageSize, cache.numPages);
  // byteLength, as the library reads the memory: a subclass's `length` getter may say otherwise
  if (!(cache.data instanceof Uint8Array) || cache.data.byteLength !== bytes) {
    throw new SparseMlaError('INVALID_SHAPE', `${name}.data: expected ${bytes} bytes, got ${cache.data?.byteLength}`, name);
  }
}

/** Byte positions of token `tokenId` (page·P + slot for v4). */
export function tokenLayoutReference(cache: Pick<KvCache, 'format' | 'pageSize'>, tokenId: number): TokenLayout {
  if (cache.format === 'v4') {
    const P = cache.pageSize;
    const page = Math.floor(tokenId / P);
    const slot = tokenId - page * P;
    const base = page * v4PageBytesReference(P);
    const nope = base + slot * V4_LAYOUT.dataBytes;
    return { nope, rope: nope + V4_LAYOUT.nopeDims, scales: base + P * V4_LAYOUT.dataBytes + slot * V4_LAYOUT.scaleBytes };
  }
  const base = tokenId * V32_LAYOUT.bytesPerToken;
  return { nope: base, scales: base + V32_LAYOUT.quantDims, rope: base + V32_LAYOUT.quantDims + 4 * V32_LAYOUT.tiles };
}

/** Token ids as plain numbers, every one checked against the cache (OUT_OF_RANGE otherwise). */
export function normalizeTokenIds(tokenIds: TokenIds, limit: number, name = 'tokenIds'): number[] {
  const raw: ArrayLike<number | bigint> = Array.isArray(tokenIds) ? tokenIds : (tokenIds as Tensor<'int32'> | Tensor<'int64'>).data;
  const ids: number[] = new Array(raw.length);
  for (let i = 0; i < raw.length; i++) {
    const v = raw[i]!;
    const n = typeof v === 'bigint' ? (v >= 0n && v < BigInt(limit) ? Number(v) : -1) : v;
    if (!Number.isInteger(n) || n < 0 || n >= limit) {
      throw new SparseMlaError('OUT_OF_RANGE', `${name}[${i}]: expected a token id in [0, ${limit}), got ${String(v)}`, name);
    }
    ids[i] = n;
  }
  return ids;
}

/**
 * The tile exponent: the smallest integer e with 448·2^e ≥ max(amax, 1e-4), clamped to
 * [-127, 127]; an infinite amax gives 127. (NaN never reaches here: amax ignores NaN.)
 */
export function tileExponentReference(amax: number): number {
  if (amax === Infinity) return 127;
  const m = Math.max(amax, 1e-4);
  let e = exponentOf(m) - 9;
  while (448 * 2 ** e < m) e++;
  return Math.min(Math.max(e, -127), 127);
}

/** One element of an input row: its value and its sign bit (kept separately so NaN keeps its sign). */
interface RowReader {
  value(i: number): number;
  negative(i: number): boolean;
  /** the element as a bf16 bit pattern (bf16 rows: unchanged; float32 rows: RNE) */
  bf16Bits(i: number): number;
}

function rowReader(rows: Tensor<'bf16'> | Tensor<'float32'>, row: number, width: number): RowReader {
  const base = row * width;
  if (rows.dtype === 'bf16') {
    const d = rows.data as Uint16Array;
    return {
      value: (i) => decodeBf16(d[base + i]!),
      negative: (i) => (d[base + i]! & 0x8000) !== 0,
      bf16Bits: (i) => d[base + i]!,
    };
  }
  const f = rows.data as Float32Array;
  const bits = new Uint32Array(f.buffer, f.byteOffset, f.length);
  return {
    value: (i) => f[base + i]!,
    negative: (i) => (bits[base + i]! & 0x80000000) !== 0,
    bf16Bits: (i) => {
      const x = f[base + i]!;
      // keep the sign of a NaN from the float32 bits, as float64 conversion need not
      return Number.isNaN(x) ? (((bits[base + i]! >>> 31) << 15) | 0x7fc0) : encodeBf16(x);
    },
  };
}

/** Quantize the `count` elements at `start` as one tile into e4m3 bytes; returns the exponent e. */
function quantizeTile(src: RowReader, start: number, count: number, dst: Uint8Array, dstOff: number): number {
  let amax = 0;
  for (let j = 0; j < count; j++) {
    const a = Math.abs(src.value(start + j));
    if (a > amax) amax = a; // NaN compares false: ignored
  }
  const e = tileExponentReference(amax);
  const scale = 2 ** e;
  for (let j = 0; j < count; j++) {
    const x = src.value(start + j);
    if (Number.isNaN(x)) {
      dst[dstOff + j] = (src.negative(start + j) ? 0x80 : 0) | 0x7f;
    } else {
      // x / 2^e is exact in float64; encodeE4m3 clamps to ±448 and rounds to nearest even
      dst[dstOff + j] = encodeE4m3(x / scale);
    }
  }
  return e;
}

/**
 * Quantize `rows` ([n, 512] for v4, [n, 576] for v32; bf16 or float32) into the given token ids
 * of `cache`, in place. Rope dims are stored as bf16 (float32 rows are rounded to nearest even).
 */
export function quantizeKCacheReference(cache: KvCache, tokenIds: TokenIds, rows: Tensor<'bf16'> | Tensor<'float32'>): void {
  checkCacheReference(cache);
  const ids = normalizeTokenIds(tokenIds, cacheTokenCount(cache));
  const width = cacheRowDims(cache.format);
  if (rows.shape.length !== 2 || rows.shape[0] !== ids.length || rows.shape[1] !== width) {
    throw new SparseMlaError('INVALID_SHAPE', `rows: expected [${ids.length}, ${width}], got [${rows.shape.join(', ')}]`, 'rows');
  }
  const out = cache.data;
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let r = 0; r < ids.length; r++) {
    const src = rowReader(rows, r, width);
    const at = tokenLayoutReference(cache, ids[r]!);
    if (cache.format === 'v4') {
      for (let t = 0; t < V4_LAYOUT.tiles; t++) {
        const e = quantizeTile(src, t * V4_LAYOUT.tile, V4_LAYOUT.tile, out, at.nope + t * V4_LAYOUT.tile);
        out[at.scales + t] = e + 127;
      }
      out[at.scales + V4_LAYOUT.tiles] = 0; // pad byte
      for (let j = 0; j < V4_LAYOUT.ropeDims; j++) dv.setUint16(at.rope + 2 * j, src.bf16Bits(V4_LAYOUT.nopeDims + j), true);
    } else {
      for (let t = 0; t < V32_LAYOUT.tiles; t++) {
        const e = quantizeTile(src, t * V32_LAYOUT.tile, V32_LAYOUT.tile, out, at.nope + t * V32_LAYOUT.tile);
        dv.setFloat32(at.scales + 4 * t, 2 ** e, true);
      }
      for (let j = 0; j < V32_LAYOUT.ropeDims; j++) dv.setUint16(at.rope + 2 * j, src.bf16Bits(V32_LAYOUT.quantDims + j), true);
    }
  }
}

/**
 * Dequantize one token into dst[dstOff .. dstOff + rowDims) as values (each a bf16 value):
 * e4m3 · scale computed in float32, then rounded to bf16; rope copied.
 */
export function dequantizeTokenReference(cache: KvCache, tokenId: number, dst: Float64Array | Float32Array, dstOff: number): void {
  const bytes = cache.data;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const at = tokenLayoutReference(cache, tokenId);
  const L = cache.format === 'v4' ? V4_LAYOUT : V32_LAYOUT;
  const quantDims = cache.format === 'v4' ? V4_LAYOUT.nopeDims : V32_LAYOUT.quantDims;
  for (let t = 0; t < L.tiles; t++) {
    const scale = cache.format === 'v4' ? decodeUe8m0(bytes[at.scales + t]!) : dv.getFloat32(at.scales + 4 * t, true);
    for (let j = t * L.tile; j < (t + 1) * L.tile; j++) {
      // the float64 product of a 4-bit significand and a float32 is exact; fround is the float32 multiply
      dst[dstOff + j] = roundToBf16(Math.fround(decodeE4m3(bytes[at.nope + j]!) * scale));
    }
  }
  for (let j = 0; j < L.ropeDims; j++) dst[dstOff + quantDims + j] = decodeBf16(dv.getUint16(at.rope + 2 * j, true));
}

/** Dequantized rows of one cache, each token dequantized once, appended to a growing buffer. */
export class DequantizedRows {
  private readonly slot = new Map<number, number>();
  rows: Float32Array; // bf16 values, exact in float32
  private used = 0;

  constructor(private readonly cache: KvCache, private readonly width: number) {
    this.rows = new Float32Array(width * 64);
  }

  /** Offset of token `id`'s dequantized row in `rows`. */
  offsetOf(id: number): number {
    const have = this.slot.get(id);
    if (have !== undefined) return have;
    if (this.used + this.width > this.rows.length) {
      const grown = new Float32Array(this.rows.length * 2);
      grown.set(this.rows);
      this.rows = grown;
    }
    const off = this.used;
    dequantizeTokenReference(this.cache, id, this.rows, off);
    this.used += this.width;
    this.slot.set(id, off);
    return off;
  }
}

/** Gather-dequantize token ids → Float64Array [n, 512] (v4) or [n, 576] (v32) of bf16 values. */
export function dequantizeKCacheReference(cache: KvCache, tokenIds: TokenIds): Float64Array {
  checkCacheReference(cache);
  const ids = normalizeTokenIds(tokenIds, cacheTokenCount(cache));
  const width = cacheRowDims(cache.format);
  const out = new Float64Array(ids.length * width);
  for (let r = 0; r < ids.length; r++) dequantizeTokenReference(cache, ids[r]!, out, r * width);
  return out;
}
