/**
 * A wasm paged layer (path 'paged') refused at the call because one row's task of its
 * pagedSparseAttention cannot fit a worker's heap names the argument whose share of that task is
 * the larger: `q` where its heads (a query row, its outputs and the per-head scratch) outweigh the
 * caches' part (the caches as the op reads them, whole or compact, and their ids a row), else the
 * cache the op reads the more of (`caches.swa`, `caches.c128`); and its message states both. The
 * cases are far from the boundary: the shares are bounded here from the caches and the chunk (a
 * v4 token is 584 bytes; a query's window reads up to 128 SWA tokens, a c128 query every
 * compressed token before it), 2x apart or more.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createPlan, prefillLayer, tensor, type KvCache } from '../dist/index.js';
import { HEAP_RESERVE_BYTES } from '../dist/backends/wasm/wasm_backend.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { errorOf } from './helpers/errors.js';
import { planWork, spyOps } from './helpers/layer_work.js';
import { smallHeapWasmEngines } from './helpers/small_heap_wasm.js';

const rng = testRng('hostile_budget_wasm_paged_heap_argument');
const D = 512;
const TOKEN_BYTES = 576 + 8;
const WINDOW = 128;
const wasmEngine = smallHeapWasmEngines();

/** The shares a refusal states, and each cache's bytes as read. */
function statedShares(message: string): { hQ: number; q: number; reads: Map<string, number>; entries: number; caches: number } {
  const m = /q's (\d+) heads: (\d+) bytes; the caches as read \(([^)]*)\) and their (\d+) ids a row: (\d+) bytes/.exec(message);
  expect(m, message).not.toBeNull();
  const reads = new Map(m![3]!.split(', ').map((s) => {
    const [name, bytes] = s.split(' ');
    return [name!, Number(bytes)] as const;
  }));
  return { hQ: Number(m![1]), q: Number(m![2]), reads, entries: Number(m![4]), caches: Number(m![5]) };
}

describe('wasm paged layer: the pagedSparseAttention heap refusal names the larger share', () => {
  test.each([
    // many heads over small caches: q's share is more than twice the caches'
    { what: 'q', seqLen: [rng.int(20, 40)], extendLen: [rng.int(2, 8)], hQ: 256, ratio: 0 as const },
    { what: 'q', seqLen: [rng.int(20, 40)], extendLen: [rng.int(2, 6)], hQ: 256, ratio: 4 as const },
    // (long enough that a c128 token is visible: the op reads both sets)
    { what: 'q', seqLen: [rng.int(260, 400)], extendLen: [rng.int(2, 6)], hQ: 256, ratio: 128 as const },
    // two heads over the windows of three long requests: the SWA cache's share is the larger
    { what: 'caches.swa', seqLen: [rng.int(300, 2000), rng.int(300, 2000), rng.int(300, 2000)], extendLen: [rng.int(1, 4), rng.int(1, 4), rng.int(1, 4)], hQ: 2, ratio: 0 as const },
    // two heads over a c128 cache of about a thousand tokens, every one read: the c128 cache's
    { what: 'caches.c128', seqLen: [rng.int(120_000, 160_000)], extendLen: [rng.int(2, 6)], hQ: 2, ratio: 128 as const },
  ])('%o', async ({ what, seqLen, extendLen, hQ, ratio }) => {
    const sc = randomScenario(rng, seqLen, extendLen);
    const nq = sc.numQueries;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages);
    const compressed = ratio === 4 ? randomCache(rng, sc.c4PageSize, sc.c4Pages) : ratio === 128 ? randomCache(rng, sc.c128PageSize, sc.c128Pages) : undefined;
    const caches: Record<string, KvCache> = compressed === undefined ? { swa } : { swa, [`c${ratio}`]: compressed };
    const topkWidth = 32;
    const qTensor = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const plan = createPlan(sc.chunk);
    // Each cache as read (whole, or compact: the tokens its ids name) is at most the whole cache,
    // and at least the tokens some query reads: each request's first query reads the last
    // min(128, position + 1) SWA tokens of its window, and a c128 query every c128 token before
    // it. The ids a row are at most the window's and the extra set's, each rounded up to 128.
    const firstPositions = sc.requests.map((r) => r.seqLen - r.extendLen);
    const least = new Map([['caches.swa', TOKEN_BYTES * firstPositions.reduce((a, p) => a + Math.min(WINDOW, p + 1), 0)]]);
    if (ratio === 128) least.set('caches.c128', TOKEN_BYTES * firstPositions.reduce((a, p) => a + Math.floor(p / 128), 0));
    const most = new Map([['caches.swa', swa.data.byteLength]]);
    if (compressed !== undefined) most.set(`caches.c${ratio}`, compressed.data.byteLength);
    const extraMost = ratio === 4 ? topkWidth + 128 : ratio === 128 ? Math.max(...seqLen) / 128 + 128 : 0;
    const entriesMost = 2 * WINDOW + extraMost;
    // q's share is a query row and its output row, its maxLogits and lse, the sink and 8 KiB of
    // scratch a head; the caches' share the caches as read and 20 bytes an id (the id, 16 of scratch)
    const qShare = { least: hQ * D * 2 * 2, most: hQ * (D * 2 * 2 + 8 + 4 + 8192) };
    const cachesShare = { least: [...least.values()].reduce((a, b) => a + b, 0), most: [...most.values()].reduce((a, b) => a + b, 0) + 20 * entriesMost };
    expect(what === 'q' ? qShare.least / cachesShare.most : cachesShare.least / qShare.most).toBeGreaterThan(2);
    // of the caches, the one named is read the more, by 2x or more
    if (what !== 'q' && compressed !== undefined) expect(least.get(what)! / Math.max(...[...most].filter(([k]) => k !== what).map(([, v]) => v))).toBeGreaterThan(2);
    // a heap that no task of one row fits
    const { engine, backend } = await wasmEngine(HEAP_RESERVE_BYTES + 8192);
    const spy = spyOps(backend);
    const before = planWork(plan.stats);
    const e = await errorOf(() => prefillLayer(engine, { plan, compressRatio: ratio, q: qTensor, caches, ...(ratio === 4 ? { topkIndices: randomTopk(rng, sc, topkWidth) } : {}), smScale: 0.05, path: 'paged' }));
    expect(e).toBeInstanceOf(SparseMlaError);
    expect((e as SparseMlaError).code).toBe('TOO_LARGE');
    expect((e as Error).message).toMatch(new RegExp(`^${what.replace('.', '\\.')}: expected .*prefillLayer \\(a c${ratio} layer, paged path\\): its pagedSparseAttention`));
    expect((e as SparseMlaError).argument).toBe(what);
    // both shares stated, each within its bounds, and each cache's read within its own
    const stated = statedShares((e as Error).message);
    expect(stated.hQ).toBe(hQ);
    expect(stated.q).toBeGreaterThanOrEqual(qShare.least);
    expect(stated.q).toBeLessThanOrEqual(qShare.most);
    expect(stated.caches).toBeGreaterThanOrEqual(cachesShare.least);
    expect(stated.caches).toBeLessThanOrEqual(cachesShare.most);
    expect(stated.entries).toBeLessThanOrEqual(entriesMost);
    expect([...stated.reads.keys()]).toEqual([...most.keys()]);
    for (const [name, bytes] of stated.reads) {
      expect(bytes, name).toBeGreaterThanOrEqual(least.get(name) ?? 0);
      expect(bytes, name).toBeLessThanOrEqual(most.get(name)!);
    }
    expect(spy.calls).toEqual([]);
    expect(planWork(plan.stats)).toEqual(before);
  }, 60_000);
});
