/**
 * The host memory a layer call owns (SPEC §9, README "Memory a call owns"): prefillLayer copies its
 * host q, sink and top-k at the call into a slab lent by the engine's staging, and its ops read
 * that copy in place instead of staging it again (one copy of q a layer, not two); the slab goes
 * back when the layer settles, also when it fails or when another shard's check refuses the call;
 * a sharded layer split by heads cuts each shard's heads of q once, straight into such a slab;
 * lent slabs never wait and never make staging wait; a layer whose copies and outputs exceed the
 * budget is TOO_LARGE before any work; a cuda dequant counts the ids the addon widens.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import { createPlan, createShardedPlan, prefillLayer, prefillLayerSharded } from '../dist/planner/index.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import { engineBackend } from '../dist/engine.js';
import { StagingArena, copyAtCall } from '../dist/backends/staging.js';
import { callCopyBytes } from '../dist/backends/memory.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import type { NativeAddon, NativeCudaOps } from '../dist/backends/native/binding.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import type { CpuBackend } from '../dist/backends/native/cpu_backend.js';
import type { Engine } from '../dist/types.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { StandInStream, standInDevice } from './helpers/stand_in_device.js';

const rng = testRng('call_copies');
const BACKENDS = nativeAddonBuilt() ? (['wasm', 'cpu'] as const) : (['wasm'] as const);
const KiB = 1024;
const D = 512;

describe('StagingArena: slabs lent for a call’s copies', () => {
  test('a lend is served at once when staging holds the whole capacity, and does not make a staging request wait', async () => {
    const arena = new StagingArena(1024 * KiB);
    const busy = arena.tryAcquire(1024 * KiB)!;
    expect(busy).not.toBeNull();
    const lent = arena.lend(512 * KiB); // nothing is free, the capacity is taken: served all the same
    expect(lent.byteLength).toBeGreaterThanOrEqual(512 * KiB);
    expect(arena.lentBytes).toBe(lent.byteLength);
    arena.release(busy);
    // the lent slab is still out: a staging request of the whole capacity is served from the busy slab given back
    const again = arena.tryAcquire(1024 * KiB);
    expect(again).toBe(busy);
    arena.release(again!);
    arena.giveBack(lent);
    expect(arena.lentBytes).toBe(0);
    expect(arena.heldBytes).toBeLessThanOrEqual(arena.capacityBytes);
  });

  test('a slab given back is reused by the next lend and the next staging request (no new allocation); free slabs stay within the capacity', () => {
    const arena = new StagingArena(4096 * KiB);
    const a = arena.lend(1000 * KiB);
    arena.giveBack(a);
    const allocations = arena.allocations;
    const b = arena.lend(900 * KiB);
    expect(b).toBe(a);
    arena.giveBack(b);
    const c = arena.tryAcquire(800 * KiB);
    expect(c).toBe(a);
    arena.release(c!);
    expect(arena.allocations).toBe(allocations);
    // lent slabs beyond the capacity: given back, only what the capacity holds is kept free
    const big = [arena.lend(3000 * KiB), arena.lend(3000 * KiB)];
    for (const s of big) arena.giveBack(s);
    expect(arena.lentBytes).toBe(0);
    expect(arena.heldBytes).toBeLessThanOrEqual(arena.capacityBytes);
  });

  test('copyAtCall: unshared arrays copied into one lent slab and marked as the call’s copies, shared ones taken as they are; release is once', () => {
    const arena = new StagingArena(1024 * KiB);
    const q = randomBf16Bits(rng, 3 * 512);
    const shared = new Float32Array(new SharedArrayBuffer(16));
    const ids = Int32Array.from({ length: 7 }, () => rng.int(0, 100));
    const copies = copyAtCall(arena, [q, shared, ids, null] as const);
    const [qc, sc, ic, none] = copies.views;
    expect(qc).not.toBe(q);
    expect(qc.buffer).toBeInstanceOf(SharedArrayBuffer);
    expect(ic.buffer).toBe(qc.buffer);
    expect(Array.from(qc)).toEqual(Array.from(q));
    expect(Array.from(ic)).toEqual(Array.from(ids));
    expect(sc).toBe(shared);
    expect(none).toBeNull();
    expect(callCopyBytes([qc, sc, ic, q, ids])).toBe(q.byteLength + ids.byteLength);
    q.fill(1);
    expect(qc[0]).not.toBe(1); // (randomBf16Bits never gives 1: a denormal bit pattern)
    expect(arena.lentBytes).toBeGreaterThan(0);
    copies.release();
    copies.release();
    expect(arena.lentBytes).toBe(0);
  });
});

describe.each(BACKENDS)('%s: prefillLayer copies its host q once', (backend) => {
  let engine: Engine;
  let impl: WasmBackend | CpuBackend;
  beforeAll(async () => {
    engine = await createEngine({ backend, workers: 2 });
    impl = engineBackend(engine) as WasmBackend | CpuBackend;
  });
  afterAll(async () => engine?.dispose());

  test.each([0, 4, 128] as const)('ratio %i, both paths: the ops read the copy taken at the call in place (no staging request as large as q), results as the reference; the slab goes back', async (ratio) => {
    const sc = randomScenario(rng, [rng.int(200, 300), rng.int(20, 40)], [rng.int(6, 12), rng.int(4, 8)]);
    // q (10-20 queries: ≥ 1.25 MiB) far larger than anything else the ops stage (index rows, lengths, gathered
    // tokens, the paged op's unshared caches with their ids: under 0.7 MiB here; hQ 32 let a 10-query q fall below them)
    const hQ = 128;
    const caches = { swa: randomCache(rng, 64, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages), c128: randomCache(rng, sc.c128PageSize, sc.c128Pages) };
    const q = tensor('bf16', [sc.numQueries, hQ, D], randomBf16Bits(rng, sc.numQueries * hQ * D, 1));
    const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
    const topkIndices = ratio === 4 ? randomTopk(rng, sc, 32) : undefined;
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, attnSink, smScale: 0.04, ...(topkIndices ? { topkIndices } : {}) });
    const plan = createPlan(sc.chunk);
    const arena = impl.staging;
    // each op's q, and how much of it is a copy the call holds, as the op sees it when it is called
    const seenQ: { q: Uint16Array; callCopy: number }[] = [];
    const requests: number[] = [];
    const { sparsePrefill, pagedSparseAttention } = impl;
    const tryAcquire = arena.tryAcquire;
    impl.sparsePrefill = (job) => (seenQ.push({ q: job.q, callCopy: callCopyBytes([job.q]) }), sparsePrefill.call(impl, job));
    impl.pagedSparseAttention = (job) => (seenQ.push({ q: job.q, callCopy: callCopyBytes([job.q]) }), pagedSparseAttention.call(impl, job));
    arena.tryAcquire = (bytes: number) => (requests.push(bytes), tryAcquire.call(arena, bytes));
    try {
      for (const path of ['sparse', 'paged'] as const) {
        seenQ.length = 0;
        requests.length = 0;
        const got = await prefillLayer(engine, { q, compressRatio: ratio, plan, caches, attnSink, smScale: 0.04, path, ...(topkIndices ? { topkIndices } : {}) });
        expectWithinBounds(`${backend} c${ratio} ${path}`, got, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
        expect(seenQ.length, path).toBe(1);
        const opQ = seenQ[0]!;
        expect(opQ.q).not.toBe(q.data);
        expect(opQ.q.buffer, path).toBeInstanceOf(SharedArrayBuffer);
        expect(opQ.callCopy, path).toBe(q.data.byteLength);
        expect(callCopyBytes([opQ.q]), `${path}: no longer the call's once it settled`).toBe(0);
        expect(requests.filter((b) => b >= q.data.byteLength), `${path}: staging requests of q's size or more (q staged again)`).toEqual([]);
        expect(arena.lentBytes, path).toBe(0);
      }
    } finally {
      impl.sparsePrefill = sparsePrefill;
      impl.pagedSparseAttention = pagedSparseAttention;
      arena.tryAcquire = tryAcquire;
    }
  }, 60_000);

  test('a layer that fails after its call (its cache detached meanwhile) gives its slab back', async () => {
    const sc = randomScenario(rng, [rng.int(100, 200)], [rng.int(4, 10)]);
    const hQ = 4;
    const swa = randomCache(rng, 64, sc.swaPages);
    const q = tensor('bf16', [sc.numQueries, hQ, D], randomBf16Bits(rng, sc.numQueries * hQ * D, 1));
    const plan = createPlan(sc.chunk);
    const pending = prefillLayer(engine, { q, compressRatio: 0, plan, caches: { swa }, smScale: 0.04, path: 'sparse' });
    expect(impl.staging.lentBytes).toBeGreaterThan(0); // the copy of q, taken at the call
    structuredClone(swa.data.buffer, { transfer: [swa.data.buffer] });
    const err = await pending.catch((e: unknown) => e);
    expect(err instanceof SparseMlaError && { code: err.code, argument: err.argument }).toEqual({ code: 'INVALID_VALUE', argument: 'caches.swa.data' });
    expect(impl.staging.lentBytes).toBe(0);
  });

  test('prefillLayerSharded: a shard refused by its check gives back the copies the shards checked before it took', async () => {
    const sc = randomScenario(rng, [rng.int(100, 200), rng.int(100, 200)], [rng.int(4, 10), rng.int(4, 10)]);
    const hQ = 4;
    const swa = randomCache(rng, 64, sc.swaPages);
    const plan = createShardedPlan(sc.chunk, { shards: 2, split: 'queries' });
    const q = tensor('bf16', [sc.numQueries, hQ, D], randomBf16Bits(rng, sc.numQueries * hQ * D, 1));
    const short = createKvCache('v4', { pageSize: 64, numPages: 0 }); // every id of shard 1 lies outside it
    const err = await prefillLayerSharded([engine, engine], { plan, compressRatio: 0, q, caches: [{ swa }, { swa: short }], smScale: 0.04 }).catch((e: unknown) => e);
    expect(err instanceof SparseMlaError && err.code).toBe('OUT_OF_RANGE');
    expect(impl.staging.lentBytes).toBe(0);
    // and the same layer with good caches runs, its slabs back afterwards
    const r = await prefillLayerSharded([engine, engine], { plan, compressRatio: 0, q, caches: [{ swa }, { swa }], smScale: 0.04 });
    expect(r.out!.shape).toEqual([sc.numQueries, hQ, D]);
    expect(impl.staging.lentBytes).toBe(0);
  });
});

describe.each(BACKENDS)('%s: prefillLayerSharded split by heads', (backend) => {
  test("each shard's heads of a host q are cut once, into a slab its layer and ops read in place: the same bits as one engine, the slabs back afterwards; a shard whose cut exceeds the budget is TOO_LARGE before any work", async () => {
    const engines = [await createEngine({ backend, workers: 1 }), await createEngine({ backend, workers: 1 })];
    try {
      const sc = randomScenario(rng, [rng.int(100, 200), rng.int(20, 40)], [rng.int(6, 12), rng.int(4, 8)]);
      const hQ = 16;
      const swa = randomCache(rng, 64, sc.swaPages);
      const q = tensor('bf16', [sc.numQueries, hQ, D], randomBf16Bits(rng, sc.numQueries * hQ * D, 1));
      const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
      const args = { compressRatio: 0 as const, q, caches: { swa }, attnSink, smScale: 0.04, path: 'sparse' as const };
      const one = await prefillLayer(engines[0]!, { ...args, plan: createPlan(sc.chunk) });
      const impls = engines.map((e) => engineBackend(e) as WasmBackend | CpuBackend);
      const seen: { q: Uint16Array; callCopy: number }[] = [];
      const originals = impls.map((impl) => impl.sparsePrefill);
      impls.forEach((impl, i) => (impl.sparsePrefill = (job) => (seen.push({ q: job.q, callCopy: callCopyBytes([job.q]) }), originals[i]!.call(impl, job))));
      try {
        const got = await prefillLayerSharded(engines, { ...args, plan: createShardedPlan(sc.chunk, { shards: 2, split: 'heads' }) });
        expect(got.out!.data).toEqual(one.out.data);
        expect(got.lse!.data).toEqual(one.lse.data);
        expect(seen.map((x) => [x.q.byteLength, x.callCopy])).toEqual([0, 1].map(() => [q.data.byteLength / 2, q.data.byteLength / 2]));
        for (const impl of impls) expect(impl.staging.lentBytes).toBe(0);
      } finally {
        impls.forEach((impl, i) => (impl.sparsePrefill = originals[i]!));
      }
    } finally {
      await Promise.all(engines.map((e) => e.dispose()));
    }
    // a shard's cut (and its outputs) over its engine's budget: refused before any work, the first shard's slab back
    const small = [await createEngine({ backend, workers: 1 }), await createEngine({ backend, workers: 1, memoryBudgetBytes: 2 ** 20 })];
    try {
      const sc = randomScenario(rng, [rng.int(100, 200)], [40]);
      const q = tensor('bf16', [40, 64, D], randomBf16Bits(rng, 40 * 64 * D, 1)); // 2.5 MiB; a shard's 32 heads: 1.25 MiB
      const swa = createKvCache('v4', { pageSize: 64, numPages: sc.swaPages });
      const err = await prefillLayerSharded(small, { plan: createShardedPlan(sc.chunk, { shards: 2, split: 'heads' }), compressRatio: 0, q, caches: { swa }, smScale: 0.04 }).catch((e: unknown) => e);
      expect(err instanceof SparseMlaError && { code: err.code, argument: err.argument }).toEqual({ code: 'TOO_LARGE', argument: 'q' });
      expect((err as Error).message).toMatch(/a copy of the shard's heads of q at the call/);
      for (const e of small) expect((engineBackend(e) as WasmBackend).staging.lentBytes).toBe(0);
    } finally {
      await Promise.all(small.map((e) => e.dispose()));
    }
  }, 60_000);
});

describe('a layer whose copies and outputs exceed the memory budget', () => {
  test.each(BACKENDS)('%s: TOO_LARGE naming q before any layer step or op', async (backend) => {
    const engine = await createEngine({ backend, workers: 1, memoryBudgetBytes: 2 ** 20 });
    try {
      const impl = engineBackend(engine)!;
      const trap = (name: string) => () => {
        throw new Error(`${name} must not be called`);
      };
      for (const m of ['sparsePrefill', 'pagedSparseAttention', 'dequantizeKCache'] as const) (impl as unknown as Record<string, unknown>)[m] = trap(`backend.${m}`);
      const steps = impl.layer as unknown as Record<string, unknown>;
      for (const m of Object.keys(steps)) if (typeof steps[m] === 'function') steps[m] = trap(`layer.${m}`);
      const sc = randomScenario(rng, [rng.int(100, 200)], [40]);
      const hQ = 32; // q: 40 x 32 x 1 KiB = 1.25 MiB, over the 1 MiB budget by itself
      const q = tensor('bf16', [40, hQ, D], randomBf16Bits(rng, 40 * hQ * D, 1));
      const swa = createKvCache('v4', { pageSize: 64, numPages: sc.swaPages });
      for (const path of ['sparse', 'paged'] as const) {
        const err = await prefillLayer(engine, { q, compressRatio: 0, plan: createPlan(sc.chunk), caches: { swa }, smScale: 0.04, path }).catch((e: unknown) => e);
        expect(err instanceof SparseMlaError && { code: err.code, argument: err.argument }, path).toEqual({ code: 'TOO_LARGE', argument: 'q' });
        expect((err as Error).message).toMatch(/copies of q, attnSink and topkIndices at the call/);
        expect((impl as WasmBackend).staging.lentBytes).toBe(0);
      }
    } finally {
      await engine.dispose();
    }
  });
});

describe('cuda (a stand-in device): host operands of a layer and a dequant', () => {
  test('a layer with a host q hands the addon its copy taken at the call, in shared memory (the addon reads shared inputs in place and copies any other)', async () => {
    const dev = standInDevice();
    const seen: { q: Uint16Array; callCopy: number }[] = [];
    const { engine } = dev.engine(0, { sparsePrefill: (params: { q: Uint16Array }) => (seen.push({ q: params.q, callCopy: callCopyBytes([params.q]) }), Promise.resolve()) });
    try {
      const sc = randomScenario(rng, [rng.int(100, 200)], [rng.int(4, 10)]);
      const hQ = 4;
      const q = tensor('bf16', [sc.numQueries, hQ, D], randomBf16Bits(rng, sc.numQueries * hQ * D, 1));
      const swa = await engine.uploadKvCache(createKvCache('v4', { pageSize: 64, numPages: sc.swaPages }));
      await prefillLayer(engine, { q, compressRatio: 0, plan: createPlan(sc.chunk), caches: { swa }, smScale: 0.04, path: 'sparse' });
      expect(seen.length).toBe(1);
      const addonQ = seen[0]!;
      expect(addonQ.q).not.toBe(q.data);
      expect(addonQ.q.buffer).toBeInstanceOf(SharedArrayBuffer);
      expect(addonQ.callCopy).toBe(q.data.byteLength);
      expect(dev.faults).toEqual([]);
      expect((engine.hostMemory().staging as StagingArena).lentBytes).toBe(0);
    } finally {
      await engine.dispose();
    }
  });

  test('a dequant with host ids counts the int64 ids the addon widens them into: a budget between the old and the new total is TOO_LARGE; the new total runs', async () => {
    const ops = { streamClass: () => StandInStream, deviceBufferClass: () => class {}, dequantizeKvCache: () => Promise.resolve() } as unknown as NativeCudaOps;
    const n = 4096;
    const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
    const tokenIds = Int32Array.from({ length: n }, () => rng.int(0, 128));
    const job = { cache: { format: 'v4' as const, pageSize: 64, numPages: 2, numTokens: 128, bytes: cache.data.byteLength, data: cache.data }, tokenIds, n, rowDim: D };
    // without the widened ids: the addon's copy of the cache and of the ids, and the output
    const counted = cache.data.byteLength + 4 * n + n * D * 2;
    const widened = (n + 1) * 8;
    const between = new CudaBackend({} as NativeAddon, ops, 1, counted + widened / 2);
    const err = await between.dequantizeKCache(job, 'host').catch((e: unknown) => e);
    expect(err instanceof SparseMlaError && { code: err.code, argument: err.argument }).toEqual({ code: 'TOO_LARGE', argument: 'tokenIds' });
    expect((err as Error).message).toMatch(/the widened token ids/);
    const enough = new CudaBackend({} as NativeAddon, ops, 1, counted + widened);
    await expect(enough.dequantizeKCache(job, 'host')).resolves.toBeInstanceOf(Uint16Array);
  });
});
