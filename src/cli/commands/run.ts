/**
 * `sparse-mla run` (what `npm start` runs), in two sections on the best backend:
 *
 * 1. One big c4 prefill chunk end to end: quantize random rows into a v4 paged cache, dequantize
 *    the chunk's gather into a bf16 workspace, run the sparse prefill with a sink, and check the
 *    results against the float64 reference. The prefill runs as several calls of `--block` queries
 *    each, so the progress bar moves; times are sums of the engine calls alone.
 * 2. A small DeepSeek-V4-shaped model chunk (src/cli/layers.ts): several requests, layers of
 *    compress ratio 0 / 4 / 128 with their own caches, one plan reused by every layer, each layer
 *    through prefillLayer down the path the router picks; per layer the path and why, the
 *    workspace, the time, the dropped entries and the check against prefillLayerReference; then
 *    the plan's counters, which prove the chunk-invariant rows were built once.
 *
 * Exit 0 when every check passes, 1 when one fails, 2 on bad flags.
 */
import { SparseMlaError } from '../../errors.js';
import { createEngine, createKvCache } from '../../index.js';
import {
  dequantizeKCacheReference,
  quantizeKCacheReference,
  prepareSparsePrefillReference,
  compareAttention,
  describeBounds,
  formatFigure,
  formatPosition,
  type TensorComparison,
} from '../../reference/index.js';
import { bf16BitsToFloat32, tensor } from '../../tensor.js';
import type { Engine, KvCache, Tensor } from '../../types.js';
import type { PrefillPathChoice } from '../../planner/index.js';
import { expectNoPositionals, formatOptions, parseArgs, type OptionTable } from '../args.js';
import { BACKEND_CHOICES, engineOptions, type CliCommand } from '../command.js';
import { Progress, timed } from '../progress.js';
import { formatBytes, formatRate, formatSeconds, formatTable, setReportWidth, writeFittedLines } from '../table.js';
import { LAYER_PATHS, checkLayerChunkShape, parseLayers, runLayerChunk, type LayerChunkShape, type LayerReport } from '../layers.js';
import { c4ChunkInputs, c4ChunkPages, placeC4Chunk, sliceQueries, type C4ChunkInputs, type C4ChunkPlacement, type C4ChunkShape } from '../../check/chunks.js';
import { prefillFlops } from '../../ops/sparse_prefill.js';
import { makeRng, sampleRows } from '../../check/grid.js';
import { cacheOpBytes, rowDimOf, tokenByteRanges, V4_TOKEN_DATA_BYTES, V4_TOKEN_SCALE_BYTES } from '../../kv_cache_layout.js';

/** Head dims of the chunk (dQK = dV = 512, the v4 row). */
const D = rowDimOf('v4');

/** The chunk's shape from the options `run` and `bench` share (RUN_OPTIONS), as parsed. */
export function chunkShapeFromOptions(o: { queries: number; heads: number; topk: number; window: number; context: number; 'page-size': number; seed: number }): C4ChunkShape {
  return { queries: o.queries, heads: o.heads, topk: o.topk, window: o.window, context: o.context, pageSize: o['page-size'], seed: o.seed };
}

/** The most elements one tensor of the chunk may hold (the library's 32-bit sizes). */
const MAX_ELEMENTS = 2 ** 31 - 1;

/**
 * Refuses up front (TOO_LARGE), before anything is generated, a chunk whose q, indexer top-k or
 * cache rows are larger than one tensor holds (a --context or --topk past them was a RangeError from
 * the generator, or minutes of filling gigabytes); the plan refuses a workspace over its budget.
 */
export function checkChunkShape(shape: C4ChunkShape): void {
  const qElements = shape.queries * shape.heads * D;
  if (qElements > MAX_ELEMENTS) {
    throw new SparseMlaError('TOO_LARGE', `queries × heads × ${D} = ${qElements} elements is more than one q tensor can hold (2^31 − 1); use fewer --queries or --heads`, 'queries');
  }
  const topkElements = shape.queries * shape.topk;
  if (topkElements > MAX_ELEMENTS) {
    throw new SparseMlaError('TOO_LARGE', `queries × topk = ${topkElements} indices is more than one top-k tensor can hold (2^31 − 1); use a smaller --topk or fewer --queries`, 'topk');
  }
  const seqLen = shape.context + shape.queries;
  // (the cache's tokens, checked below, are about a quarter of these; this keeps the page count's arithmetic exact)
  if (seqLen > MAX_ELEMENTS) {
    throw new SparseMlaError('TOO_LARGE', `context + queries = ${seqLen} tokens is more than one request can hold (2^31 − 1); use a smaller --context`, 'context');
  }
  const cacheTokens = c4ChunkPages(shape).numPages * shape.pageSize;
  if (cacheTokens * D > MAX_ELEMENTS) {
    throw new SparseMlaError('TOO_LARGE', `the chunk's cache of ${cacheTokens} tokens (context + queries compressed by 4, and the window) × ${D} = ${cacheTokens * D} elements is more than one tensor of its rows can hold (2^31 − 1); use a smaller --context or --page-size`, 'context');
  }
}

/** `count` distinct query indices spread over [0, queries): first, last and random ones, sorted. */
function sampleQueries(queries: number, count: number, seed: number): number[] {
  return sampleRows(makeRng(seed ^ 0x5bd1e995), queries, count);
}

export const RUN_OPTIONS = {
  queries: { type: 'int', default: 4096, min: 1, help: 'query tokens in the chunk (sQ)', short: 'n' },
  heads: { type: 'int', default: 64, min: 1, max: 1024, help: 'query heads (hQ)' },
  topk: { type: 'int', default: 512, min: 0, help: 'compressed entries per query chosen by the indexer' },
  window: { type: 'int', default: 128, min: 1, max: 4096, help: 'sliding-window length W' },
  context: { type: 'int', default: 8192, min: 0, help: 'tokens before the chunk (sets how many compressed entries exist: (context + queries) / 4)' },
  'page-size': { type: 'int', default: 64, min: 1, max: 4096, help: 'v4 cache page size' },
  backend: { type: 'string', choices: BACKEND_CHOICES, help: 'backend (default: SPARSE_MLA_BACKEND, else auto)' },
  workers: { type: 'int', min: 1, max: 256, help: 'worker threads: the WASM pool or the native CPU threads (default: the cores)' },
  seed: { type: 'int', default: 1, min: 0, max: 2 ** 32 - 1, help: 'seed of the random inputs' },
} as const satisfies OptionTable;

const SECTIONS = ['all', 'prefill', 'layers'] as const;

/** The layer section's defaults: a few requests, two layers of each ratio (so reuse shows in the counters). */
export const DEFAULT_LAYERS = '0,0,4,128,4,128';
const C4_PAGE_SIZE = 16;
const C128_PAGE_SIZE = 2;

const OPTIONS = {
  ...RUN_OPTIONS,
  block: { type: 'int', min: 1, help: 'queries per sparsePrefill call (default: queries / 16)' },
  check: { type: 'int', default: 32, min: 0, help: 'queries checked against the float64 reference' },
  section: { type: 'string', default: 'all', choices: SECTIONS, help: "what to run: the big prefill chunk, the model's layers, or both" },
  layers: { type: 'string', default: DEFAULT_LAYERS, metavar: 'R,R,..', help: 'layer section: compress ratio (0, 4, 128) of each layer' },
  requests: { type: 'int', default: 4, min: 1, max: 256, help: 'layer section: requests in the chunk (kinds cycle: mid-sequence long, fresh, mid-sequence, short)' },
  'chunk-tokens': { type: 'int', default: 2048, min: 1, help: 'layer section: new tokens of the chunk over all requests (its queries)' },
  'max-context': { type: 'int', default: 4096, min: 0, help: 'layer section: tokens before the chunk of the longest request' },
  path: { type: 'string', choices: LAYER_PATHS, help: 'layer section: force the workspace (sparse) or paged path; auto: the router (default: SPARSE_MLA_PREFILL, else auto)' },
  threshold: { type: 'int', min: 0, help: "layer section: router threshold in queries (default: the backend's)" },
  'layer-check': { type: 'int', default: 8, min: 1, help: 'layer section: sampled queries per layer checked against prefillLayerReference' },
  json: { type: 'boolean', help: 'print the results as JSON on stdout instead of a table' },
  wide: { type: 'boolean', help: 'do not fit the report to 100 columns' },
  quiet: { type: 'boolean', short: 'q', help: 'no progress output on stderr' },
} as const satisfies OptionTable;

const USAGE = `Usage: sparse-mla run [options]

Runs on the best backend, in two sections, and checks everything against the float64 reference
(SPEC §4 accuracy bounds, docs/SPEC.md: per tensor the worst error/bound ratio, pass <= 1).
Exit 0 when all checks pass, 1 if not.

1. prefill: one big c4 prefill chunk (topk compressed entries + a causal sliding window per query,
   dQK = dV = 512, a sink per head): quantize a random v4 paged cache, dequantize the chunk's
   gather into a bf16 workspace, run sparsePrefill, check sampled queries.
2. layers: a small DeepSeek-V4-shaped model chunk — several requests (some mid-sequence), layers
   of compress ratio 0 / 4 / 128 with their own caches (c4 layers: an indexer top-k with −1 padding
   and a few not-yet-visible entries that must be dropped), one plan reused by every layer, each
   layer through prefillLayer down the path the router picks; per layer the path and why, the
   workspace, the time, the dropped entries and the check against prefillLayerReference.

Options:
${formatOptions(OPTIONS)}
`;

/** A row of the check table: a bit-exact check, or one tensor judged with SPEC §4's bounds. */
interface CheckRow {
  name: string;
  pass: boolean;
  count: number;
  /** elements that differ (exact) or are over their bound */
  failures: number;
  /** a bit-exact check (no bound) */
  exact?: boolean;
  /** the bounded checks: worst error/bound ratio and where, elements over, 1 − cos (out) */
  comparison?: TensorComparison;
  note?: string;
}

interface StepRow {
  step: string;
  seconds: number;
  calls: number;
  rate?: { value: number; unit: string };
  note: string;
}

/** v4 byte ranges of one token: its data bytes and its scale bytes. */
function tokenBytes(cache: KvCache, token: number): [number, number][] {
  const at = tokenByteRanges(cache, token);
  return [
    [at.data, V4_TOKEN_DATA_BYTES],
    [at.scales, V4_TOKEN_SCALE_BYTES],
  ];
}

/** Quantize: the engine's bytes against the reference's, token by token, on a sample. */
function checkQuantize(p: C4ChunkPlacement, x: C4ChunkInputs, cache: KvCache, sample: number[]): CheckRow {
  const ref = createKvCache('v4', { pageSize: p.shape.pageSize, numPages: p.numPages });
  const rows = new Uint16Array(sample.length * D);
  sample.forEach((r, k) => rows.set(x.rows.data.subarray(r * D, (r + 1) * D), k * D));
  const ids = sample.map((r) => p.gatherIds[r]!);
  quantizeKCacheReference(ref, ids, tensor('bf16', [sample.length, D], rows));
  let failures = 0;
  for (const id of ids) {
    let same = true;
    for (const [start, length] of tokenBytes(cache, id)) {
      for (let b = start; b < start + length; b++) if (cache.data[b] !== ref.data[b]) same = false;
    }
    if (!same) failures++;
  }
  return {
    name: 'quantize bytes',
    pass: failures === 0,
    count: ids.length,
    failures,
    exact: true,
    note: `${ids.length - failures}/${ids.length} sampled tokens bit-identical to the reference`,
  };
}

/** Dequantize: every gathered value must equal the reference value exactly (NaN matches NaN). */
function checkDequantize(p: C4ChunkPlacement, cache: KvCache, kv: Tensor<'bf16'>): CheckRow {
  const ref = dequantizeKCacheReference(cache, Array.from(p.gatherIds));
  let failures = 0;
  for (let i = 0; i < ref.length; i++) {
    const got = bf16BitsToFloat32(kv.data[i]!);
    const want = ref[i]!;
    if (got === want || (Number.isNaN(got) && Number.isNaN(want))) continue;
    failures++;
  }
  return {
    name: 'dequantize values',
    pass: failures === 0 && ref.length === kv.data.length,
    count: ref.length,
    failures,
    exact: true,
    note: `${ref.length - failures}/${ref.length} values equal to the reference`,
  };
}

interface PrefillSection {
  shape: C4ChunkShape;
  placement: C4ChunkPlacement;
  /** index row width (the plan's c4 rows) */
  width: number;
  sampled: number;
}

/** Section 1: the big c4 prefill chunk: quantize, dequantize, sparsePrefill, checks. */
async function runPrefillSection(engine: Engine, placement: C4ChunkPlacement, check: number, blockOption: number | undefined, progress: Progress, steps: StepRow[], checks: CheckRow[]): Promise<PrefillSection> {
  const { shape } = placement;
  const layout = placement.plan.layout(4);
  const kvRows = layout.rows;
  progress.start('generating inputs', 0);
  const [w, genSeconds] = await timed(async () => c4ChunkInputs(placement, makeRng(shape.seed ^ 0x1b873593)));
  progress.finish(`${kvRows} workspace rows, ${shape.queries} queries`);
  steps.push({ step: 'inputs', seconds: genSeconds, calls: 0, note: "random rows, queries, top-k; the plan's c4 rows (JS, untimed work)" });
  const gather = tensor('int32', [kvRows], placement.gatherIds);

  // A cache op over every workspace row, timed, with its rate (bytes read + written).
  const cacheStep = async <T>(step: string, note: string, fn: () => Promise<T>): Promise<T> => {
    progress.start(step, 0);
    const [value, seconds] = await timed(fn);
    progress.finish(formatSeconds(seconds));
    steps.push({ step, seconds, calls: 1, rate: { value: cacheOpBytes('v4', kvRows) / seconds / 1e9, unit: 'GB/s' }, note });
    return value;
  };

  // 1. quantize the rows into a v4 paged cache at their (shuffled) token ids
  const cache = createKvCache('v4', { pageSize: shape.pageSize, numPages: placement.numPages });
  await cacheStep('quantizeKCache', `${kvRows} bf16 rows -> v4 pages of ${shape.pageSize} (${placement.numPages} pages)`, () =>
    engine.quantizeKCache({ cache, tokenIds: gather, rows: w.rows }),
  );

  // 2. dequantize the chunk's gather into the bf16 workspace
  const kv = await cacheStep('dequantizeKCachePaged', `gather of ${layout.compressedRows} compressed + ${layout.swaRows} window rows -> bf16 [${kvRows}, ${D}]`, () =>
    engine.dequantizeKCachePaged({ cache, tokenIds: gather }),
  );

  // 3. the sparse prefill, in blocks of queries; keep the outputs of the sampled queries only
  const sample = sampleQueries(shape.queries, check, shape.seed);
  const { heads } = shape;
  const gotOut = new Float32Array(sample.length * heads * D);
  const gotLse = new Float32Array(sample.length * heads);
  const gotMax = new Float32Array(sample.length * heads);
  const block = blockOption ?? Math.max(1, Math.ceil(shape.queries / 16)); // queries per call (--block)
  const calls = Math.ceil(shape.queries / block);
  let prefillSeconds = 0;
  let nonFinite = 0;
  let next = 0; // next sampled query to collect
  progress.start('sparsePrefill', shape.queries);
  for (let start = 0; start < shape.queries; start += block) {
    const end = Math.min(shape.queries, start + block);
    const part = sliceQueries(w, start, end);
    const [res, seconds] = await timed(() =>
      engine.sparsePrefill({ ...part, kv, smScale: w.smScale, dV: D, attnSink: w.attnSink }),
    );
    prefillSeconds += seconds;
    const out = res.out.data;
    for (let i = 0; i < out.length; i++) if ((out[i]! & 0x7f80) === 0x7f80) nonFinite++;
    while (next < sample.length && sample[next]! < end) {
      const local = sample[next]! - start;
      for (let k = 0; k < heads * D; k++) gotOut[next * heads * D + k] = bf16BitsToFloat32(out[local * heads * D + k]!);
      gotLse.set(res.lse.data.subarray(local * heads, (local + 1) * heads), next * heads);
      gotMax.set(res.maxLogits.data.subarray(local * heads, (local + 1) * heads), next * heads);
      next++;
    }
    progress.update(end);
  }
  const flops = prefillFlops(w.entries, heads);
  progress.finish(`${formatSeconds(prefillSeconds)}, ${formatRate(flops / prefillSeconds / 1e9, 'GFLOP/s')}`);
  steps.push({
    step: 'sparsePrefill',
    seconds: prefillSeconds,
    calls,
    rate: { value: flops / prefillSeconds / 1e9, unit: 'GFLOP/s' },
    note: `${shape.queries} q x ${heads} heads, dQK ${D}, dV ${D}, ${shape.topk}+${shape.window} entries/q, ${(flops / 1e9).toFixed(1)} GFLOP`,
  });
  checks.push({
    name: 'out finite',
    pass: nonFinite === 0,
    count: shape.queries * heads * D,
    failures: nonFinite,
    exact: true,
    note: `all ${shape.queries} queries: ${nonFinite} non-finite outputs (every row has valid entries)`,
  });

  // 4. checks against the float64 reference
  progress.start('checking quantize + dequantize', 0);
  const tokenSample = sampleQueries(kvRows, Math.min(kvRows, 256), shape.seed + 1);
  checks.push(checkQuantize(placement, w, cache, tokenSample));
  checks.push(checkDequantize(placement, cache, kv));
  progress.finish();

  if (sample.length > 0) {
    const refOut = new Float64Array(sample.length * heads * D);
    const refMag = new Float64Array(sample.length * heads * D);
    const refLse = new Float64Array(sample.length * heads);
    const refMax = new Float64Array(sample.length * heads);
    // The reference sees only the sampled queries (their q rows, index rows and lengths), so it
    // widens a few MB instead of the whole q.
    const { heads: h } = shape;
    const width = w.indices.shape[1]!;
    const sq = new Uint16Array(sample.length * h * D);
    const si = new Int32Array(sample.length * width);
    const sl = new Int32Array(sample.length);
    sample.forEach((i, k) => {
      sq.set(w.q.data.subarray(i * h * D, (i + 1) * h * D), k * h * D);
      si.set(w.indices.data.subarray(i * width, (i + 1) * width), k * width);
      sl[k] = w.topkLength.data[i]!;
    });
    const prepared = prepareSparsePrefillReference({
      q: tensor('bf16', [sample.length, h, D], sq),
      kv,
      indices: tensor('int32', [sample.length, width], si),
      topkLength: tensor('int32', [sample.length], sl),
      attnSink: w.attnSink,
      smScale: w.smScale,
      dV: D,
    });
    progress.start('float64 reference', sample.length);
    const [, refSeconds] = await timed(async () => {
      for (let k = 0; k < sample.length; k++) {
        const ref = prepared.run([k]);
        refOut.set(ref.out, k * heads * D);
        refMag.set(ref.mag, k * heads * D);
        refLse.set(ref.lse, k * heads);
        refMax.set(ref.maxLogits, k * heads);
        progress.update(k + 1);
        await new Promise((resolve) => setImmediate(resolve)); // let the bar redraw
      }
    });
    progress.finish();
    steps.push({ step: 'float64 reference', seconds: refSeconds, calls: sample.length, note: `${sample.length} sampled queries (JS, for the checks)` });
    const verdict = compareAttention(
      { out: gotOut, lse: gotLse, maxLogits: gotMax },
      { out: refOut, mag: refMag, lse: refLse, maxLogits: refMax },
      { heads, dV: D, queries: sample },
    );
    for (const t of ['out', 'lse', 'maxLogits'] as const) {
      const c = verdict[t];
      checks.push({
        name: `prefill ${t}`,
        pass: c.pass,
        count: c.count,
        failures: c.overBound,
        comparison: c,
        ...(c.infNanMismatch ? { note: `${c.infNanMismatch} inf/NaN placement mismatches` } : {}),
      });
    }
  }
  return { shape, placement, width: w.indices.shape[1]!, sampled: sample.length };
}

export async function runCommand(argv: string[]): Promise<number> {
  const { options: o, positionals } = parseArgs(argv, OPTIONS);
  expectNoPositionals('run', positionals);
  if (o.wide) setReportWidth(Infinity);
  const progress = new Progress({ enabled: !o.quiet });
  const runPrefill = o.section !== 'layers';
  const runLayers = o.section !== 'prefill';
  const shape = chunkShapeFromOptions(o);
  const layerShape: LayerChunkShape = {
    layers: parseLayers(o.layers),
    requests: o.requests,
    chunkTokens: o['chunk-tokens'],
    maxContext: o['max-context'],
    heads: o.heads,
    topk: o.topk,
    window: o.window,
    pageSize: o['page-size'],
    c4PageSize: C4_PAGE_SIZE,
    c128PageSize: C128_PAGE_SIZE,
    path: (o.path ?? 'auto') as PrefillPathChoice,
    ...(o.threshold !== undefined ? { threshold: o.threshold } : {}),
    check: o['layer-check'],
    seed: o.seed,
  };

  // sizes, then the backend, are refused before any work
  if (runPrefill) checkChunkShape(shape);
  if (runLayers) checkLayerChunkShape(layerShape);
  const steps: StepRow[] = [];
  const checks: CheckRow[] = [];

  progress.start('starting engine', 0);
  const [engine, startSeconds] = await timed(() => createEngine(engineOptions(o)));
  const workers = engine.workers ?? 0;
  progress.finish(`${engine.backend}${workers > 0 ? `, ${workers} workers` : ''}`);
  steps.push({ step: 'engine start', seconds: startSeconds, calls: 1, note: `${engine.backend} backend${workers > 0 ? `, ${workers} workers` : ''}` });

  let prefill: PrefillSection | undefined;
  let layers: LayerReport | undefined;
  try {
    if (runPrefill) prefill = await runPrefillSection(engine, placeC4Chunk(shape, makeRng(shape.seed)), o.check, o.block, progress, steps, checks);
    if (runLayers) layers = await runLayerChunk(engine, layerShape, progress);
  } finally {
    await engine.dispose();
  }

  const pass = checks.every((c) => c.pass) && (layers?.pass ?? true);
  if (o.json) {
    const first = prefill
      ? { shape, workspaceRows: prefill.placement.plan.layout(4).rows, indexWidth: prefill.width, sampledQueries: prefill.sampled, steps, checks }
      : { steps };
    process.stdout.write(`${JSON.stringify({ command: 'run', backend: engine.backend, workers, ...first, ...(layers ? { layerChunk: layers } : {}), pass }, jsonNumbers, 2)}\n`);
    return pass ? 0 : 1;
  }
  const lines = [
    `sparse-mla run: ${engine.backend} backend${workers > 0 ? `, ${workers} workers` : ''}, seed ${o.seed}`,
    '',
    ...(prefill ? prefillReport(prefill, steps, checks) : []),
    ...(layers ? layerReport(layers, engine.backend) : []),
    pass ? 'PASS' : 'FAIL',
  ];
  // tables are fitted by formatTable; prose lines are wrapped here
  writeFittedLines(lines);
  return pass ? 0 : 1;
}

/** JSON has no NaN/inf: write them as null / strings. */
function jsonNumbers(_key: string, value: unknown): unknown {
  if (typeof value === 'number' && !Number.isFinite(value)) return Number.isNaN(value) ? null : String(value);
  return value;
}

/** Section 1's lines: the shape, the steps with their rates, the checks. */
function prefillReport({ shape: s, placement, width, sampled }: PrefillSection, steps: StepRow[], checks: CheckRow[]): string[] {
  const header =
    `1. Prefill chunk (one c4 layer, the plan's rows, no prefillLayer): ` +
    `${s.queries} queries x ${s.heads} heads, dQK ${D}, dV ${D}, topk ${s.topk} + window ${s.window} (index rows of ${width}), ` +
    `workspace ${placement.plan.layout(4).rows} rows, v4 page size ${s.pageSize}`;
  const stepTable = formatTable(
    [
      ['step', 'time', 'calls', 'throughput', 'what'],
      ...steps.map((r) => [r.step, formatSeconds(r.seconds), String(r.calls), r.rate ? formatRate(r.rate.value, r.rate.unit) : '-', r.note]),
    ],
    ['left', 'right', 'right', 'right', 'left'],
  );
  const checkTable = formatTable(
    [
      ['check', 'worst err/bound', 'worst at', '1 - cos (bound)', 'failing', 'result'],
      ...checks.map((c) => [
        c.name,
        c.comparison ? formatFigure(c.comparison.worstRatio) : 'exact',
        c.comparison ? formatPosition(c.comparison.worst?.at) : '-',
        c.comparison?.cosineGap !== undefined ? `${formatFigure(c.comparison.cosineGap)} (${formatFigure(c.comparison.cosineGapBound!)})` : '-',
        `${c.failures}/${c.count}`,
        c.pass ? 'PASS' : 'FAIL',
      ]),
    ],
    ['left', 'right', 'left', 'right', 'right', 'left'],
  );
  const notes = checks.filter((c) => c.note).map((c) => `  ${c.name}: ${c.note}`);
  return [
    header,
    '',
    stepTable,
    '',
    `Checks (prefill: ${sampled} sampled queries vs the float64 reference, SPEC §4 bounds: pass if worst err/bound <= 1):`,
    checkTable,
    ...notes,
    '',
  ];
}

/** The worst error/bound ratio in two digits, and the elements over the bound when there are any (* = inf/NaN misplaced). */
function worst(c: TensorComparison): string {
  const r = c.worstRatio;
  const ratio = !Number.isFinite(r) ? 'inf' : r === 0 ? '0' : r >= 0.01 ? r.toPrecision(2) : r.toExponential(0);
  return `${ratio}${c.overBound ? `(${c.overBound}${c.infNanMismatch ? '*' : ''})` : ''}`;
}

/** The router's decision: one line when every ratio's is the same, else a line per ratio. */
function routerLines(routes: LayerReport['routes'], how: string): string[] {
  const [first] = routes;
  if (first && routes.every((x) => x.path === first.path && x.reason === first.reason)) return [`  router (${how}): ${first.path} — ${first.reason}`];
  return [`  router (${how}), by compress ratio:`, ...routes.map((x) => `    c${x.ratio}: ${x.path} — ${x.reason}`)];
}

/** Section 2's lines: the requests, the router's choice, a row per layer, the plan's counters. */
function layerReport(r: LayerReport, backend: string): string[] {
  const s = r.shape;
  const reqs = r.requests.map((q, i) => `  request ${i}: ${q.kind.padEnd(18)} seqLen ${String(q.seqLen).padStart(6)}, extendLen ${String(q.extendLen).padStart(5)} (queries at positions ${q.seqLen - q.extendLen}..${q.seqLen - 1})`);
  const layouts = r.plan.layouts.map((l) => `c${l.ratio} ${l.compressedRows}+${l.swaRows} rows = ${formatBytes(l.bytes)}`).join('; ');
  // The router decides per chunk: one reason for every layer unless a layer was forced otherwise.
  const sameReason = r.layers.every((l) => l.reason === r.layers[0]?.reason);
  const layerTable = formatTable(
    [
      ['layer', 'ratio', 'path', ...(sameReason ? [] : ['why (router)']), 'workspace', 'width', 'time', 'GFLOP/s', 'dropped', '1 - cos', 'err/bound o/l/m', 'result'],
      ...r.layers.map((l) => [
        String(l.layer),
        `c${l.ratio}`,
        l.path,
        ...(sameReason ? [] : [l.reason]),
        l.path === 'sparse' ? formatBytes(l.workspaceBytes) : '-',
        String(l.indexWidth),
        formatSeconds(l.seconds),
        formatRate(l.gflops, '').trimEnd(),
        l.ratio === 4 ? `${l.dropped}/${l.expectedDropped}${l.check.droppedPass ? '' : ' !'}` : '-',
        l.check.out.cosineGap !== undefined ? formatFigure(l.check.out.cosineGap) : '-',
        [l.check.out, l.check.lse, l.check.maxLogits].map(worst).join(' '),
        l.check.pass ? 'PASS' : 'FAIL',
      ]),
    ],
    ['right', 'left', 'left', ...(sameReason ? [] : ['left' as const]), 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'left'],
  );
  const planTable = formatTable(
    [
      ['plan counter', 'count', 'expected', 'what', 'result'],
      ...r.planChecks.map((c) => [c.name, String(c.got), String(c.want), c.note, c.pass ? 'PASS' : 'FAIL']),
    ],
    ['left', 'right', 'right', 'left', 'left'],
  );
  const checked = r.layers[0]?.check.sampledQueries.length ?? 0;
  const threshold = s.threshold !== undefined ? `threshold ${s.threshold}` : `${backend} default threshold`;
  return [
    `2. Model chunk through the planner and the router: ${r.requests.length} requests, ${r.numQueries} queries x ${s.heads} heads, ` +
      `${s.layers.length} layers (ratios ${s.layers.join(', ')}), c4 top-k ${s.topk}, window ${s.window}`,
    ...reqs,
    `  one plan for every layer: built in ${formatSeconds(r.plan.planSeconds)} (planner core: ${r.plan.core}); workspace per ratio: ${layouts}`,
    ...routerLines(r.routes, `--path ${s.path}, ${threshold}`),
    `  layer inputs: own v4 SWA cache + c4/c128 cache (pages of ${s.pageSize}/${s.c4PageSize}/${s.c128PageSize}), q, sink, c4 top-k; ${formatSeconds(r.setupSeconds)}`,
    '',
    layerTable,
    `  path: sparse = dequantize into a bf16 workspace (its size shown), then sparsePrefill; paged = attention straight over the FP8 pages. width: index row width.`,
    `  time: the prefillLayer call (c4 combine, dequant into the workspace on the sparse path, attention); GFLOP/s over the attended entries.`,
    `  dropped: top-k entries not yet visible at the query (planted by the generator), dropped and counted by the planner, never attended (got/expected).`,
    `  checks: ${checked} sampled queries per layer (first/last of each request + random) vs prefillLayerReference (float64, attention sets from SPEC §6), ` +
      `both paths with SPEC §4's bounds; err/bound o/l/m: the worst error/bound ratio (pass <= 1) of out, lse and maxLogits, then in parentheses ` +
      `the elements over the bound (of ${r.layers[0]?.check.out.count ?? 0} and ${r.layers[0]?.check.lse.count ?? 0}) when any, * = inf/NaN misplaced; reference ${formatSeconds(r.referenceSeconds)}.`,
    ...describeBounds().map((l) => `    ${l}`),
    '',
    'The plan after every layer (its counters prove what was built once per chunk):',
    planTable,
    '',
  ];
}

export const command: CliCommand = {
  name: 'run',
  summary: 'run a DeepSeek-V4-shaped prefill chunk on the best backend and check it (npm start)',
  usage: USAGE,
  options: OPTIONS,
  run: runCommand,
};
