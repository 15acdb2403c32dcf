/** Public types of the planner (SPEC §6) and the router (SPEC §7); the layer API's are prefill_layer.ts's and prefill_layer_checks.ts's. */
import type { DeviceKvCache, KvCache, Tensor, TokenIds } from '../types.js';

/** A DeepSeek V4 layer's compress ratio: 0 = window only, 4 = indexer top-k, 128 = every entry. */
export type CompressRatio = 0 | 4 | 128;

/** Token ids or page ids: a plain array, a typed array, or an int32/int64 tensor of shape [n]. */
export type IdList = TokenIds | ArrayLike<number> | BigInt64Array;

/** One request of a prefill chunk. */
export interface ChunkRequest {
  /** Tokens of the sequence after this chunk. */
  seqLen: number;
  /** New tokens of this request in the chunk (its queries); 0 ≤ extendLen ≤ seqLen. */
  extendLen: number;
  /**
   * SWA cache token ids of positions [seqLen − g, seqLen), in position order, where
   * g = swaGatherLength(seqLen, extendLen, window) = min(seqLen, extendLen + window − 1), or 0
   * when extendLen is 0 (a request without queries needs nothing).
   */
  swaTokenIds: IdList;
  /**
   * Page ids of this request's c4 compressed cache; needs ≥ ceil(floor(seqLen / 4) / c4PageSize).
   * It may be longer (every entry is read and checked); the chunk's c4 tables together hold at most
   * MAX_UNUSED_PAGE_TABLE_ENTRIES (2^24) entries past the pages their requests use.
   */
  c4PageTable?: IdList;
  /** Page ids of this request's c128 compressed cache; needs ≥ ceil(floor(seqLen / 128) / c128PageSize); longer as c4PageTable. */
  c128PageTable?: IdList;
}

/** A prefill chunk: its requests (queries flattened request by request) and the compressed caches' page sizes. */
export interface PlanChunk {
  /** At most MAX_CHUNK_REQUESTS (2^20), refused with TOO_LARGE from the count before any request is read. */
  requests: readonly ChunkRequest[];
  /** Page size (entries per page) of the c4 cache; enables ratio 4. */
  c4PageSize?: number;
  /** Page size of the c128 cache; enables ratio 128. */
  c128PageSize?: number;
}

/** Host caches, or device caches (engine.uploadKvCache) for a cuda engine's prefillLayer. */
export interface PlanCaches {
  swa?: KvCache | DeviceKvCache;
  c4?: KvCache | DeviceKvCache;
  c128?: KvCache | DeviceKvCache;
}

export interface PlanOptions {
  /** Sliding window W (default 128). */
  window?: number;
  /** Index-row alignment (default 128): rows are padded with −1 to a multiple of it. */
  align?: number;
  /**
   * Largest workspace (bytes of bf16 rows) the plan may need for any one layer; a larger plan is
   * refused with TOO_LARGE before anything is allocated. Default DEFAULT_WORKSPACE_BUDGET_BYTES.
   */
  workspaceBudgetBytes?: number;
  /** When given, every id the plan will read is checked against these caches now. */
  caches?: PlanCaches;
  /**
   * Which implementation of the C++ planner core builds the plan's host rows: 'wasm' (the only
   * one; 'auto' picks it). A cuda engine's prefillLayer builds its rows on the GPU regardless.
   * Default 'auto'.
   */
  core?: 'auto' | 'wasm';
}

/** Where one request's rows sit. */
export interface PlanRequestLayout {
  readonly seqLen: number;
  readonly extendLen: number;
  /** first flat query of the request */
  readonly queryOffset: number;
  /** its SWA gather: workspace SWA-region offset, number of positions, first position */
  readonly swaOffset: number;
  readonly swaRows: number;
  readonly swaStartPos: number;
  /** its compressed rows per ratio: offset in the compressed region and count (floor(seqLen / r)) */
  readonly c4Offset: number;
  readonly c4Rows: number;
  readonly c128Offset: number;
  readonly c128Rows: number;
}

/** The workspace of one ratio: compressed rows of every request first, then every SWA gather. */
export interface WorkspaceLayout {
  readonly ratio: CompressRatio;
  /** rows [0, compressedRows) */
  readonly compressedRows: number;
  /** rows [compressedRows, rows) */
  readonly swaRows: number;
  readonly rows: number;
  /** rows × 512 dims × 2 bytes (bf16) */
  readonly bytes: number;
  /** largest number of visible compressed entries of any query (c128 row width) */
  readonly maxVisible: number;
}

/**
 * Each query's combined row rebased into the workspace: compressed entries, window rows, −1 padding.
 * Read-only: the object is frozen, and its tensors hold copies of the plan's rows (Plan.pagedForm
 * refuses rows whose tensors were changed; the plan's layers never read them).
 */
export interface CombinedRows {
  readonly ratio: CompressRatio;
  readonly width: number;
  /** int32 [numQueries, width] */
  readonly indices: Tensor<'int32'>;
  /** int32 [numQueries]: real entries per row */
  readonly lengths: Tensor<'int32'>;
  /** top-k entries dropped because they were not yet visible (ratio 4; 0 otherwise) */
  readonly dropped: number;
  /** the same per query (ratio 4 only) */
  readonly droppedPerQuery?: Int32Array;
  /** ratio 4: the indexer's top-k width */
  readonly topk?: number;
}

/**
 * The same entries in the form of SPEC §5: SWA token ids (main) and compressed token ids (extra).
 * Plan.pagedForm's tensors hold copies of the form the plan's paged layers read (made once per form):
 * writing into them changes nothing the plan computes.
 */
export interface PagedForm {
  /** int32 [numQueries, roundUp(W, align)] token ids in the SWA cache */
  readonly main: Tensor<'int32'>;
  readonly mainLengths: Tensor<'int32'>;
  /** int32 [numQueries, extraWidth] token ids in the compressed cache; absent for ratio 0 or when nothing is visible */
  readonly extra?: Tensor<'int32'>;
  readonly extraLengths?: Tensor<'int32'>;
}

/** Counters of the work a plan has done, so callers and tests can see what was reused. */
export interface PlanStats {
  /** c0 combined rows built (once per chunk) */
  c0Builds: number;
  /** c128 combined rows built (once per chunk) */
  c128Builds: number;
  /** c4 combines run (once per c4 layer) */
  c4Combines: number;
  /** top-k entries dropped for causality, over all c4 combines */
  c4Dropped: number;
  /** paged-form main sets built (once per chunk) */
  pagedMainBuilds: number;
  /** paged-form extra sets built (c128: once per chunk; c4: once per combine) */
  pagedExtraBuilds: number;
  /** workspace buffers allocated (reused across the layers of the chunk) */
  workspaceAllocations: number;
}

/** Counters of what prefillLayer kept on a device (cuda engines). */
export interface PlanDeviceStats {
  /**
   * host → device uploads of chunk-invariant plan data: the SWA gather ids, once per plan and
   * engine, range-checked at upload; no layer copies ids or index rows from the host
   */
  deviceUploads: number;
  /**
   * compressed flat token ids built on the GPU from the page tables (planCompressedTokenIds), once
   * per ratio, plan and engine (the page tables are checked against the caches by checkCaches)
   */
  deviceCompressedIdBuilds: number;
  /** c0 rows built on the GPU (planRows dense_row), once per plan and engine, reused by every c0 layer */
  deviceC0Builds: number;
  /** c128 rows built on the GPU (planRows dense_row), once per plan and engine */
  deviceC128Builds: number;
  /** c4 combines run on the GPU (planRows), one per c4 layer; also counted in stats.c4Combines */
  deviceC4Combines: number;
  /** device workspace buffers allocated (one per plan and engine, reused by every layer) */
  deviceWorkspaceAllocations: number;
  /** c4 row buffers (rows, lengths, dropped total) allocated on the GPU: one set per plan, engine and row width, built into by every c4 layer */
  deviceC4RowAllocations: number;
  /**
   * workspace layers queued whole by a layer program (dequants, combine and prefill together), as
   * every layer is once the plan keeps its rows and ids and its q, sink, caches and outputs are on the device
   */
  deviceQueuedLayers: number;
}

/** sparse = the workspace path (dequant + sparsePrefill); paged = attention straight over the FP8 pages. */
export type PrefillPath = 'sparse' | 'paged';
export type PrefillPathChoice = PrefillPath | 'auto';

export interface RouteOptions {
  /** Force a path; 'auto' (default) defers to SPARSE_MLA_PREFILL, then the threshold. */
  path?: PrefillPathChoice;
  /** Query count above which the workspace path is taken (default: the backend's entry of SPARSE_PREFILL_THRESHOLDS for the layer's compress ratio, else DEFAULT_SPARSE_PREFILL_THRESHOLD). */
  threshold?: number;
  /** Environment to read SPARSE_MLA_PREFILL from (default process.env). */
  env?: Readonly<Record<string, string | undefined>>;
}

export interface RouteDecision {
  path: PrefillPath;
  /** Why, in words: e.g. "4096 queries > threshold 256" or "forced by SPARSE_MLA_PREFILL=paged". */
  reason: string;
}
