/**
 * What a plan keeps in one memory for the layers of its chunk (LayerResources), and the records a
 * queued workspace layer is made of (its combine, dequants and prefill).
 */
import { isDeviceBuffer, releaseDevice } from '../tensor.js';
import type { Placement } from '../types.js';
import type { CacheView, LayerSteps, PlannedRows, PlanRowsJob, QueuedLayerJob, WorkspaceDequantizeJob, WorkspacePrefillJob } from '../backends/backend.js';
import type { HostRows, HostTopkRows } from '../backends/wasm/planner.js';
import { WORKSPACE_ROW_DIMS } from './chunk_geometry.js';
import type { CheckedTopk } from './plan_checks.js';
import type { CompressRatio, PagedForm, PlanDeviceStats, PlanStats, WorkspaceLayout } from './types.js';

/**
 * The dropped totals a plan's c4 layers left to come back ({ dropped: 'later' }), each counting
 * itself in plan.stats.c4Dropped when it lands; a read that fails is kept for settleDropped to throw.
 */
export class DroppedReads {
  readonly #pending = new Set<Promise<unknown>>();
  #error: unknown = undefined;

  track(read: Promise<unknown>): void {
    const settled = read.then(undefined, (e: unknown) => {
      this.#error ??= e;
    });
    this.#pending.add(settled);
    void settled.finally(() => this.#pending.delete(settled));
  }

  /** Waits for every read (those made meanwhile too); throws the first failure, once. */
  async settle(): Promise<void> {
    while (this.#pending.size > 0) await Promise.all([...this.#pending]);
    const e = this.#error;
    this.#error = undefined;
    if (e !== undefined) throw e;
  }
}

/** What a plan's LayerResources read of it (the plan's own arrays, never modified). */
export interface PlanParts {
  readonly seqLens: Int32Array;
  readonly extendLens: Int32Array;
  readonly window: number;
  readonly numQueries: number;
  readonly workspaceBytes: number;
  readonly swaTokenIds: BigInt64Array;
  readonly stats: PlanStats;
  readonly deviceStats: PlanDeviceStats;
  /** the dropped counts of layers run with { dropped: 'later' } still being read */
  readonly droppedReads: DroppedReads;
  denseWidth(ratio: 0 | 128): number;
  compressed(ratio: 4 | 128): { pageTables: Int32Array; pageTableOffsets: Float64Array; pageSize: number; rows: number };
}

/** One ratio's index rows in some memory: int32 [numQueries, width] rows and [numQueries] lengths. */
export interface LayerRows<B = never> {
  readonly width: number;
  readonly rows: Int32Array | B;
  readonly lens: Int32Array | B;
}

/** A c4 layer's rows, and its dropped entries once read (they come back while the layer runs). */
export interface C4LayerRows<B = never> extends LayerRows<B> {
  readonly dropped: Promise<number>;
  /** where the dropped total was summed (a device buffer on a device): given back with the rows */
  readonly droppedTotal: number | B | null;
}

// The queued layer's records are made by constructors, as plan_checks.ts's are, and for the same reason.

/** A queued c4 layer's combine (QueuedLayerJob.planRows) into the rows an earlier layer gave back. */
class QueuedCombine<B> implements PlanRowsJob<B> {
  declare readonly seqLens: Int32Array;
  declare readonly extendLens: Int32Array;
  declare readonly window: number;
  declare readonly ratio: 4;
  declare readonly topkIndices: Int32Array | B;
  declare readonly topk: number;
  declare readonly width: number;
  declare readonly into: PlannedRows<B>;
  constructor(p: PlanParts, topk: CheckedTopk<B>, into: PlannedRows<B>) {
    this.seqLens = p.seqLens;
    this.extendLens = p.extendLens;
    this.window = p.window;
    this.ratio = 4;
    this.topkIndices = topk.data;
    this.topk = topk.topk;
    this.width = topk.width;
    this.into = into;
  }
}

/** A queued layer's dequant of `n` rows of a cache into its workspace from row `rowOffset`. */
class QueuedDequant<B> implements WorkspaceDequantizeJob<B> {
  declare readonly cache: CacheView<B>;
  declare readonly tokenIds: BigInt64Array | B;
  declare readonly n: number;
  declare readonly workspace: Uint16Array | B;
  declare readonly rowOffset: number;
  constructor(cache: CacheView<B>, tokenIds: BigInt64Array | B, n: number, workspace: Uint16Array | B, rowOffset: number) {
    this.cache = cache;
    this.tokenIds = tokenIds;
    this.n = n;
    this.workspace = workspace;
    this.rowOffset = rowOffset;
  }
}

/**
 * A workspace layer's dequants: the compressed cache's rows first (from row 0), then the SWA cache's
 * (after them); a cache without ids has none. The queued and the stepwise layer both run these.
 */
export function workspaceDequants<B>(caches: { swa: CacheView<B>; compressed?: CacheView<B> }, workspace: Uint16Array | B, compressedIds: BigInt64Array | B | null, compressedRows: number, swaIds: BigInt64Array | B | null, swaRows: number): WorkspaceDequantizeJob<B>[] {
  // (pushed: a layer with both kinds of rows, the usual one, runs every line)
  const dequants: WorkspaceDequantizeJob<B>[] = [];
  if (compressedIds !== null) dequants.push(new QueuedDequant(caches.compressed!, compressedIds, compressedRows, workspace, 0));
  if (swaIds !== null) dequants.push(new QueuedDequant(caches.swa, swaIds, swaRows, workspace, compressedRows));
  return dequants;
}

/** A queued layer's sparsePrefill over its workspace rows. */
class QueuedPrefill<B> implements WorkspacePrefillJob<B> {
  declare readonly q: Uint16Array | B;
  declare readonly workspace: Uint16Array | B;
  declare readonly rows: number;
  declare readonly indices: Int32Array | B;
  declare readonly lengths: Int32Array | B;
  declare readonly attnSink: Float32Array | B | null;
  declare readonly numQueries: number;
  declare readonly hQ: number;
  declare readonly width: number;
  declare readonly smScale: number;
  constructor(call: QueuedLayerCall<B>, workspace: Uint16Array | B, rows: LayerRows<B>, numQueries: number) {
    const sink = call.attnSink;
    this.q = call.q.data;
    this.workspace = workspace;
    this.rows = call.layout.rows;
    this.indices = rows.rows;
    this.lengths = rows.lens;
    this.attnSink = sink === undefined ? null : sink.data;
    this.numQueries = numQueries;
    this.hQ = call.hQ;
    this.width = rows.width;
    this.smScale = call.smScale;
  }
}

/** A workspace layer the steps queue whole (LayerSteps.queueLayer). */
class QueuedJob<B> implements QueuedLayerJob<B> {
  declare readonly owner: object;
  declare readonly planRows: QueuedCombine<B> | null;
  declare readonly dequants: WorkspaceDequantizeJob<B>[];
  declare readonly prefill: QueuedPrefill<B>;
  constructor(owner: object, planRows: QueuedCombine<B> | null, dequants: WorkspaceDequantizeJob<B>[], prefill: QueuedPrefill<B>) {
    this.owner = owner;
    this.planRows = planRows;
    this.dequants = dequants;
    this.prefill = prefill;
  }
}

/** What LayerResources.queuedJob reads of a layer call (prefill_layer's LayerCall), every operand in device memory. */
export interface QueuedLayerCall<B> {
  readonly ratio: CompressRatio;
  readonly layout: WorkspaceLayout;
  readonly q: { readonly data: Uint16Array | B };
  readonly hQ: number;
  readonly attnSink: { readonly data: Float32Array | B } | undefined;
  readonly smScale: number;
  readonly caches: { readonly swa: CacheView<B>; readonly compressed?: CacheView<B> };
  readonly topk: CheckedTopk<B> | undefined;
}

/** Kept on the host, or on a device and not freed. */
const usable = (x: unknown): boolean => !isDeviceBuffer(x) || !x.freed;

/** A paged form (PagedForm) in a layer's memory: its arrays and their row widths. */
export interface PlacedPagedForm<B = never> {
  readonly mainWidth: number;
  readonly main: Int32Array | B;
  readonly mainLengths: Int32Array | B;
  /** 0 when there is no extra set */
  readonly extraWidth: number;
  readonly extra?: Int32Array | B;
  readonly extraLengths?: Int32Array | B;
}
/**
 * @internal A layer's paged form as Plan.peekPagedForm reads or builds it, keeping and counting
 * nothing (a layer's budget check reads it at the call); where the check passes, the layer hands it
 * to Plan.layerPagedForm, which keeps and counts what the peek built as combinedRows / combineC4
 * and pagedForm would have, so nothing is built twice.
 */
export interface PeekedPagedForm {
  readonly main: Int32Array;
  readonly mainLengths: Int32Array;
  readonly mainWidth: number;
  readonly extra?: Int32Array;
  readonly extraLengths?: Int32Array;
  /** 0 when there is no extra set */
  readonly extraWidth: number;
  /** what the peek built that the plan did not keep (layerPagedForm keeps it) */
  readonly built: PeekBuilt;
}

/** What a peek built: a c4 layer's combine, or c0 / c128 rows the plan did not keep; compressed ids; the form's sets. */
export interface PeekBuilt {
  readonly ratio: CompressRatio;
  readonly c4?: { readonly rows: HostTopkRows; readonly topk: number; readonly width: number };
  readonly dense?: LayerRows;
  readonly compIds?: BigInt64Array;
  readonly main?: HostRows;
  readonly extra?: HostRows;
}

const placedFormUsable = (f: PlacedPagedForm<unknown>): boolean => usable(f.main) && usable(f.mainLengths) && (f.extra === undefined || (usable(f.extra) && usable(f.extraLengths)));

/** Frees a placed paged form's device buffers (host arrays are left to the collector). */
function releasePlacedForm(f: PlacedPagedForm<unknown>): void {
  releaseDevice(f.main);
  releaseDevice(f.mainLengths);
  releaseDevice(f.extra);
  releaseDevice(f.extraLengths);
}

/** The build in flight under `key`, else a new one: concurrent layers (sharded by heads, say) build once. */
function buildOnce<K, V>(inFlight: Map<K, Promise<V>>, key: K, build: () => Promise<V>): Promise<V> {
  let p = inFlight.get(key);
  if (!p) {
    p = build().finally(() => inFlight.delete(key));
    inFlight.set(key, p);
  }
  return p;
}

/**
 * What a plan keeps in one memory for the layers of its chunk, built by that memory's layer steps
 * when first needed: the c0 / c128 rows, each ratio's compressed gather ids, the SWA gather ids and
 * the workspace. The host's is shared by every host engine (and by the plan's own combinedRows and
 * compressedTokenIds); a cuda engine has its own (Plan.resources). Builds are counted in
 * plan.stats (host) or plan.deviceStats (device).
 */
export class LayerResources<B = never> {
  readonly memory: Placement;
  readonly #plan: PlanParts;
  readonly #dense = new Map<0 | 128, LayerRows<B>>();
  /** each ratio's compressed gather ids (fields, not a Map: a queued layer reads one) */
  #c4Ids?: BigInt64Array | B;
  #c128Ids?: BigInt64Array | B;
  #swaIds?: BigInt64Array | B;
  #workspace?: Uint16Array | B;
  #c4Rows?: C4LayerRows<B>;
  readonly #denseInFlight = new Map<0 | 128, Promise<LayerRows<B>>>();
  readonly #idsInFlight = new Map<4 | 128 | 'swa', Promise<BigInt64Array | B>>();
  readonly #pagedForms = new Map<0 | 128, PlacedPagedForm<B>>();
  readonly #pagedInFlight = new Map<0 | 128, Promise<PlacedPagedForm<B>>>();

  constructor(plan: PlanParts, memory: Placement) {
    this.#plan = plan;
    this.memory = memory;
  }

  /** The rows of a c0 / c128 layer: built once, then reused by every layer of the ratio. */
  async denseRows(steps: LayerSteps<B>, ratio: 0 | 128): Promise<LayerRows<B>> {
    return (
      this.keptDenseRows(ratio) ??
      buildOnce(this.#denseInFlight, ratio, async () => {
        const p = this.#plan;
        const width = p.denseWidth(ratio);
        const r = await steps.planRows({ seqLens: p.seqLens, extendLens: p.extendLens, window: p.window, ratio, topkIndices: null, topk: 0, width });
        return this.keepDenseRows(ratio, { width, rows: r.rows, lens: r.lens });
      })
    );
  }

  keptDenseRows(ratio: 0 | 128): LayerRows<B> | undefined {
    const have = this.#dense.get(ratio);
    return have && usable(have.rows) && usable(have.lens) ? have : undefined;
  }

  /** Keeps rows built for a ratio and counts the build; rows kept meanwhile (the plan's own build) win. */
  keepDenseRows(ratio: 0 | 128, rows: LayerRows<B>): LayerRows<B> {
    const have = this.keptDenseRows(ratio);
    if (have) {
      releaseDevice(rows.rows);
      releaseDevice(rows.lens);
      return have;
    }
    this.#dense.set(ratio, rows);
    const { stats, deviceStats } = this.#plan;
    if (this.memory === 'host') stats[ratio === 0 ? 'c0Builds' : 'c128Builds']++;
    else deviceStats[ratio === 0 ? 'deviceC0Builds' : 'deviceC128Builds']++;
    return rows;
  }

  /**
   * A c4 layer's rows from its indexer's top-k (checked by Plan.checkTopk), built per layer: on a
   * device into the buffers an earlier c4 layer of the same width gave back (giveBackC4Rows), so a
   * layer allocates nothing before its first launch. The dropped counts are read back without
   * holding up what the caller queues next.
   */
  async combineC4(steps: LayerSteps<B>, topk: CheckedTopk<B>): Promise<C4LayerRows<B>> {
    const p = this.#plan;
    const into = this.#takeC4Rows(topk.width);
    let r;
    try {
      r = await steps.planRows(this.#c4Job(topk, into));
    } catch (e) {
      if (into) this.#releaseC4Rows(into);
      throw e;
    }
    this.#countC4Combine();
    if (this.memory === 'device' && !into) p.deviceStats.deviceC4RowAllocations++;
    const dropped = r.droppedTotal === null ? Promise.resolve(0) : this.#countDropped(steps, r.droppedTotal);
    return { width: topk.width, rows: r.rows, lens: r.lens, droppedTotal: r.droppedTotal, dropped };
  }

  /**
   * The job of a workspace layer the steps queue whole (LayerSteps.queueLayer), over the call's
   * checked operands (`call`: every one in device memory) and what this memory keeps: the gather
   * ids, the c0 / c128 rows or, for c4, the rows an earlier c4 layer gave back to combine into,
   * and the workspace, taken for it (give them back with giveBackWorkspace and giveBackC4Rows
   * once the queue call has settled, and count the layer with countQueuedLayer once its dropped
   * total is in). Undefined, with nothing taken, when one of those is not kept (a plan's first
   * layers: they run step by step and keep it). One method, each kept thing read once: it runs on
   * every queued layer, mostly before V8 has optimized it.
   */
  queuedJob(steps: LayerSteps<B>, call: QueuedLayerCall<B>): QueuedLayerJob<B> | undefined {
    const ratio = call.ratio, layout = call.layout;
    const compressedRows = layout.compressedRows, swaRows = layout.swaRows;
    let compressedIds: BigInt64Array | B | null = null;
    if (compressedRows > 0) {
      const ids = ratio === 4 ? this.#c4Ids : this.#c128Ids;
      if (ids === undefined || !usable(ids)) return undefined;
      compressedIds = ids;
    }
    let swaIds: BigInt64Array | B | null = null;
    if (swaRows > 0) {
      const ids = this.#swaIds;
      if (ids === undefined || !usable(ids)) return undefined;
      swaIds = ids;
    }
    const p = this.#plan;
    let rows: LayerRows<B>;
    let planRows: QueuedCombine<B> | null = null;
    if (ratio === 4) {
      const topk = call.topk!;
      const into = this.#takeC4Rows(topk.width);
      if (into === undefined) return undefined;
      rows = into;
      planRows = new QueuedCombine(p, topk, into);
    } else {
      const dense = this.keptDenseRows(ratio);
      if (dense === undefined) return undefined;
      rows = dense;
    }
    const ws = this.takeWorkspace(steps);
    const dequants = workspaceDequants(call.caches, ws, compressedIds, compressedRows, swaIds, swaRows);
    return new QueuedJob(this, planRows, dequants, new QueuedPrefill(call, ws, rows, p.numQueries));
  }

  /**
   * A queued layer's output shapes, [numQueries, hQ, 512] and [numQueries, hQ], frozen and shared
   * by the layers of one hQ (a device output tensor is frozen with its shape; these never change).
   */
  outputShapes(hQ: number): readonly [readonly number[], readonly number[]] {
    const s = this.#outputShapes;
    return s !== undefined && s[1][1] === hQ ? s : this.#newOutputShapes(hQ);
  }

  #newOutputShapes(hQ: number): readonly [readonly number[], readonly number[]] {
    const nq = this.#plan.numQueries;
    return (this.#outputShapes = [Object.freeze([nq, hQ, WORKSPACE_ROW_DIMS]), Object.freeze([nq, hQ])]);
  }
  #outputShapes?: readonly [readonly number[], readonly number[]];

  /** Gives back what queuedJob took for `job` (its workspace, and a c4 layer's rows) when the steps did not queue it. */
  giveBackJob(job: QueuedLayerJob<B>): void {
    this.giveBackWorkspace(job.prefill.workspace);
    if (job.planRows !== null) this.giveBackC4Rows(job.planRows.into as C4LayerRows<B>);
  }

  /**
   * A layer the steps queued whole (queuedJob) has settled: gives back what its job took (giveBackJob)
   * and counts the layer, and its c4 combine with its dropped total (`dropped`, the steps' count) as
   * combineC4 counts its own. Gives the layer's dropped count: 0 without a combine, null where the
   * total comes later ({ dropped: 'later' }: counted once it lands, Plan.settleDropped).
   */
  queuedLayerDone(job: QueuedLayerJob<B>, dropped: number | Promise<number>): number | null {
    const p = this.#plan;
    this.giveBackJob(job);
    p.deviceStats.deviceQueuedLayers++;
    if (job.planRows === null) return 0;
    this.#countC4Combine();
    if (typeof dropped !== 'number') {
      p.droppedReads.track(dropped.then((n) => (p.stats.c4Dropped += n)));
      return null;
    }
    p.stats.c4Dropped += dropped;
    return dropped;
  }

  /** A stepwise c4 layer's dropped total ({ dropped: 'later' }), which combineC4 counts once read: the plan waits for it (settleDropped). */
  countLater(counted: Promise<number>): null {
    this.#plan.droppedReads.track(counted);
    return null;
  }

  /** A c4 combine's planner job over this plan's requests (into the rows `into`, when given). */
  #c4Job(topk: CheckedTopk<B>, into: PlannedRows<B> | undefined): PlanRowsJob<B> {
    const p = this.#plan;
    const job: PlanRowsJob<B> = { seqLens: p.seqLens, extendLens: p.extendLens, window: p.window, ratio: 4, topkIndices: topk.data, topk: topk.topk, width: topk.width };
    if (into !== undefined) job.into = into;
    return job;
  }

  #countC4Combine(): void {
    const p = this.#plan;
    p.stats.c4Combines++;
    if (this.memory === 'device') p.deviceStats.deviceC4Combines++;
  }

  /**
   * Takes back a c4 layer's rows once the layer has queued everything that reads them and its
   * dropped total has been read: a device keeps one set for the next c4 layer (stream order puts
   * that layer's combine after this one's readers); a concurrent layer finds none and allocates.
   */
  giveBackC4Rows(rows: C4LayerRows<B>): void {
    if (this.memory !== 'device') return;
    if (this.#c4Rows === undefined) this.#c4Rows = rows;
    else this.#releaseC4Rows(rows);
  }

  #takeC4Rows(width: number): C4LayerRows<B> | undefined {
    const have = this.#c4Rows;
    this.#c4Rows = undefined;
    return have !== undefined && have.width === width && usable(have.rows) && usable(have.lens) && usable(have.droppedTotal) ? have : this.#staleC4Rows(have);
  }

  /** #takeC4Rows where the kept rows (if any) do not serve: freed, none taken. */
  #staleC4Rows(have: C4LayerRows<B> | undefined): undefined {
    if (have !== undefined) this.#releaseC4Rows(have);
    return undefined;
  }

  #releaseC4Rows(rows: PlannedRows<B>): void {
    releaseDevice(rows.rows);
    releaseDevice(rows.lens);
    releaseDevice(rows.droppedTotal);
  }

  /** Reads a combine's dropped total and counts it in plan.stats. */
  #countDropped(steps: LayerSteps<B>, droppedTotal: number | B): Promise<number> {
    const p = this.#plan;
    return steps.readDroppedTotal(droppedTotal).then((total) => {
      p.stats.c4Dropped += total;
      return total;
    });
  }

  /**
   * A ratio's compressed gather ids (int64), built from the page tables once. The page tables were
   * checked against every cache they are used with (Plan.checkCaches), so every id is in range.
   */
  async compressedIds(steps: LayerSteps<B>, ratio: 4 | 128): Promise<BigInt64Array | B> {
    return (
      this.keptCompressedIds(ratio) ??
      buildOnce(this.#idsInFlight, ratio, async () => {
        const p = this.#plan;
        const t = p.compressed(ratio);
        const ids = await steps.planCompressedTokenIds({ seqLens: p.seqLens, extendLens: p.extendLens, ratio, pageTables: t.pageTables, pageTableOffsets: t.pageTableOffsets, pageSize: t.pageSize, total: t.rows });
        return this.keepCompressedIds(ratio, ids);
      })
    );
  }

  keptCompressedIds(ratio: 4 | 128): BigInt64Array | B | undefined {
    const have = ratio === 4 ? this.#c4Ids : this.#c128Ids;
    return have !== undefined && usable(have) ? have : undefined;
  }

  /** Keeps ids built for a ratio and counts the build; ids kept meanwhile (the plan's own build) win. */
  keepCompressedIds(ratio: 4 | 128, ids: BigInt64Array | B): BigInt64Array | B {
    const have = this.keptCompressedIds(ratio);
    if (have !== undefined) {
      releaseDevice(ids);
      return have;
    }
    if (ratio === 4) this.#c4Ids = ids;
    else this.#c128Ids = ids;
    if (this.memory === 'device') this.#plan.deviceStats.deviceCompressedIdBuilds++;
    return ids;
  }

  /** The SWA gather ids (checked against every cache by Plan.checkCaches), placed once. */
  async swaIds(steps: LayerSteps<B>): Promise<BigInt64Array | B> {
    return this.keptSwaIds() ?? buildOnce(this.#idsInFlight, 'swa', async () => {
      const ids = await steps.placeIds(this.#plan.swaTokenIds);
      if (this.memory === 'device') this.#plan.deviceStats.deviceUploads++;
      return (this.#swaIds = ids);
    });
  }

  keptSwaIds(): BigInt64Array | B | undefined {
    const have = this.#swaIds;
    return have !== undefined && usable(have) ? have : undefined;
  }

  /**
   * A c0 / c128 layer's paged form (`build`: the plan's, from its chunk-invariant rows) in the
   * steps' memory, placed once and reused by every layer of the ratio: on a device the paged path
   * then reads no host array, so its launch is stream-ordered like the workspace path's.
   */
  async pagedForm(steps: LayerSteps<B>, ratio: 0 | 128, build: () => PagedForm): Promise<PlacedPagedForm<B>> {
    return this.keptPagedForm(ratio) ?? buildOnce(this.#pagedInFlight, ratio, async () => {
      const form = build();
      // placed one by one: when one cannot be (no device memory), the ones placed before it are freed
      const arrays = [form.main.data, form.mainLengths.data, ...(form.extra && form.extraLengths ? [form.extra.data, form.extraLengths.data] : [])];
      const done: (Int32Array | B)[] = [];
      try {
        for (const a of arrays) done.push(await steps.placeRows(a));
      } catch (e) {
        for (const b of done) releaseDevice(b);
        throw e;
      }
      const placed: PlacedPagedForm<B> = {
        mainWidth: form.main.shape[1]!,
        main: done[0]!,
        mainLengths: done[1]!,
        extraWidth: form.extra?.shape[1] ?? 0,
        ...(done.length === 4 ? { extra: done[2]!, extraLengths: done[3]! } : {}),
      };
      const stale = this.#pagedForms.get(ratio);
      if (stale !== undefined) releasePlacedForm(stale);
      this.#pagedForms.set(ratio, placed);
      if (this.memory === 'device') this.#plan.deviceStats.deviceUploads++;
      return placed;
    });
  }

  /** The ratio's placed paged form, where it is kept and none of its buffers was freed. */
  keptPagedForm(ratio: 0 | 128): PlacedPagedForm<B> | undefined {
    const have = this.#pagedForms.get(ratio);
    return have !== undefined && placedFormUsable(have) ? have : undefined;
  }

  /**
   * The workspace: allocated once at the plan's largest layout and reused by every layer; a
   * concurrent layer gets a fresh one rather than sharing. Give it back with giveBackWorkspace.
   */
  takeWorkspace(steps: LayerSteps<B>): Uint16Array | B {
    const have = this.#workspace;
    this.#workspace = undefined;
    return have !== undefined && usable(have) ? have : this.#newWorkspace(steps);
  }

  /** takeWorkspace where none is kept (or the kept one was freed): a new one, counted. */
  #newWorkspace(steps: LayerSteps<B>): Uint16Array | B {
    if (this.memory === 'host') this.#plan.stats.workspaceAllocations++;
    else this.#plan.deviceStats.deviceWorkspaceAllocations++;
    return steps.allocWorkspace(this.#plan.workspaceBytes);
  }

  giveBackWorkspace(ws: Uint16Array | B): void {
    if (this.#workspace === undefined) this.#workspace = ws;
    else releaseDevice(ws);
  }

  /**
   * Drops everything kept (Plan.release): device buffers freed now (stream-ordered behind the work
   * queued on them), host arrays left to the collector. What a layer has taken and not yet given
   * back (its workspace, c4 rows) comes back and is kept as before.
   */
  release(): void {
    for (const r of this.#dense.values()) {
      releaseDevice(r.rows);
      releaseDevice(r.lens);
    }
    this.#dense.clear();
    for (const f of this.#pagedForms.values()) releasePlacedForm(f);
    this.#pagedForms.clear();
    for (const b of [this.#c4Ids, this.#c128Ids, this.#swaIds, this.#workspace]) releaseDevice(b);
    this.#c4Ids = this.#c128Ids = this.#swaIds = this.#workspace = undefined;
    if (this.#c4Rows !== undefined) this.#releaseC4Rows(this.#c4Rows);
    this.#c4Rows = undefined;
  }
}
