/**
 * Two findings of the API fuzzer (test/fuzz, session 53), fixed in session 53 by helper-61:
 *
 * - an op's INVALID_SHAPE message formatted the caller's shape with the caller's own array methods
 *   (`shape.slice(0, 8).map(...).join(...)` in tensor.ts shapeStr): a null-prototype shape of 65 dims
 *   was TypeError "shape.slice is not a function", an own `slice` ran the caller's code in a refusal;
 *   describe()'s "a bf16 tensor [...]" the same (a null-prototype shape there said "an object");
 * - the rows a plan hands out (combinedRows, combineC4) were frozen objects over tensors holding the
 *   plan's own arrays, which its layers and pagedForm read back: 2^30 written into them gave a sparse
 *   layer lse = +inf on every row, and pagedForm took arrays swapped in (out-of-range ids: the core's
 *   BACKEND_FAILURE; an array of another kind dressed as Int32Array passed `instanceof`; a detached
 *   one was a TypeError). Fuzz replays: cpu seed 64 cases 140 / 855, wasm seed 65 case 532, cpu seed
 *   76 case 719.
 *
 * The same for the gather ids a plan hands out (plan.swaTokenIds, compressedTokenIds): they were the
 * arrays its layers gather.
 *
 * Layers are checked against the brute-force float64 reference (prefillLayerReference), paged forms
 * against a fresh plan's of the same chunk.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, SparseMlaError, tensor } from '../dist/index.js';
import { createPlan, prefillLayer, type CombinedRows, type CompressRatio, type PagedForm, type Plan } from '../dist/planner/index.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import type { Engine } from '../dist/types.js';
import { randomBf16Bits } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { expectWithinBounds } from './helpers/judge.js';
import { opSuite } from './helpers/suite.js';
import { errorOf } from './helpers/errors.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { standInTable } from './helpers/computing_device.js';
import { loadNativeAddon } from '../dist/backends/native/binding.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import { SparseMlaEngine } from '../dist/engine.js';

const suite = opSuite('hostile_plan_rows.test', { backend: 'wasm', workers: 2 });
const { rng } = suite;
const HQ = 4;
const D = 512;
const SM_SCALE = 1 / Math.sqrt(D);

async function expectTyped(call: () => unknown, code: string, message: string | RegExp): Promise<SparseMlaError> {
  const e = await errorOf(call);
  expect(e, String(e)).toBeInstanceOf(SparseMlaError);
  const err = e as SparseMlaError;
  expect(err.code, err.message).toBe(code);
  if (typeof message === 'string') expect(err.message).toBe(message);
  else expect(err.message).toMatch(message);
  return err;
}

describe("an op's shape message reads the caller's shape by index, never through its methods", () => {
  function sparseArgs(q: unknown) {
    return { q, kv: tensor('bf16', [1, 1, D], new Uint16Array(D)), indices: tensor('int32', [1, 1], new Int32Array(1)), smScale: 0.1 };
  }
  // the message as written from the spec of shapeStr: the first 8 dims, then the count
  const over64 = (dims: readonly number[]) => `q.shape: expected an array of at most 64 non-negative integers, got [${dims.slice(0, 8).join(', ')}, … (${dims.length} dims)]`;

  test('a null-prototype shape over 64 dims: INVALID_SHAPE with its first 8 dims (was TypeError "shape.slice is not a function")', async () => {
    const n = rng.int(65, 200);
    const dims = Array.from({ length: n }, () => rng.int(0, 9));
    const shape = [...dims];
    Object.setPrototypeOf(shape, null);
    await expectTyped(() => suite.engine.sparsePrefill(sparseArgs({ dtype: 'bf16', shape, data: new Uint16Array(1) }) as never), 'INVALID_SHAPE', over64(dims));
  });

  test("a shape whose own slice / map / join / iterator lie: none of them is called, the message is the ordinary array's", async () => {
    const dims = Array.from({ length: 65 }, () => rng.int(0, 9));
    const calls: string[] = [];
    const shape = [...dims];
    for (const m of ['slice', 'map', 'join', 'toString', Symbol.iterator] as const) {
      Object.defineProperty(shape, m, { value: () => { calls.push(String(m)); return ['lie']; } });
    }
    await expectTyped(() => suite.engine.sparsePrefill(sparseArgs({ dtype: 'bf16', shape, data: new Uint16Array(1) }) as never), 'INVALID_SHAPE', over64(dims));
    expect(calls).toEqual([]);
    // an ordinary array: today's text
    await expectTyped(() => suite.engine.sparsePrefill(sparseArgs({ dtype: 'bf16', shape: [...dims], data: new Uint16Array(1) }) as never), 'INVALID_SHAPE', over64(dims));
  });

  test('a short shape with a bad dim, and a tensor without data whose shape has a null prototype: described by index', async () => {
    const a = rng.int(1, 9);
    await expectTyped(() => suite.engine.sparsePrefill(sparseArgs({ dtype: 'bf16', shape: [a, 'x', -1], data: new Uint16Array(1) }) as never), 'INVALID_SHAPE', `q.shape: expected an array of at most 64 non-negative integers, got [${a}, "x"]`);
    const dims = [rng.int(1, 9), rng.int(1, 9)];
    const shape = [...dims];
    Object.setPrototypeOf(shape, null);
    await expectTyped(() => suite.engine.sparsePrefill(sparseArgs({ dtype: 'bf16', shape }) as never), 'INVALID_VALUE', `q: expected a bf16 tensor {dtype, shape, data}, got a bf16 tensor [${dims.join(', ')}]`);
  });
});

/** A random chunk with every ratio, its caches, a layer's q, sink and top-k. */
function scenario() {
  const seqLens = [rng.int(5, 40), rng.int(300, 600), rng.int(130, 400)];
  const extendLens = [seqLens[0]!, rng.int(5, 20), rng.int(1, 10)];
  const sc = randomScenario(rng, seqLens, extendLens);
  const caches = { swa: randomCache(rng, 64, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages), c128: randomCache(rng, sc.c128PageSize, sc.c128Pages) };
  const q = tensor('bf16', [sc.numQueries, HQ, D], randomBf16Bits(rng, sc.numQueries * HQ * D, 1));
  const attnSink = tensor('float32', [HQ], new Float32Array(HQ).map(() => rng.normal()));
  const topkIndices = randomTopk(rng, sc, rng.int(16, 64));
  return { sc, caches, q, attnSink, topkIndices };
}

function rowsOf(plan: Plan, ratio: CompressRatio, topk: ReturnType<typeof scenario>['topkIndices']): CombinedRows {
  return ratio === 4 ? plan.combineC4(topk) : plan.combinedRows(ratio);
}

function formValues(f: PagedForm): unknown {
  return [f.main, f.mainLengths, f.extra, f.extraLengths].map((t) => t && [t.shape, Array.from(t.data)]);
}

describe('rows a plan hands out cannot change what the plan computes, and come back checked', () => {
  test('2^30 written into the rows combinedRows / combineC4 handed out: the plan\'s later sparse and paged layers still match the float64 reference (was lse = +inf on every row of a sparse layer)', async () => {
    const { sc, caches, q, attnSink, topkIndices } = scenario();
    for (const ratio of [0, 4, 128] as const) {
      const plan = createPlan(sc.chunk, { caches });
      const rows = rowsOf(plan, ratio, topkIndices);
      rows.indices.data.fill(2 ** 30);
      rows.lengths.data.fill(rows.width);
      const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, attnSink, smScale: SM_SCALE, ...(ratio === 4 ? { topkIndices } : {}) });
      for (const path of ['sparse', 'paged'] as const) {
        const got = await prefillLayer(suite.engine, { q, compressRatio: ratio, plan, caches, attnSink, smScale: SM_SCALE, path, ...(ratio === 4 ? { topkIndices } : {}) });
        expectWithinBounds(`c${ratio} ${path}`, got, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
        expect(got.dropped, `c${ratio} ${path}`).toBe(ref.dropped);
      }
      // and a fresh call hands out the plan's rows, not the caller's writes
      const again = rowsOf(plan, ratio, topkIndices);
      expect(Array.from(again.indices.data)).toEqual(Array.from(rowsOf(createPlan(sc.chunk), ratio, topkIndices).indices.data));
    }
  }, 60_000);

  test("the gather ids a plan hands out (plan.swaTokenIds, compressedTokenIds): 2^40 written into them changes none of its layers (vs the float64 reference; were the layers' own ids: a sparse layer gathered other rows)", async () => {
    const { sc, caches, q, attnSink, topkIndices } = scenario();
    for (const ratio of [0, 4, 128] as const) {
      const plan = createPlan(sc.chunk, { caches });
      const want = ratio === 0 ? [] : Array.from(plan.compressedTokenIds(ratio).data);
      plan.swaTokenIds.data.fill(2n ** 40n);
      if (ratio !== 0) plan.compressedTokenIds(ratio).data.fill(2n ** 40n + BigInt(rng.int(0, 1000)));
      const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, attnSink, smScale: SM_SCALE, ...(ratio === 4 ? { topkIndices } : {}) });
      for (const path of ['sparse', 'paged'] as const) {
        const got = await prefillLayer(suite.engine, { q, compressRatio: ratio, plan, caches, attnSink, smScale: SM_SCALE, path, ...(ratio === 4 ? { topkIndices } : {}) });
        expectWithinBounds(`c${ratio} ${path}`, got, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
      }
      // the plan's paged form still names the chunk's own SWA ids
      const fresh = createPlan(sc.chunk);
      expect(formValues(plan.pagedForm(rowsOf(plan, ratio, topkIndices)))).toEqual(formValues(fresh.pagedForm(rowsOf(fresh, ratio, topkIndices))));
      if (ratio !== 0) expect(Array.from(fresh.compressedTokenIds(ratio).data)).toEqual(want);
    }
  }, 60_000);

  test('pagedForm of rows changed since they were handed out: a typed error naming rows, before any work; unchanged rows (in any memory) give the untampered form', async () => {
    const { sc, topkIndices } = scenario();
    const nq = sc.numQueries;
    for (const ratio of [0, 4, 128] as const) {
      const want = (() => {
        const p = createPlan(sc.chunk);
        return formValues(p.pagedForm(rowsOf(p, ratio, topkIndices)));
      })();
      const plan = createPlan(sc.chunk);
      const width = rowsOf(plan, ratio, topkIndices).width;
      const expected = `rows: expected int32 indices [${nq}, ${width}] and lengths [${nq}] as this plan made them`;
      const detach = (a: Int32Array) => {
        const c = a.slice();
        structuredClone(c.buffer, { transfer: [c.buffer] });
        return c;
      };
      const n = nq * width;
      const cases: [string, (r: CombinedRows) => void, string, string | RegExp][] = [
        ['out-of-range ids swapped in', (r) => { (r.indices as { data: Int32Array }).data = new Int32Array(n).fill(2 ** 30); }, 'INVALID_VALUE', new RegExp(`^${escape(expected)} \\(rows a plan hands out are read-only\\), got indices ${2 ** 30} at 0 where the plan made -?\\d+$`)],
        ['2^30 written into the ids', (r) => { r.indices.data[n - 1] = 2 ** 30; }, 'INVALID_VALUE', new RegExp(`got indices ${2 ** 30} at ${n - 1} where the plan made -?\\d+$`)],
        ['a length written', (r) => { r.lengths.data[0] = width + 1; }, 'INVALID_VALUE', new RegExp(`got lengths ${width + 1} at 0 where the plan made \\d+$`)],
        ['a Uint8Array dressed as an Int32Array', (r) => { const v = new Uint8Array(n); Object.setPrototypeOf(v, Int32Array.prototype); (r.indices as { data: unknown }).data = v; }, 'INVALID_DTYPE', `${expected}, got indices of dtype string "int32" over Uint8Array(${n})`],
        ['a longer array', (r) => { (r.lengths as { data: Int32Array }).data = new Int32Array(nq + 1); }, 'INVALID_SHAPE', `${expected}, got lengths of shape [${nq}] over ${nq + 1} elements`],
        ['another shape', (r) => { (r.indices as { shape: number[] }).shape = [nq, width, 1]; }, 'INVALID_SHAPE', `${expected}, got indices of shape [${nq}, ${width}, 1] over ${n} elements`],
        ['dtype int64', (r) => { (r.lengths as { dtype: string }).dtype = 'int64'; }, 'INVALID_DTYPE', `${expected}, got lengths of dtype string "int64" over Int32Array(${nq})`],
        ['a detached array', (r) => { (r.lengths as { data: Int32Array }).data = detach(r.lengths.data); }, 'INVALID_VALUE', /^rows\.lengths\.data: expected a Int32Array with attached memory/],
      ];
      for (const [label, tamper, code, message] of cases) {
        const r = rowsOf(plan, ratio, topkIndices);
        tamper(r);
        const before = { ...plan.stats };
        await expectTyped(() => plan.pagedForm(r), code, message);
        expect(plan.stats, `c${ratio} ${label}: no work`).toEqual(before);
      }
      // the same ids in a copy and in shared memory: the same rows
      for (const mem of ['copy', 'shared'] as const) {
        const r = rowsOf(plan, ratio, topkIndices);
        const own = r.indices.data;
        const other = mem === 'copy' ? own.slice() : new Int32Array(new SharedArrayBuffer(own.byteLength));
        other.set(own);
        (r.indices as { data: Int32Array }).data = other;
        expect(formValues(plan.pagedForm(r)), `c${ratio} ${mem}`).toEqual(want);
      }
      // a form built after every refusal is the untampered plan's
      expect(formValues(plan.pagedForm(rowsOf(plan, ratio, topkIndices))), `c${ratio}`).toEqual(want);
    }
  });
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * The paged form a plan hands out (plan.pagedForm) was the arrays its later paged layers read (and a
 * cuda engine placed on its device): zeros written into form.main.data moved a later host paged
 * layer's lse on every row. Since session 53 (helper-62) pagedForm hands out copies, made once per
 * form; the plan's layers read its own form through an internal method.
 */
describe('the paged form a plan hands out cannot change its later paged layers', () => {
  const load = nativeAddonBuilt() ? loadNativeAddon() : undefined;
  const addon = load?.ok ? load.addon : undefined;
  let cpu: Engine | undefined;
  beforeAll(async () => {
    if (addon !== undefined) cpu = await createEngine({ backend: 'cpu', workers: 2 });
  });
  afterAll(async () => {
    await cpu?.dispose();
  });

  /** The engines under test: wasm, cpu (addon built) and cuda over a computing stand-in device (addon built; its c0 / c128 paged layers read the form placed on the device once per plan). */
  function engines(): { name: string; engine: Engine; device: boolean }[] {
    const list = [{ name: 'wasm', engine: suite.engine, device: false }];
    if (cpu !== undefined) list.push({ name: 'cpu', engine: cpu, device: false });
    if (addon !== undefined) list.push({ name: 'cuda stand-in', engine: new SparseMlaEngine(new CudaBackend(addon, standInTable(addon, [], { downloadsWaitForPrefill: false }), 2)) as unknown as Engine, device: true });
    return list;
  }

  test.each([0, 2 ** 30])('%d written into every form pagedForm handed out (c0, c4, c128; ids and, as the sets\' widths, lengths): later paged layers of each ratio still match the float64 reference', async (value) => {
    const { sc, caches, q, attnSink, topkIndices } = scenario();
    const refs = new Map<CompressRatio, ReturnType<typeof prefillLayerReference>>();
    for (const ratio of [0, 4, 128] as const) refs.set(ratio, prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, attnSink, smScale: SM_SCALE, ...(ratio === 4 ? { topkIndices } : {}) }));
    const all = engines();
    expect(all.length, 'engines').toBeGreaterThanOrEqual(1);
    for (const { name, engine: e, device } of all) {
      const plan = createPlan(sc.chunk, { caches });
      for (const ratio of [0, 4, 128] as const) {
        const form = plan.pagedForm(rowsOf(plan, ratio, topkIndices));
        form.main.data.fill(value);
        form.mainLengths.data.fill(value === 0 ? form.main.shape[1]! : value);
        form.extra?.data.fill(value);
        form.extraLengths?.data.fill(value === 0 ? form.extra!.shape[1]! : value);
      }
      const placed = device
        ? { q: await e.upload(q), caches: { swa: await e.uploadKvCache(caches.swa), c4: await e.uploadKvCache(caches.c4), c128: await e.uploadKvCache(caches.c128) }, attnSink: await e.upload(attnSink) }
        : { q, caches, attnSink };
      for (const ratio of [0, 4, 128] as const) {
        const label = `${name} c${ratio} (${value} written)`;
        const got = await prefillLayer(e, { q: placed.q, compressRatio: ratio, plan, caches: placed.caches, attnSink: placed.attnSink, smScale: SM_SCALE, path: 'paged', ...(ratio === 4 ? { topkIndices } : {}) } as never);
        expect(got.path, label).toBe('paged');
        const ref = refs.get(ratio)!;
        expectWithinBounds(label, got, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
        expect(got.dropped, label).toBe(ref.dropped);
      }
      // the cuda engine's c0 / c128 layers read the form it placed on its device (uploaded once per ratio)
      if (device) expect(plan.deviceStats.deviceUploads, `${name}: forms placed`).toBe(2);
      if (device) await e.dispose();
    }
  }, 120_000);

  test('pagedForm hands out the same copies on every call (made once per form), never the arrays the plan keeps', () => {
    const { sc, topkIndices } = scenario();
    const plan = createPlan(sc.chunk);
    for (const ratio of [0, 128] as const) {
      const a = plan.pagedForm(plan.combinedRows(ratio)), b = plan.pagedForm(plan.combinedRows(ratio));
      for (const k of ['main', 'mainLengths', 'extra', 'extraLengths'] as const) expect(a[k]?.data, `c${ratio} ${k}`).toBe(b[k]?.data);
    }
    // the plan's own form (what its layers read) is another array of the same values
    const own = plan.peekPagedForm(0, undefined);
    const handed = plan.pagedForm(plan.combinedRows(0));
    expect(handed.main.data).not.toBe(own.main);
    expect(handed.mainLengths.data).not.toBe(own.mainLengths);
    expect([Array.from(handed.main.data), Array.from(handed.mainLengths.data)]).toEqual([Array.from(own.main), Array.from(own.mainLengths)]);
    const before = { ...plan.stats };
    const c4 = plan.pagedForm(plan.combineC4(topkIndices));
    expect(plan.stats.pagedMainBuilds, 'the main set is built once per plan').toBe(before.pagedMainBuilds);
    expect(c4.main.data).toBe(plan.pagedForm(plan.combinedRows(0)).main.data);
  });
});
