/**
 * The native `cpu` backend (the addon's threads running the core built for this machine): results
 * against the float64 reference and against the wasm backend (bit-equal where the math is exact:
 * the cache ops; attention only within the §4 bounds, the SIMD widths and FMA differ), bit-equal across
 * thread splits and input views, the event loop free during a call, typed errors, concurrent calls,
 * and a process without the addon falling back with reasons. Skipped when the addon is not built.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, listBackends, tensor } from '../dist/index.js';
import type { Engine, KvCache, SparsePrefillArgs, SparsePrefillResult, Tensor } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { SparsePrefillJob } from '../dist/backends/backend.js';
import * as R from '../dist/reference/index.js';
import { NATIVE_ADDON, nativeAddonBuilt } from './helpers/backends.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, sampleRows, testRng } from './helpers/random.js';
import { tempDirs } from './helpers/temp_dirs.js';

const built = nativeAddonBuilt();
if (!built) console.log(`[skip] native_backend.test: the addon is not built (${NATIVE_ADDON}); run \`npm run build:native\` with CMake and a C++ compiler`);

const rng = testRng('native_backend.test');
const bits = (t: { data: ArrayLike<number> }) => Array.from(t.data);
const bf16 = (shape: number[], std = 1): Tensor<'bf16'> => tensor('bf16', shape, randomBf16Bits(rng, shape.reduce((a, b) => a * b, 1), std));

/** Random sparse-prefill arguments (sink, lengths and invalid entries mixed in). */
function prefillArgs(sQ: number, hQ: number, dQK: number, sKV: number, topk: number): SparsePrefillArgs {
  return {
    ...randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }, { invalidFraction: 0.1, duplicateFraction: 0.05 }),
    attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal() * 2)),
    topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(0, topk + 1))),
  };
}

function judgePrefill(label: string, args: SparsePrefillArgs, res: SparsePrefillResult, queries: number[]): void {
  const ref = R.sparsePrefillReference(args, { queries });
  expectWithinBounds(label, res, ref, queries);
}

const sameResult = (a: SparsePrefillResult, b: SparsePrefillResult) => {
  expect(bits(a.out)).toEqual(bits(b.out));
  expect(bits(a.lse)).toEqual(bits(b.lse));
  expect(bits(a.maxLogits)).toEqual(bits(b.maxLogits));
};

/** A v4 / v32 cache filled through `engine` with random rows. */
async function filledCache(engine: Engine, format: 'v4' | 'v32', geometry: { pageSize: number; numPages: number } | { numTokens: number }): Promise<KvCache> {
  const cache = createKvCache(format, geometry as never);
  const n = cache.pageSize * cache.numPages;
  const dim = format === 'v4' ? 512 : 576;
  const rows = bf16([n, dim], 3);
  await engine.quantizeKCache({ cache, tokenIds: Array.from({ length: n }, (_, i) => i), rows });
  return cache;
}

describe.skipIf(!built)('cpu backend (native addon)', () => {
  let cpu: Engine;
  let wasm: Engine;
  beforeAll(async () => {
    [cpu, wasm] = await Promise.all([createEngine({ backend: 'cpu' }), createEngine({ backend: 'wasm', workers: 2 })]);
  }, 60_000);
  afterAll(async () => {
    await Promise.all([cpu?.dispose(), wasm?.dispose()]);
  });

  test('threads: the machine’s cores by default, the workers option otherwise', async () => {
    expect(cpu.backend).toBe('cpu');
    expect(cpu.workers).toBe(os.availableParallelism());
    const e = await createEngine({ backend: 'cpu', workers: 3 });
    expect(e.workers).toBe(3);
    await e.dispose();
  });

  test('build.simd names the SIMD path the core was compiled for (never scalar on x86-64 or arm64)', async () => {
    const info = (await listBackends()).find((b) => b.name === 'cpu');
    const details = info?.details as { simd?: string; cpuArch?: string } | undefined;
    const simd = details?.simd ?? '';
    if (process.arch === 'x64') expect(simd).toMatch(/^(SSE2|AVX2\+FMA|AVX-512(\+BF16)?)$/);
    if (process.arch === 'arm64') expect(simd).toBe('NEON');
    // a build for this machine takes the widest path simd.h has for its flags
    let flags = '';
    try {
      flags = readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)?.[1] ?? '';
    } catch {
      /* no /proc: nothing more to judge */
    }
    const has = (f: string) => new RegExp(`\\b${f}\\b`).test(flags);
    if (process.arch === 'x64' && details?.cpuArch === 'native' && ['avx512f', 'avx512bw', 'avx512vl', 'avx512dq'].every(has)) {
      expect(simd).toBe(has('avx512_bf16') ? 'AVX-512+BF16' : 'AVX-512');
    }
  });

  test('an x86-64-v3 build hands its calls to its AVX-512 copy where the CPU has it (with the BF16 dot where it has AVX512_BF16); SPARSE_MLA_CPU_ISA=baseline keeps its AVX2 kernels', () => {
    const simdIn = (isa: string | undefined) => {
      const env = { ...process.env };
      if (isa === undefined) delete env.SPARSE_MLA_CPU_ISA;
      else env.SPARSE_MLA_CPU_ISA = isa;
      const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(JSON.stringify(require(process.argv[1]).build))', process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON], { env, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as { cpuArch: string; simd: string };
    };
    const auto = simdIn(undefined);
    if (process.arch !== 'x64' || auto.cpuArch !== 'x86-64-v3') return;
    let flags = '';
    try {
      flags = readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)?.[1] ?? '';
    } catch {
      /* no /proc: the AVX-512 case is not judged */
    }
    const has = (f: string) => new RegExp(`\\b${f}\\b`).test(flags);
    // the copy needs AVX-512 F/CD/BW/DQ/VL; its S = Q·Kᵀ takes the BF16 dot where the CPU has AVX512_BF16 too
    const avx512 = ['avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'].every(has);
    expect(auto.simd).toBe(avx512 ? (has('avx512_bf16') ? 'AVX-512+BF16' : 'AVX-512') : 'AVX2+FMA');
    expect(simdIn('baseline').simd).toBe('AVX2+FMA');
    expect(simdIn('auto').simd).toBe(auto.simd);
  });

  test('sparsePrefill at the run shape (hQ=64, dQK=512, topk=640): cpu and wasm both within §4 of the reference', async () => {
    const args = prefillArgs(24, 64, 512, 2048, 640);
    const [c, w] = await Promise.all([cpu.sparsePrefill(args), wasm.sparsePrefill(args)]);
    const queries = sampleRows(rng, 24, 6);
    judgePrefill('cpu', args, c, queries);
    judgePrefill('wasm', args, w, queries);
  });

  test('sparsePrefill dQK=576, hQ=128, sKV < topk, no sink: within §4 of the reference', async () => {
    const args = prefillArgs(9, 128, 576, 100, 256);
    delete args.attnSink;
    judgePrefill('cpu', args, await cpu.sparsePrefill(args), sampleRows(rng, 9, 4));
  });

  test('results do not depend on the thread split or on where the inputs sit in their buffers', async () => {
    const args = prefillArgs(13, 16, 512, 300, 128);
    const one = await createEngine({ backend: 'cpu', workers: 1 });
    const five = await createEngine({ backend: 'cpu', workers: 5 });
    try {
      const base = await one.sparsePrefill(args);
      sameResult(await five.sparsePrefill(args), base);
      sameResult(await cpu.sparsePrefill(args), base);
      // q, kv and the indices as views at odd offsets into larger (one of them shared) buffers
      const view = <T extends Uint16Array | Int32Array>(a: T, shared: boolean): T => {
        const ctor = a.constructor as new (b: ArrayBufferLike) => T;
        const big = new ctor(shared ? new SharedArrayBuffer((a.length + 7) * a.BYTES_PER_ELEMENT) : new ArrayBuffer((a.length + 7) * a.BYTES_PER_ELEMENT));
        big.set(a as never, 3);
        return big.subarray(3, 3 + a.length) as T;
      };
      const moved: SparsePrefillArgs = {
        ...args,
        q: tensor('bf16', args.q.shape, view(args.q.data as Uint16Array, false)),
        kv: tensor('bf16', args.kv.shape, view(args.kv.data as Uint16Array, true)),
        indices: tensor('int32', args.indices.shape, view(args.indices.data as Int32Array, false)),
      };
      sameResult(await five.sparsePrefill(moved), base);
      judgePrefill('cpu', args, base, sampleRows(rng, 13, 4));
    } finally {
      await Promise.all([one.dispose(), five.dispose()]);
    }
  });

  test('cache ops are bit-equal to wasm and to the reference: quantize (duplicate ids: last wins), dequantize, v4 and v32', async () => {
    for (const [format, geometry] of [
      ['v4', { pageSize: 64, numPages: 5 }],
      ['v32', { numTokens: 150 }],
    ] as const) {
      const dim = format === 'v4' ? 512 : 576;
      const n = 200;
      const cacheC = createKvCache(format, geometry as never);
      const cacheW = createKvCache(format, geometry as never);
      const cacheR = createKvCache(format, geometry as never);
      const tokens = cacheC.pageSize * cacheC.numPages;
      // ids with repeats, so several rows target one token
      const ids = Array.from({ length: n }, () => rng.int(0, Math.min(tokens, 120)));
      const rows = tensor('float32', [n, dim], Float32Array.from({ length: n * dim }, () => rng.normal() * 2 ** rng.int(-8, 8)));
      await Promise.all([cpu.quantizeKCache({ cache: cacheC, tokenIds: ids, rows }), wasm.quantizeKCache({ cache: cacheW, tokenIds: ids, rows })]);
      R.quantizeKCacheReference(cacheR, ids, rows);
      expect(Buffer.compare(cacheC.data, cacheW.data)).toBe(0);
      expect(Buffer.compare(cacheC.data, cacheR.data)).toBe(0);
      const gather = Array.from({ length: 333 }, () => rng.int(0, tokens));
      const [dc, dw] = await Promise.all([cpu.dequantizeKCachePaged({ cache: cacheC, tokenIds: gather }), wasm.dequantizeKCachePaged({ cache: cacheC, tokenIds: gather })]);
      expect(dc.shape).toEqual([333, dim]);
      expect(bits(dc)).toEqual(bits(dw));
      const ref = R.dequantizeKCacheReference(cacheC, gather);
      expect(Array.from(dc.data, (b) => R.decodeBf16(b))).toEqual(Array.from(ref));
    }
  });

  test('pagedSparseAttention with main + extra caches: within the §4 bounds of the reference', async () => {
    const main = await filledCache(cpu, 'v4', { pageSize: 64, numPages: 3 });
    const extra = await filledCache(cpu, 'v4', { pageSize: 2, numPages: 40 });
    const n = 7, hQ = 16;
    const ids = (count: number, tokens: number) => Int32Array.from({ length: n * count }, () => (rng.uniform() < 0.1 ? rng.pick([-1, tokens, 2 ** 31 - 1]) : rng.int(0, tokens)));
    const args = {
      q: bf16([n, hQ, 512]),
      kCache: main,
      indices: tensor('int32', [n, 96], ids(96, 192)),
      extraKCache: extra,
      extraIndices: tensor('int32', [n, 40], ids(40, 80)),
      attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
      smScale: 1 / Math.sqrt(512),
    };
    const res = await cpu.pagedSparseAttention(args);
    const ref = R.pagedSparseAttentionReference(args);
    expectWithinBounds('paged', res, ref, [...Array(n).keys()]);
  });

  test('the event loop stays free during a long call (a timer fires while it runs)', async () => {
    // inputs in shared memory (read in place), so the call returns after its checks alone: copies of
    // private inputs into fresh staging slabs (page faults on a VM) took up to 0.46 of the whole
    // call under two page-fault hogs, near the bound below; work done at the call gives about 1
    const inShared = <T extends Uint16Array | Int32Array>(a: T): T => {
      const s = new (a.constructor as new (b: SharedArrayBuffer) => T)(new SharedArrayBuffer(a.byteLength));
      s.set(a as never);
      return s;
    };
    const a = prefillArgs(96, 64, 512, 4096, 640);
    const args = { ...a, q: tensor('bf16', a.q.shape, inShared(a.q.data as Uint16Array)), kv: tensor('bf16', a.kv.shape, inShared(a.kv.data as Uint16Array)), indices: tensor('int32', a.indices.shape, inShared(a.indices.data as Int32Array)) };
    let ticks = 0;
    let maxGap = 0;
    let last = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      maxGap = Math.max(maxGap, now - last);
      last = now;
      ticks++;
    }, 5);
    const t0 = performance.now();
    const pending = cpu.sparsePrefill(args);
    const syncMs = performance.now() - t0;
    const res = await pending;
    const totalMs = performance.now() - t0;
    clearInterval(timer);
    expect(res.out.shape).toEqual([96, 64, 512]);
    // The call returned before doing the work, and timers kept firing until it was done.
    expect(syncMs).toBeLessThan(totalMs / 2);
    expect(ticks).toBeGreaterThanOrEqual(3);
    expect(maxGap).toBeLessThan(Math.max(250, totalMs / 2));
  });

  test('token ids in a SharedArrayBuffer are taken at the call: ids written past the cache after it change nothing', async () => {
    // The cache ops check their ids and then address the cache with them; shared memory is
    // otherwise read in place, so an id read again after another thread wrote it could address
    // memory outside the cache. Every libuv pool thread is held by a long call first, so the ops'
    // own work (on that pool) starts only after the ids below have been overwritten.
    const holdPool = () => Array.from({ length: Number(process.env.UV_THREADPOOL_SIZE ?? 4) }, () => cpu.sparsePrefill(prefillArgs(64, 64, 512, 2048, 512)));
    const cache = createKvCache('v4', { pageSize: 64, numPages: 4 });
    const n = 64;
    const ids = new Int32Array(new SharedArrayBuffer(n * 4));
    for (let i = 0; i < n; i++) ids[i] = 255 - i;
    const given = Array.from(ids);
    const rows = bf16([n, 512], 3);
    let held = holdPool();
    const quantized = cpu.quantizeKCache({ cache, tokenIds: tensor('int32', [n], ids), rows });
    ids.fill(1 << 30);
    await Promise.all([quantized, ...held]);
    const want = createKvCache('v4', { pageSize: 64, numPages: 4 });
    R.quantizeKCacheReference(want, given, rows);
    expect(Buffer.from(cache.data).equals(Buffer.from(want.data))).toBe(true);
    // dequantize reads a shared cache in place, and its ids on the pool's threads
    const sharedCache = { ...cache, data: new Uint8Array(new SharedArrayBuffer(cache.data.byteLength)) };
    sharedCache.data.set(cache.data);
    ids.set(given);
    held = holdPool();
    const dequantized = cpu.dequantizeKCachePaged({ cache: sharedCache, tokenIds: tensor('int32', [n], ids) });
    ids.fill(1 << 30);
    const [got] = await Promise.all([dequantized, ...held]);
    expect(bits(got)).toEqual(bits(await wasm.dequantizeKCachePaged({ cache: want, tokenIds: given })));
  });

  test('concurrent calls on one engine each give the result they give alone', async () => {
    const all = [prefillArgs(5, 8, 512, 200, 64), prefillArgs(17, 32, 576, 90, 128), prefillArgs(1, 64, 512, 1000, 640), prefillArgs(40, 4, 512, 64, 16)];
    const together = await Promise.all(all.map((a) => cpu.sparsePrefill(a)));
    for (let i = 0; i < all.length; i++) sameResult(together[i]!, await cpu.sparsePrefill(all[i]!));
  });

  test('errors are typed: validation before work, core statuses and mismatched jobs as BACKEND_FAILURE, DISPOSED after dispose', async () => {
    const cache = await filledCache(cpu, 'v4', { pageSize: 2, numPages: 4 });
    const before = Buffer.from(cache.data);
    const rows = bf16([2, 512]);
    await expect(cpu.quantizeKCache({ cache, tokenIds: [1, 8], rows })).rejects.toMatchObject({ code: 'OUT_OF_RANGE' });
    expect(Buffer.compare(cache.data, before)).toBe(0);
    await expect(cpu.dequantizeKCachePaged({ cache, tokenIds: [-1] })).rejects.toMatchObject({ code: 'OUT_OF_RANGE' });

    // Jobs the engine would never build, straight to the backend: the core's status and the
    // addon's own argument check come back typed, and nothing is written out of bounds.
    const backend = engineBackend(cpu)!;
    const job: SparsePrefillJob = {
      q: new Uint16Array(2 * 2 * 100),
      kv: new Uint16Array(3 * 100),
      indices: new Int32Array(2 * 4),
      topkLength: null,
      attnSink: null,
      sQ: 2,
      hQ: 2,
      dQK: 100, // not a multiple of 64: the core refuses it
      dV: 64,
      sKV: 3,
      topk: 4,
      smScale: 0.1,
    };
    const coreErr = await backend.sparsePrefill(job).catch((e: unknown) => e);
    expect(coreErr).toBeInstanceOf(SparseMlaError);
    expect(coreErr).toMatchObject({ code: 'BACKEND_FAILURE' });
    expect((coreErr as Error).message).toMatch(/cpu backend: sparsePrefill failed: the core returned SMLA_ERR_INVALID_ARGUMENT/);
    const short = await backend.sparsePrefill({ ...job, dQK: 128, q: new Uint16Array(10), kv: new Uint16Array(3 * 128) }).catch((e: unknown) => e);
    expect(short).toBeInstanceOf(SparseMlaError);
    expect(short).toMatchObject({ code: 'BACKEND_FAILURE' });
    expect((short as Error).message).toMatch(/q: expected 512 elements, got 10/);

    const e = await createEngine({ backend: 'cpu', workers: 1 });
    const inFlight = e.sparsePrefill(prefillArgs(8, 16, 512, 100, 64));
    await e.dispose();
    expect((await inFlight).out.shape).toEqual([8, 16, 512]); // a call in flight completes
    await expect(e.sparsePrefill(prefillArgs(1, 1, 512, 4, 4))).rejects.toMatchObject({ code: 'DISPOSED' });
  });
});

describe('a process without the addon', () => {
  const probeDir = tempDirs('sparse-mla-noaddon-');
  test('imports, reports why cpu and cuda are unavailable and how to get them, and runs on wasm under auto', () => {
    const dir = probeDir();
    const script = join(dir, 'probe.mjs');
    const index = new URL('../dist/index.js', import.meta.url).href;
    writeFileSync(
      script,
      `import { createEngine, listBackends } from ${JSON.stringify(index)};\n` +
        `const out = { backends: await listBackends() };\n` +
        `try { await createEngine({ backend: 'cpu' }); } catch (e) { out.cpu = { code: e.code, message: e.message }; }\n` +
        `const e = await createEngine({ workers: 1 }); out.auto = e.backend; await e.dispose();\n` +
        `console.log(JSON.stringify(out));\n`,
    );
    const missing = join(dir, 'no', 'sparse_mla_native.node');
    const p = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, SPARSE_MLA_NATIVE_ADDON: missing, SPARSE_MLA_BACKEND: '' } });
    expect(p.stderr).toBe('');
    expect(p.status).toBe(0);
    const out = JSON.parse(p.stdout) as { backends: Array<{ name: string; available: boolean; reason?: string }>; cpu: { code: string; message: string }; auto: string };
    const how = /addon not built \(.*sparse_mla_native\.node is missing; SPARSE_MLA_NATIVE_ADDON points there\): build it with `npm run build:native` \(CMake and a C\+\+ compiler/;
    for (const name of ['cuda', 'cpu']) {
      const b = out.backends.find((x) => x.name === name)!;
      expect(b.available).toBe(false);
      expect(b.reason).toMatch(how);
    }
    expect(out.cpu.code).toBe('BACKEND_UNAVAILABLE');
    expect(out.cpu.message).toMatch(/^backend "cpu" is unavailable — addon not built/);
    expect(out.auto).toBe('wasm');
  });
});

