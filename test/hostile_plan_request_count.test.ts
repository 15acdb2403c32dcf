/**
 * A chunk's sizes refused from their counts (SPEC §9: sizes checked before any work; nothing a caller
 * passes may crash the process or hang): createPlan and createShardedPlan refuse more than
 * MAX_CHUNK_REQUESTS requests from the requests' count, read once, before any request is read (a
 * Proxy claiming 2^31 − 1 requests was read and copied whole: a wasm run died of V8 heap exhaustion);
 * each compress ratio's page tables are counted before any entry is read, and the entries past the
 * pages the requests use are capped per chunk at MAX_UNUSED_PAGE_TABLE_ENTRIES (a table claiming
 * 2^26 pages of which 5 are used was read whole). Proxies of arrays claiming huge counts count the
 * reads they answer. At the caps the checks go on to the elements; a small valid chunk with tables
 * longer than needed plans as the §6 derivation (float64 reference) says, every entry read once.
 */
import { describe, expect, test } from 'vitest';
import { createPlan, createShardedPlan, tensor, type PlanChunk } from '../dist/index.js';
import * as planModule from '../dist/planner/plan_checks.js';
import { attentionSetReference, type PlanReferenceChunk } from '../dist/reference/index.js';
import { testRng } from './helpers/random.js';
import { refusalOf } from './helpers/errors.js';
import { claimingList, countedArray } from './helpers/claiming_list.js';

const rng = testRng('hostile_plan_request_count');

/** The caps as documented (written here, not read from the code under test). */
const MAX_REQUESTS = 2 ** 20;
const MAX_UNUSED = 2 ** 24;

const tooManyRequests = (n: number): [string, string, string] => ['TOO_LARGE', 'chunk.requests', `chunk.requests: expected at most ${MAX_REQUESTS} requests in a chunk (MAX_CHUNK_REQUESTS; split the chunk), got ${n}`];

const randomIds = (bound: number, n: number): number[] => Array.from({ length: n }, () => rng.int(0, bound));

test('the caps the library documents are the ones written here', () => {
  expect((planModule as Record<string, unknown>).MAX_CHUNK_REQUESTS).toBe(MAX_REQUESTS);
  expect((planModule as Record<string, unknown>).MAX_UNUSED_PAGE_TABLE_ENTRIES).toBe(MAX_UNUSED);
});

describe('createPlan: a chunk\'s requests refused from their count, before any request is read', () => {
  for (const claim of [MAX_REQUESTS + 1, 2 ** 24, 2 ** 31 - 1, 2 ** 31, 2 ** 40]) {
    test(`requests claiming ${claim}: TOO_LARGE naming chunk.requests, no request read`, () => {
      const { list, reads } = claimingList(claim, null);
      expect(refusalOf(() => createPlan({ requests: list as PlanChunk['requests'] }))).toEqual(tooManyRequests(claim));
      expect(reads).toEqual({ length: 1, elements: 0 });
    });
  }

  test('one past the cap, every request valid and empty (a plan was built from all of them): refused, none read', () => {
    const { list, reads } = claimingList(MAX_REQUESTS + 1, { seqLen: 0, extendLen: 0, swaTokenIds: [] });
    expect(refusalOf(() => createPlan({ requests: list as PlanChunk['requests'] }))).toEqual(tooManyRequests(MAX_REQUESTS + 1));
    expect(reads).toEqual({ length: 1, elements: 0 });
  });

  test('at the cap the count passes and the checks go on to the requests: the first, no request, is refused after one read', () => {
    const { list, reads } = claimingList(MAX_REQUESTS, null);
    expect(refusalOf(() => createPlan({ requests: list as PlanChunk['requests'] }))).toEqual([
      'INVALID_VALUE',
      'chunk.requests[0]',
      'chunk.requests[0]: expected a request {seqLen, extendLen, swaTokenIds, ...}, got null',
    ]);
    expect(reads).toEqual({ length: 1, elements: 1 });
  });

  test('createShardedPlan reads the chunk through the same count: refused, no request read', () => {
    for (const split of ['queries', 'heads'] as const) {
      const { list, reads } = claimingList(MAX_REQUESTS + 1, { seqLen: 0, extendLen: 0, swaTokenIds: [] });
      expect(refusalOf(() => createShardedPlan({ requests: list as PlanChunk['requests'] }, { shards: 2, split }))).toEqual(tooManyRequests(MAX_REQUESTS + 1));
      expect(reads).toEqual({ length: 1, elements: 0 });
    }
  });
});

describe('createPlan: page-table entries past the pages used, capped per chunk and ratio from the tables\' counts', () => {
  // seqLen 300, extendLen 2: floor(300 / 4) = 75 c4 entries, 5 pages of 16; floor(300 / 128) = 2 c128 entries, 1 page of 2
  const swaTokenIds = randomIds(1000, 129);
  const request = (tables: { c4PageTable?: unknown; c128PageTable?: unknown }): object => ({ seqLen: 300, extendLen: 2, swaTokenIds, ...tables });
  const pastCap = (argument: string, past: number, count: number): [string, string, string] => [
    'TOO_LARGE',
    argument,
    `${argument}: expected page tables holding at most ${MAX_UNUSED} entries past the pages the chunk's requests use (MAX_UNUSED_PAGE_TABLE_ENTRIES), got ${past} past them up to this table of ${count}`,
  ];

  for (const claim of [5 + MAX_UNUSED + 1, 2 ** 26]) {
    test(`a c4 table claiming ${claim} pages, 5 used: TOO_LARGE naming it, no page read`, () => {
      const { list, reads } = claimingList(claim, -1);
      const chunk = { requests: [request({ c4PageTable: list })], c4PageSize: 16 } as PlanChunk;
      expect(refusalOf(() => createPlan(chunk))).toEqual(pastCap('chunk.requests[0].c4PageTable', claim - 5, claim));
      expect(reads).toEqual({ length: 1, elements: 0 });
    });
  }

  test('at the cap (5 used + 2^24 past them) the count passes and the entries are read: the first, no page id, is refused after one read', () => {
    const { list, reads } = claimingList(5 + MAX_UNUSED, -1);
    const chunk = { requests: [request({ c4PageTable: list })], c4PageSize: 16 } as PlanChunk;
    expect(refusalOf(() => createPlan(chunk))).toEqual(['OUT_OF_RANGE', 'chunk.requests[0].c4PageTable[0]', 'chunk.requests[0].c4PageTable[0]: expected a non-negative integer id, got number -1']);
    expect(reads).toEqual({ length: 1, elements: 1 });
  });

  test('the cap is over the chunk: two requests without queries (no page used), 2^23 + 1 entries each; the second crosses it, neither table read', () => {
    const half = MAX_UNUSED / 2 + 1;
    const a = claimingList(half, -1), b = claimingList(half, -1);
    const empty = (c128PageTable: unknown): object => ({ seqLen: 300, extendLen: 0, swaTokenIds: [], c128PageTable });
    const chunk = { requests: [empty(a.list), empty(b.list)], c128PageSize: 2 } as PlanChunk;
    expect(refusalOf(() => createPlan(chunk))).toEqual(pastCap('chunk.requests[1].c128PageTable', 2 * half, half));
    expect(a.reads).toEqual({ length: 1, elements: 0 });
    expect(b.reads).toEqual({ length: 1, elements: 0 });
  });

  test('every table\'s count before any entry (the order this change makes): a later request\'s short table is refused before an earlier one\'s bad page', () => {
    const first = countedArray([3, 1, 4, 1, 5, -9]);
    const chunk = { requests: [request({ c4PageTable: first.list }), request({ c4PageTable: [0, 1, 2, 3] })], c4PageSize: 16 } as PlanChunk;
    expect(refusalOf(() => createPlan(chunk))).toEqual([
      'INVALID_SHAPE',
      'chunk.requests[1].c4PageTable',
      'chunk.requests[1].c4PageTable: expected at least 5 pages for floor(seqLen 300 / 4) = 75 entries of page size 16, got 4',
    ]);
    expect(first.reads.elements).toBe(0);
  });

  test('entries past the pages used are still read and checked, once each (today\'s refusal of a bad one kept)', () => {
    const table = countedArray([3, 1, 4, 1, 5, 9, -2, 6]);
    const chunk = { requests: [request({ c4PageTable: table.list })], c4PageSize: 16 } as PlanChunk;
    expect(refusalOf(() => createPlan(chunk))).toEqual(['OUT_OF_RANGE', 'chunk.requests[0].c4PageTable[6]', 'chunk.requests[0].c4PageTable[6]: expected a non-negative integer id, got number -2']);
    expect(table.reads.elements).toBe(7);
  });

  test('a small random chunk with tables longer than needed: its gathers and rows as the §6 derivation, each table entry read once', () => {
    for (let trial = 0; trial < 6; trial++) {
      const W = rng.pick([4, 16, 128]);
      const c4PageSize = rng.pick([1, 3, 64]);
      const c128PageSize = rng.pick([1, 2, 64]);
      const refChunk: PlanReferenceChunk = { requests: [], c4PageSize, c128PageSize, window: W };
      const chunk: PlanChunk = { requests: [], c4PageSize, c128PageSize };
      const counted: { reads: { elements: number }; length: number }[] = [];
      let nextId = rng.int(0, 50);
      for (let r = 0, nReq = rng.int(1, 6); r < nReq; r++) {
        const seqLen = rng.int(0, 700);
        const extendLen = rng.uniform() < 0.25 ? 0 : rng.int(0, Math.min(seqLen, 90) + 1);
        const byPos = Array.from({ length: seqLen }, () => (nextId += rng.int(1, 3)));
        // pages past the ones needed: up to 40 extra, of any id
        const table = (ratio: number, pc: number): number[] => randomIds(1000, Math.ceil(Math.floor(seqLen / ratio) / pc) + rng.int(0, 41));
        const c4 = table(4, c4PageSize), c128 = table(128, c128PageSize);
        const c4Counted = countedArray(c4), c128Counted = countedArray(c128);
        counted.push({ reads: c4Counted.reads, length: c4.length }, { reads: c128Counted.reads, length: c128.length });
        const g = extendLen > 0 ? Math.min(seqLen, extendLen + W - 1) : 0;
        refChunk.requests.push({ seqLen, extendLen, swaTokenIdByPosition: byPos, c4PageTable: c4, c128PageTable: c128 });
        (chunk.requests as object[]).push({ seqLen, extendLen, swaTokenIds: byPos.slice(seqLen - g), c4PageTable: c4Counted.list, c128PageTable: c128Counted.list });
      }
      const plan = createPlan(chunk, { window: W });
      for (const c of counted) expect(c.reads.elements).toBe(c.length);
      const nq = plan.numQueries;
      const topk = 24;
      const topkData = new Int32Array(nq * topk).map(() => (rng.uniform() < 0.2 ? -1 : rng.int(0, 200)));
      const rowsOf = { 0: plan.combinedRows(0), 128: plan.combinedRows(128), 4: plan.combineC4(tensor('int32', [nq, topk], topkData)) } as const;
      const swa = Array.from(plan.swaTokenIds.data, Number);
      for (const ratio of [0, 4, 128] as const) {
        const rows = rowsOf[ratio];
        const compressedRows = plan.layout(ratio).compressedRows;
        const comp = ratio === 0 ? [] : Array.from(plan.compressedTokenIds(ratio).data, Number);
        for (let q = 0; q < nq; q++) {
          const ref = attentionSetReference(refChunk, ratio, q, topkData.subarray(q * topk, (q + 1) * topk));
          const row = Array.from(rows.indices.data.subarray(q * rows.width, q * rows.width + rows.lengths.data[q]!));
          const nComp = ref.compressed.length;
          // compressed entries first, then the window, mapped back to cache token ids through the plan's gathers
          expect(row.slice(0, nComp).map((w) => (w < compressedRows ? comp[w] : -1))).toEqual(ref.compressed);
          expect(row.slice(nComp).map((w) => (w >= compressedRows ? swa[w - compressedRows] : -1))).toEqual(ref.window);
        }
      }
    }
  });
});
