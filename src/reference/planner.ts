/**
 * Brute-force float64 reference of a prefill layer through the planner (SPEC §6 + §4/§5): each
 * query's attention set is derived straight from §6's rules — its window positions, its visible
 * compressed entries (all of them for r = 128, the indexer's visible ones for r = 4) — and mapped to
 * cache token ids through a position-indexed SWA table and the page tables. Nothing here reads the
 * planner's rows, layouts or offsets. Keys/values are the caches' dequantized values (the reference
 * dequant, §3), which each query attends with the sparse prefill reference's float64 softmax and
 * sink (attendQueryReference, §4).
 */
import type { KvCache, Tensor } from '../types.js';
import { ArgumentReader, readFinite, readInteger, readList, readRecord, refuse, describeValue, shapeText } from './checks.js';
import { DequantizedRows, readCache } from './kv_cache.js';
import { attendQueryChecked, checkQueries, emptyAttentionResult, readOptions, readSink, type ReferenceAttentionResult } from './sparse_prefill.js';

export interface PlanReferenceRequest {
  seqLen: number;
  extendLen: number;
  /** SWA cache token id of every position the window can reach, indexed by position (length ≥ seqLen; entries the window never reaches may be anything). */
  swaTokenIdByPosition: ArrayLike<number>;
  /** page ids of the request's c4 / c128 compressed cache */
  c4PageTable?: ArrayLike<number>;
  c128PageTable?: ArrayLike<number>;
}

export interface PlanReferenceChunk {
  requests: readonly PlanReferenceRequest[];
  c4PageSize?: number;
  c128PageSize?: number;
  /** default 128 */
  window?: number;
}

/** The entries one query attends, as cache token ids. */
export interface AttentionSetReference {
  /** token position of the query */
  pos: number;
  /** SWA token ids of positions max(0, pos − W + 1) … pos */
  window: number[];
  /** compressed-cache token ids (r = 128: every visible entry; r = 4: the indexer's visible entries in its order) */
  compressed: number[];
  /** indexer entries dropped as not yet visible (j ≥ floor((pos + 1) / r)) */
  dropped: number;
}

/** The most requests a chunk may hold here (a Proxy can claim any count; each request is read once). */
const MAX_REQUESTS = 2 ** 20;
/** The most entries one query may attend: its gathered rows (512 float32 each) are one Float32Array of at most 2^32 elements. */
const MAX_SET = 2 ** 23;

type List = { values: ArrayLike<unknown>; length: number };

/** A request's fields as read once. */
interface ReadRequest {
  name: string;
  seqLen: number;
  extendLen: number;
  swa: List;
  c4?: List;
  c128?: List;
}

/** A chunk as read once: every request's fields, the page sizes, the window; `total` queries. */
interface ReadChunk {
  requests: ReadRequest[];
  c4PageSize?: number;
  c128PageSize?: number;
  window: number;
  total: number;
}

function readChunk(chunk: unknown): ReadChunk {
  const c = readRecord(chunk, 'chunk', 'a chunk {requests, c4PageSize?, c128PageSize?, window?}');
  const rawRequests: unknown = c.requests, rawC4: unknown = c.c4PageSize, rawC128: unknown = c.c128PageSize, rawWindow: unknown = c.window;
  const list = readList(rawRequests, 'chunk.requests', 'an array of requests');
  if (list.length > MAX_REQUESTS) refuse('TOO_LARGE', 'chunk.requests', `at most ${MAX_REQUESTS} requests`, String(list.length));
  const requests: ReadRequest[] = [];
  let total = 0;
  for (let r = 0; r < list.length; r++) {
    const name = `chunk.requests[${r}]`;
    const q = readRecord(list.values[r], name, 'a request {seqLen, extendLen, swaTokenIdByPosition, c4PageTable?, c128PageTable?}');
    const rawSeq: unknown = q.seqLen, rawExt: unknown = q.extendLen, rawSwa: unknown = q.swaTokenIdByPosition, rawT4: unknown = q.c4PageTable, rawT128: unknown = q.c128PageTable;
    const seqLen = readInteger(rawSeq, `${name}.seqLen`);
    const extendLen = readInteger(rawExt, `${name}.extendLen`, 0, seqLen);
    const swa = readList(rawSwa, `${name}.swaTokenIdByPosition`, `SWA token ids by position (at least seqLen = ${seqLen})`);
    if (swa.length < seqLen) refuse('INVALID_VALUE', `${name}.swaTokenIdByPosition`, `at least seqLen = ${seqLen} entries`, String(swa.length));
    const table = (raw: unknown, key: string): List | undefined => (raw === undefined || raw === null ? undefined : readList(raw, `${name}.${key}`, 'an array of page ids'));
    requests.push({ name, seqLen, extendLen, swa, c4: table(rawT4, 'c4PageTable'), c128: table(rawT128, 'c128PageTable') });
    total += extendLen;
  }
  if (!Number.isSafeInteger(total)) refuse('TOO_LARGE', 'chunk.requests', 'a query count (the sum of extendLen) that is a safe integer', String(total));
  const pageSize = (raw: unknown, key: string): number | undefined => (raw === undefined || raw === null ? undefined : readInteger(raw, `chunk.${key}`, 1));
  return {
    requests,
    c4PageSize: pageSize(rawC4, 'c4PageSize'),
    c128PageSize: pageSize(rawC128, 'c128PageSize'),
    window: rawWindow === undefined || rawWindow === null ? 128 : readInteger(rawWindow, 'chunk.window', 1),
    total,
  };
}

function readRatio(ratio: unknown, argument: string): 0 | 4 | 128 {
  if (ratio !== 0 && ratio !== 4 && ratio !== 128) refuse('INVALID_VALUE', argument, '0, 4 or 128', describeValue(ratio));
  return ratio;
}

/** Which request, and which of its queries, flat query q is. */
function locate(chunk: ReadChunk, q: number): { r: number; i: number } {
  let left = q;
  for (let r = 0; r < chunk.requests.length; r++) {
    const e = chunk.requests[r]!.extendLen;
    if (left < e) return { r, i: left };
    left -= e;
  }
  return refuse('INVALID_VALUE', 'query', `a query of the chunk's ${chunk.total}`, String(q));
}

/** A token id read from a caller's list: an integer ≥ 0 that is a safe integer. */
function tokenIdAt(list: List, at: number, argument: string): number {
  const v: unknown = at < list.length ? list.values[at] : undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) refuse('INVALID_VALUE', argument, 'token ids (integers ≥ 0) where a query reaches', `${describeValue(v)} at position ${at}`);
  return v;
}

/** The attention set of flat query q of a checked chunk, and its request (see attentionSetReference). */
function attentionSet(chunk: ReadChunk, ratio: 0 | 4 | 128, q: number, topkRow: List | undefined): AttentionSetReference & { request: ReadRequest } {
  const W = chunk.window;
  const { r, i } = locate(chunk, q);
  const req = chunk.requests[r]!;
  const pos = req.seqLen - req.extendLen + i;
  const first = Math.max(0, pos - W + 1);
  const visible = ratio === 0 ? 0 : Math.floor((pos + 1) / ratio);
  const compressedMost = ratio === 128 ? visible : ratio === 4 ? (topkRow?.length ?? 0) : 0;
  if (pos + 1 - first + compressedMost > MAX_SET) refuse('TOO_LARGE', req.name, `a query set of at most ${MAX_SET} entries (its gathered rows are one Float32Array)`, `${pos + 1 - first} window + ${compressedMost} compressed entries at position ${pos}`);
  const window: number[] = [];
  for (let p = first; p <= pos; p++) window.push(tokenIdAt(req.swa, p, `${req.name}.swaTokenIdByPosition`));
  const compressed: number[] = [];
  let dropped = 0;
  if (ratio !== 0) {
    const table = ratio === 4 ? req.c4 : req.c128;
    const pc = ratio === 4 ? chunk.c4PageSize : chunk.c128PageSize;
    if (!table || !pc) refuse('INVALID_VALUE', `c${ratio}`, `chunk.c${ratio}PageSize and ${req.name}.c${ratio}PageTable for ratio ${ratio}`, !pc ? 'no page size' : 'no page table');
    const tableName = `${req.name}.c${ratio}PageTable`;
    const idOf = (j: number): number => {
      const page = Math.floor(j / pc);
      if (page >= table.length) refuse('INVALID_VALUE', tableName, `a page for each visible entry (entry ${j} is on page ${page})`, `${table.length} pages`);
      const id = tokenIdAt(table, page, tableName) * pc + (j % pc);
      if (!Number.isSafeInteger(id)) refuse('OUT_OF_RANGE', tableName, 'pages whose token ids are safe integers', `page ${describeValue(table.values[page])} of size ${pc}`);
      return id;
    };
    if (ratio === 128) {
      for (let j = 0; j < visible; j++) compressed.push(idOf(j));
    } else {
      if (!topkRow) return refuse('INVALID_VALUE', 'topkIndices', 'the indexer entries of each query for ratio 4', 'none');
      for (let k = 0; k < topkRow.length; k++) {
        const j: unknown = topkRow.values[k];
        if (typeof j !== 'number' || !Number.isInteger(j)) refuse('INVALID_VALUE', 'topkIndices', 'integer entries (negative ones are padding)', `${describeValue(j)} at position ${k} of query ${q}`);
        if (j < 0) continue;
        if (j >= visible) dropped++;
        else compressed.push(idOf(j));
      }
    }
  }
  return { pos, window, compressed, dropped, request: req };
}

/**
 * The attention set of flat query q for a layer of compress ratio r, from §6: the window is
 * positions [pos − min(pos + 1, W) + 1, pos]; compressed entry j is visible iff
 * j < floor((pos + 1) / r); its token id is pageTable[floor(j / Pc)] · Pc + j mod Pc.
 * `topkRow` (r = 4) holds request-local entries; negatives are padding.
 */
export function attentionSetReference(
  chunk: PlanReferenceChunk,
  ratio: 0 | 4 | 128,
  q: number,
  topkRow?: ArrayLike<number>,
): AttentionSetReference {
  const c = readChunk(chunk);
  const r = readRatio(ratio, 'ratio');
  const query = readInteger(q, 'query');
  const row = r === 4 && topkRow !== undefined && topkRow !== null ? readList(topkRow, 'topkRow', 'an array of indexer entries') : undefined;
  const { pos, window, compressed, dropped } = attentionSet(c, r, query, row);
  return { pos, window, compressed, dropped };
}

export interface PrefillLayerReferenceArgs {
  chunk: PlanReferenceChunk;
  compressRatio: 0 | 4 | 128;
  /** bf16 [numQueries, hQ, 512] */
  q: Tensor<'bf16'>;
  caches: { swa: KvCache; c4?: KvCache; c128?: KvCache };
  /** r = 4: int32 [numQueries, topk] */
  topkIndices?: Tensor<'int32'>;
  /** float32 [hQ] */
  attnSink?: Tensor<'float32'>;
  smScale: number;
}

/** The op reference's outputs for the queries (dV = 512), and the layer's dropped count. */
export interface PrefillLayerReferenceResult extends ReferenceAttentionResult {
  /** total indexer entries dropped for causality */
  dropped: number;
}

const D = 512;

/** Attention of every query (or `opts.queries`) over its §6 set, in float64. */
export function prefillLayerReference(args: PrefillLayerReferenceArgs, opts: { queries?: readonly number[] } = {}): PrefillLayerReferenceResult {
  const a = readRecord(args, 'args');
  const rawChunk: unknown = a.chunk, rawRatio: unknown = a.compressRatio, rawQ: unknown = a.q, rawCaches: unknown = a.caches;
  const rawTopk: unknown = a.topkIndices, rawSink: unknown = a.attnSink, rawScale: unknown = a.smScale;
  const { queries: rawQueries } = readOptions(opts);
  const chunk = readChunk(rawChunk);
  const ratio = readRatio(rawRatio, 'compressRatio');
  const total = chunk.total;
  const reader = new ArgumentReader();
  const q = reader.tensor(rawQ, 'q', ['bf16'], () => 'Uint16Array', 3, `[${total}, hQ, ${D}]`);
  const hQ = q.shape[1]!;
  if (q.shape[0] !== total || hQ < 1 || q.shape[2] !== D) refuse('INVALID_SHAPE', 'q', `[${total}, hQ ≥ 1, ${D}]`, shapeText(q.shape));
  const c = readRecord(rawCaches, 'caches', 'an object {swa, c4?, c128?} of KV caches');
  const rawSwa: unknown = c.swa, rawComp: unknown = ratio === 4 ? c.c4 : ratio === 128 ? c.c128 : undefined;
  const v4 = (cache: KvCache, name: string): KvCache => {
    if (cache.format !== 'v4') refuse('INVALID_VALUE', `${name}.format`, "'v4' (a layer's rows are 512 wide)", cache.format);
    return cache;
  };
  const swa = v4(readCache(rawSwa, 'caches.swa', reader), 'caches.swa');
  let compCache: KvCache | undefined;
  if (ratio !== 0) {
    const name = `caches.c${ratio}`;
    compCache = v4(readCache(rawComp, name, reader), name);
    const pc = ratio === 4 ? chunk.c4PageSize : chunk.c128PageSize;
    if (pc !== undefined && compCache.pageSize !== pc) refuse('INVALID_VALUE', `${name}.pageSize`, `chunk.c${ratio}PageSize = ${pc}`, String(compCache.pageSize));
  }
  let topk = 0;
  let topkData: Int32Array | undefined;
  if (ratio === 4) {
    if (rawTopk === undefined || rawTopk === null) refuse('INVALID_VALUE', 'topkIndices', 'int32 [numQueries, topk] for ratio 4', describeValue(rawTopk));
    // [numQueries, topk], or [numQueries, 1, topk] as the indexer gives it (the library takes both)
    const t = reader.tensor(rawTopk, 'topkIndices', ['int32'], () => 'Int32Array', [2, 3], `[${total}, topk] or [${total}, 1, topk]`);
    if (t.shape[0] !== total || (t.shape.length === 3 && t.shape[1] !== 1)) refuse('INVALID_SHAPE', 'topkIndices', `[${total}, topk] or [${total}, 1, topk]`, shapeText(t.shape));
    topk = t.shape[t.shape.length - 1]!;
    topkData = t.data;
  }
  const sink = readSink(rawSink, hQ, 'attnSink', reader);
  const smScale = readFinite(rawScale, 'smScale');
  const queries = checkQueries(rawQueries as readonly number[] | undefined, total);
  reader.whole();

  // each token dequantized once per cache; a query's rows gathered compressed entries first, then its window
  const dequantized = new Map<KvCache, DequantizedRows>();
  const rowsOf = (cache: KvCache): DequantizedRows => {
    let rows = dequantized.get(cache);
    if (!rows) dequantized.set(cache, (rows = new DequantizedRows(cache, D)));
    return rows;
  };
  let gathered = new Float32Array(0);
  const gather = (cache: KvCache, which: string, ids: readonly number[], at: number): void => {
    const rows = rowsOf(cache);
    const tokens = cache.pageSize * cache.numPages;
    ids.forEach((id, k) => {
      if (!(id >= 0 && id < tokens)) refuse('OUT_OF_RANGE', which, `token ids in [0, ${tokens}) of its cache`, String(id));
      const off = rows.offsetOf(id);
      gathered.set(rows.rows.subarray(off, off + D), (at + k) * D);
    });
  };

  const nq = queries.length;
  const res = emptyAttentionResult(nq, hQ, D);
  let dropped = 0;
  // q widened one query at a time (a layer's q may be large; a check samples a few queries); no row
  // without a query (q [0, hQ, D] holds no data whatever hQ says)
  const qRow = new Float32Array(nq > 0 ? hQ * D : 0);
  const qRowBits = new Uint32Array(qRow.buffer);
  let offsets = new Int32Array(0);
  let scratch = new Float64Array(0);
  // lse' = ln(exp(lse) + exp(sink)) as the ops' reference takes it (§4, §9: by the math): a sink of
  // +inf gives the weights exp(P − ∞) = 0, out = 0, where the logits are finite; a +inf or NaN logit
  // gives NaN there (∞ − ∞)
  for (let n = 0; n < nq; n++) {
    const qi = queries[n]!;
    const row = topkData ? { values: topkData.subarray(qi * topk, (qi + 1) * topk), length: topk } : undefined;
    const set = attentionSet(chunk, ratio, qi, row);
    dropped += set.dropped;
    const entries = set.compressed.length + set.window.length;
    if (offsets.length < entries) {
      gathered = new Float32Array(entries * D);
      offsets = Int32Array.from({ length: entries }, (_, k) => k * D);
      scratch = new Float64Array(hQ * entries);
    }
    if (set.compressed.length > 0) gather(compCache!, `${set.request.name}.c${ratio}PageTable`, set.compressed, 0);
    gather(swa, `${set.request.name}.swaTokenIdByPosition`, set.window, set.compressed.length);
    for (let e = 0; e < hQ * D; e++) qRowBits[e] = q.data[qi * hQ * D + e]! << 16;
    attendQueryChecked(qRow, 0, hQ, D, D, gathered, offsets, entries, smScale, sink, res.out, res.mag, n * hQ * D, res.lse, res.maxLogits, n * hQ, scratch);
  }
  return { ...res, dropped };
}
