/**
 * The planner (SPEC §6): hand-worked chunks with exact expected rows, run on the one
 * implementation of the index math (the C++ core, in WASM); the attention sets of random chunks
 * against the float64 reference's §6 derivation; the router; bad input.
 */
import { describe, expect, test } from 'vitest';
import { createPlan, routePrefill, swaTokenIdsFromTable, DEFAULT_SPARSE_PREFILL_THRESHOLD, SPARSE_PREFILL_THRESHOLDS, type CombinedRows, type PlanChunk, type PlanOptions } from '../dist/planner/index.js';
import { attentionSetReference, type PlanReferenceChunk } from '../dist/reference/index.js';
import { forcedRoute } from '../dist/planner/router.js';
import { tensor } from '../dist/tensor.js';
import type { KvCache } from '../dist/types.js';
import { testRng } from './helpers/random.js';
import { refusalOf } from './helpers/errors.js';

const rng = testRng('planner.test');

const range = (a: number, b: number): number[] => Array.from({ length: b - a }, (_, i) => a + i);

/** rows as arrays of their real entries, and the padding checked to be exactly −1 up to width. */
function realRows(r: CombinedRows | { indices: { data: Int32Array; shape: readonly number[] }; lengths: { data: Int32Array } }): number[][] {
  const [n, width] = r.indices.shape as [number, number];
  const out: number[][] = [];
  for (let q = 0; q < n; q++) {
    const row = Array.from(r.indices.data.subarray(q * width, (q + 1) * width));
    const len = r.lengths.data[q]!;
    expect(row.slice(len).every((v) => v === -1), `row ${q} padding`).toBe(true);
    out.push(row.slice(0, len));
  }
  return out;
}

function expectError(f: () => unknown, code: string, pattern?: RegExp): void {
  const [errCode, , message] = refusalOf(f);
  expect(errCode).toBe(code);
  if (pattern) expect(message).toMatch(pattern);
}

function v4Cache(pageSize: number, numPages: number): KvCache {
  const pageBytes = Math.ceil((pageSize * 584) / 576) * 576;
  return { format: 'v4', pageSize, numPages, data: new Uint8Array(pageBytes * numPages) };
}

describe('hand-worked plans', () => {
  const small: PlanOptions = { window: 4, align: 8 };

  test('ratio 0: several requests, mid-sequence, before the window fills, an empty request', () => {
    const plan = createPlan(
      {
        requests: [
          { seqLen: 3, extendLen: 3, swaTokenIds: [100, 101, 102] }, // fresh: positions 0..2
          { seqLen: 10, extendLen: 2, swaTokenIds: [205, 206, 207, 208, 209] }, // g = 2 + 4 − 1 = 5: positions 5..9
          { seqLen: 7, extendLen: 0, swaTokenIds: [] }, // no queries, nothing gathered
          { seqLen: 5, extendLen: 5, swaTokenIds: [300, 301, 302, 303, 304] },
        ],
      },
      small,
    );
    expect(plan.core).toBe('wasm');
    expect(plan.numQueries).toBe(10);
    expect(plan.ratios).toEqual([0]);
    expect(plan.layout(0)).toEqual({ ratio: 0, compressedRows: 0, swaRows: 13, rows: 13, bytes: 13 * 1024, maxVisible: 0 });
    expect(plan.workspaceBytes).toBe(13 * 1024);
    expect(Array.from(plan.swaTokenIds.data, Number)).toEqual([100, 101, 102, 205, 206, 207, 208, 209, 300, 301, 302, 303, 304]);
    expect(plan.requests.map((r) => [r.queryOffset, r.swaOffset, r.swaRows, r.swaStartPos])).toEqual([
      [0, 0, 3, 0],
      [3, 3, 5, 5],
      [5, 8, 0, 7],
      [5, 8, 5, 0],
    ]);
    const rows = plan.combinedRows(0);
    expect(rows.width).toBe(8);
    expect(rows.indices.shape).toEqual([10, 8]);
    expect(realRows(rows)).toEqual([
      [0], [0, 1], [0, 1, 2], // request 0, positions 0..2
      [3, 4, 5, 6], [4, 5, 6, 7], // request 1, positions 8, 9: windows 5..8, 6..9
      [8], [8, 9], [8, 9, 10], [8, 9, 10, 11], [9, 10, 11, 12], // request 3, positions 0..4
    ]);
    const paged = plan.pagedForm(rows);
    expect(paged.extra).toBeUndefined();
    expect(realRows({ indices: paged.main, lengths: paged.mainLengths })).toEqual([
      [100], [100, 101], [100, 101, 102],
      [205, 206, 207, 208], [206, 207, 208, 209],
      [300], [300, 301], [300, 301, 302], [300, 301, 302, 303], [301, 302, 303, 304],
    ]);
    expect(plan.stats.c0Builds).toBe(1);
    plan.combinedRows(0);
    plan.pagedForm(rows);
    expect(plan.stats).toMatchObject({ c0Builds: 1, pagedMainBuilds: 1, pagedExtraBuilds: 0 });
  });

  test('ratio 128: every visible entry, seqLen < ratio, a query that just crossed an entry boundary', () => {
    const plan = createPlan(
      {
        c128PageSize: 2,
        requests: [
          // positions 297..299 see floor(298/128) = 2 entries; gather 294..299
          { seqLen: 300, extendLen: 3, swaTokenIds: range(294, 300), c128PageTable: [7] },
          // positions 126..129: 126 sees 0 entries, 127..129 see 1; gather 123..129; spare page ignored
          { seqLen: 130, extendLen: 4, swaTokenIds: range(623, 630), c128PageTable: [3, 9] },
          // seqLen < ratio: no compressed entry
          { seqLen: 100, extendLen: 2, swaTokenIds: range(1095, 1100) },
        ],
      },
      small,
    );
    expect(plan.ratios).toEqual([0, 128]);
    expect(Array.from(plan.compressedTokenIds(128).data, Number)).toEqual([14, 15, 6]); // 7·2+0, 7·2+1, 3·2+0
    expect(plan.layout(128)).toEqual({ ratio: 128, compressedRows: 3, swaRows: 18, rows: 21, bytes: 21 * 1024, maxVisible: 2 });
    expect(plan.requests.map((r) => [r.c128Offset, r.c128Rows])).toEqual([[0, 2], [2, 1], [3, 0]]);
    const rows = plan.combinedRows(128);
    expect(rows.width).toBe(8); // roundUp(2 + 4, 8)
    expect(realRows(rows)).toEqual([
      [0, 1, 3, 4, 5, 6], [0, 1, 4, 5, 6, 7], [0, 1, 5, 6, 7, 8],
      [9, 10, 11, 12], [2, 10, 11, 12, 13], [2, 11, 12, 13, 14], [2, 12, 13, 14, 15],
      [16, 17, 18, 19], [17, 18, 19, 20],
    ]);
    const paged = plan.pagedForm(rows);
    expect(paged.main.shape).toEqual([9, 8]);
    expect(realRows({ indices: paged.main, lengths: paged.mainLengths })).toEqual([
      range(294, 298), range(295, 299), range(296, 300),
      range(623, 627), range(624, 628), range(625, 629), range(626, 630),
      range(1095, 1099), range(1096, 1100),
    ]);
    expect(paged.extra!.shape).toEqual([9, 8]);
    expect(realRows({ indices: paged.extra!, lengths: paged.extraLengths! })).toEqual([
      [14, 15], [14, 15], [14, 15], [], [6], [6], [6], [], [],
    ]);
  });

  test('ratio 4: top-k combine with −1 padding, duplicates, causality violations dropped and counted', () => {
    const plan = createPlan(
      {
        c4PageSize: 4,
        requests: [
          { seqLen: 10, extendLen: 3, swaTokenIds: range(44, 50), c4PageTable: [5] }, // positions 7..9, 2 entries visible
          { seqLen: 6, extendLen: 6, swaTokenIds: range(60, 66), c4PageTable: [2] }, // positions 0..5; 0..2 see none, 3..5 see 1
          { seqLen: 3, extendLen: 1, swaTokenIds: [80, 81, 82] }, // seqLen < ratio
        ],
      },
      small,
    );
    expect(Array.from(plan.compressedTokenIds(4).data, Number)).toEqual([20, 21, 8]);
    expect(plan.layout(4)).toMatchObject({ compressedRows: 3, swaRows: 15, rows: 18 });
    const topk = tensor('int32', [10, 3], new Int32Array([
      1, 0, -1, //  pos 7: both visible, indexer order kept
      2, 1, -1, //  pos 8: entry 2 not visible (floor(9/4) = 2) → dropped
      -1, -1, -1, // pos 9: nothing chosen
      0, -1, -1, //  request 1 pos 0: nothing visible yet → dropped
      -1, -1, -1,
      5, -1, -1, //  pos 2: far beyond → dropped
      0, 0, -1, //   pos 3: duplicates are kept
      0, 1, -1, //   pos 4: entry 1 not visible → dropped
      -1, 0, -1,
      -1, -1, -1, // request 2
    ]));
    const rows = plan.combineC4(topk);
    expect(rows.width).toBe(8); // roundUp(3 + 4, 8)
    expect(rows.topk).toBe(3);
    expect(realRows(rows)).toEqual([
      [1, 0, 3, 4, 5, 6], [1, 4, 5, 6, 7], [5, 6, 7, 8],
      [9], [9, 10], [9, 10, 11], [2, 2, 9, 10, 11, 12], [2, 10, 11, 12, 13], [2, 11, 12, 13, 14],
      [15, 16, 17],
    ]);
    expect(rows.dropped).toBe(4);
    expect(Array.from(rows.droppedPerQuery!)).toEqual([0, 1, 0, 1, 0, 1, 0, 1, 0, 0]);
    expect(plan.stats).toMatchObject({ c4Combines: 1, c4Dropped: 4 });
    const paged = plan.pagedForm(rows);
    expect(realRows({ indices: paged.main, lengths: paged.mainLengths })).toEqual([
      range(44, 48), range(45, 49), range(46, 50),
      [60], [60, 61], [60, 61, 62], range(60, 64), range(61, 65), range(62, 66),
      [80, 81, 82],
    ]);
    expect(paged.extra!.shape).toEqual([10, 8]); // roundUp(topk, 8)
    expect(realRows({ indices: paged.extra!, lengths: paged.extraLengths! })).toEqual([
      [21, 20], [21], [], [], [], [], [8, 8], [8], [8], [],
    ]);
    // a second layer combines again; the dense rows were never needed
    plan.combineC4(topk);
    expect(plan.stats).toMatchObject({ c4Combines: 2, c4Dropped: 8, c0Builds: 0, c128Builds: 0 });
  });

  test('default window 128 and alignment 128: padding to 128 and a c128 row of 256', () => {
    const plan = createPlan(
      {
        c128PageSize: 64,
        c4PageSize: 64,
        requests: [
          { seqLen: 200, extendLen: 2, swaTokenIds: range(1071, 1200), c128PageTable: [5], c4PageTable: [1] }, // g = 129: positions 71..199
          { seqLen: 3, extendLen: 3, swaTokenIds: [0, 1, 2] },
        ],
      },
      { core: 'wasm' },
    );
    expect(plan.core).toBe('wasm');
    const c0 = plan.combinedRows(0);
    expect(c0.width).toBe(128);
    expect(realRows(c0)).toEqual([range(0, 128), range(1, 129), [129], [129, 130], [129, 130, 131]]);
    const c128 = plan.combinedRows(128);
    expect(c128.width).toBe(256); // roundUp(1 + 128, 128)
    expect(Array.from(plan.compressedTokenIds(128).data, Number)).toEqual([320]);
    expect(realRows(c128)).toEqual([[0, ...range(1, 129)], [0, ...range(2, 130)], [130], [130, 131], [130, 131, 132]]);
    expect(plan.layout(4)).toMatchObject({ compressedRows: 50, swaRows: 132, rows: 182 });
    const c4 = plan.combineC4(tensor('int32', [5, 512], new Int32Array(5 * 512).fill(-1)));
    expect(c4.width).toBe(640); // roundUp(512 + 128, 128)
    expect(realRows(c4)).toEqual([range(50, 178), range(51, 179), [179], [179, 180], [179, 180, 181]]);
  });

  test('a chunk with no queries at all', () => {
    const plan = createPlan({ c4PageSize: 2, requests: [{ seqLen: 9, extendLen: 0, swaTokenIds: [] }] }, small);
    expect(plan.numQueries).toBe(0);
    expect(plan.layout(4)).toMatchObject({ rows: 0, bytes: 0 });
    expect(plan.combinedRows(0).indices.shape).toEqual([0, 8]);
    expect(plan.combineC4(tensor('int32', [0, 4], new Int32Array(0))).indices.shape).toEqual([0, 8]);
  });
});

describe('attention sets of random chunks match the §6 derivation', () => {
  test('ratios 0, 4, 128', () => {
    for (let trial = 0; trial < 12; trial++) {
      const W = rng.pick([4, 16, 128]);
      const align = rng.pick([8, 64, 128]);
      const c4PageSize = rng.pick([1, 3, 64]);
      const c128PageSize = rng.pick([1, 2, 64]);
      const nReq = rng.int(1, 5);
      const refChunk: PlanReferenceChunk = { requests: [], c4PageSize, c128PageSize, window: W };
      const chunk: PlanChunk = { requests: [], c4PageSize, c128PageSize };
      let nextId = rng.int(0, 50);
      for (let r = 0; r < nReq; r++) {
        const seqLen = rng.int(0, 700);
        const extendLen = rng.uniform() < 0.15 ? 0 : rng.int(0, Math.min(seqLen, 90) + 1);
        const byPos = range(0, seqLen).map(() => (nextId += rng.int(1, 3)));
        const page = (): number => rng.int(0, 1000);
        const c4PageTable = range(0, Math.ceil(Math.floor(seqLen / 4) / c4PageSize) + rng.int(0, 2)).map(page);
        const c128PageTable = range(0, Math.ceil(Math.floor(seqLen / 128) / c128PageSize) + rng.int(0, 2)).map(page);
        const g = extendLen > 0 ? Math.min(seqLen, extendLen + W - 1) : 0;
        refChunk.requests.push({ seqLen, extendLen, swaTokenIdByPosition: byPos, c4PageTable, c128PageTable });
        (chunk.requests as object[]).push({ seqLen, extendLen, swaTokenIds: byPos.slice(seqLen - g), c4PageTable, c128PageTable });
      }
      const plan = createPlan(chunk, { window: W, align });
      const nq = plan.numQueries;
      const topk = rng.pick([0, 5, 40]);
      const topkData = new Int32Array(nq * topk).map(() => (rng.uniform() < 0.2 ? -1 : rng.int(0, 200)));
      const sets = {
        0: plan.combinedRows(0),
        128: plan.combinedRows(128),
        4: plan.combineC4(tensor('int32', [nq, topk], topkData)),
      } as const;
      let dropped = 0;
      for (const ratio of [0, 4, 128] as const) {
        const rows = sets[ratio];
        const layout = plan.layout(ratio);
        expect(rows.width % align).toBe(0);
        const comp = ratio === 0 ? [] : Array.from(plan.compressedTokenIds(ratio).data, Number);
        const swa = Array.from(plan.swaTokenIds.data, Number);
        const paged = plan.pagedForm(rows);
        for (let q = 0; q < nq; q++) {
          const ref = attentionSetReference(refChunk, ratio, q, topkData.subarray(q * topk, (q + 1) * topk));
          if (ratio === 4) dropped += ref.dropped;
          const len = rows.lengths.data[q]!;
          const row = Array.from(rows.indices.data.subarray(q * rows.width, q * rows.width + len));
          // compressed entries first, then the window, both in order, mapped back through the gathers
          const nComp = ref.compressed.length;
          expect(row.slice(0, nComp).map((w) => (w < layout.compressedRows ? comp[w] : -1))).toEqual(ref.compressed);
          expect(row.slice(nComp).map((w) => (w >= layout.compressedRows ? swa[w - layout.compressedRows] : -1))).toEqual(ref.window);
          const mw = paged.main.shape[1]!;
          expect(Array.from(paged.main.data.subarray(q * mw, q * mw + paged.mainLengths.data[q]!))).toEqual(ref.window);
          if (paged.extra) {
            const ew = paged.extra.shape[1]!;
            expect(Array.from(paged.extra.data.subarray(q * ew, q * ew + paged.extraLengths!.data[q]!))).toEqual(ref.compressed);
          } else {
            expect(ref.compressed).toEqual([]);
          }
        }
      }
      expect(sets[4].dropped).toBe(dropped);
      // the workspace holds each request's own visible count, not the batch maximum
      const own = refChunk.requests.reduce((a, r) => a + (r.extendLen > 0 ? Math.floor(r.seqLen / 128) : 0), 0);
      expect(plan.layout(128).compressedRows).toBe(own);
    }
  });
});

describe('swaTokenIdsFromTable', () => {
  test('maps the needed positions through reqToToken and fullToSwa', () => {
    // positions 0..9 live at full ids 20..29; full id f maps to SWA id 100 + f, evicted ones to −1
    const reqToToken = range(20, 30);
    const fullToSwa = range(0, 30).map((f) => (f < 24 ? -1 : 100 + f));
    // seqLen 10, extendLen 2, window 4: g = 5, positions 5..9
    expect(swaTokenIdsFromTable(reqToToken, fullToSwa, 10, 2, 4)).toEqual([125, 126, 127, 128, 129]);
    expect(swaTokenIdsFromTable(reqToToken, fullToSwa, 10, 0, 4)).toEqual([]);
    // window 8: g = 9 reaches position 1 → full id 21, evicted
    expectError(() => swaTokenIdsFromTable(reqToToken, fullToSwa, 10, 2, 8), 'OUT_OF_RANGE', /fullToSwa\[21\]/);
    expectError(() => swaTokenIdsFromTable(reqToToken, fullToSwa, 11, 2, 4), 'INVALID_SHAPE', /reqToToken/);
    expectError(() => swaTokenIdsFromTable([25, 26, 99], fullToSwa, 3, 1, 4), 'OUT_OF_RANGE', /reqToToken\[2\]/);
  });
});

describe('router', () => {
  test('forcedRoute is the decision routePrefill makes for a path forced without a threshold', () => {
    const env = { SPARSE_MLA_PREFILL: 'paged' }; // an option's path wins over the environment
    for (const path of ['sparse', 'paged'] as const)
      for (const backend of [undefined, 'cuda', 'wasm'] as const)
        for (const compressRatio of [0, 4, 128] as const) expect(forcedRoute(path, undefined)).toEqual(routePrefill(5, { path, backend, compressRatio, env }));
    expect(forcedRoute('auto', undefined)).toBeUndefined();
    expect(forcedRoute(undefined, undefined)).toBeUndefined();
    expect(forcedRoute('sparse', 10)).toBeUndefined();
  });

  test('threshold, forced by option, forced by environment', () => {
    const env = {};
    expect(routePrefill(DEFAULT_SPARSE_PREFILL_THRESHOLD + 1, { env })).toEqual({
      path: 'sparse',
      reason: `${DEFAULT_SPARSE_PREFILL_THRESHOLD + 1} queries > threshold ${DEFAULT_SPARSE_PREFILL_THRESHOLD}`,
    });
    expect(routePrefill(DEFAULT_SPARSE_PREFILL_THRESHOLD, { env }).path).toBe('paged');
    expect(routePrefill(10, { threshold: 9, env }).path).toBe('sparse');
    const w = SPARSE_PREFILL_THRESHOLDS.wasm[4];
    expect(routePrefill(w + 1, { backend: 'wasm', env })).toEqual({ path: 'sparse', reason: `${w + 1} queries > threshold ${w} (wasm default)` });
    // per compress ratio: the cuda table's c4 and c0 entries differ
    const cuda = SPARSE_PREFILL_THRESHOLDS.cuda;
    expect(cuda[4]).toBeLessThan(cuda[0]);
    expect(routePrefill(cuda[4] + 1, { backend: 'cuda', compressRatio: 4, env }).path).toBe('sparse');
    expect(routePrefill(cuda[4] + 1, { backend: 'cuda', compressRatio: 0, env })).toEqual({ path: 'paged', reason: `${cuda[4] + 1} queries ≤ threshold ${cuda[0]} (cuda default)` });
    expect(routePrefill(w, { backend: 'wasm', env }).path).toBe('paged');
    expect(routePrefill(w + 1, { backend: 'wasm', threshold: w + 1, env }).reason).toBe(`${w + 1} queries ≤ threshold ${w + 1}`);
    expect(routePrefill(10, { threshold: 10, env }).path).toBe('paged');
    expect(routePrefill(1, { env: { SPARSE_MLA_PREFILL: 'sparse' } })).toEqual({ path: 'sparse', reason: 'forced by SPARSE_MLA_PREFILL=sparse' });
    expect(routePrefill(1e6, { env: { SPARSE_MLA_PREFILL: 'paged' } }).path).toBe('paged');
    expect(routePrefill(1e6, { env: { SPARSE_MLA_PREFILL: 'auto' } }).path).toBe('sparse');
    // an explicit option wins over the environment
    expect(routePrefill(1, { path: 'paged', env: { SPARSE_MLA_PREFILL: 'sparse' } })).toEqual({ path: 'paged', reason: "forced by option path='paged'" });
    expectError(() => routePrefill(1, { env: { SPARSE_MLA_PREFILL: 'fast' } }), 'INVALID_VALUE', /SPARSE_MLA_PREFILL/);
    expectError(() => routePrefill(1, { path: 'fast' as never }), 'INVALID_VALUE');
    expectError(() => routePrefill(1, { threshold: Number.NaN }), 'INVALID_VALUE');
  });
});

describe('bad input is refused before any work', () => {
  const base = (): PlanChunk => ({
    c4PageSize: 2,
    c128PageSize: 1,
    requests: [
      { seqLen: 9, extendLen: 2, swaTokenIds: range(0, 5), c4PageTable: [0], c128PageTable: [] },
      { seqLen: 300, extendLen: 1, swaTokenIds: range(10, 14), c4PageTable: range(0, 38), c128PageTable: [4, 1] },
    ],
  });
  const opts: PlanOptions = { window: 4, align: 8 };

  test('the base chunk is fine', () => {
    expect(createPlan(base(), opts).numQueries).toBe(3);
  });
  test('mismatched lengths', () => {
    const c = base();
    (c.requests[0] as { swaTokenIds: number[] }).swaTokenIds = range(0, 4);
    expectError(() => createPlan(c, opts), 'INVALID_SHAPE', /requests\[0\]\.swaTokenIds: expected 5 ids/);
    const d = base();
    (d.requests[1] as { extendLen: number }).extendLen = 301;
    expectError(() => createPlan(d, opts), 'INVALID_VALUE', /requests\[1\]\.extendLen/);
    const plan = createPlan(base(), opts);
    expectError(() => plan.combineC4(tensor('int32', [2, 4], new Int32Array(8))), 'INVALID_SHAPE', /topkIndices/);
  });
  test('page table too short for seqLen', () => {
    const c = base();
    (c.requests[1] as { c128PageTable: number[] }).c128PageTable = [4];
    expectError(() => createPlan(c, opts), 'INVALID_SHAPE', /requests\[1\]\.c128PageTable: expected at least 2 pages/);
    const d = base();
    delete (d.requests[0] as { c4PageTable?: number[] }).c4PageTable;
    expectError(() => createPlan(d, opts), 'INVALID_SHAPE', /requests\[0\]\.c4PageTable/);
  });
  test('ids outside the caches', () => {
    const c = base();
    (c.requests[0] as { swaTokenIds: number[] }).swaTokenIds = [0, 1, -2, 3, 4];
    expectError(() => createPlan(c, opts), 'OUT_OF_RANGE', /swaTokenIds\[2\]/);
    const caches = { swa: v4Cache(2, 7), c4: v4Cache(2, 38), c128: v4Cache(1, 5) }; // 14 SWA tokens
    expect(createPlan(base(), { ...opts, caches }).numQueries).toBe(3);
    expectError(() => createPlan(base(), { ...opts, caches: { ...caches, swa: v4Cache(2, 6) } }), 'OUT_OF_RANGE', /requests\[1\]\.swaTokenIds\[2\]/);
    expectError(() => createPlan(base(), { ...opts, caches: { ...caches, c4: v4Cache(2, 37) } }), 'OUT_OF_RANGE', /c4PageTable\[37\]/);
    expectError(() => createPlan(base(), { ...opts, caches: { ...caches, c128: v4Cache(1, 4) } }), 'OUT_OF_RANGE', /c128PageTable\[0\]/);
    expectError(() => createPlan(base(), { ...opts, caches: { ...caches, c128: v4Cache(2, 5) } }), 'INVALID_VALUE', /pageSize/);
    const plan = createPlan(base(), opts);
    expectError(() => plan.checkCaches({ swa: v4Cache(2, 6) }, 0), 'OUT_OF_RANGE', /caches\.swa/);
    expectError(() => plan.checkCaches({ swa: v4Cache(2, 7), c128: v4Cache(1, 4) }, 128), 'OUT_OF_RANGE', /caches\.c128/);
    expectError(() => plan.checkCaches({ swa: v4Cache(2, 7) }, 4), 'INVALID_VALUE', /caches\.c4/);
  });
  test('chunk totals past int32 are TOO_LARGE, each request on its own being fine', () => {
    const big = (extendLen: number, seqLen = extendLen) => ({ seqLen, extendLen, swaTokenIds: [] as number[] });
    // two requests of 2^30 queries: 2^31 queries in the chunk
    expectError(() => createPlan({ requests: [big(2 ** 30), big(2 ** 30)] }, opts), 'TOO_LARGE', /at most 2147483647 queries in a chunk .*got 2147483648/);
    // SWA rows 2^30 + 127 + 2^30 − 1 + 127 > 2^31 − 1 with fewer than 2^31 queries
    expectError(() => createPlan({ requests: [big(2 ** 30, 2 ** 31 - 1), big(2 ** 30 - 1, 2 ** 31 - 1)] }, opts), 'TOO_LARGE', /workspace rows .*SWA rows for ratio 0/);
    // c4: 300 requests each seeing (2^31 − 1) / 4 compressed entries
    const many = Array.from({ length: 300 }, () => big(1, 2 ** 31 - 1));
    expectError(() => createPlan({ requests: many, c4PageSize: 1 }, opts), 'TOO_LARGE', /workspace rows .*compressed .*for ratio 4/);
  });
  test('over-budget workspace: TOO_LARGE stating the size', () => {
    // c4: 2 + 75 compressed + 5 + 4 SWA rows = 86 rows of 1 KiB; c128 needs 2 + 9 = 11
    expect(createPlan(base(), { ...opts, workspaceBudgetBytes: 86 * 1024 }).workspaceBytes).toBe(86 * 1024);
    expectError(() => createPlan(base(), { ...opts, workspaceBudgetBytes: 86 * 1024 - 1 }), 'TOO_LARGE', /needs 88064 bytes .*c4 layers/);
  });
  test('pagedForm reads only rows this plan made, as it made them; a DataView is no id list', () => {
    const plan = createPlan(base(), opts);
    const rows = plan.combinedRows(0);
    expect(Object.isFrozen(rows)).toBe(true);
    expect(Object.isFrozen(plan.combineC4(tensor('int32', [3, 4], new Int32Array(12).fill(-1))))).toBe(true);
    // a copy, a forged width (the planner would read past the copied rows), another plan's rows, not an object
    expectError(() => plan.pagedForm({ ...rows }), 'INVALID_VALUE', /rows: .*combined rows made by this plan/);
    expectError(() => plan.pagedForm({ ...rows, width: rows.width * 4 }), 'INVALID_VALUE', /rows/);
    expectError(() => plan.pagedForm(createPlan(base(), opts).combinedRows(0)), 'INVALID_VALUE', /rows/);
    expectError(() => plan.pagedForm(null as never), 'INVALID_VALUE', /rows/);
    // the frozen rows' tensors with arrays of another size swapped in
    const swapped = plan.combinedRows(128);
    (swapped.indices as { data: Int32Array }).data = new Int32Array(1);
    expectError(() => plan.pagedForm(swapped), 'INVALID_SHAPE', /rows: .*int32 indices/);
    expect(plan.stats.pagedMainBuilds).toBe(0);
    expect(plan.pagedForm(rows).main.shape[0]).toBe(3);
    const c = base();
    (c.requests[0] as { swaTokenIds: unknown }).swaTokenIds = new DataView(new ArrayBuffer(40));
    expectError(() => createPlan(c, opts), 'INVALID_VALUE', /requests\[0\]\.swaTokenIds/);
  });
  test('a ratio the plan does not serve, bad options', () => {
    const plan = createPlan({ requests: [{ seqLen: 2, extendLen: 1, swaTokenIds: [0, 1] }] }, opts);
    expectError(() => plan.combinedRows(128), 'INVALID_VALUE', /c128PageSize/);
    expectError(() => createPlan(base(), { ...opts, window: 0 }), 'INVALID_VALUE', /options\.window/);
    expectError(() => createPlan(base(), { ...opts, core: 'gpu' as never }), 'INVALID_VALUE', /options\.core/);
    expectError(() => createPlan(base(), { ...opts, core: 'js' as never }), 'INVALID_VALUE', /options\.core/); // the TS port is gone
    expectError(() => createPlan({ requests: [{ seqLen: 2, extendLen: 1, swaTokenIds: [0, 1], c4PageTable: [0] }] }, opts), 'INVALID_VALUE', /c4PageSize/);
  });
});
