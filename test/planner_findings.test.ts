/**
 * What the API fuzzer found in the planner (createPlan and a Plan's methods, createShardedPlan and
 * ShardedPlan, swaTokenIdsFromTable) and the router (routePrefill), one focused case each: every one
 * threw an untyped error, reached the planner core with bad input, or read an argument twice before
 * its fix. Each test names its session in its describe, or its commit in a comment. Moved from
 * test/fuzz_findings.test.ts and test/fuzz_findings_s59.test.ts.
 *
 * createPlan instantiates the package's WebAssembly core for its host planner on first use; where the
 * process may not reserve that module's memory (an address-space limit, `ulimit -v`, as batch systems
 * set), it threw the engine's RangeError ("WebAssembly.Instance(): Out of memory"), untyped, where
 * createEngine({ backend: 'wasm' }) under the same limit rejects with BACKEND_FAILURE.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, test } from 'vitest';
import { ShardedPlan, createPlan, createShardedPlan, prefillLayerSharded, routePrefill, tensor } from '../dist/index.js';
import type { Shard, Tensor } from '../dist/index.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario } from './helpers/chunks.js';
import { judgeAttention } from './fuzz/targets.mjs';
import { libScript, printedResult } from './helpers/child_script.js';
import { expectTyped, hostEngines, unprintable } from './helpers/findings.js';

const rng = testRng('planner_findings');
const engines = hostEngines();

// fuzzer finding, 898e40d
test("plan.pageSize / plan.compressedTokenIds of ratio 0 (which has no compressed cache) are INVALID_VALUE (compressedTokenIds(0) reached the planner core: BACKEND_FAILURE)", async () => {
  const sc = randomScenario(rng, [rng.int(20, 300)], [rng.int(1, 5)]);
  const plan = createPlan(sc.chunk);
  await expectTyped(() => plan.compressedTokenIds(0 as 4), 'INVALID_VALUE', 'ratio');
  await expectTyped(() => plan.pageSize(0 as 4), 'INVALID_VALUE', 'ratio');
  expect(plan.pageSize(4)).toBe(sc.c4PageSize);
});

// fuzzer finding, 898e40d
test('createPlan reads a typed array of ids by its memory: a subclass whose length lies gives the plan of its real ids (was OUT_OF_RANGE reading past them)', () => {
  const sc = randomScenario(rng, [rng.int(20, 60), rng.int(130, 300)], [rng.int(1, 5), rng.int(1, 5)]);
  class Lying extends Int32Array {
    override get length(): number {
      return super.length + 1000;
    }
  }
  const requests = sc.chunk.requests.map((r) => ({ ...r, swaTokenIds: Lying.from(Array.from(r.swaTokenIds as ArrayLike<number>)) }));
  const lying = createPlan({ ...sc.chunk, requests });
  const plain = createPlan(sc.chunk);
  expect(Array.from(lying.swaTokenIds.data)).toEqual(Array.from(plain.swaTokenIds.data));
});

// fuzzer finding, c7f7a24 (long run, seed 300)
test('plan.combineC4 / prefillLayer: a top-k wider than int32 on a chunk without queries is TOO_LARGE (reached the planner core: BACKEND_FAILURE)', async () => {
  const sc = randomScenario(rng, [rng.int(20, 300)], [0]);
  const plan = createPlan(sc.chunk);
  expect(plan.numQueries).toBe(0);
  await expectTyped(() => plan.combineC4(tensor('int32', [0, 2 ** 31], new Int32Array(0))), 'TOO_LARGE', 'topkIndices');
});

// fuzzer finding, 0eef3b7
test('routePrefill: an env whose SPARSE_MLA_PREFILL is not a string is INVALID_VALUE (null was TypeError)', async () => {
  await expectTyped(() => routePrefill(10, { env: { SPARSE_MLA_PREFILL: null as unknown as string } }), 'INVALID_VALUE', 'SPARSE_MLA_PREFILL');
  expect(routePrefill(10, { env: { SPARSE_MLA_PREFILL: ' Paged ' } }).path).toBe('paged');
});

describe('routePrefill reads each option once (session 50, helper-50)', () => {
  test("a threshold or backend getter answering otherwise on a second read: the decision and its reason from one read of each (the threshold was read twice, the backend again for the reason: a given threshold's reason said '(cpu default)', a cpu table threshold's said '(cuda default)')", () => {
    const numQueries = rng.int(0, 2000);
    /** options whose `key` answers `first`, then `later` on every read after. */
    const shifting = (base: object, key: string, first: unknown, later: unknown) => {
      let reads = 0;
      const o = { ...base, env: {} };
      Object.defineProperty(o, key, { enumerable: true, get: () => (reads++ === 0 ? first : later) });
      return { o: o as Parameters<typeof routePrefill>[1], reads: () => reads };
    };
    const given = rng.int(0, 2000);
    // threshold: left out on the first read, given on the second
    const t = shifting({ backend: 'cpu', compressRatio: 4 }, 'threshold', undefined, given);
    const byThreshold = routePrefill(numQueries, t.o);
    expect(t.reads()).toBe(1);
    const cpu4 = routePrefill(numQueries, { backend: 'cpu', compressRatio: 4, env: {} });
    expect(byThreshold).toEqual(cpu4);
    // backend: 'cpu' on the first read, 'cuda' after
    const b = shifting({ compressRatio: 4 }, 'backend', 'cpu', 'cuda');
    const byBackend = routePrefill(numQueries, b.o);
    expect(b.reads()).toBe(1);
    expect(byBackend).toEqual(cpu4);
    expect(byBackend.reason).toContain('(cpu default)');
  });
});

describe("hostile input the fuzzer's session-51 generators reach (session 51, helper-52)", () => {
  test("routePrefill: a backend String() cannot print is INVALID_VALUE naming it (Object.hasOwn turned it into a key: TypeError, or the caller's toString error; cpu fuzz seed 24 case 4166)", async () => {
    const numQueries = rng.int(0, 2000);
    for (const backend of unprintable()) {
      await expectTyped(() => routePrefill(numQueries, { backend, env: {} } as never), 'INVALID_VALUE', 'backend');
    }
    // a backend that is one still picks its table's threshold
    const threshold = rng.int(0, 1000);
    expect(routePrefill(threshold + 1, { backend: 'cpu', threshold, env: {} }).path).toBe('sparse');
  });

  /** A random chunk of plain requests, and their SWA ids as given (random, request by request). */
  function plainChunk() {
    const window = rng.pick([1, 16, 128]);
    const requests = Array.from({ length: rng.int(1, 4) }, () => {
      const seqLen = rng.int(1, 200);
      const extendLen = rng.int(1, seqLen + 1);
      const g = Math.min(seqLen, extendLen + window - 1);
      return { seqLen, extendLen, swaTokenIds: Array.from({ length: g }, () => rng.int(0, 1 << 20)) };
    });
    return { window, requests, ids: requests.flatMap((r) => r.swaTokenIds) };
  }
  const swaIdsOf = (plan: { swaTokenIds: Tensor<'int64'> }) => Array.from(plan.swaTokenIds.data, Number);

  test('createPlan reads chunk.requests once: a getter answering undefined on a second read does not change the plan (it was read again: TypeError, stub cuda fuzz seed 26 case 2794)', () => {
    const { window, requests, ids } = plainChunk();
    const want = createPlan({ requests }, { window });
    expect(swaIdsOf(want)).toEqual(ids);
    let reads = 0;
    const chunk = {
      get requests() {
        return reads++ === 0 ? requests : undefined;
      },
    };
    const byGetter = createPlan(chunk as never, { window });
    expect(reads).toBe(1);
    expect(byGetter.numQueries).toBe(want.numQueries);
    expect(swaIdsOf(byGetter)).toEqual(ids);
  });

  test('createPlan reads each request once: one answering null on a second read does not change the plan (it was read again for its ids: TypeError)', () => {
    const { window, requests, ids } = plainChunk();
    const list = requests.slice();
    const r = rng.int(0, list.length);
    let requestReads = 0;
    Object.defineProperty(list, r, { get: () => (requestReads++ === 0 ? requests[r] : null) });
    expect(swaIdsOf(createPlan({ requests: list }, { window }))).toEqual(ids);
    expect(requestReads).toBe(1);
  });

  test("createPlan reads an id list's length once: a Proxy whose length shrinks by one after its first read gives every id as given (its last id came out as 0, silently)", () => {
    const { window, requests, ids } = plainChunk();
    const r = rng.int(0, requests.length);
    let lengthReads = 0;
    const shrinking = requests.map((q, i) =>
      i !== r
        ? q
        : {
            ...q,
            swaTokenIds: new Proxy(q.swaTokenIds, {
              get: (t, k, recv) => (k === 'length' && lengthReads++ > 0 ? t.length - 1 : Reflect.get(t, k, recv)),
            }),
          },
    );
    expect(swaIdsOf(createPlan({ requests: shrinking }, { window }))).toEqual(ids);
    expect(lengthReads).toBe(1);
  });

  /**
   * Each shard's SWA ids for a split by queries into `k` shards, from SPEC §6 (written here, not the
   * library's subChunk): shard p owns flat queries [a, b), sizes differing by at most one, larger
   * first; a request's queries [lo, hi) there need positions [s' − g', s') with s' = seqLen −
   * extendLen + hi, g' = min(s', (hi − lo) + W − 1), the request's ids being positions [seqLen − g, seqLen).
   */
  function shardIdsByQueries(requests: { seqLen: number; extendLen: number; swaTokenIds: number[] }[], window: number, k: number): number[][] {
    const total = requests.reduce((t, q) => t + q.extendLen, 0);
    const out: number[][] = [];
    for (let p = 0, a = 0; p < k; p++) {
      const b = a + Math.floor(total / k) + (p < total % k ? 1 : 0);
      const ids: number[] = [];
      let offset = 0;
      for (const q of requests) {
        const lo = Math.max(a, offset) - offset, hi = Math.min(b, offset + q.extendLen) - offset;
        offset += q.extendLen;
        if (hi <= lo) continue;
        const s2 = q.seqLen - q.extendLen + hi, g2 = Math.min(s2, hi - lo + window - 1), g = Math.min(q.seqLen, q.extendLen + window - 1);
        for (let pos = s2 - g2; pos < s2; pos++) ids.push(q.swaTokenIds[pos - (q.seqLen - g)]!);
      }
      out.push(ids);
      a = b;
    }
    return out;
  }

  test("createShardedPlan reads the chunk once for the whole plan and its shards: chunk.requests or a request answering otherwise on a second read gives the shards of the requests checked (the shards were cut from a second read: TypeError on null / undefined, or another list's requests, silently: shards of 3 and 0 queries in ranges of 5 and 5)", () => {
    const { window, requests } = plainChunk();
    const total = requests.reduce((t, q) => t + q.extendLen, 0);
    const k = rng.int(1, Math.min(total, 4) + 1);
    const want = shardIdsByQueries(requests, window, k);
    const other = [{ seqLen: 3, extendLen: 3, swaTokenIds: [7, 8, 9] }];
    const check = (chunk: unknown, what: string) => {
      const plan = createShardedPlan(chunk as never, { shards: k, split: 'queries', window });
      expect(plan.numQueries, what).toBe(total);
      expect(plan.shards.map((sh) => sh.plan.numQueries), what).toEqual(plan.shards.map((sh) => sh.numQueries));
      expect(plan.shards.map((sh) => swaIdsOf(sh.plan)), what).toEqual(want);
      plan.release();
    };
    for (const later of [undefined, null, other]) {
      let reads = 0;
      check({ get requests() { return reads++ === 0 ? requests : later; } }, `requests, then ${JSON.stringify(later)}`);
      expect(reads).toBe(1);
    }
    const list = requests.slice();
    const r = rng.int(0, list.length);
    let requestReads = 0;
    Object.defineProperty(list, r, { get: () => (requestReads++ === 0 ? requests[r] : null) });
    check({ requests: list }, `request ${r}, then null`);
    expect(requestReads).toBe(1);
  });

  test('createPlan: a requests Proxy whose length is no count is INVALID_VALUE naming chunk.requests (was RangeError: Invalid typed array length)', async () => {
    const { requests } = plainChunk();
    for (const length of [-1, 1.5, 'two', 2 ** 53]) {
      const lying = new Proxy(requests, { get: (t, k, recv) => (k === 'length' ? length : Reflect.get(t, k, recv)) });
      await expectTyped(() => createPlan({ requests: lying }), 'INVALID_VALUE', 'chunk.requests');
    }
  });

  test('swaTokenIdsFromTable: a Proxy of a typed array for either table is a typed error (was TypeError from the length getter); typed arrays read right', async () => {
    const { swaTokenIdsFromTable } = await import('../dist/index.js');
    const seqLen = rng.int(1, 300), extendLen = rng.int(0, seqLen + 1), window = rng.pick([1, 16, 128]);
    const reqToToken = Int32Array.from({ length: seqLen }, (_, p) => p + rng.int(0, 3) * seqLen);
    const fullToSwa = Int32Array.from({ length: 3 * seqLen }, () => rng.int(0, 1 << 16));
    // positions [seqLen - g, seqLen), g = min(seqLen, extendLen + window - 1), none without queries (SPEC §6)
    const g = extendLen > 0 ? Math.min(seqLen, extendLen + window - 1) : 0;
    const want = Array.from({ length: g }, (_, k) => fullToSwa[reqToToken[seqLen - g + k]!]!);
    expect(swaTokenIdsFromTable(reqToToken, fullToSwa, seqLen, extendLen, window)).toEqual(want);
    await expectTyped(() => swaTokenIdsFromTable(new Proxy(reqToToken, {}), fullToSwa, seqLen, extendLen, window), 'INVALID_SHAPE', 'reqToToken');
    await expectTyped(() => swaTokenIdsFromTable(reqToToken, new Proxy(fullToSwa, {}), seqLen, extendLen, window), 'INVALID_VALUE', 'fullToSwa');
  });
});

describe("hostile input the fuzzer's session-52 oracle and generators reach (session 52, helper-53)", () => {
  test("createShardedPlan reads each request's id lists once for the whole plan and its shards: a swaTokenIds or c128PageTable element answering another id after its first read gives every shard the ids the whole plan checked (each shard's plan read the caller's lists again: a shard attended other SWA rows or pages, silently; cpu seed 53 case 2896, a soft read-twice)", async () => {
    const { judgeLayer, layerScenario } = await import('./fuzz/targets.mjs');
    const { CaseHooks } = await import('./fuzz/mutate.mjs');
    for (const engine of engines) {
      for (const key of ['swaTokenIds', 'c128PageTable'] as const) {
        let s;
        do s = layerScenario(rng, new CaseHooks(), 128);
        while (s.sc.numQueries < 2 || (s.sc.chunk.requests[0] as unknown as Record<string, ArrayLike<number>>)[key]!.length < 1 || s.sc.swaPageSize * s.sc.swaPages < 2 || s.sc.c128Pages < 2);
        const { sc, layer, window } = s;
        const req = sc.chunk.requests[0] as unknown as Record<string, ArrayLike<number>>;
        const list = Array.from(req[key]!);
        const first = list[0]!;
        const bound = key === 'c128PageTable' ? sc.c128Pages : sc.swaPageSize * sc.swaPages;
        const later = (first + 1) % bound;
        let reads = 0;
        Object.defineProperty(list, 0, { enumerable: true, get: () => (reads++ === 0 ? first : later) });
        const chunk = { ...sc.chunk, requests: [{ ...req, [key]: list }, ...sc.chunk.requests.slice(1)] };
        const plan = createShardedPlan(chunk, { shards: 2, split: 'queries', window });
        const got = await prefillLayerSharded([engine, engine], { ...layer, plan });
        expect(reads, `${engine.backend} ${key}: element reads`).toBe(1);
        expect(judgeLayer(got, sc, layer), `${engine.backend} ${key}`).toBeNull();
        plan.release();
      }
    }
  });
});

describe("a ShardedPlan is one createShardedPlan made, as a Plan is one createPlan made (session 57, helper-77, by hand after the fuzzer's shardedEngines target)", () => {
  function shardedCase(split: 'queries' | 'heads') {
    const sc = randomScenario(rng, [rng.int(20, 80), rng.int(5, 30)], [rng.int(3, 7), rng.int(2, 5)]);
    const hQ = rng.int(2, 4);
    const caches = { swa: randomCache(rng, 64, sc.swaPages) };
    const q = tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512));
    const plan = createShardedPlan(sc.chunk, { shards: 2, split, window: 128 });
    const smScale = 1 / Math.sqrt(576);
    const reference = () => prefillLayerReference({ chunk: sc.ref, compressRatio: 0, q, caches, smScale });
    return { sc, hQ, caches, q, plan, smScale, reference };
  }

  test.each(['queries', 'heads'] as const)('prefillLayerSharded (split by %s) refuses with INVALID_VALUE naming plan one made by the public constructor (shards repeated: it resolved with the rows no shard computed left 0), an object inheriting from ShardedPlan.prototype (was TypeError reading shards), a Proxy of a real one and an object inheriting from it; the real one is right', async (split) => {
    const { sc, hQ, caches, q, plan, smScale, reference } = shardedCase(split);
    const args = (p: unknown) => ({ q, compressRatio: 0 as const, plan: p as ShardedPlan, caches, smScale });
    const fakes: unknown[] = [
      new ShardedPlan(split, [plan.shards[0]!, plan.shards[0]!], plan.numQueries),
      new ShardedPlan(split, plan.shards, plan.numQueries),
      Object.create(ShardedPlan.prototype),
      new Proxy(plan, {}),
      Object.create(plan),
    ];
    for (const engine of engines) {
      for (const fake of fakes) await expectTyped(() => prefillLayerSharded([engine, engine], args(fake)), 'INVALID_VALUE', 'plan');
      const got = await prefillLayerSharded([engine, engine], args(plan));
      expect(judgeAttention(got, reference, sc.numQueries, hQ, 512)).toBeNull();
    }
  });

  test("a plan's shards cannot be rewritten after createShardedPlan (reordered or repeated shards gave rows no shard computed, silently): the plan, its shard list and each shard are frozen; release() on anything but such a plan is INVALID_VALUE naming this (was TypeError)", async () => {
    const { sc, hQ, q, caches, plan, smScale, reference } = shardedCase('queries');
    const first = plan.shards[0]!;
    expect(Reflect.set(plan.shards as Shard[], 1, first)).toBe(false);
    expect(Reflect.set(first, 'queryOffset', 1)).toBe(false);
    expect(Reflect.set(plan, 'numQueries', plan.numQueries + 1)).toBe(false);
    expect(Reflect.set(plan, 'split', 'heads')).toBe(false);
    expect(plan.shards.map((s) => [s.queryOffset, s.numQueries])).toEqual([[0, plan.shards[0]!.numQueries], [plan.shards[0]!.numQueries, sc.numQueries - plan.shards[0]!.numQueries]]);
    const got = await prefillLayerSharded([engines[0]!, engines[engines.length - 1]!], { q, compressRatio: 0, plan, caches, smScale });
    expect(judgeAttention(got, reference, sc.numQueries, hQ, 512)).toBeNull();
    const release = plan.release;
    for (const self of [undefined, {}, Object.create(ShardedPlan.prototype), new Proxy(plan, {})]) await expectTyped(() => release.call(self), 'INVALID_VALUE', 'this');
    plan.release();
  });
});

/**
 * `body` (the text of an async function of `lib`, the package's dist/index.js) in a child node process
 * under `ulimit -v <kib>`; its last stdout line parsed.
 */
function underAddressLimit(kib: number, body: string): { status: number | null; stderr: string; result: unknown } {
  const r = spawnSync('bash', ['-c', `ulimit -v ${kib} && exec "$0" --input-type=module -e "$1"`, process.execPath, libScript(body)], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stderr: r.stderr ?? '', result: printedResult(r.stdout) };
}

/** Whether a 6 GiB address-space limit keeps this machine's node from reserving a wasm32 memory of 4 GiB maximum (V8 reserves its guard region): where it does not, the limit cannot reach the planner. */
const LIMIT_KIB = 6_000_000;
const limitBites = (() => {
  const r = underAddressLimit(LIMIT_KIB, `try { new WebAssembly.Memory({ initial: 1, maximum: 65536 }); return 'reserved'; } catch (e) { return e instanceof RangeError ? 'refused' : String(e); }`);
  return r.result === 'refused';
})();

describe.skipIf(process.platform !== 'linux' || !limitBites)('createPlan where the WebAssembly core cannot be instantiated (session 59, helper-86, by hand: `ulimit -v` while probing the CLI)', () => {
  test('createPlan throws BACKEND_FAILURE naming the host planner, as createEngine({ backend: "wasm" }) rejects, not a RangeError', () => {
    const seqLen = rng.int(2, 40);
    const extendLen = rng.int(1, seqLen + 1);
    const swa = Array.from({ length: Math.min(seqLen, extendLen + 127) }, (_, i) => i);
    const r = underAddressLimit(LIMIT_KIB, `
      const out = {};
      try { lib.createPlan({ requests: [{ seqLen: ${seqLen}, extendLen: ${extendLen}, swaTokenIds: new Int32Array(${JSON.stringify(swa)}) }] }); out.plan = 'made'; }
      catch (e) { out.plan = { name: e.constructor.name, code: e.code ?? null, message: String(e.message) }; }
      try { const e = await lib.createEngine({ backend: 'wasm', workers: 1 }); await e.dispose(); out.wasm = 'made'; }
      catch (e) { out.wasm = { name: e.constructor.name, code: e.code ?? null }; }
      return out;
    `);
    expect(r.status, r.stderr).toBe(0);
    const got = r.result as { plan: { name: string; code: string | null; message: string }; wasm: { name: string; code: string | null } };
    expect(got.wasm).toEqual({ name: 'SparseMlaError', code: 'BACKEND_FAILURE' });
    expect(got.plan).toEqual({ name: 'SparseMlaError', code: 'BACKEND_FAILURE', message: expect.stringMatching(/createPlan: .*host planner.*Out of memory/) });
  });
});
