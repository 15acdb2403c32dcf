/**
 * The cuda backend's TypeScript half, run without a GPU: the real addon's CPU core plus a stand-in
 * for the CUDA op table. Checks what the class itself decides — host-side quantize on the CPU core,
 * typed errors from the CUDA ops, dispose waiting for calls in flight and refusing later ones —
 * so a change to it is caught here, not first on a GPU host.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createKvCache } from '../dist/index.js';
import { CudaBackend, defaultCudaDevice } from '../dist/backends/native/cuda_backend.js';
import { CpuBackend } from '../dist/backends/native/cpu_backend.js';
import { loadNativeAddon, type NativeCudaOps } from '../dist/backends/native/binding.js';
import type { QuantizeKCacheJob, SparsePrefillJob } from '../dist/backends/backend.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { randomBf16Bits, testRng } from './helpers/random.js';

const rng = testRng('cuda_backend_host');

/** A CUDA op table whose ops are the given functions; anything else is never called. */
function fakeOps(ops: Partial<Record<keyof NativeCudaOps, unknown>>): NativeCudaOps {
  class FakeStream {
    constructor(readonly device: number) {}
    synchronize(): Promise<void> {
      return Promise.resolve();
    }
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

test('SPARSE_MLA_DEVICE picks the default device; anything but an index is refused', () => {
  expect(defaultCudaDevice({})).toBe(0);
  expect(defaultCudaDevice({ SPARSE_MLA_DEVICE: ' 3 ' })).toBe(3);
  for (const bad of ['-1', 'one', '1.5']) expect(() => defaultCudaDevice({ SPARSE_MLA_DEVICE: bad })).toThrow(/SPARSE_MLA_DEVICE/);
});
