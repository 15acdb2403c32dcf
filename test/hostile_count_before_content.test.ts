/**
 * Count before content (SPEC §9: bad input is refused before any work): where a caller's list
 * claims more elements than a check allows that needs only their count — rows against the token
 * ids of a quantize, the memory budget or a worker's heap against a dequant's ids, a request's SWA
 * ids or page table against its lengths, a shape against toBf16's data — the refusal comes from the
 * count, read once, before any element is read. A Proxy of an array claiming millions of elements
 * counts the reads it answers; each refusal keeps its code, argument and message. Valid calls give
 * the float64 reference's bytes and values as before.
 */
import { afterAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, createPlan, tensor, toBf16 } from '../dist/index.js';
import type { Engine, KvCache } from '../dist/index.js';
import { SparseMlaEngine } from '../dist/engine.js';
import { prepareDequantizeKCache } from '../dist/ops/kv_cache.js';
import { HEAP_RESERVE_BYTES } from '../dist/backends/wasm/wasm_backend.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import { loadNativeAddon } from '../dist/backends/native/binding.js';
import { decodeBf16, dequantizeKCacheReference, encodeBf16, quantizeKCacheReference } from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { refusal, refusalOf } from './helpers/errors.js';
import { randomDistinctIds, testRng } from './helpers/random.js';
import { smallHeapWasmEngines } from './helpers/small_heap_wasm.js';
import { standInTable, type OpCall } from './helpers/computing_device.js';
import { claimingList } from './helpers/claiming_list.js';

const rng = testRng('hostile_count_before_content');

/** Elements a hostile list claims: reading each would take seconds of the caller's traps. */
const CLAIM = 2 ** 22;

const backends = ['wasm', ...(nativeAddonBuilt() ? ['cpu' as const] : [])] as const;
const engines = new Map<string, Engine>();
/** An engine of `backend` with the smallest budget createEngine takes (1 MiB), made once. */
async function engineOf(backend: 'wasm' | 'cpu'): Promise<Engine> {
  let e = engines.get(backend);
  if (!e) engines.set(backend, (e = await createEngine({ backend, memoryBudgetBytes: 2 ** 20, ...(backend === 'wasm' ? { workers: 2 } : {}) })));
  return e;
}
afterAll(async () => {
  for (const e of engines.values()) await e.dispose();
});

/** What prepareDequantizeKCache checks a dequant's count against: the engine's own memory. */
function memoryOf(engine: Engine) {
  const e = engine as SparseMlaEngine;
  return { ...e.hostMemory(), hasDevice: e.hasDevice };
}

/** Random float32 rows (values spread over tiles, so the scales differ). */
function randomRows(n: number, width: number): Float32Array {
  const rows = new Float32Array(n * width);
  for (let i = 0; i < rows.length; i++) rows[i] = Math.fround(rng.normal() * 2 ** rng.int(-8, 8));
  return rows;
}

describe.each(backends)('%s engine: the cache ops refuse by the token ids\' count before reading an id', (backend) => {
  test.each([['v4', 512], ['v32', 576]] as const)('quantizeKCache into a %s cache: rows of 1 against a list claiming 2^22 ids is INVALID_SHAPE naming rows, no id read', async (format, rowDim) => {
    const engine = await engineOf(backend);
    const cache = format === 'v4' ? createKvCache('v4', { pageSize: 64, numPages: 2 }) : createKvCache('v32', { pageSize: 1, numPages: 8 });
    const before = cache.data.slice();
    const { list, reads } = claimingList(CLAIM, 0);
    const e = await refusal(() => engine.quantizeKCache({ cache, tokenIds: list, rows: tensor('float32', [1, rowDim], new Float32Array(rowDim)) }));
    expect([e.code, e.argument]).toEqual(['INVALID_SHAPE', 'rows']);
    expect(e.message).toBe(`rows: expected shape [n, ${rowDim}] with n = tokenIds length ${CLAIM} (${format} cache), got shape [1, ${rowDim}]`);
    expect(reads).toEqual({ length: 1, elements: 0 });
    expect(cache.data).toEqual(before);
  });

  test('quantizeKCache: rows that do not match the ids\' count are refused before an id outside the cache or no integer is (the order this change makes)', async () => {
    const engine = await engineOf(backend);
    const cache = createKvCache('v4', { pageSize: 16, numPages: 2 });
    for (const bad of [32, -1, 2.5, 'x']) {
      const ids = [rng.int(0, 32), bad, rng.int(0, 32)];
      const e = await refusal(() => engine.quantizeKCache({ cache, tokenIds: ids, rows: tensor('float32', [2, 512], randomRows(2, 512)) }));
      expect([e.code, e.argument, e.message]).toEqual(['INVALID_SHAPE', 'rows', 'rows: expected shape [n, 512] with n = tokenIds length 3 (v4 cache), got shape [2, 512]']);
    }
    // with rows that match, the ids are checked as before
    const e = await refusal(() => engine.quantizeKCache({ cache, tokenIds: [0, 32, 1], rows: tensor('float32', [3, 512], randomRows(3, 512)) }));
    expect([e.code, e.argument, e.message]).toEqual(['OUT_OF_RANGE', 'tokenIds', 'tokenIds: expected token ids in [0, 32) for cache (v4, pageSize 16 × numPages 2), got 32 at position 1']);
  });

  test('dequantizeKCachePaged\'s checks with the engine\'s memory: a list claiming 2^22 ids over the budget is TOO_LARGE naming tokenIds, the backend\'s own refusal of that many ids, no id read', async () => {
    const engine = await engineOf(backend);
    const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
    const { list, reads } = claimingList(CLAIM, 0);
    const e = await refusal(() => prepareDequantizeKCache({ cache, tokenIds: list }, memoryOf(engine), 'host'));
    expect([e.code, e.argument]).toEqual(['TOO_LARGE', 'tokenIds']);
    expect(reads).toEqual({ length: 1, elements: 0 });
    // the refusal the backend itself makes for as many real ids (read, then counted), message for message
    const real = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [CLAIM]) }));
    expect([real.code, real.argument, real.message]).toEqual([e.code, e.argument, e.message]);
    // and it counts at least the rows it would return: 2^22 × 512 bf16
    const needs = Number(/needs (\d+) bytes/.exec(e.message)?.[1]);
    expect(needs).toBeGreaterThanOrEqual(CLAIM * 512 * 2);
  });

  test('dequantizeKCachePaged\'s checks with the engine\'s memory: under the budget the ids are read once each and checked as before', async () => {
    const engine = await engineOf(backend);
    const cache = createKvCache('v4', { pageSize: 16, numPages: 2 });
    const ids = randomDistinctIds(rng, 32, 8);
    let elements = 0;
    const list = new Proxy(ids, { get: (t, k, r) => (typeof k === 'string' && /^\d+$/.test(k) && elements++, Reflect.get(t, k, r)) });
    const job = prepareDequantizeKCache({ cache, tokenIds: list }, memoryOf(engine), 'host');
    expect(Array.from(job.tokenIds)).toEqual(ids);
    expect(elements).toBe(ids.length);
    const e = await refusal(() => prepareDequantizeKCache({ cache, tokenIds: [...ids, 32] }, memoryOf(engine), 'host'));
    expect([e.code, e.argument, e.message]).toEqual(['OUT_OF_RANGE', 'tokenIds', 'tokenIds: expected token ids in [0, 32) for cache (v4, pageSize 16 × numPages 2), got 32 at position 8']);
  });

  test.each([['v4', 512], ['v32', 576]] as const)('valid %s calls (ids as an array, int32 and int64 tensors): quantize byte for byte and dequantize exactly as the float64 reference', async (format, rowDim) => {
    const engine = await createEngine({ backend, ...(backend === 'wasm' ? { workers: 2 } : {}) });
    try {
      const geometry = format === 'v4' ? { pageSize: 16, numPages: 3 } : { pageSize: 1, numPages: 40 };
      const tokens = geometry.pageSize * geometry.numPages;
      const cache = createKvCache(format, geometry);
      const ref: KvCache = { ...cache, data: cache.data.slice() };
      const n = rng.int(5, 20);
      const ids = randomDistinctIds(rng, tokens, n);
      const rows = tensor('float32', [n, rowDim], randomRows(n, rowDim));
      const forms = [ids, tensor('int32', [n], Int32Array.from(ids)), tensor('int64', [n], BigInt64Array.from(ids, BigInt))];
      const form = forms[rng.int(0, forms.length)]!;
      await engine.quantizeKCache({ cache, tokenIds: form, rows });
      quantizeKCacheReference(ref, ids, rows);
      expect(cache.data).toEqual(ref.data);
      for (const f of forms) {
        const out = await engine.dequantizeKCachePaged({ cache, tokenIds: f });
        expect(out.shape).toEqual([n, rowDim]);
        const want = dequantizeKCacheReference(ref, ids);
        expect(Array.from(out.data, decodeBf16)).toEqual(Array.from(want));
      }
    } finally {
      await engine.dispose();
    }
  });
});

describe('int64 token ids: the refusals name the caller\'s value and its position, as before', () => {
  test.each([
    [[0n, 2n ** 32n + 3n], '4294967299 at position 1'],
    [[-5n, 0n], '-5 at position 0'],
    [[1n, 2n ** 31n, -1n], '2147483648 at position 1'],
    [[3n, 40n, -1n], '40 at position 1'],
  ])('ids %s', (ids, got) => {
    const cache = createKvCache('v4', { pageSize: 16, numPages: 2 });
    const [code, , message] = refusalOf(() => prepareDequantizeKCache({ cache, tokenIds: tensor('int64', [ids.length], BigInt64Array.from(ids)) }));
    expect([code, message]).toEqual(['OUT_OF_RANGE', `tokenIds: expected token ids in [0, 32) for cache (v4, pageSize 16 × numPages 2), got ${got}`]);
  });
});

describe('wasm: a worker\'s heap against a dequant\'s ids, from their count', () => {
  const wasmEngine = smallHeapWasmEngines();
  test('a heap one byte short of a token\'s need: TOO_LARGE naming tokenIds before any id of a list claiming 2^22 is read, the op\'s own refusal', async () => {
    // a v4 token's heap need in a dequant task: its compact bytes twice, its int64 id, its bf16 row
    const need = 2 * (512 + 64 + 8) + 8 + 512 * 2;
    const { engine } = await wasmEngine(HEAP_RESERVE_BYTES + need - 1);
    const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
    const { list, reads } = claimingList(CLAIM, 0);
    const e = await refusal(() => prepareDequantizeKCache({ cache, tokenIds: list }, memoryOf(engine), 'host'));
    expect([e.code, e.argument]).toEqual(['TOO_LARGE', 'tokenIds']);
    expect(e.message).toContain('heap');
    expect(reads).toEqual({ length: 1, elements: 0 });
    const real = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: [0, 1, 2] }));
    expect([real.code, real.argument, real.message]).toEqual([e.code, e.argument, e.message]);
  });
});

describe.skipIf(!nativeAddonBuilt())('cuda (a stand-in device that computes: no GPU): the ids\' host copies against the budget, from their count', () => {
  test.each(['host', 'device'] as const)('a device cache, %s output, a list claiming 2^22 ids: TOO_LARGE naming tokenIds, the op\'s own refusal of as many real ids, no id read', async (output) => {
    const load = loadNativeAddon();
    if (!load.ok) throw new Error(load.reason);
    const calls: OpCall[] = [];
    const engine = new SparseMlaEngine(new CudaBackend(load.addon, standInTable(load.addon, calls, { downloadsWaitForPrefill: false }), 2, 2 ** 20));
    try {
      const cache = await engine.uploadKvCache(createKvCache('v4', { pageSize: 64, numPages: 2 }));
      const { list, reads } = claimingList(CLAIM, 0);
      const e = await refusal(() => prepareDequantizeKCache({ cache, tokenIds: list }, memoryOf(engine), output));
      expect([e.code, e.argument]).toEqual(['TOO_LARGE', 'tokenIds']);
      expect(reads).toEqual({ length: 1, elements: 0 });
      const real = await refusal(() => engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [CLAIM]) }, { output }));
      expect([real.code, real.argument, real.message]).toEqual([e.code, e.argument, e.message]);
      // at least the widened int64 ids (8 bytes each) it would hold on the host
      expect(Number(/needs (\d+) bytes/.exec(e.message)?.[1])).toBeGreaterThanOrEqual(CLAIM * 8);
    } finally {
      await engine.dispose();
    }
  });
});

describe('createPlan: a request\'s ids against its lengths, from their count', () => {
  test('swaTokenIds claiming 2^22 where the request gathers 10: INVALID_SHAPE naming them, no id read', () => {
    const { list, reads } = claimingList(CLAIM, 0);
    expect(refusalOf(() => createPlan({ requests: [{ seqLen: 10, extendLen: 2, swaTokenIds: list }] }))).toEqual(['INVALID_SHAPE', 'chunk.requests[0].swaTokenIds', `chunk.requests[0].swaTokenIds: expected 10 ids (positions [0, 10) for seqLen 10, extendLen 2, window 128), got ${CLAIM}`]);
    expect(reads).toEqual({ length: 1, elements: 0 });
  });

  test('the second request\'s swaTokenIds of the wrong count, one of them no id: INVALID_SHAPE (the count) before OUT_OF_RANGE (the id); the first request\'s ids read once each', () => {
    const first = randomDistinctIds(rng, 1000, 10);
    let firstReads = 0;
    const counted = new Proxy(first, { get: (t, k, r) => (typeof k === 'string' && /^\d+$/.test(k) && firstReads++, Reflect.get(t, k, r)) });
    expect(refusalOf(() => createPlan({ requests: [{ seqLen: 10, extendLen: 2, swaTokenIds: counted }, { seqLen: 5, extendLen: 5, swaTokenIds: [0, -1, 2] }] }))).toEqual(['INVALID_SHAPE', 'chunk.requests[1].swaTokenIds', 'chunk.requests[1].swaTokenIds: expected 5 ids (positions [0, 5) for seqLen 5, extendLen 5, window 128), got 3']);
    expect(firstReads).toBe(10);
  });

  test('a c4 page table shorter than the request needs: INVALID_SHAPE before any page is read; a longer one plans as before', () => {
    // seqLen 300: floor(300 / 4) = 75 compressed entries, 5 pages of 16
    const { list, reads } = claimingList(4, 0);
    const swaTokenIds = randomDistinctIds(rng, 1000, 129);
    expect(refusalOf(() => createPlan({ requests: [{ seqLen: 300, extendLen: 2, swaTokenIds, c4PageTable: list }], c4PageSize: 16 }))).toEqual(['INVALID_SHAPE', 'chunk.requests[0].c4PageTable', 'chunk.requests[0].c4PageTable: expected at least 5 pages for floor(seqLen 300 / 4) = 75 entries of page size 16, got 4']);
    expect(reads).toEqual({ length: 1, elements: 0 });
    // valid: the ids as given, the compressed ids from the table's first 5 pages (SPEC §6: pageTable[j / Pc] · Pc + j % Pc)
    const table = randomDistinctIds(rng, 50, 7);
    const plan = createPlan({ requests: [{ seqLen: 300, extendLen: 2, swaTokenIds, c4PageTable: table }], c4PageSize: 16 });
    expect(Array.from(plan.swaTokenIds.data, Number)).toEqual(swaTokenIds);
    const want = Array.from({ length: 75 }, (_, j) => table[Math.floor(j / 16)]! * 16 + (j % 16));
    expect(Array.from(plan.compressedTokenIds(4).data, Number)).toEqual(want);
  });
});

describe('toBf16: its shape against the data\'s count', () => {
  test('data claiming 2^22 values for shape [2, 2]: tensor()\'s INVALID_SHAPE naming data, no value read', () => {
    const { list, reads } = claimingList(CLAIM, 1.5);
    expect(refusalOf(() => toBf16({ shape: [2, 2], data: list as number[] }))).toEqual(['INVALID_SHAPE', 'data', `tensor: shape [2, 2] needs 4 elements, data has ${CLAIM}`]);
    expect(reads).toEqual({ length: 1, elements: 0 });
  });

  test('a shape that does not fit the data is refused before a value that is no number (the order this change makes); valid data rounds as the float64 reference', () => {
    expect(refusalOf(() => toBf16({ shape: [3], data: ['x', 1] as unknown as number[] }))).toEqual(['INVALID_SHAPE', 'data', 'tensor: shape [3] needs 3 elements, data has 2']);
    const n = rng.int(1, 40);
    const values = Array.from({ length: n * 3 }, () => Math.fround(rng.normal() * 2 ** rng.int(-20, 20)));
    const t = toBf16({ shape: [n, 3], data: values });
    expect(t.shape).toEqual([n, 3]);
    expect(t.dtype).toBe('bf16');
    expect(Array.from(t.data)).toEqual(values.map(encodeBf16));
  });
});
