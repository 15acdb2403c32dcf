/**
 * What the API fuzzer found in an engine's lifecycle and receivers (createEngine's options,
 * dispose(), a frozen engine, methods called on anything but an engine), one focused case each:
 * every one threw an untyped error or resolved too early before its fix. Each test names its session
 * in its describe, or its commit in a comment. Moved from test/fuzz_findings.test.ts and
 * test/fuzz_findings_s62.test.ts.
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
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine } from '../dist/index.js';
import { sparsePrefillReference } from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { judgeAttention } from './fuzz/targets.mjs';
import { errorOf } from './helpers/errors.js';
import { addonBuilt, expectTyped, hostEngines } from './helpers/findings.js';

const rng = testRng('engine_lifecycle_findings');
const backends = addonBuilt ? (['wasm', 'cpu'] as const) : (['wasm'] as const);
const engines = hostEngines();

// fuzzer target createEngine, 706b8f8
test('createEngine: a backend option that is a BigInt is INVALID_VALUE (was TypeError from its message)', async () => {
  await expectTyped(() => createEngine({ backend: -1n as never }), 'INVALID_VALUE', 'backend');
});

describe("hostile input the fuzzer's session-51 generators reach (session 51, helper-52)", () => {
  test("a frozen engine disposes: dispose() resolves and later calls are DISPOSED (its assignment of the disposed flag threw TypeError, the workers or threads kept running: the fuzzer's runner died in its teardown after a case froze the shared engine, unseen, e.g. cpu seed 41)", async () => {
    for (const backend of addonBuilt ? (['wasm', 'cpu'] as const) : (['wasm'] as const)) {
      const engine = await createEngine({ backend, ...(backend === 'wasm' ? { workers: 1 } : {}) });
      const sQ = rng.int(1, 3), hQ = rng.int(1, 3), sKV = rng.int(1, 9);
      const args = { q: tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512)), kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)), indices: tensor('int32', [sQ, 1], Int32Array.from({ length: sQ }, () => rng.int(0, sKV))), smScale: 0.04 };
      Object.freeze(engine);
      expectWithinBounds(`${backend}, frozen`, await engine.sparsePrefill(args), sparsePrefillReference(args), Array.from({ length: sQ }, (_, i) => i));
      expect(await errorOf(() => engine.dispose()), backend).toBeUndefined();
      await expectTyped(() => engine.sparsePrefill(args), 'DISPOSED');
      // and a Proxy of an engine still reaches its methods (its state is no #field)
      const live = await createEngine({ backend, ...(backend === 'wasm' ? { workers: 1 } : {}) });
      expectWithinBounds(`${backend}, a Proxy of it`, await new Proxy(live, {}).sparsePrefill(args), sparsePrefillReference(args), Array.from({ length: sQ }, (_, i) => i));
      await live.dispose();
    }
  });
});

describe('engine.dispose() called again while its teardown runs (session 55, helper-67)', () => {
  /** Ports holding the event loop open: a wasm engine's workers' while their teardown talks to them (none when idle: unref'd). */
  const ports = (): number => process.getActiveResourcesInfo().filter((r) => r === 'MessagePort').length;

  test.each(addonBuilt ? ['wasm', 'cpu'] : ['wasm'])("a second dispose() on %s resolves only once the backend is torn down, with the first's result (it resolved at once, while a wasm engine's teardown still held its workers' ports)", async (backend) => {
    const workers = rng.int(1, 4);
    const before = ports();
    const engine = await createEngine({ backend: backend as 'wasm' | 'cpu', ...(backend === 'wasm' ? { workers } : {}) });
    let firstDone = false;
    const first = engine.dispose().then(() => {
      firstDone = true;
    });
    const again = rng.int(1, 4);
    for (let i = 0; i < again; i++) await engine.dispose();
    expect(firstDone).toBe(true);
    expect(ports()).toBe(before);
    await first;
    await expectTyped(() => engine.sparsePrefill(randomPrefillArgs(rng, { sQ: 1, hQ: 1, dQK: 512, sKV: 2, topk: 1 })), 'DISPOSED');
  });
});

describe('engine methods called on anything but an engine (session 57, helper-77, by hand: a method taken from the engine or passed as a callback)', () => {
  test("every engine method called unbound or on another object rejects INVALID_VALUE naming this (was a TypeError: Cannot read properties of undefined (reading 'alive')); dispose() so called disposes nothing; bound, on a Proxy of the engine or an object inheriting from it, they work", async () => {
    const methods = ['sparsePrefill', 'pagedSparseAttention', 'dequantizeKCachePaged', 'quantizeKCache', 'upload', 'uploadKvCache', 'download', 'copyFrom', 'synchronize', 'dispose'] as const;
    for (const engine of engines) {
      for (const method of methods) {
        const f = (engine as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>)[method]!;
        for (const self of [undefined, {}, 7]) {
          let sync: unknown = null;
          let p: Promise<unknown> | undefined;
          try {
            p = f.call(self, {});
          } catch (e) {
            sync = e;
          }
          expect(sync, `${method} threw at once`).toBeNull();
          const e = await errorOf(() => p!);
          expect(e instanceof SparseMlaError && { code: e.code, argument: e.argument }, `${method} on ${String(self)}: ${String(e)}`).toEqual({ code: 'INVALID_VALUE', argument: 'this' });
        }
      }
      const args = randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 576, sKV: 9, topk: 4 });
      const want = () => sparsePrefillReference(args);
      // the engine was not disposed by the unbound dispose(); a Proxy of it and an object inheriting from it run its calls
      for (const self of [engine, new Proxy(engine, {}), Object.create(engine) as Engine]) {
        expect(judgeAttention(await self.sparsePrefill(args), want, 2, 2, 512)).toBeNull();
      }
      await engine.synchronize();
    }
  });
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
