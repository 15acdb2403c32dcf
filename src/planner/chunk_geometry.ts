/**
 * A chunk's size rules (SPEC §6): how many SWA positions and compressed entries a request's queries
 * gather, and how wide a ratio's combined rows are. The exported helpers check their arguments; the
 * plan calls the unchecked forms on values it has already checked.
 */
import { fail } from '../errors.js';
import { describe, INT32_MAX } from '../ops/common.js';
import { arrayLikeOf } from '../tensor.js';
import { V4_ROW_DIMS } from '../kv_cache_layout.js';
import { checkInt } from './plan_checks.js';

export const DEFAULT_WINDOW = 128;
export const DEFAULT_ALIGN = 128;
/** Dims of a dequantized v4 row; the workspace holds bf16 rows of this width. */
export const WORKSPACE_ROW_DIMS = V4_ROW_DIMS;

/** SWA positions the queries of a request need: g = min(seqLen, extendLen + W − 1); 0 without queries. */
export function swaGatherLength(seqLen: number, extendLen: number, window: number): number {
  checkInt(seqLen, 'seqLen', 0, Number.MAX_SAFE_INTEGER);
  checkInt(extendLen, 'extendLen', 0, Number.MAX_SAFE_INTEGER);
  checkInt(window, 'window', 1, Number.MAX_SAFE_INTEGER);
  return gatherLength(seqLen, extendLen, window);
}
// The unchecked forms the plan uses on values it has already checked (the exported ones are the
// public helpers' checked entries).
/** @internal */
export function gatherLength(seqLen: number, extendLen: number, window: number): number {
  return extendLen > 0 ? Math.min(seqLen, extendLen + window - 1) : 0;
}

/** Compressed entries the request's last query can see: floor(seqLen / r); 0 for r = 0 or no queries. */
export function requestVisible(seqLen: number, extendLen: number, ratio: number): number {
  checkInt(seqLen, 'seqLen', 0, Number.MAX_SAFE_INTEGER);
  checkInt(extendLen, 'extendLen', 0, Number.MAX_SAFE_INTEGER);
  checkInt(ratio, 'ratio', 0, Number.MAX_SAFE_INTEGER);
  return visibleEntries(seqLen, extendLen, ratio);
}
/** @internal */
export function visibleEntries(seqLen: number, extendLen: number, ratio: number): number {
  return ratio > 0 && extendLen > 0 ? Math.floor(seqLen / ratio) : 0;
}

export function roundUp(x: number, m: number): number {
  return m > 0 ? Math.ceil(x / m) * m : x;
}

/** Width of a ratio's combined rows (SPEC §6): roundUp((0 | topk | maxVisible) + W, align). */
export function combinedWidth(ratio: number, topk: number, maxVisible: number, window: number, align: number): number {
  checkInt(ratio, 'ratio', 0, Number.MAX_SAFE_INTEGER);
  checkInt(topk, 'topk', 0, Number.MAX_SAFE_INTEGER);
  checkInt(maxVisible, 'maxVisible', 0, Number.MAX_SAFE_INTEGER);
  checkInt(window, 'window', 0, Number.MAX_SAFE_INTEGER);
  checkInt(align, 'align', 0, Number.MAX_SAFE_INTEGER);
  return rowWidth(ratio, topk, maxVisible, window, align);
}
/** @internal */
export function rowWidth(ratio: number, topk: number, maxVisible: number, window: number, align: number): number {
  const compressed = ratio === 0 ? 0 : ratio === 4 ? topk : maxVisible;
  return roundUp(compressed + window, align);
}

/**
 * A request's `swaTokenIds` from serving-engine tables: `reqToToken` holds the full-cache token id
 * of each position of the request (length ≥ seqLen) and `fullToSwa` maps a full-cache token id to
 * its SWA-cache token id (negative: not in the SWA cache). Returns the ids of the positions the
 * chunk needs, [seqLen − g, seqLen) with g = swaGatherLength(seqLen, extendLen, window).
 */
export function swaTokenIdsFromTable(
  reqToToken: ArrayLike<number>,
  fullToSwa: ArrayLike<number>,
  seqLen: number,
  extendLen: number,
  window: number = DEFAULT_WINDOW,
): number[] {
  checkInt(seqLen, 'seqLen', 0, INT32_MAX);
  checkInt(extendLen, 'extendLen', 0, seqLen);
  checkInt(window, 'window', 1, 1 << 20);
  // each table's length read once, a typed array by its memory (a Proxy of one is refused, not a TypeError)
  const positions = arrayLikeOf(reqToToken, 'reqToToken');
  if (positions === null || positions.length < seqLen) {
    fail('INVALID_SHAPE', 'reqToToken', `at least seqLen = ${seqLen} positions`, describe(reqToToken));
  }
  const table = arrayLikeOf(fullToSwa, 'fullToSwa');
  if (table === null) fail('INVALID_VALUE', 'fullToSwa', 'an array mapping full-cache ids to SWA ids', describe(fullToSwa));
  const g = gatherLength(seqLen, extendLen, window);
  const out: number[] = [];
  for (let p = seqLen - g; p < seqLen; p++) {
    const full = positions.values[p] as number;
    if (!Number.isSafeInteger(full) || full < 0 || full >= table.length) {
      fail('OUT_OF_RANGE', `reqToToken[${p}]`, `a full-cache token id in [0, ${table.length})`, describe(full));
    }
    const swa = table.values[full] as number;
    if (!Number.isSafeInteger(swa) || swa < 0) {
      fail('OUT_OF_RANGE', `fullToSwa[${full}]`, `the SWA id of position ${p} (it is inside the window of a query)`, describe(swa));
    }
    out.push(swa);
  }
  return out;
}
