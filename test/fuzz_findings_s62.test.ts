/**
 * What session 62's API fuzzer hunt (helper-96) found in the library, one focused case each.
 *
 * An engine's methods refuse a `this` that is no engine with INVALID_VALUE naming `this` (7dbdfda),
 * and run on a Proxy of an engine or an object inheriting from one as on the engine. The check was
 * `this instanceof SparseMlaEngine`, which an object that only has the engine's prototype passes:
 * `Object.create(Object.getPrototypeOf(engine))` (what a mocking library's stub instance is), the same
 * with the engine's public fields copied, a Proxy claiming the prototype. Every method then threw a
 * TypeError from inside (`Cannot read properties of undefined (reading 'teardown')`, `self.assertAlive
 * is not a function`), and so did the hasDevice / device getters, also on undefined (a getter taken off
 * the prototype). SPEC §9: every public entry point refuses bad input with a typed error. Found by the
 * fuzzer's foreignReceiver target (test/fuzz/receiver_targets.mjs), e.g.
 * `node test/fuzz/run.mjs --backends cpu --seed 391 --case 9 --targets foreignReceiver`.
 *
 * The float64 reference (`sparse-mla/reference`, a public entry point) sized its per-query scratch by
 * the index set's width and q's head count, which a call without query rows does not bound by any data:
 * pagedSparseAttentionReference over indices of shape [0, 2^32] (or [0, 1, 2^32]) and
 * sparsePrefillReference over a q of shape [0, 2^31 − 1, 576] threw an untyped RangeError ("Invalid
 * typed array length") where its other scratch refuses TOO_LARGE. Found by the fuzzer's referenceApi
 * target: `node test/fuzz/run.mjs --backends cpu --seed 352 --case 2375`.
 */
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { pagedSparseAttentionReference, sparsePrefillReference } from '../dist/reference/index.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';
import { judgeAttention } from './fuzz/targets.mjs';
import { errorOf } from './helpers/errors.js';

const rng = testRng('fuzz_findings_s62');
const addonBuilt = existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || 'build/addon/Release/sparse_mla_native.node');
const backends = addonBuilt ? (['wasm', 'cpu'] as const) : (['wasm'] as const);

const engines: Engine[] = [];
beforeAll(async () => {
  for (const backend of backends) engines.push(await createEngine({ backend, workers: 1 }));
});
afterAll(async () => {
  for (const e of engines) await e.dispose();
});

/** Objects that have an engine's prototype and none of its state. */
function stateless(engine: Engine): [string, object][] {
  const proto = Object.getPrototypeOf(engine) as object;
  return [
    ['an object of the prototype', Object.create(proto) as object],
    ['an object of the prototype with the public fields', Object.assign(Object.create(proto) as object, { backend: engine.backend, workers: engine.workers })],
    ['a Proxy of an empty object claiming the prototype', new Proxy({}, { getPrototypeOf: () => proto })],
  ];
}

const METHODS = ['sparsePrefill', 'pagedSparseAttention', 'dequantizeKCachePaged', 'quantizeKCache', 'upload', 'uploadKvCache', 'download', 'copyFrom', 'synchronize', 'dispose'] as const;

function expectThisRefusal(e: unknown, what: string): void {
  expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, `${what}: ${String(e)}`).toEqual({ code: 'INVALID_VALUE', argument: 'this' });
}

describe("engine methods on an object of the engine's prototype without its state (session 62, helper-96, the fuzzer's foreignReceiver target)", () => {
  test.each(backends)('%s: every method rejects INVALID_VALUE naming this (was a TypeError from inside), at once as a rejection; dispose() so called disposes nothing', async (backend) => {
    const engine = engines[backends.indexOf(backend as never)]!;
    const valid = randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 576, sKV: 7, topk: 3 });
    const argsOf: Record<(typeof METHODS)[number], unknown[]> = {
      sparsePrefill: [valid],
      pagedSparseAttention: [{}],
      dequantizeKCachePaged: [{ cache: createKvCache('v4', { pageSize: 1, numPages: 1 }), tokenIds: [0] }],
      quantizeKCache: [{}],
      upload: [tensor('float32', [1], new Float32Array(1))],
      uploadKvCache: [createKvCache('v4', { pageSize: 1, numPages: 1 })],
      download: [{}],
      copyFrom: [{}],
      synchronize: [],
      dispose: [],
    };
    const proto = Object.getPrototypeOf(engine) as Record<string, (...a: unknown[]) => Promise<unknown>>;
    for (const [name, self] of stateless(engine)) {
      for (const method of METHODS) {
        let sync: unknown = null;
        let p: Promise<unknown> | undefined;
        try {
          p = proto[method]!.call(self, ...argsOf[method]);
        } catch (e) {
          sync = e;
        }
        expect(sync, `${method} on ${name} threw at once`).toBeNull();
        expectThisRefusal(await errorOf(() => p!), `${method} on ${name}`);
      }
    }
    // the engine was disposed by none of those dispose() calls, and runs a call right
    await engine.synchronize();
    const got = await engine.sparsePrefill(valid);
    expect(judgeAttention(got, () => sparsePrefillReference(valid), 2, 2, 512)).toBeNull();
  });

  test.each(backends)('%s: the hasDevice and device getters throw INVALID_VALUE naming this on such an object and on undefined (was a TypeError); on the engine, a Proxy of it and an object inheriting from it they answer as the engine', async (backend) => {
    const engine = engines[backends.indexOf(backend as never)]!;
    const proto = Object.getPrototypeOf(engine) as object;
    for (const getter of ['hasDevice', 'device'] as const) {
      const get = Object.getOwnPropertyDescriptor(proto, getter)!.get!;
      for (const [name, self] of [...stateless(engine), ['undefined', undefined] as [string, unknown]]) {
        expectThisRefusal(await errorOf(() => get.call(self)), `${getter} on ${name}`);
      }
      for (const self of [engine, new Proxy(engine, {}), Object.create(engine) as Engine]) expect(self[getter]).toBe(getter === 'hasDevice' ? false : undefined);
    }
  });

  test.each(backends)('%s: a Proxy of the engine and an object inheriting from it still run its calls as the engine does (fresh random inputs, against the float64 reference)', async (backend) => {
    const engine = engines[backends.indexOf(backend as never)]!;
    for (const self of [new Proxy(engine, {}), Object.create(engine) as Engine]) {
      const sQ = rng.int(1, 4), hQ = rng.int(1, 4), sKV = rng.int(1, 40), topk = rng.int(1, 12);
      const args = randomPrefillArgs(rng, { sQ, hQ, dQK: 576, sKV, topk }, { invalidFraction: 0.1 });
      expect(judgeAttention(await self.sparsePrefill(args), () => sparsePrefillReference(args), sQ, hQ, 512)).toBeNull();
      await self.synchronize();
    }
  });
});

describe('the float64 reference over index sets and head counts no query row bounds (session 62, helper-96, the fuzzer\'s referenceApi target, cpu seed 352 case 2375)', () => {
  const bits = (n: number) => new Uint16Array(n);
  const cache = () => createKvCache('v4', { pageSize: 1, numPages: 2 });

  test('pagedSparseAttentionReference refuses TOO_LARGE naming indices where the index sets are too wide to gather (was a RangeError), 2-d and 3-d indices, the extra set too', async () => {
    const q = tensor('bf16', [0, 1, 512], bits(0));
    const calls: [string, () => unknown][] = [
      ['indices [0, 2^32]', () => pagedSparseAttentionReference({ q, kCache: cache(), indices: tensor('int32', [0, 2 ** 32], new Int32Array(0)), smScale: 0.1 })],
      ['indices [0, 1, 2^32]', () => pagedSparseAttentionReference({ q, kCache: cache(), indices: tensor('int32', [0, 1, 2 ** 32], new Int32Array(0)), smScale: 0.1 })],
      ['extraIndices [0, 2^32]', () => pagedSparseAttentionReference({ q, kCache: cache(), indices: tensor('int32', [0, 3], new Int32Array(0)), extraKCache: cache(), extraIndices: tensor('int32', [0, 2 ** 32], new Int32Array(0)), smScale: 0.1 })],
    ];
    for (const [what, call] of calls) {
      const e = await errorOf(call);
      expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, `${what}: ${String(e)}`).toEqual({ code: 'TOO_LARGE', argument: 'indices' });
    }
  });

  test('sparsePrefillReference refuses TOO_LARGE naming q where q has no rows and 2^31 − 1 heads (was a RangeError)', async () => {
    const e = await errorOf(() => sparsePrefillReference({ q: tensor('bf16', [0, 2 ** 31 - 1, 576], bits(0)), kv: tensor('bf16', [1, 576], bits(576)), indices: tensor('int32', [0, 1], new Int32Array(0)), smScale: 0.1 }));
    expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, String(e)).toEqual({ code: 'TOO_LARGE', argument: 'q' });
  });

  test('the same references at sizes they can hold still answer: no rows gives empty outputs; a fresh random call agrees with the engines within SPEC §4.1', async () => {
    const none = pagedSparseAttentionReference({ q: tensor('bf16', [0, 3, 512], bits(0)), kCache: cache(), indices: tensor('int32', [0, 1, 4096], new Int32Array(0)), smScale: 0.1 });
    expect([none.out.length, none.lse.length, none.maxLogits.length]).toEqual([0, 0, 0]);
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), sKV = rng.int(1, 30), topk = rng.int(1, 10);
    const args = randomPrefillArgs(rng, { sQ, hQ, dQK: 576, sKV, topk }, { invalidFraction: 0.2 });
    for (const engine of engines) expect(judgeAttention(await engine.sparsePrefill(args), () => sparsePrefillReference(args), sQ, hQ, 512), engine.backend).toBeNull();
  });
});
