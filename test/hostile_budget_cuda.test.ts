/**
 * A cuda engine's layer over its host memory budget (memoryBudgetBytes), on a stand-in device that
 * computes (helpers/computing_device.ts: the addon's CPU core behind the CUDA op table; no GPU).
 * The cuda ops copy host operands and write host outputs in host memory; a layer checks each op
 * it will run at the call (the dequants' copies of host caches, the prefill's or the paged op's
 * copies and host outputs), so a layer whose ops cannot fit is TOO_LARGE before any op, upload or
 * plan work, and at exactly the budget it needs it runs, within SPEC §4's bounds of the float64
 * reference. Each edge is found from the library's own refusals ("needs N bytes") and held to the
 * bytes the ops hold, summed here from the operands.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createPlan, prefillLayer, tensor } from '../dist/index.js';
import type { DeviceTensor, Engine, Plan, PrefillLayerArgs, PrefillLayerOptions, Tensor } from '../dist/index.js';
import { isDeviceBuffer } from '../dist/tensor.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import { loadNativeAddon } from '../dist/backends/native/binding.js';
import { SparseMlaEngine } from '../dist/engine.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { standInTable, type OpCall } from './helpers/computing_device.js';
import { errorOf } from './helpers/errors.js';
import { expectWithinBounds } from './helpers/judge.js';
import { paddedCache } from './helpers/layer_work.js';
import { randomBf16Bits, testRng } from './helpers/random.js';

const rng = testRng('hostile_budget_cuda');
const D = 512;
const MiB = 2 ** 20;
/** bytes of an attention's host outputs per query and head: bf16 out [512], float32 maxLogits and lse */
const OUTPUT_BYTES_PER_ROW = D * 2 + 4 + 4;

const planWork = (p: Plan) => JSON.stringify([p.stats, p.deviceStats]);

describe.skipIf(!nativeAddonBuilt())('cuda (stand-in device): a layer over memoryBudgetBytes is TOO_LARGE before any work', () => {
  const load = loadNativeAddon();
  const addon = load.ok ? load.addon : (undefined as never);
  const calls: OpCall[] = [];
  const held = { downloadsWaitForPrefill: false };

  /** A layer case: its operands placed on an engine (uploads of device ones), its options, and its float64 reference. */
  interface LayerCase {
    place(engine: Engine, plan: Plan): Promise<PrefillLayerArgs>;
    options?: PrefillLayerOptions;
    ref: ReturnType<typeof prefillLayerReference>;
  }

  /**
   * A cuda engine of `budget` over the stand-in, the case's operands placed on it and a fresh plan;
   * `then` runs the layer with the stand-in's op log cleared (the uploads are the case's, not the layer's).
   */
  async function onEngine<T>(budget: number, chunk: Parameters<typeof createPlan>[0], c: LayerCase, then: (engine: Engine, plan: Plan, args: PrefillLayerArgs) => Promise<T>): Promise<T> {
    const engine = new SparseMlaEngine(new CudaBackend(addon, standInTable(addon, calls, held), 2, budget));
    try {
      const plan = createPlan(chunk);
      const args = await c.place(engine, plan);
      calls.length = 0;
      return await then(engine, plan, args);
    } finally {
      await engine.dispose();
    }
  }

  /** At `budget` the layer is refused (TOO_LARGE) with no op, upload or plan work; gives the bytes the refusal says it needs. */
  function refusedFirst(budget: number, chunk: Parameters<typeof createPlan>[0], c: LayerCase): Promise<number> {
    return onEngine(budget, chunk, c, async (engine, plan, args) => {
      const before = planWork(plan);
      const e = await errorOf(() => prefillLayer(engine, args, c.options));
      expect(e instanceof SparseMlaError && e.code, `at a budget of ${budget}: ${String(e)}`).toBe('TOO_LARGE');
      expect(calls.map((x) => x.op), `refused at a budget of ${budget} after ops ran: ${(e as Error).message}`).toEqual([]);
      expect(planWork(plan), `refused at a budget of ${budget} after the plan's work: ${(e as Error).message}`).toBe(before);
      const need = Number(/needs (\d+) bytes/.exec((e as Error).message)?.[1]);
      expect(need).toBeGreaterThan(budget);
      return need;
    });
  }

  /** At `budget` the layer runs, within bounds of the float64 reference (device outputs downloaded for it). */
  function runsAt(budget: number, chunk: Parameters<typeof createPlan>[0], c: LayerCase, label: string): Promise<void> {
    return onEngine(budget, chunk, c, async (engine, plan, args) => {
      const r = await prefillLayer(engine, args, c.options);
      expect(calls.length, label).toBeGreaterThan(0);
      const host = async <T extends Tensor<'bf16'> | Tensor<'float32'>>(t: T | DeviceTensor<'bf16' | 'float32'>): Promise<T> => (isDeviceBuffer(t.data) ? ((await engine.download(t as DeviceTensor<'bf16' | 'float32'>)) as T) : (t as T));
      const got = { out: await host<Tensor<'bf16'>>(r.out), lse: await host<Tensor<'float32'>>(r.lse), maxLogits: await host<Tensor<'float32'>>(r.maxLogits) };
      expectWithinBounds(`${label} at a budget of ${budget}`, got, c.ref, Array.from({ length: plan.numQueries }, (_, i) => i));
      expect(r.dropped, label).toBe(c.ref.dropped);
    });
  }

  /**
   * Raises the budget from 1 MiB to what each refusal says the layer needs until it runs (every
   * refusal before any work: refusedFirst); then the layer is refused at that budget − 1 and runs
   * at it. Returns that budget.
   */
  async function budgetEdge(chunk: Parameters<typeof createPlan>[0], c: LayerCase, label: string): Promise<number> {
    let budget = MiB;
    const needs: number[] = [];
    for (let attempt = 0; attempt < 8; attempt++) {
      const ran = await onEngine(budget, chunk, c, async (engine, _plan, args) => (await errorOf(() => prefillLayer(engine, args, c.options))) === undefined);
      if (ran) {
        expect(needs.length, `${label}: ran at the first budget tried (${budget})`).toBeGreaterThan(0);
        expect(await refusedFirst(budget - 1, chunk, c)).toBe(budget);
        await runsAt(budget, chunk, c, label);
        return budget;
      }
      budget = await refusedFirst(budget, chunk, c);
      needs.push(budget);
    }
    throw new Error(`${label}: no budget up to ${budget} ran the layer`);
  }

  test('workspace path, c4 layer with every operand on the device and host outputs: its prefill\'s host outputs are counted at the call (it had no check before the first op; the prefill refused them after the combine and the dequants)', async () => {
    const sc = randomScenario(rng, [rng.int(300, 600), rng.int(100, 200)], [rng.int(20, 40), rng.int(20, 40)]);
    const hQ = 32, nq = sc.numQueries, smScale = 0.05;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
    const topkIndices = randomTopk(rng, sc, rng.int(32, 80));
    const c: LayerCase = {
      async place(engine, plan) {
        const [qd, swad, c4d, topkd, sinkd] = await Promise.all([engine.upload(q), engine.uploadKvCache(swa), engine.uploadKvCache(c4), engine.upload(topkIndices), engine.upload(attnSink)]);
        return { plan, compressRatio: 4, q: qd, caches: { swa: swad, c4: c4d }, topkIndices: topkd, attnSink: sinkd, smScale, path: 'sparse' };
      },
      ref: prefillLayerReference({ chunk: sc.ref, compressRatio: 4, q, caches: { swa, c4 }, topkIndices, attnSink, smScale }),
    };
    // the one host memory of the layer: its outputs
    expect(await budgetEdge(sc.chunk, c, 'c4 workspace, device operands')).toBe(nq * hQ * OUTPUT_BYTES_PER_ROW);
  }, 60_000);

  test('paged path, c4 layer with host q, caches and top-k: its paged op\'s copies of the host caches, the paged form and its host outputs are counted at the call (the layer counted only its copies of q and the top-k and its outputs; the op refused after the combine and the paged form)', async () => {
    const sc = randomScenario(rng, [rng.int(600, 1200)], [rng.int(12, 24)]);
    const hQ = 64, nq = sc.numQueries, smScale = 0.05;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const topkIndices = randomTopk(rng, sc, rng.int(32, 80));
    const c: LayerCase = {
      place: async (_engine, plan) => ({ plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices, smScale, path: 'paged' }),
      ref: prefillLayerReference({ chunk: sc.ref, compressRatio: 4, q, caches: { swa, c4 }, topkIndices, smScale }),
    };
    // the paged op holds the layer's copy of q, copies of the caches and of the form's ids and
    // lengths (the plan's host arrays), and its outputs
    const plan = createPlan(sc.chunk);
    const form = plan.pagedForm(plan.combineC4(topkIndices));
    const formBytes = [form.main, form.mainLengths, form.extra!, form.extraLengths!].reduce((a, t) => a + t.data.byteLength, 0);
    const opBytes = q.data.byteLength + swa.data.byteLength + c4.data.byteLength + formBytes + nq * hQ * OUTPUT_BYTES_PER_ROW;
    expect(await budgetEdge(sc.chunk, c, 'c4 paged, host operands')).toBe(opBytes);
  }, 60_000);

  test('workspace path, c0 layer with a device q and a host SWA cache: the dequant\'s copy of the host cache is counted, by the op and at the call (it was not counted at all)', async () => {
    const sc = randomScenario(rng, [rng.int(200, 500)], [rng.int(4, 16)]);
    const hQ = 8, nq = sc.numQueries, smScale = 0.05;
    // a cache of several MiB, far more than the layer's outputs
    const swa = paddedCache(randomCache(rng, sc.swaPageSize, sc.swaPages), rng.int(24, 40));
    const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const c: LayerCase = {
      place: async (engine, plan) => ({ plan, compressRatio: 0, q: await engine.upload(q), caches: { swa }, smScale, path: 'sparse' }),
      ref: prefillLayerReference({ chunk: sc.ref, compressRatio: 0, q, caches: { swa }, smScale }),
    };
    expect(swa.data.byteLength).toBeGreaterThan(nq * hQ * OUTPUT_BYTES_PER_ROW);
    expect(await budgetEdge(sc.chunk, c, 'c0 workspace, host cache')).toBe(swa.data.byteLength);
  }, 60_000);

  test.each([
    { q: 'device', output: 'device' },
    { q: 'device', output: 'host' },
    { q: 'host', output: 'device' },
  ] as const)("paged path, c4 layer with a device top-k, q on the $q, $output outputs: the top-k downloaded for the plan's host combine is dropped before the op and is less than the op's copies, so the layer needs exactly the op's bytes (it counted the download beside the op)", async ({ q: qOn, output }) => {
    const sc = randomScenario(rng, [rng.int(2000, 4000), rng.int(400, 800)], [rng.int(120, 160), rng.int(60, 100)]);
    const hQ = 4, nq = sc.numQueries, smScale = 0.05;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
    // a wide top-k: its download is a large part of the layer's host memory
    const topk = rng.int(1400, 1800);
    const topkIndices = randomTopk(rng, sc, topk);
    const c: LayerCase = {
      async place(engine, plan) {
        const [qd, swad, c4d, topkd, sinkd] = await Promise.all([qOn === 'device' ? engine.upload(q) : q, engine.uploadKvCache(swa), engine.uploadKvCache(c4), engine.upload(topkIndices), engine.upload(attnSink)]);
        return { plan, compressRatio: 4, q: qd, caches: { swa: swad, c4: c4d }, topkIndices: topkd, attnSink: sinkd, smScale, path: 'paged' };
      },
      options: { output },
      ref: prefillLayerReference({ chunk: sc.ref, compressRatio: 4, q, caches: { swa, c4 }, topkIndices, attnSink, smScale }),
    };
    // the host memory of the layer: first the top-k downloaded (int32 [numQueries, topk]) for the
    // combine, then, once it is dropped, the paged op's copies of the form's ids and lengths (the
    // plan's host arrays) and, with host outputs, its outputs; a host q is copied at the call and
    // held throughout. The form's extra set alone is as wide as the top-k (padded), so the op's
    // bytes are the larger.
    const plan = createPlan(sc.chunk);
    const form = plan.pagedForm(plan.combineC4(topkIndices));
    expect(form.extra!.shape[1]).toBeGreaterThanOrEqual(topk);
    const formBytes = [form.main, form.mainLengths, form.extra!, form.extraLengths!].reduce((a, t) => a + t.data.byteLength, 0);
    const downloaded = nq * topk * 4;
    const opBytes = formBytes + (output === 'host' ? nq * hQ * OUTPUT_BYTES_PER_ROW : 0);
    const qCopy = qOn === 'host' ? q.data.byteLength : 0;
    expect(opBytes).toBeGreaterThan(downloaded);
    expect(qCopy + opBytes, 'more than the least budget, so that the layer is refused first').toBeGreaterThan(MiB);
    expect(await budgetEdge(sc.chunk, c, `c4 paged, device top-k, ${qOn} q, ${output} outputs`)).toBe(qCopy + opBytes);
  }, 60_000);
});
