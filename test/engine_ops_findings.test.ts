/**
 * What the API fuzzer found in the engine's ops (sparsePrefill, pagedSparseAttention,
 * dequantizeKCachePaged, quantizeKCache) on the host engines, one focused case each: every one threw
 * an untyped error, read an argument twice, used an array as it was after the call, or crashed the
 * process before its fix. Each test names its session in its describe, or its commit in a comment.
 * The calls that crashed the process run in a child process, so that a regression fails its test
 * rather than the test file. Moved from test/fuzz_findings.test.ts and test/fuzz_findings_s58.test.ts.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, test } from 'vitest';
import { SparseMlaError, bf16BitsToFloat32, createEngine, createKvCache, createShardedPlan, prefillLayerSharded, tensor, toBf16 } from '../dist/index.js';
import type { PagedSparseAttentionArgs, Tensor } from '../dist/index.js';
import { dequantizeKCacheReference, pagedSparseAttentionReference, quantizeKCacheReference, sparsePrefillReference } from '../dist/reference/index.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { randomCache, randomScenario } from './helpers/chunks.js';
import { errorOf } from './helpers/errors.js';
import { libScript, printedResult } from './helpers/child_script.js';
import { addonBuilt, expectTyped, hostEngines, shrinkingAfterFirstRead, unprintable } from './helpers/findings.js';

const rng = testRng('engine_ops_findings');
const engines = hostEngines();

// fuzzer findings, 0eef3b7, 898e40d, 8ea9b61 (long run, seed 200), 02a549c (long run, seed 400)
describe('what a getter of a later argument does after an earlier one was checked', () => {
  test('a buffer detached during the checks is INVALID_VALUE naming it, before any backend work (was BACKEND_FAILURE, or a wasm TypeError)', async () => {
    for (const engine of engines) {
      const args = randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 576, sKV: 8, topk: 4 });
      const q = args.q;
      const call = {
        ...args,
        get smScale() {
          structuredClone(q.data.buffer, { transfer: [q.data.buffer] }); // q was checked before smScale is read
          return 0.04;
        },
      };
      await expectTyped(() => engine.sparsePrefill(call), 'INVALID_VALUE', 'q.data');
      // a resizable buffer shrunk the same way (was BACKEND_FAILURE on both backends)
      const fresh = randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 576, sKV: 8, topk: 4 });
      const resizable = new ArrayBuffer(fresh.kv.data.byteLength, { maxByteLength: 2 * fresh.kv.data.byteLength });
      const kv = tensor('bf16', [...fresh.kv.shape], new Uint16Array(resizable));
      kv.data.set(fresh.kv.data);
      const shrinking = {
        ...fresh,
        kv,
        get smScale() {
          resizable.resize(0);
          return 0.04;
        },
      };
      await expectTyped(() => engine.sparsePrefill(shrinking), 'INVALID_VALUE', 'kv.data');
    }
  });

  test('int64 indices detached by a later getter are INVALID_VALUE naming them (their narrowing, which runs after every getter, threw TypeError)', async () => {
    for (const engine of engines) {
      const args = randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 576, sKV: 8, topk: 4 });
      const indices = tensor('int64', [2, 4], BigInt64Array.from(args.indices.data, (v) => BigInt(v)));
      const call = {
        ...args,
        indices,
        get smScale() {
          structuredClone(indices.data.buffer, { transfer: [indices.data.buffer] }); // indices were checked before smScale is read
          return 0.04;
        },
      };
      await expectTyped(() => engine.sparsePrefill(call), 'INVALID_VALUE', 'indices.data');
    }
  });

  test('prefillLayerSharded: q detached by a getter of a later argument is INVALID_VALUE naming it (cutting it into shards threw TypeError)', async () => {
    const sc = randomScenario(rng, [rng.int(20, 60)], [rng.int(2, 5)]);
    const caches = { swa: randomCache(rng, 64, sc.swaPages) };
    const plan = createShardedPlan(sc.chunk, { shards: 2, split: 'queries' });
    const q = tensor('bf16', [sc.numQueries, 2, 512], randomBf16Bits(rng, sc.numQueries * 2 * 512));
    const args = {
      q,
      compressRatio: 0 as const,
      plan,
      caches,
      get smScale() {
        structuredClone(q.data.buffer, { transfer: [q.data.buffer] }); // q was checked before smScale is read
        return 0.04;
      },
    };
    await expectTyped(() => prefillLayerSharded([engines[0]!, engines[0]!], args), 'INVALID_VALUE', 'q.data');
  });

  test('int32 token ids rewritten after their check: the checked ids are the ones used (was a wasm RangeError / a cpu BACKEND_FAILURE)', async () => {
    for (const engine of engines) {
      const cache = createKvCache('v4', { pageSize: 4, numPages: 2 });
      const before = cache.data.slice();
      const ids = new Int32Array([1, 6]);
      const rows = toBf16({ shape: [2, 512], data: new Float32Array(2 * 512).fill(0.5) });
      const call = {
        cache,
        tokenIds: tensor('int32', [2], ids),
        get rows() {
          ids[1] = 0x7fffffff; // read after tokenIds was checked
          return rows;
        },
      };
      await engine.quantizeKCache(call);
      ids[1] = 6;
      const back = await engine.dequantizeKCachePaged({ cache, tokenIds: [1, 6] });
      expect(Array.from(back.data.subarray(0, 4))).toEqual([0x3f00, 0x3f00, 0x3f00, 0x3f00]); // 0.5 in bf16
      expect(Array.from(back.data.subarray(512, 516))).toEqual([0x3f00, 0x3f00, 0x3f00, 0x3f00]);
      expect(cache.data.slice(0, 576).every((b, i) => b === before[i])).toBe(true); // token 0 untouched
    }
  });

  test('topkLength rewritten after its check: the checked lengths are the ones used', async () => {
    for (const engine of engines) {
      const kCache = randomCache(rng, 16, 2);
      const q = tensor('bf16', [3, 2, 512], randomBf16Bits(rng, 3 * 2 * 512));
      const indices = tensor('int32', [3, 5], Int32Array.from({ length: 15 }, () => rng.int(0, 32)));
      // no length above topk: the old check kept the caller's array (only a clamp made a copy)
      const lengths = new Int32Array([2, 3, 0]);
      const want = pagedSparseAttentionReference({ q, kCache, indices, topkLength: tensor('int32', [3], new Int32Array([2, 3, 0])), smScale: 0.04 });
      const call = {
        q,
        kCache,
        indices,
        topkLength: tensor('int32', [3], lengths),
        get smScale() {
          lengths[0] = 0x7fffffff; // read after topkLength was checked
          lengths[2] = -5;
          return 0.04;
        },
      };
      const got = await engine.pagedSparseAttention(call);
      expectWithinBounds(`${engine.backend}: topkLength rewritten after its check`, got, want, [0, 1, 2]);
    }
  });
});

// fuzzer target stagingWait, c441731 (session 46)
test('calls that wait for staging behind others (a small memoryBudgetBytes) use their arrays as they were at the call: rewritten or detached right after each returned its promise (they were copied when a slab freed up: the rewritten bytes, or INVALID_VALUE)', async () => {
  for (const backend of addonBuilt ? (['wasm', 'cpu'] as const) : (['wasm'] as const)) {
    const engine = await createEngine({ backend, memoryBudgetBytes: 1 << 20, ...(backend === 'wasm' ? { workers: 2 } : {}) });
    try {
      // four calls of about 400 KB of kv each against 1 MiB of staging: the later ones wait
      const calls = Array.from({ length: 4 }, () => randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 512, sKV: 390, topk: 16 }, { invalidFraction: 0.1 }));
      const refs = calls.map((a) => sparsePrefillReference({ ...a, q: { ...a.q, data: a.q.data.slice() }, kv: { ...a.kv, data: a.kv.data.slice() }, indices: { ...a.indices, data: a.indices.data.slice() } }));
      const pending = calls.map((a, i) => {
        const p = engine.sparsePrefill(a);
        if (i % 2 === 0) {
          a.q.data.fill(0x7f80); // +inf
          a.kv.data.fill(0x4300);
        } else {
          for (const t of [a.q, a.kv, a.indices]) structuredClone(t.data.buffer, { transfer: [t.data.buffer] });
        }
        return p;
      });
      const results = await Promise.all(pending);
      results.forEach((got, i) => expectWithinBounds(`${backend}: call ${i}`, got, refs[i]!, [0, 1]));
    } finally {
      await engine.dispose();
    }
  }
});

describe("hostile input the fuzzer's session-51 generators reach (session 51, helper-52)", () => {
  test('a shape holding a dim String() cannot print is INVALID_SHAPE naming the shape, the dim described (was TypeError, or the caller\'s toString error, from the message: cpu fuzz seed 24 cases 208 and 494, wasm seed 25, stub cuda seed 26)', async () => {
    const dims = [rng.int(1, 4), rng.int(1, 4)];
    const at = rng.int(0, 3);
    const withDim = (shape: number[], d: unknown) => shape.map((x, i) => (i === at ? d : x)) as number[];
    for (const bad of unprintable()) {
      await expectTyped(() => tensor('int32', withDim([...dims, 2], bad), new Int32Array(dims[0]! * dims[1]! * 2)), 'INVALID_SHAPE', 'shape');
    }
    const sQ = rng.int(1, 3), hQ = rng.int(1, 4), sKV = rng.int(1, 9), topk = rng.int(1, 5);
    const q = tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512));
    const kv = tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512));
    const indices = tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.int(0, sKV)));
    for (const engine of engines) {
      for (const bad of unprintable()) {
        const badQ = { dtype: 'bf16', shape: withDim([sQ, hQ, 512], bad), data: q.data } as unknown as Tensor<'bf16'>;
        await expectTyped(() => engine.sparsePrefill({ q: badQ, kv, indices, smScale: 0.04 }), 'INVALID_SHAPE', 'q.shape');
        const badIdx = { dtype: 'int32', shape: [sQ, bad], data: indices.data } as unknown as Tensor<'int32'>;
        await expectTyped(() => engine.sparsePrefill({ q, kv, indices: badIdx, smScale: 0.04 }), 'INVALID_SHAPE', 'indices.shape');
      }
    }
  });

  test('a BigInt dim is named as one in the message (it said "got [2, 3, 512]" for a shape [2, 3n, 512], as if the dim were fine)', async () => {
    const sQ = rng.int(1, 3), hQ = rng.int(1, 4), sKV = rng.int(1, 9);
    const q = tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512));
    const kv = tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512));
    const indices = tensor('int32', [sQ, 1], Int32Array.from({ length: sQ }, () => rng.int(0, sKV)));
    for (const engine of engines) {
      const e = await errorOf(() => engine.sparsePrefill({ q: { dtype: 'bf16', shape: [sQ, BigInt(hQ), 512], data: q.data } as unknown as Tensor<'bf16'>, kv, indices, smScale: 0.04 }));
      expect(e).toBeInstanceOf(SparseMlaError);
      expect((e as SparseMlaError).argument).toBe('q.shape');
      expect((e as SparseMlaError).message).toContain(`${hQ}n`);
    }
  });
});

describe("hostile input the fuzzer's session-52 oracle and generators reach (session 52, helper-53)", () => {
  /** A v4 cache of `pageSize` × `numPages` tokens, each quantized from random rows by the reference. */
  function quantizedCache(pageSize: number, numPages: number) {
    const cache = createKvCache('v4', { pageSize, numPages });
    const n = pageSize * numPages;
    quantizeKCacheReference(cache, Array.from({ length: n }, (_, i) => i), tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512)));
    return cache;
  }

  test("dequantizeKCachePaged reads a token id list's length once: a Proxy whose length shrinks by one after its first read gives every id's row (its last row came from token 0, silently: the loop ran to the second read; cpu seed 43 under the stable oracle)", async () => {
    for (const engine of engines) {
      const cache = quantizedCache(4, rng.int(2, 5));
      const tokens = cache.pageSize * cache.numPages;
      const ids = Array.from({ length: rng.int(2, 6) }, () => rng.int(1, tokens));
      const got = await engine.dequantizeKCachePaged({ cache, tokenIds: shrinkingAfterFirstRead(ids) });
      const want = dequantizeKCacheReference(cache, ids);
      expect(got.shape, engine.backend).toEqual([ids.length, 512]);
      expect(Array.from(got.data, (b) => bf16BitsToFloat32(b)), engine.backend).toEqual(Array.from(want));
    }
  });

  test('quantizeKCache reads a token id list\'s length once: a Proxy whose length shrinks by one after its first read writes the given tokens only (the last row went into token 0, silently, over what token 0 held)', async () => {
    for (const engine of engines) {
      const cache = quantizedCache(2, rng.int(3, 6));
      const tokens = cache.pageSize * cache.numPages;
      const ids = Array.from({ length: tokens - 1 }, (_, i) => i + 1).sort(() => rng.uniform() - 0.5).slice(0, rng.int(2, 5));
      const rows = tensor('float32', [ids.length, 512], Float32Array.from({ length: ids.length * 512 }, () => rng.normal()));
      const want = { ...cache, data: cache.data.slice() };
      quantizeKCacheReference(want, ids, rows);
      await engine.quantizeKCache({ cache, tokenIds: shrinkingAfterFirstRead(ids), rows });
      expect(cache.data.findIndex((b, i) => b !== want.data[i]), engine.backend).toBe(-1);
    }
  });

  test("an op's tensor check reads a shape's length once: q whose shape Proxy shrinks by one after its first read runs as the q it is (the rank-3 q was refused as [sQ, hQ], INVALID_SHAPE, for a valid call)", async () => {
    for (const engine of engines) {
      const sQ = rng.int(1, 3), hQ = rng.int(1, 3), sKV = rng.int(1, 9);
      const args = { q: tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512)), kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)), indices: tensor('int32', [sQ, 1], Int32Array.from({ length: sQ }, () => rng.int(0, sKV))), smScale: 0.04 };
      const hostile = { ...args, q: { ...args.q, shape: shrinkingAfterFirstRead(args.q.shape) } };
      expectWithinBounds(engine.backend, await engine.sparsePrefill(hostile), sparsePrefillReference(args), Array.from({ length: sQ }, (_, i) => i));
    }
  });

  test("pagedSparseAttention reads the extra set's arguments once: an extraKCache getter answering another cache (same geometry, other bytes) after its first read does not change the result (the presence check read extraKCache, extraIndices and extraTopkLength, then the set's check read them again and attended the second answer, silently; wasm seed 51 case 3014, a soft read-twice finding)", async () => {
    for (const engine of engines) {
      const n = rng.int(1, 4), hQ = rng.int(1, 3);
      const cache = quantizedCache(4, rng.int(2, 5)), extra = quantizedCache(2, rng.int(2, 5));
      const ids = (rows: number, k: number, tokens: number) => tensor('int32', [rows, k], Int32Array.from({ length: rows * k }, () => rng.int(0, tokens)));
      const args: PagedSparseAttentionArgs = {
        q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)),
        kCache: cache,
        indices: ids(n, 3, cache.pageSize * cache.numPages),
        extraKCache: extra,
        extraIndices: ids(n, 2, extra.pageSize * extra.numPages),
        extraTopkLength: tensor('int32', [n], Int32Array.from({ length: n }, () => rng.int(1, 3))),
        smScale: 0.04,
      };
      const reads = { extraKCache: 0, extraIndices: 0, extraTopkLength: 0 };
      const other = { ...extra, data: new Uint8Array(extra.data.length).fill(0x38) };
      const hostile = { ...args };
      for (const k of Object.keys(reads) as (keyof typeof reads)[]) {
        const first = args[k];
        Object.defineProperty(hostile, k, { enumerable: true, get: () => (reads[k]++ === 0 ? first : k === 'extraKCache' ? other : first) });
      }
      const got = await engine.pagedSparseAttention(hostile);
      expect(reads, engine.backend).toEqual({ extraKCache: 1, extraIndices: 1, extraTopkLength: 1 });
      expectWithinBounds(engine.backend, got, pagedSparseAttentionReference(args), Array.from({ length: n }, (_, i) => i));
    }
  });
});

/** Runs `body` (the text of an async function of `lib`, the package's dist/index.js) in a child node process; its last stdout line parsed. */
function inChild(body: string): { status: number | null; signal: string | null; stderr: string; result: unknown } {
  const r = spawnSync(process.execPath, ['-e', libScript(body)], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, signal: r.signal, stderr: r.stderr ?? '', result: printedResult(r.stdout) };
}

describe.skipIf(!addonBuilt)('cpu engine: an attention call of no query rows and 16 heads or more (session 58, helper-82, by hand after numericEdges\' wide cases)', () => {
  // 89be223 split a row's heads into groups over the addon's threads; its group count divided by the
  // row count, so sparsePrefill / pagedSparseAttention of q [0, hQ ≥ 16, d] killed the process with
  // SIGFPE (whatever the engine's workers). SPEC §4: sQ = 0 returns empty outputs.
  test('sparsePrefill and pagedSparseAttention resolve with empty outputs of the SPEC shapes, 1 and 2 workers', () => {
    const r = inChild(`
      const { createEngine, createKvCache, tensor } = lib;
      const got = [];
      for (const workers of [1, 2]) {
        const engine = await createEngine({ backend: 'cpu', workers });
        for (const hQ of [16, 17, 24, 64]) {
          for (const dQK of [512, 576]) {
            const s = await engine.sparsePrefill({ q: tensor('bf16', [0, hQ, dQK], new Uint16Array(0)), kv: tensor('bf16', [3, dQK], new Uint16Array(3 * dQK)), indices: tensor('int32', [0, 8], new Int32Array(0)), smScale: 0.04, attnSink: tensor('float32', [hQ], new Float32Array(hQ)) });
            got.push(['sparsePrefill', workers, hQ, dQK, s.out.shape, s.out.data.length, s.lse.shape, s.maxLogits.shape]);
          }
          const kCache = createKvCache('v4', { pageSize: 2, numPages: 2 });
          const extra = hQ % 2 === 0 ? { extraKCache: createKvCache('v4', { pageSize: 4, numPages: 1 }), extraIndices: tensor('int32', [0, 3], new Int32Array(0)) } : {};
          const p = await engine.pagedSparseAttention({ q: tensor('bf16', [0, hQ, 512], new Uint16Array(0)), kCache, indices: tensor('int32', [0, 4], new Int32Array(0)), smScale: 0.04, ...extra });
          got.push(['pagedSparseAttention', workers, hQ, 512, p.out.shape, p.out.data.length, p.lse.shape, p.maxLogits.shape]);
        }
        await engine.dispose();
      }
      return got;
    `);
    expect(r.signal, `the child died: ${r.stderr.slice(0, 300)}`).toBeNull();
    expect(r.status, r.stderr.slice(0, 300)).toBe(0);
    const got = r.result as [string, number, number, number, number[], number, number[], number[]][];
    expect(got).toHaveLength(2 * 4 * 3);
    for (const [op, , hQ, , outShape, outLength, lseShape, maxShape] of got) {
      expect(outShape, op).toEqual([0, hQ, 512]);
      expect(outLength, op).toBe(0);
      expect(lseShape, op).toEqual([0, hQ]);
      expect(maxShape, op).toEqual([0, hQ]);
    }
  });
});
