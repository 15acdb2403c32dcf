/**
 * Memory held flat and bounded (SPEC §9), on every backend: repeated calls with a large kv that is
 * not in a SharedArrayBuffer keep the resident set flat; the staging that carries inputs is reused
 * (not one SharedArrayBuffer per call); a call whose staging or outputs exceed the engine's memory
 * budget is refused with TOO_LARGE before any work, as is a dequant whose output alone exceeds
 * the default budget, and the budget counts what a call holds beside its staging (the copy a
 * waiting call holds, a cpu dequant's checked and widened ids); a large dequant peaks near the size of its output; a plan per chunk, each
 * dropped, holds no workspace once it is collected.
 */
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import type { CpuBackend } from '../dist/backends/native/cpu_backend.js';
import * as R from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomIndices, testRng } from './helpers/random.js';
import { V4_TOKEN_BYTES } from '../dist/kv_cache_layout.js';

const rng = testRng('memory');
const BACKENDS = nativeAddonBuilt() ? (['wasm', 'cpu'] as const) : (['wasm'] as const);
const child = (name: string) => fileURLToPath(new URL(`./children/${name}`, import.meta.url));
const MiB = 2 ** 20;

/** A call's outcome in a form that prints small: the error's code and argument, or 'resolved'. */
function outcome(x: unknown): unknown {
  return x instanceof SparseMlaError ? { code: x.code, argument: x.argument } : x instanceof Error ? `${x.name}: ${x.message}` : 'resolved';
}

function runChild(args: string[], timeout = 240_000): Record<string, number | boolean> {
  const p = spawnSync(process.execPath, args, { encoding: 'utf8', timeout });
  expect({ signal: p.signal, status: p.status, stderr: p.stderr }).toEqual({ signal: null, status: 0, stderr: '' });
  return JSON.parse(p.stdout) as Record<string, number | boolean>;
}

describe.each(BACKENDS)('%s', (backend) => {
  test('300 sparsePrefill calls with a 40 MiB non-shared kv: the resident set grows by less than 48 MiB', () => {
    const r = runChild(['--expose-gc', child('rss.mjs'), backend, '300', '40', '48']);
    expect(r).toMatchObject({ calls: 300 });
    expect(r.growthMiB).toBeLessThan(48);
  }, 300_000);

  test('one plan per chunk, each dropped after a workspace layer: 26 plans of a 4 MiB workspace hold no more memory than the first', () => {
    // the wasm workers read a plan's workspace in place and keep a reference until their own
    // collector runs: a fresh SharedArrayBuffer per plan held every dropped plan's workspace
    // (+104 MiB here); the host workspaces are reused once their plan is collected. The child waits
    // for each dropped plan's workspace to be back (late: not back 2 s after its collection), so no
    // plan after the warm-up needs a buffer of its own (a fresh buffer per plan: 26 more)
    const r = runChild(['--expose-gc', child('plan_per_chunk.mjs'), backend, '30', '4096'], 60_000);
    expect(r).toMatchObject({ plans: 30, workspaceBytes: 4 * MiB, late: 0 });
    expect(r.arrayBuffersGrowthMiB).toBeLessThan(12);
    expect(r.allocations).toBe(r.allocationsAfterWarmup);
  }, 60_000);

  test('one dequant of a 384 MiB output peaks below 1.75x its size', () => {
    const r = runChild([child('peak.mjs'), backend, '384']);
    expect(r).toMatchObject({ outputBytes: 384 * MiB, lastRowMatches: true });
    expect(r.peakGrowth).toBeLessThan(1.75);
  }, 300_000);

  describe('a 64 MiB memory budget', () => {
    let engine: Engine;
    beforeAll(async () => {
      engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: 64 * MiB });
    });
    afterAll(async () => engine?.dispose());

    const cache = createKvCache('v4', { pageSize: 64, numPages: 4 });

    test('a dequant whose output exceeds it is TOO_LARGE before any work; one within it runs', async () => {
      const over = 80 * 1024; // 80 MiB of bf16 rows
      const t0 = performance.now();
      const err = await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [over], new Int32Array(over)) }).catch((e: unknown) => e);
      expect(outcome(err)).toEqual({ code: 'TOO_LARGE', argument: 'tokenIds' });
      expect((err as Error).message).toMatch(/memory budget of 67108864 bytes/);
      expect(performance.now() - t0).toBeLessThan(2000);
      const ids = Int32Array.from({ length: 4096 }, () => rng.int(0, 256));
      const got = await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [ids.length], ids) });
      expect(Array.from(got.data.subarray(0, 512), R.decodeBf16)).toEqual(Array.from(R.dequantizeKCacheReference(cache, [ids[0]!])));
    });

    test('a kv that has to be staged past it is TOO_LARGE; the same kv in a SharedArrayBuffer is read in place and runs', async () => {
      const sKV = 72 * 1024; // 72 MiB of bf16 kv
      const kvBits = new Uint16Array(sKV * 512);
      const q = tensor('bf16', [2, 2, 512], randomBf16Bits(rng, 2 * 2 * 512));
      const indices = tensor('int32', [2, 16], randomIndices(rng, 2, 16, sKV));
      const err = await engine.sparsePrefill({ q, kv: tensor('bf16', [sKV, 512], kvBits), indices, smScale: 0.05 }).catch((e: unknown) => e);
      expect(outcome(err)).toEqual({ code: 'TOO_LARGE', argument: 'q' });
      expect((err as Error).message).toMatch(/staging of the inputs/);
      const shared = new Uint16Array(new SharedArrayBuffer(kvBits.byteLength));
      shared.set(randomBf16Bits(rng, 4096 * 512));
      const args = { q, kv: tensor('bf16', [sKV, 512], shared), indices: tensor('int32', [2, 16], randomIndices(rng, 2, 16, 4096)), smScale: 0.05 };
      const res = await engine.sparsePrefill(args);
      const ref = R.sparsePrefillReference(args);
      expectWithinBounds('shared kv', res, ref, [0, 1]);
    });

    test('memoryBudgetBytes must be an integer ≥ 1 MiB', async () => {
      for (const bad of [0, 1000, -1, MiB + 0.5, Number.NaN, '64MiB']) {
        const e = await createEngine({ backend, memoryBudgetBytes: bad as number }).catch((x: unknown) => x);
        if (!(e instanceof SparseMlaError)) await (e as Engine).dispose();
        expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }).toEqual({ code: 'INVALID_VALUE', argument: 'memoryBudgetBytes' });
      }
    });
  });

  test('the budget counts the copy a call holds beside its staging slab while it waits for it: a budget between the old and the new total is TOO_LARGE (waiting or not); the same kv shared, or a budget over the new total, runs', async () => {
    const sKV = 8 * 1024; // 8 MiB of bf16 kv, not shared
    const q = tensor('bf16', [2, 2, 512], randomBf16Bits(rng, 2 * 2 * 512));
    const indices = tensor('int32', [2, 16], randomIndices(rng, 2, 16, sKV));
    const kvBits = randomBf16Bits(rng, sKV * 512);
    // staged: q, kv and indices (each at most 64 bytes of alignment more); outputs: out, lse, maxLogits
    const staged = q.data.byteLength + kvBits.byteLength + indices.data.byteLength + 3 * 64;
    const outputs = 2 * 2 * (512 * 2 + 8);
    const withoutHeld = staged + outputs, withHeld = withoutHeld + q.data.byteLength + kvBits.byteLength + indices.data.byteLength;
    const run = async (budget: number, kvData: Uint16Array) => {
      const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: budget });
      try {
        const args = { q, kv: tensor('bf16', [sKV, 512], kvData), indices, smScale: 0.05 };
        return await engine.sparsePrefill(args).then((r) => expectWithinBounds('within the budget', r, R.sparsePrefillReference(args), [0, 1]), (e: unknown) => e);
      } finally {
        await engine.dispose();
      }
    };
    const between = Math.floor((withoutHeld + withHeld) / 2);
    const err = await run(between, kvBits);
    expect(outcome(err)).toEqual({ code: 'TOO_LARGE', argument: 'q' });
    expect((err as Error).message).toMatch(/their copy held while the call waits for staging 8\.00 MiB/);
    const shared = new Uint16Array(new SharedArrayBuffer(kvBits.byteLength));
    shared.set(kvBits);
    expect(outcome(await run(between, shared))).toBe('resolved');
    expect(outcome(await run(withHeld, kvBits))).toBe('resolved');
  });

  test.skipIf(backend !== 'cpu')("a dequant counts the ids the addon snapshots (int32) and widens (int64) beside its staging: a budget between the old and the new total is TOO_LARGE; the new total runs", async () => {
    const n = 16 * 1024;
    const cache = createKvCache('v4', { pageSize: 64, numPages: 4 });
    const ids = Int32Array.from({ length: n }, () => rng.int(0, 256));
    // the output, the staged ids, the tokens the addon gathers from a cache that is not shared
    const counted = n * 512 * 2 + n * 4 + n * V4_TOKEN_BYTES;
    // the ids held while the call waits for staging, then the addon's snapshot and widened copy
    const more = n * 4 + n * 4 + n * 8;
    const run = async (budget: number) => {
      const engine = await createEngine({ backend, workers: 2, memoryBudgetBytes: budget });
      try {
        return await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [n], ids) }).then(
          (got) => expect(Array.from(got.data.subarray((n - 1) * 512), R.decodeBf16)).toEqual(Array.from(R.dequantizeKCacheReference(cache, [ids[n - 1]!]))),
          (e: unknown) => e,
        );
      } finally {
        await engine.dispose();
      }
    };
    const err = await run(counted + more / 2);
    expect(outcome(err)).toEqual({ code: 'TOO_LARGE', argument: 'tokenIds' });
    expect((err as Error).message).toMatch(/the addon's checked and widened token ids/);
    expect(outcome(await run(counted + more))).toBe('resolved');
  });

  test('identical calls reuse one staging slab', async () => {
    const engine = await createEngine({ backend, workers: 2 });
    try {
      const impl = engineBackend(engine) as WasmBackend | CpuBackend;
      const sKV = 4096;
      const args = {
        q: tensor('bf16', [4, 2, 512], randomBf16Bits(rng, 4 * 2 * 512)),
        kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)),
        indices: tensor('int32', [4, 32], randomIndices(rng, 4, 32, sKV)),
        smScale: 0.05,
      };
      await engine.sparsePrefill(args);
      const after1 = impl.staging.allocations;
      for (let i = 0; i < 50; i++) await engine.sparsePrefill(args);
      await Promise.all(Array.from({ length: 4 }, () => engine.sparsePrefill(args)));
      expect(after1).toBe(1);
      // four concurrent calls may each hold a slab once; sequential calls never add one
      expect(impl.staging.allocations).toBeLessThanOrEqual(4);
      expect(impl.staging.heldBytes).toBeLessThanOrEqual(4 * 2 * sKV * 512 * 2);
    } finally {
      await engine.dispose();
    }
  });
});

describe('the default budget', () => {
  // An output just over half the machine's memory: without the up-front check the wasm backend
  // was OOM-killed on such a call (16 GiB output on a 24 GiB machine).
  const ids = Math.ceil((os.totalmem() / 2 + 2 ** 30) / 1024);
  test.skipIf(ids > 2 ** 27)('a dequant whose output exceeds half the machine memory is TOO_LARGE in milliseconds', async () => {
    const cache = createKvCache('v4', { pageSize: 64, numPages: 1 });
    const tokenIds = tensor('int32', [ids], new Int32Array(ids));
    for (const backend of BACKENDS) {
      const engine = await createEngine({ backend, workers: 1 });
      try {
        const t0 = performance.now();
        const err = await engine.dequantizeKCachePaged({ cache, tokenIds }).catch((e: unknown) => e);
        expect(outcome(err)).toEqual({ code: 'TOO_LARGE', argument: 'tokenIds' });
        expect(performance.now() - t0).toBeLessThan(5000);
      } finally {
        await engine.dispose();
      }
    }
  });
});
