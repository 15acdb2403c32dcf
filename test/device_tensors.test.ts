/**
 * Device tensors and the cuda backend. Here (no GPU) the suite checks what holds on every machine:
 * device arguments go through the same validation as host ones (dtype, shape, byte size, freed),
 * and a backend without device memory refuses them (and `{ output: 'device' }`, upload, download)
 * with BACKEND_UNAVAILABLE before any work. The cuda half runs only where the cuda backend is
 * available (a Hopper GPU, the addon built with nvcc); on the GPU host the same checks, plus
 * the whole grid, run through `node dist/cli/main.js check --backend cuda` (no vitest needed).
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, listBackends, tensor } from '../dist/index.js';
import type { DeviceBuffer, DeviceTensor, Engine } from '../dist/index.js';
import { standInDevice } from './helpers/stand_in_device.js';
import { errorOf } from './helpers/errors.js';

/** A stand-in device buffer: branded like the cuda backend's, no memory behind it. */
function fakeBuffer(byteLength: number, freed = false): DeviceBuffer {
  return { device: 'cuda', byteLength, freed, free() {}, [Symbol.for('sparse-mla.DeviceBuffer')]: true } as DeviceBuffer;
}
function fakeTensor<D extends 'bf16' | 'int32' | 'int64' | 'float32'>(dtype: D, shape: number[], bytesPer: number, extra = 0): DeviceTensor<D> {
  return { dtype, shape, data: fakeBuffer(shape.reduce((a, b) => a * b, 1) * bytesPer + extra) };
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  const e = await errorOf(() => p);
  if (e === undefined) return 'no error';
  expect(e).toBeInstanceOf(SparseMlaError);
  return (e as SparseMlaError).code;
}

let wasm: Engine;
beforeAll(async () => {
  wasm = await createEngine({ backend: 'wasm', workers: 1 });
});
afterAll(async () => {
  await wasm?.dispose();
});

describe('device arguments share the host validation', () => {
  const q = fakeTensor('bf16', [4, 8, 512], 2);
  const kv = fakeTensor('bf16', [10, 512], 2);
  const idx = fakeTensor('int32', [4, 16], 4);

  test('a well-formed device call reaches the backend, which (wasm) refuses device memory', async () => {
    expect(wasm.hasDevice).toBe(false);
    expect(await codeOf(wasm.sparsePrefill({ q, kv, indices: idx, smScale: 0.1 }))).toBe('BACKEND_UNAVAILABLE');
    const host = { q: tensor('bf16', [4, 8, 512]), kv: tensor('bf16', [10, 512]), indices: tensor('int32', [4, 16]), smScale: 0.1 };
    expect(await codeOf(wasm.sparsePrefill(host, { output: 'device' }))).toBe('BACKEND_UNAVAILABLE');
    expect(await codeOf(wasm.upload(tensor('int32', [3])))).toBe('BACKEND_UNAVAILABLE');
    expect(await codeOf(wasm.download(idx))).toBe('BACKEND_UNAVAILABLE');
  });

  test('wrong byte size, freed buffer, wrong dtype, int64 device indices, bad output option: typed errors before any work', async () => {
    expect(await codeOf(wasm.sparsePrefill({ q: fakeTensor('bf16', [4, 8, 512], 2, 2), kv, indices: idx, smScale: 0.1 }))).toBe('INVALID_SHAPE');
    expect(await codeOf(wasm.sparsePrefill({ q, kv: { dtype: 'bf16', shape: [10, 512], data: fakeBuffer(10 * 512 * 2, true) }, indices: idx, smScale: 0.1 }))).toBe('INVALID_VALUE');
    expect(await codeOf(wasm.sparsePrefill({ q: fakeTensor('float32', [4, 8, 512], 4) as never, kv, indices: idx, smScale: 0.1 }))).toBe('INVALID_DTYPE');
    expect(await codeOf(wasm.sparsePrefill({ q, kv, indices: fakeTensor('int64', [4, 16], 8), smScale: 0.1 }))).toBe('INVALID_DTYPE');
    expect(await codeOf(wasm.sparsePrefill({ q, kv, indices: fakeTensor('int32', [5, 16], 4), smScale: 0.1 }))).toBe('INVALID_SHAPE');
    expect(await codeOf(wasm.sparsePrefill({ q, kv, indices: idx, smScale: 0.1 }, { output: 'gpu' as never }))).toBe('INVALID_VALUE');
    // a cache the op writes must be on the host
    const cache = { format: 'v4' as const, pageSize: 2, numPages: 1, data: fakeBuffer(1728) };
    expect(await codeOf(wasm.quantizeKCache({ cache: cache as never, tokenIds: [0], rows: tensor('bf16', [1, 512]) }))).toBe('INVALID_VALUE');
    expect(await codeOf(wasm.dequantizeKCachePaged({ cache: { ...cache, data: fakeBuffer(1727) }, tokenIds: [0] }))).toBe('INVALID_SHAPE');
    expect(await codeOf(wasm.dequantizeKCachePaged({ cache, tokenIds: [2] }))).toBe('OUT_OF_RANGE');
  });
});

const cuda = (await listBackends()).find((b) => b.name === 'cuda')!;

describe('the cuda backend', () => {
  test.skipIf(cuda.available)(`is unavailable here, with its reason (cuda suites skipped: ${cuda.reason})`, () => {
    expect(cuda.reason).toBeTruthy();
  });

  test.skipIf(!cuda.available)('check --backend cuda passes its grid', () => {
    const main = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));
    const r = spawnSync(process.execPath, [main, 'check', '--backend', 'cuda', '-q'], { encoding: 'utf8', timeout: 600_000 });
    expect(r.stdout).toMatch(/\d+ passed, 0 failed/);
    expect(r.status).toBe(0);
  }, 600_000);
});

describe('sparse-mla check (the shippable grid) on wasm', () => {
  test('a subset passes and prints the summary; exit 0', () => {
    const main = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));
    const r = spawnSync(process.execPath, [main, 'check', '--backend', 'wasm', '--only', 'dequant'], { encoding: 'utf8', timeout: 120_000 });
    expect(r.stdout).toMatch(/^4 passed, 0 failed$/m);
    expect(r.status).toBe(0);
  }, 120_000);
});

describe('download and copyFrom on a cuda engine (a stand-in device): the device tensor checked as an op checks one', () => {
  const device = standInDevice();
  const { engine, backend } = device.engine(0);
  const other = device.engine(0);
  const buf = backend.alloc(16); // int32 [4]
  const bad: [string, unknown, string, string][] = [
    ['no shape', { dtype: 'int32', data: buf }, 'INVALID_VALUE', 'tensor'],
    ['shape not an array', { dtype: 'int32', shape: 4, data: buf }, 'INVALID_SHAPE', 'tensor.shape'],
    ['shape [-1, -4] (16 bytes by its product)', { dtype: 'int32', shape: [-1, -4], data: buf }, 'INVALID_SHAPE', 'tensor.shape'],
    ['shape [0.5, 8]', { dtype: 'int32', shape: [0.5, 8], data: buf }, 'INVALID_SHAPE', 'tensor.shape'],
    ['dtype not a dtype', { dtype: 'float64', shape: [2], data: buf }, 'INVALID_DTYPE', 'tensor'],
    ['dtype "toString"', { dtype: 'toString', shape: [4], data: buf }, 'INVALID_DTYPE', 'tensor'],
    ['a shape that lies about the bytes', { dtype: 'int32', shape: [1000], data: buf }, 'INVALID_SHAPE', 'tensor.data'],
    ['a host tensor', tensor('int32', [4]), 'INVALID_VALUE', 'tensor'],
    ['null', null, 'INVALID_VALUE', 'tensor'],
  ];

  test.each(bad)('%s: a typed error before any op, nothing allocated', async (_name, t, code, argument) => {
    for (const call of [() => engine.download(t as never), () => other.engine.copyFrom(t as never)]) {
      device.reset();
      await expect(call()).rejects.toMatchObject({ code, argument });
      expect(device.ops).toEqual([]);
      expect(device.live.size).toBe(0);
    }
  });

  test("a buffer of another engine on the device is read on its own engine's stream (after the work queued there), and its shape is the checked copy", async () => {
    device.reset();
    const shape = [2, 2];
    const got = await other.engine.download({ dtype: 'int32', shape, data: buf });
    expect(device.faults).toEqual([]);
    expect(device.ops).toEqual(['download']);
    expect(got.shape).toEqual([2, 2]);
    expect(got.shape).not.toBe(shape);
    const copy = await other.engine.copyFrom({ dtype: 'float32', shape, data: buf });
    expect(copy.shape).toEqual([2, 2]);
    expect(device.faults).toEqual([]);
    copy.data.free();
    expect(device.live.size).toBe(0);
  });
});

test("a Proxy of a cuda engine's device buffer, or an object made from its class's prototype, is refused as not live (INVALID_VALUE naming the argument), never a TypeError, before any op", async () => {
  const device = standInDevice();
  const { engine } = device.engine(0);
  const q = await engine.upload(tensor('bf16', [2, 4, 512]));
  const kv = await engine.upload(tensor('bf16', [8, 512]));
  const proto = Object.getPrototypeOf(q.data) as object;
  const forged = Object.assign(Object.create(proto) as object, { byteLength: q.data.byteLength, deviceIndex: 0, native: {}, [Symbol.for('sparse-mla.DeviceBuffer')]: true });
  for (const data of [new Proxy(q.data, {}), forged]) {
    device.reset();
    await expect(engine.sparsePrefill({ q: { dtype: 'bf16', shape: [2, 4, 512], data } as never, kv, indices: tensor('int32', [2, 4]), smScale: 0.1 }, { output: 'device' })).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'q.data' });
    await expect(engine.download({ dtype: 'bf16', shape: [2, 4, 512], data } as never)).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'tensor.data' });
    await expect(engine.copyFrom({ dtype: 'bf16', shape: [2, 4, 512], data } as never)).rejects.toMatchObject({ code: 'INVALID_VALUE', argument: 'tensor.data' });
    expect([device.ops, device.live.size]).toEqual([[], 0]);
  }
  await engine.dispose();
});
