/**
 * What the kv-gather tests (test/cpu_prefill_kv_gather, test/wasm_prefill_kv_gather,
 * test/paged_gather, test/kv_gather_choice) share: ids with every kind of invalid entry mixed in,
 * exact comparison of results and of plans, calls with the gather forced, and the prefill engine
 * cases' inputs (SPEC §4's edge cases) with their checks.
 */
import { afterAll, beforeAll, expect } from 'vitest';
import { SparseMlaError, createEngine, tensor } from '../../dist/index.js';
import type { Engine, SparsePrefillArgs, Tensor } from '../../dist/index.js';
import { engineBackend } from '../../dist/engine.js';
import { prefillGatherForTests, remapKvIndices, type KvIndexRows, type KvRowPlan } from '../../dist/backends/prefill_gather.js';
import * as R from '../../dist/reference/index.js';
import { expectWithinBounds } from './judge.js';
import { invalidFillers, randomBf16Bits, randomIndices, type Rng } from './random.js';

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

/** Runs `call` with the gather forced as asked; returns its result and how many calls gathered. */
export async function forced<T>(force: 'whole' | 'compact' | null, call: () => Promise<T>): Promise<{ r: T; gathered: number }> {
  prefillGatherForTests.force = force;
  const before = prefillGatherForTests.gatheredCalls;
  try {
    const r = await call();
    return { r, gathered: prefillGatherForTests.gatheredCalls - before };
  } finally {
    prefillGatherForTests.force = null;
  }
}

/** An engine of `backend` per worker count, made before the suite's tests and disposed after them (the gather's forcing cleared). */
export function enginesByWorkers(backend: 'cpu' | 'wasm', workers: readonly number[]): Map<number, Engine> {
  const engines = new Map<number, Engine>();
  beforeAll(async () => {
    for (const w of workers) engines.set(w, await createEngine({ backend, workers: w }));
  }, 60_000);
  afterAll(async () => {
    prefillGatherForTests.force = null;
    await Promise.all([...engines.values()].map((e) => e.dispose()));
  });
  return engines;
}

/**
 * The call read whole, through a compact kv (forced), and as the estimate picks: equal bits, each
 * path the one asked for, the staging's lent slab given back once the call settled.
 * `gathersWithoutQueries`: whether the backend's forced gather runs for a call of no query rows.
 */
export async function threeWays(engine: Engine, args: SparsePrefillArgs, gathersWithoutQueries: boolean): Promise<Outputs> {
  const staging = (engineBackend(engine) as unknown as { staging: { lentBytes: number } }).staging;
  const gathers = gathersWithoutQueries || args.q.shape[0] !== 0;
  const whole = await forced('whole', () => engine.sparsePrefill(args));
  expect(whole.gathered, 'whole: gathered').toBe(0);
  const compact = await forced('compact', () => engine.sparsePrefill(args));
  expect(compact.gathered, 'compact: gathered').toBe(gathers ? 1 : 0);
  const auto = await forced(null, () => engine.sparsePrefill(args));
  if (!gathers) expect(auto.gathered, 'null: gathered').toBe(0);
  expectSameBits('compact vs whole', compact.r, whole.r);
  expectSameBits('estimate vs whole', auto.r, whole.r);
  expect(staging.lentBytes).toBe(0);
  return compact.r;
}

/** A plan made in a kept scratch against the fresh plan of the same `rows`: rows, runs, map and remapped ids alike. */
export function expectSamePlan(label: string, kept: KvRowPlan, fresh: KvRowPlan, rows: KvIndexRows): void {
  expect(Array.from(kept.rows), `${label}: rows`).toEqual(Array.from(fresh.rows));
  expect(kept.runs, `${label}: runs`).toBe(fresh.runs);
  expect(Buffer.from(kept.slotOf.slice().buffer).equals(Buffer.from(fresh.slotOf.buffer)), `${label}: slotOf`).toBe(true);
  expect(Array.from(remapKvIndices(rows, kept)), `${label}: remapped ids`).toEqual(Array.from(remapKvIndices(rows, fresh)));
}

/** The engine cases: every sQ, hQ, dQK and worker count, each with the others. */
export function gatherEngineCases(workers: readonly number[]): Array<{ sQ: number; hQ: number; dQK: number; workers: number }> {
  const cases: Array<{ sQ: number; hQ: number; dQK: number; workers: number }> = [];
  for (const sQ of [0, 1, 2, 16]) for (const hQ of [8, 64, 128]) cases.push({ sQ, hQ, dQK: cases.length % 2 ? 576 : 512, workers: workers[cases.length % workers.length]! });
  return cases;
}

/** An engine case's result: q's rows and heads, every row within the reference's bounds, the all-invalid rows empty. */
export function expectGatherCase(got: Outputs, args: SparsePrefillArgs, allInvalid: readonly number[]): void {
  const [sQ, hQ] = args.q.shape as [number, number, number];
  expect(got.out.shape).toEqual([sQ, hQ, 512]);
  if (sQ === 0) return;
  const queries = Array.from({ length: sQ }, (_, i) => i);
  expectWithinBounds('compact kv', got, R.sparsePrefillReference(args), queries);
  // the all-invalid row: no valid entry, whatever the sink
  expectAllInvalidRows(got, allInvalid, hQ);
}

/**
 * int64 ids (some past the kv by 2^33, some −2^40: made −1 by the op) within the reference's
 * bounds, then ids all invalid: lse +inf, maxLogits −inf, out 0; each call read as `threeWays` reads it.
 */
export async function expectWideAndInvalidIds(rng: Rng, threeWays: (args: SparsePrefillArgs) => Promise<Outputs>): Promise<void> {
  const sQ = 2, hQ = 64, dQK = 576, sKV = 3000, topk = 100;
  const ids = mixedIds(rng, sQ * topk, sKV);
  const wide = BigInt64Array.from(ids, (v, k) => (k % 7 === 0 ? BigInt(sKV) + 2n ** 33n : k % 11 === 0 ? -(2n ** 40n) : BigInt(v)));
  const base = { q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)), kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)), smScale: 0.05 };
  const args: SparsePrefillArgs = { ...base, indices: tensor('int64', [sQ, topk], wide) };
  expectWithinBounds('int64 ids', await threeWays(args), R.sparsePrefillReference(args), [0, 1]);
  const none: SparsePrefillArgs = { ...base, indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.pick(invalidFillers(sKV)))) };
  const r = await threeWays(none);
  expect(Array.from(r.lse.data).every((v) => v === Infinity)).toBe(true);
  expect(Array.from(r.maxLogits.data).every((v) => v === -Infinity)).toBe(true);
  expect(r.out.data.every((v) => v === 0)).toBe(true);
}

/** One row of 512 ids (5% invalid) over a 32K-row kv: the estimate gathers it. */
export function oneRowOverLongKv(rng: Rng): SparsePrefillArgs {
  const sKV = 32768, hQ = 64, dQK = 512, topk = 512;
  return {
    q: tensor('bf16', [1, hQ, dQK], randomBf16Bits(rng, hQ * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
    indices: tensor('int32', [1, topk], randomIndices(rng, 1, topk, sKV, { invalidFraction: 0.05 })),
    smScale: 1 / Math.sqrt(dQK),
  };
}

/** 8 rows that each read every row of a 1024-row kv: nothing to leave out, the estimate reads it whole. */
export function rowsCoveringKv(rng: Rng): SparsePrefillArgs {
  const dQK = 512;
  return {
    q: tensor('bf16', [8, 8, dQK], randomBf16Bits(rng, 8 * 8 * dQK)),
    kv: tensor('bf16', [1024, dQK], randomBf16Bits(rng, 1024 * dQK)),
    indices: tensor('int32', [8, 1024], randomIndices(rng, 8, 1024, 1024)),
    smScale: 1 / Math.sqrt(dQK),
  };
}

/** Two rows of 16 ids over an unshared 2048 x 512 kv (2 MiB of staging): a few KiB gathered, refused whole under a 1 MiB budget. */
export function fewIdsOverBigKv(rng: Rng): SparsePrefillArgs {
  const sKV = 2048, dQK = 512;
  return {
    q: tensor('bf16', [2, 2, dQK], randomBf16Bits(rng, 2 * 2 * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
    indices: tensor('int32', [2, 16], randomIndices(rng, 2, 16, sKV)),
    smScale: 0.05,
  };
}

/** The refusal of a call whose unshared inputs' staging is over the budget: TOO_LARGE on q, before any work. */
export function expectStagingTooLarge(e: unknown): void {
  expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, String(e)).toEqual({ code: 'TOO_LARGE', argument: 'q' });
  expect((e as Error).message).toMatch(/staging of the inputs/);
}
