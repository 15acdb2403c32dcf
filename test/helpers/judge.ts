/**
 * Judging engine outputs against the float64 reference with SPEC §4's bounds (the one bounds
 * module, src/reference/compare.ts), with failure messages that say how far over and where.
 */
import { expect } from 'vitest';
import type { Tensor } from '../../dist/index.js';
import { compareAttention, decodeBf16, formatAttentionComparison, type AttentionComparison, type AttentionValues, type BoundsReference } from '../../dist/reference/index.js';

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

interface AttentionTensors {
  out: Tensor<'bf16'>;
  lse: Tensor<'float32'>;
  maxLogits: Tensor<'float32'>;
}

/** An engine result's out/lse/maxLogits on the given query rows, as values. */
export function attentionRows(r: AttentionTensors, rows: readonly number[]): AttentionValues {
  return { out: rowsOf(r.out, rows), lse: rowsOf(r.lse, rows), maxLogits: rowsOf(r.maxLogits, rows) };
}

/**
 * Assert an engine result is within SPEC §4's bounds of the reference on `queries` (the rows the
 * reference holds, in order); on failure the message carries the label and every tensor's worst
 * ratio and where.
 */
export function expectWithinBounds(label: string, got: AttentionTensors, ref: BoundsReference, queries: readonly number[]): AttentionComparison {
  const heads = got.lse.shape[1]!, dV = got.out.shape[2]!;
  const c = compareAttention(attentionRows(got, queries), ref, { heads, dV, queries });
  expect(c.pass, `${label}: ${formatAttentionComparison(c)}`).toBe(true);
  return c;
}
