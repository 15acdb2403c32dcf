/**
 * SPEC §9: every public entry point refuses bad input with a typed error — `code`, and a message
 * naming the argument — before any work (the backend is never called, a cache is never touched).
 * Also the normalizations every backend relies on (int64 indices, [sQ,1,topk], topkLength clamp).
 */
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { SparseMlaError, bf16ToFloat32, createEngine, createKvCache, kvCacheBytes, numel, routePrefill, tensor, toBf16 } from '../dist/index.js';
import type { Engine, KvCache, PagedSparseAttentionArgs, QuantizeKCacheArgs, SparsePrefillArgs } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import { pagedReadForTests } from '../dist/backends/paged_gather.js';
import type { Backend } from '../dist/backends/backend.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { errorOf, refusalOf } from './helpers/errors.js';

const rng = testRng('validation');
let engine: Engine;
let backend: Backend;
const backendCalls = vi.fn();

beforeAll(async () => {
  engine = await createEngine({ backend: 'wasm', workers: 2 });
  backend = engineBackend(engine)!;
  // Count every job that reaches the backend: a refused call must never get there.
  for (const m of ['sparsePrefill', 'pagedSparseAttention', 'quantizeKCache', 'dequantizeKCache'] as const) {
    const original = backend[m].bind(backend) as (job: unknown) => Promise<unknown>;
    (backend as unknown as Record<string, unknown>)[m] = (job: unknown) => {
      backendCalls(m);
      return original(job);
    };
  }
});
afterAll(async () => {
  await engine?.dispose();
});

type Mutable<T> = { -readonly [K in keyof T]: T[K] };
type AnyArgs = Mutable<Record<string, unknown>>;

/** Expects a SparseMlaError with `code` whose message starts with the argument's name. */
async function expectRefused(call: () => Promise<unknown>, code: string, argument: string): Promise<SparseMlaError> {
  backendCalls.mockClear();
  const err = await errorOf(call);
  expect(err, `expected ${code} for ${argument}`).toBeInstanceOf(SparseMlaError);
  const e = err as SparseMlaError;
  expect(e.code).toBe(code);
  expect(e.message.startsWith(`${argument}`), `message "${e.message}" should name ${argument}`).toBe(true);
  expect(e.message).toMatch(/expected .+, got .+/);
  expect(backendCalls).not.toHaveBeenCalled();
  return e;
}

// ---------------------------------------------------------------- sparsePrefill

const SQ = 3;
const HQ = 2;
const DQK = 576;
const SKV = 40;
const TOPK = 8;

function prefillArgs(): AnyArgs {
  return {
    ...randomPrefillArgs(rng, { sQ: SQ, hQ: HQ, dQK: DQK, sKV: SKV, topk: TOPK }, { invalidFraction: 0.2 }),
    smScale: 0.05,
    dV: 512,
    attnSink: tensor('float32', [HQ], new Float32Array([0.5, -1])),
    topkLength: tensor('int32', [SQ], new Int32Array([8, 3, 0])),
  };
}

type Case = [name: string, mutate: (a: AnyArgs) => void, code: string, argument: string];

const prefillCases: Case[] = [
  ['q missing', (a) => delete a.q, 'INVALID_VALUE', 'q'],
  ['q not a tensor', (a) => (a.q = new Uint16Array(4)), 'INVALID_VALUE', 'q'],
  ['q float32', (a) => (a.q = tensor('float32', [SQ, HQ, DQK])), 'INVALID_DTYPE', 'q'],
  ['q data of the wrong array type', (a) => (a.q = { dtype: 'bf16', shape: [SQ, HQ, DQK], data: new Int16Array(SQ * HQ * DQK) }), 'INVALID_DTYPE', 'q.data'],
  ['q data shorter than its shape', (a) => (a.q = { dtype: 'bf16', shape: [SQ, HQ, DQK], data: new Uint16Array(5) }), 'INVALID_SHAPE', 'q.data'],
  ['q shape with a negative dim', (a) => (a.q = { dtype: 'bf16', shape: [-1, HQ, DQK], data: new Uint16Array(0) }), 'INVALID_SHAPE', 'q.shape'],
  ['q shape with a fractional dim', (a) => (a.q = { dtype: 'bf16', shape: [1.5, HQ, DQK], data: new Uint16Array(0) }), 'INVALID_SHAPE', 'q.shape'],
  ['q rank 2', (a) => (a.q = tensor('bf16', [SQ, DQK])), 'INVALID_SHAPE', 'q'],
  ['q with hQ = 0', (a) => (a.q = tensor('bf16', [SQ, 0, DQK])), 'INVALID_SHAPE', 'q'],
  ['dQK not a multiple of 64', (a) => {
    a.q = tensor('bf16', [SQ, HQ, 520]);
    a.kv = tensor('bf16', [SKV, 520]);
  }, 'INVALID_SHAPE', 'q'],
  ['dV not a multiple of 64', (a) => (a.dV = 500), 'INVALID_VALUE', 'dV'],
  ['dV larger than dQK', (a) => (a.dV = 640), 'INVALID_VALUE', 'dV'],
  ['dV zero', (a) => (a.dV = 0), 'INVALID_VALUE', 'dV'],
  ['dV a string', (a) => (a.dV = '512'), 'INVALID_VALUE', 'dV'],
  ['default dV 512 > dQK 256', (a) => {
    delete a.dV;
    a.q = tensor('bf16', [SQ, HQ, 256]);
    a.kv = tensor('bf16', [SKV, 256]);
  }, 'INVALID_VALUE', 'dV'],
  ['kv float32', (a) => (a.kv = tensor('float32', [SKV, DQK])), 'INVALID_DTYPE', 'kv'],
  ['kv rank 3 (several kv heads)', (a) => (a.kv = tensor('bf16', [SKV, 1, DQK])), 'INVALID_SHAPE', 'kv'],
  ['kv width ≠ dQK', (a) => (a.kv = tensor('bf16', [SKV, 512])), 'INVALID_SHAPE', 'kv'],
  ['indices float32', (a) => (a.indices = tensor('float32', [SQ, TOPK])), 'INVALID_DTYPE', 'indices'],
  ['indices uint8', (a) => (a.indices = tensor('uint8', [SQ, TOPK])), 'INVALID_DTYPE', 'indices'],
  ['indices with the wrong row count', (a) => (a.indices = tensor('int32', [SQ + 1, TOPK])), 'INVALID_SHAPE', 'indices'],
  ['indices rank 1', (a) => (a.indices = tensor('int32', [SQ * TOPK])), 'INVALID_SHAPE', 'indices'],
  ['indices [sQ, 2, topk] (two kv heads)', (a) => (a.indices = tensor('int32', [SQ, 2, TOPK])), 'INVALID_SHAPE', 'indices'],
  ['smScale NaN', (a) => (a.smScale = NaN), 'INVALID_VALUE', 'smScale'],
  ['smScale +inf', (a) => (a.smScale = Infinity), 'INVALID_VALUE', 'smScale'],
  ['smScale beyond float32', (a) => (a.smScale = 1e300), 'INVALID_VALUE', 'smScale'],
  ['smScale missing', (a) => delete a.smScale, 'INVALID_VALUE', 'smScale'],
  ['smScale a string', (a) => (a.smScale = '0.1'), 'INVALID_VALUE', 'smScale'],
  // finite as float32 but past the range where the float32 logits smScale · q·k stay finite
  ['smScale 3.4e38', (a) => (a.smScale = 3.4e38), 'INVALID_VALUE', 'smScale'],
  ['smScale -(2^16 + 1)', (a) => (a.smScale = -(2 ** 16 + 1)), 'INVALID_VALUE', 'smScale'],
  ['attnSink bf16', (a) => (a.attnSink = tensor('bf16', [HQ])), 'INVALID_DTYPE', 'attnSink'],
  ['attnSink of the wrong length', (a) => (a.attnSink = tensor('float32', [HQ + 1])), 'INVALID_SHAPE', 'attnSink'],
  ['attnSink [1, hQ]', (a) => (a.attnSink = tensor('float32', [1, HQ])), 'INVALID_SHAPE', 'attnSink'],
  ['topkLength int64', (a) => (a.topkLength = tensor('int64', [SQ])), 'INVALID_DTYPE', 'topkLength'],
  ['topkLength of the wrong length', (a) => (a.topkLength = tensor('int32', [SQ - 1])), 'INVALID_SHAPE', 'topkLength'],
  ['topkLength negative', (a) => (a.topkLength = tensor('int32', [SQ], new Int32Array([1, -1, 2]))), 'INVALID_VALUE', 'topkLength'],
  // Sizes the 32-bit ABI cannot take, with empty data so nothing big is allocated.
  ['topk ≥ 2^31', (a) => {
    a.q = tensor('bf16', [0, HQ, DQK]);
    a.indices = { dtype: 'int32', shape: [0, 2 ** 31], data: new Int32Array(0) };
    delete a.topkLength;
  }, 'TOO_LARGE', 'indices'],
  ['hQ ≥ 2^31', (a) => {
    a.q = { dtype: 'bf16', shape: [0, 2 ** 31, DQK], data: new Uint16Array(0) };
    a.indices = tensor('int32', [0, TOPK]);
    delete a.attnSink;
    delete a.topkLength;
  }, 'TOO_LARGE', 'q'],
];

describe('sparsePrefill refuses bad input', () => {
  test('the valid baseline runs', async () => {
    const r = await engine.sparsePrefill(prefillArgs() as unknown as SparsePrefillArgs);
    expect(r.out.shape).toEqual([SQ, HQ, 512]);
  });
  test('arguments that are not an object', async () => {
    await expectRefused(() => engine.sparsePrefill(null as unknown as SparsePrefillArgs), 'INVALID_VALUE', 'sparsePrefill arguments');
  });
  test.each(prefillCases)('%s', async (_name, mutate, code, argument) => {
    const a = prefillArgs();
    mutate(a);
    await expectRefused(() => engine.sparsePrefill(a as unknown as SparsePrefillArgs), code, argument);
  });
  test('a kv beyond the 4 GiB WASM heap is TOO_LARGE before any copy', async () => {
    // The heap limit is the backend's own (checked inside it, before it copies anything).
    // 2^31 bf16 = 4 GiB of zero pages: never touched, so it costs address space only.
    const kv = tensor('bf16', [2 ** 22, 512], new Uint16Array(2 ** 31));
    const err = await engine.sparsePrefill({ q: tensor('bf16', [1, 1, 512]), kv, indices: tensor('int32', [1, 1]), smScale: 1 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SparseMlaError);
    expect((err as SparseMlaError).code).toBe('TOO_LARGE');
    expect((err as SparseMlaError).message).toMatch(/^kv: .*WASM heap/);
    expect(process.memoryUsage().rss).toBeLessThan(2 ** 31); // nothing was copied
  });
});

// ---------------------------------------------------------------- pagedSparseAttention

const N = 2;
const PAGE = 4;
const PAGES = 3;

function v4Cache(pageSize: number, numPages: number): KvCache {
  const c = createKvCache('v4', { pageSize, numPages });
  for (let i = 0; i < c.data.length; i++) c.data[i] = rng.int(0, 256) & 0x77; // finite e4m3/ue8m0 bytes
  return c;
}

function pagedArgs(): AnyArgs {
  return {
    q: tensor('bf16', [N, HQ, 512], randomBf16Bits(rng, N * HQ * 512)),
    kCache: v4Cache(PAGE, PAGES),
    indices: tensor('int32', [N, 5], new Int32Array([0, 3, 11, -1, 12, 1, 1, 2, 7, 100])),
    topkLength: tensor('int32', [N], new Int32Array([5, 9])),
    extraKCache: v4Cache(2, 2),
    extraIndices: tensor('int32', [N, 2], new Int32Array([0, 3, 1, -5])),
    extraTopkLength: tensor('int32', [N], new Int32Array([2, 1])),
    attnSink: tensor('float32', [HQ]),
    smScale: 0.04,
  };
}

const pagedCases: Case[] = [
  ['q with dQK 576', (a) => (a.q = tensor('bf16', [N, HQ, 576])), 'INVALID_SHAPE', 'q'],
  ['q float32', (a) => (a.q = tensor('float32', [N, HQ, 512])), 'INVALID_DTYPE', 'q'],
  ['q rank 2', (a) => (a.q = tensor('bf16', [N, 512])), 'INVALID_SHAPE', 'q'],
  ['dV 576', (a) => (a.dV = 576), 'INVALID_VALUE', 'dV'],
  ['kCache missing', (a) => delete a.kCache, 'INVALID_VALUE', 'kCache'],
  ['kCache v32', (a) => (a.kCache = createKvCache('v32', { numTokens: 12 })), 'INVALID_VALUE', 'kCache.format'],
  ['kCache of an unknown format', (a) => (a.kCache = { ...(a.kCache as KvCache), format: 'v5' }), 'INVALID_VALUE', 'kCache.format'],
  ['kCache pageSize 0', (a) => (a.kCache = { ...(a.kCache as KvCache), pageSize: 0 }), 'INVALID_VALUE', 'kCache.pageSize'],
  ['kCache numPages fractional', (a) => (a.kCache = { ...(a.kCache as KvCache), numPages: 2.5 }), 'INVALID_VALUE', 'kCache.numPages'],
  ['kCache data a Uint16Array', (a) => (a.kCache = { ...(a.kCache as KvCache), data: new Uint16Array(10) }), 'INVALID_DTYPE', 'kCache.data'],
  ['kCache data one page short', (a) => (a.kCache = { ...(a.kCache as KvCache), numPages: PAGES + 1 }), 'INVALID_SHAPE', 'kCache.data'],
  ['kCache beyond 2^31 tokens', (a) => (a.kCache = { format: 'v4', pageSize: 64, numPages: 2 ** 26, data: new Uint8Array(0) }), 'TOO_LARGE', 'kCache'],
  ['indices rows ≠ n', (a) => (a.indices = tensor('int32', [N + 1, 5])), 'INVALID_SHAPE', 'indices'],
  ['indices float32', (a) => (a.indices = tensor('float32', [N, 5])), 'INVALID_DTYPE', 'indices'],
  ['topkLength negative', (a) => (a.topkLength = tensor('int32', [N], new Int32Array([0, -3]))), 'INVALID_VALUE', 'topkLength'],
  ['extraKCache without extraIndices', (a) => {
    delete a.extraIndices;
    delete a.extraTopkLength;
  }, 'INVALID_VALUE', 'extraIndices'],
  ['extraIndices without extraKCache', (a) => delete a.extraKCache, 'INVALID_VALUE', 'extraKCache'],
  ['extraTopkLength without extra set', (a) => {
    delete a.extraKCache;
    delete a.extraIndices;
  }, 'INVALID_VALUE', 'extraTopkLength'],
  ['extraKCache data wrong size', (a) => (a.extraKCache = { ...(a.extraKCache as KvCache), data: new Uint8Array(3) }), 'INVALID_SHAPE', 'extraKCache.data'],
  ['extraIndices rows ≠ n', (a) => (a.extraIndices = tensor('int32', [1, 2])), 'INVALID_SHAPE', 'extraIndices'],
  ['extraTopkLength negative', (a) => (a.extraTopkLength = tensor('int32', [N], new Int32Array([-1, 0]))), 'INVALID_VALUE', 'extraTopkLength'],
  ['attnSink wrong length', (a) => (a.attnSink = tensor('float32', [1])), 'INVALID_SHAPE', 'attnSink'],
  ['smScale -inf', (a) => (a.smScale = -Infinity), 'INVALID_VALUE', 'smScale'],
  ['smScale 3.4e38', (a) => (a.smScale = 3.4e38), 'INVALID_VALUE', 'smScale'],
];

describe('pagedSparseAttention refuses bad input', () => {
  test('the valid baseline runs', async () => {
    const r = await engine.pagedSparseAttention(pagedArgs() as unknown as PagedSparseAttentionArgs);
    expect(r.out.shape).toEqual([N, HQ, 512]);
  });
  test.each(pagedCases)('%s', async (_name, mutate, code, argument) => {
    const a = pagedArgs();
    mutate(a);
    await expectRefused(() => engine.pagedSparseAttention(a as unknown as PagedSparseAttentionArgs), code, argument);
  });
  test('caches beyond the 4 GiB WASM heap are TOO_LARGE before any copy, unless the call reads a compact cache of its tokens', async () => {
    const pageBytes = kvCacheBytes('v4', { pageSize: 64, numPages: 1 });
    const numPages = Math.floor((2 ** 32 - 1) / pageBytes);
    const kCache: KvCache = { format: 'v4', pageSize: 64, numPages, data: new Uint8Array(numPages * pageBytes) };
    const args: PagedSparseAttentionArgs = { q: tensor('bf16', [1, 1, 512]), kCache, indices: tensor('int32', [1, 1], Int32Array.of(numPages * 64 - 1)), smScale: 1 };
    // Handed whole, the cache cannot fit a worker: the heap limit is the backend's own (checked
    // inside it, before it copies anything).
    pagedReadForTests.force = 'whole';
    const err = await engine.pagedSparseAttention(args).catch((e: unknown) => e);
    pagedReadForTests.force = null;
    expect(err).toBeInstanceOf(SparseMlaError);
    expect((err as SparseMlaError).code).toBe('TOO_LARGE');
    expect((err as SparseMlaError).message).toMatch(/^kCache: .*WASM heap/);
    // By the estimate the call reads its one token (the cache's last) through a compact cache; zero
    // q and rows make one logit of 0: lse = maxLogits = 0, out the zero row (SPEC §4).
    const got = await engine.pagedSparseAttention(args);
    expect([got.lse.data[0], got.maxLogits.data[0], got.out.data.every((b) => b === 0)]).toEqual([0, 0, true]);
    expect(process.memoryUsage().rss).toBeLessThan(2 ** 31);
  });
});

// ---------------------------------------------------------------- kv cache ops

describe('quantizeKCache / dequantizeKCachePaged refuse bad input', () => {
  const rows = (n: number, d = 512) => tensor('float32', [n, d], Float32Array.from({ length: n * d }, () => rng.normal()));

  test.each([
    ['int32', tensor('int32', [3], new Int32Array([0, 12, 5])), 1, 12],
    ['int64', tensor('int64', [3], new BigInt64Array([0n, 1n, -1n])), 2, -1],
    ['int64 ≥ 2^32 that would wrap to a valid id', tensor('int64', [2], new BigInt64Array([3n, 2n ** 32n + 1n])), 1, 2 ** 32 + 1],
    ['number[]', [4, 11, 99], 2, 99],
  ] as const)('out-of-range token id (%s) names position and value, cache untouched', async (_kind, tokenIds, pos, value) => {
    const cache = v4Cache(PAGE, PAGES); // 12 tokens
    const before = cache.data.slice();
    const n = Array.isArray(tokenIds) ? tokenIds.length : (tokenIds as { shape: number[] }).shape[0]!;
    const e = await expectRefused(() => engine.quantizeKCache({ cache, tokenIds, rows: rows(n) } as QuantizeKCacheArgs), 'OUT_OF_RANGE', 'tokenIds');
    expect(e.message).toContain(`${value} at position ${pos}`);
    expect(e.message).toContain('[0, 12)');
    expect(Buffer.compare(cache.data, before)).toBe(0);
    const d = await expectRefused(() => engine.dequantizeKCachePaged({ cache, tokenIds } as never), 'OUT_OF_RANGE', 'tokenIds');
    expect(d.message).toContain(`${value} at position ${pos}`);
  });

  const cacheCases: Array<[string, () => unknown, () => unknown, string, string]> = [
    ['tokenIds fractional', () => v4Cache(2, 2), () => [0, 1.5], 'INVALID_VALUE', 'tokenIds'],
    ['tokenIds NaN', () => v4Cache(2, 2), () => [NaN], 'INVALID_VALUE', 'tokenIds'],
    ['tokenIds float32 tensor', () => v4Cache(2, 2), () => tensor('float32', [1]), 'INVALID_DTYPE', 'tokenIds'],
    ['tokenIds rank 2', () => v4Cache(2, 2), () => tensor('int32', [1, 1]), 'INVALID_SHAPE', 'tokenIds'],
    ['tokenIds missing', () => v4Cache(2, 2), () => undefined, 'INVALID_VALUE', 'tokenIds'],
    ['cache null', () => null, () => [0], 'INVALID_VALUE', 'cache'],
    ['cache format v3', () => ({ ...v4Cache(2, 2), format: 'v3' }), () => [0], 'INVALID_VALUE', 'cache.format'],
    ['v32 cache with pageSize 2', () => ({ format: 'v32', pageSize: 2, numPages: 2, data: new Uint8Array(4 * 656) }), () => [0], 'INVALID_VALUE', 'cache.pageSize'],
    ['v32 cache data short', () => ({ format: 'v32', pageSize: 1, numPages: 4, data: new Uint8Array(3 * 656) }), () => [0], 'INVALID_SHAPE', 'cache.data'],
    ['v4 data not a Uint8Array', () => ({ ...v4Cache(2, 2), data: Array.from({ length: 1152 }, () => 0) }), () => [0], 'INVALID_DTYPE', 'cache.data'],
    ['v4 pageSize negative', () => ({ ...v4Cache(2, 2), pageSize: -2 }), () => [0], 'INVALID_VALUE', 'cache.pageSize'],
  ];
  test.each(cacheCases)('%s', async (_name, cache, ids, code, argument) => {
    await expectRefused(() => engine.dequantizeKCachePaged({ cache: cache(), tokenIds: ids() } as never), code, argument);
    const c = cache();
    const n = Array.isArray(ids()) ? (ids() as unknown[]).length : 1;
    await expectRefused(() => engine.quantizeKCache({ cache: c, tokenIds: ids(), rows: rows(n) } as never), code, argument);
  });

  test.each([
    ['rows of 576 for a v4 cache', () => rows(2, 576), 'INVALID_SHAPE'],
    ['rows count ≠ tokenIds', () => rows(3), 'INVALID_SHAPE'],
    ['rows int32', () => tensor('int32', [2, 512]), 'INVALID_DTYPE'],
    ['rows rank 1', () => tensor('float32', [1024]), 'INVALID_SHAPE'],
    ['rows missing', () => undefined, 'INVALID_VALUE'],
  ] as const)('quantize %s', async (_name, r, code) => {
    const cache = v4Cache(2, 2);
    const before = cache.data.slice();
    await expectRefused(() => engine.quantizeKCache({ cache, tokenIds: [0, 3], rows: r() } as never), code, 'rows');
    expect(Buffer.compare(cache.data, before)).toBe(0);
  });

  test('v32 rows must be 576 wide', async () => {
    const cache = createKvCache('v32', { numTokens: 4 });
    await expectRefused(() => engine.quantizeKCache({ cache, tokenIds: [1], rows: rows(1, 512) }), 'INVALID_SHAPE', 'rows');
  });
});

describe('cache constructors and engine options refuse bad input (synchronously)', () => {
  test.each([
    [() => kvCacheBytes('v5' as never, { numTokens: 1 }), 'INVALID_VALUE', 'format'],
    [() => kvCacheBytes('v4', { pageSize: 0, numPages: 1 }), 'INVALID_VALUE', 'geometry.pageSize'],
    [() => kvCacheBytes('v4', { pageSize: 64, numPages: -1 }), 'INVALID_VALUE', 'geometry.numPages'],
    [() => kvCacheBytes('v32', { pageSize: 4, numPages: 1 }), 'INVALID_VALUE', 'geometry.pageSize'],
    [() => createKvCache('v4', { numTokens: 1.5 }), 'INVALID_VALUE', 'geometry.numTokens'],
    [() => createKvCache('v4', { pageSize: 2 ** 20, numPages: 2 ** 12 }), 'TOO_LARGE', 'geometry'],
    [() => createKvCache('v4', null as never), 'INVALID_VALUE', 'geometry'],
    // sizes the format allows but no process can hold: TOO_LARGE, not V8's RangeError
    [() => createKvCache('v4', { pageSize: 1, numPages: 2 ** 31 - 1 }), 'TOO_LARGE', 'geometry'],
    [() => createKvCache('v32', { numTokens: 2 ** 31 - 1 }), 'TOO_LARGE', 'geometry'],
    // the tensor helpers: an unknown dtype (an Object.prototype name too), a shape that is not an
    // array, a zero-filled tensor too large to allocate were TypeErrors / RangeErrors
    [() => tensor('fp8' as never, [1]), 'INVALID_DTYPE', 'tensor'],
    [() => tensor('toString' as never, [1]), 'INVALID_DTYPE', 'tensor'],
    [() => tensor('bf16', null as never), 'INVALID_SHAPE', 'tensor'],
    [() => tensor('bf16', 4 as never), 'INVALID_SHAPE', 'tensor'],
    [() => tensor('float32', [2 ** 30, 2 ** 30]), 'TOO_LARGE', 'tensor'],
    [() => numel(null as never), 'INVALID_SHAPE', 'numel'],
    [() => toBf16(null as never), 'INVALID_VALUE', 'toBf16'],
    [() => bf16ToFloat32(tensor('float32', [2]) as never), 'INVALID_DTYPE', 'bf16ToFloat32'],
    // the router: a query count that is not one was routed silently (NaN, −5 and 1.5 as paged,
    // "1000" as sparse); options null was a TypeError; an unknown ratio or backend fell back to a default
    [() => routePrefill(Number.NaN), 'INVALID_VALUE', 'numQueries'],
    [() => routePrefill(-5), 'INVALID_VALUE', 'numQueries'],
    [() => routePrefill(1.5), 'INVALID_VALUE', 'numQueries'],
    [() => routePrefill('1000' as never), 'INVALID_VALUE', 'numQueries'],
    [() => routePrefill(5, null as never), 'INVALID_VALUE', 'options'],
    [() => routePrefill(100, { backend: 'cuda', compressRatio: 7 as never }), 'INVALID_VALUE', 'compressRatio'],
    [() => routePrefill(100, { backend: 'gpu' as never }), 'INVALID_VALUE', 'backend'],
    [() => routePrefill(100, { env: 'sparse' as never }), 'INVALID_VALUE', 'env'],
  ] as const)('%#', (fn, code, argument) => {
    const [errCode, , message] = refusalOf(fn);
    expect(errCode).toBe(code);
    expect(message.startsWith(argument)).toBe(true);
  });

  test('cache sizes follow SPEC §3', () => {
    expect(kvCacheBytes('v4', { pageSize: 64, numPages: 3 })).toBe(3 * Math.ceil((64 * 584) / 576) * 576);
    expect(kvCacheBytes('v4', { pageSize: 2, numPages: 5 })).toBe(5 * 1728);
    expect(kvCacheBytes('v4', { numTokens: 65 })).toBe(2 * 37440); // default pageSize 64 → 2 pages
    expect(kvCacheBytes('v32', { numTokens: 7 })).toBe(7 * 656);
    const c = createKvCache('v32', { numTokens: 3 });
    expect([c.format, c.pageSize, c.numPages, c.data.length]).toEqual(['v32', 1, 3, 3 * 656]);
  });

  test.each([
    [{ backend: 'gpu' }, 'INVALID_VALUE', 'backend'],
    [{ workers: 0 }, 'INVALID_VALUE', 'workers'],
    [{ workers: 2.5 }, 'INVALID_VALUE', 'workers'],
    [{ workers: 1e6 }, 'INVALID_VALUE', 'workers'],
    [{ workers: '2' }, 'INVALID_VALUE', 'workers'],
  ] as const)('createEngine(%j)', async (options, code, argument) => {
    const err = await createEngine(options as never).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SparseMlaError);
    expect((err as SparseMlaError).code).toBe(code);
    expect((err as SparseMlaError).message.startsWith(argument)).toBe(true);
  });
});

// ---------------------------------------------------------------- normalization

describe('normalization: every accepted form means the same thing', () => {
  const bits = (r: { out: { data: Uint16Array }; lse: { data: Float32Array }; maxLogits: { data: Float32Array } }) => [
    Buffer.from(r.out.data.buffer, r.out.data.byteOffset, r.out.data.byteLength).toString('hex'),
    Array.from(r.lse.data),
    Array.from(r.maxLogits.data),
  ];

  test('int64 indices, including values ≥ 2^31 and ≥ 2^32, equal int32 indices with those entries invalid', async () => {
    const a = prefillArgs();
    delete a.topkLength;
    const idx32 = (a.indices as { data: Int32Array }).data;
    const idx64 = new BigInt64Array(idx32.length);
    const expected32 = idx32.slice();
    for (let i = 0; i < idx32.length; i++) {
      idx64[i] = BigInt(idx32[i]!);
      if (i % 5 === 1) {
        // A value that would alias a valid row if wrapped to 32 bits.
        idx64[i] = 2n ** 32n + BigInt(i % SKV);
        expected32[i] = -1;
      } else if (i % 5 === 2) {
        idx64[i] = 2n ** 31n + 3n;
        expected32[i] = -1;
      } else if (i % 5 === 3) {
        idx64[i] = -(2n ** 40n);
        expected32[i] = -1;
      }
    }
    const r64 = await engine.sparsePrefill({ ...a, indices: tensor('int64', [SQ, TOPK], idx64) } as unknown as SparsePrefillArgs);
    const r32 = await engine.sparsePrefill({ ...a, indices: tensor('int32', [SQ, TOPK], expected32) } as unknown as SparsePrefillArgs);
    expect(bits(r64)).toEqual(bits(r32));
  });

  test('[sQ, 1, topk] equals [sQ, topk]; topkLength > topk equals no topkLength', async () => {
    const a = prefillArgs();
    delete a.topkLength;
    const flat = await engine.sparsePrefill(a as unknown as SparsePrefillArgs);
    const idx = (a.indices as { data: Int32Array }).data;
    const headed = await engine.sparsePrefill({ ...a, indices: tensor('int32', [SQ, 1, TOPK], idx) } as unknown as SparsePrefillArgs);
    const long = await engine.sparsePrefill({ ...a, topkLength: tensor('int32', [SQ], new Int32Array([TOPK + 1, 2 ** 31 - 1, TOPK])) } as unknown as SparsePrefillArgs);
    expect(bits(headed)).toEqual(bits(flat));
    expect(bits(long)).toEqual(bits(flat));
  });

  test('an out-of-range token id for the paged path is a skipped entry, not an error', async () => {
    const a = pagedArgs();
    const r = await engine.pagedSparseAttention(a as unknown as PagedSparseAttentionArgs);
    const i64 = new BigInt64Array(Array.from((a.indices as { data: Int32Array }).data, (v) => BigInt(v)));
    i64[3] = 2n ** 32n; // was -1: still invalid, must not wrap to token 0
    const r64 = await engine.pagedSparseAttention({ ...a, indices: tensor('int64', [N, 5], i64) } as unknown as PagedSparseAttentionArgs);
    expect(bits(r64)).toEqual(bits(r));
  });
});
