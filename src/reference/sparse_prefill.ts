/**
 * Float64 reference of the sparse prefill forward (SPEC §4), written from the SPEC, independent of
 * the C++ core. Logits, softmax and the weighted sum are all float64; inputs are the bf16 values.
 */
import { SparseMlaError } from '../errors.js';
import type { SparsePrefillArgs, Tensor } from '../types.js';

export interface ReferenceOptions {
  /** Compute only these query rows (in this order); default: every row. */
  queries?: readonly number[];
}

export interface ReferenceAttentionResult {
  /** [nq, hQ, dV] */
  out: Float64Array;
  /**
   * [nq, hQ, dV]: Σ_k w_k·|v_k| with out's own weights w_k = exp(P_k − lse′), the scale of an out
   * element's rounding error in a bf16 kernel (≥ |out|; 0 where out is 0 by the sink or no entry)
   */
  mag: Float64Array;
  /** [nq, hQ]; +inf where a query has no valid entry */
  lse: Float64Array;
  /** [nq, hQ]; -inf where a query has no valid entry */
  maxLogits: Float64Array;
}

/** Zeroed float64 outputs for nq queries × hQ heads × dV columns (mag beside out). */
export function emptyAttentionResult(nq: number, hQ: number, dV: number): ReferenceAttentionResult {
  return { out: new Float64Array(nq * hQ * dV), mag: new Float64Array(nq * hQ * dV), lse: new Float64Array(nq * hQ), maxLogits: new Float64Array(nq * hQ) };
}

/** bf16 bits → float32 values (exact widening). */
export function widenBf16(bits: Uint16Array): Float32Array {
  const u = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i]! << 16;
  return new Float32Array(u.buffer);
}

function bad(code: 'INVALID_SHAPE' | 'INVALID_DTYPE' | 'INVALID_VALUE', arg: string, expected: string, got: string): never {
  throw new SparseMlaError(code, `${arg}: expected ${expected}, got ${got}`, arg);
}

const shapeStr = (s: readonly number[]): string => `[${s.join(', ')}]`;

/** Index rows of a [n, topk] or [n, 1, topk] int32/int64 tensor, with their validity rule. */
export interface IndexSet {
  topk: number;
  /** number of leading entries of row i that may be valid (min(topk, topkLength[i]), ≥ 0) */
  limit(i: number): number;
  /** entry k of row i if 0 ≤ value < bound, else -1 */
  entry(i: number, k: number, bound: number): number;
}

export function indexSet(
  indices: Tensor<'int32'> | Tensor<'int64'>,
  topkLength: Tensor<'int32'> | null | undefined,
  rows: number,
  names: { indices: string; topkLength: string },
): IndexSet {
  if (indices.dtype !== 'int32' && indices.dtype !== 'int64') bad('INVALID_DTYPE', names.indices, 'int32 or int64', String((indices as Tensor).dtype));
  const s = indices.shape;
  const ok = (s.length === 2 && s[0] === rows) || (s.length === 3 && s[0] === rows && s[1] === 1);
  if (!ok) bad('INVALID_SHAPE', names.indices, `[${rows}, topk] or [${rows}, 1, topk]`, shapeStr(s));
  const topk = s[s.length - 1]!;
  if (topkLength !== undefined && topkLength !== null) {
    if (topkLength.dtype !== 'int32') bad('INVALID_DTYPE', names.topkLength, 'int32', String(topkLength.dtype));
    if (topkLength.shape.length !== 1 || topkLength.shape[0] !== rows) bad('INVALID_SHAPE', names.topkLength, `[${rows}]`, shapeStr(topkLength.shape));
  }
  const lens = topkLength?.data as Int32Array | undefined;
  const limit = (i: number): number => (lens ? Math.max(0, Math.min(topk, lens[i]!)) : topk);
  if (indices.dtype === 'int32') {
    const d = indices.data as Int32Array;
    return { topk, limit, entry: (i, k, bound) => { const v = d[i * topk + k]!; return v >= 0 && v < bound ? v : -1; } };
  }
  const d = indices.data as BigInt64Array;
  return {
    topk,
    limit,
    entry: (i, k, bound) => {
      const v = d[i * topk + k]!;
      return v >= 0n && v < BigInt(bound) ? Number(v) : -1;
    },
  };
}

/** q of either attention op: bf16 [rows, hQ, dQK], `dims` naming its dims in a refusal. */
export function checkQueryTensor(q: Tensor<'bf16'> | undefined, dims: string): [number, number, number] {
  if (q?.dtype !== 'bf16') bad('INVALID_DTYPE', 'q', 'bf16', valueStr(q?.dtype));
  const [sQ, hQ, dQK] = checkBf16Tensor(q, 'q', 3, dims);
  return [sQ!, hQ!, dQK!];
}

/** A value as a message shows it (a Symbol or an object without a string form included). */
function valueStr(v: unknown): string {
  if (typeof v === 'symbol') return 'a Symbol';
  if (typeof v === 'object' && v !== null) return 'an object';
  return String(v);
}

/** An op's arguments: an object (null or a number would fail as a TypeError on its first field). */
export function checkArgsRecord(args: unknown, name = 'args'): void {
  if (typeof args !== 'object' || args === null) bad('INVALID_VALUE', name, 'an object of named arguments', valueStr(args));
}

/**
 * A bf16 tensor's shape (`rank` non-negative integers, spelled `dims` in a message) and its data: a
 * Uint16Array of exactly the shape's element count (a shorter one would read undefined as NaN).
 */
function checkBf16Tensor(t: Tensor<'bf16'>, name: string, rank: number, dims: string): number[] {
  const shape: unknown = t.shape;
  if (!Array.isArray(shape) || shape.length !== rank || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
    bad('INVALID_SHAPE', name, dims, Array.isArray(shape) ? `[${shape.map(valueStr).join(', ')}]` : valueStr(shape));
  }
  const dimsOf = shape as number[];
  const count = dimsOf.reduce((a, b) => a * b, 1);
  if (!(t.data instanceof Uint16Array) || t.data.length !== count) {
    bad('INVALID_VALUE', `${name}.data`, `a Uint16Array of ${count} elements`, t.data instanceof Uint16Array ? `${t.data.length} elements` : valueStr(t.data));
  }
  return dimsOf;
}

/** dV of either attention op (default 512): an integer in [1, dQK]. */
export function checkDv(dV: number | undefined, dQK: number): number {
  const v = dV ?? 512;
  if (!Number.isInteger(v) || v < 1 || v > dQK) bad('INVALID_VALUE', 'dV', `an integer in [1, ${dQK}]`, String(v));
  return v;
}

/** smScale of either attention op: any finite number (the float64 math needs no more; the ops also bound it, src/ops/common.ts). */
export function checkSmScale(smScale: number): void {
  if (!Number.isFinite(smScale)) bad('INVALID_VALUE', 'smScale', 'a finite number', String(smScale));
}

export function checkQueries(queries: readonly number[] | undefined, n: number): number[] {
  if (queries === undefined) return Array.from({ length: n }, (_, i) => i);
  for (const qi of queries) if (!Number.isInteger(qi) || qi < 0 || qi >= n) bad('INVALID_VALUE', 'queries', `integers in [0, ${n})`, String(qi));
  return [...queries];
}

/** An optional tensor given as null is absent, as the ops take it (src/ops/common.ts). */
export function checkSink(attnSink: Tensor<'float32'> | null | undefined, hQ: number, name = 'attnSink'): Float32Array | null {
  if (attnSink === undefined || attnSink === null) return null;
  if (attnSink.dtype !== 'float32') bad('INVALID_DTYPE', name, 'float32', String(attnSink.dtype));
  if (attnSink.shape.length !== 1 || attnSink.shape[0] !== hQ) bad('INVALID_SHAPE', name, `[${hQ}]`, shapeStr(attnSink.shape));
  return attnSink.data as Float32Array;
}

/** ln(exp(a) + exp(b)) without overflow; exact for the infinite cases of §4. */
export function logAddExp(a: number, b: number): number {
  if (Number.isNaN(a) || Number.isNaN(b)) return NaN;
  if (a === -Infinity) return b;
  if (b === -Infinity) return a;
  if (a === Infinity || b === Infinity) return Infinity;
  const hi = Math.max(a, b);
  return hi + Math.log1p(Math.exp(Math.min(a, b) - hi));
}

/**
 * Attend one query (all heads) over `n` gathered rows and write out/mag/lse/maxLogits for it.
 * q: [hQ, dQK] at qOff; rows[rowOffsets[k] .. + dQK) is entry k; the first dV dims are V.
 * out and mag share outOff. scratch must hold hQ·n float64.
 */
export function attendQueryReference(
  q: Float32Array,
  qOff: number,
  hQ: number,
  dQK: number,
  dV: number,
  rows: Float32Array | Float64Array,
  rowOffsets: Int32Array | readonly number[],
  n: number,
  smScale: number,
  sink: Float32Array | null,
  out: Float64Array,
  mag: Float64Array,
  outOff: number,
  lse: Float64Array,
  maxLogits: Float64Array,
  statOff: number,
  scratch: Float64Array,
): void {
  if (n === 0) {
    for (let h = 0; h < hQ; h++) {
      lse[statOff + h] = Infinity;
      maxLogits[statOff + h] = -Infinity;
    }
    out.fill(0, outOff, outOff + hQ * dV);
    mag.fill(0, outOff, outOff + hQ * dV);
    return;
  }
  // logits[h * n + k] = smScale · <q_h, row_k>, float64. Blocked as 2 rows × 4 heads so each loaded
  // value feeds several products: `verify` of a GPU-sized dump spends its time in this loop.
  let k = 0;
  for (; k + 2 <= n; k += 2) {
    const r0 = rowOffsets[k]!, r1 = rowOffsets[k + 1]!;
    let h = 0;
    for (; h + 4 <= hQ; h += 4) {
      const q0 = qOff + h * dQK, q1 = q0 + dQK, q2 = q1 + dQK, q3 = q2 + dQK;
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
      for (let d = 0; d < dQK; d++) {
        const x = rows[r0 + d]!, y = rows[r1 + d]!;
        const u0 = q[q0 + d]!, u1 = q[q1 + d]!, u2 = q[q2 + d]!, u3 = q[q3 + d]!;
        a0 += u0 * x; a1 += u1 * x; a2 += u2 * x; a3 += u3 * x;
        b0 += u0 * y; b1 += u1 * y; b2 += u2 * y; b3 += u3 * y;
      }
      const o = h * n + k;
      scratch[o] = smScale * a0; scratch[o + n] = smScale * a1; scratch[o + 2 * n] = smScale * a2; scratch[o + 3 * n] = smScale * a3;
      scratch[o + 1] = smScale * b0; scratch[o + n + 1] = smScale * b1; scratch[o + 2 * n + 1] = smScale * b2; scratch[o + 3 * n + 1] = smScale * b3;
    }
    for (; h < hQ; h++) {
      const q0 = qOff + h * dQK;
      let a0 = 0, b0 = 0;
      for (let d = 0; d < dQK; d++) {
        a0 += q[q0 + d]! * rows[r0 + d]!;
        b0 += q[q0 + d]! * rows[r1 + d]!;
      }
      scratch[h * n + k] = smScale * a0;
      scratch[h * n + k + 1] = smScale * b0;
    }
  }
  for (; k < n; k++) {
    const r0 = rowOffsets[k]!;
    for (let h = 0; h < hQ; h++) {
      const q0 = qOff + h * dQK;
      let a0 = 0;
      for (let d = 0; d < dQK; d++) a0 += q[q0 + d]! * rows[r0 + d]!;
      scratch[h * n + k] = smScale * a0;
    }
  }

  // per head: maxLogits, lse, then the logits become the weights exp(P_k − lse′)
  for (let h = 0; h < hQ; h++) {
    const lo = h * n;
    let m = -Infinity;
    for (let j = 0; j < n; j++) m = Math.max(m, scratch[lo + j]!); // NaN propagates
    let l: number;
    if (!Number.isFinite(m)) {
      // NaN or +inf: the sum is that; −inf (every valid logit −inf): Σ exp = 0, ln 0 = −inf
      l = m;
    } else {
      let s = 0;
      for (let j = 0; j < n; j++) s += Math.exp(scratch[lo + j]! - m);
      l = m + Math.log(s);
    }
    maxLogits[statOff + h] = m;
    lse[statOff + h] = l;
    const lPrime = sink ? logAddExp(l, sink[h]!) : l;
    for (let j = 0; j < n; j++) scratch[lo + j] = Math.exp(scratch[lo + j]! - lPrime);
  }

  // out[h, :] = Σ_k w[h, k] · row_k[:dV] and mag[h, :] = Σ_k w[h, k] · |row_k[:dV]|, blocked as
  // 4 heads × 4 rows
  out.fill(0, outOff, outOff + hQ * dV);
  mag.fill(0, outOff, outOff + hQ * dV);
  let h = 0;
  for (; h + 4 <= hQ; h += 4) {
    const o0 = outOff + h * dV, o1 = o0 + dV, o2 = o1 + dV, o3 = o2 + dV;
    let j = 0;
    for (; j + 4 <= n; j += 4) {
      const a = h * n + j, b = a + n, c = b + n, e = c + n;
      const w0 = scratch[a]!, w1 = scratch[a + 1]!, w2 = scratch[a + 2]!, w3 = scratch[a + 3]!;
      const v0 = scratch[b]!, v1 = scratch[b + 1]!, v2 = scratch[b + 2]!, v3 = scratch[b + 3]!;
      const s0 = scratch[c]!, s1 = scratch[c + 1]!, s2 = scratch[c + 2]!, s3 = scratch[c + 3]!;
      const t0 = scratch[e]!, t1 = scratch[e + 1]!, t2 = scratch[e + 2]!, t3 = scratch[e + 3]!;
      const r0 = rowOffsets[j]!, r1 = rowOffsets[j + 1]!, r2 = rowOffsets[j + 2]!, r3 = rowOffsets[j + 3]!;
      for (let d = 0; d < dV; d++) {
        const x0 = rows[r0 + d]!, x1 = rows[r1 + d]!, x2 = rows[r2 + d]!, x3 = rows[r3 + d]!;
        const a0 = Math.abs(x0), a1 = Math.abs(x1), a2 = Math.abs(x2), a3 = Math.abs(x3);
        out[o0 + d]! += w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3;
        out[o1 + d]! += v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3;
        out[o2 + d]! += s0 * x0 + s1 * x1 + s2 * x2 + s3 * x3;
        out[o3 + d]! += t0 * x0 + t1 * x1 + t2 * x2 + t3 * x3;
        mag[o0 + d]! += w0 * a0 + w1 * a1 + w2 * a2 + w3 * a3;
        mag[o1 + d]! += v0 * a0 + v1 * a1 + v2 * a2 + v3 * a3;
        mag[o2 + d]! += s0 * a0 + s1 * a1 + s2 * a2 + s3 * a3;
        mag[o3 + d]! += t0 * a0 + t1 * a1 + t2 * a2 + t3 * a3;
      }
    }
    for (; j < n; j++) {
      const w0 = scratch[h * n + j]!, w1 = scratch[(h + 1) * n + j]!, w2 = scratch[(h + 2) * n + j]!, w3 = scratch[(h + 3) * n + j]!;
      const r0 = rowOffsets[j]!;
      for (let d = 0; d < dV; d++) {
        const x = rows[r0 + d]!, a = Math.abs(x);
        out[o0 + d]! += w0 * x;
        out[o1 + d]! += w1 * x;
        out[o2 + d]! += w2 * x;
        out[o3 + d]! += w3 * x;
        mag[o0 + d]! += w0 * a;
        mag[o1 + d]! += w1 * a;
        mag[o2 + d]! += w2 * a;
        mag[o3 + d]! += w3 * a;
      }
    }
  }
  for (; h < hQ; h++) {
    const o0 = outOff + h * dV;
    for (let j = 0; j < n; j++) {
      const w = scratch[h * n + j]!, r0 = rowOffsets[j]!;
      for (let d = 0; d < dV; d++) {
        const x = rows[r0 + d]!;
        out[o0 + d]! += w * x;
        mag[o0 + d]! += w * Math.abs(x);
      }
    }
  }
}

/** The shapes of a sparse prefill call, checked. */
export interface PrefillShapes {
  sQ: number;
  hQ: number;
  dQK: number;
  sKV: number;
  dV: number;
  topk: number;
}

export function checkSparsePrefillArgs(args: SparsePrefillArgs): PrefillShapes {
  checkArgsRecord(args);
  const { q, kv } = args;
  if (q?.dtype !== 'bf16') bad('INVALID_DTYPE', 'q', 'bf16', valueStr(q?.dtype));
  if (kv?.dtype !== 'bf16') bad('INVALID_DTYPE', 'kv', 'bf16', valueStr(kv?.dtype));
  const [sQ, hQ, dQK] = checkQueryTensor(q, '[sQ, hQ, dQK]');
  if (hQ < 1 || dQK < 1) bad('INVALID_SHAPE', 'q', 'hQ ≥ 1 and dQK ≥ 1', shapeStr(q.shape));
  const [sKV, kvDims] = checkBf16Tensor(kv, 'kv', 2, `[sKV, ${dQK}]`);
  if (kvDims !== dQK) bad('INVALID_SHAPE', 'kv', `[sKV, ${dQK}]`, shapeStr(kv.shape));
  const dV = checkDv(args.dV, dQK);
  checkSmScale(args.smScale);
  const set = indexSet(args.indices, args.topkLength, sQ, { indices: 'indices', topkLength: 'topkLength' });
  checkSink(args.attnSink, hQ);
  return { sQ, hQ, dQK, sKV, dV, topk: set.topk };
}

/** A prepared sparse prefill: widened inputs, so chunks of queries can be computed one by one. */
export interface PreparedSparsePrefill {
  shapes: PrefillShapes;
  /** compute the given query rows */
  run(queries: readonly number[]): ReferenceAttentionResult;
}

export function prepareSparsePrefillReference(args: SparsePrefillArgs): PreparedSparsePrefill {
  const shapes = checkSparsePrefillArgs(args);
  const { sQ, hQ, dQK, sKV, dV, topk } = shapes;
  // kv is widened once; q one query at a time (a GPU-sized q would not fit twice in memory)
  const kvf = widenBf16(args.kv.data);
  const qBits = args.q.data;
  const qRow = new Float32Array(hQ * dQK);
  const qRowBits = new Uint32Array(qRow.buffer);
  const set = indexSet(args.indices, args.topkLength, sQ, { indices: 'indices', topkLength: 'topkLength' });
  const sink = checkSink(args.attnSink, hQ);
  const scratch = new Float64Array(Math.max(1, hQ * topk));
  const offsets = new Int32Array(Math.max(1, topk));
  return {
    shapes,
    run(queries) {
      const qs = checkQueries(queries, sQ);
      const nq = qs.length;
      const res = emptyAttentionResult(nq, hQ, dV);
      for (let j = 0; j < nq; j++) {
        const i = qs[j]!;
        const base = i * hQ * dQK;
        for (let e = 0; e < hQ * dQK; e++) qRowBits[e] = qBits[base + e]! << 16;
        let n = 0;
        const lim = set.limit(i);
        for (let k = 0; k < lim; k++) {
          const idx = set.entry(i, k, sKV);
          if (idx >= 0) offsets[n++] = idx * dQK;
        }
        attendQueryReference(qRow, 0, hQ, dQK, dV, kvf, offsets, n, args.smScale, sink, res.out, res.mag, j * hQ * dV, res.lse, res.maxLogits, j * hQ, scratch);
      }
      return res;
    },
  };
}

/**
 * sparsePrefill in float64 from the bf16 inputs. With `queries`, only those rows are computed and
 * the result holds them in that order ([nq, hQ, dV] etc.).
 */
export function sparsePrefillReference(args: SparsePrefillArgs, opts: ReferenceOptions = {}): ReferenceAttentionResult {
  const prepared = prepareSparsePrefillReference(args);
  return prepared.run(checkQueries(opts.queries, prepared.shapes.sQ));
}
