/**
 * The size rules of SPEC §6 that a plan checks its inputs against before any index math runs. The
 * index math itself is the C++ core's (cpp/include/sparse_mla/planner.h): on the host through
 * ../backends/wasm/planner.ts, on a GPU in the planner kernels, each a backend's layer steps.
 */

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
