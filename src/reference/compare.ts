/** Judging computed outputs against the float64 reference with the tolerances of SPEC §4. */

export interface Tolerance {
  /** absolute error bound */
  abs: number;
  /** relative error bound (|got − ref| / |ref|) */
  rel: number;
  /** bound on 1 − cosine similarity of the whole tensor, when given */
  cos?: number;
}

/** SPEC §4's accuracy table. */
export const TOLERANCES = {
  out: { abs: 8e-4, rel: 3.01 / 128, cos: 7e-6 },
  lse: { abs: 1e-6, rel: 2.01 / 65536 },
  maxLogits: { abs: 1e-6, rel: 2.01 / 65536 },
  pagedOut: { abs: 1e-3, rel: 2.01 / 128, cos: 5e-6 },
} as const satisfies Record<string, Tolerance>;

export interface Comparison {
  pass: boolean;
  /** elements compared */
  count: number;
  /** elements outside both the abs and the rel bound, or with a ±inf/NaN mismatch */
  failures: number;
  /** over elements where both are finite */
  maxAbsErr: number;
  maxRelErr: number;
  /** the element furthest outside its bound (smallest of abs/rel ratio), or −1 when count = 0 */
  worstIndex: number;
  /** got and ref at worstIndex (NaN when count = 0) */
  worstGot: number;
  worstRef: number;
  /** 1 − cos over the elements where both are finite (0 when both are all zero) */
  cosineGap: number;
  /** elements where ±inf / NaN differ in place or sign */
  infNanMismatch: number;
}

/**
 * 1 − cosine similarity of a and b over the positions where both are finite. Two zero vectors are
 * identical (gap 0); a zero vector against a non-zero one has gap 1.
 */
export function cosineGap(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!, y = b[i]!;
    if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  if (aa === 0 && bb === 0) return 0;
  if (aa === 0 || bb === 0) return 1;
  return 1 - ab / (Math.sqrt(aa) * Math.sqrt(bb));
}

/**
 * The comparison of §4 fed chunk by chunk (e.g. a few query rows at a time), so a tensor too large
 * to hold in float64 at once can still be judged as a whole. `indexOf` maps a chunk position to
 * the element's index in the whole tensor (for worstIndex).
 */
export class ComparisonAccumulator {
  private count = 0;
  private failures = 0;
  private mismatch = 0;
  private maxAbs = 0;
  private maxRel = 0;
  private worst = -1;
  private worstScore = -Infinity;
  private worstGot = NaN;
  private worstRef = NaN;
  private ab = 0;
  private aa = 0;
  private bb = 0;

  constructor(readonly tol: Tolerance) {}

  add(got: ArrayLike<number>, ref: ArrayLike<number>, indexOf: (i: number) => number = (i) => i): void {
    if (got.length !== ref.length) {
      throw new RangeError(`compareToReference: got has ${got.length} elements, ref has ${ref.length}`);
    }
    const { abs: absTol, rel: relTol } = this.tol;
    for (let i = 0; i < ref.length; i++) {
      const g = got[i]!, r = ref[i]!;
      let score: number;
      if (!Number.isFinite(r) || !Number.isFinite(g)) {
        const same = Number.isNaN(r) ? Number.isNaN(g) : g === r;
        if (same) {
          score = -1;
        } else {
          this.mismatch++;
          this.failures++;
          score = Infinity;
        }
      } else {
        this.ab += g * r;
        this.aa += g * g;
        this.bb += r * r;
        const abs = Math.abs(g - r);
        const rel = r === 0 ? (abs === 0 ? 0 : Infinity) : abs / Math.abs(r);
        if (abs > this.maxAbs) this.maxAbs = abs;
        if (rel > this.maxRel) this.maxRel = rel;
        score = Math.min(abs / absTol, rel / relTol);
        if (score > 1) this.failures++;
      }
      if (score > this.worstScore) {
        this.worstScore = score;
        this.worst = indexOf(i);
        this.worstGot = g;
        this.worstRef = r;
      }
    }
    this.count += ref.length;
  }

  result(): Comparison {
    const { ab, aa, bb } = this;
    const gap = aa === 0 && bb === 0 ? 0 : aa === 0 || bb === 0 ? 1 : 1 - ab / (Math.sqrt(aa) * Math.sqrt(bb));
    const cosOk = this.tol.cos === undefined || gap <= this.tol.cos;
    return {
      pass: this.failures === 0 && cosOk,
      count: this.count,
      failures: this.failures,
      maxAbsErr: this.maxAbs,
      maxRelErr: this.maxRel,
      worstIndex: this.worst,
      worstGot: this.worstGot,
      worstRef: this.worstRef,
      cosineGap: gap,
      infNanMismatch: this.mismatch,
    };
  }
}

/**
 * Elementwise: an element passes if |got − ref| ≤ abs or |got − ref| / |ref| ≤ rel; ±inf and NaN
 * must sit in the same places (same sign for inf). With `tol.cos`, 1 − cos of the whole tensor
 * (over the positions where both are finite) must also be ≤ cos.
 */
export function compareToReference(got: ArrayLike<number>, ref: ArrayLike<number>, tol: Tolerance): Comparison {
  const acc = new ComparisonAccumulator(tol);
  acc.add(got, ref);
  return acc.result();
}
