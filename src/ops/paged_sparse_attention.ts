/**
 * paged_sparse_attention op: validation and normalization of pagedSparseAttention (SPEC §5, §9),
 * shared by every backend. q is [n, hQ, 512] over v4 caches; an optional extra set of entries
 * lives in its own cache. Ids outside their cache are skipped entries, not errors.
 */
import { fail } from '../errors.js';
import type { DeviceBuffer, OnDevice, PagedSparseAttentionArgs } from '../types.js';
import type { PagedIndexSet, PagedSparseAttentionJob } from '../backends/backend.js';
import {
  checkArgsObject,
  checkAttnSink,
  checkSmScale,
  checkIndexShape,
  checkInt32Size,
  checkPlacedTensor,
  checkQuery,
  describe,
  normalizeIndices,
  normalizeTopkLength,
  shapeStr,
} from './common.js';
import { checkCache } from './kv_cache.js';

/** The paged path works on the v4 layout: 448 nope + 64 rope dims, V = all 512. */
export const PAGED_D = 512;

function indexSet(cacheValue: unknown, cacheArg: string, indicesValue: unknown, indicesArg: string, lengthValue: unknown, lengthArg: string, n: number): PagedIndexSet<DeviceBuffer> {
  const cache = checkCache(cacheValue, cacheArg, ['v4'], true);
  const indices = checkPlacedTensor(indicesValue, indicesArg, ['int32', 'int64'] as const);
  const topk = checkIndexShape(indices, indicesArg, n, 'n');
  checkInt32Size(topk, indicesArg, 'topk');
  const topkLength = normalizeTopkLength(lengthValue, lengthArg, n, 'n', topk);
  return { cache, indices: normalizeIndices(indices, cache.numTokens, indicesArg), topk, topkLength };
}

export function preparePagedSparseAttention(args: OnDevice<PagedSparseAttentionArgs>): PagedSparseAttentionJob<DeviceBuffer> {
  checkArgsObject(args, 'pagedSparseAttention arguments');
  const { q, rows: n, hQ, dQK } = checkQuery(args.q, `[n, hQ, ${PAGED_D}]`);
  if (dQK !== PAGED_D) fail('INVALID_SHAPE', 'q', `shape [n, hQ, ${PAGED_D}] (the paged path attends v4 rows of ${PAGED_D} dims)`, `shape ${shapeStr(q.shape)}`);
  const dV = args.dV;
  if (dV !== undefined && dV !== PAGED_D) fail('INVALID_VALUE', 'dV', `${PAGED_D} (or omitted) on the paged path`, describe(dV));
  checkInt32Size(n, 'q', 'n');
  checkInt32Size(hQ, 'q', 'hQ');

  const main = indexSet(args.kCache, 'kCache', args.indices, 'indices', args.topkLength, 'topkLength', n);

  // the extra set's arguments read once: whether each is there and what is checked come from one read
  // (the presence checks read them, then indexSet again: a getter asked twice could answer otherwise)
  const extraKCache = args.extraKCache, extraIndices = args.extraIndices, extraTopkLength = args.extraTopkLength;
  const hasExtraCache = extraKCache !== undefined && extraKCache !== null;
  const hasExtraIndices = extraIndices !== undefined && extraIndices !== null;
  if (hasExtraCache !== hasExtraIndices) {
    if (hasExtraCache) fail('INVALID_VALUE', 'extraIndices', 'an int32 [n, topkExtra] tensor when extraKCache is given', describe(extraIndices));
    fail('INVALID_VALUE', 'extraKCache', 'a v4 KvCache when extraIndices is given', describe(extraKCache));
  }
  if (!hasExtraIndices && extraTopkLength !== undefined && extraTopkLength !== null) {
    fail('INVALID_VALUE', 'extraTopkLength', 'omitted when there is no extraIndices', describe(extraTopkLength));
  }
  const extra = hasExtraIndices ? indexSet(extraKCache, 'extraKCache', extraIndices, 'extraIndices', extraTopkLength, 'extraTopkLength', n) : null;

  const smScale = checkSmScale(args.smScale);
  const attnSink = checkAttnSink(args.attnSink, 'attnSink', hQ);
  return { q: q.data, n, hQ, main, extra, attnSink, smScale };
}
