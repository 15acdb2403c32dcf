/**
 * sparse_prefill op: validation and normalization of sparsePrefill (SPEC §4, §9), shared by every
 * backend. Out-of-range attention indices are not errors (they are skipped entries); everything
 * else that does not fit the contract is refused here, before any work.
 */
import { fail } from '../errors.js';
import type { DeviceBuffer, OnDevice, SparsePrefillArgs } from '../types.js';
import type { SparsePrefillJob } from '../backends/backend.js';
import {
  checkArgsObject,
  checkAttnSink,
  checkSmScale,
  checkIndexShape,
  checkInt32Size,
  checkPlacedTensor,
  checkQuery,
  checkRank,
  describe,
  normalizeIndices,
  normalizeTopkLength,
  shapeStr,
} from './common.js';

/** dV when the caller gives none (DeepSeek MLA: V is the first 512 dims of each KV row). */
export const DEFAULT_DV = 512;

/** dV: a positive multiple of 64, at most dQK. */
export function checkDV(value: unknown, dQK: number): number {
  if (value === undefined) {
    if (DEFAULT_DV > dQK) fail('INVALID_VALUE', 'dV', `a value ≤ dQK = ${dQK} (the default is ${DEFAULT_DV}; pass dV explicitly)`, 'undefined');
    return DEFAULT_DV;
  }
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0 || value % 64 !== 0) {
    fail('INVALID_VALUE', 'dV', 'a positive multiple of 64', describe(value));
  }
  if (value > dQK) fail('INVALID_VALUE', 'dV', `≤ dQK = ${dQK} (V is the first dV dims of each kv row)`, String(value));
  return value;
}

/** FLOPs of sparsePrefill over `entries` attended entries (SPEC §4): 2 · entries · hQ · (dQK + dV). */
export function prefillFlops(entries: number, heads: number, dQK = DEFAULT_DV, dV = DEFAULT_DV): number {
  return 2 * entries * heads * (dQK + dV);
}

/** Host tensors give a host job; device tensors (cuda) stay device buffers in the job. */
export function prepareSparsePrefill(args: OnDevice<SparsePrefillArgs>): SparsePrefillJob<DeviceBuffer> {
  checkArgsObject(args, 'sparsePrefill arguments');
  const { q, rows: sQ, hQ, dQK } = checkQuery(args.q, '[sQ, hQ, dQK]');
  if (dQK < 64 || dQK % 64 !== 0) fail('INVALID_SHAPE', 'q', 'dQK = shape[2] a positive multiple of 64 (512 or 576 in DeepSeek models)', `shape ${shapeStr(q.shape)}`);
  const dV = checkDV(args.dV, dQK);

  const kv = checkPlacedTensor(args.kv, 'kv', ['bf16'] as const);
  const [sKV, kvDim] = checkRank(kv, 'kv', 2, '[sKV, dQK]') as [number, number];
  if (kvDim !== dQK) fail('INVALID_SHAPE', 'kv', `shape [sKV, dQK] with dQK = ${dQK} (from q)`, `shape ${shapeStr(kv.shape)}`);

  const indices = checkPlacedTensor(args.indices, 'indices', ['int32', 'int64'] as const);
  const topk = checkIndexShape(indices, 'indices', sQ, 'sQ');

  const smScale = checkSmScale(args.smScale);
  const attnSink = checkAttnSink(args.attnSink, 'attnSink', hQ);
  const topkLength = normalizeTopkLength(args.topkLength, 'topkLength', sQ, 'sQ', topk);

  checkInt32Size(sQ, 'q', 'sQ');
  checkInt32Size(hQ, 'q', 'hQ');
  checkInt32Size(dQK, 'q', 'dQK');
  checkInt32Size(sKV, 'kv', 'sKV');
  checkInt32Size(topk, 'indices', 'topk');

  return {
    q: q.data,
    kv: kv.data,
    indices: normalizeIndices(indices, sKV, 'indices'),
    topkLength,
    attnSink,
    sQ,
    hQ,
    dQK,
    dV,
    sKV,
    topk,
    smScale,
  };
}
