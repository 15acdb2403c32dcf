/**
 * Random prefill chunks, the one generator of them for the tests, `check`, `run` and `bench`:
 * requests placed in paged caches as a serving engine would place them (shuffled SWA slots,
 * shuffled compressed pages), an indexer's top-k with the faults a caller can make, and the big
 * one-request c4 chunk of `run` / `bench`. What the rows, widths and entry counts of a chunk are is
 * the planner's answer (createPlan), never derived here.
 */
import { createPlan, swaGatherLength, type ChunkRequest, type Plan, type PlanChunk } from '../planner/index.js';
import type { PlanReferenceChunk } from '../reference/index.js';
import { tensor } from '../tensor.js';
import type { Tensor } from '../types.js';
import { randomV4Rows, uniformBf16Bits, type Rng } from './grid.js';

/** One request of a chunk: its tokens after the chunk and its queries in it. */
export interface ScenarioRequest {
  seqLen: number;
  extendLen: number;
}

export interface ChunkScenarioOptions {
  /** sliding window W (default 128) */
  window?: number;
  /** page sizes of the SWA cache and the c4 / c128 compressed caches (default 64, 16, 2) */
  swaPageSize?: number;
  c4PageSize?: number;
  c128PageSize?: number;
}

/** A chunk as the planner takes it and as the float64 reference reads it, with its caches' sizes. */
export interface ChunkScenario {
  chunk: PlanChunk;
  ref: PlanReferenceChunk;
  requests: readonly ScenarioRequest[];
  numQueries: number;
  window: number;
  swaPageSize: number;
  c4PageSize: number;
  c128PageSize: number;
  /** pages each cache needs to hold every request (with some slack, so ids jump between pages) */
  swaPages: number;
  c4Pages: number;
  c128Pages: number;
}

/** Fisher–Yates over `a` in place, last element first (the draws every shuffle here makes). */
function shuffleInPlace(rng: Rng, a: Int32Array): void {
  for (let i = a.length - 1; i > 0; i--) {
    const j = rng.int(0, i + 1);
    const t = a[i]!;
    a[i] = a[j]!;
    a[j] = t;
  }
}

/** 0 .. n − 1 in random order. */
export function shuffled(rng: Rng, n: number): Int32Array {
  const a = new Int32Array(n);
  for (let i = 0; i < n; i++) a[i] = i;
  shuffleInPlace(rng, a);
  return a;
}

/** Pages a request's compressed cache of one ratio needs (the planner's page-table contract). */
const pagesNeeded = (seqLen: number, ratio: 4 | 128, pageSize: number): number => Math.ceil(Math.floor(seqLen / ratio) / pageSize);

/**
 * Requests of the given lengths placed in caches: every SWA position a query's window reaches gets
 * a shuffled slot of the SWA cache, every request its own shuffled c4 and c128 pages.
 */
/**
 * The pages of each cache chunkScenario places `requests` in, worked out before anything is
 * allocated (a caller of hostile sizes refuses them by these: the CLI's layer section).
 */
export function scenarioPages(requests: readonly ScenarioRequest[], options: ChunkScenarioOptions = {}): { gathers: number[]; swaPages: number; c4Need: number[]; c128Need: number[]; c4Pages: number; c128Pages: number } {
  const { window = 128, swaPageSize = 64, c4PageSize = 16, c128PageSize = 2 } = options;
  const gathers = requests.map((r) => swaGatherLength(r.seqLen, r.extendLen, window));
  const swaTokens = gathers.reduce((a, b) => a + b, 0);
  const swaPages = Math.max(1, Math.ceil((swaTokens * 5) / 4 / swaPageSize));
  const c4Need = requests.map((r) => pagesNeeded(r.seqLen, 4, c4PageSize));
  const c128Need = requests.map((r) => pagesNeeded(r.seqLen, 128, c128PageSize));
  return { gathers, swaPages, c4Need, c128Need, c4Pages: c4Need.reduce((a, b) => a + b, 0) + 2, c128Pages: c128Need.reduce((a, b) => a + b, 0) + 2 };
}

export function chunkScenario(rng: Rng, requests: readonly ScenarioRequest[], options: ChunkScenarioOptions = {}): ChunkScenario {
  const { window = 128, swaPageSize = 64, c4PageSize = 16, c128PageSize = 2 } = options;
  const { gathers, swaPages, c4Need, c128Need, c4Pages, c128Pages } = scenarioPages(requests, options);
  const slots = shuffled(rng, swaPages * swaPageSize);
  const c4Free = Array.from(shuffled(rng, c4Pages));
  const c128Free = Array.from(shuffled(rng, c128Pages));
  const planRequests: ChunkRequest[] = [];
  const refRequests: PlanReferenceChunk['requests'][number][] = [];
  let slot = 0;
  requests.forEach((r, i) => {
    const g = gathers[i]!;
    const byPosition = new Int32Array(r.seqLen).fill(-1); // positions no window reaches hold no slot
    for (let p = r.seqLen - g; p < r.seqLen; p++) byPosition[p] = slots[slot++]!;
    const c4PageTable = c4Free.splice(0, c4Need[i]!);
    const c128PageTable = c128Free.splice(0, c128Need[i]!);
    planRequests.push({ seqLen: r.seqLen, extendLen: r.extendLen, swaTokenIds: byPosition.slice(r.seqLen - g), c4PageTable, c128PageTable });
    refRequests.push({ seqLen: r.seqLen, extendLen: r.extendLen, swaTokenIdByPosition: byPosition, c4PageTable, c128PageTable });
  });
  const chunk: PlanChunk = { requests: planRequests, c4PageSize, c128PageSize };
  const ref: PlanReferenceChunk = { requests: refRequests, c4PageSize, c128PageSize, window };
  return {
    chunk,
    ref,
    requests,
    numQueries: requests.reduce((a, r) => a + r.extendLen, 0),
    window,
    swaPageSize,
    c4PageSize,
    c128PageSize,
    swaPages,
    c4Pages,
    c128Pages,
  };
}

/** A request of `run`'s model chunk, with the kind of request it stands for. */
export interface MixedRequest extends ScenarioRequest {
  kind: string;
}

/**
 * A model chunk's requests. Kinds cycle: a long request continuing mid-sequence (maxContext tokens
 * before the chunk), a fresh prompt wholly in this chunk, a request in the middle of its prompt,
 * and a short one whose sequence is shorter than the window. The chunk's tokens are split by
 * weight.
 */
export function mixedRequests(rng: Rng, o: { requests: number; chunkTokens: number; maxContext: number; window: number }): MixedRequest[] {
  const kinds = [
    { kind: 'mid-sequence, long', weight: 3 },
    { kind: 'fresh prompt', weight: 4 },
    { kind: 'mid-sequence', weight: 2 },
    { kind: 'short (< window)', weight: 1 },
  ];
  const picked = Array.from({ length: o.requests }, (_, r) => kinds[r % kinds.length]!);
  const isShort = (r: number): boolean => picked[r]!.kind.startsWith('short');
  const total = picked.reduce((a, k) => a + k.weight, 0);
  const ext = new Array<number>(picked.length).fill(0);
  let left = o.chunkTokens;
  // short requests first, capped so that the whole sequence stays shorter than the window
  const shortCap = Math.max(1, Math.floor(o.window / 2));
  picked.forEach((k, r) => {
    if (!isShort(r)) return;
    ext[r] = Math.min(left, shortCap, Math.max(1, Math.round((o.chunkTokens * k.weight) / total)));
    left -= ext[r]!;
  });
  // the rest by weight; the last of them takes what rounding left over
  const others = picked.map((_, r) => r).filter((r) => !isShort(r));
  const otherWeight = others.reduce((a, r) => a + picked[r]!.weight, 0);
  const pool = left;
  others.forEach((r, i) => {
    ext[r] = i === others.length - 1 ? left : Math.min(left, Math.max(1, Math.round((pool * picked[r]!.weight) / otherWeight)));
    left -= ext[r]!;
  });
  if (others.length === 0 && left > 0) ext[ext.length - 1]! += left;
  return picked.map((k, r) => {
    const extendLen = ext[r]!;
    const quarter = Math.floor(o.maxContext / 4);
    const context =
      k.kind === 'fresh prompt' ? 0 : k.kind === 'mid-sequence, long' ? o.maxContext : k.kind === 'mid-sequence' ? quarter + rng.int(0, quarter + 1) : rng.int(0, Math.max(1, o.window - extendLen));
    return { kind: k.kind, seqLen: context + extendLen, extendLen };
  });
}

/** An indexer's output for one c4 layer and how many of its entries the planner must drop. */
export interface IndexerTopk {
  /** int32 [numQueries, topk] request-local compressed positions, −1 padded */
  indices: Tensor<'int32'>;
  /** entries not yet visible at their query (a caller's causality error): the planner drops exactly these */
  planted: number;
}

/** The faults an indexer's output may carry. */
export interface TopkFaults {
  /** fraction of a row's slots overwritten with −1 (default 1/32) */
  holes?: number;
  /** fraction of queries given one to three entries that are not yet visible (default 1/8) */
  late?: number;
  /** fraction of a row's slots that repeat another entry of the row (default 0) */
  duplicates?: number;
}

/**
 * A c4 layer's top-k: per query up to topk distinct entries visible to it, in random order, then
 * the faults (duplicates, holes, not-yet-visible entries) and a shuffle of the row; with no
 * faults, the picks −1 padded at the end.
 */
export function indexerTopk(rng: Rng, requests: readonly ScenarioRequest[], topk: number, faults: TopkFaults = {}): IndexerTopk {
  const { holes = 1 / 32, late = 1 / 8, duplicates = 0 } = faults;
  const numQueries = requests.reduce((a, r) => a + r.extendLen, 0);
  const data = new Int32Array(numQueries * topk).fill(-1);
  let planted = 0, q = 0;
  let stamp = new Int32Array(0);
  for (const r of requests) {
    const visibleAtEnd = Math.floor(r.seqLen / 4);
    if (stamp.length < visibleAtEnd) stamp = new Int32Array(visibleAtEnd);
    stamp.fill(0);
    for (let i = 0; i < r.extendLen; i++, q++) {
      const visible = Math.floor((r.seqLen - r.extendLen + i + 1) / 4);
      const row = data.subarray(q * topk, (q + 1) * topk);
      const want = Math.min(topk, visible);
      let n = 0;
      if (want * 2 >= visible) {
        const all = shuffled(rng, visible);
        for (; n < want; n++) row[n] = all[n]!;
      } else {
        // distinct random picks: rejection is cheap while want ≪ visible
        while (n < want) {
          const j = rng.int(0, visible);
          if (stamp[j] === q + 1) continue;
          stamp[j] = q + 1;
          row[n++] = j;
        }
      }
      if (holes === 0 && late === 0 && duplicates === 0) continue;
      for (let k = 0; k < Math.floor(topk * duplicates); k++) row[rng.int(0, topk)] = row[rng.int(0, Math.max(1, n))]!;
      for (let k = 0; k < Math.floor(topk * holes); k++) row[rng.int(0, topk)] = -1;
      if (rng.uniform() < late) {
        const bad = 1 + rng.int(0, 3);
        for (let k = 0; k < bad; k++) row[rng.int(0, topk)] = visible + rng.int(0, 64);
      }
      shuffleInPlace(rng, row); // interleave padding, picks and bad entries
      for (let k = 0; k < topk; k++) if (row[k]! >= visible) planted++;
    }
  }
  return { indices: tensor('int32', [numQueries, topk], data), planted };
}

// ---- the one-request c4 chunk of `run` and `bench` -------------------------------------------------

export interface C4ChunkShape {
  /** query tokens in the chunk (sQ) */
  queries: number;
  /** query heads (hQ) */
  heads: number;
  /** compressed entries per query chosen by the indexer */
  topk: number;
  /** sliding window W */
  window: number;
  /** tokens of the request before this chunk */
  context: number;
  /** v4 cache page size */
  pageSize: number;
  seed: number;
}

/**
 * Where a one-request c4 chunk lives: ONE v4 cache holds both its compressed entries (its c4 page
 * table) and its SWA slots (in the other pages), and the plan of the chunk. `gatherIds` are the
 * workspace's rows in the plan's order: compressed entries, then the SWA gather.
 */
export interface C4ChunkPlacement {
  shape: C4ChunkShape;
  plan: Plan;
  numPages: number;
  /** cache token id of every workspace row */
  gatherIds: Int32Array;
}

/**
 * Places the chunk and plans it; the plan refuses a workspace too large for its budget
 * (TOO_LARGE) before any input is made.
 */
/** The pages placeC4Chunk places `shape`'s request in (its c4 pages and the SWA slots after them), before anything is allocated. */
export function c4ChunkPages(shape: C4ChunkShape): { seqLen: number; g: number; c4Pages: number; numPages: number } {
  const { queries, context, window, pageSize } = shape;
  const seqLen = context + queries;
  const g = swaGatherLength(seqLen, queries, window);
  const c4Pages = pagesNeeded(seqLen, 4, pageSize);
  return { seqLen, g, c4Pages, numPages: Math.max(1, Math.ceil(((c4Pages * pageSize + g) * 5) / 4 / pageSize)) };
}

export function placeC4Chunk(shape: C4ChunkShape, rng: Rng): C4ChunkPlacement {
  const { queries, window, pageSize } = shape;
  const { seqLen, g, c4Pages, numPages } = c4ChunkPages(shape);
  const pages = shuffled(rng, numPages);
  const c4PageTable = pages.subarray(0, c4Pages);
  const swaSlots = new Int32Array((numPages - c4Pages) * pageSize);
  for (let i = 0; i < swaSlots.length; i++) swaSlots[i] = pages[c4Pages + Math.floor(i / pageSize)]! * pageSize + (i % pageSize);
  const order = shuffled(rng, swaSlots.length);
  const swaTokenIds = Int32Array.from({ length: g }, (_, i) => swaSlots[order[i]!]!);
  const plan = createPlan({ requests: [{ seqLen, extendLen: queries, swaTokenIds, c4PageTable }], c4PageSize: pageSize }, { window, workspaceBudgetBytes: 2 ** 34 });
  const comp = plan.compressedTokenIds(4).data, swa = plan.swaTokenIds.data;
  const gatherIds = new Int32Array(comp.length + swa.length);
  comp.forEach((v, i) => (gatherIds[i] = Number(v)));
  swa.forEach((v, i) => (gatherIds[comp.length + i] = Number(v)));
  return { shape, plan, numPages, gatherIds };
}

/** The chunk's inputs: rows to quantize at gatherIds, queries, the plan's c4 rows, a sink. */
export interface C4ChunkInputs {
  /** bf16 [workspace rows, 512]: written into the cache at gatherIds */
  rows: Tensor<'bf16'>;
  q: Tensor<'bf16'>;
  /** the plan's combined rows of the indexer's top-k: workspace rows, −1 padded */
  indices: Tensor<'int32'>;
  topkLength: Tensor<'int32'>;
  attnSink: Tensor<'float32'>;
  smScale: number;
  /** attended entries over all queries: Σ topkLength */
  entries: number;
}

export function c4ChunkInputs(p: C4ChunkPlacement, rng: Rng): C4ChunkInputs {
  const { queries, heads, topk } = p.shape;
  const seqLen = p.shape.context + queries;
  const rows = tensor('bf16', [p.gatherIds.length, 512], randomV4Rows(rng, p.gatherIds.length));
  // wide enough that the softmax is neither flat nor one-hot (logit std ≈ 1)
  const q = tensor('bf16', [queries, heads, 512], uniformBf16Bits(rng, queries * heads * 512, 3));
  const combined = p.plan.combineC4(indexerTopk(rng, [{ seqLen, extendLen: queries }], topk, { holes: 0, late: 0 }).indices);
  // a sink per head around the typical lse (ln 640 ≈ 6.5), so it visibly takes a share
  const attnSink = tensor('float32', [heads], Float32Array.from({ length: heads }, () => 3 + 6 * rng.uniform()));
  const entries = combined.lengths.data.reduce((a, b) => a + b, 0);
  return { rows, q, indices: combined.indices, topkLength: combined.lengths, attnSink, smScale: 1 / Math.sqrt(512), entries };
}

/** Queries [start, end) of a chunk's prefill inputs, as views (no copies). */
export function sliceQueries(x: C4ChunkInputs, start: number, end: number): { q: Tensor<'bf16'>; indices: Tensor<'int32'>; topkLength: Tensor<'int32'> } {
  const [, heads, dQK] = x.q.shape as [number, number, number];
  const width = x.indices.shape[1]!;
  return {
    q: tensor('bf16', [end - start, heads, dQK], x.q.data.subarray(start * heads * dQK, end * heads * dQK)),
    indices: tensor('int32', [end - start, width], x.indices.data.subarray(start * width, end * width)),
    topkLength: tensor('int32', [end - start], x.topkLength.data.subarray(start, end)),
  };
}
