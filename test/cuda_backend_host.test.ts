/**
 * The cuda backend's TypeScript half, run without a GPU: the real addon's CPU core plus a stand-in
 * for the CUDA op table. Checks what the class itself decides — host-side quantize on the CPU core,
 * typed errors from the CUDA ops, dispose waiting for calls in flight and refusing later ones —
 * so a change to it is caught here, not first on a GPU host.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createKvCache } from '../dist/index.js';
import { CudaBackend, CudaDeviceBuffer, defaultCudaDevice } from '../dist/backends/native/cuda_backend.js';
import { CpuBackend } from '../dist/backends/native/cpu_backend.js';
import { loadNativeAddon, type NativeCudaOps } from '../dist/backends/native/binding.js';
import { CUDA_OP_PARAMS, type CudaOpName } from '../dist/backends/abi.js';
import { v4PageBytes } from '../dist/kv_cache_layout.js';
import type { CacheView, DequantizeKCacheJob, PagedSparseAttentionJob, QuantizeKCacheJob, SparsePrefillJob } from '../dist/backends/backend.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { randomBf16Bits, testRng } from './helpers/random.js';

const rng = testRng('cuda_backend_host');

class FakeStream {
  constructor(readonly device: number) {}
  synchronize(): Promise<void> {
    return Promise.resolve();
  }
}

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

  test('dequantizeKvCache: host ids into a new output, host ids into a device workspace row, device ids', async () => {
    const { ops, calls } = recordingOps();
    const cuda = new CudaBackend(addon, ops, 1);
    const cache = v4View(64, 2, new Uint8Array(v4View(64, 2, null).bytes));
    const job: DequantizeKCacheJob = { cache, tokenIds: Int32Array.from([3, 70, 0]), n: 3, rowDim: 512 };
    await cuda.dequantizeKCache(job);
    const ws = cuda.alloc(10 * 512 * 2);
    await cuda.dequantizeKCacheInto(job, ws, 5);
    const ids = cuda.alloc(3 * 8);
    await cuda.dequantizeKCacheIdsInto(cache, ids, 3, ws, 7);
    expect(calls.map((c) => c.op)).toEqual(['dequantizeKvCache', 'dequantizeKvCache', 'dequantizeKvCache']);
    expect(calls[0]!.params).toMatchObject({ format: 0, cache: cache.data, pageSize: 64, numPages: 2, tokenIds: job.tokenIds, numTokens: 3, outRowOffset: null });
    expect((calls[0]!.params.out as Uint16Array).length).toBe(3 * 512);
    expect(calls[1]!.params).toMatchObject({ tokenIds: job.tokenIds, numTokens: 3, out: (ws as CudaDeviceBuffer).native, outRowOffset: 5 });
    expect(calls[2]!.params).toMatchObject({ tokenIds: (ids as CudaDeviceBuffer).native, numTokens: 3, out: (ws as CudaDeviceBuffer).native, outRowOffset: 7 });
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
    expect([(r4.rows as Int32Array).length, (r4.lens as Int32Array).length, (r4.dropped as Int32Array).length]).toEqual([140 * 144, 140, 140]);
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
