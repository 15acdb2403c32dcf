/**
 * The accuracy bounds of SPEC §4 (docs/SPEC.md, "Accuracy"), the one definition every judge uses:
 * the tests, `sparse-mla check`, `verify`, `run`'s check rows; the C++/CUDA check programs take
 * their formulas from here (README, "Accuracy").
 *
 * The bounds come from the error analysis of a bf16 kernel (weights rounded to bf16 before P·V,
 * float32 accumulation, output rounded to bf16), so they scale with the data:
 *
 *   out        |got − ref| ≤ outBound(mag)  = 2^-7 · mag + 1e-6,  mag = Σ_k w_k·|v_k| (reference weights)
 *              and over the whole tensor 1 − cos ≤ 7e-6, cos = 2⟨got,ref⟩ / (|got|² + |ref|²)
 *              over the elements where got or ref is at least 2^-126 (BF16_MIN_NORMAL)
 *   lse        |got − ref| ≤ lseBound(lse, maxLogits) = 1e-6 + 2^-15 · max(|ref lse|, |ref maxLogits|)
 *   maxLogits  |got − ref| ≤ maxLogitsBound(ref)     = 1e-6 + 2^-15 · |ref|
 *   ±inf / NaN in the same places as the reference (same sign for inf).
 *
 * 2^-7 = two bf16 roundings (2^-8 each: the weight before P·V, the output), both at most 2^-8 of
 * mag. 2^-15 = 256 float32 ulps of the larger of the two terms lse = maxLogits + ln Σ adds, which
 * is where float32 loses digits when the sum cancels. 1e-6 is an absolute floor for values near 0.
 * A comparison reports, per tensor, the worst ratio error / bound (pass ≤ 1) and where it is.
 */
import type { Tensor } from '../types.js';
import { allocFloat64, ANY_RANK, ArgumentReader, describeValue, readInteger, readList, readNumber, readRecord, refuse } from './checks.js';
import { decodeBf16 } from './codecs.js';

/** Relative part of the out bound: two bf16 roundings (unit roundoff 2^-8 each). */
export const OUT_MAG_FACTOR = 2 ** -7;
/** Relative part of the lse / maxLogits bounds: 256 float32 ulps. */
export const STAT_REL_FACTOR = 2 ** -15;
/** Absolute floor of every bound. */
export const ABS_FLOOR = 1e-6;
/** Bound on 1 − cos of the whole out tensor (cos as in cosineGap). */
export const OUT_COSINE_GAP_BOUND = 7e-6;
/**
 * bf16's (and float32's) smallest normal value. Below it bf16 has fixed steps of 2^-133, not 2^-8
 * of the value, and an output under 2^-133 rounds to 0: the cosine, which stands on bf16's relative
 * rounding, leaves out the elements where both got and ref are below it (they keep their
 * elementwise bound). Without this a tensor of such outputs (weights under e^-87, as when a sink
 * outweighs logits of −100) fails 1 − cos ≤ 7e-6 whatever a correct kernel does.
 */
export const BF16_MIN_NORMAL = 2 ** -126;

/** A reference value a bound is taken of: a number, not NaN (a NaN reference is judged by place, not by a bound). */
function boundInput(x: unknown, argument: string): number {
  if (typeof x !== 'number' || Number.isNaN(x)) refuse('INVALID_VALUE', argument, 'a number that is not NaN', describeValue(x));
  return x;
}

const outBoundOf = (mag: number): number => OUT_MAG_FACTOR * mag + ABS_FLOOR;
const lseBoundOf = (refLse: number, refMaxLogits: number): number =>
  ABS_FLOOR + STAT_REL_FACTOR * Math.max(Math.abs(refLse), Number.isFinite(refMaxLogits) ? Math.abs(refMaxLogits) : 0);
const maxLogitsBoundOf = (ref: number): number => ABS_FLOOR + STAT_REL_FACTOR * Math.abs(ref);

/** Largest allowed |got − ref| of an out element whose reference magnitude Σ w_k·|v_k| is `mag` (≥ 0). */
export function outBound(mag: number): number {
  if (boundInput(mag, 'mag') < 0) refuse('INVALID_VALUE', 'mag', 'a magnitude ≥ 0', String(mag));
  return outBoundOf(mag);
}

/** Largest allowed |got − ref| of an lse element, from the reference lse and maxLogits of that (query, head). */
export function lseBound(refLse: number, refMaxLogits: number): number {
  return lseBoundOf(boundInput(refLse, 'refLse'), boundInput(refMaxLogits, 'refMaxLogits'));
}

/** Largest allowed |got − ref| of a maxLogits element. */
export function maxLogitsBound(ref: number): number {
  return maxLogitsBoundOf(boundInput(ref, 'ref'));
}

/** A caller's list of numbers copied into float64, each element read once (INVALID_VALUE for one that is no number). */
function numbers(value: unknown, argument: string): Float64Array {
  const list = readList(value, argument, 'an array of numbers');
  const out = allocFloat64(list.length, argument);
  for (let i = 0; i < list.length; i++) {
    const v: unknown = list.values[i];
    if (typeof v !== 'number') refuse('INVALID_VALUE', argument, 'numbers', `${describeValue(v)} at position ${i}`);
    out[i] = v;
  }
  return out;
}

/**
 * 1 − cos with cos = 2⟨a,b⟩ / (|a|² + |b|²) over the positions where both are finite and at least
 * one is at least BF16_MIN_NORMAL in magnitude; computed as |a − b|² / (|a|² + |b|²), which equals
 * it and keeps its digits. Unlike the usual cosine it sees a scale error (b = 1.01·a gives 5e-5).
 * Nothing left to compare (all zero or below BF16_MIN_NORMAL): 0; zero against a normal value: 1.
 */
export function cosineGap(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const x = numbers(a, 'a'), y = numbers(b, 'b');
  if (x.length !== y.length) refuse('INVALID_SHAPE', 'b', `${x.length} elements, as a has`, String(y.length));
  const acc = new CosineAccumulator();
  for (let i = 0; i < x.length; i++) acc.add(x[i]!, y[i]!);
  return acc.gap();
}

class CosineAccumulator {
  private diff = 0;
  private norms = 0;
  add(g: number, r: number): void {
    if (!Number.isFinite(g) || !Number.isFinite(r)) return;
    if (Math.abs(g) < BF16_MIN_NORMAL && Math.abs(r) < BF16_MIN_NORMAL) return;
    this.diff += (g - r) * (g - r);
    this.norms += g * g + r * r;
  }
  gap(): number {
    return this.norms === 0 ? 0 : this.diff / this.norms;
  }
}

/** Where an element sits: its query (row of the whole tensor), head and, for out, column. */
export interface ElementPosition {
  query: number;
  head: number;
  col?: number;
}

export interface WorstElement {
  /** flat index in the whole tensor ([sQ, hQ, dV] or [sQ, hQ]) */
  index: number;
  at: ElementPosition;
  got: number;
  ref: number;
  /** |got − ref| (inf for a ±inf/NaN mismatch) */
  error: number;
  bound: number;
  ratio: number;
}

/** The verdict on one tensor. */
export interface TensorComparison {
  pass: boolean;
  /** elements compared */
  count: number;
  /** elements with error > bound, ±inf/NaN mismatches included */
  overBound: number;
  /** elements where ±inf / NaN differ in place or sign */
  infNanMismatch: number;
  /** largest error / bound (pass ≤ 1); inf with a ±inf/NaN mismatch; 0 when nothing was compared */
  worstRatio: number;
  /** the element of worstRatio, or null when nothing was compared */
  worst: WorstElement | null;
  /** largest |got − ref| over elements where both are finite */
  maxAbsErr: number;
  /** out only: 1 − cos of the whole tensor, and its bound */
  cosineGap?: number;
  cosineGapBound?: number;
}

/** One tensor's running verdict, fed element by element. */
class TensorJudge {
  private count = 0;
  private over = 0;
  private mismatch = 0;
  private maxAbs = 0;
  private worst: WorstElement | null = null;
  private readonly cos: CosineAccumulator | null;

  constructor(withCosine: boolean) {
    this.cos = withCosine ? new CosineAccumulator() : null;
  }

  /** col < 0: a per-(query, head) statistic */
  add(got: number, ref: number, bound: number, index: number, query: number, head: number, col: number): void {
    this.count++;
    let error: number, ratio: number;
    if (!Number.isFinite(ref) || !Number.isFinite(got)) {
      const same = Number.isNaN(ref) ? Number.isNaN(got) : got === ref;
      if (same) return;
      this.mismatch++;
      this.over++;
      error = Infinity;
      ratio = Infinity;
    } else {
      this.cos?.add(got, ref);
      error = Math.abs(got - ref);
      if (error > this.maxAbs) this.maxAbs = error;
      ratio = error / bound;
      if (!(ratio <= 1)) this.over++; // a NaN bound counts as over
    }
    if (this.worst === null || ratio > this.worst.ratio || (Number.isNaN(ratio) && !Number.isNaN(this.worst.ratio))) {
      this.worst = { index, at: col < 0 ? { query, head } : { query, head, col }, got, ref, error, bound, ratio };
    }
  }

  result(): TensorComparison {
    const cosineGap = this.cos?.gap();
    const cosOk = cosineGap === undefined || cosineGap <= OUT_COSINE_GAP_BOUND;
    return {
      pass: this.over === 0 && cosOk,
      count: this.count,
      overBound: this.over,
      infNanMismatch: this.mismatch,
      worstRatio: this.worst === null ? 0 : Number.isNaN(this.worst.ratio) ? Infinity : this.worst.ratio,
      worst: this.worst,
      maxAbsErr: this.maxAbs,
      ...(cosineGap !== undefined ? { cosineGap, cosineGapBound: OUT_COSINE_GAP_BOUND } : {}),
    };
  }
}

/** Outputs of an attention call, flattened: out [n, hQ, dV], lse and maxLogits [n, hQ]. */
export interface AttentionValues {
  out: ArrayLike<number>;
  lse: ArrayLike<number>;
  maxLogits: ArrayLike<number>;
}

/** An engine's attention result as tensors: out bf16 [n, hQ, dV], lse and maxLogits float32 [n, hQ]. */
export interface AttentionTensors {
  out: Tensor<'bf16'>;
  lse: Tensor<'float32'>;
  maxLogits: Tensor<'float32'>;
}

/** tensorValues of a tensor named `argument`. */
function valuesOf(t: unknown, argument: string, rows: unknown): Float64Array {
  const reader = new ArgumentReader();
  const tensor = reader.tensor(t, argument, ['bf16', 'float32'], (d) => (d === 'bf16' ? 'Uint16Array' : 'Float32Array'), ANY_RANK, '[rows, ...]');
  const rowLen = tensor.shape.slice(1).reduce((a, b) => a * b, 1);
  const pick = checkRows(rows, tensor.shape[0]!);
  reader.whole();
  const data = tensor.data;
  const out = allocFloat64(pick.length * rowLen, 'rows');
  for (let j = 0; j < pick.length; j++) {
    const base = pick[j]! * rowLen;
    for (let e = 0; e < rowLen; e++) {
      const v = data[base + e]!;
      out[j * rowLen + e] = tensor.dtype === 'bf16' ? decodeBf16(v) : v;
    }
  }
  return out;
}

/** Rows of a tensor's leading dim (default: all n), each an integer in [0, n), copied. */
function checkRows(rows: unknown, n: number): number[] {
  if (rows === undefined || rows === null) return Array.from({ length: n }, (_, i) => i);
  const list = readList(rows, 'rows', `an array of row numbers in [0, ${n})`);
  const pick: number[] = new Array(list.length);
  for (let i = 0; i < list.length; i++) {
    const v: unknown = list.values[i];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= n) refuse('INVALID_VALUE', 'rows', `row numbers in [0, ${n})`, `${describeValue(v)} at position ${i}`);
    pick[i] = v;
  }
  return pick;
}

/** A bf16 or float32 tensor's values (bf16 decoded exactly) on the leading-dim `rows`, in that order (default: every row). */
export function tensorValues(t: Tensor<'bf16'> | Tensor<'float32'>, rows?: readonly number[]): Float64Array {
  return valuesOf(t, 'tensor', rows);
}

/** An attention result's values on the query `rows` (default: every row): what the comparison takes as `got`. */
export function attentionValues(r: AttentionTensors, rows?: readonly number[]): AttentionValues {
  const res = readRecord(r, 'result', 'an attention result {out, lse, maxLogits}');
  const out: unknown = res.out, lse: unknown = res.lse, maxLogits: unknown = res.maxLogits;
  return { out: valuesOf(out, 'result.out', rows), lse: valuesOf(lse, 'result.lse', rows), maxLogits: valuesOf(maxLogits, 'result.maxLogits', rows) };
}

/**
 * What outputs are judged against: the float64 reference's out/lse/maxLogits and its `mag`
 * ([n, hQ, dV]). `mag` may instead be one number that is ≥ every element's mag — e.g. max |V| over
 * every row a query could attend, since the weights sum to ≤ 1 — to judge against another
 * engine's result on rows where the reference's weights are not at hand (a looser elementwise
 * bound; the cosine and lse/maxLogits bounds are unchanged).
 */
export interface BoundsReference extends AttentionValues {
  mag: ArrayLike<number> | number;
}

export interface AttentionComparison {
  pass: boolean;
  out: TensorComparison;
  lse: TensorComparison;
  maxLogits: TensorComparison;
}

export const ATTENTION_TENSORS = ['out', 'lse', 'maxLogits'] as const;

/**
 * Judges attention outputs against the reference with SPEC §4's bounds, fed a block of query rows
 * at a time (so a GPU-sized tensor never needs its float64 reference in memory at once).
 */
export class AttentionComparator {
  // a brand: add / result on anything else (unbound, a Proxy of one, an object inheriting from one) are refused
  readonly #made = true;
  private readonly out = new TensorJudge(true);
  private readonly lse = new TensorJudge(false);
  private readonly maxLogits = new TensorJudge(false);
  private rowsSeen = 0;

  readonly shape: { readonly heads: number; readonly dV: number };

  /** INVALID_VALUE naming `this` unless `self` is a comparator this class made. */
  static #own(self: unknown, method: string): void {
    if (typeof self !== 'object' || self === null || !(#made in self)) refuse('INVALID_VALUE', 'this', `an AttentionComparator (call it as comparator.${method})`, describeValue(self));
  }

  constructor(shape: { heads: number; dV: number }) {
    const s = readRecord(shape, 'shape', 'an object {heads, dV}');
    const heads: unknown = s.heads, dV: unknown = s.dV;
    this.shape = Object.freeze({ heads: readInteger(heads, 'shape.heads', 1), dV: readInteger(dV, 'shape.dV', 1) });
  }

  /**
   * got and ref hold the same rows; `queries[j]` is row j's query index in the whole tensor
   * (default: the rows follow those of the previous call). Every array is read once and checked
   * (sizes, numbers, mag ≥ 0 where it is not NaN) before the verdict takes any of it.
   */
  add(got: AttentionValues, ref: BoundsReference, queries?: readonly number[]): void {
    AttentionComparator.#own(this, 'add(got, ref)');
    const { heads, dV } = this.shape;
    const g = readRecord(got, 'got', 'attention values {out, lse, maxLogits}');
    const r = readRecord(ref, 'ref', 'reference values {out, lse, maxLogits, mag}');
    const rawGot = [g.out, g.lse, g.maxLogits], rawRef = [r.out, r.lse, r.maxLogits], rawMag: unknown = r.mag;
    const [gotOut, gotLse, gotMax] = rawGot.map((v, i) => numbers(v, `got.${ATTENTION_TENSORS[i]}`)) as [Float64Array, Float64Array, Float64Array];
    const [refOut, refLse, refMax] = rawRef.map((v, i) => numbers(v, `ref.${ATTENTION_TENSORS[i]}`)) as [Float64Array, Float64Array, Float64Array];
    let mag: Float64Array | number;
    if (typeof rawMag === 'number') {
      if (!(rawMag >= 0)) refuse('INVALID_VALUE', 'ref.mag', 'a magnitude ≥ 0 (or one per out element)', String(rawMag));
      mag = rawMag;
    } else {
      mag = numbers(rawMag, 'ref.mag');
      for (let i = 0; i < mag.length; i++) if (mag[i]! < 0) refuse('INVALID_VALUE', 'ref.mag', 'magnitudes ≥ 0', `${mag[i]} at position ${i}`);
    }
    const rows = refLse.length / heads;
    if (!Number.isInteger(rows)) refuse('INVALID_SHAPE', 'ref.lse', `a multiple of ${heads} heads`, `${refLse.length} elements`);
    const sizes: [string, number, number][] = [
      ['got.out', gotOut.length, rows * heads * dV],
      ['ref.out', refOut.length, rows * heads * dV],
      ['got.lse', gotLse.length, rows * heads],
      ['got.maxLogits', gotMax.length, rows * heads],
      ['ref.maxLogits', refMax.length, rows * heads],
    ];
    if (typeof mag !== 'number') sizes.push(['ref.mag', mag.length, rows * heads * dV]);
    for (const [name, have, want] of sizes) if (have !== want) refuse('INVALID_SHAPE', name, `${want} elements`, String(have));
    let given: number[] | undefined;
    if (queries !== undefined && queries !== null) {
      const list = readList(queries, 'queries', `${rows} query indices`);
      if (list.length !== rows) refuse('INVALID_SHAPE', 'queries', `${rows} query indices, one per row`, String(list.length));
      const most = Math.floor(Number.MAX_SAFE_INTEGER / (heads * dV)) - 1;
      given = [];
      for (let j = 0; j < list.length; j++) given.push(readInteger(list.values[j], 'queries', 0, most));
    } else if (this.rowsSeen + rows > Math.floor(Number.MAX_SAFE_INTEGER / (heads * dV))) {
      refuse('TOO_LARGE', 'got', 'rows whose element indices are safe integers', `${this.rowsSeen} + ${rows} rows`);
    }
    const queryOf = (j: number): number => (given ? given[j]! : this.rowsSeen + j);
    for (let j = 0; j < rows; j++) {
      const query = queryOf(j);
      for (let h = 0; h < heads; h++) {
        const s = j * heads + h;
        const refL = refLse[s]!, refM = refMax[s]!;
        const stat = query * heads + h;
        this.lse.add(gotLse[s]!, refL, lseBoundOf(refL, refM), stat, query, h, -1);
        this.maxLogits.add(gotMax[s]!, refM, maxLogitsBoundOf(refM), stat, query, h, -1);
        const o = s * dV;
        for (let c = 0; c < dV; c++) {
          const m = typeof mag === 'number' ? mag : mag[o + c]!;
          this.out.add(gotOut[o + c]!, refOut[o + c]!, outBoundOf(m), stat * dV + c, query, h, c);
        }
      }
    }
    this.rowsSeen += rows;
  }

  result(): AttentionComparison {
    AttentionComparator.#own(this, 'result()');
    const out = this.out.result(), lse = this.lse.result(), maxLogits = this.maxLogits.result();
    return { pass: out.pass && lse.pass && maxLogits.pass, out, lse, maxLogits };
  }
}

/** Judge whole outputs (or the rows `queries` of them) against the reference in one call. */
export function compareAttention(got: AttentionValues, ref: BoundsReference, shape: { heads: number; dV: number; queries?: readonly number[] }): AttentionComparison {
  const s = readRecord(shape, 'shape', 'an object {heads, dV, queries?}');
  const heads: unknown = s.heads, dV: unknown = s.dV, queries: unknown = s.queries;
  const c = new AttentionComparator({ heads, dV } as { heads: number; dV: number });
  c.add(got, ref, queries as readonly number[] | undefined);
  return c.result();
}

/** 2^-7 for 2 ** -7, else the number. */
function formatFactor(x: number): string {
  const e = Math.log2(x);
  return Number.isInteger(e) ? `2^${e}` : String(x);
}

/** The bounds in words, one line per tensor (each under 100 columns), for usage texts and reports. */
export function describeBounds(): string[] {
  const f = formatFactor, a = ABS_FLOOR.toExponential(0);
  return [
    `out: |err| <= ${f(OUT_MAG_FACTOR)}*mag + ${a}, mag = sum_k w_k*|v_k| (reference weights); 1-cos <= ${OUT_COSINE_GAP_BOUND.toExponential(0)}`,
    `lse: |err| <= ${a} + ${f(STAT_REL_FACTOR)}*max(|lse|, |maxLogits|) (reference values)`,
    `maxLogits: |err| <= ${a} + ${f(STAT_REL_FACTOR)}*|maxLogits|`,
    `+-inf and NaN where the reference has them`,
  ];
}

/**
 * A figure of a verdict (an error, a ratio, a value, 1 − cos): 3 significant digits, scientific
 * outside [1e-2, 1e4); inf, -inf and NaN spelled out. The comparison lines here and the CLI's
 * reports print their figures with it.
 */
export function formatFigure(x: number): string {
  readNumber(x, 'x');
  if (Number.isNaN(x)) return 'NaN';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (x === 0) return '0';
  return Math.abs(x) >= 1e-2 && Math.abs(x) < 1e4 ? x.toPrecision(3) : x.toExponential(2);
}

/** An element position read once: query and head integers ≥ 0, col one too when present. */
function readPosition(at: unknown, argument: string): ElementPosition {
  const p = readRecord(at, argument, 'a position {query, head, col?}');
  const query: unknown = p.query, head: unknown = p.head, col: unknown = p.col;
  return { query: readInteger(query, `${argument}.query`), head: readInteger(head, `${argument}.head`), ...(col === undefined ? {} : { col: readInteger(col, `${argument}.col`) }) };
}

/** `[q 3, h 17, c 200]`, or `-` when nothing was compared. */
export function formatPosition(at: ElementPosition | undefined | null): string {
  if (at === undefined || at === null) return '-';
  const p = readPosition(at, 'at');
  return `[q ${p.query}, h ${p.head}${p.col !== undefined ? `, c ${p.col}` : ''}]`;
}

/** A verdict's fields that a line shows, read once and checked. */
function readComparison(c: unknown, argument: string): TensorComparison {
  const r = readRecord(c, argument, 'a TensorComparison');
  const pass: unknown = r.pass, count: unknown = r.count, overBound: unknown = r.overBound, infNanMismatch: unknown = r.infNanMismatch;
  const worstRatio: unknown = r.worstRatio, worst: unknown = r.worst, maxAbsErr: unknown = r.maxAbsErr, gap: unknown = r.cosineGap, gapBound: unknown = r.cosineGapBound;
  if (typeof pass !== 'boolean') refuse('INVALID_VALUE', `${argument}.pass`, 'a boolean', describeValue(pass));
  let w: WorstElement | null = null;
  if (worst !== null && worst !== undefined) {
    const o = readRecord(worst, `${argument}.worst`, 'the worst element {at, got, ref, bound, ...}');
    const at: unknown = o.at, got: unknown = o.got, ref: unknown = o.ref, bound: unknown = o.bound, index: unknown = o.index, error: unknown = o.error, ratio: unknown = o.ratio;
    w = {
      at: readPosition(at, `${argument}.worst.at`),
      got: readNumber(got, `${argument}.worst.got`),
      ref: readNumber(ref, `${argument}.worst.ref`),
      bound: readNumber(bound, `${argument}.worst.bound`),
      index: index as number,
      error: error as number,
      ratio: ratio as number,
    };
  }
  return {
    pass,
    count: readInteger(count, `${argument}.count`),
    overBound: readInteger(overBound, `${argument}.overBound`),
    infNanMismatch: readInteger(infNanMismatch, `${argument}.infNanMismatch`),
    worstRatio: readNumber(worstRatio, `${argument}.worstRatio`),
    worst: w,
    maxAbsErr: maxAbsErr as number,
    ...(gap === undefined ? {} : { cosineGap: readNumber(gap, `${argument}.cosineGap`), cosineGapBound: readNumber(gapBound, `${argument}.cosineGapBound`) }),
  };
}

/** One line per tensor: worst ratio and where, got/ref/bound there, elements over, 1 − cos. */
export function formatTensorComparison(name: string, c: TensorComparison): string {
  if (typeof name !== 'string') refuse('INVALID_VALUE', 'name', 'a string', describeValue(name));
  return tensorLine(name, readComparison(c, 'c'));
}

function tensorLine(name: string, c: TensorComparison): string {
  const w = c.worst;
  const where = w ? ` at ${formatPosition(w.at)} (got ${formatFigure(w.got)}, ref ${formatFigure(w.ref)}, bound ${formatFigure(w.bound)})` : '';
  const cos = c.cosineGap !== undefined ? `, 1-cos ${formatFigure(c.cosineGap)} (bound ${formatFigure(c.cosineGapBound!)})` : '';
  const mism = c.infNanMismatch ? ` (${c.infNanMismatch} inf/NaN misplaced)` : '';
  return `${name}: worst ${formatFigure(c.worstRatio)} of bound${where}; ${c.overBound}/${c.count} over${mism}${cos}${c.pass ? '' : ' FAIL'}`;
}

/** The three tensors' lines joined with '; '. */
export function formatAttentionComparison(c: AttentionComparison): string {
  const r = readRecord(c, 'c', 'an AttentionComparison {out, lse, maxLogits}');
  const parts = ATTENTION_TENSORS.map((t) => [t, r[t]] as const);
  return parts.map(([t, v]) => tensorLine(t, readComparison(v, `c.${t}`))).join('; ');
}
