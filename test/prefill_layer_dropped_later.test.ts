/**
 * prefillLayer's { dropped: 'later' } on a cuda engine: a c4 layer resolves once its launches are
 * queued, without waiting for its combine's dropped total to come back (which on a GPU waits for the
 * previous layer's prefill); the total is counted in plan.stats.c4Dropped once it lands and
 * plan.settleDropped() waits for every one. Over the stand-in device (test/helpers/stand_in_device.ts),
 * whose layer program and 8-byte downloads are gated here so that "not yet landed" is a state the test
 * holds; the values the gates write stand for the device's sums. The GPU's own counts are checked
 * by `sparse-mla check --backend cuda` (the case "prefillLayer on the device with { dropped: 'later' }").
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createPlan, prefillLayer, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { c4Layer as c4LayerOn, gatedEngine, settled } from './helpers/gated_dropped_device.js';

const rng = testRng('prefill_layer_dropped_later');
const c4Layer = (engine: Engine) => c4LayerOn(engine, rng);

describe("prefillLayer { dropped: 'later' }", () => {
  test('c4 layers resolve before their dropped totals land (stepwise and queued); the totals count once they land, and settleDropped waits for them', async () => {
    const { dev, engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    const totals = [5, 3, 7];
    for (const [i, total] of totals.entries()) {
      const call = prefillLayer(engine, layer, { output: 'device', dropped: 'later' });
      expect(await settled(call), `layer ${i} resolves with its total still out`).toBe(true);
      const r = await call;
      expect(r.dropped, `layer ${i}`).toBeNull();
      expect(gates.length, `layer ${i}: its total's read is pending`).toBe(i + 1);
      for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      void total;
    }
    // the first layer ran its steps one by one, the next two were queued by a layer program
    expect(plan.deviceStats.deviceQueuedLayers).toBe(2);
    expect(plan.stats.c4Combines).toBe(3);
    expect(plan.stats.c4Dropped).toBe(0);
    const settle = plan.settleDropped();
    gates[0]!.open(totals[0]!);
    gates[2]!.open(totals[2]!);
    expect(await settled(settle), 'settleDropped waits for every total').toBe(false);
    expect(plan.stats.c4Dropped).toBe(totals[0]! + totals[2]!);
    gates[1]!.open(totals[1]!);
    expect(await settle).toBe(totals[0]! + totals[1]! + totals[2]!);
    expect(plan.stats.c4Dropped).toBe(15);
    expect(dev.faults).toEqual([]);
    plan.release();
  });

  test("the default ('await') waits for the total and gives it: the same gated layer does not resolve until it lands", async () => {
    const { engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    for (const [i, total] of [4, 6].entries()) {
      const call = prefillLayer(engine, layer, { output: 'device', dropped: i === 0 ? undefined : 'await' });
      expect(await settled(call), `layer ${i} waits for its total`).toBe(false);
      gates[i]!.open(total);
      const r = await call;
      expect(r.dropped).toBe(total);
      for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
    }
    expect(plan.deviceStats.deviceQueuedLayers).toBe(1);
    expect(await plan.settleDropped()).toBe(10);
    plan.release();
  });

  test('a total whose read fails rejects settleDropped once, with the backend error; the plan counts on after it', async () => {
    const { engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    for (let i = 0; i < 3; i++) {
      const r = await prefillLayer(engine, layer, { output: 'device', dropped: 'later' });
      for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
    }
    gates[0]!.open(2);
    gates[1]!.fail(new Error('cudaErrorLaunchFailure: unspecified launch failure'));
    gates[2]!.open(1);
    const e = await plan.settleDropped().catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SparseMlaError);
    expect((e as SparseMlaError).code).toBe('BACKEND_FAILURE');
    expect((e as SparseMlaError).message).toMatch(/launch failure/);
    expect(await plan.settleDropped()).toBe(3);
    plan.release();
  });

  test('host engines and layers without a combine know their count at once: a number, never null', async () => {
    const { engine } = gatedEngine();
    const { plan: devPlan, layer } = await c4Layer(engine);
    const c0 = await prefillLayer(engine, { ...layer, compressRatio: 0, topkIndices: undefined, caches: { swa: layer.caches.swa } }, { output: 'device', dropped: 'later' });
    expect(c0.dropped).toBe(0);
    devPlan.release();
    const cpu = await createEngine({ backend: 'wasm', workers: 1 });
    try {
      const sc = randomScenario(rng, [200], [30]);
      const plan = createPlan(sc.chunk, { window: 128 });
      const q = tensor('bf16', [sc.numQueries, 2, 512], randomBf16Bits(rng, sc.numQueries * 2 * 512));
      const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages) };
      const topkIndices = randomTopk(rng, sc, 32);
      const args = { plan, compressRatio: 4 as const, q, caches, topkIndices, smScale: 0.1 };
      const later = await prefillLayer(cpu, args, { dropped: 'later' });
      const now = await prefillLayer(cpu, args);
      expect(later.dropped).toBeGreaterThan(0);
      expect(later.dropped).toBe(now.dropped);
      expect(await plan.settleDropped()).toBe(2 * now.dropped);
    } finally {
      await cpu.dispose();
    }
  });

  test('options.dropped other than "await" or "later" is INVALID_VALUE before any work, on host and device engines', async () => {
    const { dev, engine } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    for (const bad of ['soon', true, 1, null]) {
      dev.ops.length = 0;
      const e = await prefillLayer(engine, layer, { output: 'device', dropped: bad as 'later' }).catch((x: unknown) => x);
      expect(e, String(bad)).toBeInstanceOf(SparseMlaError);
      expect((e as SparseMlaError).code).toBe('INVALID_VALUE');
      expect((e as SparseMlaError).argument).toBe('options.dropped');
      expect(dev.ops, `${String(bad)}: ops before the refusal`).toEqual([]);
    }
    plan.release();
  });
});
