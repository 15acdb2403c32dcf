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
 * Elementwise: an element passes if |got − ref| ≤ abs or |got − ref| / |ref| ≤ rel; ±inf and NaN
 * must sit in the same places (same sign for inf). With `tol.cos`, 1 − cos of the whole tensor
 * must also be ≤ cos.
 */
export function compareToReference(got: ArrayLike<number>, ref: ArrayLike<number>, tol: Tolerance): Comparison {
  if (got.length !== ref.length) {
    throw new RangeError(`compareToReference: got has ${got.length} elements, ref has ${ref.length}`);
  }
  let failures = 0, mismatch = 0, maxAbs = 0, maxRel = 0;
  let worst = -1, worstScore = -Infinity;
  for (let i = 0; i < ref.length; i++) {
    const g = got[i]!, r = ref[i]!;
    let score: number;
    if (!Number.isFinite(r) || !Number.isFinite(g)) {
      const same = Number.isNaN(r) ? Number.isNaN(g) : g === r;
      if (same) continue;
      mismatch++;
      failures++;
      score = Infinity;
    } else {
      const abs = Math.abs(g - r);
      const rel = r === 0 ? (abs === 0 ? 0 : Infinity) : abs / Math.abs(r);
      if (abs > maxAbs) maxAbs = abs;
      if (rel > maxRel) maxRel = rel;
      score = Math.min(abs / tol.abs, rel / tol.rel);
      if (score > 1) failures++;
    }
    if (score > worstScore) {
      worstScore = score;
      worst = i;
    }
  }
  if (worst < 0 && ref.length > 0) worst = 0;
  const gap = cosineGap(got, ref);
  const cosOk = tol.cos === undefined || gap <= tol.cos;
  return {
    pass: failures === 0 && cosOk,
    count: ref.length,
    failures,
    maxAbsErr: maxAbs,
    maxRelErr: maxRel,
    worstIndex: worst,
    worstGot: worst >= 0 ? got[worst]! : NaN,
    worstRef: worst >= 0 ? ref[worst]! : NaN,
    cosineGap: gap,
    infNanMismatch: mismatch,
  };
}
