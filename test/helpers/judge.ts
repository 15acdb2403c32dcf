/**
 * Judging engine outputs against the float64 reference with SPEC §4's bounds (the one bounds
 * module, src/reference/compare.ts), with failure messages that say how far over and where.
 */
import { expect } from 'vitest';
import { attentionValues, compareAttention, formatAttentionComparison, type AttentionComparison, type AttentionTensors, type BoundsReference } from '../../dist/reference/index.js';

/**
 * Assert an engine result is within SPEC §4's bounds of the reference on `queries` (the rows the
 * reference holds, in order); on failure the message carries the label and every tensor's worst
 * ratio and where.
 */
export function expectWithinBounds(label: string, got: AttentionTensors, ref: BoundsReference, queries: readonly number[]): AttentionComparison {
  const heads = got.lse.shape[1]!, dV = got.out.shape[2]!;
  const c = compareAttention(attentionValues(got, queries), ref, { heads, dV, queries });
  expect(c.pass, `${label}: ${formatAttentionComparison(c)}`).toBe(true);
  return c;
}
