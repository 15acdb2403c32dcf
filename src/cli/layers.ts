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
import { createPlan, prefillLayer, routePrefill, type CompressRatio, type Plan, type PlanChunk, type PlanStats, type PrefillLayerResult, type PrefillPath, type PrefillPathChoice } from '../planner/index.js';
import { compareAttention, prefillLayerReference, type PlanReferenceChunk, type TensorComparison } from '../reference/index.js';
import { bf16BitsToFloat32, tensor } from '../tensor.js';
import type { Engine, KvCache, Tensor } from '../types.js';
import type { Progress } from './progress.js';
import { DQK, DV, fillBf16, fillV4Rows, prefillFlops, Rng, V4_ROW } from './workload.js';

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

export interface RequestInfo {
  kind: string;
  seqLen: number;
  extendLen: number;
}

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
  route: { path: PrefillPath; reason: string };
  plan: { workspaceBytes: number; layouts: { ratio: CompressRatio; rows: number; compressedRows: number; swaRows: number; bytes: number }[]; stats: PlanStats; planSeconds: number; core: string };
  setupSeconds: number;
  referenceSeconds: number;
  layers: LayerRow[];
  planChecks: PlanReuseCheck[];
  pass: boolean;
}

/** `0,4,128,4` → ratios; a clear usage error otherwise. */
export function parseLayers(text: string): CompressRatio[] {
  const parts = text.split(',').map((s) => s.trim());
  const out: CompressRatio[] = [];
  for (const p of parts) {
    if (p !== '0' && p !== '4' && p !== '128') {
      throw new SparseMlaError('INVALID_VALUE', `--layers: expected a comma-separated list of compress ratios 0, 4, 128, got '${text}'`, 'argv');
    }
    out.push(Number(p) as CompressRatio);
  }
  if (out.length === 0 || out.length > 64) throw new SparseMlaError('INVALID_VALUE', `--layers: expected 1 to 64 layers, got ${out.length}`, 'argv');
  return out;
}

/**
 * The chunk's requests. Kinds cycle: a long request continuing mid-sequence, a fresh prompt that
 * lies wholly in this chunk, a request in the middle of its prompt, and a short one whose sequence
 * is shorter than the window (no c128 entry yet, window not full). New tokens are split by weight.
 */
export function chunkRequests(shape: LayerChunkShape, rng: Rng): RequestInfo[] {
  const kinds = [
    { kind: 'mid-sequence, long', weight: 3 },
    { kind: 'fresh prompt', weight: 4 },
    { kind: 'mid-sequence', weight: 2 },
    { kind: 'short (< window)', weight: 1 },
  ];
  const picked = Array.from({ length: shape.requests }, (_, r) => kinds[r % kinds.length]!);
  const isShort = (r: number): boolean => picked[r]!.kind.startsWith('short');
  const total = picked.reduce((a, k) => a + k.weight, 0);
  const ext = new Array<number>(picked.length).fill(0);
  let left = shape.chunkTokens;
  // short requests first, capped so that the whole sequence stays shorter than the window
  const shortCap = Math.max(1, Math.floor(shape.window / 2));
  picked.forEach((k, r) => {
    if (!isShort(r)) return;
    ext[r] = Math.min(left, shortCap, Math.max(1, Math.round((shape.chunkTokens * k.weight) / total)));
    left -= ext[r]!;
  });
  // the rest by weight; the last of them takes what rounding left over
  const others = picked.map((_, r) => r).filter((r) => !isShort(r));
  const otherWeight = others.reduce((a, r) => a + picked[r]!.weight, 0);
  const pool = left;
  others.forEach((r, i) => {
    ext[r] = i === others.length - 1 ? left : Math.min(left, Math.max(1, Math.round((pool * picked[r]!.weight) / otherWeight)));
    left -= ext[r]!;
  });
  if (others.length === 0 && left > 0) ext[ext.length - 1]! += left;
  const out: RequestInfo[] = [];
  picked.forEach((k, r) => {
    const extendLen = ext[r]!;
    let context: number;
    if (k.kind === 'fresh prompt') context = 0;
    else if (k.kind === 'mid-sequence, long') context = shape.maxContext;
    else if (k.kind === 'mid-sequence') context = Math.floor(shape.maxContext / 4) + rng.int(Math.floor(shape.maxContext / 4) + 1);
    else context = rng.int(Math.max(1, shape.window - extendLen));
    out.push({ kind: k.kind, seqLen: context + extendLen, extendLen });
  });
  return out;
}

function shuffled(rng: Rng, n: number): Int32Array {
  const a = new Int32Array(n);
  for (let i = 0; i < n; i++) a[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = a[i]!;
    a[i] = a[j]!;
    a[j] = t;
  }
  return a;
}

/** Entries of request-local compressed position j through a page table. */
function compressedId(table: ArrayLike<number>, pageSize: number, j: number): number {
  return table[Math.floor(j / pageSize)]! * pageSize + (j % pageSize);
}

interface Geometry {
  chunk: PlanChunk;
  ref: PlanReferenceChunk;
  swaPages: number;
  c4Pages: number;
  c128Pages: number;
  /** token ids every layer's caches must hold: SWA slots, c4 entries, c128 entries */
  swaIds: Int32Array;
  c4Ids: Int32Array;
  c128Ids: Int32Array;
}

/** Where each request's tokens live: shuffled SWA slots and shuffled compressed pages (shared by all layers, as in a serving engine). */
function chunkGeometry(shape: LayerChunkShape, reqs: RequestInfo[], rng: Rng): Geometry {
  const W = shape.window;
  const gathers = reqs.map((r) => (r.extendLen > 0 ? Math.min(r.seqLen, r.extendLen + W - 1) : 0));
  const swaTokens = gathers.reduce((a, b) => a + b, 0);
  const swaPages = Math.max(1, Math.ceil((swaTokens * 5) / 4 / shape.pageSize));
  const swaSlots = shuffled(rng, swaPages * shape.pageSize);
  const pagesOf = (ratio: 4 | 128, pc: number): number[] => reqs.map((r) => Math.ceil(Math.floor(r.seqLen / ratio) / pc));
  const c4Need = pagesOf(4, shape.c4PageSize);
  const c128Need = pagesOf(128, shape.c128PageSize);
  const c4Pages = Math.max(1, c4Need.reduce((a, b) => a + b, 0) + 2);
  const c128Pages = Math.max(1, c128Need.reduce((a, b) => a + b, 0) + 2);
  const c4Free = Array.from(shuffled(rng, c4Pages));
  const c128Free = Array.from(shuffled(rng, c128Pages));
  const chunk: PlanChunk = { requests: [], c4PageSize: shape.c4PageSize, c128PageSize: shape.c128PageSize };
  const ref: PlanReferenceChunk = { requests: [], c4PageSize: shape.c4PageSize, c128PageSize: shape.c128PageSize, window: W };
  const swaIds: number[] = [], c4Ids: number[] = [], c128Ids: number[] = [];
  let slot = 0;
  reqs.forEach((r, i) => {
    const g = gathers[i]!;
    const byPosition = new Int32Array(r.seqLen); // positions outside the gather are never reached
    for (let p = r.seqLen - g; p < r.seqLen; p++) byPosition[p] = swaSlots[slot++]!;
    const swaTokenIds = byPosition.slice(r.seqLen - g);
    swaIds.push(...swaTokenIds);
    const c4PageTable = c4Free.splice(0, c4Need[i]!);
    const c128PageTable = c128Free.splice(0, c128Need[i]!);
    for (let j = 0; j < Math.floor(r.seqLen / 4); j++) c4Ids.push(compressedId(c4PageTable, shape.c4PageSize, j));
    for (let j = 0; j < Math.floor(r.seqLen / 128); j++) c128Ids.push(compressedId(c128PageTable, shape.c128PageSize, j));
    (chunk.requests as object[]).push({ seqLen: r.seqLen, extendLen: r.extendLen, swaTokenIds, c4PageTable, c128PageTable });
    (ref.requests as PlanReferenceChunk["requests"][number][]).push({ seqLen: r.seqLen, extendLen: r.extendLen, swaTokenIdByPosition: byPosition, c4PageTable, c128PageTable });
  });
  return { chunk, ref, swaPages, c4Pages, c128Pages, swaIds: Int32Array.from(swaIds), c4Ids: Int32Array.from(c4Ids), c128Ids: Int32Array.from(c128Ids) };
}

/** A v4 cache with random rows quantized (by the engine) at `ids`; other slots stay zero and are never read. */
async function randomCache(engine: Engine, rng: Rng, pageSize: number, numPages: number, ids: Int32Array): Promise<KvCache> {
  const cache = createKvCache('v4', { pageSize, numPages });
  if (ids.length === 0) return cache;
  const rows = new Uint16Array(ids.length * V4_ROW);
  fillV4Rows(rows, rng);
  await engine.quantizeKCache({ cache, tokenIds: tensor('int32', [ids.length], ids), rows: tensor('bf16', [ids.length, V4_ROW], rows) });
  return cache;
}

interface LayerInputs {
  ratio: CompressRatio;
  caches: { swa: KvCache; c4?: KvCache; c128?: KvCache };
  q: Tensor<'bf16'>;
  attnSink: Tensor<'float32'>;
  topk?: TopK;
}

interface TopK {
  indices: Tensor<'int32'>;
  /** not-yet-visible entries planted (the planner must drop exactly these) */
  planted: number;
  /** visible (attended) compressed entries over all queries */
  visibleEntries: number;
}

/**
 * An indexer's output for one c4 layer: per query up to topk distinct visible entries in random
 * order, −1 padding (where fewer are visible, and a few scattered holes), and in about one query
 * of 8 one to three entries that are not yet visible — a caller's causality error.
 */
function randomTopk(rng: Rng, reqs: RequestInfo[], numQueries: number, topk: number): TopK {
  const data = new Int32Array(numQueries * topk).fill(-1);
  let planted = 0, visibleEntries = 0, q = 0;
  let stamp = new Int32Array(0);
  for (const r of reqs) {
    const visibleAtEnd = Math.floor(r.seqLen / 4);
    if (stamp.length < visibleAtEnd) stamp = new Int32Array(visibleAtEnd);
    stamp.fill(0);
    for (let i = 0; i < r.extendLen; i++, q++) {
      const pos = r.seqLen - r.extendLen + i;
      const visible = Math.floor((pos + 1) / 4);
      const row = q * topk;
      const want = Math.min(topk, visible);
      let n = 0;
      if (want * 2 >= visible) {
        const all = shuffled(rng, visible);
        for (; n < want; n++) data[row + n] = all[n]!;
      } else {
        while (n < want) {
          const j = rng.int(visible);
          if (stamp[j] === q + 1) continue;
          stamp[j] = q + 1;
          data[row + n++] = j;
        }
      }
      // holes: the indexer pads with −1 anywhere, not only at the end
      for (let k = 0; k < Math.floor(topk / 32); k++) data[row + rng.int(topk)] = -1;
      if (rng.int(8) === 0) {
        const bad = 1 + rng.int(3);
        for (let k = 0; k < bad; k++) data[row + rng.int(topk)] = visible + rng.int(64); // j ≥ visible: not yet visible
      }
      // shuffle the row so padding, picks and bad entries are interleaved
      for (let k = topk - 1; k > 0; k--) {
        const j = rng.int(k + 1);
        const t = data[row + k]!;
        data[row + k] = data[row + j]!;
        data[row + j] = t;
      }
      for (let k = 0; k < topk; k++) {
        const j = data[row + k]!;
        if (j >= visible) planted++;
        else if (j >= 0) visibleEntries++;
      }
    }
  }
  return { indices: tensor('int32', [numQueries, topk], data), planted, visibleEntries };
}

/** Attended entries of a ratio-0 or ratio-128 layer, counted from §6 (window + every visible entry). */
function denseEntries(reqs: RequestInfo[], ratio: 0 | 128, window: number): number {
  let n = 0;
  for (const r of reqs) {
    for (let pos = r.seqLen - r.extendLen; pos < r.seqLen; pos++) n += Math.min(pos + 1, window) + (ratio === 128 ? Math.floor((pos + 1) / 128) : 0);
  }
  return n;
}

/** Window entries only, over every query. */
function windowEntries(reqs: RequestInfo[], window: number): number {
  return denseEntries(reqs, 0, window);
}

/** The first and last query of every request, then random ones, sorted. */
export function sampleLayerQueries(reqs: RequestInfo[], count: number, rng: Rng): number[] {
  const total = reqs.reduce((a, r) => a + r.extendLen, 0);
  if (count >= total) return Array.from({ length: total }, (_, i) => i);
  const chosen = new Set<number>();
  let off = 0;
  for (const r of reqs) {
    if (r.extendLen > 0 && chosen.size < count) chosen.add(off);
    if (r.extendLen > 1 && chosen.size < count) chosen.add(off + r.extendLen - 1);
    off += r.extendLen;
  }
  while (chosen.size < count) chosen.add(rng.int(total));
  return [...chosen].sort((a, b) => a - b);
}

function timedAsync<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  return fn().then((v) => [v, (performance.now() - t0) / 1000]);
}

/** Run the model chunk: plan once, every layer through prefillLayer, checks against the reference. */
export async function runLayerChunk(engine: Engine, shape: LayerChunkShape, progress: Progress): Promise<LayerReport> {
  const rng = new Rng((shape.seed ^ 0x2545f491) >>> 0);
  const reqs = chunkRequests(shape, rng);
  const numQueries = reqs.reduce((a, r) => a + r.extendLen, 0);
  const qElements = numQueries * shape.heads * DQK;
  if (qElements > 2 ** 31 - 1) {
    throw new SparseMlaError('TOO_LARGE', `chunk tokens × heads × ${DQK} = ${qElements} elements is more than one q tensor can hold; use fewer --chunk-tokens or --heads`, 'chunk-tokens');
  }
  const geo = chunkGeometry(shape, reqs, rng);

  // One plan for the chunk, before any layer (its workspace size is known here, before allocation).
  const [plan, planSeconds] = await timedAsync(async () => createPlan(geo.chunk, { window: shape.window }));
  const route = routePrefill(numQueries, { path: shape.path, backend: engine.backend, ...(shape.threshold !== undefined ? { threshold: shape.threshold } : {}) });

  // Every layer's own caches, queries, sink and (c4) indexer output, made just before the layer
  // runs (one layer's q at a time in memory); untimed.
  const makeLayerInputs = async (ratio: CompressRatio): Promise<LayerInputs> => {
    const swa = await randomCache(engine, rng, shape.pageSize, geo.swaPages, geo.swaIds);
    const caches: LayerInputs['caches'] = { swa };
    if (ratio === 4) caches.c4 = await randomCache(engine, rng, shape.c4PageSize, geo.c4Pages, geo.c4Ids);
    if (ratio === 128) caches.c128 = await randomCache(engine, rng, shape.c128PageSize, geo.c128Pages, geo.c128Ids);
    const q = new Uint16Array(qElements);
    fillBf16(q, rng, 3);
    const sink = new Float32Array(shape.heads);
    for (let h = 0; h < shape.heads; h++) sink[h] = rng.uniform(2, 8);
    return {
      ratio,
      caches,
      q: tensor('bf16', [numQueries, shape.heads, DQK], q),
      attnSink: tensor('float32', [shape.heads], sink),
      ...(ratio === 4 ? { topk: randomTopk(rng, reqs, numQueries, shape.topk) } : {}),
    };
  };

  const smScale = 1 / Math.sqrt(DQK);
  const layers: LayerRow[] = [];
  let referenceSeconds = 0;
  let setupSeconds = 0;
  for (let l = 0; l < shape.layers.length; l++) {
    const ratio = shape.layers[l]!;
    progress.start(`layer ${l} (c${ratio}) inputs`, 0);
    const [li, inputSeconds] = await timedAsync(() => makeLayerInputs(ratio));
    setupSeconds += inputSeconds;
    progress.finish();
    progress.start(`layer ${l} (c${ratio}) prefillLayer`, 0);
    const [res, seconds] = await timedAsync<PrefillLayerResult>(() =>
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
    const entries = ratio === 4 ? windowEntries(reqs, shape.window) + li.topk!.visibleEntries : denseEntries(reqs, ratio, shape.window);
    const gflops = prefillFlops(entries, shape.heads) / seconds / 1e9;
    progress.finish(`${res.path}, ${(seconds * 1e3).toFixed(1)} ms`);

    // the sampled queries against the float64 reference (attention sets derived from §6 alone)
    const sample = sampleLayerQueries(reqs, shape.check, rng);
    progress.start(`layer ${l} (c${ratio}) float64 reference`, 0);
    const [ref, refSeconds] = await timedAsync(async () =>
      prefillLayerReference(
        {
          chunk: geo.ref,
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
    const h = shape.heads;
    const gotOut = new Float32Array(sample.length * h * DV);
    const gotLse = new Float32Array(sample.length * h);
    const gotMax = new Float32Array(sample.length * h);
    sample.forEach((qi, k) => {
      for (let e = 0; e < h * DV; e++) gotOut[k * h * DV + e] = bf16BitsToFloat32(res.out.data[qi * h * DV + e]!);
      gotLse.set(res.lse.data.subarray(qi * h, (qi + 1) * h), k * h);
      gotMax.set(res.maxLogits.data.subarray(qi * h, (qi + 1) * h), k * h);
    });
    const { out, lse, maxLogits } = compareAttention({ out: gotOut, lse: gotLse, maxLogits: gotMax }, ref, { heads: h, dV: DV, queries: sample });
    const expectedDropped = li.topk?.planted ?? 0;
    const droppedPass = res.dropped === expectedDropped;
    const layout = plan.layout(ratio);
    layers.push({
      layer: l,
      ratio,
      path: res.path,
      reason: res.reason,
      workspaceBytes: res.workspaceBytes,
      indexWidth: ratio === 4 ? Math.ceil((shape.topk + shape.window) / 128) * 128 : ratio === 0 ? Math.ceil(shape.window / 128) * 128 : Math.ceil((layout.maxVisible + shape.window) / 128) * 128,
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
    route,
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
