/**
 * The prefill router (SPEC §7): a chunk goes down the workspace path ('sparse': dequant the needed
 * rows once, then sparsePrefill) when it has more queries than a threshold, or when forced; else
 * down the paged path (attention straight over the FP8 pages). Both give the same result within
 * SPEC §4's accuracy bounds; the choice and its reason are returned to the caller.
 */
import { fail } from '../errors.js';
import { describe } from '../ops/common.js';
import type { BackendName } from '../types.js';
import type { CompressRatio, PrefillPath, PrefillPathChoice, RouteDecision, RouteOptions } from './types.js';

/** The environment variable that forces a path: sparse | paged | auto. */
export const SPARSE_PREFILL_ENV = 'SPARSE_MLA_PREFILL';

/**
 * Query count of a chunk above which the workspace path is taken when neither a backend nor a
 * threshold is named (the router exists for the GPU: between the cuda table's c4 and c0 / c128
 * figures).
 * Override per call with `threshold`.
 */
export const DEFAULT_SPARSE_PREFILL_THRESHOLD = 256;

/**
 * Default thresholds per backend and compress ratio (data, not code paths): a chunk of a layer of
 * ratio r goes down the workspace path when it has more queries than `[backend][r]`.
 *
 * Each figure is where the workspace path starts to win in the measurements of bench/RESULTS.md
 * (device time of the paged path over dequant + sparsePrefill, one request whose chunk is the last
 * N tokens, N = 16 … 4096, the workspace dequant timed as a plan runs it: device ids into the
 * plan's workspace), each the figure whose worst loss over hQ 64 / 128 and prefixes 0 / 32K is
 * smallest. cuda (H200): at c4 the workspace path wins at every size with hQ 128 and from 256
 * queries with hQ 64, and the paged path never wins by more than 6% below that, so c4 chunks always
 * take the workspace path (0); c128 from 256 (worst loss 12%), c0 from 512 (8%).
 * cpu and wasm (the 2-core x86 host, "Router thresholds of cpu and wasm" and "The router re-swept on a
 * quiet host"): whole prefillLayer calls down each path (bench/layer_paths_wall.mjs; runs merged and
 * the same rule applied by bench/router_threshold.mjs), hQ 16 / 64, prefixes 0 / 32K, N = 16 … 512.
 * Both paths run the same core and the paged op reads only the tokens its ids name, so they stay
 * within about 10% of each other everywhere: the paged layer wins the smallest c4 chunks on cpu
 * (16), c4 chunks up to 128 queries on wasm, and on wasm also the smallest c0 (16) and c128 (32).
 */
export const SPARSE_PREFILL_THRESHOLDS: Readonly<Record<BackendName, Readonly<Record<CompressRatio, number>>>> = {
  cuda: { 0: 512, 4: 0, 128: 256 },
  cpu: { 0: 0, 4: 16, 128: 0 },
  wasm: { 0: 16, 4: 128, 128: 32 },
};

const CHOICES: readonly PrefillPathChoice[] = ['sparse', 'paged', 'auto'];

/** The reasons of a path forced by option (every layer of a forced path gives one). */
const FORCED_BY_OPTION: Readonly<Record<PrefillPath, string>> = { sparse: "forced by option path='sparse'", paged: "forced by option path='paged'" };

/**
 * What routePrefill decides for a path forced by option when no threshold is given (it then reads
 * neither the threshold table nor the environment), one object per path and shared: for callers
 * that copy its fields and hand it to no one (prefillLayer's device calls, whose every layer would
 * otherwise build an options object and a decision). Undefined for any other options.
 */
const FORCED_ROUTES: Readonly<Record<PrefillPath, RouteDecision>> = {
  sparse: Object.freeze({ path: 'sparse', reason: FORCED_BY_OPTION.sparse }),
  paged: Object.freeze({ path: 'paged', reason: FORCED_BY_OPTION.paged }),
};
export function forcedRoute(path: unknown, threshold: unknown): RouteDecision | undefined {
  if (threshold !== undefined) return undefined;
  return path === 'sparse' ? FORCED_ROUTES.sparse : path === 'paged' ? FORCED_ROUTES.paged : undefined;
}

/** The last threshold reason built, kept: a chunk's layers ask for the same one (no string built a layer). */
let lastThresholdReason = { numQueries: -1, threshold: -1, above: false, backend: undefined as string | undefined, reason: '' };

/** Why a threshold picked the path; `backend`: the backend whose default the threshold is, if it is one. */
function thresholdReason(numQueries: number, threshold: number, above: boolean, backend: string | undefined): string {
  const last = lastThresholdReason;
  if (last.numQueries === numQueries && last.threshold === threshold && last.above === above && last.backend === backend) return last.reason;
  const reason = `${numQueries} queries ${above ? '>' : '≤'} threshold ${threshold}${backend !== undefined ? ` (${backend} default)` : ''}`;
  lastThresholdReason = { numQueries, threshold, above, backend, reason };
  return reason;
}

/**
 * Pick the path for a chunk of `numQueries` queries of a layer of `compressRatio` (default 4); see
 * RouteOptions for the precedence.
 */
export function routePrefill(numQueries: number, options: RouteOptions & { backend?: BackendName; compressRatio?: CompressRatio } = {}): RouteDecision {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) fail('INVALID_VALUE', 'options', 'a RouteOptions object', describe(options));
  if (!Number.isSafeInteger(numQueries) || numQueries < 0) fail('INVALID_VALUE', 'numQueries', 'a non-negative integer query count', describe(numQueries));
  // each option read once (a getter that answered otherwise the second time gave a reason naming the wrong source)
  const { path = 'auto', compressRatio = 4, backend, threshold: asked } = options;
  if (compressRatio !== 0 && compressRatio !== 4 && compressRatio !== 128) fail('INVALID_VALUE', 'compressRatio', '0, 4 or 128', describe(compressRatio));
  // a string before it is a key: Object.hasOwn turns any other value into one (a null-prototype object's is a TypeError)
  if (backend !== undefined && (typeof backend !== 'string' || !Object.hasOwn(SPARSE_PREFILL_THRESHOLDS, backend))) fail('INVALID_VALUE', 'backend', "'cuda', 'cpu' or 'wasm'", describe(backend));
  const fromBackend = backend !== undefined && asked === undefined;
  const threshold = asked ?? (backend !== undefined ? SPARSE_PREFILL_THRESHOLDS[backend][compressRatio] : DEFAULT_SPARSE_PREFILL_THRESHOLD);
  if (!CHOICES.includes(path)) fail('INVALID_VALUE', 'path', "'sparse', 'paged' or 'auto'", describe(path));
  if (typeof threshold !== 'number' || !(threshold >= 0)) fail('INVALID_VALUE', 'threshold', 'a non-negative query count', describe(threshold));
  if (path !== 'auto') return { path, reason: FORCED_BY_OPTION[path] };
  const given = options.env;
  if (given !== undefined && given !== null && typeof given !== 'object') fail('INVALID_VALUE', 'env', 'an object of environment variables (or none: process.env)', describe(given));
  const env = given ?? process.env;
  const raw: unknown = env[SPARSE_PREFILL_ENV];
  if (raw !== undefined && typeof raw !== 'string') fail('INVALID_VALUE', SPARSE_PREFILL_ENV, "'sparse', 'paged' or 'auto' (a string)", describe(raw));
  if (raw !== undefined && raw !== '') {
    const v = raw.trim().toLowerCase();
    if (!CHOICES.includes(v as PrefillPathChoice)) fail('INVALID_VALUE', SPARSE_PREFILL_ENV, "'sparse', 'paged' or 'auto'", describe(raw));
    if (v !== 'auto') return { path: v as PrefillPath, reason: `forced by ${SPARSE_PREFILL_ENV}=${v}` };
  }
  const above = numQueries > threshold;
  return { path: above ? 'sparse' : 'paged', reason: thresholdReason(numQueries, threshold, above, fromBackend ? backend : undefined) };
}
