/**
 * Brute-force float64 reference of a prefill layer through the planner (SPEC §6 + §4/§5): each
 * query's attention set is derived straight from §6's rules — its window positions, its visible
 * compressed entries (all of them for r = 128, the indexer's visible ones for r = 4) — and mapped to
 * cache token ids through a position-indexed SWA table and the page tables. Nothing here reads the
 * planner's rows, layouts or offsets. Keys/values are the caches' dequantized values (the reference
 * dequant, §3), which each query attends with the sparse prefill reference's float64 softmax and
 * sink (attendQueryReference, §4).
 */
import { SparseMlaError } from '../errors.js';
import type { KvCache, Tensor } from '../types.js';
import { DequantizedRows } from './kv_cache.js';
import { attendQueryReference, emptyAttentionResult, type ReferenceAttentionResult } from './sparse_prefill.js';

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

function bad(arg: string, msg: string): never {
  throw new SparseMlaError('INVALID_VALUE', `${arg}: ${msg}`, arg);
}

/** Which request, and which of its queries, flat query q is. */
function locate(chunk: PlanReferenceChunk, q: number): { r: number; i: number } {
  let left = q;
  for (let r = 0; r < chunk.requests.length; r++) {
    const e = chunk.requests[r]!.extendLen;
    if (left < e) return { r, i: left };
    left -= e;
  }
  return bad('query', `${q} is beyond the chunk's queries`);
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
  const W = chunk.window ?? 128;
  const { r, i } = locate(chunk, q);
  const req = chunk.requests[r]!;
  const pos = req.seqLen - req.extendLen + i;
  const window: number[] = [];
  for (let p = Math.max(0, pos - W + 1); p <= pos; p++) window.push(req.swaTokenIdByPosition[p]!);
  const compressed: number[] = [];
  let dropped = 0;
  if (ratio !== 0) {
    const table = ratio === 4 ? req.c4PageTable : req.c128PageTable;
    const pc = ratio === 4 ? chunk.c4PageSize : chunk.c128PageSize;
    if (!table || !pc) bad(`c${ratio}`, 'page table and page size are needed');
    const idOf = (j: number): number => table[Math.floor(j / pc)]! * pc + (j % pc);
    const visible = Math.floor((pos + 1) / ratio);
    if (ratio === 128) {
      for (let j = 0; j < visible; j++) compressed.push(idOf(j));
    } else {
      if (!topkRow) bad('topkIndices', 'needed for ratio 4');
      for (let k = 0; k < topkRow.length; k++) {
        const j = topkRow[k]!;
        if (j < 0) continue;
        if (j >= visible) dropped++;
        else compressed.push(idOf(j));
      }
    }
  }
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
  const { chunk, compressRatio: ratio, q, caches, smScale } = args;
  const total = chunk.requests.reduce((a, r) => a + r.extendLen, 0);
  if (q.shape.length !== 3 || q.shape[0] !== total || q.shape[2] !== D) bad('q', `expected [${total}, hQ, ${D}], got [${q.shape.join(', ')}]`);
  const hQ = q.shape[1]!;
  const queries = opts.queries ?? Array.from({ length: total }, (_, i) => i);
  const topk = args.topkIndices ? args.topkIndices.shape[args.topkIndices.shape.length - 1]! : 0;
  const compCache = ratio === 4 ? caches.c4 : ratio === 128 ? caches.c128 : undefined;

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
    ids.forEach((id, k) => {
      if (!(id >= 0 && id < cache.pageSize * cache.numPages)) bad(which, `token id ${id} outside the cache`);
      const off = rows.offsetOf(id);
      gathered.set(rows.rows.subarray(off, off + D), (at + k) * D);
    });
  };

  const nq = queries.length;
  const res = emptyAttentionResult(nq, hQ, D);
  let dropped = 0;
  // q widened one query at a time (a layer's q may be large; a check samples a few queries)
  const qRow = new Float32Array(hQ * D);
  const qRowBits = new Uint32Array(qRow.buffer);
  let offsets = new Int32Array(0);
  let scratch = new Float64Array(0);
  // lse' = ln(exp(lse) + exp(sink)) as the ops' reference takes it (§4, §9: by the math): a sink of
  // +inf gives the weights exp(P − ∞) = 0, out = 0, where the logits are finite; a +inf or NaN logit
  // gives NaN there (∞ − ∞)
  const sink = args.attnSink ? args.attnSink.data : null;
  for (let n = 0; n < nq; n++) {
    const qi = queries[n]!;
    const set = attentionSetReference(chunk, ratio, qi, args.topkIndices?.data.subarray(qi * topk, (qi + 1) * topk));
    dropped += set.dropped;
    const entries = set.compressed.length + set.window.length;
    if (offsets.length < entries) {
      gathered = new Float32Array(entries * D);
      offsets = Int32Array.from({ length: entries }, (_, k) => k * D);
      scratch = new Float64Array(hQ * entries);
    }
    if (set.compressed.length > 0) gather(compCache!, `c${ratio}`, set.compressed, 0);
    gather(caches.swa, 'swa', set.window, set.compressed.length);
    for (let e = 0; e < hQ * D; e++) qRowBits[e] = q.data[qi * hQ * D + e]! << 16;
    attendQueryReference(qRow, 0, hQ, D, D, gathered, offsets, entries, smScale, sink, res.out, res.mag, n * hQ * D, res.lse, res.maxLogits, n * hQ, scratch);
  }
  return { ...res, dropped };
}
