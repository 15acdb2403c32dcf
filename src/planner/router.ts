/**
 * The prefill router (SPEC §7): a chunk goes down the workspace path ('sparse': dequant the needed
 * rows once, then sparsePrefill) when it has more queries than a threshold, or when forced; else
 * down the paged path (attention straight over the FP8 pages). Both give the same result within
 * SPEC §4's accuracy bounds; the choice and its reason are returned to the caller.
 */
import { fail } from '../errors.js';
import { describe } from '../ops/common.js';
import type { BackendName } from '../types.js';
import type { PrefillPath, PrefillPathChoice, RouteDecision, RouteOptions } from './types.js';

/** The environment variable that forces a path: sparse | paged | auto. */
export const SPARSE_PREFILL_ENV = 'SPARSE_MLA_PREFILL';

/**
 * Query count of a chunk above which the workspace path is taken by default: the CUDA backend's
 * measured crossover (below), also used when no backend is named, since the router exists for the
 * GPU. The workspace path pays a fixed cost per layer (dequantizing every gathered row once, about
 * 0.02–0.04 ms on the H100 for these chunks) and then runs the tensor-core prefill over bf16 rows;
 * the paged path dequantizes each entry once per query that attends it. Override per call with
 * `threshold`.
 */
export const DEFAULT_SPARSE_PREFILL_THRESHOLD = 256;

/**
 * Default thresholds per backend (data, not code paths).
 *
 * cuda: measured on the H100 (nvidia-h100-x1, NVIDIA H100 80GB HBM3, 132 SMs), 2026-11-24, commits
 * dd1d6ce / c61f437, `sparse-mla bench --backend cuda` router sweep (src/cli/gpu_bench.ts;
 * bench/cuda/addon_bench_router_32k.json, addon_bench_router_c0.json, addon_bench_run3_partial.log;
 * summary in bench/cuda/ADDON.md): device time of the paged path over the workspace path (dequant +
 * sparsePrefill) for one request whose chunk is the last N tokens, N = 16 … 4096, prefix 0 and 32K,
 * hQ 64 and 128. c4 (top-k 512 / 1024 + window 128), the costliest layers: the workspace path wins
 * from N = 256–512 at hQ 64 (256: 0.97x at prefix 0, 1.11x at 32K; 512: 1.22x / 1.22x) and from
 * N ≤ 128 at hQ 128 (512: 1.29x / 1.41x). c128 and c0 (cheap layers): the paged path wins up to 256
 * (down to 0.5x), they cross between 512 and 1024 (0.77–1.21x at 512). One threshold per chunk:
 * above 256 queries every c4 layer gains and the c0 / c128 layers lose at most about 10% from 512
 * up; at 256 and below the paged path wins or ties on every layer kind except c4 at hQ 128.
 *
 * wasm: measured on the 2-core dev machine (hQ 64, top-k 512 + window 128, seqLen 8192, one c4
 * layer): paged/workspace time 0.55 at 8 queries, 0.95 at 32, 0.99 at 128, 1.06 at 512, so the
 * crossover lies between 32 and 128 and the two paths are within a few percent beyond it. cpu runs
 * the same core natively (not measured separately).
 */
export const SPARSE_PREFILL_THRESHOLDS: Readonly<Record<BackendName, number>> = {
  cuda: DEFAULT_SPARSE_PREFILL_THRESHOLD,
  cpu: 64,
  wasm: 64,
};

const CHOICES: readonly PrefillPathChoice[] = ['sparse', 'paged', 'auto'];

/** Pick the path for a chunk of `numQueries` queries; see RouteOptions for the precedence. */
export function routePrefill(numQueries: number, options: RouteOptions & { backend?: BackendName } = {}): RouteDecision {
  const { path = 'auto' } = options;
  const fromBackend = options.backend !== undefined && options.threshold === undefined;
  const threshold = options.threshold ?? (options.backend ? SPARSE_PREFILL_THRESHOLDS[options.backend] : undefined) ?? DEFAULT_SPARSE_PREFILL_THRESHOLD;
  if (!CHOICES.includes(path)) fail('INVALID_VALUE', 'path', "'sparse', 'paged' or 'auto'", describe(path));
  if (typeof threshold !== 'number' || !(threshold >= 0)) fail('INVALID_VALUE', 'threshold', 'a non-negative query count', describe(threshold));
  if (path !== 'auto') return { path, reason: `forced by option path='${path}'` };
  const env = options.env ?? process.env;
  const raw = env[SPARSE_PREFILL_ENV];
  if (raw !== undefined && raw !== '') {
    const v = raw.trim().toLowerCase();
    if (!CHOICES.includes(v as PrefillPathChoice)) fail('INVALID_VALUE', SPARSE_PREFILL_ENV, "'sparse', 'paged' or 'auto'", describe(raw));
    if (v !== 'auto') return { path: v as PrefillPath, reason: `forced by ${SPARSE_PREFILL_ENV}=${v}` };
  }
  const which = fromBackend ? ` (${options.backend} default)` : '';
  return numQueries > threshold
    ? { path: 'sparse', reason: `${numQueries} queries > threshold ${threshold}${which}` }
    : { path: 'paged', reason: `${numQueries} queries ≤ threshold ${threshold}${which}` };
}
