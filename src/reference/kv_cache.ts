/**
 * Reference FP8 KV-cache layouts and per-token quantize / dequantize (SPEC §3), written from the
 * SPEC in float64 arithmetic, independent of the C++ core.
 */
import { SparseMlaError } from '../errors.js';
import type { KvCache, Tensor, TokenIds } from '../types.js';
import { allocFloat64, ArgumentReader, describeValue, isArray, readFinite, readInteger, readList, readName, readRecord, refuse, viewLength } from './checks.js';
import { decodeBf16, decodeE4m3, decodeUe8m0, encodeBf16, encodeE4m3, exponentOf, roundToBf16 } from './codecs.js';

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

/** x rounded up to a multiple of m (x finite, m finite and > 0). */
export function roundUp(x: number, m: number): number {
  readFinite(x, 'x');
  if (readFinite(m, 'm') <= 0) refuse('INVALID_VALUE', 'm', 'a finite number > 0', describeValue(m));
  return Math.ceil(x / m) * m;
}

/** A byte count or offset that is no safe integer is one no cache of this process can have. */
function safeSize(n: number, argument: string, what: string): number {
  if (!Number.isSafeInteger(n)) refuse('TOO_LARGE', argument, `${what} that is a safe integer (≤ 2^53 − 1)`, String(n));
  return n;
}

/** roundUp(P * 584, 576) of a checked page size. */
const v4PageBytes = (P: number): number => Math.ceil((P * V4_LAYOUT.bytesPerToken) / V4_LAYOUT.dataBytes) * V4_LAYOUT.dataBytes;

/** Bytes of one v4 page of `pageSize` tokens: roundUp(P * 584, 576). */
export function v4PageBytesReference(pageSize: number): number {
  return safeSize(v4PageBytes(readInteger(pageSize, 'pageSize', 1)), 'pageSize', 'a page of bytes');
}

function readFormat(format: unknown, argument: string): KvCache['format'] {
  if (format !== 'v4' && format !== 'v32') refuse('INVALID_VALUE', argument, "'v4' or 'v32'", describeValue(format));
  return format;
}

/**
 * pageSize (v32: 1, it is contiguous) and numPages of a format, checked (`prefix` names them: '' or
 * 'cache.'); the token count and the byte count safe integers (TOO_LARGE naming `sizeArgument`).
 */
function readGeometry(format: KvCache['format'], pageSize: unknown, numPages: unknown, prefix: string, sizeArgument: string): { pageSize: number; numPages: number; tokens: number; bytes: number } {
  const P = readInteger(pageSize, `${prefix}pageSize`, 1);
  if (format === 'v32' && P !== 1) refuse('INVALID_VALUE', `${prefix}pageSize`, '1 for a v32 cache (contiguous: numPages counts tokens)', String(P));
  const N = readInteger(numPages, `${prefix}numPages`, 0);
  const tokens = safeSize(P * N, sizeArgument, 'a token count');
  const bytes = safeSize(format === 'v4' ? N * v4PageBytes(P) : N * V32_LAYOUT.bytesPerToken, sizeArgument, 'a byte count');
  return { pageSize: P, numPages: N, tokens, bytes };
}

/** Total bytes a cache of this shape occupies. */
export function kvCacheBytesReference(format: KvCache['format'], pageSize: number, numPages: number): number {
  const f = readFormat(format, 'format');
  return readGeometry(f, pageSize, numPages, '', 'numPages').bytes;
}

/** A cache's format, pageSize and numPages, each read once and checked (its data not read). */
function readCacheGeometry(value: unknown, name: string): { format: KvCache['format']; pageSize: number; numPages: number; tokens: number; bytes: number; data: unknown } {
  const c = readRecord(value, name, 'a KV cache {format, pageSize, numPages, data}');
  const rawFormat: unknown = c.format, rawPageSize: unknown = c.pageSize, rawNumPages: unknown = c.numPages, data: unknown = c.data;
  const format = readFormat(rawFormat, `${name}.format`);
  return { format, ...readGeometry(format, rawPageSize, rawNumPages, `${name}.`, name), data };
}

/** Number of token ids a cache holds. */
export function cacheTokenCount(cache: KvCache): number {
  return readCacheGeometry(cache, 'cache').tokens;
}

const rowDims = (format: KvCache['format']): number => (format === 'v4' ? V4_LAYOUT.rowDims : V32_LAYOUT.rowDims);

/** Width of a dequantized row: 512 (v4) or 576 (v32). */
export function cacheRowDims(format: KvCache['format']): number {
  return rowDims(readFormat(format, 'format'));
}

/** A checked cache: its fields as read once, its data a plain view of exactly its bytes. */
export function readCache(value: unknown, name: string, reader: ArgumentReader): KvCache {
  const g = readCacheGeometry(value, name);
  // its bytes as the library reads the memory (intrinsics): a subclass's `length` getter may say otherwise
  const data = reader.array(g.data, `${name}.data`, ['Uint8Array'], g.bytes);
  return { format: g.format, pageSize: g.pageSize, numPages: g.numPages, data };
}

/**
 * A cache's format, geometry, and its data's byte length for its shape (SPEC §3); returns the
 * cache as checked (each field read once, its data a plain view of the same memory).
 */
export function checkCacheReference(cache: KvCache, name = 'cache'): KvCache {
  const reader = new ArgumentReader();
  const checked = readCache(cache, readName(name, 'cache'), reader);
  reader.whole();
  return checked;
}

/** Byte positions of token `tokenId` (page·P + slot for v4) of a checked format and page size. */
function layoutOf(format: KvCache['format'], P: number, tokenId: number): TokenLayout {
  if (format === 'v4') {
    const page = Math.floor(tokenId / P);
    const slot = tokenId - page * P;
    const base = page * v4PageBytes(P);
    const nope = base + slot * V4_LAYOUT.dataBytes;
    return { nope, rope: nope + V4_LAYOUT.nopeDims, scales: base + P * V4_LAYOUT.dataBytes + slot * V4_LAYOUT.scaleBytes };
  }
  const base = tokenId * V32_LAYOUT.bytesPerToken;
  return { nope: base, scales: base + V32_LAYOUT.quantDims, rope: base + V32_LAYOUT.quantDims + 4 * V32_LAYOUT.tiles };
}

/** Byte positions of token `tokenId` (page·P + slot for v4). */
export function tokenLayoutReference(cache: Pick<KvCache, 'format' | 'pageSize'>, tokenId: number): TokenLayout {
  const c = readRecord(cache, 'cache', 'a KV cache {format, pageSize}');
  const rawFormat: unknown = c.format, rawPageSize: unknown = c.pageSize;
  const format = readFormat(rawFormat, 'cache.format');
  const { pageSize } = readGeometry(format, rawPageSize, 0, 'cache.', 'cache');
  const at = layoutOf(format, pageSize, readInteger(tokenId, 'tokenId'));
  for (const v of [at.nope, at.rope, at.scales]) safeSize(v, 'tokenId', 'a byte offset');
  return at;
}

/** Token ids as plain numbers, every one checked against the cache (OUT_OF_RANGE otherwise). */
export function normalizeTokenIds(tokenIds: TokenIds, limit: number, name = 'tokenIds'): number[] {
  const reader = new ArgumentReader();
  const ids = readTokenIds(tokenIds, readInteger(limit, 'limit'), readName(name, 'tokenIds'), reader);
  reader.whole();
  return ids;
}

/**
 * Token ids (an array of integers, or an int32 / int64 tensor [n]), each read once: INVALID_VALUE
 * for an id that is no integer, OUT_OF_RANGE for one outside [0, limit).
 */
function readTokenIds(tokenIds: unknown, limit: number, name: string, reader: ArgumentReader): number[] {
  let raw: ArrayLike<unknown>, n: number;
  if (isArray(tokenIds, name, 'token ids')) ({ values: raw, length: n } = readList(tokenIds, name, 'an array of token ids'));
  else {
    const t = reader.tensor(tokenIds, name, ['int32', 'int64'], (d) => (d === 'int32' ? 'Int32Array' : 'BigInt64Array'), 1, '[n]');
    // a copy: the ids checked are the ids used whatever later reads of the caller's objects do
    raw = t.data.slice();
    n = raw.length;
  }
  const ids: number[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const v: unknown = raw[i];
    const num = typeof v === 'bigint' ? (v >= 0n && v < BigInt(limit) ? Number(v) : -1) : v;
    if (typeof num !== 'number' || !Number.isInteger(num)) refuse('INVALID_VALUE', name, 'integer token ids', `${describeValue(v)} at position ${i}`);
    if (num < 0 || num >= limit) {
      throw new SparseMlaError('OUT_OF_RANGE', `${name}[${i}]: expected a token id in [0, ${limit}), got ${String(v)}`, name);
    }
    ids[i] = num;
  }
  return ids;
}

/**
 * The tile exponent: the smallest integer e with 448·2^e ≥ max(amax, 1e-4), clamped to
 * [-127, 127]; an infinite amax gives 127. A NaN or negative amax is no absolute maximum (the
 * quantizer's own amax skips NaN): refused.
 */
export function tileExponentReference(amax: number): number {
  if (typeof amax !== 'number' || !(amax >= 0)) refuse('INVALID_VALUE', 'amax', 'a number ≥ 0 (an absolute maximum; +inf allowed)', describeValue(amax));
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
  const reader = new ArgumentReader();
  const c = readCache(cache, 'cache', reader);
  const ids = readTokenIds(tokenIds, c.numPages * c.pageSize, 'tokenIds', reader);
  const width = rowDims(c.format);
  const r = reader.tensor(rows, 'rows', ['bf16', 'float32'], (d) => (d === 'bf16' ? 'Uint16Array' : 'Float32Array'), 2, `[${ids.length}, ${width}]`);
  if (r.shape[0] !== ids.length || r.shape[1] !== width) refuse('INVALID_SHAPE', 'rows', `[${ids.length}, ${width}]`, `[${r.shape.join(', ')}]`);
  reader.whole();
  // rows copied: rows whose memory is the cache's own would otherwise read bytes this call wrote
  const checked = { dtype: r.dtype, shape: r.shape, data: r.data.slice() } as Tensor<'bf16'> | Tensor<'float32'>;
  const out = c.data;
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let row = 0; row < ids.length; row++) {
    const src = rowReader(checked, row, width);
    const at = layoutOf(c.format, c.pageSize, ids[row]!);
    if (c.format === 'v4') {
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

/** Dequantize one token of a checked cache into dst[dstOff .. dstOff + rowDims) (see dequantizeTokenReference). */
function dequantizeToken(cache: KvCache, tokenId: number, dst: Float64Array | Float32Array, dstOff: number): void {
  const bytes = cache.data;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const at = layoutOf(cache.format, cache.pageSize, tokenId);
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

/**
 * Dequantize one token into dst[dstOff .. dstOff + rowDims) as values (each a bf16 value):
 * e4m3 · scale computed in float32, then rounded to bf16; rope copied.
 */
export function dequantizeTokenReference(cache: KvCache, tokenId: number, dst: Float64Array | Float32Array, dstOff: number): void {
  const reader = new ArgumentReader();
  const c = readCache(cache, 'cache', reader);
  const id = readInteger(tokenId, 'tokenId');
  if (id >= c.numPages * c.pageSize) refuse('OUT_OF_RANGE', 'tokenId', `a token id in [0, ${c.numPages * c.pageSize})`, String(id));
  const out = reader.array(dst, 'dst', ['Float64Array', 'Float32Array']);
  const width = rowDims(c.format);
  if (out.length < width) refuse('INVALID_SHAPE', 'dst', `at least ${width} elements (a ${c.format} row)`, `${out.length}`);
  // past dst's end the writes were dropped, silently
  const at = readInteger(dstOff, 'dstOff', 0, out.length - width);
  reader.whole();
  dequantizeToken(c, id, out, at);
}

/**
 * Dequantized rows of one cache, each token dequantized once, appended to a growing buffer. It reads
 * the cache's memory when a token is first asked for: a buffer the caller detached or shrank since it
 * was made is refused then (INVALID_VALUE naming cache.data), the rows already made kept.
 */
export class DequantizedRows {
  // a brand: offsetOf on anything else (unbound, a Proxy of one, an object inheriting from one) is refused
  readonly #made = true;
  private readonly slot = new Map<number, number>();
  rows: Float32Array; // bf16 values, exact in float32
  private used = 0;
  private readonly cache: KvCache;
  private readonly tokens: number;
  private readonly bytes: number;

  /** `width`: the cache's row width (cacheRowDims: 512 for v4, 576 for v32). */
  constructor(cache: KvCache, private readonly width: number) {
    this.cache = checkCacheReference(cache);
    const want = rowDims(this.cache.format);
    if (width !== want) refuse('INVALID_VALUE', 'width', `${want} (a ${this.cache.format} cache's row)`, describeValue(width));
    this.tokens = this.cache.numPages * this.cache.pageSize;
    this.bytes = this.cache.data.length;
    this.rows = new Float32Array(width * 64);
  }

  /** Offset of token `id`'s dequantized row in `rows`. */
  offsetOf(id: number): number {
    if (typeof this !== 'object' || this === null || !(#made in this)) refuse('INVALID_VALUE', 'this', 'a DequantizedRows (call it as rows.offsetOf(id))', describeValue(this));
    const have = this.slot.get(id);
    if (have !== undefined) return have;
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= this.tokens) {
      refuse(typeof id === 'number' && Number.isInteger(id) ? 'OUT_OF_RANGE' : 'INVALID_VALUE', 'id', `a token id in [0, ${this.tokens})`, describeValue(id));
    }
    // the cache's memory as checked when this was made (detached, it reads as no bytes: a DataView threw TypeError)
    if (viewLength(this.cache.data) !== this.bytes) refuse('INVALID_VALUE', 'cache.data', `the cache's ${this.bytes} bytes, whole while its rows are read`, 'a buffer detached or shrunk since the DequantizedRows was made');
    if (this.used + this.width > this.rows.length) {
      const grown = new Float32Array(this.rows.length * 2);
      grown.set(this.rows);
      this.rows = grown;
    }
    const off = this.used;
    dequantizeToken(this.cache, id, this.rows, off);
    this.used += this.width;
    this.slot.set(id, off);
    return off;
  }
}

/** Gather-dequantize token ids → Float64Array [n, 512] (v4) or [n, 576] (v32) of bf16 values. */
export function dequantizeKCacheReference(cache: KvCache, tokenIds: TokenIds): Float64Array {
  const reader = new ArgumentReader();
  const c = readCache(cache, 'cache', reader);
  const ids = readTokenIds(tokenIds, c.numPages * c.pageSize, 'tokenIds', reader);
  reader.whole();
  const width = rowDims(c.format);
  const out = allocFloat64(ids.length * width, 'tokenIds');
  for (let r = 0; r < ids.length; r++) dequantizeToken(c, ids[r]!, out, r * width);
  return out;
}
