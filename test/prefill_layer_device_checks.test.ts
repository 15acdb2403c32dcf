/**
 * prefillLayer's checks of a device layer call (a cuda engine's layer loop: every tensor and cache
 * in device memory) run first as one function without messages (prepareDeviceLayer), falling back
 * to the full checks (prepareLayer) for anything it does not pass. Held here on a cuda engine over
 * an addon stand-in whose ops do nothing (no GPU, no addon): for a valid call of every ratio and
 * for each of many changes to it, whatever prepareLayer refuses prepareDeviceLayer refuses too (or
 * throws the very same error), and whatever prepareDeviceLayer passes gives exactly the LayerCall
 * prepareLayer gives; and a refused call reaches no op.
 */
import { describe, expect, test } from 'vitest';
import { outcomeOf } from './helpers/errors.js';
import { SparseMlaError } from '../dist/index.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import type { NativeAddon, NativeCudaOps } from '../dist/backends/native/binding.js';
import { SparseMlaEngine } from '../dist/engine.js';
import { v4PageBytes } from '../dist/kv_cache_layout.js';
import { createPlan, prefillLayer } from '../dist/planner/index.js';
import { layerChecks } from '../dist/planner/prefill_layer_checks.js';
import type { Engine } from '../dist/types.js';
import { StandInStream, standInDevice } from './helpers/stand_in_device.js';

/** The addon's device buffer without a device: a size, a device, freed once freed. */
class StubBuffer {
  readonly device: number;
  freed = false;
  constructor(readonly byteLength: number, stream: { device: number }) {
    this.device = stream.device;
  }
  free(): void {
    this.freed = true;
  }
}
const StubStream = StandInStream;
let opCalls = 0;
const op = (): Promise<void> => {
  opCalls++;
  return Promise.resolve();
};
const ops = new Proxy({ streamClass: () => StubStream, deviceBufferClass: () => StubBuffer, setTiming() {} } as Record<string, unknown>, {
  get: (target, name) => target[name as string] ?? op,
}) as unknown as NativeCudaOps;
const backend = new CudaBackend({} as NativeAddon, ops, 1);
const engine = new SparseMlaEngine(backend);

const N = 256, HQ = 4, TOPK = 64, PAGE = 64;
// a chunk that serves every ratio: c4 entries on pages of 64, c128 entries on pages of 1
const plan = createPlan({
  requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: [0], c128PageTable: [0, 1] }],
  c4PageSize: PAGE,
  c128PageSize: 1,
});
const c0Plan = createPlan({ requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i) }] });

const dev = (dtype: string, shape: unknown[], bytes: number) => ({ dtype, shape, data: backend.alloc(bytes) });
const freedBuffer = (bytes: number) => {
  const b = backend.alloc(bytes);
  b.free();
  return b;
};
const cache = (pageSize: number, pages: number) => ({ format: 'v4', pageSize, numPages: pages, data: backend.alloc(v4PageBytes(pageSize) * pages) });

type Args = Record<string, unknown>;
function validArgs(ratio: 0 | 4 | 128): Args {
  const caches: Record<string, unknown> = { swa: cache(PAGE, N / PAGE) };
  if (ratio === 4) caches.c4 = cache(PAGE, 1);
  if (ratio === 128) caches.c128 = cache(1, 2);
  return {
    plan,
    compressRatio: ratio,
    q: dev('bf16', [N, HQ, 512], N * HQ * 1024),
    caches,
    ...(ratio === 4 ? { topkIndices: dev('int32', [N, TOPK], N * TOPK * 4) } : {}),
    attnSink: dev('float32', [HQ], HQ * 4),
    smScale: 1 / Math.sqrt(512),
    path: 'sparse',
  };
}

type Change = [string, (a: Args) => Args, unknown?];
const withCache = (a: Args, key: string, c: unknown): Args => ({ ...a, caches: { ...(a.caches as object), [key]: c } });
const CHANGES: Change[] = [
  ['valid', (a) => a],
  ['options undefined', (a) => a, undefined],
  ['options {}', (a) => a, {}],
  ['options host', (a) => a, { output: 'host' }],
  ['options output null', (a) => a, { output: null }],
  ['options output gpu', (a) => a, { output: 'gpu' }],
  ['options null', (a) => a, null],
  ['options array', (a) => a, []],
  ['args array', () => [] as unknown as Args],
  ['args null', () => null as unknown as Args],
  ['plan not a Plan', (a) => ({ ...a, plan: {} })],
  ['plan without the ratio', (a) => (a.compressRatio === 0 ? { ...a, compressRatio: 7 } : { ...a, plan: c0Plan })],
  ['ratio 2', (a) => ({ ...a, compressRatio: 2 })],
  ['ratio "4"', (a) => ({ ...a, compressRatio: '4' })],
  ['q float32', (a) => ({ ...a, q: dev('float32', [N, HQ, 512], N * HQ * 2048) })],
  ['q rank 2', (a) => ({ ...a, q: dev('bf16', [N, HQ * 512], N * HQ * 1024) })],
  ['q more queries', (a) => ({ ...a, q: dev('bf16', [N + 1, HQ, 512], (N + 1) * HQ * 1024) })],
  ['q no heads', (a) => ({ ...a, q: dev('bf16', [N, 0, 512], 0) })],
  ['q dim 576', (a) => ({ ...a, q: dev('bf16', [N, HQ, 576], N * HQ * 1152) })],
  ['q shape -1', (a) => ({ ...a, q: dev('bf16', [N, -1, 512], N * HQ * 1024) })],
  ['q shape 1.5', (a) => ({ ...a, q: dev('bf16', [N, 1.5, 512], N * HQ * 1024) })],
  ['q shape "4"', (a) => ({ ...a, q: dev('bf16', [N, '4', 512], N * HQ * 1024) })],
  ['q shape not an array', (a) => ({ ...a, q: { dtype: 'bf16', shape: { 0: N, 1: HQ, 2: 512, length: 3 }, data: backend.alloc(N * HQ * 1024) } })],
  ['q bytes off', (a) => ({ ...a, q: dev('bf16', [N, HQ, 512], N * HQ * 1024 - 2) })],
  ['q freed', (a) => ({ ...a, q: { dtype: 'bf16', shape: [N, HQ, 512], data: freedBuffer(N * HQ * 1024) } })],
  ['q on the host', (a) => ({ ...a, q: { dtype: 'bf16', shape: [N, HQ, 512], data: new Uint16Array(N * HQ * 512) } })],
  ['q without data', (a) => ({ ...a, q: { dtype: 'bf16', shape: [N, HQ, 512] } })],
  ['q null', (a) => ({ ...a, q: null })],
  ['q a branded impostor', (a) => ({ ...a, q: { dtype: 'bf16', shape: [N, HQ, 512], data: { byteLength: N * HQ * 1024, freed: false, [Symbol.for('sparse-mla.DeviceBuffer')]: true } } })],
  ['smScale NaN', (a) => ({ ...a, smScale: NaN })],
  ['smScale inf', (a) => ({ ...a, smScale: Infinity })],
  ['smScale 2^16 + 1', (a) => ({ ...a, smScale: 2 ** 16 + 1 })],
  ['smScale -2^16', (a) => ({ ...a, smScale: -(2 ** 16) })],
  ['smScale string', (a) => ({ ...a, smScale: '0.1' })],
  ['smScale missing', (a) => ({ ...a, smScale: undefined })],
  ['no sink', (a) => ({ ...a, attnSink: undefined })],
  ['sink null', (a) => ({ ...a, attnSink: null })],
  ['sink [hQ + 1]', (a) => ({ ...a, attnSink: dev('float32', [HQ + 1], (HQ + 1) * 4) })],
  ['sink [1, hQ]', (a) => ({ ...a, attnSink: dev('float32', [1, HQ], HQ * 4) })],
  ['sink bf16', (a) => ({ ...a, attnSink: dev('bf16', [HQ], HQ * 2) })],
  ['sink freed', (a) => ({ ...a, attnSink: { dtype: 'float32', shape: [HQ], data: freedBuffer(HQ * 4) } })],
  ['sink on the host', (a) => ({ ...a, attnSink: { dtype: 'float32', shape: [HQ], data: new Float32Array(HQ) } })],
  ['top-k toggled', (a) => (a.compressRatio === 4 ? { ...a, topkIndices: undefined } : { ...a, topkIndices: dev('int32', [N, TOPK], N * TOPK * 4) })],
  ['top-k [n, 1, k]', (a) => ({ ...a, topkIndices: dev('int32', [N, 1, TOPK], N * TOPK * 4) })],
  ['top-k [n, 2, k]', (a) => ({ ...a, topkIndices: dev('int32', [N, 2, TOPK], N * TOPK * 8) })],
  ['top-k [n + 1, k]', (a) => ({ ...a, topkIndices: dev('int32', [N + 1, TOPK], (N + 1) * TOPK * 4) })],
  ['top-k [n]', (a) => ({ ...a, topkIndices: dev('int32', [N], N * 4) })],
  ['top-k [n, k, 1]', (a) => ({ ...a, topkIndices: dev('int32', [N, TOPK, 1], N * TOPK * 4) })],
  ['top-k int64', (a) => ({ ...a, topkIndices: dev('int64', [N, TOPK], N * TOPK * 8) })],
  ['top-k rows too wide for int32', (a) => ({ ...a, topkIndices: dev('int32', [N, 2 ** 23], N * 2 ** 25) })],
  ['top-k freed', (a) => ({ ...a, topkIndices: { dtype: 'int32', shape: [N, TOPK], data: freedBuffer(N * TOPK * 4) } })],
  ['top-k on the host', (a) => ({ ...a, topkIndices: { dtype: 'int32', shape: [N, TOPK], data: new Int32Array(N * TOPK).fill(-1) } })],
  ['caches null', (a) => ({ ...a, caches: null })],
  ['no swa cache', (a) => withCache(a, 'swa', undefined)],
  ['swa v32', (a) => withCache(a, 'swa', { ...cache(PAGE, N / PAGE), format: 'v32' })],
  ['swa pageSize 0', (a) => withCache(a, 'swa', { format: 'v4', pageSize: 0, numPages: N / PAGE, data: backend.alloc(0) })],
  ['swa pageSize 1.5', (a) => withCache(a, 'swa', { format: 'v4', pageSize: 1.5, numPages: N / PAGE, data: backend.alloc(v4PageBytes(PAGE) * (N / PAGE)) })],
  ['swa numPages -1', (a) => withCache(a, 'swa', { format: 'v4', pageSize: PAGE, numPages: -1, data: backend.alloc(0) })],
  ['swa bytes off', (a) => withCache(a, 'swa', { format: 'v4', pageSize: PAGE, numPages: N / PAGE, data: backend.alloc(v4PageBytes(PAGE) * (N / PAGE) - 1) })],
  ['swa freed', (a) => withCache(a, 'swa', { format: 'v4', pageSize: PAGE, numPages: N / PAGE, data: freedBuffer(v4PageBytes(PAGE) * (N / PAGE)) })],
  ['swa too small', (a) => withCache(a, 'swa', cache(PAGE, N / PAGE - 1))],
  ['swa larger', (a) => withCache(a, 'swa', cache(PAGE, N / PAGE + 3))],
  ['swa other page size', (a) => withCache(a, 'swa', cache(32, N / 32))],
  ['swa on the host', (a) => withCache(a, 'swa', { format: 'v4', pageSize: PAGE, numPages: N / PAGE, data: new Uint8Array(v4PageBytes(PAGE) * (N / PAGE)) })],
  ['no c4 cache', (a) => withCache(a, 'c4', undefined)],
  ['c4 pages of 32', (a) => withCache(a, 'c4', cache(32, 2))],
  ['c4 no pages', (a) => withCache(a, 'c4', cache(PAGE, 0))],
  ['c4 freed', (a) => withCache(a, 'c4', { format: 'v4', pageSize: PAGE, numPages: 1, data: freedBuffer(v4PageBytes(PAGE)) })],
  ['c4 on the host', (a) => withCache(a, 'c4', { format: 'v4', pageSize: PAGE, numPages: 1, data: new Uint8Array(v4PageBytes(PAGE)) })],
  ['no c128 cache', (a) => withCache(a, 'c128', undefined)],
  ['c128 one page', (a) => withCache(a, 'c128', cache(1, 1))],
  ['c128 pages of 2', (a) => withCache(a, 'c128', cache(2, 2))],
  ['path paged', (a) => ({ ...a, path: 'paged' })],
  ['path auto', (a) => ({ ...a, path: 'auto' })],
  ['path auto, env paged', (a) => ({ ...a, path: 'auto', env: { SPARSE_MLA_PREFILL: 'paged' } })],
  ['path auto, env bad', (a) => ({ ...a, path: 'auto', env: { SPARSE_MLA_PREFILL: 'gpu' } })],
  ['path auto, threshold', (a) => ({ ...a, path: 'auto', threshold: N })],
  ['path bad', (a) => ({ ...a, path: 'fast' })],
  ['threshold -1', (a) => ({ ...a, path: 'auto', threshold: -1 })],
];


describe('prefillLayer: the device call checks against the full checks', () => {
  test.each([0, 4, 128] as const)('ratio %i: every change refused by prepareLayer is refused by prepareDeviceLayer; a call it passes is the same LayerCall', (ratio) => {
    let passed = 0;
    for (const [name, change, ...rest] of CHANGES) {
      const options = rest.length > 0 ? rest[0] : { output: 'device' };
      const args = change(validArgs(ratio));
      const full = outcomeOf(() => layerChecks.prepareLayer(engine, args as never, options));
      const fast = outcomeOf(() => layerChecks.prepareDeviceLayer(engine, args as never, options));
      if (fast.error !== undefined) {
        // only an error the full checks throw as well (the router's, after the same checks)
        expect(fast.error, name).toEqual(full.error);
      } else if (fast.call !== undefined) {
        expect(full.error, name).toBeUndefined();
        expect(fast.call, name).toEqual(full.call);
        passed++;
      }
      if (name === 'valid') expect(fast.call, 'a valid device call takes the fast checks').toBeDefined();
    }
    expect(passed).toBeGreaterThan(5);
  });

  test.each([0, 4, 128] as const)('ratio %i: a refused device call is a typed error before any op', async (ratio) => {
    for (const [name, change, ...rest] of CHANGES) {
      const options = rest.length > 0 ? rest[0] : { output: 'device' };
      const args = change(validArgs(ratio));
      const full = outcomeOf(() => layerChecks.prepareLayer(engine, args as never, options));
      if (full.error === undefined) continue;
      opCalls = 0;
      await expect(prefillLayer(engine as unknown as Engine, args as never, options as never), name).rejects.toMatchObject(full.error);
      expect(opCalls, name).toBe(0);
    }
  });
});

describe('prefillLayer on a stand-in device that counts its allocations', () => {
  const device = standInDevice();
  // the chunk of `plan` above, a fresh plan each time (nothing kept on any engine yet)
  const freshPlan = () =>
    createPlan({ requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: [0], c128PageTable: [0, 1] }], c4PageSize: PAGE, c128PageSize: 1 });
  const layerArgs = (backend: CudaBackend, ratio: 0 | 4 | 128, path: 'sparse' | 'paged', p = freshPlan()) => {
    const cache = (pageSize: number, pages: number) => ({ format: 'v4', pageSize, numPages: pages, data: backend.alloc(v4PageBytes(pageSize) * pages) });
    const caches: Record<string, unknown> = { swa: cache(PAGE, N / PAGE) };
    if (ratio === 4) caches.c4 = cache(PAGE, 1);
    if (ratio === 128) caches.c128 = cache(1, 2);
    const d = (dtype: string, shape: number[], bytes: number) => ({ dtype, shape, data: backend.alloc(bytes) });
    return { plan: p, compressRatio: ratio, q: d('bf16', [N, HQ, 512], N * HQ * 1024), caches, ...(ratio === 4 ? { topkIndices: d('int32', [N, TOPK], N * TOPK * 4) } : {}), attnSink: d('float32', [HQ], HQ * 4), smScale: 0.04, path };
  };
  const run = async (engine: SparseMlaEngine, args: object, output: 'host' | 'device'): Promise<void> => {
    const r = await prefillLayer(engine as unknown as Engine, args as never, { output });
    if (output === 'device') for (const t of [r.out, r.lse, r.maxLogits]) (t.data as { free(): void }).free();
  };
  const cases = [0, 4, 128].flatMap((ratio) => (['sparse', 'paged'] as const).map((path) => [ratio as 0 | 4 | 128, path] as const));

  test.each(cases)('ratio %i, %s path: a q, sink or cache freed after the call\'s checks, before its launch (a plan\'s first layer awaits between steps), is INVALID_VALUE; no op gets a freed buffer', async (ratio, path) => {
    for (const what of ['q', 'attnSink', 'swa'] as const) {
      const { engine, backend } = device.engine(0);
      const args = layerArgs(backend, ratio, path);
      device.reset();
      const layer = prefillLayer(engine as unknown as Engine, args as never, { output: 'device' });
      (what === 'swa' ? (args.caches.swa as { data: { free(): void } }) : args[what]).data.free();
      const err = await layer.catch((e: unknown) => e);
      expect(err, what).toBeInstanceOf(SparseMlaError);
      expect((err as SparseMlaError).code, what).toBe('INVALID_VALUE');
      expect(device.faults, what).toEqual([]);
    }
  });

  // (a c4 layer down the paged path with host outputs allocates no device memory)
  test.each(cases.flatMap(([r, p]) => (['device', 'host'] as const).map((o) => [r, p, o] as const)).filter(([r, p, o]) => !(r === 4 && p === 'paged' && o === 'host')))('ratio %i, %s path, %s outputs: out of device memory at each allocation of a plan\'s first layer is TOO_LARGE, and what it allocated is freed or kept by the plan (the layer run again holds what an unfailed plan holds)', async (ratio, path, output) => {
    // what the plan keeps on an engine: live allocations after its layers, outputs freed, less the inputs
    const steady = device.engine(0);
    const a = layerArgs(steady.backend, ratio, path);
    device.reset();
    for (let i = 0; i < 2; i++) await run(steady.engine, a, output);
    const kept = device.live.size;
    let failures = 0;
    for (let k = 0; ; k++) {
      const { engine, backend } = device.engine(0);
      const args = layerArgs(backend, ratio, path);
      device.reset();
      device.failAfter = k;
      const err = await run(engine, args, output).then(() => null, (e: unknown) => e);
      device.failAfter = Infinity;
      if (err === null) break;
      failures++;
      expect(err, `allocation ${k + 1}`).toBeInstanceOf(SparseMlaError);
      expect((err as SparseMlaError).code, `allocation ${k + 1}`).toBe('TOO_LARGE');
      for (let i = 0; i < 2; i++) await run(engine, args, output);
      expect(device.live.size, `allocation ${k + 1} failed`).toBe(kept);
    }
    expect(failures).toBeGreaterThan(0);
  });

  // (a c4 layer down the paged path keeps nothing on the device: its form is built per layer)
  test.each(cases.filter(([r, p]) => !(r === 4 && p === 'paged')))('ratio %i, %s path: plan.release() frees what the plan keeps on the device; the next layer builds it again', async (ratio, path) => {
    const { engine, backend } = device.engine(0);
    const p = freshPlan();
    const args = layerArgs(backend, ratio, path, p);
    device.reset(); // counts from here: the layers' own allocations, not the inputs
    for (let i = 0; i < 3; i++) await run(engine, args, 'device');
    const kept = device.live.size;
    expect(kept, 'a plan keeps rows, ids or a workspace').toBeGreaterThan(0);
    const builds = { ...p.deviceStats };
    p.release();
    expect(device.live.size).toBe(0);
    expect(device.faults).toEqual([]);
    for (let i = 0; i < 3; i++) await run(engine, args, 'device');
    expect(device.live.size).toBe(kept);
    expect(device.faults).toEqual([]);
    const rebuilt = (Object.keys(builds) as (keyof typeof builds)[]).filter((k) => p.deviceStats[k] > builds[k] && /Builds|Uploads|Allocations/.test(k));
    expect(rebuilt.length, 'the next layer built again what it needs').toBeGreaterThan(0);
  });

  test('a c4 layer down the paged path whose device top-k lies on another device is INVALID_VALUE naming topkIndices', async () => {
    const { engine, backend } = device.engine(0);
    const other = device.engine(1);
    const args = layerArgs(backend, 4, 'paged');
    const t = args.topkIndices!;
    const err = await prefillLayer(engine as unknown as Engine, { ...args, topkIndices: { ...t, data: other.backend.alloc(t.data.byteLength) } } as never).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SparseMlaError);
    expect(err).toMatchObject({ code: 'INVALID_VALUE', argument: 'topkIndices' });
    expect(device.faults).toEqual([]);
  });

  test('a chunk without queries: out of device memory at its second or third output is TOO_LARGE with nothing left allocated', async () => {
    const empty = createPlan({ requests: [{ seqLen: 64, extendLen: 0, swaTokenIds: new Int32Array(0) }] });
    for (let k = 0; k < 3; k++) {
      const { engine, backend } = device.engine(0);
      const args = { plan: empty, compressRatio: 0, q: { dtype: 'bf16', shape: [0, HQ, 512], data: backend.alloc(0) }, caches: { swa: { format: 'v4', pageSize: 64, numPages: 1, data: backend.alloc(v4PageBytes(64)) } }, smScale: 0.04, path: 'sparse' };
      device.reset();
      device.failAfter = k;
      await expect(prefillLayer(engine as unknown as Engine, args as never, { output: 'device' })).rejects.toMatchObject({ code: 'TOO_LARGE' });
      device.failAfter = Infinity;
      expect(device.live.size, `allocation ${k + 1} fails`).toBe(0);
    }
  });
});
