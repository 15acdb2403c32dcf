/**
 * The prefill router (SPEC §7): a chunk goes down the workspace path ('sparse': dequant the needed
 * rows once, then sparsePrefill) when it has more queries than a threshold, or when forced; else
 * down the paged path (attention straight over the FP8 pages). Both give the same result within
 * SPEC §4's tolerances; the choice and its reason are returned to the caller.
 */
import { fail } from '../errors.js';
import { describe } from '../ops/common.js';
import type { BackendName } from '../types.js';
import type { PrefillPath, PrefillPathChoice, RouteDecision, RouteOptions } from './types.js';

/** The environment variable that forces a path: sparse | paged | auto. */
export const SPARSE_PREFILL_ENV = 'SPARSE_MLA_PREFILL';

/**
 * Query count of a chunk above which the workspace path is taken by default on the GPU.
 *
 * Provisional. The workspace path pays a fixed cost per layer (dequantizing every gathered row
 * once) and then reads bf16 rows; the paged path dequantizes each entry once per query that
 * attends it. So the workspace path wins once enough queries share the gathered rows. The value
 * belongs to the target GPU and will be set from H100 measurements of both paths (the CUDA issue);
 * until then it is a round number, not a measurement. Override per call with `threshold`.
 */
export const DEFAULT_SPARSE_PREFILL_THRESHOLD = 1024;

/**
 * Default thresholds per backend (data, not code paths). wasm: measured on the 2-core dev machine
 * (hQ 64, top-k 512 + window 128, seqLen 8192, one c4 layer): paged/workspace time 0.55 at 8
 * queries, 0.95 at 32, 0.99 at 128, 1.06 at 512, so the crossover lies between 32 and 128 and
 * the two paths are within a few percent beyond it. cpu runs the same core natively (not measured
 * separately). cuda: DEFAULT_SPARSE_PREFILL_THRESHOLD until measured.
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
