/**
 * The layer section of `sparse-mla run`: a small DeepSeek-V4-shaped model chunk through the planner
 * and the router (SPEC §6–§7). Several requests (some continuing mid-sequence, one shorter than the
 * window) share one chunk; one plan is built for it and reused by every layer; each layer has its
 * own random v4 SWA cache and its own compressed cache (c4 or c128), and c4 layers their own
 * indexer top-k with −1 padding and a few not-yet-visible entries that the planner must drop and
 * count. Each layer runs through prefillLayer down the path the router picks, and sampled queries
 * are checked against prefillLayerReference, which derives every attention set from §6 on its own.
 */
import { SparseMlaError } from '../errors.js';
import { createKvCache } from '../index.js';
import { createPlan, prefillLayer, routePrefill, type CompressRatio, type Plan, type PlanStats, type PrefillLayerResult, type PrefillPath, type PrefillPathChoice } from '../planner/index.js';
import { attentionValues, compareAttention, prefillLayerReference, type TensorComparison } from '../reference/index.js';
import { tensor } from '../tensor.js';
import type { Engine, KvCache, Tensor } from '../types.js';
import { chunkScenario, indexerTopk, mixedRequests, scenarioPages, type IndexerTopk, type MixedRequest } from '../check/chunks.js';
import { prefillFlops } from '../ops/sparse_prefill.js';
import { makeRng, randomV4Rows, uniformBf16Bits, type Rng } from '../check/grid.js';
import { timed, type Progress } from './progress.js';

/** Head dims of the model's layers (dQK = dV = 512, the v4 row). */
const D = 512;

export const LAYER_PATHS = ['auto', 'sparse', 'paged'] as const;

export interface LayerChunkShape {
  /** compress ratio of every layer, in order */
  layers: CompressRatio[];
  requests: number;
  /** new tokens of the chunk over all requests (the queries of every layer) */
  chunkTokens: number;
  /** tokens before the chunk of the longest mid-sequence request */
  maxContext: number;
  heads: number;
  /** indexer top-k of the c4 layers */
  topk: number;
  window: number;
  /** SWA cache page size */
  pageSize: number;
  c4PageSize: number;
  c128PageSize: number;
  path: PrefillPathChoice;
  /** router threshold; undefined: the backend's default */
  threshold?: number;
  /** sampled queries checked per layer */
  check: number;
  seed: number;
}

export type RequestInfo = MixedRequest;

export interface LayerCheck {
  pass: boolean;
  sampledQueries: number[];
  /** SPEC §4's bounds on both paths: worst error/bound ratio and where, elements over, 1 − cos */
  out: TensorComparison;
  lse: TensorComparison;
  maxLogits: TensorComparison;
  /** the dropped count equals the number of not-yet-visible entries the generator planted */
  droppedPass: boolean;
}

export interface LayerRow {
  layer: number;
  ratio: CompressRatio;
  path: PrefillPath;
  reason: string;
  /** bytes of bf16 workspace this layer filled (0 on the paged path) */
  workspaceBytes: number;
  /** combined index-row width of the layer (entries per query incl. −1 padding) */
  indexWidth: number;
  seconds: number;
  /** attended entries over all queries (window + compressed), for the FLOP count */
  entries: number;
  gflops: number;
  dropped: number;
  expectedDropped: number;
  check: LayerCheck;
}

export interface PlanReuseCheck {
  name: string;
  pass: boolean;
  got: number;
  want: number;
  note: string;
}

export interface LayerReport {
  shape: LayerChunkShape;
  requests: RequestInfo[];
  numQueries: number;
  /** The router's decision for each compress ratio of the chunk's layers, in their first order (thresholds differ per ratio). */
  routes: { ratio: CompressRatio; path: PrefillPath; reason: string }[];
  plan: { workspaceBytes: number; layouts: { ratio: CompressRatio; rows: number; compressedRows: number; swaRows: number; bytes: number }[]; stats: PlanStats; planSeconds: number; core: string };
  setupSeconds: number;
  referenceSeconds: number;
  layers: LayerRow[];
  planChecks: PlanReuseCheck[];
  pass: boolean;
}

/** `0,4,128,4` → ratios; a clear usage error otherwise. */
export function parseLayers(text: string): CompressRatio[] {
  // the ratios spelled exactly, as every number option is (args.ts): no spaces, '04', '0x4' or '4.0'
  const parts = text.split(',');
  const out: CompressRatio[] = [];
  for (const p of parts) {
    if (p !== '0' && p !== '4' && p !== '128') {
      throw new SparseMlaError('INVALID_VALUE', `--layers: expected a comma-separated list of compress ratios 0, 4, 128, got '${text}'`, '--layers');
    }
    out.push(Number(p) as CompressRatio);
  }
  if (out.length === 0 || out.length > 64) throw new SparseMlaError('INVALID_VALUE', `--layers: expected 1 to 64 layers, got ${out.length}`, '--layers');
  return out;
}

/** A v4 cache of `pageSize × numPages` random rows, quantized by the engine. */
async function randomCache(engine: Engine, rng: Rng, pageSize: number, numPages: number): Promise<KvCache> {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const ids = tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => i));
  await engine.quantizeKCache({ cache, tokenIds: ids, rows: tensor('bf16', [n, D], randomV4Rows(rng, n)) });
  return cache;
}

interface LayerInputs {
  ratio: CompressRatio;
  caches: { swa: KvCache; c4?: KvCache; c128?: KvCache };
  q: Tensor<'bf16'>;
  attnSink: Tensor<'float32'>;
  topk?: IndexerTopk;
}

/** The first and last query of every request, then random ones, sorted. */
export function sampleLayerQueries(reqs: readonly RequestInfo[], count: number, rng: Rng): number[] {
  const total = reqs.reduce((a, r) => a + r.extendLen, 0);
  if (count >= total) return Array.from({ length: total }, (_, i) => i);
  const chosen = new Set<number>();
  let off = 0;
  for (const r of reqs) {
    if (r.extendLen > 0 && chosen.size < count) chosen.add(off);
    if (r.extendLen > 1 && chosen.size < count) chosen.add(off + r.extendLen - 1);
    off += r.extendLen;
  }
  while (chosen.size < count) chosen.add(rng.int(0, total));
  return [...chosen].sort((a, b) => a - b);
}

/** Run the model chunk: plan once, every layer through prefillLayer, checks against the reference. */
/** The layer chunk's random stream (its requests are its first draws). */
const layerRng = (shape: LayerChunkShape): Rng => makeRng((shape.seed ^ 0x2545f491) >>> 0);

/** The most elements one tensor of the chunk may hold (the library's 32-bit sizes). */
const MAX_ELEMENTS = 2 ** 31 - 1;

/**
 * Refuses (TOO_LARGE) a layer chunk whose q, a cache's rows (the SWA cache, and the c4 / c128 ones its
 * layers use) or a c4 layer's top-k would be larger than one tensor holds, before anything is
 * allocated or any engine starts (a --max-context past them was a RangeError from the generator, or
 * minutes of filling gigabytes).
 */
export function checkLayerChunkShape(shape: LayerChunkShape): void {
  const reqs = mixedRequests(layerRng(shape), shape);
  const numQueries = reqs.reduce((a, r) => a + r.extendLen, 0);
  const qElements = numQueries * shape.heads * D;
  if (qElements > MAX_ELEMENTS) {
    throw new SparseMlaError('TOO_LARGE', `chunk tokens × heads × ${D} = ${qElements} elements is more than one q tensor can hold; use fewer --chunk-tokens or --heads`, 'chunk-tokens');
  }
  const longest = Math.max(...reqs.map((r) => r.seqLen));
  if (longest > MAX_ELEMENTS) throw new SparseMlaError('TOO_LARGE', `a request of ${longest} tokens is more than one request can hold (2^31 − 1); use a smaller --max-context`, 'max-context');
  const pages = scenarioPages(reqs, { window: shape.window, swaPageSize: shape.pageSize, c4PageSize: shape.c4PageSize, c128PageSize: shape.c128PageSize });
  const caches: [string, number][] = [['SWA', pages.swaPages * shape.pageSize]];
  if (shape.layers.includes(4)) caches.push(['c4', pages.c4Pages * shape.c4PageSize]);
  if (shape.layers.includes(128)) caches.push(['c128', pages.c128Pages * shape.c128PageSize]);
  for (const [name, tokens] of caches) {
    if (tokens * D > MAX_ELEMENTS) {
      throw new SparseMlaError('TOO_LARGE', `the ${name} cache of ${tokens} tokens × ${D} = ${tokens * D} elements is more than one tensor of its rows can hold (2^31 − 1); use a smaller --max-context or --chunk-tokens`, 'max-context');
    }
  }
  if (shape.layers.includes(4) && numQueries * shape.topk > MAX_ELEMENTS) {
    throw new SparseMlaError('TOO_LARGE', `chunk tokens × topk = ${numQueries * shape.topk} indices is more than one top-k tensor can hold (2^31 − 1); use a smaller --topk or fewer --chunk-tokens`, 'topk');
  }
}

export async function runLayerChunk(engine: Engine, shape: LayerChunkShape, progress: Progress): Promise<LayerReport> {
  checkLayerChunkShape(shape);
  const rng = layerRng(shape);
  const reqs = mixedRequests(rng, shape);
  const numQueries = reqs.reduce((a, r) => a + r.extendLen, 0);
  const qElements = numQueries * shape.heads * D;
  const sc = chunkScenario(rng, reqs, { window: shape.window, swaPageSize: shape.pageSize, c4PageSize: shape.c4PageSize, c128PageSize: shape.c128PageSize });

  // One plan for the chunk, before any layer (its workspace size is known here, before allocation).
  const [plan, planSeconds] = await timed(async () => createPlan(sc.chunk, { window: shape.window }));
  // The same chunk's rows once more, from a plan of their own, to count each layer's attended
  // entries and give its row width (the first plan's counters stay what the layers did).
  const rowsOf = createPlan(sc.chunk, { window: shape.window });
  const routes = [...new Set(shape.layers)].map((ratio) => ({
    ratio,
    ...routePrefill(numQueries, { path: shape.path, backend: engine.backend, compressRatio: ratio, ...(shape.threshold !== undefined ? { threshold: shape.threshold } : {}) }),
  }));

  // Every layer's own caches, queries, sink and (c4) indexer output, made just before the layer
  // runs (one layer's q at a time in memory); untimed.
  const makeLayerInputs = async (ratio: CompressRatio): Promise<LayerInputs> => {
    const caches: LayerInputs['caches'] = { swa: await randomCache(engine, rng, sc.swaPageSize, sc.swaPages) };
    if (ratio === 4) caches.c4 = await randomCache(engine, rng, sc.c4PageSize, sc.c4Pages);
    if (ratio === 128) caches.c128 = await randomCache(engine, rng, sc.c128PageSize, sc.c128Pages);
    return {
      ratio,
      caches,
      q: tensor('bf16', [numQueries, shape.heads, D], uniformBf16Bits(rng, qElements, 3)),
      attnSink: tensor('float32', [shape.heads], Float32Array.from({ length: shape.heads }, () => 2 + 6 * rng.uniform())),
      ...(ratio === 4 ? { topk: indexerTopk(rng, reqs, shape.topk) } : {}),
    };
  };

  const smScale = 1 / Math.sqrt(D);
  const layers: LayerRow[] = [];
  let referenceSeconds = 0;
  let setupSeconds = 0;
  for (let l = 0; l < shape.layers.length; l++) {
    const ratio = shape.layers[l]!;
    progress.start(`layer ${l} (c${ratio}) inputs`, 0);
    const [li, inputSeconds] = await timed(() => makeLayerInputs(ratio));
    setupSeconds += inputSeconds;
    progress.finish();
    progress.start(`layer ${l} (c${ratio}) prefillLayer`, 0);
    const [res, seconds] = await timed<PrefillLayerResult>(() =>
      prefillLayer(engine, {
        q: li.q,
        compressRatio: ratio,
        plan,
        caches: li.caches,
        attnSink: li.attnSink,
        smScale,
        path: shape.path,
        ...(shape.threshold !== undefined ? { threshold: shape.threshold } : {}),
        ...(li.topk ? { topkIndices: li.topk.indices } : {}),
      }),
    );
    const rows = ratio === 4 ? rowsOf.combineC4(li.topk!.indices) : rowsOf.combinedRows(ratio);
    const entries = rows.lengths.data.reduce((a, b) => a + b, 0);
    const gflops = prefillFlops(entries, shape.heads) / seconds / 1e9;
    progress.finish(`${res.path}, ${(seconds * 1e3).toFixed(1)} ms`);

    // the sampled queries against the float64 reference (attention sets derived from §6 alone)
    const sample = sampleLayerQueries(reqs, shape.check, rng);
    progress.start(`layer ${l} (c${ratio}) float64 reference`, 0);
    const [ref, refSeconds] = await timed(async () =>
      prefillLayerReference(
        {
          chunk: sc.ref,
          compressRatio: ratio,
          q: li.q,
          caches: li.caches,
          attnSink: li.attnSink,
          smScale,
          ...(li.topk ? { topkIndices: li.topk.indices } : {}),
        },
        { queries: sample },
      ),
    );
    referenceSeconds += refSeconds;
    progress.finish(`${sample.length} queries`);
    const { out, lse, maxLogits } = compareAttention(attentionValues(res, sample), ref, { heads: shape.heads, dV: D, queries: sample });
    const expectedDropped = li.topk?.planted ?? 0;
    const droppedPass = res.dropped === expectedDropped;
    layers.push({
      layer: l,
      ratio,
      path: res.path,
      reason: res.reason,
      workspaceBytes: res.workspaceBytes,
      indexWidth: rows.width,
      seconds,
      entries,
      gflops,
      dropped: res.dropped,
      expectedDropped,
      check: { pass: out.pass && lse.pass && maxLogits.pass && droppedPass, sampledQueries: sample, out, lse, maxLogits, droppedPass },
    });
  }

  const planChecks = checkPlanReuse(plan, layers, shape.topk);
  const layouts = plan.ratios.map((r) => {
    const x = plan.layout(r);
    return { ratio: r, rows: x.rows, compressedRows: x.compressedRows, swaRows: x.swaRows, bytes: x.bytes };
  });
  return {
    shape,
    requests: reqs,
    numQueries,
    routes,
    plan: { workspaceBytes: plan.workspaceBytes, layouts, stats: { ...plan.stats }, planSeconds, core: plan.core },
    setupSeconds,
    referenceSeconds,
    layers,
    planChecks,
    pass: layers.every((l) => l.check.pass) && planChecks.every((c) => c.pass),
  };
}

/** The plan's counters prove what was built once per chunk and what ran per layer. */
function checkPlanReuse(plan: Plan, layers: LayerRow[], topk: number): PlanReuseCheck[] {
  const count = (f: (l: LayerRow) => boolean): number => layers.filter(f).length;
  const c0 = count((l) => l.ratio === 0), c4 = count((l) => l.ratio === 4), c128 = count((l) => l.ratio === 128);
  const sparse = count((l) => l.path === 'sparse'), paged = count((l) => l.path === 'paged');
  // an extra (compressed) set exists only where there is something to attend
  const pagedC4 = topk > 0 ? count((l) => l.path === 'paged' && l.ratio === 4) : 0;
  const pagedC128 = plan.ratios.includes(128) && plan.layout(128).maxVisible > 0 ? count((l) => l.path === 'paged' && l.ratio === 128) : 0;
  const dropped = layers.reduce((a, l) => a + l.expectedDropped, 0);
  const s = plan.stats;
  const row = (name: string, got: number, want: number, note: string): PlanReuseCheck => ({ name, pass: got === want, got, want, note });
  return [
    row('c0 rows built', s.c0Builds, c0 > 0 ? 1 : 0, `once for ${c0} c0 layer${c0 === 1 ? '' : 's'}`),
    row('c128 rows built', s.c128Builds, c128 > 0 ? 1 : 0, `once for ${c128} c128 layer${c128 === 1 ? '' : 's'}`),
    row('c4 combines', s.c4Combines, c4, `one per c4 layer (its own top-k)`),
    row('c4 entries dropped', s.c4Dropped, dropped, 'the not-yet-visible entries planted in the top-k'),
    row('workspace allocations', s.workspaceAllocations, sparse > 0 ? 1 : 0, `one buffer for ${sparse} workspace-path layer${sparse === 1 ? '' : 's'}`),
    row('paged main sets built', s.pagedMainBuilds, paged > 0 ? 1 : 0, `once for ${paged} paged-path layer${paged === 1 ? '' : 's'}`),
    row('paged extra sets built', s.pagedExtraBuilds, (pagedC128 > 0 ? 1 : 0) + pagedC4, 'c128 once, c4 per layer'),
  ];
}
