/** Judging engine outputs against the float64 reference, with failure messages that say where. */
import { expect } from 'vitest';
import type { Tensor } from '../../dist/index.js';
import { compareToReference, decodeBf16, type Comparison, type Tolerance } from '../../dist/reference/index.js';

/** The values of a bf16 or float32 tensor restricted to the given leading-dim rows. */
export function rowsOf(t: Tensor<'bf16'> | Tensor<'float32'>, rows: readonly number[]): Float64Array {
  const rowLen = t.shape.slice(1).reduce((a, b) => a * b, 1);
  const out = new Float64Array(rows.length * rowLen);
  for (let j = 0; j < rows.length; j++) {
    const base = rows[j]! * rowLen;
    for (let e = 0; e < rowLen; e++) {
      const v = t.data[base + e]!;
      out[j * rowLen + e] = t.dtype === 'bf16' ? decodeBf16(v) : v;
    }
  }
  return out;
}

export function summarize(c: Comparison): Record<string, unknown> {
  return {
    pass: c.pass,
    failures: c.failures,
    infNanMismatch: c.infNanMismatch,
    maxAbsErr: c.maxAbsErr,
    maxRelErr: c.maxRelErr,
    cosineGap: c.cosineGap,
    worstIndex: c.worstIndex,
    worstGot: c.worstGot,
    worstRef: c.worstRef,
  };
}

/** Assert got is within tol of ref; on failure the message carries the label and the comparison. */
export function expectWithin(label: string, got: ArrayLike<number>, ref: ArrayLike<number>, tol: Tolerance): Comparison {
  const c = compareToReference(got, ref, tol);
  if (!c.pass) expect({ label, ...summarize(c) }).toEqual({ label, pass: true });
  return c;
}
