/**
 * The cuda backend's TypeScript half, run without a GPU: the real addon's CPU core plus a stand-in
 * for the CUDA op table. Checks what the class itself decides — host-side quantize on the CPU core,
 * typed errors from the CUDA ops, dispose waiting for calls in flight and refusing later ones, and
 * the layer flow over its layer steps (prefillLayer with device inputs and outputs on a stand-in
 * device whose ops run the CPU core and the host planner: the same bits as the cpu backend, the
 * chunk-invariant rows and ids built once, no host round trip in a layer but the c4 dropped
 * total, read while the rest is queued) — so a change to it is caught here, not first on a GPU
 * host.
 */
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import { CudaBackend, SYNC_POLL_MS, defaultCudaDevice } from '../dist/backends/native/cuda_backend.js';
import { CudaDeviceBuffer } from '../dist/backends/native/cuda_device_buffer.js';
import { CpuBackend } from '../dist/backends/native/cpu_backend.js';
import { loadNativeAddon, type NativeAddon, type NativeCudaOps, type NativeDeviceBuffer, type NativeStream } from '../dist/backends/native/binding.js';
import { CUDA_OP_PARAMS, type CudaOpName } from '../dist/backends/abi.js';
import { v4PageBytes } from '../dist/kv_cache_layout.js';
import { SparseMlaEngine } from '../dist/engine.js';
import { createPlan, prefillLayer, type CompressRatio } from '../dist/planner/index.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import type { CacheView, DequantizeKCacheJob, PagedSparseAttentionJob, QuantizeKCacheJob, SparsePrefillJob } from '../dist/backends/backend.js';
import type { DeviceBuffer, DeviceTensor, Engine } from '../dist/types.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { StandInStream, standInDevice } from './helpers/stand_in_device.js';
import { standInTable, type OpCall } from './helpers/computing_device.js';

const rng = testRng('cuda_backend_host');

const FakeStream = StandInStream;
type FakeStream = StandInStream;

/**
 * A CUDA op table whose ops are the given functions; anything else is never called. A kernel op
 * is called as the addon's is: one params object with exactly the op's fields (CUDA_OP_PARAMS, the
 * names the addon's binding files read), then a stream.
 */
function fakeOps(given: Partial<Record<keyof NativeCudaOps, unknown>>): NativeCudaOps {
  const ops: Record<string, unknown> = { ...given };
  for (const [name, fn] of Object.entries(given)) {
    if (!(name in CUDA_OP_PARAMS)) continue;
    ops[name] = (params: object, stream: unknown, ...rest: unknown[]) => {
      expect(rest, name).toEqual([]);
      expect(Object.keys(params).sort(), name).toEqual(Object.keys(CUDA_OP_PARAMS[name as CudaOpName]).sort());
      expect(stream, name).toBeInstanceOf(FakeStream);
      return (fn as (p: object, s: unknown) => unknown)(params, stream);
    };
  }
  class FakeBuffer {
    readonly device: number;
    readonly byteLength: number;
    freed = false;
    constructor(bytes: number, stream: FakeStream) {
      this.byteLength = bytes;
      this.device = stream.device;
    }
    free(): void {
      this.freed = true;
    }
  }
  return new Proxy({ deviceBufferClass: () => FakeBuffer, streamClass: () => FakeStream, ...ops } as object, {
    get: (target, name) => (target as Record<string | symbol, unknown>)[name] ?? (() => { throw new Error(`unexpected CUDA op ${String(name)}`); }),
  }) as NativeCudaOps;
}

/** Records each kernel op's params object, in call order. */
function recordingOps(): { ops: NativeCudaOps; calls: { op: string; params: Record<string, unknown> }[] } {
  const calls: { op: string; params: Record<string, unknown> }[] = [];
  const record = Object.fromEntries(
    Object.keys(CUDA_OP_PARAMS).map((op) => [op, (params: Record<string, unknown>) => (calls.push({ op, params }), Promise.resolve())]),
  );
  return { ops: fakeOps(record), calls };
}

function v4View<B>(pageSize: number, numPages: number, data: Uint8Array | B): CacheView<B> {
  const bytes = v4PageBytes(pageSize) * numPages;
  return { format: 'v4', pageSize, numPages, numTokens: pageSize * numPages, bytes, data };
}

function prefillJob(): SparsePrefillJob {
  const sQ = 2, hQ = 4, d = 64, sKV = 8, topk = 4;
  return {
    q: randomBf16Bits(rng, sQ * hQ * d), kv: randomBf16Bits(rng, sKV * d), indices: new Int32Array(sQ * topk),
    topkLength: null, attnSink: null, sQ, hQ, dQK: d, dV: d, sKV, topk, smScale: 0.1,
  } as SparsePrefillJob;
}

describe.skipIf(!nativeAddonBuilt())('cuda backend class without a GPU', () => {
  const load = loadNativeAddon();
  const addon = load.ok ? load.addon : (undefined as never);

  test('quantizeKCache runs on the CPU core: bytes equal the cpu backend', async () => {
    const rows = randomBf16Bits(rng, 6 * 512);
    const ids = Int32Array.from([5, 0, 63, 17, 17, 2]);
    const jobFor = (data: Uint8Array): QuantizeKCacheJob => ({
      cache: { format: 'v4', pageSize: 64, numPages: 1, data } as QuantizeKCacheJob['cache'],
      tokenIds: ids, rows, rowsDtype: 'bf16', n: 6, rowDim: 512,
    });
    const a = createKvCache('v4', { pageSize: 64, numPages: 1 }).data;
    const b = createKvCache('v4', { pageSize: 64, numPages: 1 }).data;
    const cuda = new CudaBackend(addon, fakeOps({}), 2);
    const cpu = new CpuBackend(addon, 2);
    await cuda.quantizeKCache(jobFor(a));
    await cpu.quantizeKCache(jobFor(b));
    expect(a.some((x) => x !== 0)).toBe(true);
    expect(Buffer.compare(a, b)).toBe(0);
    await Promise.all([cuda.dispose(), cpu.dispose()]);
  });

  test('synchronize polls the stream from the event loop for a short wait, hands a long one to the stream (a pool thread), and a failed stream is a typed BACKEND_FAILURE', async () => {
    const seen = { queries: 0, poolWaits: 0, turns: 0 };
    let busyFor = 0; // queries answering "not yet"
    let failure: Error | null = null;
    class PollStream {
      constructor(readonly device: number) {}
      query(): boolean {
        seen.queries++;
        if (failure) throw failure;
        return busyFor-- <= 0;
      }
      synchronize(): Promise<void> {
        seen.poolWaits++;
        busyFor = 0;
        return Promise.resolve();
      }
    }
    const cuda = new CudaBackend(addon, fakeOps({ streamClass: () => PollStream }), 1);
    // other event-loop work goes on while it polls
    const ticker = setInterval(() => seen.turns++, 0);
    busyFor = 5;
    await cuda.synchronize();
    expect(seen).toMatchObject({ queries: 6, poolWaits: 0 });
    busyFor = Infinity; // never done within SYNC_POLL_MS
    const t0 = performance.now();
    await cuda.synchronize();
    clearInterval(ticker);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(SYNC_POLL_MS - 1);
    expect(seen.poolWaits).toBe(1);
    expect(seen.turns).toBeGreaterThan(0);
    failure = Object.assign(new Error('boom'), { code: 'SMLA_CUDA_ERROR', status: 'cudaErrorIllegalAddress: an illegal memory access' });
    const err = await cuda.synchronize().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SparseMlaError);
    expect((err as SparseMlaError).code).toBe('BACKEND_FAILURE');
    expect((err as SparseMlaError).message).toMatch(/synchronize.*cudaErrorIllegalAddress/);
    await cuda.dispose();
  });

  /**
   * Layer programs that fail each way the addon's can (refused when read; a run whose launch fails,
   * whose outputs find no memory, or whose queued work fails after it handed back outputs), with the
   * slots `slots`, and the device buffers the runs handed back (TrackedBuffer, to see them freed).
   */
  function failingPrograms(slots: string[]) {
    const made: { freed: boolean }[] = [];
    class TrackedBuffer {
      readonly device: number;
      freed = false;
      constructor(readonly byteLength: number, stream: { device: number }) {
        this.device = stream.device;
        made.push(this);
      }
      free(): void {
        this.freed = true;
      }
    }
    const launchFailure = () => Object.assign(new Error('launch'), { code: 'SMLA_CUDA_ERROR', status: 'cudaErrorLaunchFailure: unspecified launch failure' });
    const noMemory = () => Object.assign(new Error("layerProgram.run: the prefill's outputs (10240 bytes): CUDA failed: cudaErrorMemoryAllocation: out of memory"), { code: 'SMLA_OUT_OF_MEMORY', status: 'cudaErrorMemoryAllocation: out of memory' });
    const nothing = { out: null, maxLogits: null, lse: null };
    // a program whose run returns what `queued` gives (as the addon's: the outputs once all of the layer was queued, else null)
    const program = (queued: () => object) =>
      class {
        readonly slots = slots;
        run = queued;
      };
    /** [what fails, the program class, the typed error's code, how many outputs the run handed back] */
    const cases: [string, unknown, string, number][] = [
      ['refused', class { constructor() { throw Object.assign(new Error('refused'), { code: 'SMLA_ADDON_ARGUMENT' }); } }, 'BACKEND_FAILURE', 0],
      ['a launch failed', program(() => ({ done: Promise.reject(launchFailure()), ...nothing })), 'BACKEND_FAILURE', 0],
      ['the outputs found no memory', program(() => ({ done: Promise.reject(noMemory()), ...nothing })), 'TOO_LARGE', 0],
      ['all queued, then its work failed', program(() => ({ done: Promise.reject(launchFailure()), out: new TrackedBuffer(8192, { device: 0 }), maxLogits: new TrackedBuffer(32, { device: 0 }), lse: new TrackedBuffer(32, { device: 0 }) })), 'BACKEND_FAILURE', 3],
    ];
    return { made, TrackedBuffer, cases };
  }

  /**
   * Each failing program under the call `prepare` makes (after allocating its job's inputs on the
   * backend): a typed error of its code, naming `op` when it is the addon's, and every output handed back freed.
   */
  async function expectTypedFailures(slots: string[], op: RegExp, prepare: (cuda: CudaBackend) => () => Promise<unknown>): Promise<void> {
    const { made, TrackedBuffer, cases } = failingPrograms(slots);
    for (const [name, Program, code, handedBack] of cases) {
      const cuda = new CudaBackend(addon, fakeOps({ deviceBufferClass: () => TrackedBuffer, layerProgramClass: () => Program }), 1);
      const queue = prepare(cuda);
      const before = made.length;
      const err = await queue().catch((e: unknown) => e);
      expect(err, name).toBeInstanceOf(SparseMlaError);
      expect((err as SparseMlaError).code, name).toBe(code);
      if (code === 'BACKEND_FAILURE') expect((err as SparseMlaError).message, name).toMatch(op);
      const outputs = made.slice(before);
      expect(outputs.length, name).toBe(handedBack); // nothing allocated on the JS side
      expect(outputs.every((b) => b.freed), name).toBe(true);
      await cuda.dispose();
    }
  }

  test('queueLayer: a layer program the addon refuses, a run whose launches or outputs fail, or whose queued work fails later is a typed error, and the outputs the run handed back are freed', async () => {
    await expectTypedFailures(['dequants.0.cache', 'dequants.0.tokenIds', 'dequants.0.out', 'prefill.q', 'prefill.kv', 'prefill.indices', 'prefill.topkLength'], /queueLayer/, (cuda) => {
      const ws = cuda.alloc(4 * 1024);
      const job = {
        owner: {},
        planRows: null,
        dequants: [{ cache: { format: 'v4' as const, pageSize: 64, numPages: 1, numTokens: 64, bytes: v4PageBytes(64), data: cuda.alloc(v4PageBytes(64)) }, tokenIds: cuda.alloc(16), n: 2, workspace: ws, rowOffset: 0 }],
        prefill: { q: cuda.alloc(2 * 4 * 1024), workspace: ws, rows: 2, indices: cuda.alloc(2 * 8 * 4), lengths: cuda.alloc(2 * 4), attnSink: null, numQueries: 2, hQ: 4, width: 8, smScale: 0.1 },
      };
      return () => cuda.queueLayer(job);
    });
  });

  test('queuePagedLayer: a paged layer program the addon refuses, a run whose launch or outputs fail, or whose queued work fails later is a typed error naming the paged op, and the outputs the run handed back are freed', async () => {
    await expectTypedFailures(['paged.q', 'paged.kCache', 'paged.indices', 'paged.topkLength'], /pagedSparseAttention/, (cuda) => {
      const n = 2, hQ = 4, topk = 8;
      const job = {
        q: cuda.alloc(n * hQ * 1024), n, hQ,
        main: { cache: { format: 'v4' as const, pageSize: 64, numPages: 1, numTokens: 64, bytes: v4PageBytes(64), data: cuda.alloc(v4PageBytes(64)) }, indices: cuda.alloc(n * topk * 4), topk, topkLength: cuda.alloc(n * 4) },
        extra: null, attnSink: null, smScale: 0.1,
      };
      return () => cuda.queuePagedLayer(job, {});
    });
  });

  test('a CUDA op failure (thrown or rejected) is a typed BACKEND_FAILURE naming the op', async () => {
    const failure = Object.assign(new Error('boom'), { code: 'SMLA_CUDA_ERROR', status: 'cudaErrorIllegalAddress: an illegal memory access' });
    for (const sparsePrefill of [() => { throw failure; }, () => Promise.reject(failure)]) {
      const cuda = new CudaBackend(addon, fakeOps({ sparsePrefill }), 1);
      const err = await cuda.sparsePrefill(prefillJob()).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SparseMlaError);
      expect((err as SparseMlaError).code).toBe('BACKEND_FAILURE');
      expect((err as SparseMlaError).message).toMatch(/sparsePrefill/);
      expect((err as SparseMlaError).message).toMatch(/cudaErrorIllegalAddress/);
      await cuda.dispose();
    }
  });

  test('planRows that fails frees the buffers it allocated and leaves the caller\'s (into) alone', async () => {
    let seen: Record<string, { freed: boolean } | null> = {};
    const planRows = (p: Record<string, unknown>) => {
      seen = { rows: p.rows, lens: p.lens, dropped: p.dropped, droppedTotal: p.droppedTotal } as typeof seen;
      return Promise.reject(Object.assign(new Error('boom'), { code: 'SMLA_CUDA_ERROR', status: 'cudaErrorLaunchFailure: x' }));
    };
    const cuda = new CudaBackend(addon, fakeOps({ planRows }), 1);
    const nq = 3, width = 144;
    const into = { rows: cuda.alloc(nq * width * 4), lens: cuda.alloc(nq * 4), droppedTotal: cuda.alloc(8) };
    const job = { seqLens: Int32Array.of(nq), extendLens: Int32Array.of(nq), window: 128, ratio: 4 as const, topkIndices: cuda.alloc(nq * 16 * 4), topk: 16, width, into };
    await expect(cuda.planRows(job, 'device', 'device', 'device')).rejects.toMatchObject({ code: 'BACKEND_FAILURE' });
    expect(Object.fromEntries(Object.entries(seen).map(([k, b]) => [k, b?.freed]))).toEqual({ rows: false, lens: false, dropped: true, droppedTotal: false });
    expect([into.rows.freed, into.lens.freed, into.droppedTotal.freed]).toEqual([false, false, false]);
    // without `into` every output was allocated here: all freed
    const { into: _given, ...fresh } = job;
    await expect(cuda.planRows(fresh, 'device', 'device', 'device')).rejects.toMatchObject({ code: 'BACKEND_FAILURE' });
    expect(Object.values(seen).map((b) => b?.freed)).toEqual([true, true, true, true]);
    await cuda.dispose();
  });

  test('a call whose host copies and outputs exceed the memory budget is TOO_LARGE before any CUDA op', async () => {
    const cuda = new CudaBackend(addon, fakeOps({}), 1, 2 ** 20);
    const job = { ...prefillJob(), sQ: 1024, hQ: 4, q: randomBf16Bits(rng, 1024 * 4 * 64), indices: new Int32Array(1024 * 4) } as SparsePrefillJob;
    const err = await cuda.sparsePrefill(job).catch((e: unknown) => e);
    expect(err instanceof SparseMlaError ? { code: err.code, argument: err.argument } : 'resolved').toEqual({ code: 'TOO_LARGE', argument: 'q' });
    expect((err as Error).message).toMatch(/copies of the host inputs .*host outputs .*memory budget of 1048576 bytes/);
    await cuda.dispose();
  });

  test('dispose waits for the call in flight; later calls and allocations reject with DISPOSED', async () => {
    let finish!: () => void;
    let settled = false;
    const cuda = new CudaBackend(addon, fakeOps({ sparsePrefill: () => new Promise<void>((r) => { finish = r; }) }), 1);
    const running = cuda.sparsePrefill(prefillJob()).then(() => { settled = true; });
    let disposed = false;
    const disposing = cuda.dispose().then(() => { disposed = true; });
    await new Promise((r) => setTimeout(r, 20));
    expect(disposed).toBe(false); // still waiting for the op
    finish();
    await Promise.all([running, disposing]);
    expect(settled && disposed).toBe(true);
    await expect(cuda.sparsePrefill(prefillJob())).rejects.toMatchObject({ code: 'DISPOSED' });
    expect(() => cuda.alloc(16)).toThrow(expect.objectContaining({ code: 'DISPOSED' }) as unknown as Error);
    const job: QuantizeKCacheJob = {
      cache: { format: 'v4', pageSize: 2, numPages: 1, data: createKvCache('v4', { pageSize: 2, numPages: 1 }).data } as QuantizeKCacheJob['cache'],
      tokenIds: Int32Array.from([0]), rows: randomBf16Bits(rng, 512), rowsDtype: 'bf16', n: 1, rowDim: 512,
    };
    await expect(cuda.quantizeKCache(job)).rejects.toMatchObject({ code: 'DISPOSED' });
  });

  test("an engine on one device refuses another device's buffers (INVALID_VALUE naming both); copyFrom goes peer to peer", async () => {
    const calls: unknown[][] = [];
    const ops = fakeOps({ sparsePrefill: () => Promise.resolve(), copyPeer: (...a: unknown[]) => (calls.push(a), Promise.resolve()) });
    const d0 = new CudaBackend(addon, ops, 1, undefined, 0);
    const d1 = new CudaBackend(addon, ops, 1, undefined, 1);
    expect([d0.deviceIndex, d1.deviceIndex]).toEqual([0, 1]);
    const onOne = d1.alloc(2 * 4 * 64 * 2);
    expect(onOne.deviceIndex).toBe(1);
    const err = await d0.sparsePrefill({ ...prefillJob(), q: onOne } as SparsePrefillJob).catch((e: unknown) => e);
    expect(err instanceof SparseMlaError ? { code: err.code, argument: err.argument } : 'resolved').toEqual({ code: 'INVALID_VALUE', argument: 'q' });
    expect((err as Error).message).toMatch(/device 0.*device 1/);
    const copy = await d0.copyFrom(onOne);
    expect(copy.deviceIndex).toBe(0);
    expect(calls.length).toBe(1);
    expect((calls[0]![1] as { device: number }).device).toBe(0);
    expect((calls[0]![3] as { device: number }).device).toBe(1);
    await Promise.all([d0.dispose(), d1.dispose()]);
  });
});

describe.skipIf(!nativeAddonBuilt())('the cuda backend calls each kernel op with one params object of its fields', () => {
  const load = loadNativeAddon();
  const addon = load.ok ? load.addon : (undefined as never);

  test('sparsePrefill: the job, host outputs of its shape', async () => {
    const { ops, calls } = recordingOps();
    const cuda = new CudaBackend(addon, ops, 1);
    const job = { ...prefillJob(), topkLength: Int32Array.from([1, 4]), attnSink: new Float32Array(4) } as SparsePrefillJob;
    await cuda.sparsePrefill(job);
    expect(calls.map((c) => c.op)).toEqual(['sparsePrefill']);
    const p = calls[0]!.params;
    expect(p).toMatchObject({ q: job.q, kv: job.kv, indices: job.indices, topkLength: job.topkLength, attnSink: job.attnSink, sQ: 2, hQ: 4, dQK: 64, dV: 64, sKV: 8, topk: 4, smScale: 0.1 });
    expect([(p.out as Uint16Array).length, (p.maxLogits as Float32Array).length, (p.lse as Float32Array).length]).toEqual([2 * 4 * 64, 8, 8]);
    await cuda.dispose();
  });

  test('pagedSparseAttention: main and extra sets; without an extra set its fields are null and 0', async () => {
    const { ops, calls } = recordingOps();
    const cuda = new CudaBackend(addon, ops, 1);
    const n = 2, hQ = 3;
    const main = { cache: v4View(64, 2, new Uint8Array(v4View(64, 2, null).bytes)), indices: new Int32Array(n * 5), topk: 5, topkLength: null };
    const extra = { cache: v4View(4, 3, new Uint8Array(v4View(4, 3, null).bytes)), indices: new Int32Array(n * 7), topk: 7, topkLength: new Int32Array(n) };
    const job: PagedSparseAttentionJob = { q: randomBf16Bits(rng, n * hQ * 512), n, hQ, main, extra, attnSink: null, smScale: 0.5 };
    await cuda.pagedSparseAttention(job);
    await cuda.pagedSparseAttention({ ...job, extra: null });
    expect(calls[0]!.params).toMatchObject({
      q: job.q, n, hQ, kCache: main.cache.data, pageSize: 64, numPages: 2, indices: main.indices, topk: 5, topkLength: null,
      extraKCache: extra.cache.data, extraPageSize: 4, extraNumPages: 3, extraIndices: extra.indices, extraTopk: 7, extraTopkLength: extra.topkLength,
      attnSink: null, smScale: 0.5,
    });
    expect((calls[0]!.params.out as Uint16Array).length).toBe(n * hQ * 512);
    expect(calls[1]!.params).toMatchObject({ extraKCache: null, extraPageSize: 0, extraNumPages: 0, extraIndices: null, extraTopk: 0, extraTopkLength: null });
    await cuda.dispose();
  });

  test('pagedSparseAttention with device operands: each field is the addon buffer behind it; a buffer of another device is refused naming its field, before the op, and the outputs are freed', async () => {
    const { ops, calls } = recordingOps();
    const cuda = new CudaBackend(addon, ops, 1);
    const other = new CudaBackend(addon, ops, 1, undefined, 1);
    const n = 2, hQ = 3;
    const dev = (bytes: number) => cuda.alloc(bytes) as CudaDeviceBuffer;
    const main = { cache: v4View(64, 2, dev(v4View(64, 2, null).bytes)), indices: dev(n * 5 * 4), topk: 5, topkLength: dev(n * 4) };
    const extra = { cache: v4View(4, 3, dev(v4View(4, 3, null).bytes)), indices: dev(n * 7 * 4), topk: 7, topkLength: null };
    const job: PagedSparseAttentionJob<DeviceBuffer> = { q: dev(n * hQ * 1024), n, hQ, main, extra, attnSink: dev(hQ * 4), smScale: 0.5 };
    const r = await cuda.pagedSparseAttention(job, 'device');
    const native = (b: unknown) => (b as CudaDeviceBuffer).native;
    expect(calls[0]!.params).toMatchObject({
      q: native(job.q), n, hQ, kCache: native(main.cache.data), pageSize: 64, numPages: 2, indices: native(main.indices), topk: 5, topkLength: native(main.topkLength),
      extraKCache: native(extra.cache.data), extraPageSize: 4, extraNumPages: 3, extraIndices: native(extra.indices), extraTopk: 7, extraTopkLength: null,
      attnSink: native(job.attnSink), smScale: 0.5, out: native(r.out), lse: native(r.lse), maxLogits: native(r.maxLogits),
    });
    const outputs = vi.spyOn(cuda, 'allocTogether');
    await expect(cuda.pagedSparseAttention({ ...job, extra: { ...extra, indices: other.alloc(n * 7 * 4) } }, 'device')).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'extraIndices' });
    expect(calls.length).toBe(1);
    expect(outputs.mock.results[0]!.value.map((b: CudaDeviceBuffer) => b.freed)).toEqual([true, true, true]);
    await Promise.all([cuda.dispose(), other.dispose()]);
  });

  test('dequantizeKvCache: host ids into a new output, device ids into a device workspace row', async () => {
    const { ops, calls } = recordingOps();
    const cuda = new CudaBackend(addon, ops, 1);
    const cache = v4View(64, 2, new Uint8Array(v4View(64, 2, null).bytes));
    const job: DequantizeKCacheJob = { cache, tokenIds: Int32Array.from([3, 70, 0]), n: 3, rowDim: 512 };
    await cuda.dequantizeKCache(job);
    const ws = cuda.alloc(10 * 512 * 2);
    const ids = cuda.alloc(3 * 8);
    await cuda.dequantizeKCacheIdsInto(cache, ids, 3, ws, 7);
    expect(calls.map((c) => c.op)).toEqual(['dequantizeKvCache', 'dequantizeKvCache']);
    expect(calls[0]!.params).toMatchObject({ format: 0, cache: cache.data, pageSize: 64, numPages: 2, tokenIds: job.tokenIds, numTokens: 3, outRowOffset: null });
    expect((calls[0]!.params.out as Uint16Array).length).toBe(3 * 512);
    expect(calls[1]!.params).toMatchObject({ tokenIds: (ids as CudaDeviceBuffer).native, numTokens: 3, out: (ws as CudaDeviceBuffer).native, outRowOffset: 7 });
    await cuda.dispose();
  });

  test('planRows and planCompressedTokenIds: the requests, their output lengths, host page table offsets', async () => {
    const { ops, calls } = recordingOps();
    const cuda = new CudaBackend(addon, ops, 1);
    const seqLens = Int32Array.from([300, 9, 40]), extendLens = Int32Array.from([100, 0, 40]);
    const topkIndices = new Int32Array(140 * 16);
    const r4 = await cuda.planRows({ seqLens, extendLens, window: 128, ratio: 4, topkIndices, topk: 16, width: 144 });
    await cuda.planRows({ seqLens, extendLens, window: 128, ratio: 128, topkIndices: null, topk: 0, width: 131 });
    expect(calls[0]!.params).toMatchObject({ numRequests: 3, seqLens, extendLens, window: 128, ratio: 4, topkIndices, topk: 16, width: 144, numQueries: 140 });
    expect([(r4.rows as Int32Array).length, (r4.lens as Int32Array).length, (r4.dropped as Int32Array).length, r4.droppedTotal]).toEqual([140 * 144, 140, 140, null]);
    const t4 = await cuda.planRows({ seqLens, extendLens, window: 128, ratio: 4, topkIndices, topk: 16, width: 144 }, 'device', null, 'device');
    expect([t4.dropped, (t4.droppedTotal as CudaDeviceBuffer).byteLength]).toEqual([null, 8]);
    expect(calls[2]!.params).toMatchObject({ ratio: 4, dropped: null, droppedTotal: (t4.droppedTotal as CudaDeviceBuffer).native });
    calls.splice(2, 1);
    expect(calls[1]!.params).toMatchObject({ ratio: 128, topkIndices: null, topk: 0, width: 131, numQueries: 140 });
    const pageTables = Int32Array.from([5, 6, 7, 8]);
    const ids = await cuda.planCompressedTokenIds({ seqLens, extendLens, ratio: 4, pageTables, pageTableOffsets: [0, 2, 3, 4], pageSize: 64 });
    // request 1 has no queries: no entries; 300 / 4 = 75 and 40 / 4 = 10 visible
    expect(calls[2]!.params).toMatchObject({ numRequests: 3, seqLens, extendLens, ratio: 4, pageTables, pageTableOffsets: BigInt64Array.from([0n, 2n, 3n, 4n]), pageSize: 64, total: 85 });
    expect((ids as BigInt64Array).length).toBe(85);
    await cuda.dispose();
  });
});

test('SPARSE_MLA_DEVICE picks the default device; anything but an index is refused', () => {
  expect(defaultCudaDevice({})).toBe(0);
  expect(defaultCudaDevice({ SPARSE_MLA_DEVICE: ' 3 ' })).toBe(3);
  for (const bad of ['-1', 'one', '1.5']) expect(() => defaultCudaDevice({ SPARSE_MLA_DEVICE: bad })).toThrow(/SPARSE_MLA_DEVICE/);
});

/** A device layer's outputs downloaded equal the host result's bit for bit. */
async function expectSameOutputs(cuda: Engine, got: { out: DeviceTensor<'bf16'>; lse: DeviceTensor<'float32'>; maxLogits: DeviceTensor<'float32'> }, want: { out: { data: ArrayBufferView }; lse: { data: ArrayBufferView }; maxLogits: { data: ArrayBufferView } }, label: string): Promise<void> {
  for (const name of ['out', 'lse', 'maxLogits'] as const) {
    const host = (await cuda.download(got[name] as DeviceTensor<'bf16' | 'float32'>)).data;
    const w = want[name].data;
    expect(Buffer.compare(Buffer.from(host.buffer, host.byteOffset, host.byteLength), Buffer.from(w.buffer, w.byteOffset, w.byteLength)), `${label} ${name}`).toBe(0);
  }
}

/** The stand-in layer tests' chunk: four requests (one without queries) and a plan for each side. */
function layerScenario() {
  const seqLens = [rng.int(200, 600), rng.int(20, 60), rng.int(129, 400), 50];
  const extendLens = [rng.int(5, 40), seqLens[1]!, rng.int(1, 10), 0];
  const sc = randomScenario(rng, seqLens, extendLens);
  return { sc, planDev: createPlan(sc.chunk), planHost: createPlan(sc.chunk) };
}

/**
 * One layer's random inputs and the cpu backend's result down `path`, held to the float64
 * reference (the device result equal to it bit for bit is then within bounds too: the two share the layer flow).
 */
async function cpuLayer(cpu: Engine, sc: ReturnType<typeof randomScenario>, planHost: ReturnType<typeof createPlan>, label: string, ratio: CompressRatio, hQ: number, smScale: number, path: 'sparse' | 'paged') {
  const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
  const comp = ratio === 4 ? randomCache(rng, sc.c4PageSize, sc.c4Pages) : ratio === 128 ? randomCache(rng, sc.c128PageSize, sc.c128Pages) : undefined;
  const key = ratio === 4 ? 'c4' : 'c128';
  const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512, 1));
  const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
  const topkIndices = ratio === 4 ? randomTopk(rng, sc, 48) : undefined;
  const caches = { swa, ...(comp ? { [key]: comp } : {}) };
  const want = await prefillLayer(cpu, { plan: planHost, compressRatio: ratio, q, caches, ...(topkIndices ? { topkIndices } : {}), attnSink, smScale, path });
  const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, attnSink, smScale, ...(topkIndices ? { topkIndices } : {}) });
  expectWithinBounds(label, want, ref, Array.from({ length: sc.numQueries }, (_, i) => i));
  expect(want.dropped, label).toBe(ref.dropped);
  return { swa, comp, key, q, attnSink, topkIndices, want };
}

describe.skipIf(!nativeAddonBuilt())('the cuda layer flow on a stand-in device', () => {
  const load = loadNativeAddon();
  const addon = load.ok ? load.addon : (undefined as never);
  const calls: OpCall[] = [];
  const held = { downloadsWaitForPrefill: false };
  let cuda: Engine;
  let cpu: Engine;
  beforeAll(async () => {
    cuda = new SparseMlaEngine(new CudaBackend(addon, standInTable(addon, calls, held), 2));
    cpu = await createEngine({ backend: 'cpu', workers: 2 });
  });
  afterAll(async () => {
    await Promise.all([cuda?.dispose(), cpu?.dispose()]);
  });

  test('layers c0, c4, c128, c4, then c0, c128, c4, c4 again, with device q, caches, top-k, sink (all but layers 0 and 3) and outputs equal the cpu backend bit for bit; rows and ids built once; only the dropped total (8 bytes) comes back, while the rest is queued; once the plan keeps a layer\'s rows and ids, the layer is queued by one call', async () => {
    const { sc, planDev, planHost } = layerScenario();
    const hQ = 4, smScale = 1 / Math.sqrt(512);
    const ratios: CompressRatio[] = [0, 4, 128, 4, 0, 128, 4, 4];
    for (const [layer, ratio] of ratios.entries()) {
      const label = `layer ${layer} (c${ratio})`;
      const { swa, comp, key, q, attnSink, topkIndices, want } = await cpuLayer(cpu, sc, planHost, label, ratio, hQ, smScale, 'sparse');

      // layers 0 and 3 take the sink from the host, the others on the device
      const deviceSink = layer !== 0 && layer !== 3;
      const [qd, swad, compd, topkd, sinkd] = await Promise.all([
        cuda.upload(q), cuda.uploadKvCache(swa), comp ? cuda.uploadKvCache(comp) : undefined, topkIndices ? cuda.upload(topkIndices) : undefined, deviceSink ? cuda.upload(attnSink) : undefined,
      ]);
      calls.length = 0;
      held.downloadsWaitForPrefill = true; // a layer that waited for its dropped counts before queueing the rest would hang here
      const got = await prefillLayer(
        cuda,
        { plan: planDev, compressRatio: ratio, q: qd, caches: { swa: swad, ...(compd ? { [key]: compd } : {}) }, ...(topkd ? { topkIndices: topkd } : {}), attnSink: sinkd ?? attnSink, smScale, path: 'sparse' },
        { output: 'device' },
      );
      held.downloadsWaitForPrefill = false;
      const layerCalls = calls.splice(0);
      expect(got.out.data.device, label).toBe('cuda');
      expect([got.path, got.workspaceBytes, got.dropped], label).toEqual([want.path, want.workspaceBytes, want.dropped]);
      await expectSameOutputs(cuda, got, want, label);
      // stream order: every array operand on the device but the plan's page tables, staged once
      // per plan and engine by the compressed-id build (the plan's lengths and page offsets are host
      // arguments too, read by the launcher), and a host sink; the one download the c4 dropped total
      // (8 bytes, summed on the device: nothing per query comes back)
      // queued by one call: a layer whose rows (c4: rows an earlier c4 layer gave back) and ids
      // the plan keeps, with every operand on the device (layers 4-7; layer 7 runs layer 6's program)
      const first = ratios.indexOf(ratio) === layer;
      const queued = layer >= 4;
      const ops = layerCalls.map((c) => c.op);
      const build = ratio === 4 ? ['planRows', 'download'] : first ? ['planRows'] : [];
      const ids = ratio === 0 ? [] : first ? ['planCompressedTokenIds', 'dequantizeKvCache'] : ['dequantizeKvCache'];
      // a program queues the dequants first (they need nothing the combine builds), then the combine and its read
      const wantOps = queued
        ? ['layerProgram.run', ...(ratio === 0 ? [] : ['dequantizeKvCache']), 'dequantizeKvCache', ...(ratio === 4 ? ['planRows'] : []), 'sparsePrefill']
        : [...build, ...ids, ...(layer === 0 ? ['upload'] : []), 'dequantizeKvCache', 'sparsePrefill'];
      expect(ops, label).toEqual(wantOps);
      const hostOperands = (op: string): string[] => (op === 'planCompressedTokenIds' ? ['pageTables'] : op === 'sparsePrefill' && !deviceSink ? ['attnSink'] : []);
      for (const c of layerCalls) if (c.op !== 'download') expect(c.hostOperands, `${label}: ${c.op}`).toEqual(hostOperands(c.op));
      expect(layerCalls.filter((c) => c.op === 'download').map((c) => c.bytes), label).toEqual(ratio === 4 && !queued ? [8] : []);
      for (const t of [qd, topkd, sinkd, got.out, got.lse, got.maxLogits]) t?.data.free();
      swad.data.free();
      compd?.data.free();
    }
    expect(planDev.deviceStats).toEqual({ deviceUploads: 1, deviceCompressedIdBuilds: 2, deviceC0Builds: 1, deviceC128Builds: 1, deviceC4Combines: 4, deviceWorkspaceAllocations: 1, deviceC4RowAllocations: 1, deviceQueuedLayers: 4 });
    expect(planDev.stats).toEqual({ ...planHost.stats, c0Builds: 0, c128Builds: 0, workspaceAllocations: 0 });
    expect(planHost.stats).toMatchObject({ c0Builds: 1, c128Builds: 1, c4Combines: 4, workspaceAllocations: 1 });
  }, 20_000);

  test('the paged path with device q, caches and sink: c0 and c128 layers read their paged form from the device, placed once per ratio (no host operand, nothing comes back), and later layers run the paged op as a layer program; a c4 layer downloads its top-k for the host combine; every layer equals the cpu backend bit for bit', async () => {
    const { sc, planDev, planHost } = layerScenario();
    const hQ = 4, smScale = 1 / Math.sqrt(512);
    const ratios: CompressRatio[] = [0, 128, 4, 0, 128];
    for (const [layer, ratio] of ratios.entries()) {
      const label = `layer ${layer} (c${ratio})`;
      const { swa, comp, key, q, attnSink, topkIndices, want } = await cpuLayer(cpu, sc, planHost, label, ratio, hQ, smScale, 'paged');
      const [qd, swad, compd, topkd, sinkd] = await Promise.all([
        cuda.upload(q), cuda.uploadKvCache(swa), comp ? cuda.uploadKvCache(comp) : undefined, topkIndices ? cuda.upload(topkIndices) : undefined, cuda.upload(attnSink),
      ]);
      calls.length = 0;
      const got = await prefillLayer(
        cuda,
        { plan: planDev, compressRatio: ratio, q: qd, caches: { swa: swad, ...(compd ? { [key]: compd } : {}) }, ...(topkd ? { topkIndices: topkd } : {}), attnSink: sinkd, smScale, path: 'paged' },
        { output: 'device' },
      );
      const layerCalls = calls.splice(0);
      expect(got.out.data.device, label).toBe('cuda');
      expect([got.path, got.workspaceBytes, got.dropped], label).toEqual([want.path, want.workspaceBytes, want.dropped]);
      await expectSameOutputs(cuda, got, want, label);
      const paged = layerCalls.filter((c) => c.op === 'pagedSparseAttention');
      expect(paged.length, label).toBe(1);
      if (ratio === 4) {
        expect(layerCalls.filter((c) => c.op === 'download').map((c) => c.bytes), label).toEqual([topkIndices!.data.byteLength]);
      } else {
        // the form's arrays uploaded by the ratio's first layer only (main and its lengths, and the extra set's for c128)
        const first = ratios.indexOf(ratio) === layer;
        // (the later layers: the paged op as a layer program, one addon call)
        expect(layerCalls.map((c) => c.op), label).toEqual([...(first ? Array<string>(ratio === 0 ? 2 : 4).fill('upload') : ['layerProgram.run']), 'pagedSparseAttention']);
        expect(paged[0]!.hostOperands, label).toEqual([]);
      }
      for (const t of [qd, topkd, sinkd, got.out, got.lse, got.maxLogits]) t?.data.free();
      swad.data.free();
      compd?.data.free();
    }
    expect(planDev.deviceStats).toMatchObject({ deviceUploads: 2, deviceQueuedLayers: 0, deviceWorkspaceAllocations: 0 });
    expect(planDev.stats.pagedMainBuilds).toBe(1);
  }, 20_000);

  test('a paged layer whose form its plan keeps hands its checked operands to the steps, not the public op: with a device or host sink and device or host outputs it equals the cpu backend bit for bit; each plan places its own form, a form with a freed buffer is placed again; a freed q, sink or cache, a bad smScale or a q on another device is still refused with its typed error, before any op', async () => {
    const { sc, planDev, planHost } = layerScenario();
    const second = layerScenario();
    const hQ = 4, smScale = 1 / Math.sqrt(512);
    const publicOp = vi.spyOn(cuda, 'pagedSparseAttention');
    type Options = { hostSink?: boolean; output?: 'host' | 'device' };
    /** One paged layer on the stand-in device against the cpu backend: its ops, and how many times it called the public op. */
    const layer = async (label: string, s: ReturnType<typeof layerScenario>, ratio: 0 | 128, { hostSink = false, output = 'device' }: Options = {}) => {
      const { swa, comp, key, q, attnSink, want } = await cpuLayer(cpu, s.sc, s.planHost, label, ratio, hQ, smScale, 'paged');
      const [qd, swad, compd, sinkd] = await Promise.all([cuda.upload(q), cuda.uploadKvCache(swa), comp ? cuda.uploadKvCache(comp) : undefined, cuda.upload(attnSink)]);
      calls.length = 0;
      publicOp.mockClear();
      const got = await prefillLayer(cuda, { plan: s.planDev, compressRatio: ratio, q: qd, caches: { swa: swad, ...(compd ? { [key]: compd } : {}) }, attnSink: hostSink ? attnSink : sinkd, smScale, path: 'paged' }, { output });
      const layerCalls = calls.splice(0);
      expect([got.path, got.workspaceBytes, got.dropped], label).toEqual([want.path, want.workspaceBytes, want.dropped]);
      if (output === 'device') {
        await expectSameOutputs(cuda, got as Awaited<ReturnType<typeof prefillLayer<'device'>>>, want, label);
        for (const t of [got.out, got.lse, got.maxLogits]) (t.data as DeviceBuffer).free();
      } else {
        for (const name of ['out', 'lse', 'maxLogits'] as const) {
          const host = got[name].data as ArrayBufferView, w = want[name].data;
          expect(Buffer.compare(Buffer.from(host.buffer, host.byteOffset, host.byteLength), Buffer.from(w.buffer, w.byteOffset, w.byteLength)), `${label} ${name}`).toBe(0);
        }
      }
      for (const b of [qd.data, swad.data, compd?.data, sinkd.data]) b?.free();
      const op = layerCalls.find((c) => c.op === 'pagedSparseAttention')!;
      return { ops: layerCalls.map((c) => c.op), hostOperands: op.hostOperands, publicCalls: publicOp.mock.calls.length };
    };
    const placesForm = (ratio: 0 | 128) => Array<string>(ratio === 0 ? 2 : 4).fill('upload');
    try {
      // the layer that places a ratio's form goes through the public op; the plan's later layers do not
      expect(await layer('c0, placing', { sc, planDev, planHost }, 0)).toEqual({ ops: [...placesForm(0), 'pagedSparseAttention'], hostOperands: [], publicCalls: 1 });
      // a kept form's layer with device outputs: the paged op as a layer program (one addon call), kept per plan and geometry
      expect(await layer('c0, kept', { sc, planDev, planHost }, 0)).toEqual({ ops: ['layerProgram.run', 'pagedSparseAttention'], hostOperands: [], publicCalls: 0 });
      expect(await layer('c0, kept again', { sc, planDev, planHost }, 0)).toEqual({ ops: ['layerProgram.run', 'pagedSparseAttention'], hostOperands: [], publicCalls: 0 });
      expect(await layer('c128, placing', { sc, planDev, planHost }, 128)).toEqual({ ops: [...placesForm(128), 'pagedSparseAttention'], hostOperands: [], publicCalls: 1 });
      expect(await layer('c128, kept, host sink', { sc, planDev, planHost }, 128, { hostSink: true })).toEqual({ ops: ['pagedSparseAttention'], hostOperands: ['attnSink'], publicCalls: 0 });
      expect(await layer('c0, kept, host outputs', { sc, planDev, planHost }, 0, { output: 'host' })).toEqual({ ops: ['pagedSparseAttention'], hostOperands: ['out', 'lse', 'maxLogits'], publicCalls: 0 });
      // another plan on the engine places its own form
      expect(await layer('second plan c0, placing', second, 0)).toEqual({ ops: [...placesForm(0), 'pagedSparseAttention'], hostOperands: [], publicCalls: 1 });
      expect(await layer('second plan c0, kept', second, 0)).toEqual({ ops: ['layerProgram.run', 'pagedSparseAttention'], hostOperands: [], publicCalls: 0 });
      // a kept form with a freed buffer is not read: the next layer places the form again
      const steps = (cuda as SparseMlaEngine).layerSteps();
      const form = planDev.resources(steps).keptPagedForm(0)!;
      (form.mainLengths as DeviceBuffer).free();
      expect(planDev.resources(steps).keptPagedForm(0)).toBeUndefined();
      expect(await layer('c0, placed again', { sc, planDev, planHost }, 0)).toEqual({ ops: [...placesForm(0), 'pagedSparseAttention'], hostOperands: [], publicCalls: 1 });
      expect(planDev.resources(steps).keptPagedForm(0)).not.toBe(form);
      expect(planDev.deviceStats).toMatchObject({ deviceUploads: 3, deviceQueuedLayers: 0, deviceWorkspaceAllocations: 0 });

      // with the form kept, an operand that is no longer good is refused before any op
      const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512, 1));
      const elsewhere = new SparseMlaEngine(new CudaBackend(addon, standInTable(addon, calls, held), 2, undefined, 1));
      const args = async () => ({
        plan: planDev, compressRatio: 0 as const, q: await cuda.upload(q), caches: { swa: await cuda.uploadKvCache(randomCache(rng, sc.swaPageSize, sc.swaPages)) },
        attnSink: await cuda.upload(tensor('float32', [hQ], new Float32Array(hQ))), smScale, path: 'paged' as const,
      });
      const bad: [string, (a: Awaited<ReturnType<typeof args>>) => Promise<object>, object][] = [
        ['a freed q', async (a) => (a.q.data.free(), a), { code: 'INVALID_VALUE', argument: 'q.data' }],
        ['a freed sink', async (a) => (a.attnSink.data.free(), a), { code: 'INVALID_VALUE', argument: 'attnSink.data' }],
        ['a freed cache', async (a) => (a.caches.swa.data.free(), a), { code: 'INVALID_VALUE', argument: 'caches.swa' }],
        ['a sink of another shape', async (a) => ({ ...a, attnSink: await cuda.upload(tensor('float32', [hQ + 1], new Float32Array(hQ + 1))) }), { code: 'INVALID_SHAPE', argument: 'attnSink' }],
        ['smScale NaN', async (a) => ({ ...a, smScale: NaN }), { code: 'INVALID_VALUE', argument: 'smScale' }],
        ['a q on device 1', async (a) => ({ ...a, q: await elsewhere.upload(q) }), { code: 'INVALID_VALUE', argument: 'q', message: expect.stringContaining('device 1') }],
      ];
      for (const [what, spoil, error] of bad) {
        const spoiled = await spoil(await args());
        calls.length = 0;
        await expect(prefillLayer(cuda, spoiled as never, { output: 'device' }), what).rejects.toMatchObject(error);
        expect(calls.map((c) => c.op), what).toEqual([]);
      }
      await elsewhere.dispose();
    } finally {
      publicOp.mockRestore();
    }
  }, 20_000);

  test("a layer whose q is another engine's buffer (same device) takes the stepwise ops, not the layer program, and still equals the cpu backend bit for bit", async () => {
    const other = new SparseMlaEngine(new CudaBackend(addon, standInTable(addon, calls, held), 2));
    const seqLens = [rng.int(100, 300), rng.int(20, 60)];
    const sc = randomScenario(rng, seqLens, [rng.int(5, 30), seqLens[1]!]);
    const planDev = createPlan(sc.chunk);
    const planHost = createPlan(sc.chunk);
    const hQ = 4, smScale = 1 / Math.sqrt(512);
    const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
    const sinkd = await cuda.upload(attnSink);
    for (const [layer, from] of [[0, cuda], [1, cuda], [2, other]] as const) {
      const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
      const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512, 1));
      const want = await prefillLayer(cpu, { plan: planHost, compressRatio: 0, q, caches: { swa }, attnSink, smScale, path: 'sparse' });
      const [qd, swad] = await Promise.all([from.upload(q), cuda.uploadKvCache(swa)]);
      calls.length = 0;
      const got = await prefillLayer(cuda, { plan: planDev, compressRatio: 0, q: qd, caches: { swa: swad }, attnSink: sinkd, smScale, path: 'sparse' }, { output: 'device' });
      const ops = calls.splice(0).map((c) => c.op);
      // layer 0 builds the rows and ids; layer 1 is queued; layer 2's q belongs to the other engine
      expect(ops.includes('layerProgram.run'), `layer ${layer}`).toBe(layer === 1);
      expect(planDev.deviceStats.deviceQueuedLayers, `layer ${layer}`).toBe(layer === 0 ? 0 : 1);
      await expectSameOutputs(cuda, got, want, `layer ${layer}`);
      for (const t of [qd, got.out, got.lse, got.maxLogits]) t.data.free();
      swad.data.free();
    }
    sinkd.data.free();
    await other.dispose();
  }, 20_000);

  test('c4 layers in flight at once on one plan build into row buffers of their own, equal the cpu backend bit for bit, and a later c4 layer reuses a kept set', async () => {
    const seqLens = [rng.int(300, 700), rng.int(20, 60)];
    const extendLens = [rng.int(5, 40), seqLens[1]!];
    const sc = randomScenario(rng, seqLens, extendLens);
    const planDev = createPlan(sc.chunk);
    const planHost = createPlan(sc.chunk);
    const hQ = 4, smScale = 1 / Math.sqrt(512);
    const layerInputs = () => {
      const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512, 1));
      const caches = { swa: randomCache(rng, sc.swaPageSize, sc.swaPages), c4: randomCache(rng, sc.c4PageSize, sc.c4Pages) };
      return { q, caches, topkIndices: randomTopk(rng, sc, 40) };
    };
    const onDevice = async (x: ReturnType<typeof layerInputs>) => ({
      q: await cuda.upload(x.q),
      caches: { swa: await cuda.uploadKvCache(x.caches.swa), c4: await cuda.uploadKvCache(x.caches.c4) },
      topkIndices: await cuda.upload(x.topkIndices),
    });
    const inputs = [layerInputs(), layerInputs(), layerInputs()];
    const wants = [];
    for (const x of inputs) wants.push(await prefillLayer(cpu, { plan: planHost, compressRatio: 4, ...x, smScale, path: 'sparse' }));
    const devs = await Promise.all(inputs.map(onDevice));
    const run = (k: number) => prefillLayer(cuda, { plan: planDev, compressRatio: 4, ...devs[k]!, smScale, path: 'sparse' }, { output: 'device' });
    const same = async (k: number, got: Awaited<ReturnType<typeof run>>): Promise<void> => {
      await expectSameOutputs(cuda, got, wants[k]!, `layer ${k}`);
      expect(got.dropped, `layer ${k} dropped`).toBe(wants[k]!.dropped);
    };
    const [a, b] = await Promise.all([run(0), run(1)]);
    await same(0, a);
    await same(1, b);
    expect(planDev.deviceStats.deviceC4RowAllocations).toBe(2);
    await same(2, await run(2));
    expect(planDev.deviceStats).toMatchObject({ deviceC4Combines: 3, deviceC4RowAllocations: 2 });
    for (const d of devs) for (const t of [d.q, d.caches.swa, d.caches.c4, d.topkIndices]) t.data.free();
  }, 20_000);
});

describe.skipIf(!nativeAddonBuilt())('device buffers on the JS side', () => {
  /** The addon's buffer with counted accessors: every read of byteLength, device or freed is a native call on a GPU host. */
  class CountedBuffer {
    static reads = 0;
    readonly #bytes: number;
    readonly #device: number;
    #freed = false;
    frees = 0;
    constructor(bytes: number, stream: { device: number }) {
      this.#bytes = bytes;
      this.#device = stream.device;
    }
    get byteLength(): number {
      CountedBuffer.reads++;
      return this.#freed ? 0 : this.#bytes;
    }
    get device(): number {
      CountedBuffer.reads++;
      return this.#device;
    }
    get freed(): boolean {
      CountedBuffer.reads++;
      return this.#freed;
    }
    free(): void {
      this.frees++;
      this.#freed = true;
    }
  }
  const settled = (): Promise<void> => Promise.resolve();
  const ops = {
    streamClass: () => FakeStream,
    deviceBufferClass: () => CountedBuffer,
    sparsePrefill: settled,
    dequantizeKvCache: settled,
    planRows: settled,
    planCompressedTokenIds: settled,
    // the addon's slot names: each params part's device buffers, in field order; run allocates the outputs
    layerProgramClass: () =>
      class {
        readonly slots: string[] = [];
        readonly rows: number;
        constructor(params: { planRows: object | null; dequants: object[]; prefill: { sQ: number; hQ: number } }) {
          const parts: [string, object][] = [...(params.planRows ? [['planRows', params.planRows] as [string, object]] : []), ...params.dequants.map((d, i) => [`dequants.${i}`, d] as [string, object]), ['prefill', params.prefill]];
          for (const [name, part] of parts) for (const [field, v] of Object.entries(part)) if (v instanceof CountedBuffer) this.slots.push(`${name}.${field}`);
          this.rows = params.prefill.sQ * params.prefill.hQ;
        }
        run(): object {
          const on = { device: 0 };
          return { done: settled(), out: new CountedBuffer(this.rows * 1024, on), maxLogits: new CountedBuffer(this.rows * 4, on), lse: new CountedBuffer(this.rows * 4, on) };
        }
      },
    upload: settled,
    download: settled,
  } as unknown as NativeCudaOps;

  test('alloc keeps its size and device; freed follows free() (once freed, freed for good) without asking the addon', () => {
    const backend = new CudaBackend({} as NativeAddon, ops, 1, undefined, 0);
    CountedBuffer.reads = 0;
    const b = backend.alloc(96) as CudaDeviceBuffer;
    expect([b.byteLength, b.deviceIndex, b.device, b.freed]).toEqual([96, 0, 'cuda', false]);
    b.free();
    expect(b.freed).toBe(true);
    expect((b.native as unknown as CountedBuffer).frees).toBe(1);
    expect(CountedBuffer.reads).toBe(0);
    // a buffer made from an addon buffer without known facts reads them once, at construction
    const native = new CountedBuffer(40, { device: 3 });
    const c = new CudaDeviceBuffer(native as unknown as NativeDeviceBuffer, new FakeStream(3) as unknown as NativeStream);
    expect([c.byteLength, c.deviceIndex, c.freed]).toEqual([40, 3, false]);
    expect(CountedBuffer.reads).toBe(2);
  });

  test('a device c4 layer (device q, caches, top-k, sink and outputs) reads no addon buffer accessor; a freed operand is still refused', async () => {
    const backend = new CudaBackend({} as NativeAddon, ops, 1, undefined, 0);
    const engine = new SparseMlaEngine(backend);
    const N = 256, hQ = 4, topk = 64, pageSize = 64;
    const plan = createPlan({
      requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: Int32Array.from({ length: N / 4 / pageSize }, (_, i) => i) }],
      c4PageSize: pageSize,
    });
    const dev = <D extends string>(dtype: D, shape: number[], bytes: number) => ({ dtype, shape, data: backend.alloc(bytes) });
    const cache = (pages: number) => ({ format: 'v4' as const, pageSize, numPages: pages, data: backend.alloc(v4PageBytes(pageSize) * pages) });
    const args = {
      plan, compressRatio: 4 as const,
      q: dev('bf16', [N, hQ, 512], N * hQ * 1024),
      caches: { swa: cache(N / pageSize), c4: cache(N / 4 / pageSize) },
      topkIndices: dev('int32', [N, topk], N * topk * 4),
      attnSink: dev('float32', [hQ], hQ * 4),
      smScale: 1 / Math.sqrt(512), path: 'sparse' as const,
    };
    for (let layer = 0; layer < 3; layer++) {
      CountedBuffer.reads = 0;
      const r = await prefillLayer(engine as unknown as Engine, args as never, { output: 'device' });
      expect(CountedBuffer.reads, `layer ${layer}`).toBe(0);
      expect(r.out.data.byteLength).toBe(N * hQ * 1024);
      for (const x of [r.out, r.lse, r.maxLogits]) x.data.free();
    }
    args.attnSink.data.free();
    await expect(prefillLayer(engine as unknown as Engine, args as never, { output: 'device' })).rejects.toMatchObject({ code: 'INVALID_VALUE' });
    args.caches.c4.data.free();
    await expect(prefillLayer(engine as unknown as Engine, { ...args, attnSink: undefined } as never, { output: 'device' })).rejects.toMatchObject({ code: 'INVALID_VALUE' });
  });
});

test('planRows whose second, third or fourth device allocation finds no memory frees the ones it made (TOO_LARGE, nothing left allocated, no op), and leaves the caller\'s (into) alone', async () => {
  const device = standInDevice();
  const { backend } = device.engine(0);
  const nq = 3, width = 144;
  const job = { seqLens: Int32Array.of(nq), extendLens: Int32Array.of(nq), window: 128, ratio: 4 as const, topkIndices: new Int32Array(nq * 16), topk: 16, width };
  for (let k = 0; k < 4; k++) {
    device.reset();
    device.failAfter = k;
    await expect(backend.planRows(job, 'device', 'device', 'device')).rejects.toMatchObject({ code: 'TOO_LARGE' });
    expect([device.live.size, device.ops.length], `allocation ${k + 1} fails`).toEqual([0, 0]);
  }
  device.reset();
  const into = { rows: backend.alloc(nq * width * 4), lens: backend.alloc(nq * 4) };
  device.failAfter = device.allocs + 1; // `dropped` allocated, the total not
  await expect(backend.planRows({ ...job, into }, 'device', 'device', 'device')).rejects.toMatchObject({ code: 'TOO_LARGE' });
  expect([into.rows.freed, into.lens.freed, device.live.size]).toEqual([false, false, 2]);
  await backend.dispose();
});
