/**
 * A cuda layer (the stand-in device, test/helpers/stand_in_device.ts) whose getters that the layer
 * reads after its operands' checks (smScale, path, threshold, env) free one of its device operands:
 * refused with INVALID_VALUE naming the layer's argument (q, attnSink, topkIndices, caches.swa,
 * caches.c4) before any op, both paths, stepwise and queued (warm plans). The ops' own checks at
 * their launch named theirs (cache, kCache.data, extraKCache.data) after the plan's work.
 */
import { expect, test } from 'vitest';
import { SparseMlaError, createPlan, prefillLayer, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { standInDevice } from './helpers/stand_in_device.js';

const rng = testRng('hostile_device_getters');

type Freeable = { data: { free(): void } };

async function deviceLayer(engine: Engine, ratio: 0 | 4) {
  const sc = randomScenario(rng, [rng.int(150, 300)], [rng.int(2, 7)]);
  const plan = createPlan(sc.chunk, { window: 128 });
  const hQ = 2;
  const q = await engine.upload(tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512)));
  const attnSink = await engine.upload(tensor('float32', [hQ], new Float32Array(hQ)));
  const caches: Record<string, Freeable> = { swa: await engine.uploadKvCache(randomCache(rng, sc.swaPageSize, sc.swaPages)) };
  const layer: Record<string, unknown> = { plan, compressRatio: ratio, q, attnSink, caches, smScale: 0.1 };
  if (ratio === 4) {
    caches.c4 = await engine.uploadKvCache(randomCache(rng, sc.c4PageSize, sc.c4Pages));
    layer.topkIndices = await engine.upload(randomTopk(rng, sc, 16));
  }
  return { plan, layer };
}

test("a device operand freed by a getter read after its check is INVALID_VALUE naming the layer's argument, before any op (stepwise and queued, both paths)", async () => {
  const dev = standInDevice();
  const { engine } = dev.engine(0);
  for (const ratio of [0, 4] as const) {
    for (const path of ['sparse', 'paged', undefined] as const) {
      // env is read only where the path is not forced
      for (const late of path === undefined ? (['smScale', 'path', 'threshold', 'env'] as const) : (['smScale', 'path', 'threshold'] as const)) {
        for (const victim of ratio === 4 ? (['q', 'attnSink', 'topkIndices', 'caches.swa', 'caches.c4'] as const) : (['q', 'attnSink', 'caches.swa'] as const)) {
          const warm = rng.pick([0, 2]);
          const label = `c${ratio}, path ${path}, ${warm} warm-up layers: ${victim} freed by the ${late} getter`;
          const { plan, layer } = await deviceLayer(engine, ratio);
          if (path !== undefined) layer.path = path;
          for (let i = 0; i < warm; i++) {
            const r = await prefillLayer(engine, layer as never, { output: 'device' });
            for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
          }
          const args = { ...layer };
          const value = args[late];
          const target = victim.startsWith('caches.') ? (layer.caches as Record<string, Freeable>)[victim.slice(7)]! : (layer[victim] as Freeable);
          Object.defineProperty(args, late, { enumerable: true, get: () => (target.data.free(), value) });
          const opsBefore = dev.ops.length;
          const e = await prefillLayer(engine, args as never, { output: 'device' }).then(() => undefined, (x: unknown) => x);
          expect(e, label).toBeInstanceOf(SparseMlaError);
          expect((e as SparseMlaError).code, label).toBe('INVALID_VALUE');
          // the argument itself, or its data where the getter ran before the argument's own check
          expect([victim, `${victim}.data`], label).toContain((e as SparseMlaError).argument);
          expect(dev.ops.slice(opsBefore), `${label}: no op before the refusal`).toEqual([]);
          plan.release();
        }
      }
    }
  }
  expect(dev.faults).toEqual([]);
});
