/**
 * The host backends' paged op over only the tokens it reads (SPEC §5). A paged call names its
 * tokens by id; handing a thread or a worker the caller's whole cache costs a copy of the whole
 * cache (cpu: into the staging when it is not shared; wasm: into every worker's heap), however
 * few tokens the call reads. This module gathers the distinct valid tokens of one index set into
 * a compact cache of the same format (ids 0..m-1, ascending in the original ids, so runs of
 * consecutive ids copy as one block) and rewrites the set's ids to their compact positions.
 *
 * Validity is SPEC §5's: entry k of row i counts when k < topkLength[i] (already clamped to
 * [0, topk] by ops/common.ts) and 0 ≤ id < the cache's tokens. Every other entry becomes −1, so
 * it stays skipped and is never read. The valid entries keep their order and point at the same
 * bytes, so the kernel computes exactly what it computes over the whole cache.
 *
 * Which tokens a set reads, their ids rewritten and the estimate are prefill_gather.ts's row
 * planner over the cache's token ids (a cache's tokens are its rows).
 */
import type { CacheView, PagedCopies, PagedIndexSet, PagedSetBytes, PagedSparseAttentionJob } from './backend.js';
import { copyBytes, type MemoryPart } from './memory.js';
import { attentionOutputBytes, inputBytes, stagingPartsOf, type InputBytes } from './staging.js';
import { COPY_NS_PER_BYTE, KvRowScratch, cheaperKvRows, planKvRows, remapKvIndices, type KvIndexRows, type KvRowPlan } from './prefill_gather.js';
import { V4_COMPACT_PAGE_SIZE, V4_TOKEN_BYTES, V4_TOKEN_DATA_BYTES, V4_TOKEN_SCALE_BYTES, compactGeometry, v4PageBytes } from '../kv_cache_layout.js';

/** The index set of a paged call as the host backends hold it (host arrays). */
export type HostPagedSet = PagedIndexSet;

/** What a set reads: its distinct valid token ids, ascending, and each one's compact position. */
export interface PagedReadPlan {
  /** distinct valid ids, ascending */
  tokens: Int32Array;
  /** per token id of the cache: 1 + its compact position, or 0 when no valid entry reads it */
  slotOf: Int32Array;
  /** runs of consecutive ids in `tokens` (each copied as one block, page boundaries aside) */
  runs: number;
  /** the compact cache's geometry */
  pageSize: number;
  numPages: number;
  bytes: number;
}

/** `set`'s n index rows as the row planner reads them: ids into the cache's tokens. */
function indexRows(set: HostPagedSet, n: number): KvIndexRows {
  return { indices: set.indices, sQ: n, topk: set.topk, topkLength: set.topkLength, sKV: set.cache.numTokens };
}

/** The plan of a cache's tokens read (the row planner's), with the compact cache's geometry. */
function pagedPlan(plan: KvRowPlan | null): PagedReadPlan | null {
  return plan && { tokens: plan.rows, slotOf: plan.slotOf, runs: plan.runs, ...compactGeometry('v4', plan.rows.length) };
}

/**
 * Which tokens of its cache `set` reads (the valid entries of its n rows), or null as soon as
 * they are more than `maxTokens`. Reads the indices and lengths once; the cache is not touched.
 * In `scratch` when given (valid until its next plan), else in arrays of its own.
 */
export function planPagedRead(set: HostPagedSet, n: number, maxTokens = Infinity, scratch?: KvRowScratch): PagedReadPlan | null {
  return pagedPlan(planKvRows(indexRows(set, n), maxTokens, scratch));
}

/**
 * The paged plans' maps of token ids, kept from call to call by the backend that owns the pool (a
 * fresh map faults in its pages as a plan first touches them; the pool goes with its backend). A
 * plan's scratch is taken out of the pool while the plan may still be read, so two calls in
 * flight, or a call's two sets, never share one; it goes back once its plan is done with (a plan
 * never used again is dropped with its scratch). A map is as long as the longest cache planned in
 * it: the pool keeps a call's two sets' worth.
 */
export class PagedScratchPool {
  private readonly idle: KvRowScratch[] = [];
  private static readonly KEPT = 2;

  take(): KvRowScratch {
    return this.idle.pop() ?? new KvRowScratch();
  }

  giveBack(scratch: KvRowScratch): void {
    if (this.idle.length < PagedScratchPool.KEPT) this.idle.push(scratch);
  }

  /** Tests only: how many scratches the pool holds idle. */
  get idleCount(): number {
    return this.idle.length;
  }
}

/*
 * Gathering one run of tokens, in estimated main-thread nanoseconds (prefill_gather.ts has the other
 * costs): a scattered token is a cache miss, far dearer than copying its bytes in bulk.
 */
const RUN_NS = 500;

/**
 * For tests: `force` overrides the estimate (whole: never compact; compact: always), and
 * `compactSets` counts the index sets read through a compact cache, so a test can hold both paths
 * to the same bits and see which one ran. Not part of the package's API.
 */
export const pagedReadForTests: { force: 'whole' | 'compact' | null; compactSets: number } = { force: null, compactSets: 0 };

/**
 * The plan of `set` when reading a compact cache is estimated to cost less than the whole one,
 * else null, by the backend's `copies`. Counted in pagedReadForTests.compactSets: the op's own read.
 */
export function choosePagedRead(set: HostPagedSet, n: number, copies: PagedCopies, scratch?: KvRowScratch): PagedReadPlan | null {
  const plan = pagedReadChoice(set, n, copies, scratch);
  if (plan) pagedReadForTests.compactSets++;
  return plan;
}

/** choosePagedRead without counting: what the op will choose, for a check before it runs. */
function pagedReadChoice(set: HostPagedSet, n: number, copies: PagedCopies, scratch?: KvRowScratch): PagedReadPlan | null {
  const force = pagedReadForTests.force;
  if (force === 'compact') return planPagedRead(set, n, Infinity, scratch);
  if (force === 'whole') return null;
  return estimatedPlan(set, n, copies.whole(copyBytes(set.cache.data) > 0), copies.compact, scratch);
}

/** A compact cache's bytes (its pages' padding included) count towards its copies; a token's bytes bound the tokens planned. */
function estimatedPlan(set: HostPagedSet, n: number, wholeCopies: number, compactCopies: number, scratch?: KvRowScratch): PagedReadPlan | null {
  const wholeNs = set.cache.bytes * COPY_NS_PER_BYTE * wholeCopies;
  const perTokenNs = V4_TOKEN_BYTES * COPY_NS_PER_BYTE * (1 + compactCopies);
  const compactNs = (tokens: number) => compactGeometry('v4', tokens).bytes * COPY_NS_PER_BYTE * (1 + compactCopies);
  return pagedPlan(cheaperKvRows(indexRows(set, n), wholeNs, perTokenNs, RUN_NS, compactNs, scratch));
}

/** The set's ids as compact positions: valid entries their token's position, every other entry −1. */
export function remapIndices(set: HostPagedSet, n: number, plan: PagedReadPlan): Int32Array {
  return remapKvIndices(indexRows(set, n), plan);
}

/**
 * Copies the plan's tokens of the v4 `cache` into `into` (at least plan.bytes, zeroed or not: the
 * compact cache's unused slots are never addressed) as a compact cache: what wasm_backend's
 * gatherTokens makes of the same ids, but a run of consecutive ids that stays inside one page of
 * each cache is copied as two blocks (data, scales), not token by token (a window's ids are one run).
 */
export function gatherCompact(cache: CacheView, plan: PagedReadPlan, into: Uint8Array): Uint8Array {
  const data = into.subarray(0, plan.bytes);
  const src = cache.data;
  const P = cache.pageSize;
  const pageBytes = v4PageBytes(P);
  const C = V4_COMPACT_PAGE_SIZE;
  const compactPageBytes = v4PageBytes(C);
  const { tokens } = plan;
  const m = tokens.length;
  let j = 0;
  while (j < m) {
    const id = tokens[j]!;
    const page = Math.floor(id / P);
    const slot = id - page * P;
    const cpage = Math.floor(j / C);
    const cslot = j - cpage * C;
    // the run: consecutive ids, within this source page and this compact page
    let len = 1;
    const most = Math.min(P - slot, C - cslot, m - j);
    while (len < most && tokens[j + len] === id + len) len++;
    const base = page * pageBytes;
    const cbase = cpage * compactPageBytes;
    const d = base + slot * V4_TOKEN_DATA_BYTES;
    data.set(src.subarray(d, d + len * V4_TOKEN_DATA_BYTES), cbase + cslot * V4_TOKEN_DATA_BYTES);
    const s = base + P * V4_TOKEN_DATA_BYTES + slot * V4_TOKEN_SCALE_BYTES;
    data.set(src.subarray(s, s + len * V4_TOKEN_SCALE_BYTES), cbase + C * V4_TOKEN_DATA_BYTES + cslot * V4_TOKEN_SCALE_BYTES);
    j += len;
  }
  return data;
}

/** A set over a compact cache: the same format and topk, its own geometry and ids. */
export interface CompactPagedSet {
  cache: { format: CacheView['format']; pageSize: number; numPages: number; data: Uint8Array };
  indices: Int32Array;
  topk: number;
  topkLength: Int32Array | null;
}

/** planPagedRead → remapIndices → gatherCompact, the compact cache allocated by `alloc`. */
export function compactPagedSet(set: HostPagedSet, n: number, plan: PagedReadPlan, alloc: (bytes: number) => Uint8Array): CompactPagedSet {
  const indices = remapIndices(set, n, plan);
  const data = gatherCompact(set.cache, plan, alloc(plan.bytes));
  return { cache: { format: set.cache.format, pageSize: plan.pageSize, numPages: plan.numPages, data }, indices, topk: set.topk, topkLength: set.topkLength };
}

/** A paged job's index sets as a host backend hands them on: each read whole, or through a compact cache. */
export interface PagedReads {
  /** bytes of the cache each set reads (the compact one's or the whole) */
  mainCacheBytes: number;
  extraCacheBytes: number;
  /** the arrays of the sets read whole (cache, ids), which the staging copies */
  whole: Array<Uint8Array | Int32Array>;
  /** bytes of the compact sets' caches and ids, each rounded up by `align` */
  compactBytes(align: (bytes: number) => number): number;
  /** each set as the budget counts it (pagedSparseAttentionParts) */
  setBytes: PagedSetBytes[];
  /** the sets read through compact caches: planned now, gathered (from the caller's memory, at the call) by gather() */
  gather(): { main: HostPagedSet | CompactPagedSet; extra: HostPagedSet | CompactPagedSet | null };
}

/**
 * Per index set of `job`, whole or compact (choosePagedRead with the backend's `copies`), each
 * planned in a scratch of the backend's `pool`: a set read whole gives it back at once, a compact one once
 * gather() has read its plan (gather() reads the plans once and then gives the same sets).
 */
export function planPagedReads(job: PagedSparseAttentionJob, copies: PagedCopies, pool: PagedScratchPool): PagedReads {
  const { n, main, extra } = job;
  const held: KvRowScratch[] = [];
  const choose = (set: HostPagedSet) => {
    const scratch = pool.take();
    const plan = choosePagedRead(set, n, copies, scratch);
    if (plan) held.push(scratch);
    else pool.giveBack(scratch);
    return plan;
  };
  const mainPlan = choose(main);
  const extraPlan = extra ? choose(extra) : null;
  const sets: Array<[HostPagedSet, PagedReadPlan | null]> = extra ? [[main, mainPlan], [extra, extraPlan]] : [[main, mainPlan]];
  const read = (set: HostPagedSet, plan: PagedReadPlan | null) => (plan ? compactPagedSet(set, n, plan, (bytes) => new Uint8Array(bytes)) : set);
  let gathered: { sets: ReturnType<PagedReads['gather']> } | { failed: unknown } | undefined;
  return {
    mainCacheBytes: mainPlan ? mainPlan.bytes : main.cache.bytes,
    extraCacheBytes: extra ? (extraPlan ? extraPlan.bytes : extra.cache.bytes) : 0,
    whole: sets.flatMap(([set, plan]) => (plan ? [] : [set.cache.data, set.indices])),
    setBytes: sets.map(([set, plan]) => setBytesOf(set, n, plan)),
    compactBytes: (align) => sets.reduce((sum, [set, plan]) => sum + (plan ? align(plan.bytes) + align(n * set.topk * 4) : 0), 0),
    gather: () => {
      if (!gathered) {
        try {
          gathered = { sets: { main: read(main, mainPlan), extra: extra ? read(extra, extraPlan) : null } };
        } catch (e) {
          gathered = { failed: e };
        }
        // read or failed (a detached array), the plans are done with: their scratches may serve other plans now
        for (const scratch of held.splice(0)) pool.giveBack(scratch);
      }
      if ('failed' in gathered) throw gathered.failed;
      return gathered.sets;
    },
  };
}

/** A set as the budget counts it, read whole (no plan) or through the compact cache of `plan`. */
function setBytesOf(set: HostPagedSet, n: number, plan: PagedReadPlan | null): PagedSetBytes {
  return plan ? { whole: false, cacheBytes: plan.bytes, indicesBytes: n * set.topk * 4 } : { whole: true, cache: inputBytes(set.cache.data), indices: inputBytes(set.indices) };
}

/** An index set as its op will read it: as its budget counts it, and the bytes of the cache it reads (the compact one's or the whole). */
export interface PagedSetRead {
  bytes: PagedSetBytes;
  cacheBytes: number;
}

/**
 * `sets` of a paged call over n queries as its op will read them (the same choice as
 * planPagedReads, by the backend's `copies`): for a check of the op before it runs (a layer's,
 * prefill_layer_checks.ts). Reads the ids as the op's own plan does; plans no gather and counts nothing.
 */
export function pagedSetReads(sets: readonly HostPagedSet[], n: number, copies: PagedCopies): PagedSetRead[] {
  return sets.map((set) => {
    const plan = pagedReadChoice(set, n, copies);
    return { bytes: setBytesOf(set, n, plan), cacheBytes: plan ? plan.bytes : set.cache.bytes };
  });
}

/**
 * What a host backend's pagedSparseAttention counts against the budget: the staging of q, the
 * lengths, attnSink and the sets read whole; the compact sets' caches and ids held, then their
 * staged copies (`compactAlign`: how the backend rounds each when it places them); the outputs.
 */
export function pagedSparseAttentionParts(fixed: readonly InputBytes[], sets: readonly PagedSetBytes[], compactAlign: (bytes: number) => number, n: number, hQ: number): MemoryPart[] {
  const staged: InputBytes[] = [...fixed];
  let compact = 0, compactPlaced = 0;
  for (const s of sets) {
    if (s.whole) {
      staged.push(s.cache, s.indices);
    } else {
      compact += s.cacheBytes + s.indicesBytes;
      compactPlaced += compactAlign(s.cacheBytes) + compactAlign(s.indicesBytes);
    }
  }
  return [
    ...stagingPartsOf(staged, compact),
    { what: 'the compact caches and ids, then their staged copies', bytes: 2 * compactPlaced },
    { what: 'outputs', bytes: attentionOutputBytes(n, hQ, 512) },
  ];
}

/** The most bytes of a set's cache its op can read, whole (`wholeBytes`) or compact (at most a token per entry, no more than the cache holds). */
export function mostPagedCacheBytes(wholeBytes: number, mostTokens: number): number {
  return Math.max(wholeBytes, compactGeometry('v4', mostTokens).bytes);
}

/**
 * The most a paged call can count against the budget whatever it reads whole or compact (the
 * choice depends on the ids, choosePagedRead): `parts` over every choice per set, a compact cache
 * at its most (a token per entry, no more than its cache holds), the largest total. For a check
 * from sizes before the ids exist (a layer's): a call within it fits whatever its ids.
 */
export function mostPagedParts(parts: (sets: readonly PagedSetBytes[]) => MemoryPart[], sets: readonly { cache: InputBytes; indices: InputBytes; indicesBytes: number; mostTokens: number }[]): MemoryPart[] {
  let most: MemoryPart[] | undefined, mostTotal = -1;
  for (let choice = 0; choice < 1 << sets.length; choice++) {
    const chosen = sets.map((s, i): PagedSetBytes => ((choice >> i) & 1 ? { whole: false, cacheBytes: compactGeometry('v4', s.mostTokens).bytes, indicesBytes: s.indicesBytes } : { whole: true, cache: s.cache, indices: s.indices }));
    const p = parts(chosen);
    const total = p.reduce((a, x) => a + x.bytes, 0);
    if (total > mostTotal) [most, mostTotal] = [p, total];
  }
  return most!;
}
