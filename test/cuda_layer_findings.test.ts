/**
 * What the API fuzzer's cuda targets found in a cuda engine's layer calls, one focused case each:
 * every one threw an untyped error, read an operand twice, or refused a bad operand only after work
 * had started, before its fix. Moved from test/fuzz_findings.test.ts.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario } from './helpers/chunks.js';
import { standInDevice } from './helpers/stand_in_device.js';
import { errorOf } from './helpers/errors.js';
import { expectTyped } from './helpers/findings.js';

const rng = testRng('cuda_layer_findings');

// fuzzer findings, f5b11d0 (cuda stub, seeds 1-2), a0690e9, b04b310 (H200 seed 2 case 4810), 32fefe3
/**
 * Found by the fuzzer's cuda targets (node test/fuzz/run.mjs --backends cuda, on the stub op table
 * where no GPU answers): a cuda engine's layer calls over a stand-in device (test/helpers/stand_in_device.ts),
 * whose ops record what they were given.
 */
describe('cuda layer calls: device operands checked before any work', () => {
  /** A one-request c0 chunk and its layer with every operand uploaded to `engine` (device caches, q, sink). */
  async function deviceLayer(engine: Engine, numQueries = 3) {
    const sc = randomScenario(rng, [numQueries + 40], [numQueries]);
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
    const plan = createPlan(sc.chunk, { window: 128 });
    const hQ = 2;
    const q = await engine.upload(tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512)));
    const attnSink = await engine.upload(tensor('float32', [hQ], new Float32Array(hQ)));
    const cache = await engine.uploadKvCache(swa);
    return { plan, swa, layer: { plan, compressRatio: 0 as const, q, attnSink, caches: { swa: cache }, smScale: 0.1 } };
  }

  test('a device cache whose pageSize is a BigInt is INVALID_VALUE naming the cache (was TypeError: Cannot mix BigInt, from the device fast path)', async () => {
    const dev = standInDevice();
    const { engine } = dev.engine(0);
    const { plan, layer } = await deviceLayer(engine);
    const swa = { ...layer.caches.swa, pageSize: -1n as unknown as number };
    await expectTyped(() => prefillLayer(engine, { ...layer, caches: { swa } }, { output: 'device' }), 'INVALID_VALUE', 'caches.swa');
    await expectTyped(() => prefillLayer(engine, { ...layer, caches: { swa: { ...swa, pageSize: Symbol('p') as unknown as number } } }, { output: 'device' }), 'INVALID_VALUE', 'caches.swa');
    plan.release();
  });

  test("an operand of another device is INVALID_VALUE naming it before any op (was refused at its launch, after the plan's uploads; a chunk without queries resolved with it)", async () => {
    const dev = standInDevice();
    const { engine } = dev.engine(0);
    const { engine: other } = dev.engine(1);
    for (const numQueries of [3, 0]) {
      for (const argument of ['q', 'attnSink', 'caches.swa'] as const) {
        const { plan, swa, layer } = await deviceLayer(engine, numQueries);
        const moved = argument === 'caches.swa' ? { caches: { swa: await other.uploadKvCache(swa) } } : { [argument]: await other.upload(await engine.download(layer[argument])) };
        dev.ops.length = 0;
        const e = await errorOf(() => prefillLayer(engine, { ...layer, ...moved }, { output: 'device' }));
        expect(e, `${argument}, ${numQueries} queries`).toBeInstanceOf(SparseMlaError);
        expect((e as SparseMlaError).code).toBe('INVALID_VALUE');
        expect((e as SparseMlaError).argument).toBe(argument);
        expect((e as SparseMlaError).message).toMatch(/device 0.*device 1/);
        expect(dev.ops, `${argument}: ops reached before the refusal`).toEqual([]);
        plan.release();
      }
    }
    expect(dev.faults).toEqual([]);
  });

  test("a branded device buffer the engine did not make (a plain copy of one) is INVALID_VALUE naming it before any op (was refused at its op's launch, after the plan's uploads)", async () => {
    const dev = standInDevice();
    const { engine } = dev.engine(0);
    for (const argument of ['q', 'attnSink', 'caches.swa'] as const) {
      const { plan, layer } = await deviceLayer(engine);
      const copy = <T extends { data: object }>(t: T): T => ({ ...t, data: { ...t.data } });
      const changed = argument === 'caches.swa' ? { caches: { swa: copy(layer.caches.swa) } } : { [argument]: copy(layer[argument]) };
      dev.ops.length = 0;
      await expectTyped(() => prefillLayer(engine, { ...layer, ...changed }, { output: 'device' }), 'INVALID_VALUE', argument);
      expect(dev.ops, `${argument}: ops reached before the refusal`).toEqual([]);
      plan.release();
    }
    expect(dev.faults).toEqual([]);
  });

  test('an args object whose q or attnSink getter answers null the second time: the layer reads each once (the device fast path read them twice: TypeError)', async () => {
    const dev = standInDevice();
    const { engine } = dev.engine(0);
    for (const field of ['q', 'attnSink'] as const) {
      const { plan, layer } = await deviceLayer(engine);
      const args = { ...layer };
      let reads = 0;
      Object.defineProperty(args, field, { enumerable: true, get: () => (reads++ === 0 ? layer[field] : null) });
      const r = await prefillLayer(engine, args, { output: 'device' });
      expect(reads, field).toBe(1);
      expect(r.out.data.device, field).toBe('cuda');
      for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      plan.release();
    }
    expect(dev.faults).toEqual([]);
  });

  test('a queued layer whose q or attnSink is freed by a later getter (reading caches.swa) is INVALID_VALUE naming it (was BACKEND_FAILURE from the layer program: H200 cuda fuzz seed 4 case 3685)', async () => {
    const dev = standInDevice();
    const { engine } = dev.engine(0);
    for (const [field, path] of [['q', 'sparse'], ['attnSink', 'sparse'], ['q', 'paged'], ['attnSink', 'paged']] as const) {
      const { plan, layer: given } = await deviceLayer(engine);
      const layer = { ...given, path };
      // the first layer makes the plan keep its rows and ids (or paged form): the next ones are queued by a layer program
      for (let i = 0; i < 2; i++) {
        const r = await prefillLayer(engine, layer, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      }
      if (path === 'sparse') expect(plan.deviceStats.deviceQueuedLayers, field).toBe(1);
      const swa = layer.caches.swa;
      const caches = {
        get swa() {
          layer[field].data.free();
          return swa;
        },
      };
      await expectTyped(() => prefillLayer(engine, { ...layer, caches }, { output: 'device' }), 'INVALID_VALUE', field);
      plan.release();
    }
    expect(dev.faults).toEqual([]);
  });

  test("prefillLayerSharded checks every shard's call before any shard runs (a bad cache or engine of shard 1 was refused after shard 0 had started its work)", async () => {
    const dev = standInDevice();
    const engines = [dev.engine(0).engine, dev.engine(1).engine];
    const sc = randomScenario(rng, [50], [6]);
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
    const plan = createShardedPlan(sc.chunk, { shards: 2, split: 'queries', window: 128 });
    const hQ = 2;
    const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
    const caches = await Promise.all(engines.map(async (e) => ({ swa: await e.uploadKvCache(swa) })));
    const layer = { plan, compressRatio: 0 as const, q, caches, smScale: 0.1, path: 'sparse' as const };
    const bad: [string, Engine[], object, string, string][] = [
      ['a cache of another device', engines, { caches: [caches[0], caches[0]] }, 'INVALID_VALUE', 'caches.swa'],
      ['a cache of a negative page size', engines, { caches: [caches[0], { swa: { ...caches[1]!.swa, pageSize: -64 } }] }, 'INVALID_VALUE', 'caches.swa'],
      ['no engine', [engines[0]!, null as unknown as Engine], {}, 'INVALID_VALUE', 'engines[1]'],
    ];
    for (const [what, es, change, code, argument] of bad) {
      dev.ops.length = 0;
      const e = await errorOf(() => prefillLayerSharded(es, { ...layer, ...change }, { output: 'device' }));
      expect(e, what).toBeInstanceOf(SparseMlaError);
      expect((e as SparseMlaError).code, what).toBe(code);
      expect((e as SparseMlaError).argument, what).toBe(argument);
      expect(dev.ops, `${what}: ops reached before the refusal`).toEqual([]);
    }
    // the same call with every shard's operands right runs both shards
    dev.ops.length = 0;
    const r = await prefillLayerSharded(engines, layer, { output: 'device' });
    expect(r.shards.map((s) => s.out.data.deviceIndex)).toEqual([0, 1]);
    expect(dev.faults).toEqual([]);
    plan.release();
  });
});
