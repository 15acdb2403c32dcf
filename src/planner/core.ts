/**
 * The planner's index math behind one interface. Its one implementation is the C++ core
 * (cpp/src/planner.cpp, cpp/include/sparse_mla/planner.h), here through the WASM module
 * (wasm_core.ts); the CUDA planner kernels call the same per-row functions, so the rows are
 * derived in exactly one place.
 * Implementations take inputs the plan has already validated and sized. This file also holds the
 * few pure size rules the plan's validation and layout need before calling the core.
 */

/** Totals of a chunk's layout for one compress ratio. */
export interface CoreLayout {
  /** prefix sums, numRequests + 1 entries each */
  queryOffsets: Float64Array;
  swaOffsets: Float64Array;
  compOffsets: Float64Array;
  numQueries: number;
  swaRows: number;
  compRows: number;
  /** largest floor(seqLen / ratio) of any request with queries */
  maxVisible: number;
}

export interface CoreRows {
  rows: Int32Array;
  lens: Int32Array;
}

export interface CoreTopkRows extends CoreRows {
  dropped: Int32Array;
  droppedTotal: number;
}

export interface CorePagedForm {
  main?: CoreRows;
  extra?: CoreRows;
}

export interface PlannerCore {
  /** which implementation runs (a CUDA planner would add 'cuda') */
  readonly name: 'wasm';
  layout(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number): CoreLayout;
  /** compRows: the ratio's layout total, the length of the result */
  compressedTokenIds(
    seqLens: Int32Array,
    extendLens: Int32Array,
    ratio: number,
    pageTables: Int32Array,
    pageTableOffsets: Float64Array,
    pageSize: number,
    compRows: number,
  ): BigInt64Array;
  denseRows(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number, width: number): CoreRows;
  combineTopk(
    seqLens: Int32Array,
    extendLens: Int32Array,
    window: number,
    ratio: number,
    topkIndices: Int32Array,
    topk: number,
    width: number,
  ): CoreTopkRows;
  /** mainWidth / extraWidth 0 leaves that set out. */
  pagedForm(
    rows: Int32Array,
    lens: Int32Array,
    width: number,
    compRows: number,
    swaRows: number,
    compTokenIds: BigInt64Array,
    swaTokenIds: BigInt64Array,
    mainWidth: number,
    extraWidth: number,
  ): CorePagedForm;
}

// ---- size rules (SPEC §6) the plan checks inputs against before the core runs ----------------------

/** SWA positions the queries of a request need: g = min(seqLen, extendLen + W − 1); 0 without queries. */
export function swaGatherLength(seqLen: number, extendLen: number, window: number): number {
  return extendLen > 0 ? Math.min(seqLen, extendLen + window - 1) : 0;
}

/** Compressed entries the request's last query can see: floor(seqLen / r); 0 for r = 0 or no queries. */
export function requestVisible(seqLen: number, extendLen: number, ratio: number): number {
  return ratio > 0 && extendLen > 0 ? Math.floor(seqLen / ratio) : 0;
}

export function roundUp(x: number, m: number): number {
  return m > 0 ? Math.ceil(x / m) * m : x;
}

/** Width of a ratio's combined rows (SPEC §6): roundUp((0 | topk | maxVisible) + W, align). */
export function combinedWidth(ratio: number, topk: number, maxVisible: number, window: number, align: number): number {
  const compressed = ratio === 0 ? 0 : ratio === 4 ? topk : maxVisible;
  return roundUp(compressed + window, align);
}
