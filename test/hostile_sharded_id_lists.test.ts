/**
 * createShardedPlan's id lists refused from their counts as createPlan refuses them (SPEC §9: sizes
 * checked before any work): a split by queries read every request's SWA ids and page tables whole
 * before the whole plan's checks (a page table claiming 2^24 + 6 entries, 5 used, was read whole
 * through a Proxy before it was refused; one claiming 2^31 − 1 was allocated and read). Now the whole
 * plan reads the caller's lists (counts before entries) and the shards are cut from the ids it read:
 * the refusal is createPlan's for the same chunk (code, argument, message), with no entry read. Valid
 * chunks: every caller element read once, and the shards' plans hold the SWA ids and compressed
 * token ids the §6 derivation gives (written here), a request at the cap of unused entries included.
 */
import { describe, expect, test } from 'vitest';
import { createPlan, createShardedPlan, type PlanChunk } from '../dist/index.js';
import { testRng } from './helpers/random.js';
import { refusalOf } from './helpers/errors.js';
import { claimingList, countedArray } from './helpers/claiming_list.js';

const rng = testRng('hostile_sharded_id_lists');

/** The cap as documented (written here, not read from the code under test). */
const MAX_UNUSED = 2 ** 24;
/** Element reads a claiming list answers before it throws (a plain Error: the read-all path stops fast). */
const READ_BUDGET = 2 ** 16;

/** SWA ids a request needs (SPEC §6, written here): g = min(seqLen, extendLen + W − 1). */
const gather = (seqLen: number, extendLen: number, window: number): number => (extendLen > 0 ? Math.min(seqLen, extendLen + window - 1) : 0);

// One request: seqLen 300, extendLen 2, window 128 (g = 129); c4 page size 16: floor(300 / 4) = 75
// entries, 5 pages; c128 page size 1: 2 pages.
const SEQ = 300, EXT = 2, G = gather(SEQ, EXT, 128);
const swaIds = (): number[] => Array.from({ length: G }, (_, i) => i);
type ListKey = 'swaTokenIds' | 'c4PageTable' | 'c128PageTable';
const USED: Record<ListKey, number> = { swaTokenIds: G, c4PageTable: 5, c128PageTable: 2 };

/** The chunk with `key`'s list a claiming Proxy of `claim` entries (the other lists real and valid). */
function claimingChunk(key: ListKey, claim: number): { chunk: PlanChunk; reads: { length: number; elements: number } } {
  const { list, reads } = claimingList(claim, 0, READ_BUDGET);
  const req = { seqLen: SEQ, extendLen: EXT, swaTokenIds: swaIds(), c4PageTable: [0, 1, 2, 3, 4], c128PageTable: [0, 1], [key]: list };
  return { chunk: { requests: [req], c4PageSize: 16, c128PageSize: 1 } as PlanChunk, reads };
}

/** The refusal written here for `key` claiming `claim` entries. */
function expectedRefusal(key: ListKey, claim: number): [string, string, string] {
  const argument = `chunk.requests[0].${key}`;
  if (key === 'swaTokenIds') return ['INVALID_SHAPE', argument, `${argument}: expected ${G} ids (positions [${SEQ - G}, ${SEQ}) for seqLen ${SEQ}, extendLen ${EXT}, window 128), got ${claim}`];
  const past = claim - USED[key];
  return ['TOO_LARGE', argument, `${argument}: expected page tables holding at most ${MAX_UNUSED} entries past the pages the chunk's requests use (MAX_UNUSED_PAGE_TABLE_ENTRIES), got ${past} past them up to this table of ${claim}`];
}

describe('createShardedPlan id lists (helper-60)', () => {
  const cases: [ListKey, number][] = [
    ['c4PageTable', MAX_UNUSED + 6],
    ['c4PageTable', 2 ** 31 - 1],
    ['c128PageTable', MAX_UNUSED + 3],
    ['c128PageTable', 2 ** 31 - 1],
    ['swaTokenIds', MAX_UNUSED + 6],
    ['swaTokenIds', 2 ** 31 - 1],
  ];
  for (const [key, claim] of cases) {
    for (const split of ['queries', 'heads'] as const) {
      test(`${key} claiming ${claim}, split by ${split}: createPlan's refusal for the chunk, from the count, no entry read`, () => {
        const alone = claimingChunk(key, claim);
        const planRefusal = refusalOf(() => createPlan(alone.chunk));
        expect(planRefusal).toEqual(expectedRefusal(key, claim));
        expect(alone.reads).toEqual({ length: 1, elements: 0 });

        const sharded = claimingChunk(key, claim);
        expect(refusalOf(() => createShardedPlan(sharded.chunk, { shards: 2, split }))).toEqual(planRefusal);
        expect(sharded.reads).toEqual({ length: 1, elements: 0 });
      });
    }
  }

  test('two tables crossing the chunk-wide cap together: refused at the second from the counts, neither read', () => {
    const make = () => {
      const a = claimingList(2 ** 23 + 5, 0, READ_BUDGET), b = claimingList(2 ** 23 + 6, 0, READ_BUDGET);
      const req = (list: unknown) => ({ seqLen: SEQ, extendLen: EXT, swaTokenIds: swaIds(), c4PageTable: list });
      return { chunk: { requests: [req(a.list), req(b.list)], c4PageSize: 16 } as PlanChunk, reads: [a.reads, b.reads] };
    };
    const alone = make(), sharded = make();
    const planRefusal = refusalOf(() => createPlan(alone.chunk));
    const arg = 'chunk.requests[1].c4PageTable';
    expect(planRefusal).toEqual(['TOO_LARGE', arg, `${arg}: expected page tables holding at most ${MAX_UNUSED} entries past the pages the chunk's requests use (MAX_UNUSED_PAGE_TABLE_ENTRIES), got ${MAX_UNUSED + 1} past them up to this table of ${2 ** 23 + 6}`]);
    expect(refusalOf(() => createShardedPlan(sharded.chunk, { shards: 3, split: 'queries' }))).toEqual(planRefusal);
    for (const r of [...alone.reads, ...sharded.reads]) expect(r).toEqual({ length: 1, elements: 0 });
  });

  test('a valid chunk split by queries: every caller element read once, the shards hold the §6 ids', () => {
    const window = 16, c4PageSize = 8, c128PageSize = 2;
    const requests: { seqLen: number; extendLen: number; swa: number[]; c4: number[]; c128: number[] }[] = [];
    for (let r = 0; r < 4; r++) {
      const extendLen = rng.int(1, 12), seqLen = extendLen + rng.int(0, 700);
      const g = gather(seqLen, extendLen, window);
      // tables longer than needed by a few pages, as a row of a block table
      const c4Pages = Math.ceil(Math.floor(seqLen / 4) / c4PageSize) + rng.int(0, 4);
      const c128Pages = Math.ceil(Math.floor(seqLen / 128) / c128PageSize) + rng.int(0, 4);
      requests.push({ seqLen, extendLen, swa: Array.from({ length: g }, () => rng.int(0, 5000)), c4: Array.from({ length: c4Pages }, () => rng.int(0, 500)), c128: Array.from({ length: c128Pages }, () => rng.int(0, 500)) });
    }
    const lists = requests.map((q) => ({ swa: countedArray(q.swa), c4: countedArray(q.c4), c128: countedArray(q.c128) }));
    const chunk: PlanChunk = {
      requests: requests.map((q, r) => ({ seqLen: q.seqLen, extendLen: q.extendLen, swaTokenIds: lists[r]!.swa.list, c4PageTable: lists[r]!.c4.list, c128PageTable: lists[r]!.c128.list })),
      c4PageSize,
      c128PageSize,
    };
    const shards = 3;
    const plan = createShardedPlan(chunk, { shards, split: 'queries', window });
    for (const l of lists) {
      for (const c of [l.swa, l.c4, l.c128]) {
        expect(c.byKey.get('length')).toBe(1);
        const values = c.list as unknown as number[];
        for (let i = 0; i < (Reflect.get(values, 'length') as number); i++) expect(c.byKey.get(`${i}`), `element ${i}`).toBe(1);
      }
    }
    // each shard: its queries' requests, cut (§10) and derived (§6) here
    const total = requests.reduce((t, q) => t + q.extendLen, 0);
    expect(plan.shards.map((s) => s.numQueries).reduce((a, b) => a + b, 0)).toBe(total);
    for (const shard of plan.shards) {
      const swa: number[] = [], c4: number[] = [], c128: number[] = [];
      let offset = 0;
      for (const q of requests) {
        const lo = Math.max(shard.queryOffset, offset) - offset, hi = Math.min(shard.queryOffset + shard.numQueries, offset + q.extendLen) - offset;
        offset += q.extendLen;
        if (hi <= lo) continue;
        const seqLen = q.seqLen - q.extendLen + hi, extendLen = hi - lo, g = gather(seqLen, extendLen, window);
        // positions [seqLen − g, seqLen) of the request's list, which holds [q.seqLen − G, q.seqLen)
        const first = seqLen - g - (q.seqLen - gather(q.seqLen, q.extendLen, window));
        swa.push(...q.swa.slice(first, first + g));
        for (let j = 0; j < Math.floor(seqLen / 4); j++) c4.push(q.c4[Math.floor(j / c4PageSize)]! * c4PageSize + (j % c4PageSize));
        for (let j = 0; j < Math.floor(seqLen / 128); j++) c128.push(q.c128[Math.floor(j / c128PageSize)]! * c128PageSize + (j % c128PageSize));
      }
      expect(Array.from(shard.plan.swaTokenIds.data, Number)).toEqual(swa);
      expect(Array.from(shard.plan.compressedTokenIds(4).data, Number)).toEqual(c4);
      expect(Array.from(shard.plan.compressedTokenIds(128).data, Number)).toEqual(c128);
    }
    plan.release();
  });

  test('a request at the cap of unused entries, its queries split over two shards: both plan (a shard needing fewer pages is not refused)', () => {
    // seqLen 260, extendLen 8: floor(260 / 4) = 65 entries, 5 pages of 16; shard 0 takes 4 queries:
    // seqLen 256, 64 entries, 4 pages. The table holds 5 + 2^24 entries: exactly at the cap for the whole plan.
    const table = new Int32Array(5 + MAX_UNUSED);
    for (let i = 0; i < 5; i++) table[i] = rng.int(0, 1000);
    const swa = Array.from({ length: gather(260, 8, 128) }, () => rng.int(0, 5000));
    const plan = createShardedPlan({ requests: [{ seqLen: 260, extendLen: 8, swaTokenIds: swa, c4PageTable: table }], c4PageSize: 16 }, { shards: 2, split: 'queries' });
    const ids = (seqLen: number): number[] => Array.from({ length: Math.floor(seqLen / 4) }, (_, j) => table[Math.floor(j / 16)]! * 16 + (j % 16));
    expect(plan.shards.map((s) => [s.queryOffset, s.numQueries])).toEqual([[0, 4], [4, 4]]);
    expect(Array.from(plan.shards[0]!.plan.compressedTokenIds(4).data, Number)).toEqual(ids(256));
    expect(Array.from(plan.shards[1]!.plan.compressedTokenIds(4).data, Number)).toEqual(ids(260));
    // shard 0's gather: positions [256 − 131, 256) of the request's [260 − 135, 260)
    expect(Array.from(plan.shards[0]!.plan.swaTokenIds.data, Number)).toEqual(swa.slice(0, gather(256, 4, 128)));
    expect(Array.from(plan.shards[1]!.plan.swaTokenIds.data, Number)).toEqual(swa.slice(swa.length - gather(260, 4, 128)));
    plan.release();
  }, 60_000);
});
