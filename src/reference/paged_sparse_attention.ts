/**
 * Float64 reference of the paged FP8 sparse attention (SPEC §5): every valid entry of the main and
 * the extra set is dequantized with the reference dequant (§3), then one softmax runs over the union
 * exactly as in the sparse prefill reference (§4).
 */
import { SparseMlaError } from '../errors.js';
import type { PagedSparseAttentionArgs } from '../types.js';
import { cacheRowDims, cacheTokenCount, checkCacheReference, DequantizedRows } from './kv_cache.js';
import {
  attendQueryReference,
  checkDv,
  checkQueries,
  checkQueryTensor,
  checkSink,
  checkSmScale,
  emptyAttentionResult,
  indexSet,
  widenBf16,
  type IndexSet,
  checkArgsRecord,
  type ReferenceAttentionResult,
  type ReferenceOptions,
} from './sparse_prefill.js';

export function pagedSparseAttentionReference(args: PagedSparseAttentionArgs, opts: ReferenceOptions = {}): ReferenceAttentionResult {
  checkArgsRecord(args);
  const { q, kCache } = args;
  const [n, hQ, dQK] = checkQueryTensor(q, '[n, hQ, dQK]');
  checkCacheReference(kCache, 'kCache');
  const width = cacheRowDims(kCache.format);
  if (dQK !== width) throw new SparseMlaError('INVALID_SHAPE', `q: expected dQK = ${width} for a ${kCache.format} cache, got ${dQK}`, 'q');
  const dV = checkDv(args.dV, dQK);
  checkSmScale(args.smScale);

  interface Source { set: IndexSet; limitId: number; rows: DequantizedRows }
  const sources: Source[] = [
    {
      set: indexSet(args.indices, args.topkLength, n, { indices: 'indices', topkLength: 'topkLength' }),
      limitId: cacheTokenCount(kCache),
      rows: new DequantizedRows(kCache, width),
    },
  ];
  // null is absent, as the op takes it (src/ops/paged_sparse_attention.ts)
  const extraKCache = args.extraKCache ?? undefined;
  const extraIndices = args.extraIndices ?? undefined;
  if (extraKCache !== undefined || extraIndices !== undefined) {
    if (extraKCache === undefined || extraIndices === undefined) {
      throw new SparseMlaError('INVALID_VALUE', 'extraKCache and extraIndices: expected both or neither', 'extraKCache');
    }
    checkCacheReference(extraKCache, 'extraKCache');
    if (cacheRowDims(extraKCache.format) !== width) {
      throw new SparseMlaError('INVALID_VALUE', `extraKCache.format: expected ${kCache.format}, got ${extraKCache.format}`, 'extraKCache');
    }
    sources.push({
      set: indexSet(extraIndices, args.extraTopkLength, n, { indices: 'extraIndices', topkLength: 'extraTopkLength' }),
      limitId: cacheTokenCount(extraKCache),
      rows: new DequantizedRows(extraKCache, width),
    });
  }
  const sink = checkSink(args.attnSink, hQ);
  const qs = checkQueries(opts.queries, n);
  const qf = widenBf16(q.data);
  const nq = qs.length;
  const res = emptyAttentionResult(nq, hQ, dV);
  const maxEntries = sources.reduce((a, s) => a + s.set.topk, 0);
  const gathered = new Float32Array(Math.max(1, maxEntries) * width);
  const offsets = new Int32Array(Math.max(1, maxEntries));
  const scratch = new Float64Array(Math.max(1, hQ * maxEntries));
  for (let j = 0; j < nq; j++) {
    const i = qs[j]!;
    let cnt = 0;
    for (const src of sources) {
      const lim = src.set.limit(i);
      for (let k = 0; k < lim; k++) {
        const id = src.set.entry(i, k, src.limitId);
        if (id < 0) continue;
        const off = src.rows.offsetOf(id);
        gathered.set(src.rows.rows.subarray(off, off + width), cnt * width);
        offsets[cnt] = cnt * width;
        cnt++;
      }
    }
    attendQueryReference(qf, i * hQ * dQK, hQ, dQK, dV, gathered, offsets, cnt, args.smScale, sink, res.out, res.mag, j * hQ * dV, res.lse, res.maxLogits, j * hQ, scratch);
  }
  return res;
}
