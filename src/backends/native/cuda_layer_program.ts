/**
 * A cuda engine's layer programs (native/addon/layer_program.cpp) as the backend keeps and runs
 * them: a run's arguments in the addon's slot order, the geometry a program was read for and the
 * lookup of a kept one, and a run's outputs. CudaBackend.queueLayer / queuePagedLayer use these.
 */
import { pagedSparseAttentionFields, type QueuedLayerJob } from '../backend.js';
import type { DeviceBuffer } from '../../types.js';
import { SparseMlaError } from '../../errors.js';
import { CACHE_FORMAT_CODE, addonFailure, type NativeLayerProgram } from './binding.js';
import type { CudaDeviceBuffer } from './cuda_device_buffer.js';

/** The paged op's params (pagedSparseAttentionFields) over a device job's arrays. */
export type PagedFields = ReturnType<typeof pagedSparseAttentionFields<Uint16Array | DeviceBuffer, Uint8Array | DeviceBuffer, Int32Array | DeviceBuffer, Int32Array | DeviceBuffer | null, Float32Array | DeviceBuffer | null>>;

/** Where a layer program run's buffers start in its arguments (after droppedInto and smScale: layerRunArgs). */
export const RUN_BUFFERS_AT = 2;

/**
 * A layer program run's arguments: droppedInto (null here, set by queueLayer), smScale, then the
 * job's buffers in the addon's slot order (the order its readers read the ops' params: planRows',
 * each dequant's, the prefill's inputs; an absent sink has no slot); a new program's `slots` must
 * equal layerSlotNames' list for the same job. Every queued layer builds this list: plain pushes
 * and an indexed loop (no closures, no iterators, nothing else read), and run takes it as it is.
 */
export function layerRunArgs(job: QueuedLayerJob<DeviceBuffer>): unknown[] {
  const { planRows: r, dequants, prefill: p } = job;
  const args: unknown[] = [null, p.smScale];
  if (r !== null) {
    const into = r.into;
    args.push(r.topkIndices, into.rows, into.lens, into.droppedTotal);
  }
  for (let i = 0; i < dequants.length; i++) {
    const d = dequants[i]!;
    args.push(d.cache.data, d.tokenIds, d.workspace);
  }
  args.push(p.q, p.workspace, p.indices, p.lengths);
  if (p.attnSink !== null) args.push(p.attnSink);
  return args;
}

/**
 * A layer program's operand freed after the layer's checks (a getter of the caller's arguments, or
 * plan.release(), can free one while the call reads them): INVALID_VALUE naming the argument the
 * caller gave, as the ops' own check does, not the addon's refusal as a backend failure.
 */
export function freedLayerOperand(slot: string): never {
  const field = slot.slice(slot.lastIndexOf('.') + 1);
  const argument =
    slot === 'prefill.q' || slot === 'paged.q' ? 'q'
    : field === 'attnSink' ? 'attnSink'
    : slot === 'planRows.topkIndices' ? 'topkIndices'
    : field === 'cache' || field === 'kCache' || field === 'extraKCache' ? 'caches'
    : 'plan';
  const what = argument === 'plan' ? `a buffer the plan keeps (${slot})` : 'a device buffer';
  throw new SparseMlaError('INVALID_VALUE', `${argument}: expected ${what} live until the layer is queued, got one freed during the call`, argument);
}

/** The name of each buffer slot of layerRunArgs, in its order (a new program's check). */
export function layerSlotNames(job: QueuedLayerJob<DeviceBuffer>): string[] {
  const names: string[] = [];
  if (job.planRows !== null) names.push('planRows.topkIndices', 'planRows.rows', 'planRows.lens', 'planRows.droppedTotal');
  for (let i = 0; i < job.dequants.length; i++) names.push(`dequants.${i}.cache`, `dequants.${i}.tokenIds`, `dequants.${i}.out`);
  names.push('prefill.q', 'prefill.kv', 'prefill.indices', 'prefill.topkLength');
  if (job.prefill.attnSink !== null) names.push('prefill.attnSink');
  return names;
}

/**
 * The paged op's array fields a paged layer program's run binds, in the addon's slot order (the
 * order it reads the params: q, kCache, indices, topkLength, then the extra set's, then attnSink;
 * an absent array has no slot). A run's buffers and a new program's slot names both come from it.
 */
export function pagedSlotFields(f: PagedFields): (keyof PagedFields)[] {
  const keys: (keyof PagedFields)[] = ['q', 'kCache', 'indices'];
  if (f.topkLength !== null) keys.push('topkLength');
  if (f.extraKCache !== null) {
    keys.push('extraKCache', 'extraIndices');
    if (f.extraTopkLength !== null) keys.push('extraTopkLength');
  }
  if (f.attnSink !== null) keys.push('attnSink');
  return keys;
}

/**
 * What a paged layer program read besides its buffers, as numbers (every buffer size follows from
 * these; the addon checks them per run): its shape, each set's geometry and which optional arrays
 * it has.
 */
export function pagedGeometry(f: PagedFields): number[] {
  return [f.n, f.hQ, f.pageSize, f.numPages, f.topk, f.topkLength === null ? 0 : 1, f.extraKCache === null ? 0 : 1, f.extraPageSize, f.extraNumPages, f.extraTopk, f.extraTopkLength === null ? 0 : 1, f.attnSink === null ? 0 : 1];
}

/** The kept paged program read for this geometry (pagedGeometry), if any. */
export function keptPagedProgram(kept: readonly KeptLayerProgram[], g: readonly number[]): NativeLayerProgram | undefined {
  for (let k = 0; k < kept.length; k++) {
    const h = kept[k]!.geometry;
    let i = 0;
    while (i < g.length && h[i] === g[i]) i++;
    if (i === g.length) return kept[k]!.program;
  }
  return undefined;
}

/**
 * What a layer program read besides its buffers, as numbers: the combine's geometry (−1 without
 * one), each dequant's, the prefill's shape and whether it has a sink. The owner (a plan) fixes the
 * requests and window; every buffer size follows from these (the addon checks them per run). The
 * list's length gives the number of dequants, so two layers read the same program iff their lists
 * are equal. Built once per program; a layer looks its program up with sameGeometry.
 */
export function layerGeometry(job: QueuedLayerJob<DeviceBuffer>): number[] {
  const { planRows: r, dequants, prefill: p } = job;
  const g = r === null ? [-1, 0, 0] : [r.ratio, r.topk, r.width];
  for (let i = 0; i < dequants.length; i++) {
    const d = dequants[i]!;
    g.push(CACHE_FORMAT_CODE[d.cache.format], d.cache.pageSize, d.cache.numPages, d.n, d.rowOffset);
  }
  g.push(p.numQueries, p.hQ, p.rows, p.width, (p.workspace as DeviceBuffer).byteLength, p.attnSink === null ? 0 : 1);
  return g;
}

/** A layer program kept for an owner, with the geometry (layerGeometry) it was read for. */
export interface KeptLayerProgram {
  readonly geometry: readonly number[];
  readonly program: NativeLayerProgram;
}

/**
 * Whether `g` is the job's layerGeometry, read straight from the job (every queued layer asks, and
 * most find their program: no list built for it). makeLayerProgram holds the two to one order.
 */
export function sameGeometry(g: readonly number[], job: QueuedLayerJob<DeviceBuffer>): boolean {
  const { planRows: r, dequants, prefill: p } = job;
  if (g.length !== 9 + 5 * dequants.length) return false;
  if (r === null ? g[0] !== -1 || g[1] !== 0 || g[2] !== 0 : g[0] !== r.ratio || g[1] !== r.topk || g[2] !== r.width) return false;
  let i = 3;
  for (let k = 0; k < dequants.length; k++, i += 5) {
    const d = dequants[k]!;
    const c = d.cache;
    if (g[i] !== CACHE_FORMAT_CODE[c.format] || g[i + 1] !== c.pageSize || g[i + 2] !== c.numPages || g[i + 3] !== d.n || g[i + 4] !== d.rowOffset) return false;
  }
  return g[i] === p.numQueries && g[i + 1] === p.hQ && g[i + 2] === p.rows && g[i + 3] === p.width && g[i + 4] === (p.workspace as DeviceBuffer).byteLength && g[i + 5] === (p.attnSink === null ? 0 : 1);
}

/** A layer run's outputs as adopted (CudaBackend.adoptRunOutputs): all set once the run's done has resolved. */
export interface RunOutputs {
  out: CudaDeviceBuffer | null;
  maxLogits: CudaDeviceBuffer | null;
  lse: CudaDeviceBuffer | null;
}

/** Frees a failed run's outputs. */
export function freeRunOutputs(o: RunOutputs): void {
  o.out?.free();
  o.maxLogits?.free();
  o.lse?.free();
}

/** A queued layer's run that failed after it was queued: its outputs freed, the failure typed (addonFailure). */
export function failedRun(outputs: RunOutputs, e: unknown): Error {
  freeRunOutputs(outputs);
  return addonFailure('cuda', 'queueLayer', e);
}
