/**
 * The kv-row planner's choice between the whole kv (or cache) and a compact one
 * (src/backends/prefill_gather.ts: planKvRows, cheaperKvRows, chooseKvRows; the paged op's
 * estimate in src/backends/paged_gather.ts) decides from the count of distinct rows (and their
 * runs, where the count alone does not settle it) before it orders them, so a call that reads whole
 * pays a pass or two over its ids. Its plans and its nulls must stay those of the planner before that change: a frozen copy of that planner (as
 * committed at 98df46e) is the oracle here, over thousands of random id sets (uniform, windows,
 * clusters, invalid ids and duplicates mixed in, lengths) around the whole/compact boundary, under
 * the cpu's, wasm's and the paged op's copy models, planned fresh and in a kept scratch. Then the
 * paged op's kept scratches: reads planned and gathered out of order (two calls in flight, a
 * layer's check between a plan and its gather, a plan never gathered) give the fresh plans' ids
 * and compact caches, and calls in flight together on one engine give the bits they give alone.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine, KvCache, PagedSparseAttentionArgs } from '../dist/index.js';
import { KvRowScratch, chooseKvRows, planKvRows, type KvIndexRows, type KvRowPlan } from '../dist/backends/prefill_gather.js';
import { PagedScratchPool, choosePagedRead, gatherCompact, pagedSetReads, planPagedRead, planPagedReads, remapIndices, type HostPagedSet } from '../dist/backends/paged_gather.js';
import type { PagedCopies, PagedSparseAttentionJob } from '../dist/backends/backend.js';
import { compactGeometry, v4PageBytes, V4_TOKEN_BYTES } from '../dist/kv_cache_layout.js';
import { mixedIds, resultBits } from './helpers/kv_gather.js';
import { randomBf16Bits, testRng, type Rng } from './helpers/random.js';
import { nativeAddonBuilt } from './helpers/backends.js';

const rng = testRng('kv_gather_choice');

// ---- the planner as committed at 98df46e, frozen: the oracle of the choice ----------------------

function oldRowLimit(topkLength: Int32Array | null, i: number, topk: number): number {
  if (!topkLength) return topk;
  const n = topkLength[i]!;
  return n < 0 ? 0 : n < topk ? n : topk;
}

function oldPlanKvRows(s: KvIndexRows, maxRows = Infinity): KvRowPlan | null {
  const { indices, sQ, topk, topkLength, sKV } = s;
  const entries = Math.min(sKV, sQ * topk);
  const slotOf = new Int32Array(sKV), seen = new Int32Array(entries);
  let m = 0;
  for (let i = 0; i < sQ; i++) {
    const row = i * topk;
    const end = row + oldRowLimit(topkLength, i, topk);
    for (let e = row; e < end; e++) {
      const id = indices[e]!;
      if (id >= 0 && id < sKV && slotOf[id] === 0) {
        if (m >= maxRows) return null;
        slotOf[id] = 1;
        seen[m++] = id;
      }
    }
  }
  let rows: Int32Array;
  if (m * 16 < sKV) {
    rows = seen.subarray(0, m).sort();
  } else {
    rows = seen.subarray(0, m);
    for (let id = 0, j = 0; j < m; id++) if (slotOf[id] !== 0) rows[j++] = id;
  }
  let runs = 0;
  for (let j = 0; j < m; j++) {
    const id = rows[j]!;
    slotOf[id] = j + 1;
    if (j === 0 || rows[j - 1] !== id - 1) runs++;
  }
  return { rows, slotOf, runs };
}

const OLD_COPY_NS_PER_BYTE = 0.12, OLD_ENTRY_NS = 10, OLD_RUN_NS = 300, OLD_PAGED_RUN_NS = 500;

function oldCheaperKvRows(s: KvIndexRows, wholeNs: number, perRowNs: number, runNs: number, compactNs: (rows: number) => number = (rows) => rows * perRowNs): KvRowPlan | null {
  const entriesNs = s.sQ * s.topk * OLD_ENTRY_NS;
  if (entriesNs >= wholeNs) return null;
  const plan = oldPlanKvRows(s, Math.floor((wholeNs - entriesNs) / perRowNs));
  if (!plan) return null;
  return entriesNs + plan.runs * runNs + compactNs(plan.rows.length) < wholeNs ? plan : null;
}

function oldChooseKvRows(s: KvIndexRows, dQK: number, wholeCopies: number, compactCopies: number, runNs = OLD_RUN_NS): KvRowPlan | null {
  const rowBytes = dQK * 2;
  return oldCheaperKvRows(s, s.sKV * rowBytes * OLD_COPY_NS_PER_BYTE * wholeCopies, rowBytes * OLD_COPY_NS_PER_BYTE * (1 + compactCopies), runNs);
}

/** paged_gather's estimatedPlan at 98df46e (a v4 cache's tokens are its rows). */
function oldPagedChoice(set: HostPagedSet, n: number, wholeCopies: number, compactCopies: number): KvRowPlan | null {
  const wholeNs = set.cache.bytes * OLD_COPY_NS_PER_BYTE * wholeCopies;
  const perTokenNs = V4_TOKEN_BYTES * OLD_COPY_NS_PER_BYTE * (1 + compactCopies);
  const compactNs = (tokens: number) => compactGeometry('v4', tokens).bytes * OLD_COPY_NS_PER_BYTE * (1 + compactCopies);
  return oldCheaperKvRows({ indices: set.indices, sQ: n, topk: set.topk, topkLength: set.topkLength, sKV: set.cache.numTokens }, wholeNs, perTokenNs, OLD_PAGED_RUN_NS, compactNs);
}

// ---- random id sets around the boundary ---------------------------------------------------------

/** ids of sQ rows of topk over sKV rows, of one of several kinds, with lengths half the time. */
function randomRows(r: Rng, sKV: number, sQ: number, topk: number): KvIndexRows {
  const count = sQ * topk;
  const kind = r.int(0, 4);
  let indices: Int32Array;
  if (kind === 0) {
    // uniform, distinct or not
    indices = Int32Array.from({ length: count }, () => r.int(0, Math.max(1, sKV)));
  } else if (kind === 1) {
    // windows: runs of consecutive ids of random lengths from random starts (a sliding window's)
    indices = new Int32Array(count);
    for (let k = 0; k < count; ) {
      const start = r.int(0, Math.max(1, sKV)), len = r.int(1, 64);
      for (let j = 0; j < len && k < count; j++) indices[k++] = Math.min(start + j, sKV - 1);
    }
  } else if (kind === 2) {
    // clustered: ids near a few centres, so rows and gaps of one or two are frequent
    const centres = Array.from({ length: r.int(1, 8) }, () => r.int(0, Math.max(1, sKV)));
    const spread = r.int(1, Math.max(2, sKV >> r.int(2, 8)));
    indices = Int32Array.from({ length: count }, () => r.pick(centres) + r.int(-spread, spread + 1));
  } else {
    indices = mixedIds(r, count, sKV);
  }
  const topkLength = r.uniform() < 0.5 ? Int32Array.from({ length: sQ }, () => r.int(-2, topk + 3)) : null;
  return { indices, sQ, topk, topkLength, sKV };
}

/** Rows of the kv for `entries` ids, from a sixteenth to sixteen times as many: some sets read most of them, others a sliver. */
function kvRowsFor(r: Rng, entries: number): number {
  return Math.max(0, Math.round(entries * 2 ** (r.uniform() * 8 - 4)) + r.int(-2, 3));
}

/** The bytes of a typed array, for exact comparison. */
const bytesOf = (a: Int32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

function expectSamePlan(label: string, got: KvRowPlan | { tokens: Int32Array; slotOf: Int32Array; runs: number } | null, want: KvRowPlan | null): void {
  if (!want) {
    expect(got, `${label}: null`).toBeNull();
    return;
  }
  expect(got, `${label}: a plan`).not.toBeNull();
  const rows = 'rows' in got! ? got.rows : got!.tokens;
  expect(bytesOf(rows).equals(bytesOf(want.rows)), `${label}: rows`).toBe(true);
  expect(got!.runs, `${label}: runs`).toBe(want.runs);
  expect(bytesOf(got!.slotOf).equals(bytesOf(want.slotOf)), `${label}: slotOf`).toBe(true);
}

describe("the choice against the planner as committed at 98df46e", () => {
  test('chooseKvRows: the same plan or null over 2400 random id sets x 5 copy models (cpu 700 ns a run, wasm 300), fresh and in a kept scratch', () => {
    // cpu: the staging's whole copy, none after a gather; wasm: the staging's and each task's, each worker's of a compact kv
    const models: Array<[whole: number, compact: number, runNs: number | undefined]> = [[1, 0, 700], [2, 2, undefined], [3, 1, undefined], [1, 3, undefined], [4, 2, 700]];
    const scratch = new KvRowScratch();
    const tally = { compact: 0, whole: 0, near: 0 };
    for (let c = 0; c < 2400; c++) {
      const sQ = r16(), topk = rng.int(0, 800);
      const s = randomRows(rng, kvRowsFor(rng, sQ * topk), sQ, topk);
      const dQK = rng.pick([512, 576]);
      const all = oldPlanKvRows(s);
      for (const [whole, compact, runNs] of models) {
        const want = oldChooseKvRows(s, dQK, whole, compact, runNs);
        const label = `set ${c} (sKV ${s.sKV}, ${sQ} x ${topk}), copies ${whole}/${compact}/${runNs ?? 300}`;
        expectSamePlan(`${label}, fresh`, chooseKvRows(s, dQK, whole, compact, runNs), want);
        expectSamePlan(`${label}, kept scratch`, chooseKvRows(s, dQK, whole, compact, runNs, scratch), want);
        tally[want ? 'compact' : 'whole']++;
        // how close the estimate came to the whole kv's cost: the sets the early choice must get right
        if (all && sQ * topk > 0) {
          const rowBytes = dQK * 2, wholeNs = s.sKV * rowBytes * OLD_COPY_NS_PER_BYTE * whole;
          const ns = sQ * topk * OLD_ENTRY_NS + all.runs * (runNs ?? OLD_RUN_NS) + all.rows.length * rowBytes * OLD_COPY_NS_PER_BYTE * (1 + compact);
          if (Math.abs(ns - wholeNs) < 0.1 * wholeNs) tally.near++;
        }
      }
    }
    // the sets span the boundary: both answers often, and many within 10% of it
    expect(tally.compact).toBeGreaterThan(2400);
    expect(tally.whole).toBeGreaterThan(2400);
    expect(tally.near).toBeGreaterThan(300);
  });

  test("the paged op's estimate (page-rounded compact caches, 500 ns a run): the same plan or null over 1500 random sets x 4 copy models, a shared cache never planned", () => {
    const models: PagedCopies[] = [
      { whole: (unshared) => (unshared ? 1 : 0), compact: 1 },
      { whole: (unshared) => (unshared ? 1 : 0) + 1, compact: 2 },
      { whole: () => 3, compact: 0 },
      { whole: () => 1, compact: 3 },
    ];
    const scratch = new KvRowScratch();
    const tally = { compact: 0, whole: 0 };
    for (let c = 0; c < 1500; c++) {
      const n = r16(), topk = rng.int(0, 600);
      const pageSize = rng.pick([1, 2, 64, 256]);
      const numPages = Math.max(0, Math.ceil(kvRowsFor(rng, n * topk) / pageSize));
      const s = randomRows(rng, pageSize * numPages, n, topk);
      const sharedData = rng.uniform() < 0.1;
      const cache = { format: 'v4' as const, pageSize, numPages, numTokens: pageSize * numPages, bytes: numPages * v4PageBytes(pageSize), data: sharedData ? new Uint8Array(new SharedArrayBuffer(1)) : new Uint8Array(1) };
      const set: HostPagedSet = { cache, indices: s.indices, topk, topkLength: s.topkLength };
      for (const copies of models) {
        const want = oldPagedChoice(set, n, copies.whole(!sharedData), copies.compact);
        const label = `set ${c} (${numPages} pages of ${pageSize}, ${n} x ${topk})`;
        expectSamePlan(`${label}, fresh`, choosePagedRead(set, n, copies), want);
        expectSamePlan(`${label}, kept scratch`, choosePagedRead(set, n, copies, scratch), want);
        const read = pagedSetReads([set], n, copies)[0]!;
        expect(read.cacheBytes, `${label}: a layer check's bytes`).toBe(want ? compactGeometry('v4', want.rows.length).bytes : cache.bytes);
        tally[want ? 'compact' : 'whole']++;
      }
    }
    expect(tally.compact).toBeGreaterThan(1200);
    expect(tally.whole).toBeGreaterThan(1200);
  });

  test('planKvRows under a cost that grows with the runs (`worth`): a plan exactly where the cost of the rows and runs counted independently is within the limit, each question with the true count of rows and runs between the fewest and the most, a refusal leaving a kept scratch clean', () => {
    const scratch = new KvRowScratch();
    const tally = { byRuns: 0, refused: 0, planned: 0 };
    for (let c = 0; c < 400; c++) {
      const sQ = r16(), topk = rng.int(0, 400);
      const s = randomRows(rng, kvRowsFor(rng, sQ * topk), sQ, topk);
      // SPEC §4's validity, read independently: entry k of row i counts when k < clamp(length) and 0 <= id < sKV
      const read = new Set<number>();
      for (let i = 0; i < sQ; i++) {
        const limit = s.topkLength ? Math.min(Math.max(s.topkLength[i]!, 0), topk) : topk;
        for (let k = 0; k < limit; k++) {
          const id = s.indices[i * topk + k]!;
          if (id >= 0 && id < s.sKV) read.add(id);
        }
      }
      const sorted = [...read].sort((a, b) => a - b);
      const runs = sorted.filter((id, j) => j === 0 || sorted[j - 1] !== id - 1).length;
      // a cost of rows and runs, its limit about the true cost: below, at, and above it, and past what the fewest or the most runs would cost
      const perRow = rng.uniform() * 10, perRun = 0.5 + rng.uniform() * 10;
      const cost = (rows: number, r: number) => rows * perRow + r * perRun;
      const limit = cost(sorted.length, runs) + rng.pick([-1, 0, 1]) * rng.pick([0.25, 1, 3]) * perRun * Math.max(1, rng.int(0, sorted.length + 1) - runs);
      const asked: Array<[number, number]> = [];
      const got = planKvRows(s, Infinity, c % 2 ? scratch : undefined, (rows, r) => (asked.push([rows, r]), cost(rows, r) < limit));
      const worth = cost(sorted.length, runs) < limit;
      expect(asked.length, `set ${c}: questions`).toBeGreaterThan(0);
      for (const [rows, r] of asked) {
        expect(rows, `set ${c}: rows asked`).toBe(sorted.length);
        expect(r, `set ${c}: runs asked`).toBeGreaterThanOrEqual(Math.min(sorted.length, 1));
        expect(r, `set ${c}: runs asked`).toBeLessThanOrEqual(sorted.length);
      }
      if (asked.length === 3) {
        tally.byRuns++;
        expect(asked[2]![1], `set ${c}: the runs counted`).toBe(runs);
      }
      if (worth) {
        tally.planned++;
        expect(Array.from(got!.rows), `set ${c}: rows`).toEqual(sorted);
        expect(got!.runs, `set ${c}: runs`).toBe(runs);
      } else {
        tally.refused++;
        expect(got, `set ${c}: refused`).toBeNull();
      }
      // the next plan in the scratch is the fresh one
      const next = randomRows(rng, kvRowsFor(rng, 200), 2, 100);
      expectSamePlan(`set ${c}: the plan after`, planKvRows(next, Infinity, scratch), oldPlanKvRows(next));
    }
    // plans and refusals, and among them many decided by the runs counted
    expect(Math.min(tally.planned, tally.refused, tally.byRuns)).toBeGreaterThan(40);
  });
});

function r16(): number {
  return rng.uniform() < 0.1 ? rng.int(0, 3) : rng.int(1, 17);
}

// ---- the paged op's kept scratches ------------------------------------------------------------

function cacheView(pageSize: number, numPages: number, r: Rng) {
  const bytes = numPages * v4PageBytes(pageSize);
  const data = Uint8Array.from({ length: bytes }, () => r.int(0, 256));
  return { format: 'v4' as const, pageSize, numPages, numTokens: pageSize * numPages, bytes, data };
}

/** A set whose few random ids (some invalid) read a compact cache under the estimate. */
function fewIdsSet(r: Rng, cache: ReturnType<typeof cacheView>, n: number, topk: number): HostPagedSet {
  return { cache, indices: mixedIds(r, n * topk, cache.numTokens), topk, topkLength: r.uniform() < 0.5 ? Int32Array.from({ length: n }, () => r.int(0, topk + 1)) : null };
}

/** What a compact read of `set` must give: the fresh plan's ids and compact cache. */
function freshRead(set: HostPagedSet, n: number): { indices: Int32Array; data: Uint8Array } {
  const plan = planPagedRead(set, n)!;
  return { indices: remapIndices(set, n, plan), data: gatherCompact(set.cache, plan, new Uint8Array(plan.bytes)).slice() };
}

describe("the paged op's plans in kept scratches", () => {
  const wasmCopies: PagedCopies = { whole: (unshared) => (unshared ? 1 : 0) + 1, compact: 2 };
  const job = (main: HostPagedSet, extra: HostPagedSet | null, n: number): PagedSparseAttentionJob => ({ q: new Uint16Array(0), n, hQ: 1, main, extra, attnSink: null, smScale: 1 });

  test('reads planned and gathered out of order (calls in flight together, a check between plan and gather, plans never gathered) give the fresh plans', () => {
    const caches = [cacheView(64, 40, rng), cacheView(2, 900, rng), cacheView(256, 8, rng)];
    const pool = new PagedScratchPool();
    for (let round = 0; round < 40; round++) {
      const n = rng.int(1, 6);
      const pending: Array<{ reads: ReturnType<typeof planPagedReads>; want: Array<{ indices: Int32Array; data: Uint8Array }> }> = [];
      // up to four calls planned before any gathers, each with one or two sets read compact
      for (let call = 0, calls = rng.int(1, 5); call < calls; call++) {
        const main = fewIdsSet(rng, rng.pick(caches), n, rng.int(1, 40));
        const extra = rng.uniform() < 0.6 ? fewIdsSet(rng, rng.pick(caches), n, rng.int(1, 40)) : null;
        const want = [main, ...(extra ? [extra] : [])].map((s) => freshRead(s, n));
        const reads = planPagedReads(job(main, extra, n), wasmCopies, pool);
        expect(reads.setBytes.every((b) => !b.whole), `round ${round} call ${call}: compact`).toBe(true);
        // a layer's check of another set between this call's plan and its gather
        pagedSetReads([fewIdsSet(rng, rng.pick(caches), n, rng.int(1, 40))], n, wasmCopies);
        // a call refused after its plan: never gathered
        if (rng.uniform() < 0.3) planPagedReads(job(fewIdsSet(rng, rng.pick(caches), n, 20), null, n), wasmCopies, pool);
        pending.push({ reads, want });
      }
      // gathered in a random order, more plans made between
      while (pending.length > 0) {
        const { reads, want } = pending.splice(rng.int(0, pending.length), 1)[0]!;
        const got = reads.gather();
        const sets = [got.main, ...(got.extra ? [got.extra] : [])];
        sets.forEach((s, k) => {
          expect(Array.from(s.indices), `round ${round}: set ${k} ids`).toEqual(Array.from(want[k]!.indices));
          expect(Buffer.from(s.cache.data.buffer, s.cache.data.byteOffset, s.cache.data.byteLength).equals(Buffer.from(want[k]!.data)), `round ${round}: set ${k} cache`).toBe(true);
        });
        expect(reads.gather(), 'a second gather() gives the same sets').toBe(got);
        if (rng.uniform() < 0.5) planPagedReads(job(fewIdsSet(rng, rng.pick(caches), n, 30), null, n), wasmCopies, pool).gather();
      }
    }
    // the pool keeps no more than a call's two sets' worth
    expect(pool.idleCount).toBeLessThanOrEqual(2);
  });
});

const backends = ['wasm' as const, ...(nativeAddonBuilt() ? ['cpu' as const] : [])];

describe.each(backends)('pagedSparseAttention calls in flight together on %s', (backend) => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ backend, workers: 2 });
  }, 60_000);
  afterAll(async () => {
    await engine?.dispose();
  });

  async function cacheOf(pageSize: number, numPages: number): Promise<KvCache> {
    const cache = createKvCache('v4', { pageSize, numPages });
    const ids = Array.from({ length: pageSize * numPages }, (_, i) => i);
    await engine.quantizeKCache({ cache, tokenIds: ids, rows: tensor('bf16', [ids.length, 512], randomBf16Bits(rng, ids.length * 512, 1)) });
    return cache;
  }

  test('six calls with their own few ids of two caches, started together, give the bits each gives alone', async () => {
    const n = 4, hQ = 8;
    const kCache = await cacheOf(64, 48);
    const extraKCache = await cacheOf(2, 1200);
    const calls: PagedSparseAttentionArgs[] = Array.from({ length: 6 }, (_, c) => ({
      q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512, 1)),
      kCache,
      indices: tensor('int32', [n, 24], mixedIds(rng, n * 24, 64 * 48)),
      ...(c % 3 ? { extraKCache, extraIndices: tensor('int32', [n, 12], mixedIds(rng, n * 12, 2400)) } : {}),
      smScale: 0.05,
    }));
    const alone: Buffer[][] = [];
    for (const args of calls) alone.push(resultBits(await engine.pagedSparseAttention(args)));
    const together = (await Promise.all(calls.map((args) => engine.pagedSparseAttention(args)))).map(resultBits);
    together.forEach((b, c) => expect(b.every((x, k) => x.equals(alone[c]![k]!)), `call ${c}`).toBe(true));
  }, 120_000);
});
