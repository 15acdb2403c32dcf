/**
 * `sparse-mla/reference`: a float64 reference of SPEC §2–§5, written from the SPEC independently of
 * the C++ core (it also returns mag = Σ w·|v| per out element), plus SPEC §4's accuracy bounds and the
 * comparison that judges outputs against it (compare.ts).
 */
export * from './formats.js';
export * from './kv_cache.js';
export * from './sparse_prefill.js';
export * from './paged_sparse_attention.js';
export * from './compare.js';
export * from './planner.js';
