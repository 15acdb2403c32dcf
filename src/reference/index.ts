/**
 * `sparse-mla/reference`: a float64 reference of SPEC §2–§5, written from the SPEC independently of
 * the C++ core (it also returns mag = Σ w·|v| per out element), plus SPEC §4's accuracy bounds and the
 * comparison that judges outputs against it (compare.ts). Every export checks its arguments
 * (checks.ts); kv_cache and sparse_prefill are listed by name, since their modules also export, to
 * each other, the unchecked steps that run after a call's checks (as codecs.ts and checks.ts do).
 */
export * from './formats.js'; // checked wrappers of codecs.ts, whose unchecked math stays inside
export {
  V4_LAYOUT,
  V32_LAYOUT,
  roundUp,
  v4PageBytesReference,
  kvCacheBytesReference,
  cacheTokenCount,
  cacheRowDims,
  checkCacheReference,
  tokenLayoutReference,
  normalizeTokenIds,
  tileExponentReference,
  quantizeKCacheReference,
  dequantizeTokenReference,
  DequantizedRows,
  dequantizeKCacheReference,
  type TokenLayout,
} from './kv_cache.js';
export {
  emptyAttentionResult,
  widenBf16,
  indexSet,
  checkQueryTensor,
  checkArgsRecord,
  checkDv,
  checkSmScale,
  checkQueries,
  checkSink,
  logAddExp,
  attendQueryReference,
  checkSparsePrefillArgs,
  prepareSparsePrefillReference,
  sparsePrefillReference,
  type ReferenceOptions,
  type ReferenceAttentionResult,
  type IndexSet,
  type PrefillShapes,
  type PreparedSparsePrefill,
} from './sparse_prefill.js';
export * from './paged_sparse_attention.js';
export * from './compare.js';
export * from './planner.js';
