/**
 * Hostile use of prefillLayer's { dropped: 'later' } and plan.settleDropped() on a cuda engine (the
 * stand-in device, test/helpers/stand_in_device.ts, its dropped reads gated so that "not yet landed"
 * is a state the test holds): settleDropped called twice at once, again after it settled, with a
 * read that fails, and around the engine's dispose(); bad options refused before any work.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, prefillLayer } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { testRng } from './helpers/random.js';
import { c4Layer as c4LayerOn, gatedEngine, settled } from './helpers/gated_dropped_device.js';

const rng = testRng('hostile_dropped_later');
const c4Layer = (engine: Engine) => c4LayerOn(engine, rng, { sink: false });

async function laterLayers(engine: Engine, layer: Awaited<ReturnType<typeof c4Layer>>['layer'], n: number) {
  for (let i = 0; i < n; i++) {
    const r = await prefillLayer(engine, layer, { output: 'device', dropped: 'later' });
    expect(r.dropped).toBeNull();
    for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
  }
}

describe("plan.settleDropped() under hostile use", () => {
  test('called twice at once, both wait for every read and give the total; called again once settled, the same total at once', async () => {
    const { engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    await laterLayers(engine, layer, 3);
    const a = plan.settleDropped(), b = plan.settleDropped();
    gates[0]!.open(4);
    gates[1]!.open(5);
    expect(await settled(a)).toBe(false);
    expect(await settled(b)).toBe(false);
    gates[2]!.open(6);
    expect(await Promise.all([a, b])).toEqual([15, 15]);
    expect(await plan.settleDropped()).toBe(15);
    plan.release();
  });

  test('engine.dispose() with dropped reads in flight: dispose waits for them, and settleDropped gives the total after it', async () => {
    const { engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    await laterLayers(engine, layer, 2);
    const disposed = engine.dispose();
    const settle = plan.settleDropped();
    expect(await settled(settle)).toBe(false);
    gates[0]!.open(1);
    gates[1]!.open(2);
    await disposed;
    expect(await settle).toBe(3);
    expect(await plan.settleDropped()).toBe(3);
    const e = await prefillLayer(engine, layer, { output: 'device', dropped: 'later' }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SparseMlaError);
    expect((e as SparseMlaError).code).toBe('DISPOSED');
    expect(await plan.settleDropped()).toBe(3);
  });

  test('a failed read rejects one of two concurrent settleDropped calls; the other resolves once every read is in', async () => {
    const { engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    await laterLayers(engine, layer, 2);
    const both = Promise.allSettled([plan.settleDropped(), plan.settleDropped()]);
    gates[0]!.fail(new Error('cudaErrorLaunchFailure: unspecified launch failure'));
    gates[1]!.open(7);
    const [x, y] = await both;
    const rejected = [x, y].filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
    const resolved = [x, y].filter((r) => r.status === 'fulfilled') as PromiseFulfilledResult<number>[];
    expect(rejected.length).toBe(1);
    expect(rejected[0]!.reason).toBeInstanceOf(SparseMlaError);
    expect((rejected[0]!.reason as SparseMlaError).code).toBe('BACKEND_FAILURE');
    expect(resolved[0]!.value).toBe(7);
    expect(await plan.settleDropped()).toBe(7);
    plan.release();
  });

  test('options that are not "await" or "later", or a getter that answers another value later, are refused or read once, before any op', async () => {
    const { dev, engine, gates } = gatedEngine();
    const { plan, layer } = await c4Layer(engine);
    for (const bad of ['LATER', 'later ', new String('later'), Symbol('later'), 0, {}]) {
      dev.ops.length = 0;
      const e = await prefillLayer(engine, layer, { output: 'device', dropped: bad as 'later' }).catch((x: unknown) => x);
      expect(e, String(bad)).toBeInstanceOf(SparseMlaError);
      expect((e as SparseMlaError).code).toBe('INVALID_VALUE');
      expect((e as SparseMlaError).argument).toBe('options.dropped');
      expect(dev.ops, 'no op before the refusal').toEqual([]);
    }
    // 'later' on its first read, junk after: read once, so the layer runs with 'later'
    let reads = 0;
    const options = { output: 'device' as const, get dropped() { return reads++ === 0 ? ('later' as const) : ('junk' as 'later'); } };
    const r = await prefillLayer(engine, layer, options);
    expect(reads).toBe(1);
    expect(r.dropped).toBeNull();
    gates[0]!.open(2);
    expect(await plan.settleDropped()).toBe(2);
    for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
    plan.release();
  });
});
