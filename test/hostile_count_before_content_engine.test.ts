/**
 * Count before content through the engine (needs engine.ts to hand its memory to
 * prepareDequantizeKCache): dequantizeKCachePaged of a list claiming 2^22 ids over the engine's
 * budget is refused with the backend's own TOO_LARGE (naming tokenIds) before any id is read, on
 * cpu, wasm and cuda (a stand-in device that computes: no GPU); under the budget calls give the
 * float64 reference's values; a cpu engine asked for device output still answers BACKEND_UNAVAILABLE.
 */
import { afterAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { SparseMlaEngine } from '../dist/engine.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import { loadNativeAddon } from '../dist/backends/native/binding.js';
import { decodeBf16, dequantizeKCacheReference, quantizeKCacheReference } from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { standInTable, type OpCall } from './helpers/computing_device.js';
import { refusal } from './helpers/errors.js';
import { testRng } from './helpers/random.js';
import { claimingList } from './helpers/claiming_list.js';

const rng = testRng('hostile_count_before_content_engine');
const CLAIM = 2 ** 22;
const BUDGET = 2 ** 20;

const made: Engine[] = [];
afterAll(async () => {
  for (const e of made) await e.dispose();
});
const calls: OpCall[] = [];
const makers: Record<string, () => Promise<Engine>> = {
  wasm: () => createEngine({ backend: 'wasm', workers: 2, memoryBudgetBytes: BUDGET }),
  ...(nativeAddonBuilt()
    ? {
        cpu: () => createEngine({ backend: 'cpu', memoryBudgetBytes: BUDGET }),
        'cuda (stand-in)': async () => {
          const load = loadNativeAddon();
          if (!load.ok) throw new Error('no addon');
          return new SparseMlaEngine(new CudaBackend(load.addon, standInTable(load.addon, calls, { downloadsWaitForPrefill: false }), 2, BUDGET));
        },
      }
    : {}),
};

describe.each(Object.keys(makers))('%s engine', (name) => {
  const engineOf = async (): Promise<Engine> => {
    const e = await makers[name]!();
    made.push(e);
    return e;
  };

  test('dequantizeKCachePaged of a list claiming 2^22 ids over the budget: TOO_LARGE naming tokenIds, the refusal of as many real ids, no id read', async () => {
    const engine = await engineOf();
    const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
    const { list, reads } = claimingList(CLAIM, 0);
    const t0 = performance.now();
    const e = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: list }));
    const ms = performance.now() - t0;
    expect([e.code, e.argument]).toEqual(['TOO_LARGE', 'tokenIds']);
    expect(reads).toEqual({ length: 1, elements: 0 });
    expect(ms).toBeLessThan(1000);
    const real = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [CLAIM]) }));
    expect([real.code, real.argument, real.message]).toEqual([e.code, e.argument, e.message]);
  });

  test('under the budget: the float64 reference\'s values', async () => {
    const engine = await engineOf();
    const cache = createKvCache('v4', { pageSize: 16, numPages: 2 });
    const n = rng.int(4, 16);
    const ids = Array.from({ length: n }, () => rng.int(0, 32));
    const rows = tensor('float32', [n, 512], Float32Array.from({ length: n * 512 }, () => Math.fround(rng.normal())));
    quantizeKCacheReference(cache, ids, rows);
    const out = await engine.dequantizeKCachePaged({ cache, tokenIds: ids });
    expect(Array.from(out.data as Uint16Array, decodeBf16)).toEqual(Array.from(dequantizeKCacheReference(cache, ids)));
  });
});

test.skipIf(!nativeAddonBuilt())('a cpu engine asked for device output: BACKEND_UNAVAILABLE, as before (the count is not checked against memory the call will not use)', async () => {
  const engine = await createEngine({ backend: 'cpu', memoryBudgetBytes: BUDGET });
  made.push(engine);
  const e = await refusal(() => engine.dequantizeKCachePaged({ cache: createKvCache('v4', { pageSize: 64, numPages: 2 }), tokenIds: claimingList(2 ** 12, 0).list }, { output: 'device' }));
  expect(e.code).toBe('BACKEND_UNAVAILABLE');
});

test.skipIf(!nativeAddonBuilt())('cuda (stand-in): a device cache, device output, a list claiming 2^22 ids: TOO_LARGE from the ids\' host copies, no id read', async () => {
  const load = loadNativeAddon();
  if (!load.ok) throw new Error('no addon');
  const engine = new SparseMlaEngine(new CudaBackend(load.addon, standInTable(load.addon, calls, { downloadsWaitForPrefill: false }), 2, BUDGET));
  made.push(engine);
  const cache = await engine.uploadKvCache(createKvCache('v4', { pageSize: 64, numPages: 2 }));
  const { list, reads } = claimingList(CLAIM, 0);
  const e = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: list }, { output: 'device' }));
  expect([e.code, e.argument]).toEqual(['TOO_LARGE', 'tokenIds']);
  expect(reads).toEqual({ length: 1, elements: 0 });
  const real = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [CLAIM]) }, { output: 'device' }));
  expect(real.message).toBe(e.message);
});
