/**
 * Float64 reference of the sparse prefill forward (SPEC §4), written from the SPEC, independent of
 * the C++ core. Logits, softmax and the weighted sum are all float64; inputs are the bf16 values.
 */
import type { SparsePrefillArgs, Tensor } from '../types.js';
import { allocFloat64, allocScratch, ArgumentReader, describeValue, readFinite, readInteger, readList, readName, readNumber, readRecord, refuse, shapeText, type ReadTensor } from './checks.js';

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
  const n = readInteger(nq, 'nq'), h = readInteger(hQ, 'hQ'), d = readInteger(dV, 'dV');
  return { out: allocFloat64(n * h * d, 'nq'), mag: allocFloat64(n * h * d, 'nq'), lse: allocFloat64(n * h, 'nq'), maxLogits: allocFloat64(n * h, 'nq') };
}

/** bf16 bits of a checked Uint16Array → float32 values (exact widening). */
export function widenChecked(bits: Uint16Array): Float32Array {
  const u = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i]! << 16;
  return new Float32Array(u.buffer);
}

/** bf16 bits → float32 values (exact widening). */
export function widenBf16(bits: Uint16Array): Float32Array {
  const reader = new ArgumentReader();
  const view = reader.array(bits, 'bits', ['Uint16Array']);
  return widenChecked(view);
}

/** Index rows of a [n, topk] or [n, 1, topk] int32/int64 tensor, with their validity rule. */
export interface IndexSet {
  topk: number;
  /** number of leading entries of row i that may be valid (min(topk, topkLength[i]), ≥ 0) */
  limit(i: number): number;
  /** entry k of row i if 0 ≤ value < bound, else -1 */
  entry(i: number, k: number, bound: number): number;
}

const INDEX_NAMES = { indices: 'indices', topkLength: 'topkLength' };

/** indices and topkLength as read once: their dtype, shape and a plain view of their data. */
interface IndexTensors {
  indices: ReadTensor<Int32Array | BigInt64Array>;
  topkLength?: ReadTensor<Int32Array>;
}

function readIndexTensors(indices: unknown, topkLength: unknown, rows: number, names: { indices: string; topkLength: string }, reader: ArgumentReader): IndexTensors {
  const t = reader.tensor(indices, names.indices, ['int32', 'int64'], (d) => (d === 'int32' ? 'Int32Array' : 'BigInt64Array'), [2, 3], `[${rows}, topk] or [${rows}, 1, topk]`);
  const s = t.shape;
  if (s[0] !== rows || (s.length === 3 && s[1] !== 1)) refuse('INVALID_SHAPE', names.indices, `[${rows}, topk] or [${rows}, 1, topk]`, shapeText(s));
  // null is absent, as the ops take it (src/ops/common.ts)
  const lens = topkLength === undefined || topkLength === null ? undefined : reader.tensor(topkLength, names.topkLength, ['int32'], () => 'Int32Array', 1, `[${rows}]`);
  if (lens !== undefined && lens.shape[0] !== rows) refuse('INVALID_SHAPE', names.topkLength, `[${rows}]`, shapeText(lens.shape));
  return { indices: t, ...(lens ? { topkLength: lens } : {}) };
}

function indexSetOf({ indices: t, topkLength }: IndexTensors): IndexSet {
  const s = t.shape;
  const topk = s[s.length - 1]!;
  const lensData = topkLength?.data;
  const limit = (i: number): number => (lensData ? Math.max(0, Math.min(topk, lensData[i]!)) : topk);
  if (t.dtype === 'int32') {
    const d = t.data as Int32Array;
    return { topk, limit, entry: (i, k, bound) => { const v = d[i * topk + k]!; return v >= 0 && v < bound ? v : -1; } };
  }
  const d = t.data as BigInt64Array;
  return {
    topk,
    limit,
    entry: (i, k, bound) => {
      const v = d[i * topk + k]!;
      return v >= 0n && v < BigInt(bound) ? Number(v) : -1;
    },
  };
}

/** indices and topkLength read once (plain views of their whole data) into an IndexSet. */
export function readIndexSet(indices: unknown, topkLength: unknown, rows: number, names: { indices: string; topkLength: string }, reader: ArgumentReader): IndexSet {
  return indexSetOf(readIndexTensors(indices, topkLength, rows, names, reader));
}

export function indexSet(
  indices: Tensor<'int32'> | Tensor<'int64'>,
  topkLength: Tensor<'int32'> | null | undefined,
  rows: number,
  names: { indices: string; topkLength: string } = INDEX_NAMES,
): IndexSet {
  const n = readRecord(names, 'names', "an object {indices, topkLength} of argument names");
  const given = { indices: n.indices, topkLength: n.topkLength };
  if (typeof given.indices !== 'string' || typeof given.topkLength !== 'string') refuse('INVALID_VALUE', 'names', 'two strings {indices, topkLength}', `${describeValue(given.indices)}, ${describeValue(given.topkLength)}`);
  const reader = new ArgumentReader();
  const set = readIndexSet(indices, topkLength, readInteger(rows, 'rows'), given as { indices: string; topkLength: string }, reader);
  reader.whole();
  return set;
}

const BF16_DATA = (): 'Uint16Array' => 'Uint16Array';

/** q of either attention op, read once: bf16 [rows, hQ, dQK], `dims` naming its dims in a refusal. */
export function readQuery(q: unknown, dims: string, reader: ArgumentReader): ReadTensor<Uint16Array> {
  return reader.tensor(q, 'q', ['bf16'], BF16_DATA, 3, dims);
}

/** q of either attention op: bf16 [rows, hQ, dQK], `dims` naming its dims in a refusal. */
export function checkQueryTensor(q: Tensor<'bf16'> | undefined, dims: string): [number, number, number] {
  if (typeof dims !== 'string') refuse('INVALID_VALUE', 'dims', 'a string spelling q\'s dims', describeValue(dims));
  const reader = new ArgumentReader();
  const [sQ, hQ, dQK] = readQuery(q, dims, reader).shape;
  reader.whole();
  return [sQ!, hQ!, dQK!];
}

/** An op's arguments: an object (null or a number would fail as a TypeError on its first field). */
export function checkArgsRecord(args: unknown, name = 'args'): void {
  readRecord(args, readName(name, 'args'));
}

/** dV of either attention op (default 512; null is absent): an integer in [1, dQK]. */
export function checkDv(dV: number | undefined, dQK: number): number {
  const width = readInteger(dQK, 'dQK', 1);
  return readInteger(dV ?? 512, 'dV', 1, width);
}

/** smScale of either attention op: any finite number (the float64 math needs no more; the ops also bound it, src/ops/common.ts). */
export function checkSmScale(smScale: number): void {
  readFinite(smScale, 'smScale');
}

/** The most query rows a list of them may name (an Array's own limit). */
const MAX_QUERIES = 2 ** 32 - 1;

/** Query rows to compute (null / undefined: all n), each an integer in [0, n), copied. */
export function checkQueries(queries: readonly number[] | undefined | null, n: number): number[] {
  const rows = readInteger(n, 'n');
  if (queries === undefined || queries === null) {
    if (rows > MAX_QUERIES) refuse('TOO_LARGE', 'n', `at most ${MAX_QUERIES} query rows`, String(rows));
    return Array.from({ length: rows }, (_, i) => i);
  }
  const list = readList(queries, 'queries', `an array of integers in [0, ${rows})`);
  if (list.length > MAX_QUERIES) refuse('TOO_LARGE', 'queries', `at most ${MAX_QUERIES} query rows`, String(list.length));
  const out: number[] = new Array(list.length);
  for (let i = 0; i < list.length; i++) {
    const qi: unknown = list.values[i];
    // a primitive shown as String() shows it (verify's messages say `got 1.5`, `got Symbol(q)`)
    if (typeof qi !== 'number' || !Number.isInteger(qi) || qi < 0 || qi >= rows) refuse('INVALID_VALUE', 'queries', `integers in [0, ${rows})`, typeof qi === 'object' || typeof qi === 'function' ? describeValue(qi) : String(qi));
    out[i] = qi;
  }
  return out;
}

/** attnSink read once: float32 [hQ] (a plain view), or null when absent (null or undefined, as the ops take it). */
export function readSink(attnSink: unknown, hQ: number, name: string, reader: ArgumentReader): Float32Array | null {
  if (attnSink === undefined || attnSink === null) return null;
  const t = reader.tensor(attnSink, name, ['float32'], () => 'Float32Array', 1, `[${hQ}]`);
  if (t.shape[0] !== hQ) refuse('INVALID_SHAPE', name, `[${hQ}]`, shapeText(t.shape));
  return t.data;
}

/** An optional tensor given as null is absent, as the ops take it (src/ops/common.ts). */
export function checkSink(attnSink: Tensor<'float32'> | null | undefined, hQ: number, name = 'attnSink'): Float32Array | null {
  const reader = new ArgumentReader();
  const sink = readSink(attnSink, readInteger(hQ, 'hQ'), readName(name, 'attnSink'), reader);
  reader.whole();
  return sink;
}

/** The options of a reference call: an object, or null / undefined for none. */
export function readOptions(opts: unknown): { queries?: unknown } {
  if (opts === undefined || opts === null) return {};
  const o = readRecord(opts, 'opts', 'an options object {queries?}');
  return { queries: o.queries };
}

/** ln(exp(a) + exp(b)) without overflow; exact for the infinite cases of §4. */
export function logAddExp(a: number, b: number): number {
  readNumber(a, 'a');
  readNumber(b, 'b');
  if (Number.isNaN(a) || Number.isNaN(b)) return NaN;
  if (a === -Infinity) return b;
  if (b === -Infinity) return a;
  if (a === Infinity || b === Infinity) return Infinity;
  const hi = Math.max(a, b);
  return hi + Math.log1p(Math.exp(Math.min(a, b) - hi));
}

const INT32_MAX = 2 ** 31 - 1;

/** A span of a typed array's memory that a call reads or writes. */
interface Span {
  name: string;
  view: ArrayBufferView;
  /** first element and element count */
  at: number;
  count: number;
}

/** Whether two spans share bytes. */
function overlap(a: Span, b: Span): boolean {
  if (a.view.buffer !== b.view.buffer || a.count === 0 || b.count === 0) return false;
  const [a0, b0] = [a, b].map((x) => x.view.byteOffset + x.at * (x.view as Float64Array).BYTES_PER_ELEMENT);
  const a1 = a0! + a.count * (a.view as Float64Array).BYTES_PER_ELEMENT, b1 = b0! + b.count * (b.view as Float64Array).BYTES_PER_ELEMENT;
  return a0! < b1 && b0! < a1;
}

/**
 * Attend one query (all heads) over `n` gathered rows and write out/mag/lse/maxLogits for it.
 * q: [hQ, dQK] at qOff; rows[rowOffsets[k] .. + dQK) is entry k; the first dV dims are V.
 * out and mag share outOff. scratch must hold hQ·n float64. Every offset and length is checked
 * against its array, and no written span may share memory with another span of the call.
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
  const reader = new ArgumentReader();
  const H = readInteger(hQ, 'hQ'), D = readInteger(dQK, 'dQK'), V = readInteger(dV, 'dV', 0, D), N = readInteger(n, 'n');
  const qv = reader.array(q, 'q', ['Float32Array']);
  const qAt = readInteger(qOff, 'qOff', 0, Math.max(0, qv.length - H * D));
  if (qv.length < H * D) refuse('INVALID_SHAPE', 'q', `at least hQ · dQK = ${H * D} elements`, String(qv.length));
  const rv = reader.array(rows, 'rows', ['Float32Array', 'Float64Array']);
  const list = readList(rowOffsets, 'rowOffsets', `an array of at least n = ${N} row offsets`);
  if (list.length < N) refuse('INVALID_SHAPE', 'rowOffsets', `at least n = ${N} offsets`, String(list.length));
  const offsets = new Int32Array(N);
  for (let k = 0; k < N; k++) {
    const v: unknown = list.values[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v + D > rv.length) refuse('INVALID_VALUE', 'rowOffsets', `offsets of whole rows in [0, ${rv.length - D}]`, `${describeValue(v)} at position ${k}`);
    if (v > INT32_MAX) refuse('TOO_LARGE', 'rowOffsets', `offsets that fit an int32 (at most ${INT32_MAX})`, `${v} at position ${k}`);
    offsets[k] = v;
  }
  const scale = readFinite(smScale, 'smScale');
  const sinkView = sink === null || sink === undefined ? null : reader.array(sink, 'sink', ['Float32Array']);
  if (sinkView !== null && sinkView.length < H) refuse('INVALID_SHAPE', 'sink', `at least hQ = ${H} elements`, String(sinkView.length));
  const ov = reader.array(out, 'out', ['Float64Array']), mv = reader.array(mag, 'mag', ['Float64Array']);
  const outAt = readInteger(outOff, 'outOff', 0, Math.max(0, Math.min(ov.length, mv.length) - H * V));
  if (Math.min(ov.length, mv.length) < H * V) refuse('INVALID_SHAPE', 'out', `out and mag of at least hQ · dV = ${H * V} elements`, `${ov.length} and ${mv.length}`);
  const lv = reader.array(lse, 'lse', ['Float64Array']), xv = reader.array(maxLogits, 'maxLogits', ['Float64Array']);
  const statAt = readInteger(statOff, 'statOff', 0, Math.max(0, Math.min(lv.length, xv.length) - H));
  if (Math.min(lv.length, xv.length) < H) refuse('INVALID_SHAPE', 'lse', `lse and maxLogits of at least hQ = ${H} elements`, `${lv.length} and ${xv.length}`);
  const sv = reader.array(scratch, 'scratch', ['Float64Array']);
  if (sv.length < H * N) refuse('INVALID_SHAPE', 'scratch', `at least hQ · n = ${H * N} elements`, String(sv.length));
  reader.whole();
  const written: Span[] = [
    { name: 'out', view: ov, at: outAt, count: H * V },
    { name: 'mag', view: mv, at: outAt, count: H * V },
    { name: 'lse', view: lv, at: statAt, count: H },
    { name: 'maxLogits', view: xv, at: statAt, count: H },
    { name: 'scratch', view: sv, at: 0, count: H * N },
  ];
  const read: Span[] = [{ name: 'q', view: qv, at: qAt, count: H * D }, { name: 'rows', view: rv, at: 0, count: rv.length }, ...(sinkView ? [{ name: 'sink', view: sinkView, at: 0, count: H }] : [])];
  written.forEach((w, i) => {
    for (const other of [...written.slice(i + 1), ...read]) if (overlap(w, other)) refuse('INVALID_VALUE', w.name, `memory apart from ${other.name}'s`, 'a span that shares bytes with it');
  });
  attendQueryChecked(qv, qAt, H, D, V, rv, offsets, N, scale, sinkView, ov, mv, outAt, lv, xv, statAt, sv);
}

/** attendQueryReference on checked arguments (the references' own calls). */
export function attendQueryChecked(
  q: Float32Array,
  qOff: number,
  hQ: number,
  dQK: number,
  dV: number,
  rows: Float32Array | Float64Array,
  rowOffsets: ArrayLike<number>,
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

/** A sparse prefill's arguments, each read once and checked: plain views of every array. */
interface CheckedSparsePrefill {
  shapes: PrefillShapes;
  q: Uint16Array;
  kv: Uint16Array;
  set: IndexSet;
  sink: Float32Array | null;
  smScale: number;
  /** the same as plain arguments (the reference pool hands them to its workers) */
  plain: SparsePrefillArgs;
}

export function readSparsePrefillArgs(args: unknown): CheckedSparsePrefill {
  const a = readRecord(args, 'args');
  const rawQ: unknown = a.q, rawKv: unknown = a.kv, rawIndices: unknown = a.indices, rawTopkLength: unknown = a.topkLength;
  const rawDv: unknown = a.dV, rawScale: unknown = a.smScale, rawSink: unknown = a.attnSink;
  const reader = new ArgumentReader();
  const q = readQuery(rawQ, '[sQ, hQ, dQK]', reader);
  const [sQ, hQ, dQK] = q.shape as [number, number, number];
  if (hQ < 1 || dQK < 1) refuse('INVALID_SHAPE', 'q', 'hQ ≥ 1 and dQK ≥ 1', shapeText(q.shape));
  const kv = reader.tensor(rawKv, 'kv', ['bf16'], BF16_DATA, 2, `[sKV, ${dQK}]`);
  const [sKV, kvDims] = kv.shape as [number, number];
  if (kvDims !== dQK) refuse('INVALID_SHAPE', 'kv', `[sKV, ${dQK}]`, shapeText(kv.shape));
  // row offsets idx · dQK are int32 (as int32 they keep the attention loop's loads integer-indexed)
  if ((sKV - 1) * dQK > INT32_MAX) refuse('TOO_LARGE', 'kv', `rows whose offsets idx · dQK fit an int32 (at most ${INT32_MAX})`, `${sKV} rows of ${dQK}`);
  const dV = readInteger(rawDv ?? 512, 'dV', 1, dQK);
  const smScale = readFinite(rawScale, 'smScale');
  const indexTensors = readIndexTensors(rawIndices, rawTopkLength, sQ, INDEX_NAMES, reader);
  const set = indexSetOf(indexTensors);
  const sink = readSink(rawSink, hQ, 'attnSink', reader);
  reader.whole();
  const plain = {
    q: q as Tensor<'bf16'>,
    kv: kv as Tensor<'bf16'>,
    indices: indexTensors.indices as Tensor<'int32'> | Tensor<'int64'>,
    ...(indexTensors.topkLength ? { topkLength: indexTensors.topkLength as Tensor<'int32'> } : {}),
    ...(sink ? { attnSink: { dtype: 'float32', shape: [hQ], data: sink } as Tensor<'float32'> } : {}),
    smScale,
    dV,
  };
  return { shapes: { sQ, hQ, dQK, sKV, dV, topk: set.topk }, q: q.data, kv: kv.data, set, sink, smScale, plain };
}

export function checkSparsePrefillArgs(args: SparsePrefillArgs): PrefillShapes {
  return readSparsePrefillArgs(args).shapes;
}

/** A prepared sparse prefill: widened inputs, so chunks of queries can be computed one by one. */
export interface PreparedSparsePrefill {
  shapes: PrefillShapes;
  /** compute the given query rows */
  run(queries: readonly number[]): ReferenceAttentionResult;
}

export function prepareSparsePrefillReference(args: SparsePrefillArgs): PreparedSparsePrefill {
  const { shapes, q: qBits, kv, set, sink, smScale } = readSparsePrefillArgs(args);
  const { sQ, hQ, dQK, sKV, dV, topk } = shapes;
  // kv is widened once; q one query at a time (a GPU-sized q would not fit twice in memory)
  const kvf = widenChecked(kv);
  // hQ is bounded by q's data only where q has rows
  const qRow = allocScratch(Float32Array, hQ * dQK, 'q');
  const qRowBits = new Uint32Array(qRow.buffer);
  const scratch = allocFloat64(Math.max(1, hQ * topk), 'indices');
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
        attendQueryChecked(qRow, 0, hQ, dQK, dV, kvf, offsets, n, smScale, sink, res.out, res.mag, j * hQ * dV, res.lse, res.maxLogits, j * hQ, scratch);
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
  return prepared.run(checkQueries(readOptions(opts).queries as readonly number[] | undefined, prepared.shapes.sQ));
}
