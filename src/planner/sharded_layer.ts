/**
 * A prefill chunk split across several engines (SPEC §10), the way serving engines split attention:
 *
 * - by heads (tensor parallel): every engine attends every query over every KV row, for its own
 *   contiguous range of the heads; one plan serves all shards;
 * - by queries (prefill context parallel): every engine owns a contiguous range of the chunk's
 *   queries and only the rows those queries read. A query range of a request is itself a valid
 *   chunk request (seqLen cut back to the range's last query, the SWA ids sliced to its gather), so
 *   each shard gets its own plan, built once with the sharded plan and reused by every layer.
 *
 * The shards run concurrently; each shard is an ordinary prefillLayer on its engine, so a shard
 * computes exactly what one engine computes for those heads or queries (the same entries in the
 * same order): N engines give the same bits as one.
 */
import { fail } from '../errors.js';
import { checkArgsObject, checkOutputOption, checkPlacedTensor, checkRank, checkTensor, checkViewsIntact, describe } from '../ops/common.js';
import { isCount, isDeviceBuffer, releaseDevice, tensor } from '../tensor.js';
import type { DeviceTensor, Engine, Placement, Tensor } from '../types.js';
import { createPlan, Plan } from './plan.js';
import { swaGatherLength, WORKSPACE_ROW_DIMS } from './chunk_geometry.js';
import { runLayer, type PrefillLayerResult } from './prefill_layer.js';
import { checkLayer, releaseLayer, type CheckedLayer, type PrefillLayerArgs } from './prefill_layer_checks.js';
import { SPARSE_PREFILL_ENV } from './router.js';
import { checkEngine, type SparseMlaEngine } from '../engine.js';
import { checkCallMemory } from '../backends/memory.js';
import { attentionOutputBytes, lendCallCopy } from '../backends/staging.js';
import type { ChunkRequest, PlanCaches, PlanChunk, PlanOptions } from './types.js';

export type ShardSplit = 'heads' | 'queries';

export interface ShardedPlanOptions extends PlanOptions {
  /** number of shards: one per engine */
  shards: number;
  split: ShardSplit;
}

/** One engine's part: its plan and the flat query range it owns (the whole chunk for 'heads'). */
export interface Shard {
  readonly plan: Plan;
  readonly queryOffset: number;
  readonly numQueries: number;
}

/** The sharded plans createShardedPlan made: the layer takes only these (see ShardedPlan.isShardedPlan). */
const madePlans = new WeakSet<object>();

export class ShardedPlan {
  constructor(
    readonly split: ShardSplit,
    readonly shards: readonly Shard[],
    readonly numQueries: number,
  ) {}

  /**
   * Whether `value` is a ShardedPlan createShardedPlan made (frozen, its shards cut from one checked
   * plan). One made by this constructor is not: its shards are the caller's, unchecked (a shard
   * repeated left rows no shard computed, as zeros); nor is a Proxy of one, or an object inheriting
   * from one (as Plan.isPlan).
   */
  static isShardedPlan(value: unknown): value is ShardedPlan {
    return typeof value === 'object' && value !== null && madePlans.has(value);
  }

  /** Plan.release() of every shard's plan (each shard's plan once, where shards share one). */
  release(): void {
    if (!ShardedPlan.isShardedPlan(this)) fail('INVALID_VALUE', 'this', 'a ShardedPlan from createShardedPlan() (call it as plan.release())', describe(this));
    for (const plan of new Set(this.shards.map((s) => s.plan))) plan.release();
  }
}

/** A sharded plan as createShardedPlan gives it: frozen with its shard list and each shard (a layer reads them as cut), and known to the layer. */
function madePlan(split: ShardSplit, shards: Shard[], numQueries: number): ShardedPlan {
  const plan = Object.freeze(new ShardedPlan(split, Object.freeze(shards.map((s) => Object.freeze(s))), numQueries));
  madePlans.add(plan);
  return plan;
}

/** Contiguous ranges [start, end) of `total` items over `parts`, sizes differing by at most one. */
export function evenRanges(total: number, parts: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let p = 0, start = 0; p < parts; p++) {
    const size = Math.floor(total / parts) + (p < total % parts ? 1 : 0);
    out.push([start, start + size]);
    start += size;
  }
  return out;
}

/**
 * Each request's pages of a compress ratio as the whole plan read and checked them (the pages its
 * queries use, no more): page p of a request is its compressed token id p · pageSize, over pageSize.
 */
function usedPages(whole: Plan, ratio: 4 | 128): Int32Array[] {
  const ids = whole.compressedTokenIds(ratio).data;
  const pageSize = whole.pageSize(ratio), bigPageSize = BigInt(pageSize);
  return whole.requests.map((req) => {
    const at = ratio === 4 ? req.c4Offset : req.c128Offset, rows = ratio === 4 ? req.c4Rows : req.c128Rows;
    const pages = new Int32Array(Math.ceil(rows / pageSize));
    for (let p = 0; p < pages.length; p++) pages[p] = Number(ids[at + p * pageSize]! / bigPageSize);
    return pages;
  });
}

/**
 * The requests of flat queries [a, b) of the whole plan's chunk: each overlapping request cut to its
 * part, its SWA ids and pages taken from what the whole plan read (never the caller's lists again).
 */
function subChunk(whole: Plan, swaIds: Float64Array, pages: ReadonlyMap<4 | 128, Int32Array[]>, a: number, b: number): PlanChunk {
  const requests: ChunkRequest[] = [];
  const c4 = pages.get(4), c128 = pages.get(128);
  whole.requests.forEach((req, r) => {
    const lo = Math.max(a, req.queryOffset) - req.queryOffset, hi = Math.min(b, req.queryOffset + req.extendLen) - req.queryOffset;
    if (hi <= lo) return;
    // queries [lo, hi) of the request: positions seqLen − extendLen + lo … + hi − 1
    const seqLen = req.seqLen - req.extendLen + hi, extendLen = hi - lo;
    const g = swaGatherLength(seqLen, extendLen, whole.window);
    // its gather, positions [seqLen − g, seqLen), within the request's [swaStartPos, req.seqLen)
    const from = req.swaOffset + seqLen - g - req.swaStartPos;
    requests.push({
      seqLen,
      extendLen,
      swaTokenIds: swaIds.subarray(from, from + g),
      ...(c4 ? { c4PageTable: c4[r]! } : {}),
      ...(c128 ? { c128PageTable: c128[r]! } : {}),
    });
  });
  return { requests, ...(c4 ? { c4PageSize: whole.pageSize(4) } : {}), ...(c128 ? { c128PageSize: whole.pageSize(128) } : {}) };
}

/** Most shards a plan may have: one per engine (far above the GPUs of any host; guards typos like 1e9). */
export const MAX_SHARDS = 1024;

/** A chunk's plan split into `options.shards` parts (SPEC §10): one plan per query range, or one for all heads. */
export function createShardedPlan(chunk: PlanChunk, options: ShardedPlanOptions): ShardedPlan {
  checkArgsObject(options, 'options');
  // named, not spread: a field the options object inherits counts as it does for createPlan
  const { shards: n, split, window: givenWindow, align, workspaceBudgetBytes, caches, core } = options;
  const planOptions: PlanOptions = { window: givenWindow, align, workspaceBudgetBytes, caches, core };
  if (!Number.isSafeInteger(n) || n < 1 || n > MAX_SHARDS) fail('INVALID_VALUE', 'options.shards', `an integer in [1, ${MAX_SHARDS}] (one shard per engine)`, describe(n));
  if (split !== 'heads' && split !== 'queries') fail('INVALID_VALUE', 'options.split', "'heads' or 'queries'", describe(split));
  // the chunk read once, by the whole plan (its checks in their order: a list's count refused before
  // any entry is read); the shards are cut from the ids it read and checked, not the caller's lists
  // read again (a getter could give other requests, pages or SWA ids than the whole plan checked)
  const whole = createPlan(chunk, planOptions);
  if (split === 'heads') return madePlan(split, Array.from({ length: n }, () => ({ plan: whole, queryOffset: 0, numQueries: whole.numQueries })), whole.numQueries);
  const pages = new Map<4 | 128, Int32Array[]>();
  for (const ratio of whole.ratios) if (ratio !== 0) pages.set(ratio, usedPages(whole, ratio));
  // as numbers, converted once (the shards' plans read a number faster than a bigint)
  const wholeSwa = whole.swaTokenIds.data, swaIds = new Float64Array(wholeSwa.length);
  for (let i = 0; i < swaIds.length; i++) swaIds[i] = Number(wholeSwa[i]!);
  const shards = evenRanges(whole.numQueries, n).map(([a, b]) => ({ plan: createPlan(subChunk(whole, swaIds, pages, a, b), planOptions), queryOffset: a, numQueries: b - a }));
  return madePlan(split, shards, whole.numQueries);
}

export interface ShardedLayerArgs extends Omit<PrefillLayerArgs, 'plan' | 'q' | 'caches' | 'topkIndices' | 'attnSink'> {
  plan: ShardedPlan;
  /**
   * bf16 [numQueries, hQ, 512] on the host, split here (each shard its rows or heads); or one
   * tensor per shard already split (e.g. on each engine's device): [shard queries, shard heads, 512].
   */
  q: Tensor<'bf16'> | readonly (Tensor<'bf16'> | DeviceTensor<'bf16'>)[];
  /** the layer's caches for every engine, or one set per engine (device caches live on one device) */
  caches: PlanCaches | readonly PlanCaches[];
  /** ratio 4: int32 [numQueries, topk] on the host, or one per shard already split (its queries' rows) */
  topkIndices?: Tensor<'int32'> | readonly (Tensor<'int32'> | DeviceTensor<'int32'>)[];
  /** float32 [hQ] */
  attnSink?: Tensor<'float32'>;
}

export interface ShardResult<P extends Placement> extends PrefillLayerResult<P> {
  readonly queryOffset: number;
  readonly numQueries: number;
  readonly headOffset: number;
  readonly heads: number;
}

export interface ShardedLayerResult<P extends Placement = 'host'> {
  /** gathered on the host (output 'host'); absent with output 'device' */
  out?: Tensor<'bf16'>;
  lse?: Tensor<'float32'>;
  maxLogits?: Tensor<'float32'>;
  /** top-k entries dropped as not yet visible, over the chunk */
  dropped: number;
  /** each engine's part, its outputs where `output` says */
  shards: ShardResult<P>[];
}

function sliceHeads<T extends Uint16Array | Float32Array>(data: T, rows: number, hQ: number, width: number, h0: number, h1: number, into?: T): T {
  const hs = h1 - h0;
  const out = into ?? new (data.constructor as new (n: number) => T)(rows * hs * width);
  for (let i = 0; i < rows; i++) out.set(data.subarray((i * hQ + h0) * width, (i * hQ + h1) * width), i * hs * width);
  return out;
}

/**
 * A shard's heads [h0, h1) of the chunk's host q, as they are at the call: cut straight into a slab
 * lent by the shard engine's staging and marked as the call's copy (staging.ts, lendCallCopy), which
 * the shard's layer takes as it is and its ops read in place — one copy of q, where a cut copy that
 * the layer copied again was two. Checked against the engine's memory budget first, with the
 * shard's host outputs. A plain cut copy where the engine has no open staging (disposed: the layer
 * is refused with DISPOSED once every shard's arguments are checked, before any shard runs).
 */
function shardHeadsAtCall(engine: Engine, q: Tensor<'bf16'>, rows: number, hQ: number, h0: number, h1: number, output: Placement): { q: Tensor<'bf16'>; release: (() => void) | undefined } {
  const shape = [rows, h1 - h0, WORKSPACE_ROW_DIMS];
  const memory = (engine as SparseMlaEngine).hostMemory();
  const arena = memory.staging;
  if (arena === undefined || arena.closed) return { q: tensor('bf16', shape, sliceHeads(q.data, rows, hQ, WORKSPACE_ROW_DIMS, h0, h1)), release: undefined };
  const length = rows * (h1 - h0) * WORKSPACE_ROW_DIMS;
  if (memory.budgetBytes !== undefined) {
    const outputs = output === 'host' ? attentionOutputBytes(rows, h1 - h0, WORKSPACE_ROW_DIMS) : 0;
    checkCallMemory('prefillLayerSharded', 'q', [{ what: "a copy of the shard's heads of q at the call", bytes: length * 2 }, { what: 'outputs', bytes: outputs }], memory.budgetBytes);
  }
  const lent = lendCallCopy(arena, Uint16Array, length);
  sliceHeads(q.data, rows, hQ, WORKSPACE_ROW_DIMS, h0, h1, lent.view);
  return { q: tensor('bf16', shape, lent.view), release: lent.release };
}

/** The width of a host top-k of the chunk's `nq` queries ([nq, topk] or [nq, 1, topk], as prefillLayer takes it). */
function hostTopkWidth(t: Tensor<'int32'>, nq: number): number {
  const s = t.shape;
  if ((s.length !== 2 && !(s.length === 3 && s[1] === 1)) || s[0] !== nq) fail('INVALID_SHAPE', 'topkIndices', `[numQueries = ${nq}, topk] or [${nq}, 1, topk]`, `[${s.join(', ')}]`);
  return s[s.length - 1]!;
}

/**
 * An array's elements read once each into an array of the library's own (null for anything but an
 * array): its length once, then each element by index. Not slice(), which makes its result with the
 * array's own constructor (an array whose prototype is Int32Array's threw a TypeError) and reads as
 * many elements as a Proxy's length claims: a length that is no count reads as none, and no more
 * than MAX_SHARDS + 1 are read (no list of engines, nor one per engine, is longer; such a list is
 * refused by its length).
 */
function readArray<T>(v: unknown): T[] | null {
  if (!Array.isArray(v)) return null;
  const length: unknown = v.length;
  const n = isCount(length) ? Math.min(length, MAX_SHARDS + 1) : 0;
  const out: T[] = [];
  for (let i = 0; i < n; i++) out.push(v[i] as T);
  return out;
}

/**
 * One set of caches for every engine, its fields and each cache's fields read once into objects of
 * the library's own (a field that is undefined stays absent): every shard's check reads these, not
 * the caller's objects again (each shard's check read each cache's format, pageSize, numPages and
 * data: a getter answering otherwise gave one shard another cache). Anything but an object as it
 * is, for the check to refuse.
 */
function fieldsOnce(caches: unknown): PlanCaches {
  if (typeof caches !== 'object' || caches === null) return caches as PlanCaches;
  const given = caches as PlanCaches;
  const swa = cacheOnce(given.swa), c4 = cacheOnce(given.c4), c128 = cacheOnce(given.c128);
  return { ...(swa !== undefined ? { swa } : {}), ...(c4 !== undefined ? { c4 } : {}), ...(c128 !== undefined ? { c128 } : {}) };
}

/** A cache's fields read once into an object of the library's own; anything but an object as it is. */
function cacheOnce<C>(cache: C): C {
  if (typeof cache !== 'object' || cache === null || Array.isArray(cache)) return cache;
  const c = cache as { format?: unknown; pageSize?: unknown; numPages?: unknown; data?: unknown };
  return { format: c.format, pageSize: c.pageSize, numPages: c.numPages, data: c.data } as C;
}

/**
 * The caller's env as every shard's router reads it: its SPARSE_MLA_PREFILL read once, when the
 * first router asks for it (a forced path's asks nothing), and given to the others as read (each
 * shard's router read the caller's object again: a getter answering otherwise gave shards other
 * paths). Anything but an object as it is, for the router to refuse or pass over.
 */
function envOnce(env: ShardedLayerArgs['env']): ShardedLayerArgs['env'] {
  if (typeof env !== 'object' || env === null) return env;
  let read = false, value: string | undefined;
  return {
    get [SPARSE_PREFILL_ENV]() {
      if (!read) {
        value = env[SPARSE_PREFILL_ENV];
        read = true;
      }
      return value;
    },
  };
}

/** One attention layer of a sharded chunk: each engine runs its shard, all at once. */
export async function prefillLayerSharded<P extends Placement = 'host'>(givenEngines: readonly Engine[], args: ShardedLayerArgs, options?: { output?: P }): Promise<ShardedLayerResult<P>> {
  checkArgsObject(args, 'args');
  const { plan, compressRatio } = args;
  if (!ShardedPlan.isShardedPlan(plan)) fail('INVALID_VALUE', 'plan', 'a ShardedPlan from createShardedPlan() (not one made by its constructor, a Proxy of one, nor an object inheriting from one)', describe(plan));
  // the caller's arrays (the engines; a per-shard q, top-k or caches) taken once, element by
  // element: what is checked is what runs, whatever a Proxy or an element getter answers later
  const engines = readArray<Engine>(givenEngines);
  if (engines === null || engines.length !== plan.shards.length) fail('INVALID_VALUE', 'engines', `${plan.shards.length} engines (one per shard)`, describe(givenEngines));
  engines.forEach((e, s) => checkEngine(e, `engines[${s}]`));
  const output = checkOutputOption(options);
  const perShard = <T>(v: T | readonly T[] | undefined, argument: string): readonly T[] | null => {
    const a = readArray<T>(v);
    if (a === null) return null;
    if (a.length !== engines.length) fail('INVALID_VALUE', argument, `one per engine (${engines.length})`, `${a.length}`);
    return a;
  };
  // each argument read once
  const qArg = args.q, topkArg = args.topkIndices, cachesArg = args.caches;
  const qs = perShard(qArg, 'q'), topks = perShard(topkArg, 'topkIndices');
  const caches = perShard(cachesArg, 'caches');
  // one set for every engine: its fields read once here, so a getter of theirs runs before the
  // check that the memory already checked is still whole, not between the shards' slices
  const sharedCaches = caches ? undefined : fieldsOnce(cachesArg);
  // the chunk's head count: from the host q, or summed over a split by heads
  let hQ: number;
  let q: Tensor<'bf16'> | null = null;
  // each shard's q as its check read it (each element and its shape read once): the heads and the
  // shard calls use these, never the caller's objects again (a getter could answer otherwise)
  let shardQs: (Tensor<'bf16'> | DeviceTensor<'bf16'>)[] | null = null;
  if (qs) {
    const heads: number[] = [];
    shardQs = [];
    for (let s = 0; s < qs.length; s++) {
      const t = checkPlacedTensor(qs[s], `q[${s}]`, ['bf16']);
      const shape = checkRank(t, `q[${s}]`, 3, '[shard queries, shard heads, 512]');
      // split by queries: every shard holds all the heads, so all of them hold as many
      if (plan.split === 'queries' && s > 0 && shape[1] !== heads[0]) {
        fail('INVALID_SHAPE', `q[${s}]`, `[shard queries, hQ = ${heads[0]} (q[0]'s heads; a split by queries gives every shard all the heads), 512]`, `[${shape.join(', ')}]`);
      }
      heads.push(shape[1]!);
      shardQs.push(t);
    }
    hQ = plan.split === 'heads' ? heads.reduce((a, b) => a + b, 0) : heads[0]!;
  } else {
    q = checkTensor(qArg, 'q', ['bf16']);
    const [nq] = checkRank(q, 'q', 3, '[numQueries, hQ, 512]');
    hQ = q.shape[1]!;
    if (nq !== plan.numQueries || q.shape[2] !== WORKSPACE_ROW_DIMS) fail('INVALID_SHAPE', 'q', `[numQueries = ${plan.numQueries}, hQ, ${WORKSPACE_ROW_DIMS}]`, `[${q.shape.join(', ')}]`);
  }
  const nq = plan.numQueries;
  const topk = topks || topkArg === undefined ? undefined : checkTensor(topkArg, 'topkIndices', ['int32']);
  // the host top-k is cut into query ranges here: [numQueries, topk] or [numQueries, 1, topk]
  const topkWidth = topk && hostTopkWidth(topk, nq);
  const sinkArg = args.attnSink;
  const sink = sinkArg == null ? undefined : checkTensor(sinkArg, 'attnSink', ['float32']); // null: no sink, as the ops take it
  if (sink && (sink.shape.length !== 1 || sink.shape[0] !== hQ)) fail('INVALID_SHAPE', 'attnSink', `[hQ = ${hQ}]`, `[${sink.shape.join(', ')}]`);
  const heads =
    plan.split === 'heads'
      ? shardQs
        ? shardQs.reduce<Array<[number, number]>>((r, t) => [...r, [r.length ? r[r.length - 1]![1] : 0, (r.length ? r[r.length - 1]![1] : 0) + t.shape[1]!]], [])
        : evenRanges(hQ, engines.length)
      : engines.map((): [number, number] => [0, hQ]);
  if (plan.split === 'heads' && heads.some(([h0, h1]) => h1 === h0)) fail('INVALID_VALUE', 'engines', `at most hQ = ${hQ} engines for a split by heads`, `${engines.length}`);

  // named, not spread: a field the args object inherits counts as it does for prefillLayer
  const { smScale, path, threshold, env } = args;
  const rest = { smScale, path, threshold, env: envOnce(env) };
  // the rest's getters ran after q, the top-k and the sink were checked: are they still that memory?
  checkViewsIntact({ q: q?.data, topk: topk?.data, sink: sink?.data });
  // every shard's call checked before any shard runs: a bad one (its engine, caches, q, top-k) is
  // refused before any work, not after the shards before it started theirs (and the shards checked
  // before it give back the copies they took at the call)
  const calls: { engine: SparseMlaEngine; call: CheckedLayer; part: Omit<ShardResult<P>, keyof PrefillLayerResult<P>>; release: (() => void) | undefined }[] = [];
  // every shard's q, top-k and sink cut from the memory just found whole, before any shard's check
  // reads the caches (whose getters could detach that memory between one shard's cut and the next)
  const parts: { q: Tensor<'bf16'> | DeviceTensor<'bf16'>; topk: Tensor<'int32'> | DeviceTensor<'int32'> | undefined; sink: Tensor<'float32'> | undefined; release: (() => void) | undefined }[] = [];
  try {
    plan.shards.forEach((shard, s) => {
      const [h0, h1] = heads[s]!;
      const a = shard.queryOffset, n = shard.numQueries;
      if (plan.split === 'heads') {
        const cut = shardQs ? { q: shardQs[s]!, release: undefined } : shardHeadsAtCall(engines[s]!, q!, n, hQ, h0, h1, output);
        parts.push({ q: cut.q, topk: topks ? topks[s] : topk, sink: sink && tensor('float32', [h1 - h0], sink.data.subarray(h0, h1)), release: cut.release });
      } else {
        parts.push({
          q: shardQs ? shardQs[s]! : tensor('bf16', [n, hQ, WORKSPACE_ROW_DIMS], q!.data.subarray(a * hQ * WORKSPACE_ROW_DIMS, (a + n) * hQ * WORKSPACE_ROW_DIMS)),
          topk: topks ? topks[s] : topk && tensor('int32', [n, topkWidth!], topk.data.subarray(a * topkWidth!, (a + n) * topkWidth!)),
          sink,
          release: undefined,
        });
      }
    });
    plan.shards.forEach((shard, s) => {
      const [h0, h1] = heads[s]!;
      const { q: shardQ, topk: shardTopk, sink: shardSink, release } = parts[s]!;
      const engine = engines[s]!;
      // (a host q or sink: the shard's call goes to the full checks at once, which the device checks would stop at)
      const call = checkLayer(engine, {
        ...rest,
        compressRatio,
        plan: shard.plan,
        q: shardQ,
        caches: caches ? caches[s]! : sharedCaches!,
        ...(shardTopk ? { topkIndices: shardTopk } : {}),
        ...(shardSink ? { attnSink: shardSink } : {}),
      }, { output }, `engines[${s}]`, shardSink !== undefined || !isDeviceBuffer(shardQ.data));
      calls.push({ engine: engine as SparseMlaEngine, call, part: { queryOffset: shard.queryOffset, numQueries: shard.numQueries, headOffset: h0, heads: h1 - h0 }, release });
    });
    // a disposed engine's shard would reject with DISPOSED only when it runs, after every other
    // shard had run its whole layer for nothing: refused here, once the arguments are checked (as
    // prefillLayer refuses them first) and before any shard starts
    for (const c of calls) c.engine.assertAlive();
  } catch (e) {
    for (const c of calls) releaseLayer(c.call);
    for (const p of parts) p.release?.();
    throw e;
  }
  const settled = await Promise.allSettled(
    calls.map(async ({ engine, call, part, release }) => {
      try {
        return { ...(await runLayer(engine, call)), ...part } as ShardResult<P>;
      } finally {
        release?.();
      }
    }),
  );
  // every shard has settled: when one failed, the others' device outputs are freed (nobody gets
  // them) and the first failure, in shard order, is thrown
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed !== undefined) {
    for (const r of settled) if (r.status === 'fulfilled') for (const t of [r.value.out, r.value.lse, r.value.maxLogits]) releaseDevice(t.data);
    throw failed.reason;
  }
  const results = settled.map((r) => (r as PromiseFulfilledResult<ShardResult<P>>).value);
  const dropped = plan.split === 'heads' ? results[0]!.dropped : results.reduce((t, r) => t + r.dropped, 0);
  if (output === 'device') return { dropped, shards: results };

  // gather on the host: rows by query range, or heads within every row
  const out = new Uint16Array(nq * hQ * WORKSPACE_ROW_DIMS), lse = new Float32Array(nq * hQ), maxLogits = new Float32Array(nq * hQ);
  for (const r of results) {
    const o = (r.out as Tensor<'bf16'>).data, l = (r.lse as Tensor<'float32'>).data, m = (r.maxLogits as Tensor<'float32'>).data;
    for (let i = 0; i < r.numQueries; i++) {
      const row = (r.queryOffset + i) * hQ + r.headOffset;
      out.set(o.subarray(i * r.heads * WORKSPACE_ROW_DIMS, (i + 1) * r.heads * WORKSPACE_ROW_DIMS), row * WORKSPACE_ROW_DIMS);
      lse.set(l.subarray(i * r.heads, (i + 1) * r.heads), row);
      maxLogits.set(m.subarray(i * r.heads, (i + 1) * r.heads), row);
    }
  }
  return {
    out: tensor('bf16', [nq, hQ, WORKSPACE_ROW_DIMS], out),
    lse: tensor('float32', [nq, hQ], lse),
    maxLogits: tensor('float32', [nq, hQ], maxLogits),
    dropped,
    shards: results,
  };
}
