/**
 * The library owns what it reads during a call (SPEC §9), on every backend: a buffer detached or
 * transferred while a call runs gives the result of the data as it was at the call or a typed
 * error — never a crash, never a write into memory the cache no longer owns; a tensor is read once,
 * so a getter or a subclass that changes its answer cannot slip past validation; inputs in
 * SharedArrayBuffers (read in place, never copied) give the same results.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine, SparsePrefillArgs, Tensor } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import type { CpuBackend } from '../dist/backends/native/cpu_backend.js';
import * as R from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';

const rng = testRng('ownership');
const BACKENDS = nativeAddonBuilt() ? (['wasm', 'cpu'] as const) : (['wasm'] as const);
const DETACH_CHILD = fileURLToPath(new URL('./children/detach.mjs', import.meta.url));

const engines = new Map<string, Engine>();
beforeAll(async () => {
  for (const b of BACKENDS) engines.set(b, await createEngine({ backend: b, workers: 2 }));
});
afterAll(async () => {
  await Promise.all([...engines.values()].map((e) => e.dispose()));
});

interface Settled {
  ok: boolean;
  typed?: boolean;
  code?: string | null;
  message?: string;
  value?: Record<string, boolean>;
  movedUntouched?: boolean;
}

/** Resolved with values that pass against the reference, or rejected with a SparseMlaError. */
function expectResultOrTypedError(op: string, r: Settled): void {
  if (r.ok) expect({ op, ...r.value }).toEqual({ op, ...Object.fromEntries(Object.keys(r.value!).map((k) => [k, true])) });
  else expect({ op, typed: r.typed, message: r.message }).toEqual({ op, typed: true, message: r.message });
}

describe.each(BACKENDS)('%s: buffers detached or transferred while a call runs', (backend) => {
  test('no crash; each op gives the pre-detach result or a typed error; quantize writes nothing', () => {
    const seed = rng.u32();
    const p = spawnSync(process.execPath, ['--expose-gc', DETACH_CHILD, backend, String(seed)], { encoding: 'utf8', timeout: 240_000 });
    expect({ signal: p.signal, status: p.status, stderr: p.stderr }).toEqual({ signal: null, status: 0, stderr: '' });
    const report = JSON.parse(p.stdout) as Record<string, Settled>;
    for (const op of ['sparsePrefill', 'pagedSparseAttention', 'dequantizeKCachePaged']) expectResultOrTypedError(op, report[op]!);
    // The cache's memory moved to another owner mid-call: the call must fail typed and must not
    // have written a byte into it.
    expect(report.quantizeKCache).toMatchObject({ ok: false, typed: true, code: 'INVALID_VALUE', movedUntouched: true });
  }, 300_000);
});

describe.each(BACKENDS)('%s: a cache transferred while its quantize waits for staging', (backend) => {
  // The staging is all held here, so the call cannot reach the threads until it is released: the
  // transfer lands between the call and its start, whatever the machine's load.
  test('the call fails typed and writes nothing; left alone, the same call writes the reference bytes', async () => {
    const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: 8 << 20 });
    const staging = (engineBackend(engine) as WasmBackend | CpuBackend).staging;
    const quantizeWhileHeld = async (transfer: boolean) => {
      const cache = createKvCache('v4', { pageSize: 64, numPages: 8 });
      cache.data.fill(0x5a);
      const before = cache.data.slice();
      const n = 300;
      const ids = Int32Array.from({ length: n }, () => rng.int(0, 512));
      const rows = tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512));
      const held = await staging.acquire(staging.capacityBytes);
      let settled = false;
      const p = engine.quantizeKCache({ cache, tokenIds: tensor('int32', [n], ids), rows }).finally(() => (settled = true));
      const moved = transfer ? new Uint8Array(structuredClone(cache.data.buffer, { transfer: [cache.data.buffer] })) : null;
      await new Promise((r) => setTimeout(r, 20));
      const waited = !settled;
      staging.release(held);
      const err = await p.then(() => null, (e: unknown) => e);
      const ref = { format: cache.format, pageSize: cache.pageSize, numPages: cache.numPages, data: before };
      R.quantizeKCacheReference(ref, Array.from(ids), rows);
      return { waited, err, moved, cache, ref };
    };

    try {
      const r = await quantizeWhileHeld(true);
      expect(r.waited).toBe(true);
      expect(r.err instanceof SparseMlaError ? { code: r.err.code, argument: r.err.argument } : r.err).toEqual({ code: 'INVALID_VALUE', argument: 'cache.data' });
      expect((r.err as Error).message).toMatch(/detached, transferred or resized while the call (waited for staging|ran)/);
      expect(r.moved!.every((b) => b === 0x5a)).toBe(true);

      const control = await quantizeWhileHeld(false);
      expect({ waited: control.waited, err: control.err }).toEqual({ waited: true, err: null });
      expect(Buffer.from(control.cache.data).equals(Buffer.from(control.ref.data))).toBe(true);
    } finally {
      await engine.dispose();
    }
  });
});

function prefillArgs(sQ: number, hQ: number, dQK: number, sKV: number, topk: number): SparsePrefillArgs {
  return randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }, { invalidFraction: 0.1 });
}

function judgePrefill(label: string, args: SparsePrefillArgs, res: { out: Tensor<'bf16'>; lse: Tensor<'float32'>; maxLogits: Tensor<'float32'> }): void {
  const rows = Array.from({ length: args.q.shape[0]! }, (_, i) => i);
  expectWithinBounds(label, res, R.sparsePrefillReference(args), rows);
}

/** A tensor whose `data` getter answers `first` for its first `reads` reads and `then` after. */
function fickle<T extends Tensor>(t: T, reads: number, then: ArrayBufferView): T {
  let n = 0;
  return {
    dtype: t.dtype,
    shape: t.shape,
    get data() {
      return n++ < reads ? t.data : then;
    },
  } as unknown as T;
}

describe.each(BACKENDS)('%s: what is validated is what is computed', (backend) => {
  test('a data getter that changes its answer between reads: the call computes on the first answer', async () => {
    const engine = engines.get(backend)!;
    const args = prefillArgs(6, 4, 512, 300, 64);
    // Shorter, different arrays: had a later read reached the backend, the result would differ
    // (or the call would fail) — whichever read validation happens to make.
    const shortKv = randomBf16Bits(rng, 150 * 512);
    const shortQ = randomBf16Bits(rng, 3 * 4 * 512);
    for (let reads = 1; reads <= 6; reads++) {
      const res = await engine.sparsePrefill({ ...args, kv: fickle(args.kv, reads, shortKv), q: fickle(args.q, reads, shortQ) });
      judgePrefill(`reads=${reads}`, args, res);
    }
  });

  test('a typed-array subclass whose length lies is refused by its real length', async () => {
    const engine = engines.get(backend)!;
    const args = prefillArgs(4, 2, 512, 64, 16);
    class Liar extends Uint16Array {
      claimed = 0;
      override get length(): number {
        return this.claimed;
      }
    }
    const real = 32 * 512;
    const liar = new Liar(real);
    liar.set(args.kv.data.subarray(0, real));
    liar.claimed = 64 * 512;
    const err = await engine.sparsePrefill({ ...args, kv: { dtype: 'bf16', shape: [64, 512], data: liar } as Tensor<'bf16'> }).catch((e: unknown) => e);
    expect(err instanceof SparseMlaError ? { code: err.code, argument: err.argument } : 'resolved').toEqual({ code: 'INVALID_SHAPE', argument: 'kv.data' });
  });

  test('inputs in SharedArrayBuffers are read in place and give the reference results', async () => {
    const engine = engines.get(backend)!;
    const args = prefillArgs(40, 8, 576, 900, 256);
    const shared = <T extends Uint16Array | Int32Array>(a: T): T => {
      const s = new (a.constructor as new (b: SharedArrayBuffer) => T)(new SharedArrayBuffer(a.byteLength));
      s.set(a as never);
      return s;
    };
    const sharedArgs = {
      ...args,
      q: tensor('bf16', args.q.shape, shared(args.q.data)),
      kv: tensor('bf16', args.kv.shape, shared(args.kv.data)),
      indices: tensor('int32', args.indices.shape, shared(args.indices.data as Int32Array)),
    };
    judgePrefill('shared inputs', args, await engine.sparsePrefill(sharedArgs));

    const cache = createKvCache('v4', { pageSize: 64, numPages: 8 });
    const sharedCache = { ...cache, data: new Uint8Array(new SharedArrayBuffer(cache.data.byteLength)) };
    const n = 300;
    const ids = Int32Array.from({ length: n }, () => rng.int(0, 512));
    const rows = tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512));
    await engine.quantizeKCache({ cache: sharedCache, tokenIds: tensor('int32', [n], ids), rows });
    R.quantizeKCacheReference(cache, Array.from(ids), rows);
    expect(Buffer.from(sharedCache.data).equals(Buffer.from(cache.data))).toBe(true);
    const deq = await engine.dequantizeKCachePaged({ cache: sharedCache, tokenIds: tensor('int32', [n], ids) });
    const want = R.dequantizeKCacheReference(cache, Array.from(ids));
    expect(Array.from(deq.data, (b) => R.decodeBf16(b))).toEqual(Array.from(want));
  });
});
