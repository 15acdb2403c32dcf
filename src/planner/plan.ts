/**
 * createPlan: validate a chunk and size its workspace against the budget, then keep what does not
 * change within the chunk (SPEC §6) for every layer to reuse: the SWA gather ids and each ratio's
 * page tables now; the c0/c128 combined rows, the compressed gather ids, the workspace and the paged
 * form when first used, once per memory they live in (LayerResources: the host's, or one cuda
 * engine's). Only the c4 combine runs per layer.
 *
 * What it checks of its inputs is in plan_checks.ts, its size rules in chunk_geometry.ts, what it
 * keeps per memory in layer_resources.ts.
 */
import { SparseMlaError, fail } from '../errors.js';
import { checkPlacedTensor, checkTensor, describe, INT32_MAX, NOT_READ, ownView, shapeStr, type TensorRead } from '../ops/common.js';
import { dimsOnce, formatBytes, tensor } from '../tensor.js';
import type { DeviceBuffer, Tensor } from '../types.js';
import type { CacheView, LayerSteps } from '../backends/backend.js';
import { loadHostPlanner, type HostPlanner, type HostTopkRows, type PlanLayoutTotals } from '../backends/wasm/planner.js';
import { DEFAULT_ALIGN, DEFAULT_WINDOW, gatherLength, roundUp, rowWidth, visibleEntries, WORKSPACE_ROW_DIMS } from './chunk_geometry.js';
import {
  badCompressedCache,
  badTopkShape,
  cacheTokens,
  CheckedCaches,
  checkInt,
  checkV4Cache,
  chunkOnce,
  deviceCacheView,
  idSource,
  INT32_DTYPE,
  MAX_UNUSED_PAGE_TABLE_ENTRIES,
  readIds,
  ratioNotServed,
  readIdValues,
  swaCacheTooSmall,
  topkTooLarge,
  TopkRows,
  type CachesRead,
  type CheckedTopk,
  type IdSource,
  type OwnedBufferCheck,
  type RequestFields,
} from './plan_checks.js';
import { DroppedReads, LayerResources, type LayerRows, type PeekBuilt, type PeekedPagedForm, type PlanParts } from './layer_resources.js';
import type {
  CombinedRows,
  CompressRatio,
  PagedForm,
  PlanCaches,
  PlanChunk,
  PlanDeviceStats,
  PlanOptions,
  PlanRequestLayout,
  PlanStats,
  WorkspaceLayout,
} from './types.js';

/**
 * Default cap on one layer's workspace: 1 GiB of bf16 rows (1M rows). Far above a 32K-token chunk
 * of long requests (~64K rows = 64 MiB) and well inside a 4 GiB WASM heap; raise it explicitly.
 */
export const DEFAULT_WORKSPACE_BUDGET_BYTES = 2 ** 30;

interface RatioState {
  layout: WorkspaceLayout;
  core: PlanLayoutTotals;
  pageSize: number;
  /** the page tables the compressed ids come from (each request's used pages, flattened) and their offsets */
  pageTables: Int32Array;
  pageTableOffsets: Float64Array;
  /** largest page id the plan reads (−1 when none) */
  maxPage: number;
}


/**
 * A Plan's public methods run on a plan: one called unbound (`const f = plan.settleDropped; f()`),
 * on a Proxy of a plan or on another object is INVALID_VALUE naming `this`, not a TypeError from
 * its private state.
 */
function planThis(self: unknown, method: string): void {
  if (!Plan.isPlan(self)) fail('INVALID_VALUE', 'this', `a Plan from createPlan() (call it as plan.${method}(...))`, describe(self));
}

/**
 * Rows a plan handed out (combinedRows, combineC4) as it handed them out, `made` the plan's own
 * arrays they are copies of: each tensor's fields read once, an int32 tensor of the plan's shape (its
 * array's kind by its tag, not instanceof: another kind's array dressed as an Int32Array is refused,
 * a detached one too) holding `made`'s values (in any memory: the same values are the same rows).
 * Else a SparseMlaError naming `rows`, before any work.
 */
function unchangedRows(rows: CombinedRows, made: LayerRows, numQueries: number): void {
  const expected = `int32 indices [${numQueries}, ${made.width}] and lengths [${numQueries}] as this plan made them`;
  for (const [key, shape, own] of [['indices', [numQueries, made.width], made.rows], ['lengths', [numQueries], made.lens]] as const) {
    const t: unknown = rows[key];
    if (typeof t !== 'object' || t === null) fail('INVALID_VALUE', 'rows', expected, `${key} ${describe(t)}`);
    const f = t as { dtype: unknown; shape: unknown; data: unknown };
    const dtype = f.dtype, given = f.shape, raw = f.data;
    const dims = Array.isArray(given) ? dimsOnce(given) : null;
    const data = ownView(raw, Int32Array, `rows.${key}.data`);
    if (dtype !== 'int32' || data === null) fail('INVALID_DTYPE', 'rows', expected, `${key} of dtype ${describe(dtype)} over ${describe(raw)}`);
    if (dims === null || dims.length !== shape.length || dims.some((d, i) => d !== shape[i]) || data.length !== own.length) {
      fail('INVALID_SHAPE', 'rows', expected, `${key} of shape ${dims === null ? describe(given) : shapeStr(dims)} over ${data.length} elements`);
    }
    for (let i = 0; i < own.length; i++) {
      if (data[i] !== own[i]) fail('INVALID_VALUE', 'rows', `${expected} (rows a plan hands out are read-only)`, `${key} ${data[i]} at ${i} where the plan made ${own[i]}`);
    }
  }
}

/** Validate a chunk and build its plan (see Plan). Throws a SparseMlaError before any allocation on bad input. */
export function createPlan(chunk: PlanChunk, options: PlanOptions = {}): Plan {
  return new Plan(chunk, options);
}

export class Plan {
  /** Whether `value` is a Plan createPlan made (a Proxy of one, or an object inheriting from one, is not: its private state is not there). */
  static isPlan(value: unknown): value is Plan {
    return typeof value === 'object' && value !== null && #maxSwaId in value;
  }

  readonly window: number;
  readonly align: number;
  readonly numRequests: number;
  readonly numQueries: number;
  /** which implementation of the C++ planner core builds the host rows */
  readonly core: 'wasm' = 'wasm';
  readonly requests: readonly PlanRequestLayout[];
  /** the compress ratios this plan serves: 0 always, 4 / 128 when their page size was given */
  readonly ratios: readonly CompressRatio[];
  /**
   * int64 [swaRows]: SWA cache token ids of every request's gather, request by request. A copy of
   * the ids the plan's layers gather (made once): writing into it changes nothing the plan computes.
   */
  readonly swaTokenIds: Tensor<'int64'>;
  /** the largest workspace any one layer of this chunk needs (bytes); what the budget was checked against */
  readonly workspaceBytes: number;
  readonly workspaceBudgetBytes: number;
  readonly stats: PlanStats = {
    c0Builds: 0,
    c128Builds: 0,
    c4Combines: 0,
    c4Dropped: 0,
    pagedMainBuilds: 0,
    pagedExtraBuilds: 0,
    workspaceAllocations: 0,
  };
  /** What prefillLayer kept on a device (cuda engines): uploads, GPU builds and c4 combines, device workspaces. */
  readonly deviceStats: PlanDeviceStats = { deviceUploads: 0, deviceCompressedIdBuilds: 0, deviceC0Builds: 0, deviceC128Builds: 0, deviceC4Combines: 0, deviceWorkspaceAllocations: 0, deviceC4RowAllocations: 0, deviceQueuedLayers: 0 };

  readonly #planner: HostPlanner;
  readonly #seqLens: Int32Array;
  readonly #extendLens: Int32Array;
  readonly #maxSwaId: number;
  /** each served ratio's state (fields, not a Map: a device layer's checks read one, mostly cold) */
  #c0!: RatioState;
  #c4: RatioState | undefined;
  #c128: RatioState | undefined;
  /** what the plan keeps on the host: shared by every host engine and by the methods below */
  readonly #host: LayerResources;
  /** what it keeps on each cuda engine, keyed by the engine's layer steps (freed with the engine's buffers) */
  readonly #device = new WeakMap<LayerSteps<DeviceBuffer>, LayerResources<DeviceBuffer>>();
  /** the same resources, for release() (weakly: they live as long as their engine's steps) */
  readonly #deviceResources: WeakRef<LayerResources<DeviceBuffer>>[] = [];
  readonly #parts: PlanParts;
  /** the c0 / c128 rows combinedRows hands out copies of (the host's, when it made them first) */
  readonly #combined = new Map<0 | 128, LayerRows>();
  #pagedMain?: { main: Tensor<'int32'>; mainLengths: Tensor<'int32'> };
  /** each made rows' extra set, keyed by the plan's own rows (every copy of them handed out shares it) */
  readonly #pagedExtra = new WeakMap<LayerRows, { extra?: Tensor<'int32'>; extraLengths?: Tensor<'int32'> }>();
  /**
   * The rows this plan handed out (combinedRows, combineC4), each to the arrays the plan made it
   * from: its own, never handed out (the rows' tensors hold copies). What the plan computes from rows
   * (pagedForm, peekPagedForm, its layers) reads these, whatever a caller did to the copies.
   */
  readonly #madeRows = new WeakMap<CombinedRows, LayerRows>();
  /** What this plan's peeks built and no layerPagedForm has kept yet (each is kept at most once). */
  readonly #peeks = new WeakSet<PeekBuilt>();

  constructor(chunk: PlanChunk, options: PlanOptions) {
    // every field of the chunk, its requests and the options read once: a getter or Proxy asked
    // again could answer otherwise (a request that became null, a list that shrank)
    const read = chunkOnce(chunk);
    if (read === null) fail('INVALID_VALUE', 'chunk', 'an object {requests: [...], c4PageSize?, c128PageSize?}', describe(chunk));
    if (typeof options !== 'object' || options === null) fail('INVALID_VALUE', 'options', 'an options object', describe(options));
    const window = (this.window = checkInt(options.window ?? DEFAULT_WINDOW, 'options.window', 1, 1 << 20));
    this.align = checkInt(options.align ?? DEFAULT_ALIGN, 'options.align', 1, 1 << 20);
    const budget = options.workspaceBudgetBytes ?? DEFAULT_WORKSPACE_BUDGET_BYTES;
    if (typeof budget !== 'number' || !(budget >= 0)) fail('INVALID_VALUE', 'options.workspaceBudgetBytes', 'a non-negative number of bytes', describe(budget));
    this.workspaceBudgetBytes = budget;
    const core = options.core;
    if (core !== undefined && core !== 'auto' && core !== 'wasm') fail('INVALID_VALUE', 'options.core', "'auto' or 'wasm'", describe(core));
    const planner = (this.#planner = loadHostPlanner('createPlan'));
    const n = (this.numRequests = read.requests.length);
    const pageSizes = new Map<4 | 128, number>();
    if (read.c4PageSize !== undefined) pageSizes.set(4, checkInt(read.c4PageSize, 'chunk.c4PageSize', 1, INT32_MAX));
    if (read.c128PageSize !== undefined) pageSizes.set(128, checkInt(read.c128PageSize, 'chunk.c128PageSize', 1, INT32_MAX));

    // Lengths first (cheap), so the layout and the budget check come before reading any ids.
    const seqLens = (this.#seqLens = new Int32Array(n));
    const extendLens = (this.#extendLens = new Int32Array(n));
    const reqs = read.requests as readonly RequestFields[];
    for (let r = 0; r < n; r++) {
      const q: unknown = reqs[r];
      if (typeof q !== 'object' || q === null) fail('INVALID_VALUE', `chunk.requests[${r}]`, 'a request {seqLen, extendLen, swaTokenIds, ...}', describe(q));
      const given = q as RequestFields;
      seqLens[r] = checkInt(given.seqLen, `chunk.requests[${r}].seqLen`, 0, INT32_MAX);
      extendLens[r] = checkInt(given.extendLen, `chunk.requests[${r}].extendLen`, 0, seqLens[r]!);
      for (const [ratio, key] of [[4, 'c4PageTable'], [128, 'c128PageTable']] as const) {
        if (given[key] !== undefined && !pageSizes.has(ratio)) {
          fail('INVALID_VALUE', `chunk.${ratio === 4 ? 'c4PageSize' : 'c128PageSize'}`, `a page size, since chunk.requests[${r}].${key} is given`, 'undefined');
        }
      }
    }
    // The chunk's totals, summed here in float64 (exact far beyond int32) before the core sums
    // them: the query count and each ratio's workspace rows must fit int32.
    let totalQueries = 0;
    let totalSwa = 0;
    const totalComp = new Map<4 | 128, number>();
    for (let r = 0; r < n; r++) {
      totalQueries += extendLens[r]!;
      totalSwa += gatherLength(seqLens[r]!, extendLens[r]!, window);
      for (const ratio of pageSizes.keys()) totalComp.set(ratio, (totalComp.get(ratio) ?? 0) + visibleEntries(seqLens[r]!, extendLens[r]!, ratio));
    }
    if (totalQueries > INT32_MAX) fail('TOO_LARGE', 'chunk.requests', `at most ${INT32_MAX} queries in a chunk (the sum of extendLen)`, `${totalQueries}`);
    for (const [ratio, rows] of [[0, 0] as const, ...totalComp]) {
      if (totalSwa + rows > INT32_MAX) {
        fail('TOO_LARGE', 'chunk.requests', `at most ${INT32_MAX} workspace rows (int32 row numbers)`, `${rows} compressed + ${totalSwa} SWA rows for ratio ${ratio}`);
      }
    }
    const swaLayout = planner.layout(seqLens, extendLens, window, 0);
    this.numQueries = swaLayout.numQueries;

    const ratios: CompressRatio[] = [0];
    const layouts = new Map<CompressRatio, { layout: WorkspaceLayout; core: PlanLayoutTotals }>();
    const mkLayout = (ratio: CompressRatio, core: PlanLayoutTotals): WorkspaceLayout => {
      const rows = core.compRows + core.swaRows;
      return { ratio, compressedRows: core.compRows, swaRows: core.swaRows, rows, bytes: rows * WORKSPACE_ROW_DIMS * 2, maxVisible: core.maxVisible };
    };
    layouts.set(0, { layout: mkLayout(0, swaLayout), core: swaLayout });
    for (const ratio of [4, 128] as const) {
      if (!pageSizes.has(ratio)) continue;
      const core = planner.layout(seqLens, extendLens, window, ratio);
      layouts.set(ratio, { layout: mkLayout(ratio, core), core });
      ratios.push(ratio);
    }
    this.ratios = ratios;

    // The budget and the 32-bit limits, before anything sized by them is allocated.
    let worst = layouts.get(0)!.layout;
    for (const { layout } of layouts.values()) if (layout.bytes > worst.bytes) worst = layout;
    this.workspaceBytes = worst.bytes;
    if (worst.bytes > budget) {
      const parts = [...layouts.values()].map(({ layout: l }) => `c${l.ratio}: ${l.compressedRows} compressed + ${l.swaRows} SWA rows = ${formatBytes(l.bytes)}`);
      throw new SparseMlaError(
        'TOO_LARGE',
        `workspace: this chunk needs ${worst.bytes} bytes (${formatBytes(worst.bytes)}) for its c${worst.ratio} layers, over the budget of ${budget} bytes (${formatBytes(budget)}); ${parts.join('; ')}. Split the chunk or raise options.workspaceBudgetBytes.`,
        'options.workspaceBudgetBytes',
      );
    }
    for (const { layout: l } of layouts.values()) {
      if (l.rows > INT32_MAX) fail('TOO_LARGE', 'workspace', `at most ${INT32_MAX} rows (int32 row numbers)`, `${l.rows} rows for ratio ${l.ratio}`);
      if (l.ratio === 4) continue; // its width depends on top-k: checked by combineC4
      const width = rowWidth(l.ratio, 0, l.maxVisible, window, this.align);
      if (swaLayout.numQueries * width > INT32_MAX) {
        fail('TOO_LARGE', 'chunk', `c${l.ratio} index rows of at most ${INT32_MAX} entries`, `${swaLayout.numQueries} queries × width ${width}`);
      }
    }

    // The SWA gather ids, request by request, checked for count and range.
    const caches = options.caches;
    if (caches !== undefined && (typeof caches !== 'object' || caches === null)) fail('INVALID_VALUE', 'options.caches', 'an object {swa?, c4?, c128?}', describe(caches));
    const swaGiven = caches?.swa;
    const swaCache = swaGiven !== undefined ? checkV4Cache(swaGiven, 'options.caches.swa') : undefined;
    const swaIds = new BigInt64Array(swaLayout.swaRows);
    let maxSwaId = -1;
    const requests: PlanRequestLayout[] = [];
    // per-request compressed rows come from the core's layout (prefix sums), not re-derived here
    const compOffsets = (ratio: 4 | 128): Float64Array | undefined => layouts.get(ratio)?.core.compOffsets;
    const compRowsOf = (ratio: 4 | 128, r: number): number => {
      const off = compOffsets(ratio);
      return off ? off[r + 1]! - off[r]! : 0;
    };
    for (let r = 0; r < n; r++) {
      const s = seqLens[r]!, e = extendLens[r]!;
      const g = gatherLength(s, e, window);
      const ids = readIds(reqs[r]!.swaTokenIds, `chunk.requests[${r}].swaTokenIds`, (count) => {
        if (count !== g) fail('INVALID_SHAPE', `chunk.requests[${r}].swaTokenIds`, `${g} ids (positions [${s - g}, ${s}) for seqLen ${s}, extendLen ${e}, window ${window})`, `${count}`);
      });
      const off = swaLayout.swaOffsets[r]!;
      for (let i = 0; i < g; i++) {
        const id = ids[i]!;
        if (swaCache && id >= cacheTokens(swaCache)) {
          fail('OUT_OF_RANGE', `chunk.requests[${r}].swaTokenIds[${i}]`, `a token id below ${cacheTokens(swaCache)} (options.caches.swa)`, `${id}`);
        }
        if (id > maxSwaId) maxSwaId = id;
        swaIds[off + i] = BigInt(id);
      }
      requests.push({
        seqLen: s,
        extendLen: e,
        queryOffset: swaLayout.queryOffsets[r]!,
        swaOffset: off,
        swaRows: g,
        swaStartPos: s - g,
        c4Offset: compOffsets(4)?.[r] ?? 0,
        c4Rows: compRowsOf(4, r),
        c128Offset: compOffsets(128)?.[r] ?? 0,
        c128Rows: compRowsOf(128, r),
      });
    }
    this.#maxSwaId = maxSwaId;
    // the caller's copy: the layers gather swaIds (#parts), which the ids were checked into
    this.swaTokenIds = tensor('int64', [swaIds.length], swaIds.slice());
    this.requests = requests;

    // Each ratio's page tables (the compressed gather ids are built from them where they are used).
    for (const ratio of [4, 128] as const) {
      const entry = layouts.get(ratio);
      if (!entry) continue;
      const pageSize = pageSizes.get(ratio)!;
      const key = ratio === 4 ? 'c4PageTable' : 'c128PageTable';
      const cache = ratio === 4 ? caches?.c4 : caches?.c128;
      const compCache = cache !== undefined ? checkV4Cache(cache, `options.caches.c${ratio}`) : undefined;
      if (compCache && compCache.pageSize !== pageSize) {
        fail('INVALID_VALUE', `options.caches.c${ratio}.pageSize`, `chunk.c${ratio}PageSize = ${pageSize}`, `${compCache.pageSize}`);
      }
      // Every table's count first, checked against the pages its request uses and, past them, the
      // chunk's entries against MAX_UNUSED_PAGE_TABLE_ENTRIES; then the entries, each read once.
      const offsets = new Float64Array(n + 1);
      const lists: (IdSource | undefined)[] = [];
      let unused = 0;
      for (let r = 0; r < n; r++) {
        const v = compRowsOf(ratio, r);
        const need = Math.ceil(v / pageSize);
        const raw = reqs[r]![key];
        const list = raw === undefined ? undefined : idSource(raw, `chunk.requests[${r}].${key}`);
        const count = list?.n ?? 0;
        if (count < need) fail('INVALID_SHAPE', `chunk.requests[${r}].${key}`, `at least ${need} pages for floor(seqLen ${seqLens[r]} / ${ratio}) = ${v} entries of page size ${pageSize}`, `${count}`);
        unused += count - need;
        if (unused > MAX_UNUSED_PAGE_TABLE_ENTRIES) {
          fail('TOO_LARGE', `chunk.requests[${r}].${key}`, `page tables holding at most ${MAX_UNUSED_PAGE_TABLE_ENTRIES} entries past the pages the chunk's requests use (MAX_UNUSED_PAGE_TABLE_ENTRIES)`, `${unused} past them up to this table of ${count}`);
        }
        lists.push(list);
        offsets[r + 1] = offsets[r]! + need;
      }
      const flat = new Int32Array(offsets[n]!);
      let maxPage = -1;
      for (let r = 0; r < n; r++) {
        const list = lists[r];
        if (list === undefined) continue; // (no table: its request uses no page)
        const table = readIdValues(list, `chunk.requests[${r}].${key}`);
        const at = offsets[r]!, need = offsets[r + 1]! - at;
        for (let p = 0; p < need; p++) {
          const page = table[p]!;
          if (page > INT32_MAX) fail('OUT_OF_RANGE', `chunk.requests[${r}].${key}[${p}]`, `a page id ≤ ${INT32_MAX}`, `${page}`);
          if (compCache && page >= compCache.numPages) {
            fail('OUT_OF_RANGE', `chunk.requests[${r}].${key}[${p}]`, `a page id below ${compCache.numPages} (options.caches.c${ratio})`, `${page}`);
          }
          if (page > maxPage) maxPage = page;
          flat[at + p] = page;
        }
      }
      const st = { ...entry, pageSize, pageTables: flat, pageTableOffsets: offsets, maxPage };
      if (ratio === 4) this.#c4 = st;
      else this.#c128 = st;
    }
    this.#c0 = { ...layouts.get(0)!, pageSize: 0, pageTables: new Int32Array(0), pageTableOffsets: new Float64Array(seqLens.length + 1), maxPage: -1 };
    for (const [ratio, st] of [[0, this.#c0], [4, this.#c4], [128, this.#c128]] as const) if (st !== undefined) this.#servedLayouts.set(ratio, st.layout);
    const stats = this.stats, deviceStats = this.deviceStats;
    this.#parts = {
      seqLens,
      extendLens,
      window,
      numQueries: this.numQueries,
      workspaceBytes: this.workspaceBytes,
      swaTokenIds: swaIds,
      stats,
      deviceStats,
      droppedReads: this.#droppedReads,
      denseWidth: (ratio) => this.#denseWidth(ratio),
      compressed: (ratio) => {
        const st = this.#state(ratio, 'ratio');
        return { pageTables: st.pageTables, pageTableOffsets: st.pageTableOffsets, pageSize: st.pageSize, rows: st.layout.compressedRows };
      },
    };
    this.#host = new LayerResources(this.#parts, 'host');
  }


  /** The workspace layout of a ratio this plan serves. */
  layout(ratio: CompressRatio): WorkspaceLayout {
    planThis(this, 'layout');
    return this.#state(ratio, 'ratio').layout;
  }

  /** Page size of a ratio's compressed cache. */
  pageSize(ratio: 4 | 128): number {
    planThis(this, 'pageSize');
    return this.#compressedState(ratio).pageSize;
  }

  /**
   * int64 [compressedRows]: the compressed cache token ids gathered into the workspace for a ratio
   * (built on first use). A copy of the ids the plan's layers gather, made once per ratio and the
   * same array on every call: writing into it changes nothing the plan computes.
   */
  compressedTokenIds(ratio: 4 | 128): Tensor<'int64'> {
    planThis(this, 'compressedTokenIds');
    this.#compressedState(ratio);
    let ids = this.#handedCompressedIds.get(ratio);
    if (ids === undefined) {
      ids = this.#keepCompressedIds(ratio, undefined).slice();
      this.#handedCompressedIds.set(ratio, ids);
    }
    return tensor('int64', [ids.length], ids);
  }

  /** compressedTokenIds' copies, by ratio (the host keeps the ids its layers gather apart) */
  readonly #handedCompressedIds = new Map<4 | 128, BigInt64Array>();

  /** A ratio's compressed gather ids as the host keeps them: kept ones, else `built` (a peek's) or built now, kept. */
  #keepCompressedIds(ratio: 4 | 128, built: BigInt64Array | undefined): BigInt64Array {
    return this.#host.keptCompressedIds(ratio) ?? this.#host.keepCompressedIds(ratio, built ?? this.#buildCompressedIds(ratio));
  }

  #buildCompressedIds(ratio: 4 | 128): BigInt64Array {
    const st = this.#state(ratio, 'ratio');
    return this.#planner.compressedTokenIds(this.#seqLens, this.#extendLens, ratio, st.pageTables, st.pageTableOffsets, st.pageSize, st.layout.compressedRows);
  }

  /**
   * The chunk-invariant combined rows of ratio 0 or 128: built on first use, then reused. Each call
   * gives a new frozen object whose tensors hold copies of the rows the plan's layers read: writing
   * into them, or reassigning a tensor's fields, changes nothing the plan computes (nor the rows of
   * another call), and pagedForm refuses rows so changed.
   */
  combinedRows(ratio: 0 | 128): CombinedRows {
    planThis(this, 'combinedRows');
    this.#state(ratio, 'ratio');
    if (ratio !== 0 && ratio !== 128) fail('INVALID_VALUE', 'ratio', '0 or 128 (ratio 4 rows come from combineC4)', describe(ratio));
    return this.#handOutDense(ratio, this.#keepDenseRows(ratio, undefined));
  }

  /** The plan's own rows of ratio 0 or 128, made once: the rows the host keeps, else `dense` (a peek's) or rows built now, kept and counted. */
  #keepDenseRows(ratio: 0 | 128, dense: LayerRows | undefined): LayerRows {
    let r = this.#combined.get(ratio);
    if (r === undefined) {
      r = this.#host.keptDenseRows(ratio) ?? this.#host.keepDenseRows(ratio, dense ?? this.#buildDenseRows(ratio));
      this.#combined.set(ratio, r);
    }
    return r;
  }

  /** Combined rows of ratio 0 or 128 for a caller: copies of the plan's own `r`, made for each caller (the host's layers read r's arrays, which no caller may write into). */
  #handOutDense(ratio: 0 | 128, r: LayerRows): CombinedRows {
    const built: CombinedRows = Object.freeze({
      ratio,
      width: r.width,
      indices: tensor('int32', [this.numQueries, r.width], r.rows.slice()),
      lengths: tensor('int32', [this.numQueries], r.lens.slice()),
      dropped: 0,
    });
    this.#madeRows.set(built, r);
    return built;
  }

  /**
   * One c4 layer's rows from its indexer's top-k (int32 [numQueries, topk] of request-local
   * compressed positions, −1 padded). Entries not yet visible at the query's position are dropped
   * and counted (result.dropped, plan.stats.c4Dropped), never attended. The rows' tensors hold
   * copies of what the plan keeps for pagedForm(rows): changed, pagedForm refuses them.
   */
  combineC4(topkIndices: Tensor<'int32'>): CombinedRows {
    planThis(this, 'combineC4');
    const { made, combine, topk } = this.#combineC4(topkIndices);
    return this.#handOutC4(combine, topk, made);
  }

  /** A c4 layer's combine of a host top-k (checked here, as combineC4 checks it), counted (plan.stats) as one combine; `made` the plan's own rows of it. */
  #combineC4(topkIndices: Tensor<'int32'>): { made: LayerRows; combine: HostTopkRows; topk: number } {
    const { data, topk, width } = this.checkTopk(topkIndices, false);
    const combine = this.#planner.combineTopk(this.#seqLens, this.#extendLens, this.window, 4, data, topk, width);
    return { made: this.#countC4(combine, width), combine, topk };
  }

  /** A c4 combine `r` of rows `width` wide counted (plan.stats) as one combine: the plan's own rows of it. */
  #countC4(r: HostTopkRows, width: number): LayerRows {
    this.stats.c4Combines++;
    this.stats.c4Dropped += r.droppedTotal;
    return { width, rows: r.rows, lens: r.lens };
  }

  /** A c4 layer's combined rows for a caller: copies of `made`, the plan's own rows of combine `r`. */
  #handOutC4(r: HostTopkRows, topk: number, made: LayerRows): CombinedRows {
    const rows: CombinedRows = Object.freeze({
      ratio: 4,
      width: made.width,
      indices: tensor('int32', [this.numQueries, made.width], made.rows.slice()),
      lengths: tensor('int32', [this.numQueries], made.lens.slice()),
      dropped: r.droppedTotal,
      droppedPerQuery: r.dropped,
      topk,
    });
    this.#madeRows.set(rows, made);
    return rows;
  }

  /**
   * A c4 layer's top-k indices checked against the plan: int32 [numQueries, topk] (or
   * [numQueries, 1, topk]), on the host or (allowDevice) on a device; its rows' width fits int32.
   */
  checkTopk(topkIndices: unknown, allowDevice: false): CheckedTopk<never>;
  checkTopk(topkIndices: unknown, allowDevice: boolean, read?: TensorRead): CheckedTopk<DeviceBuffer>;
  checkTopk(topkIndices: unknown, allowDevice: boolean, read?: TensorRead): CheckedTopk<DeviceBuffer> {
    planThis(this, 'checkTopk');
    this.#state(4, 'compressRatio');
    const t = allowDevice ? checkPlacedTensor(topkIndices, 'topkIndices', INT32_DTYPE, read) : checkTensor(topkIndices, 'topkIndices', INT32_DTYPE, read);
    const checked = this.#topkRows(t.data, t.shape);
    if (checked !== undefined) return checked;
    const s = t.shape;
    if (s.length !== 2 && !(s.length === 3 && s[1] === 1)) badTopkShape(this.numQueries, s);
    if (s[0] !== this.numQueries) badTopkShape(this.numQueries, s);
    topkTooLarge(this.numQueries, rowWidth(4, s[s.length - 1]!, 0, this.window, this.align));
  }

  /**
   * @internal checkTopk(topkIndices, true) for a top-k in device memory whose caller read its shape
   * as [numQueries, topk] or [numQueries, 1, topk] and its `data`, without a message: the checked
   * top-k where checkTopk accepts it and `data` is `device`'s own, else undefined (a host top-k,
   * another engine's, a plan without c4, or anything checkTopk refuses: call it for the error).
   * #topkRows over the width as read (a device c4 layer's checks run it, mostly cold).
   */
  deviceTopk(topk: unknown, data: unknown, device: OwnedBufferCheck): CheckedTopk<DeviceBuffer> | undefined {
    if (this.#c4 === undefined) return undefined;
    // an int32 (a larger top-k is refused below anyway: its rows would not fit int32); the byte
    // size as checkPlacedTensor computes it: the dims' product, in order, times 4
    const nq = this.numQueries;
    if (typeof topk !== 'number' || (topk | 0) !== topk || topk < 0 || !device.ownsLive(data, nq * topk * 4)) return undefined;
    // rowWidth(4, topk, …) of this plan's window and alignment, kept for the last top-k asked
    const last = this.#lastTopkWidth;
    const width = last.topk === topk ? last.width : this.#newTopkWidth(topk);
    if (nq * width > INT32_MAX) return undefined;
    return new TopkRows(data as DeviceBuffer, nq, topk, width);
  }

  /** deviceTopk's last top-k and its rows' width (a layer loop gives the same top-k width every layer); the plan's window and alignment never change */
  #lastTopkWidth = { topk: -1, width: 0 };

  #newTopkWidth(topk: number): number {
    const width = rowWidth(4, topk, 0, this.window, this.align);
    this.#lastTopkWidth = { topk, width };
    return width;
  }

  /** A checked top-k of shape [numQueries, topk] or [numQueries, 1, topk] whose rows' width fits int32, else undefined. */
  #topkRows(data: Int32Array | DeviceBuffer, s: readonly number[]): CheckedTopk<DeviceBuffer> | undefined {
    const rank3 = s.length === 3 && s[1] === 1;
    if ((s.length !== 2 && !rank3) || s[0] !== this.numQueries) return undefined;
    const topk = s[rank3 ? 2 : 1]!;
    const width = rowWidth(4, topk, 0, this.window, this.align);
    // the width is an int32 of the core even when there are no rows (numQueries 0)
    if (width > INT32_MAX || this.numQueries * width > INT32_MAX) return undefined;
    return new TopkRows(data, this.numQueries, topk, width);
  }

  /**
   * The paged form (SPEC §5) of combined rows: the SWA token ids of each query's window (main,
   * built once per chunk) and the compressed token ids it attends (extra), derived from the same
   * rows, so both paths attend exactly the same entries. `rows`: an object combinedRows or combineC4
   * of this plan returned, its tensors as they were handed out (int32, the plan's shape, the plan's
   * values; in any memory): else INVALID_VALUE, INVALID_DTYPE or INVALID_SHAPE before any work. The
   * form is built from the plan's own copy of the rows. Its tensors hold copies of the form the
   * plan's paged layers read, made once per form (the main set once per plan, the extra set once per
   * rows) and the same arrays on every call: writing into them changes nothing the plan computes.
   */
  pagedForm(rows: CombinedRows): PagedForm {
    planThis(this, 'pagedForm');
    const made = typeof rows === 'object' && rows !== null ? this.#madeRows.get(rows) : undefined;
    if (made === undefined) fail('INVALID_VALUE', 'rows', 'combined rows made by this plan (combinedRows or combineC4)', describe(rows));
    // the rows object is frozen, its tensors are not: a tensor changed since (another array, dtype
    // or shape, or other values written into its array) is refused; the form is built from the
    // plan's own arrays, which the caller's never are
    unchangedRows(rows, made, this.numQueries);
    return this.#handOutForm(made, this.#keepPagedForm(rows.ratio, rows.topk, made, undefined));
  }

  /** pagedForm's copies: of the main set (one per plan) and of each made rows' extra set */
  #handedPagedMain?: { main: Tensor<'int32'>; mainLengths: Tensor<'int32'> };
  readonly #handedPagedExtra = new WeakMap<LayerRows, { extra?: Tensor<'int32'>; extraLengths?: Tensor<'int32'> }>();

  /** The paged form `own` (the plan's, of rows `made`) for a caller: copies, made once per set (the plan's paged layers read own's arrays, which no caller may write into). */
  #handOutForm(made: LayerRows, own: PagedForm): PagedForm {
    const copy = (t: Tensor<'int32'>) => tensor('int32', [...t.shape], t.data.slice());
    const main = (this.#handedPagedMain ??= { main: copy(own.main), mainLengths: copy(own.mainLengths) });
    let extra = this.#handedPagedExtra.get(made);
    if (extra === undefined) {
      extra = own.extra !== undefined && own.extraLengths !== undefined ? { extra: copy(own.extra), extraLengths: copy(own.extraLengths) } : {};
      this.#handedPagedExtra.set(made, extra);
    }
    return { ...main, ...extra };
  }

  /**
   * The plan's own paged form of its rows `made` (of `ratio`; `topk` a c4 layer's top-k width): the
   * sets the plan keeps, else those `built` holds (a peek's, built from the same rows) or built now,
   * kept and counted. Its arrays are what the plan's paged layers read: never handed to a caller.
   */
  #keepPagedForm(ratio: CompressRatio, topk: number | undefined, made: LayerRows, built: PeekBuilt | undefined): PagedForm {
    const st = this.#state(ratio, 'rows.ratio');
    const compIds = ratio === 0 ? new BigInt64Array(0) : this.#keepCompressedIds(ratio, built?.compIds);
    this.#pagedIdsFit(compIds);
    const mainWidth = roundUp(this.window, this.align);
    const extraWidth = ratio === 0 ? 0 : ratio === 128 ? roundUp(st.layout.maxVisible, this.align) : roundUp(topk ?? 0, this.align);
    const needMain = this.#pagedMain === undefined;
    let extra = this.#pagedExtra.get(made);
    const needExtra = extra === undefined && extraWidth > 0;
    const buildMain = needMain && built?.main === undefined, buildExtra = needExtra && built?.extra === undefined;
    const r = buildMain || buildExtra
      ? this.#planner.pagedForm(made.rows, made.lens, made.width, st.layout.compressedRows, st.layout.swaRows, compIds, this.#parts.swaTokenIds, buildMain ? mainWidth : 0, buildExtra ? extraWidth : 0)
      : {};
    if (needMain) {
      const main = built?.main ?? r.main!;
      this.#pagedMain = {
        main: tensor('int32', [this.numQueries, mainWidth], main.rows),
        mainLengths: tensor('int32', [this.numQueries], main.lens),
      };
      this.stats.pagedMainBuilds++;
    }
    if (needExtra) {
      const set = built?.extra ?? r.extra!;
      extra = { extra: tensor('int32', [this.numQueries, extraWidth], set.rows), extraLengths: tensor('int32', [this.numQueries], set.lens) };
      this.#pagedExtra.set(made, extra);
      this.stats.pagedExtraBuilds++;
    }
    return { ...this.#pagedMain!, ...(extra ?? {}) };
  }

  /** The paged path's ids fit its int32 indices (the SWA ids and a ratio's compressed ids `compIds`). */
  #pagedIdsFit(compIds: BigInt64Array): void {
    if (this.#maxSwaId > INT32_MAX || compIds.some((id) => id > BigInt(INT32_MAX))) {
      fail('TOO_LARGE', 'plan', `token ids ≤ ${INT32_MAX} for the paged path's int32 indices`, 'larger ids; use the workspace path');
    }
  }

  /**
   * @internal The paged form a layer's paged op will read, as pagedForm(combinedRows(ratio)) or
   * pagedForm(combineC4(topk)) make it (`topk`: a c4 layer's checked host top-k), but keeping and
   * counting nothing: what the plan keeps is read, anything else is built (a c4 layer's combine
   * included) and held by the peeked form only. For a host layer's exact budget check of its paged
   * op at the call, before any work (prefill_layer_checks.ts, checkPagedOp), which calls it only where
   * sizes alone cannot tell; a layer that passes hands it to layerPagedForm.
   */
  peekPagedForm(ratio: CompressRatio, topk: CheckedTopk<DeviceBuffer> | undefined): PeekedPagedForm {
    const st = this.#state(ratio, 'compressRatio');
    const { pagedMain: mainWidth, pagedExtra: extraWidth } = this.layerWidths(ratio, topk?.topk ?? 0);
    let rows: Int32Array, lens: Int32Array, width: number;
    let extra: { extra?: Tensor<'int32'>; extraLengths?: Tensor<'int32'> } | undefined;
    let c4: PeekBuilt['c4'], dense: LayerRows | undefined;
    if (ratio === 4) {
      const data = topk?.data;
      if (!(data instanceof Int32Array)) fail('INVALID_VALUE', 'topkIndices', 'a host top-k', 'a device one');
      const r = this.#planner.combineTopk(this.#seqLens, this.#extendLens, this.window, 4, data, topk!.topk, topk!.width);
      c4 = { rows: r, topk: topk!.topk, width: topk!.width };
      [rows, lens, width] = [r.rows, r.lens, topk!.width];
    } else {
      const made = this.#combined.get(ratio);
      extra = made && this.#pagedExtra.get(made);
      const kept = made ?? this.#host.keptDenseRows(ratio);
      const r = kept ?? (dense = this.#buildDenseRows(ratio));
      [rows, lens, width] = [r.rows, r.lens, r.width];
    }
    const keptIds = ratio === 0 ? new BigInt64Array(0) : this.#host.keptCompressedIds(ratio);
    const compIds = keptIds ?? this.#buildCompressedIds(ratio as 4 | 128);
    this.#pagedIdsFit(compIds);
    const needMain = this.#pagedMain === undefined, needExtra = extra === undefined && extraWidth > 0;
    const form = needMain || needExtra ? this.#planner.pagedForm(rows, lens, width, st.layout.compressedRows, st.layout.swaRows, compIds, this.#parts.swaTokenIds, needMain ? mainWidth : 0, needExtra ? extraWidth : 0) : {};
    const built: PeekBuilt = { ratio, c4, dense, compIds: keptIds === undefined ? compIds : undefined, main: form.main, extra: form.extra };
    this.#peeks.add(built);
    const main = needMain ? { main: form.main!.rows, mainLengths: form.main!.lens } : { main: this.#pagedMain!.main.data, mainLengths: this.#pagedMain!.mainLengths.data };
    const extraSet = needExtra ? { extra: form.extra!.rows, extraLengths: form.extra!.lens } : extra?.extra ? { extra: extra.extra.data, extraLengths: extra.extraLengths!.data } : {};
    return { ...main, mainWidth, ...extraSet, extraWidth, built };
  }

  /**
   * A layer's peek kept (layerPagedForm): the rows and paged form its budget check peeked
   * (peekPagedForm), kept and counted as combinedRows / combineC4 and pagedForm would keep and count
   * them, from what the peek built (what the plan has kept since wins, as in those); the plan's own
   * form, and the rows' dropped count. Each peek is kept at most once.
   */
  #keepPeeked(peeked: PeekedPagedForm): { form: PagedForm; dropped: number } {
    const b = peeked.built;
    if (!this.#peeks.delete(b)) fail('INVALID_VALUE', 'peeked', 'a paged form this plan peeked and has not kept', describe(peeked));
    const made = b.ratio === 4 ? this.#countC4(b.c4!.rows, b.c4!.width) : this.#keepDenseRows(b.ratio, b.dense);
    return { form: this.#keepPagedForm(b.ratio, b.c4?.topk, made, b), dropped: b.c4?.rows.droppedTotal ?? 0 };
  }

  /**
   * @internal A host paged layer's paged form (prefill_layer.ts; a cuda engine's c0 / c128 layer
   * places it on its device once): pagedForm's, but the plan's own tensors, as its rows are the
   * plan's own, so nothing is copied or compared; never handed to a caller. `dropped`: its rows'
   * dropped count. Ratio 0 / 128: the chunk-invariant rows; ratio 4: `topkIndices` (a host top-k)
   * combined now, checked and counted as combineC4 does; `peeked`: what the layer's budget check
   * peeked, kept now (#keepPeeked).
   */
  layerPagedForm(ratio: CompressRatio, topkIndices: Tensor<'int32'> | undefined, peeked: PeekedPagedForm | undefined): { form: PagedForm; dropped: number } {
    if (peeked !== undefined) return this.#keepPeeked(peeked);
    if (ratio !== 4) return { form: this.#keepPagedForm(ratio, undefined, this.#keepDenseRows(ratio, undefined), undefined), dropped: 0 };
    if (topkIndices === undefined) fail('INVALID_VALUE', 'topkIndices', "a c4 layer's top-k", 'undefined');
    const { made, combine, topk } = this.#combineC4(topkIndices);
    return { form: this.#keepPagedForm(4, topk, made, undefined), dropped: combine.droppedTotal };
  }

  /**
   * Check a layer's caches against everything the plan reads from them (SPEC §9: ids outside a
   * cache are an error, before any work). `ratio` selects the compressed cache.
   */
  checkCaches(caches: PlanCaches, ratio: CompressRatio, read?: CachesRead): CheckedCaches<DeviceBuffer> {
    planThis(this, 'checkCaches');
    if (typeof caches !== 'object' || caches === null) fail('INVALID_VALUE', 'caches', 'an object {swa, c4?, c128?}', describe(caches));
    // each cache read once (a getter asked again may answer another one), nor one `read` holds
    const swaArg = read === undefined ? caches.swa : read.swa;
    if (swaArg === undefined) fail('INVALID_VALUE', 'caches.swa', "the layer's SWA cache", 'undefined');
    const swa = checkV4Cache(swaArg, 'caches.swa', read?.swaFields);
    if (this.#maxSwaId >= swa.numTokens) swaCacheTooSmall(this.#maxSwaId, swa.numTokens);
    if (ratio === 0) return new CheckedCaches(swa, undefined);
    const st = this.#state(ratio, 'compressRatio');
    const key = ratio === 4 ? 'c4' : 'c128';
    const c = read === undefined || read.compressed === NOT_READ ? caches[key] : read.compressed;
    if (c === undefined) fail('INVALID_VALUE', ratio === 4 ? 'caches.c4' : 'caches.c128', ratio === 4 ? "the layer's c4 compressed cache" : "the layer's c128 compressed cache", 'undefined');
    const compressed = checkV4Cache(c, ratio === 4 ? 'caches.c4' : 'caches.c128', read?.compressedFields);
    if (compressed.pageSize !== st.pageSize || st.maxPage >= compressed.numPages) badCompressedCache(ratio, st, compressed);
    return new CheckedCaches(swa, compressed);
  }

  /**
   * @internal checkCaches' check of the SWA cache for a cache in device memory, over its fields as
   * read (format, pageSize, numPages, data), without a message: its view where checkCaches accepts
   * it and `data` is a live device buffer of `device`'s own, else undefined (call checkCaches for
   * the error).
   */
  deviceSwaCache(format: unknown, pageSize: unknown, numPages: unknown, data: unknown, device: OwnedBufferCheck): CacheView<DeviceBuffer> | undefined {
    const swa = deviceCacheView(format, pageSize, numPages, data, device);
    return swa === undefined || this.#maxSwaId >= swa.numTokens ? undefined : swa;
  }

  /**
   * @internal deviceSwaCache for the compressed cache of `ratio` (one the plan serves, else
   * undefined): its view where checkCaches accepts it, else undefined.
   */
  deviceCompressedCache(ratio: 4 | 128, format: unknown, pageSize: unknown, numPages: unknown, data: unknown, device: OwnedBufferCheck): CacheView<DeviceBuffer> | undefined {
    const st = ratio === 4 ? this.#c4 : this.#c128;
    if (st === undefined) return undefined;
    const compressed = deviceCacheView(format, pageSize, numPages, data, device);
    return compressed === undefined || compressed.pageSize !== st.pageSize || st.maxPage >= compressed.numPages ? undefined : compressed;
  }

  /**
   * @internal The widths of a layer's rows, known before they are built (a layer's budget check,
   * prefill_layer.ts): its combined rows (`rows`; a c4 layer's from its top-k's `topk`) and its
   * paged form's sets (`pagedMain`, `pagedExtra`: 0 for none), as combinedRows, combineC4 and
   * pagedForm make them. `ratio` is one the plan serves.
   */
  layerWidths(ratio: CompressRatio, topk: number): { rows: number; pagedMain: number; pagedExtra: number } {
    const pagedMain = roundUp(this.window, this.align);
    if (ratio === 4) return { rows: rowWidth(4, topk, 0, this.window, this.align), pagedMain, pagedExtra: roundUp(topk, this.align) };
    const extra = ratio === 128 ? roundUp(this.#state(128, 'ratio').layout.maxVisible, this.align) : 0;
    return { rows: this.#denseWidth(ratio), pagedMain, pagedExtra: extra };
  }

  /**
   * @internal The workspace layout of `ratio` where this plan serves it (a ratio 0, 4 or 128 it was
   * made for), else undefined: a device layer's check of its ratio and its layout in one read.
   */
  servedLayout(ratio: unknown): WorkspaceLayout | undefined {
    return this.#servedLayouts.get(ratio);
  }

  /**
   * servedLayout's answers: one lookup, no branch per ratio (V8 gives a function its inline caches
   * once it has run about eight times its bytecode, counting only what runs: a branch skipped on
   * every call delays that). A Map compares as === does but for -0, which it takes as 0 (so does ===).
   */
  readonly #servedLayouts = new Map<unknown, WorkspaceLayout>();

  /** The state of `ratio` where this plan serves it, else undefined. */
  #served(ratio: unknown): RatioState | undefined {
    return ratio === 4 ? this.#c4 : ratio === 0 ? this.#c0 : ratio === 128 ? this.#c128 : undefined;
  }

  /**
   * @internal What the plan keeps in the memory of a layer's steps: the host's for host steps
   * (every host engine shares it), else one per cuda engine.
   */
  resources(steps: LayerSteps<DeviceBuffer>): LayerResources<DeviceBuffer> {
    // (host steps are never a key of #device)
    return this.#device.get(steps) ?? this.#hostOrNewResources(steps);
  }

  /** resources(steps) where the steps have none kept: the host's, or new ones for a cuda engine. */
  #hostOrNewResources(steps: LayerSteps<DeviceBuffer>): LayerResources<DeviceBuffer> {
    return steps.memory === 'host' ? this.#host : this.#newDeviceResources(steps);
  }

  /** A cuda engine's resources for this plan, made on its first layer and kept while the engine's steps live. */
  #newDeviceResources(steps: LayerSteps<DeviceBuffer>): LayerResources<DeviceBuffer> {
    const r = new LayerResources<DeviceBuffer>(this.#parts, 'device');
    this.#device.set(steps, r);
    this.#deviceResources.push(new WeakRef(r));
    return r;
  }

  /**
   * Frees what the plan keeps for its layers — on each cuda engine its rows, gather ids, workspace
   * and paged forms in device memory, on the host the same arrays — now, rather than when the plan
   * is collected: V8 does not see device memory, so a server that makes a plan per chunk and drops it
   * would otherwise hold a chunk's device buffers until a collection. Call it once the plan's layers
   * have settled (a layer still between its steps would find its rows freed: INVALID_VALUE). The plan
   * stays usable: a later layer builds again what it needs (counted in stats / deviceStats).
   */
  release(): void {
    planThis(this, 'release');
    this.#host.release();
    for (const r of this.#deviceResources) r.deref()?.release();
  }

  /**
   * Waits until the dropped count of every c4 layer run with `{ dropped: 'later' }` has come back and
   * been counted, and gives plan.stats.c4Dropped (SPEC §6: entries not yet visible are dropped and
   * reported). Rejects with the error of a count that could not be read (once).
   */
  async settleDropped(): Promise<number> {
    planThis(this, 'settleDropped');
    await this.#droppedReads.settle();
    return this.stats.c4Dropped;
  }

  readonly #droppedReads = new DroppedReads();

  /** Width of the ratio-0 / 128 combined rows: the widest row, aligned. */
  #denseWidth(ratio: 0 | 128): number {
    const st = this.#state(ratio, 'ratio');
    return rowWidth(ratio, 0, st.layout.maxVisible, this.window, this.align);
  }

  #buildDenseRows(ratio: 0 | 128): LayerRows {
    const width = this.#denseWidth(ratio);
    const { rows, lens } = this.#planner.denseRows(this.#seqLens, this.#extendLens, this.window, ratio, width);
    return { width, rows, lens };
  }

  /** The state of a compressed ratio (4 or 128) the plan serves: ratio 0 has no compressed cache, no page size, no ids. */
  #compressedState(ratio: unknown): RatioState {
    if (ratio !== 4 && ratio !== 128) fail('INVALID_VALUE', 'ratio', "4 or 128 (the ratio of a compressed cache; 0 has none)", describe(ratio));
    return this.#state(ratio, 'ratio');
  }

  #state(ratio: CompressRatio, argument: string): RatioState {
    const st = this.#served(ratio);
    if (!st) ratioNotServed(ratio, argument, this.ratios);
    return st;
  }
}
