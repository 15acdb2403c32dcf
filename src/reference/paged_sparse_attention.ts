/**
 * Float64 reference of the paged FP8 sparse attention (SPEC §5): every valid entry of the main and
 * the extra set is dequantized with the reference dequant (§3), then one softmax runs over the union
 * exactly as in the sparse prefill reference (§4).
 */
import type { PagedSparseAttentionArgs } from '../types.js';
import { allocFloat64, allocScratch, ArgumentReader, readFinite, readInteger, readRecord, refuse } from './checks.js';
import { cacheRowDims, cacheTokenCount, DequantizedRows, readCache } from './kv_cache.js';
import {
  attendQueryChecked,
  checkQueries,
  emptyAttentionResult,
  readIndexSet,
  readOptions,
  readQuery,
  readSink,
  type IndexSet,
  type ReferenceAttentionResult,
  type ReferenceOptions,
  widenChecked,
} from './sparse_prefill.js';

export function pagedSparseAttentionReference(args: PagedSparseAttentionArgs, opts: ReferenceOptions = {}): ReferenceAttentionResult {
  const a = readRecord(args, 'args');
  const rawQ: unknown = a.q, rawCache: unknown = a.kCache, rawIndices: unknown = a.indices, rawTopkLength: unknown = a.topkLength;
  const rawDv: unknown = a.dV, rawScale: unknown = a.smScale, rawSink: unknown = a.attnSink;
  // null is absent, as the op takes it (src/ops/paged_sparse_attention.ts)
  const rawExtraCache: unknown = a.extraKCache ?? undefined, rawExtraIndices: unknown = a.extraIndices ?? undefined, rawExtraTopkLength: unknown = a.extraTopkLength;
  const { queries } = readOptions(opts);
  const reader = new ArgumentReader();
  const q = readQuery(rawQ, '[n, hQ, dQK]', reader);
  const [n, hQ, dQK] = q.shape as [number, number, number];
  const kCache = readCache(rawCache, 'kCache', reader);
  const width = cacheRowDims(kCache.format);
  if (dQK !== width) refuse('INVALID_SHAPE', 'q', `dQK = ${width} for a ${kCache.format} cache`, String(dQK));
  const dV = readInteger(rawDv ?? 512, 'dV', 1, dQK);
  const smScale = readFinite(rawScale, 'smScale');

  interface Source { set: IndexSet; limitId: number; rows: DequantizedRows }
  const sources: Source[] = [
    {
      set: readIndexSet(rawIndices, rawTopkLength, n, { indices: 'indices', topkLength: 'topkLength' }, reader),
      limitId: cacheTokenCount(kCache),
      rows: new DequantizedRows(kCache, width),
    },
  ];
  if (rawExtraCache !== undefined || rawExtraIndices !== undefined) {
    if (rawExtraCache === undefined || rawExtraIndices === undefined) refuse('INVALID_VALUE', 'extraKCache', 'extraKCache and extraIndices both or neither', rawExtraCache === undefined ? 'extraIndices alone' : 'extraKCache alone');
    const extraKCache = readCache(rawExtraCache, 'extraKCache', reader);
    if (cacheRowDims(extraKCache.format) !== width) refuse('INVALID_VALUE', 'extraKCache.format', kCache.format, extraKCache.format);
    sources.push({
      set: readIndexSet(rawExtraIndices, rawExtraTopkLength, n, { indices: 'extraIndices', topkLength: 'extraTopkLength' }, reader),
      limitId: cacheTokenCount(extraKCache),
      rows: new DequantizedRows(extraKCache, width),
    });
  }
  const sink = readSink(rawSink, hQ, 'attnSink', reader);
  const qs = checkQueries(queries as readonly number[] | undefined, n);
  reader.whole();
  const qf = widenChecked(q.data);
  const nq = qs.length;
  const res = emptyAttentionResult(nq, hQ, dV);
  const maxEntries = sources.reduce((s, src) => s + src.set.topk, 0);
  // sized by the index sets' widths, which a set without rows does not bound (an untyped RangeError past the typed-array limit)
  const gathered = allocScratch(Float32Array, Math.max(1, maxEntries) * width, 'indices');
  const offsets = allocScratch(Int32Array, Math.max(1, maxEntries), 'indices');
  const scratch = allocFloat64(Math.max(1, hQ * maxEntries), 'indices');
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
    attendQueryChecked(qf, i * hQ * dQK, hQ, dQK, dV, gathered, offsets, cnt, smScale, sink, res.out, res.mag, j * hQ * dV, res.lse, res.maxLogits, j * hQ, scratch);
  }
  return res;
}
