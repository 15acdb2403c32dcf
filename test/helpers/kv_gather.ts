/**
 * What the kv-gather tests (test/cpu_prefill_kv_gather, test/wasm_prefill_kv_gather,
 * test/paged_gather, test/kv_gather_choice) share: ids with every kind of invalid entry mixed in,
 * exact comparison of results, and the prefill engine cases' inputs (SPEC §4's edge cases) with
 * their all-invalid rows' check.
 */
import { expect } from 'vitest';
import { tensor } from '../../dist/index.js';
import type { SparsePrefillArgs, Tensor } from '../../dist/index.js';
import { invalidFillers, randomBf16Bits, type Rng } from './random.js';

export type Outputs = { out: Tensor<'bf16'>; lse: Tensor<'float32'>; maxLogits: Tensor<'float32'> };

/** The bits of a result (out, lse, maxLogits), for exact comparison (NaN payloads included). */
export function resultBits(r: Outputs): Buffer[] {
  return [r.out.data, r.lse.data, r.maxLogits.data].map((a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength));
}

export function expectSameBits(label: string, got: Outputs, want: Outputs): void {
  const [g, w] = [resultBits(got), resultBits(want)];
  ['out', 'lse', 'maxLogits'].forEach((k, i) => expect(Buffer.compare(g[i]!, w[i]!), `${label}: ${k} differs`).toBe(0));
}

/** ids (of kv rows or cache tokens) with invalid ones (negative, at and past the end, extremes), duplicates and runs mixed in. */
export function mixedIds(r: Rng, count: number, sKV: number): Int32Array {
  const bad = [...invalidFillers(sKV), -2, sKV + 5];
  const out = new Int32Array(count);
  for (let k = 0; k < count; k++) {
    const u = r.uniform();
    if (u < 0.15) out[k] = r.pick(bad);
    else if (u < 0.3 && k > 0) out[k] = out[k - 1]! >= 0 && out[k - 1]! < sKV - 1 ? out[k - 1]! + 1 : sKV - 1; // runs, up to the last row
    else if (u < 0.4 && k > 0) out[k] = out[r.int(0, k)]!; // duplicates (of valid and invalid ids)
    else out[k] = r.int(0, sKV);
  }
  return out;
}

/**
 * An engine case's inputs: a random kv of 1500–6000 rows, `ids(sKV, topk, allInvalid)` for the
 * indices, the last row all invalid where there are two or more, lengths (60%: row 0 cut below topk,
 * never empty; row 1 empty where a row after it is neither), a sink of +inf, −inf and finite values.
 */
export function gatherCase(
  rng: Rng,
  c: { sQ: number; hQ: number; dQK: number },
  ids: (sKV: number, topk: number, allInvalid: number[]) => Int32Array,
): { args: SparsePrefillArgs; allInvalid: number[] } {
  const { sQ, hQ, dQK } = c;
  const sKV = rng.int(1500, 6000);
  const topk = sQ === 16 ? rng.int(24, 64) : rng.int(64, 256);
  const allInvalid = sQ >= 2 ? [sQ - 1] : [];
  const indices = ids(sKV, topk, allInvalid);
  const withLengths = rng.uniform() < 0.6;
  const lengths = withLengths ? Int32Array.from({ length: sQ }, (_, i) => (i === 0 ? rng.int(1, topk) : i === 1 && sQ >= 3 ? 0 : rng.int(0, topk + 1))) : null;
  const sink = Float32Array.from({ length: hQ }, (_, h) => (h === 0 ? Infinity : h === hQ - 1 ? -Infinity : rng.normal()));
  const args: SparsePrefillArgs = {
    q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
    indices: tensor('int32', [sQ, topk], indices),
    ...(lengths ? { topkLength: tensor('int32', [sQ], lengths) } : {}),
    attnSink: tensor('float32', [hQ], sink),
    smScale: 1 / Math.sqrt(dQK),
  };
  return { args, allInvalid };
}

/** The rows with no valid entry: lse +inf and out 0, whatever the sink. */
export function expectAllInvalidRows(got: Outputs, rows: readonly number[], hQ: number): void {
  for (const i of rows) {
    expect(Array.from(got.lse.data.subarray(i * hQ, (i + 1) * hQ)).every((v) => v === Infinity)).toBe(true);
    expect(got.out.data.subarray(i * hQ * 512, (i + 1) * hQ * 512).every((v) => v === 0)).toBe(true);
  }
}
