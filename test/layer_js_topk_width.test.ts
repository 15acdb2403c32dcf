/**
 * A device c4 layer's top-k rows width (SPEC §6: roundUp(topk + window, align)) is kept by its plan
 * for the last top-k width a layer gave (Plan.deviceTopk), so a layer loop does not work it out
 * again every layer. Held here on a stand-in cuda engine (no GPU, no addon): layers whose top-k
 * width changes from call to call, on plans of other windows and alignments, each get the width of
 * their own top-k and plan, written out here from the rule, and the same LayerCall as the full
 * checks (prepareLayer) give; a width too wide for int32 rows after a kept one is still refused.
 */
import { expect, test } from 'vitest';
import { SparseMlaError, createPlan } from '../dist/index.js';
import { v4PageBytes } from '../dist/kv_cache_layout.js';
import { layerChecks } from '../dist/planner/prefill_layer_checks.js';
import { standInDevice } from './helpers/stand_in_device.js';
import { testRng } from './helpers/random.js';

const rng = testRng('layer_js_topk_width');
const { engine, backend } = standInDevice().engine(0);
const N = 256, HQ = 2, PAGE = 64;

const makePlan = (window: number, align: number) =>
  createPlan({ requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: [0] }], c4PageSize: PAGE }, { window, align });
const args = (plan: unknown, topk: number) => ({
  plan,
  compressRatio: 4,
  q: { dtype: 'bf16', shape: [N, HQ, 512], data: backend.alloc(N * HQ * 1024) },
  caches: { swa: { format: 'v4', pageSize: PAGE, numPages: N / PAGE, data: backend.alloc(v4PageBytes(PAGE) * (N / PAGE)) }, c4: { format: 'v4', pageSize: PAGE, numPages: 1, data: backend.alloc(v4PageBytes(PAGE)) } },
  topkIndices: { dtype: 'int32', shape: [N, topk], data: backend.alloc(N * topk * 4) },
  smScale: 0.04,
  path: 'sparse',
});

test('each device c4 call gets the rows width of its own top-k and plan, whatever width the call before it had', () => {
  const plans = [
    { plan: makePlan(128, 64), window: 128, align: 64 },
    { plan: makePlan(100, 16), window: 100, align: 16 },
    { plan: makePlan(64, 1), window: 64, align: 1 },
  ];
  for (let i = 0; i < 60; i++) {
    const { plan, window, align } = rng.pick(plans);
    // a top-k of the last call's width half the time, a fresh one otherwise
    const topk = rng.pick([1, 7, 64, 100, 512, rng.int(0, 700)]);
    const a = args(plan, topk);
    const fast = layerChecks.prepareDeviceLayer(engine, a as never, { output: 'device' });
    const full = layerChecks.prepareLayer(engine, a as never, { output: 'device' });
    const label = `call ${i}: window ${window}, align ${align}, top-k ${topk}`;
    expect(fast, label).toBeDefined();
    expect(fast!.topk!.width, label).toBe(Math.ceil((topk + window) / align) * align);
    expect(fast, label).toEqual(full);
  }
});

test('a top-k too wide for int32 rows is refused after a kept width, as the full checks refuse it', () => {
  const plan = makePlan(128, 64);
  expect(layerChecks.prepareDeviceLayer(engine, args(plan, 512) as never, { output: 'device' })).toBeDefined();
  // N · width > 2^31 − 1 (no buffer this large is allocated: the stand-in's are sizes only)
  const wide = 2 ** 23;
  const a = args(plan, wide);
  expect(layerChecks.prepareDeviceLayer(engine, a as never, { output: 'device' })).toBeUndefined();
  expect(() => layerChecks.prepareLayer(engine, a as never, { output: 'device' })).toThrow(SparseMlaError);
  expect(layerChecks.prepareDeviceLayer(engine, args(plan, 512) as never, { output: 'device' })!.topk!.width).toBe(640);
});
