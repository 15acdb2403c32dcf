/**
 * A cuda engine's layer reads each of its arguments once, also where its fast device checks
 * (prefill_layer_checks.ts, prepareDeviceLayer) leave the call to the full checks (prepareLayer): a host
 * operand, host caches, a host top-k, or input the full checks refuse. Every field of the call (its
 * args and options, each tensor's dtype, shape and data, each shape's length and dims, the caches
 * and each cache's fields, the env) is a getter here that counts its reads and throws on a second
 * one, as the API fuzzer's `read-twice` getters do. Each call's result is held to the float64
 * reference (SPEC §4.1's bounds), or its refusal to the error the same call without getters gets,
 * and every getter to one read. On a stand-in device that computes (helpers/computing_device.ts:
 * the addon's CPU core behind the CUDA op table; no GPU).
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, tensor } from '../dist/index.js';
import type { DeviceTensor, Engine, KvCache, Plan, PrefillLayerArgs, PrefillLayerOptions, Tensor } from '../dist/index.js';
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
import { randomBf16Bits, testRng } from './helpers/random.js';

const rng = testRng('cuda_layer_read_once');
const D = 512;

/** A getter read a second time (what the fuzzer's `read-twice` getters throw). */
class SecondRead extends Error {}

/** Each counted field's path and how many times it was read. */
type Reads = Map<string, number>;

/**
 * `value` with every field of its plain objects (the args, options, tensors, caches, env) a getter
 * counting its reads in `reads` and throwing SecondRead on the second, and every array (a shape) a
 * Proxy counting its length and elements the same way. Typed arrays, device buffers and plans are
 * taken as they are.
 */
function counted<T>(value: T, path: string, reads: Reads): T {
  const note = (p: string) => {
    const n = (reads.get(p) ?? 0) + 1;
    reads.set(p, n);
    if (n > 1) throw new SecondRead(`${p} read a second time`);
  };
  if (Array.isArray(value)) {
    const elements = value.map((v, i) => {
      reads.set(`${path}[${i}]`, 0);
      return counted(v, `${path}[${i}]`, reads);
    });
    reads.set(`${path}.length`, 0);
    return new Proxy(elements, {
      get(target, key, receiver) {
        if (key === 'length') note(`${path}.length`);
        else if (typeof key === 'string' && /^\d+$/.test(key)) note(`${path}[${key}]`);
        return Reflect.get(target, key, receiver);
      },
    }) as T;
  }
  if (typeof value !== 'object' || value === null || Object.getPrototypeOf(value) !== Object.prototype) return value;
  const out = {};
  for (const [key, inner] of Object.entries(value)) {
    const p = `${path}.${key}`;
    const wrapped = counted(inner, p, reads);
    reads.set(p, 0);
    Object.defineProperty(out, key, {
      enumerable: true,
      get() {
        note(p);
        return wrapped;
      },
    });
  }
  return out as T;
}

/** Fields a layer call need not read: none but those named (read at most once all the same). */
function expectEachReadOnce(label: string, reads: Reads, notNeeded: readonly string[] = []): void {
  const twice = [...reads].filter(([, n]) => n > 1).map(([p]) => p);
  expect(twice, `${label}: read more than once`).toEqual([]);
  const unread = [...reads].filter(([p, n]) => n === 0 && !notNeeded.some((x) => p.startsWith(x))).map(([p]) => p);
  expect(unread, `${label}: never read`).toEqual([]);
}

const load = nativeAddonBuilt() ? loadNativeAddon() : undefined;
const addon = load?.ok ? load.addon : (undefined as never);
const calls: OpCall[] = [];
const held = { downloadsWaitForPrefill: false };
const newEngine = (): Engine => new SparseMlaEngine(new CudaBackend(addon, standInTable(addon, calls, held), 2)) as unknown as Engine;

/** A layer's device outputs on the host, for the reference. */
async function onHost(engine: Engine, r: { out: Tensor<'bf16'> | DeviceTensor<'bf16'>; lse: Tensor<'float32'> | DeviceTensor<'float32'>; maxLogits: Tensor<'float32'> | DeviceTensor<'float32'> }) {
  const host = async <T extends Tensor<'bf16'> | Tensor<'float32'>>(t: T | DeviceTensor<'bf16' | 'float32'>): Promise<T> => (isDeviceBuffer(t.data) ? ((await engine.download(t as DeviceTensor<'bf16' | 'float32'>)) as T) : (t as T));
  return { out: await host<Tensor<'bf16'>>(r.out), lse: await host<Tensor<'float32'>>(r.lse), maxLogits: await host<Tensor<'float32'>>(r.maxLogits) };
}

/** One random chunk with c4 and c128 caches, its operands on the host, and their references per ratio. */
function layerInputs() {
  const sc = randomScenario(rng, [rng.int(200, 400), rng.int(60, 140)], [rng.int(8, 24), rng.int(8, 24)]);
  const hQ = rng.pick([4, 8]), nq = sc.numQueries, smScale = 0.04 + 0.04 * rng.uniform();
  const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages), c128 = randomCache(rng, sc.c128PageSize, sc.c128Pages);
  const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
  const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
  const topkIndices = randomTopk(rng, sc, rng.int(16, 48));
  const ref = (ratio: 0 | 4 | 128, sink = true) =>
    prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches: ratio === 0 ? { swa } : ratio === 4 ? { swa, c4 } : { swa, c128 }, ...(ratio === 4 ? { topkIndices } : {}), ...(sink ? { attnSink } : {}), smScale });
  return { sc, hQ, nq, smScale, swa, c4, c128, q, attnSink, topkIndices, ref };
}

type Inputs = ReturnType<typeof layerInputs>;
type Placed = { q: Tensor<'bf16'> | DeviceTensor<'bf16'>; swa: KvCache | Awaited<ReturnType<Engine['uploadKvCache']>>; c4: KvCache | Awaited<ReturnType<Engine['uploadKvCache']>>; c128: KvCache | Awaited<ReturnType<Engine['uploadKvCache']>>; attnSink: Tensor<'float32'> | DeviceTensor<'float32'>; topkIndices: Tensor<'int32'> | DeviceTensor<'int32'> };

/** The inputs on `engine`: each on the device unless named in `host`. */
async function place(engine: Engine, x: Inputs, host: readonly (keyof Placed)[]): Promise<Placed> {
  const on = <T,>(name: keyof Placed, hostValue: T, device: () => Promise<unknown>) => (host.includes(name) ? Promise.resolve(hostValue) : device());
  const [q, swa, c4, c128, attnSink, topkIndices] = await Promise.all([
    on('q', x.q, () => engine.upload(x.q)),
    on('swa', x.swa, () => engine.uploadKvCache(x.swa)),
    on('c4', x.c4, () => engine.uploadKvCache(x.c4)),
    on('c128', x.c128, () => engine.uploadKvCache(x.c128)),
    on('attnSink', x.attnSink, () => engine.upload(x.attnSink)),
    on('topkIndices', x.topkIndices, () => engine.upload(x.topkIndices)),
  ]);
  return { q, swa, c4, c128, attnSink, topkIndices } as Placed;
}

/** A fallback case: a layer's ratio, which operands stay on the host, its path and options. */
interface Case {
  name: string;
  ratio: 0 | 4 | 128;
  host: readonly (keyof Placed)[];
  path?: 'sparse' | 'paged' | 'auto';
  env?: Record<string, string>;
  options: PrefillLayerOptions;
  /** fields the call need not read (the env where the path is forced) */
  notNeeded?: readonly string[];
}

const CASES: Case[] = [
  { name: 'c4, every operand on the device but a host top-k (the fast checks stop at the top-k)', ratio: 4, host: ['topkIndices'], path: 'sparse', options: { output: 'device' }, notNeeded: ['args.env'] },
  { name: 'c4, a host top-k, path auto and an env forcing paged (the route decided before the fast checks stop)', ratio: 4, host: ['topkIndices'], path: 'auto', env: { SPARSE_MLA_PREFILL: 'paged' }, options: { output: 'host' } },
  { name: 'c0, a host q (stopped at q, its every dim read)', ratio: 0, host: ['q'], path: 'sparse', options: { output: 'host' }, notNeeded: ['args.env'] },
  { name: 'c128, host caches (stopped at caches.swa)', ratio: 128, host: ['swa', 'c128'], path: 'sparse', options: { output: 'device', dropped: 'await' }, notNeeded: ['args.env'] },
  { name: 'c128, a device SWA cache and a host c128 cache (stopped at caches.c128)', ratio: 128, host: ['c128'], path: 'paged', options: { output: 'host' }, notNeeded: ['args.env'] },
  { name: 'c4, a host sink (stopped at attnSink)', ratio: 4, host: ['attnSink'], path: 'sparse', options: { output: 'device', dropped: 'later' }, notNeeded: ['args.env'] },
];

/** The call's args (each field a counted getter where `reads` is given). */
function layerArgs(plan: Plan, c: Case, p: Placed, smScale: number): PrefillLayerArgs {
  const caches = c.ratio === 0 ? { swa: p.swa } : c.ratio === 4 ? { swa: p.swa, c4: p.c4 } : { swa: p.swa, c128: p.c128 };
  return {
    plan,
    compressRatio: c.ratio,
    q: p.q,
    caches,
    ...(c.ratio === 4 ? { topkIndices: p.topkIndices } : {}),
    attnSink: p.attnSink,
    smScale,
    ...(c.path !== undefined ? { path: c.path } : {}),
    env: c.env ?? {},
  } as PrefillLayerArgs;
}

describe.skipIf(!nativeAddonBuilt())('cuda (stand-in device): a layer the fast checks leave to the full checks reads each argument once', () => {
  test.each(CASES)('$name', async (c) => {
    const x = layerInputs();
    const engine = newEngine();
    try {
      const plan = createPlan(x.sc.chunk);
      const placed = await place(engine, x, c.host);
      const reads: Reads = new Map();
      const args = counted(layerArgs(plan, c, placed, x.smScale), 'args', reads);
      const options = counted(c.options, 'options', reads);
      const r = await prefillLayer(engine, args, options);
      expectEachReadOnce(c.name, reads, c.notNeeded);
      const ref = x.ref(c.ratio);
      expectWithinBounds(c.name, await onHost(engine, r), ref, Array.from({ length: x.nq }, (_, i) => i));
      if (c.options.dropped === 'later' && r.dropped === null) expect(await plan.settleDropped()).toBe(ref.dropped);
      else expect(r.dropped).toBe(ref.dropped);
    } finally {
      await engine.dispose();
    }
  }, 60_000);

  /** A refused call: the same error as the call without getters, each field read once. */
  const REFUSED: { name: string; ratio: 0 | 4 | 128; host: readonly (keyof Placed)[]; change: (a: PrefillLayerArgs, engine: Engine, x: Inputs) => Promise<PrefillLayerArgs>; options: PrefillLayerOptions; code: string; argument: string }[] = [
    {
      name: 'a device sink one head short (stopped at its dim)',
      ratio: 0,
      host: [],
      change: async (a, engine, x) => ({ ...a, attnSink: await engine.upload(tensor('float32', [x.hQ - 1], x.attnSink.data.subarray(1))) }),
      options: { output: 'device' },
      code: 'INVALID_SHAPE',
      argument: 'attnSink',
    },
    {
      name: "options.dropped 'soon' (stopped at the options)",
      ratio: 0,
      host: [],
      change: async (a) => a,
      options: { output: 'device', dropped: 'soon' as never },
      code: 'INVALID_VALUE',
      argument: 'options.dropped',
    },
    {
      name: 'a device top-k [numQueries, 2, topk] (stopped at its second dim)',
      ratio: 4,
      host: [],
      change: async (a, engine, x) => ({ ...a, topkIndices: await engine.upload(tensor('int32', [x.nq, 2, 8], new Int32Array(x.nq * 16).fill(-1))) }),
      options: { output: 'device' },
      code: 'INVALID_SHAPE',
      argument: 'topkIndices',
    },
    {
      name: 'a device c128 cache of another page size (stopped at caches.c128)',
      ratio: 128,
      host: [],
      change: async (a, engine, x) => ({ ...a, caches: { swa: a.caches.swa, c128: await engine.uploadKvCache(randomCache(rng, x.sc.c128PageSize + 1, x.sc.c128Pages)) } }),
      options: { output: 'device' },
      code: 'INVALID_VALUE',
      argument: 'caches.c128.pageSize',
    },
    {
      name: 'a q of rank 4 (stopped at its length)',
      ratio: 0,
      host: [],
      change: async (a, engine, x) => ({ ...a, q: await engine.upload(tensor('bf16', [x.nq, x.hQ, 1, D], x.q.data)) }),
      options: { output: 'device' },
      code: 'INVALID_SHAPE',
      argument: 'q',
    },
    // the refusals below build their message from what was read (the dtype as read, not asked
    // again; the shape's length as read, its first dims read once for the message)
    {
      name: 'a device q whose dtype is a number (stopped at its dtype; the message describes q as read)',
      ratio: 0,
      host: [],
      change: async (a) => ({ ...a, q: { dtype: 7, shape: [...a.q.shape], data: a.q.data } as never }),
      options: { output: 'device' },
      code: 'INVALID_VALUE',
      argument: 'q',
    },
    {
      name: 'a device q whose shape holds 65 dims (stopped at its length; the message shows its first dims)',
      ratio: 0,
      host: [],
      change: async (a) => ({ ...a, q: { dtype: 'bf16', shape: [...a.q.shape, ...Array.from({ length: 62 }, () => 1)], data: a.q.data } as never }),
      options: { output: 'device' },
      code: 'INVALID_SHAPE',
      argument: 'q.shape',
    },
    {
      name: 'a device top-k whose shape holds 65 dims (stopped at its length, after the route)',
      ratio: 4,
      host: [],
      change: async (a) => {
        const t = a.topkIndices!;
        return { ...a, topkIndices: { dtype: 'int32', shape: [...t.shape, ...Array.from({ length: 65 - t.shape.length }, () => 1)], data: t.data } as never };
      },
      options: { output: 'device' },
      code: 'INVALID_SHAPE',
      argument: 'topkIndices.shape',
    },
  ];

  test.each(REFUSED)('refused: $name', async (c) => {
    const x = layerInputs();
    const engine = newEngine();
    try {
      const plan = createPlan(x.sc.chunk);
      const placed = await place(engine, x, c.host);
      const plain = await c.change(layerArgs(plan, { name: c.name, ratio: c.ratio, host: c.host, path: 'sparse', options: c.options }, placed, x.smScale), engine, x);
      const expected = await errorOf(() => prefillLayer(engine, plain, c.options));
      expect(expected, c.name).toBeInstanceOf(SparseMlaError);
      expect({ code: (expected as SparseMlaError).code, argument: (expected as SparseMlaError).argument }, c.name).toEqual({ code: c.code, argument: c.argument });
      const reads: Reads = new Map();
      const got = await errorOf(() => prefillLayer(engine, counted(plain, 'args', reads), counted(c.options, 'options', reads)));
      expect(got, c.name).toBeInstanceOf(SparseMlaError);
      expect({ code: (got as SparseMlaError).code, argument: (got as SparseMlaError).argument, message: (got as Error).message }, c.name).toEqual({
        code: (expected as SparseMlaError).code,
        argument: (expected as SparseMlaError).argument,
        message: (expected as Error).message,
      });
      const twice = [...reads].filter(([, n]) => n > 1).map(([p]) => p);
      expect(twice, `${c.name}: read more than once`).toEqual([]);
    } finally {
      await engine.dispose();
    }
  }, 60_000);

  // Each shard's q on its engine. Without a sink and with a host top-k, each shard's fast checks
  // stop at its top-k and the full checks read the caller's per-shard caches and top-k; a sharded
  // layer's sink is cut on the host per shard, so with one each shard's call goes to the full checks
  // at once (checkLayer's hostOperand), its caches and top-k on the device.
  test.each([
    ['host top-k (each shard stops at its top-k), path sparse', { route: { path: 'sparse' as const }, deviceTopk: false, sink: false }],
    ['host top-k (each shard stops at its top-k), path auto and an env forcing sparse, read once for both shards', { route: { path: 'auto' as const, env: { SPARSE_MLA_PREFILL: 'sparse' } }, deviceTopk: false, sink: false }],
    ["device top-k and a host sink (the shards' calls go to the full checks at once)", { route: { path: 'sparse' as const }, deviceTopk: true, sink: true, options: { output: 'host' as const } }],
  ])('prefillLayerSharded by queries over two engines: per-shard device q and caches, %s', async (name, { route, deviceTopk, sink, options }: { route: object; deviceTopk: boolean; sink: boolean; options?: { output: 'host' } }) => {
    const x = layerInputs();
    const engines = [newEngine(), newEngine()];
    try {
      const sharded = createShardedPlan(x.sc.chunk, { shards: 2, split: 'queries' });
      const k = x.topkIndices.shape[1]!;
      const qs = await Promise.all(sharded.shards.map((s, i) => engines[i]!.upload(tensor('bf16', [s.numQueries, x.hQ, D], x.q.data.slice(s.queryOffset * x.hQ * D, (s.queryOffset + s.numQueries) * x.hQ * D)))));
      const caches = await Promise.all(engines.map(async (e) => ({ swa: await e.uploadKvCache(x.swa), c4: await e.uploadKvCache(x.c4) })));
      const hostTopks = sharded.shards.map((s) => tensor('int32', [s.numQueries, k], x.topkIndices.data.slice(s.queryOffset * k, (s.queryOffset + s.numQueries) * k)));
      const topks = deviceTopk ? await Promise.all(hostTopks.map((t, i) => engines[i]!.upload(t))) : hostTopks;
      const reads: Reads = new Map();
      const args = counted({ plan: sharded, compressRatio: 4 as const, q: qs, caches, topkIndices: topks, ...(sink ? { attnSink: x.attnSink } : {}), smScale: x.smScale, ...route }, 'args', reads);
      const r = await (options ? prefillLayerSharded(engines, args, options) : prefillLayerSharded(engines, args));
      expectEachReadOnce(name, reads);
      const ref = x.ref(4, sink);
      expectWithinBounds(name, { out: r.out!, lse: r.lse!, maxLogits: r.maxLogits! }, ref, Array.from({ length: x.nq }, (_, i) => i));
      expect(r.dropped).toBe(ref.dropped);
    } finally {
      for (const e of engines) await e.dispose();
    }
  }, 60_000);

  test('prefillLayerSharded by heads over two engines: per-shard device q, host caches per shard (each shard stops at caches.swa)', async () => {
    const x = layerInputs();
    const engines = [newEngine(), newEngine()];
    try {
      const sharded = createShardedPlan(x.sc.chunk, { shards: 2, split: 'heads' });
      const half = x.hQ / 2;
      const heads = (h0: number) => {
        const out = new Uint16Array(x.nq * half * D);
        for (let i = 0; i < x.nq; i++) out.set(x.q.data.subarray((i * x.hQ + h0) * D, (i * x.hQ + h0 + half) * D), i * half * D);
        return tensor('bf16', [x.nq, half, D], out);
      };
      const qs = await Promise.all([engines[0]!.upload(heads(0)), engines[1]!.upload(heads(half))]);
      const reads: Reads = new Map();
      const args = counted({ plan: sharded, compressRatio: 128 as const, q: qs, caches: [{ swa: x.swa, c128: x.c128 }, { swa: x.swa, c128: x.c128 }], smScale: x.smScale, path: 'paged' as const }, 'args', reads);
      const r = await prefillLayerSharded(engines, args, { output: 'host' });
      expectEachReadOnce('sharded by heads', reads);
      const ref = x.ref(128, false);
      expectWithinBounds('sharded by heads', { out: r.out!, lse: r.lse!, maxLogits: r.maxLogits! }, ref, Array.from({ length: x.nq }, (_, i) => i));
      expect(r.dropped).toBe(ref.dropped);
    } finally {
      for (const e of engines) await e.dispose();
    }
  }, 60_000);

  // prefillLayerSharded took its per-shard lists with Array.prototype.slice, which makes its result
  // with the array's own constructor and reads as many elements as a Proxy's length claims
  test('prefillLayerSharded: engines and per-shard lists are read by index (an array whose prototype is Int32Array.prototype runs; a Proxy claiming 2^40 engines is refused by its length)', async () => {
    const x = layerInputs();
    const engines = [newEngine(), newEngine()];
    try {
      const sharded = createShardedPlan(x.sc.chunk, { shards: 2, split: 'queries' });
      const caches = await Promise.all(engines.map(async (e) => ({ swa: await e.uploadKvCache(x.swa) })));
      const foreign = <T,>(a: T[]): T[] => Object.setPrototypeOf(a, Int32Array.prototype) as T[];
      const r = await prefillLayerSharded(foreign([...engines]), { plan: sharded, compressRatio: 0, q: x.q, caches: foreign([...caches]), attnSink: x.attnSink, smScale: x.smScale, path: 'sparse' });
      const ref = x.ref(0);
      expectWithinBounds('engines of a foreign prototype', { out: r.out!, lse: r.lse!, maxLogits: r.maxLogits! }, ref, Array.from({ length: x.nq }, (_, i) => i));
      expect(r.dropped).toBe(ref.dropped);
      const claims = new Proxy([...engines], { get: (t, k) => (k === 'length' ? 2 ** 40 : Reflect.get(t, k)) });
      await expect(prefillLayerSharded(claims, { plan: sharded, compressRatio: 0, q: x.q, caches: caches[0]!, smScale: x.smScale })).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'engines' });
    } finally {
      for (const e of engines) await e.dispose();
    }
  }, 60_000);
});
