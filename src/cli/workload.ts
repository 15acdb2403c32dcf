/**
 * The DeepSeek-V4-shaped prefill chunk that `run` and `bench` work on: one c4 layer (compress
 * ratio 4) of a request whose chunk of `queries` tokens follows `context` earlier tokens.
 *
 * Workspace (SPEC §6): the chunk's compressed rows first (every compressed entry visible at the
 * end of the chunk), then the SWA gather (the last `queries + window − 1` token positions).
 * Each query's index row: up to `topk` distinct random compressed entries among those visible
 * to it (the indexer's choice), then its causal window, padded with −1 to a multiple of 128;
 * `topkLength` holds the number of real entries. Every workspace row lives in one v4 paged cache
 * at a token id given by a shuffled page table.
 */
import { SparseMlaError } from '../errors.js';
import { float32ToBf16Bits, tensor } from '../tensor.js';
import type { Tensor } from '../types.js';

export const COMPRESS_RATIO = 4;
export const V4_ROW = 512;
export const V4_TOKEN_BYTES = 584;

export interface WorkloadShape {
  /** query tokens in the chunk (sQ) */
  queries: number;
  /** query heads (hQ) */
  heads: number;
  /** compressed entries per query chosen by the indexer */
  topk: number;
  /** sliding window W */
  window: number;
  /** tokens of the request before this chunk */
  context: number;
  /** v4 cache page size */
  pageSize: number;
  seed: number;
}

/** The shape from the workload options `run` and `bench` share (RUN_OPTIONS), as parsed. */
export function shapeFromOptions(o: { queries: number; heads: number; topk: number; window: number; context: number; 'page-size': number; seed: number }): WorkloadShape {
  return { queries: o.queries, heads: o.heads, topk: o.topk, window: o.window, context: o.context, pageSize: o['page-size'], seed: o.seed };
}

export const DQK = 512;
export const DV = 512;

/** A seeded xoshiro128** generator: reproducible inputs for a given --seed. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number) {
    // splitmix32 to spread the seed over the state
    let s = seed >>> 0;
    const next = (): number => {
      s = (s + 0x9e3779b9) | 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next() | 1;
  }

  u32(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return result;
  }

  /** uniform in [0, 1) with 24 random bits */
  float(): number {
    return (this.u32() >>> 8) * 2 ** -24;
  }

  /** uniform integer in [0, n) */
  int(n: number): number {
    return Math.floor(this.float() * n);
  }

  uniform(lo: number, hi: number): number {
    return lo + (hi - lo) * this.float();
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

export interface Workload {
  shape: WorkloadShape;
  /** compressed rows in the workspace */
  compressedRows: number;
  /** SWA rows in the workspace */
  windowRows: number;
  /** workspace rows = compressedRows + windowRows (sKV) */
  kvRows: number;
  /** width of an index row: roundUp(topk + window, 128) */
  width: number;
  numPages: number;
  /** cache token id of every workspace row */
  tokenIds: Int32Array;
  /** the rows written into the cache, bf16 [kvRows, 512] */
  rows: Tensor<'bf16'>;
  q: Tensor<'bf16'>;
  indices: Tensor<'int32'>;
  topkLength: Tensor<'int32'>;
  attnSink: Tensor<'float32'>;
  smScale: number;
  /** Σ topkLength over all queries (for the FLOP count) */
  totalEntries: number;
}

/** FLOPs of sparsePrefill (SPEC §4): 2 · Σ topkLength · hQ · (dQK + dV). */
export function prefillFlops(entries: number, heads: number): number {
  return 2 * entries * heads * (DQK + DV);
}

/** Bytes a dequant of n tokens reads (584 per v4 token) and writes (512 bf16 per row). */
export function dequantBytes(tokens: number): number {
  return tokens * (V4_TOKEN_BYTES + V4_ROW * 2);
}

/** Bytes a quantize of n bf16 rows reads and writes. */
export function quantizeBytes(tokens: number): number {
  return tokens * (V4_ROW * 2 + V4_TOKEN_BYTES);
}

/** Check sizes up front so a mistyped flag fails with a clear message, not an allocation error. */
export function checkShape(shape: WorkloadShape): void {
  const qElements = shape.queries * shape.heads * DQK;
  if (qElements > 2 ** 31 - 1) {
    throw new SparseMlaError('TOO_LARGE', `queries × heads × ${DQK} = ${qElements} elements is more than one q tensor can hold (2^31 − 1); use fewer --queries or --heads`, 'queries');
  }
  const kvRows = Math.floor((shape.context + shape.queries) / COMPRESS_RATIO) + Math.min(shape.context + shape.queries, shape.queries + shape.window - 1);
  if (kvRows > 2 ** 24) {
    throw new SparseMlaError('TOO_LARGE', `the workspace would hold ${kvRows} rows; use a smaller --context or --queries`, 'context');
  }
}

/** Random bf16 values uniform in [-a, a), rounded to nearest even (bulk form of float32ToBf16Bits). */
export function fillBf16(out: Uint16Array, rng: Rng, a: number): void {
  const chunk = new Float32Array(4096); // even, so the pairs never straddle chunks
  const bits = new Uint32Array(chunk.buffer);
  for (let start = 0; start < out.length; start += chunk.length) {
    const n = Math.min(chunk.length, out.length - start);
    // two 16-bit uniforms per draw: plenty of resolution for an 8-bit mantissa, half the draws
    const scale = (2 * a) / 65536;
    for (let i = 0; i < n; i += 2) {
      const u = rng.u32();
      chunk[i] = (u & 0xffff) * scale - a;
      chunk[i + 1] = (u >>> 16) * scale - a;
    }
    for (let i = 0; i < n; i++) {
      const u = bits[i]!; // finite by construction, so no NaN case
      out[start + i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
    }
  }
}

/** Random bf16 v4 rows [n, 512]: nope tiles of varied magnitude (so the per-tile ue8m0 scales differ), rope in [-1, 1). */
export function fillV4Rows(rows: Uint16Array, rng: Rng): void {
  const n = Math.floor(rows.length / V4_ROW);
  for (let r = 0; r < n; r++) {
    const base = r * V4_ROW;
    for (let tile = 0; tile < 7; tile++) {
      const mag = 2 ** (rng.int(5) - 3);
      for (let d = 0; d < 64; d++) rows[base + tile * 64 + d] = float32ToBf16Bits(rng.uniform(-mag, mag));
    }
    for (let d = 448; d < V4_ROW; d++) rows[base + d] = float32ToBf16Bits(rng.uniform(-1, 1));
  }
}

/** The workspace-side inputs: cache placement, rows to quantize, queries, indices and sink. */
export function buildWorkload(shape: WorkloadShape): Workload {
  checkShape(shape);
  const { queries, heads, topk, window, context, pageSize } = shape;
  const rng = new Rng(shape.seed);
  const seqLen = context + queries;
  const compressedRows = Math.floor(seqLen / COMPRESS_RATIO);
  const windowStart = seqLen - Math.min(seqLen, queries + window - 1);
  const windowRows = seqLen - windowStart;
  const kvRows = compressedRows + windowRows;
  const width = Math.max(128, Math.ceil((topk + window) / 128) * 128);

  // A page table with slack, shuffled, so the gather really jumps between pages.
  const numPages = Math.max(1, Math.ceil((kvRows * 5) / 4 / pageSize));
  const pages = new Int32Array(numPages);
  for (let i = 0; i < numPages; i++) pages[i] = i;
  for (let i = numPages - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = pages[i]!;
    pages[i] = pages[j]!;
    pages[j] = t;
  }
  const tokenIds = new Int32Array(kvRows);
  for (let r = 0; r < kvRows; r++) tokenIds[r] = pages[Math.floor(r / pageSize)]! * pageSize + (r % pageSize);

  const rows = new Uint16Array(kvRows * V4_ROW);
  fillV4Rows(rows, rng);

  // Queries: wide enough that the softmax is neither flat nor one-hot (logit std ≈ 1).
  const q = new Uint16Array(queries * heads * DQK);
  fillBf16(q, rng, 3);

  const indices = new Int32Array(queries * width).fill(-1);
  const topkLength = new Int32Array(queries);
  const stamp = new Int32Array(compressedRows);
  let totalEntries = 0;
  for (let i = 0; i < queries; i++) {
    const pos = context + i;
    const visible = Math.min(compressedRows, Math.floor((pos + 1) / COMPRESS_RATIO));
    const row = i * width;
    let n = 0;
    const want = Math.min(topk, visible);
    if (want === visible) {
      for (let j = 0; j < visible; j++) indices[row + n++] = j;
    } else {
      // distinct random picks; rejection is cheap while topk ≪ visible, else fall back to a scan
      while (n < want) {
        const j = rng.int(visible);
        if (stamp[j] === i + 1) continue;
        stamp[j] = i + 1;
        indices[row + n++] = j;
      }
    }
    const swaLen = Math.min(pos + 1, window);
    for (let p = pos - swaLen + 1; p <= pos; p++) indices[row + n++] = compressedRows + (p - windowStart);
    topkLength[i] = n;
    totalEntries += n;
  }

  // A sink per head, around the typical lse (ln 640 ≈ 6.5) so it visibly takes a share.
  const attnSink = new Float32Array(heads);
  for (let h = 0; h < heads; h++) attnSink[h] = rng.uniform(3, 9);

  return {
    shape,
    compressedRows,
    windowRows,
    kvRows,
    width,
    numPages,
    tokenIds,
    rows: tensor('bf16', [kvRows, V4_ROW], rows),
    q: tensor('bf16', [queries, heads, DQK], q),
    indices: tensor('int32', [queries, width], indices),
    topkLength: tensor('int32', [queries], topkLength),
    attnSink: tensor('float32', [heads], attnSink),
    smScale: 1 / Math.sqrt(DQK),
    totalEntries,
  };
}

/** Queries [start, end) of a prefill input, as views (no copies). */
export function sliceQueries(w: Workload, start: number, end: number): { q: Tensor<'bf16'>; indices: Tensor<'int32'>; topkLength: Tensor<'int32'> } {
  const { heads } = w.shape;
  const n = end - start;
  return {
    q: tensor('bf16', [n, heads, DQK], w.q.data.subarray(start * heads * DQK, end * heads * DQK)),
    indices: tensor('int32', [n, w.width], w.indices.data.subarray(start * w.width, end * w.width)),
    topkLength: tensor('int32', [n], w.topkLength.data.subarray(start, end)),
  };
}

/** `count` distinct query indices spread over [0, queries): first, last and random ones, sorted. */
export function sampleQueries(queries: number, count: number, seed: number): number[] {
  if (count >= queries) return Array.from({ length: queries }, (_, i) => i);
  const rng = new Rng(seed ^ 0x5bd1e995);
  const chosen = new Set<number>();
  if (count >= 1) chosen.add(0);
  if (count >= 2) chosen.add(queries - 1);
  while (chosen.size < count) chosen.add(rng.int(queries));
  return [...chosen].sort((a, b) => a - b);
}
