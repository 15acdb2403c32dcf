/**
 * prefillLayer's checks: every argument of a layer call read once and checked against its plan and
 * engine before any work (prepareLayer), with a device layer's fast form (prepareDeviceLayer) and the
 * host memory its ops will take (checkOpsMemory); their result is the LayerCall the paths run
 * (prefill_layer.ts).
 */
import { fail } from '../errors.js';
import { MAX_SM_SCALE, NOT_READ, checkArgsObject, checkInt32Size, checkOutputOption, checkPlacedTensor, checkQuery, checkSmScale, checkTensor, checkViewsIntact, describe, hasTensorFields, type TensorRead } from '../ops/common.js';
import { isDeviceBuffer, tensor } from '../tensor.js';
import { checkCallMemory, copyBytes } from '../backends/memory.js';
import { alignStaging, attentionOutputBytes, copyAtCall, inputBytes, type InputBytes } from '../backends/staging.js';
import { mostPagedCacheBytes, mostPagedParts, pagedSetReads, type HostPagedSet } from '../backends/paged_gather.js';
import { SparseMlaEngine, checkEngine } from '../engine.js';
import type { DeviceBuffer, DeviceTensor, Engine, KvCache, OutputOptions, Placement, Tensor } from '../types.js';
import type { CacheView, HostOpMemory, PagedSetBytes, TaskHeap, WorkerHeap } from '../backends/backend.js';
import { Plan } from './plan.js';
import { WORKSPACE_ROW_DIMS } from './chunk_geometry.js';
import { CheckedCaches, ratioNotServed, type CachesRead, type CheckedTopk, type OwnedBufferCheck } from './plan_checks.js';
import type { PeekedPagedForm } from './layer_resources.js';
import { forcedRoute, routePrefill } from './router.js';
import type { CompressRatio, PlanCaches, RouteDecision, RouteOptions, WorkspaceLayout } from './types.js';

export interface PrefillLayerArgs extends RouteOptions {
  /** bf16 [numQueries, hQ, 512]; a device tensor with a cuda engine */
  q: Tensor<'bf16'> | DeviceTensor<'bf16'>;
  compressRatio: CompressRatio;
  plan: Plan;
  /** v4 caches of this layer: the SWA cache, and the compressed cache of its ratio */
  caches: PlanCaches;
  /** ratio 4: int32 [numQueries, topk] request-local compressed positions, −1 padded (device with a cuda engine) */
  topkIndices?: Tensor<'int32'> | DeviceTensor<'int32'>;
  /** float32 [hQ]; a device tensor with a cuda engine keeps the layer's launches free of host operands */
  attnSink?: Tensor<'float32'> | DeviceTensor<'float32'>;
  smScale: number;
}

/** prefillLayer's options: where the outputs go, and whether the call waits for a c4 layer's dropped count. */
export interface PrefillLayerOptions<P extends Placement = Placement> extends OutputOptions<P> {
  /**
   * 'await' (the default): the call resolves with the layer's dropped count. 'later': a cuda c4
   * layer resolves once it is queued, without waiting for its combine's count to come back (which
   * waits for the work queued before it, the previous layer's prefill): its result's `dropped` is
   * null, plan.stats.c4Dropped counts it once it has landed, and `await plan.settleDropped()`
   * waits for every such count. Other layers, and host engines, know their count at once.
   */
  dropped?: 'await' | 'later';
}

/**
 * A layer call checked against its plan and engine: everything the paths read, before any work.
 * Made by a constructor, as the device checks' records are (plan_checks.ts, V4CacheView): it is made on
 * every layer, mostly before V8 has given the checks feedback, and without feedback V8 builds an
 * object literal property by property in its runtime.
 */
export class LayerCall {
  declare plan: Plan;
  declare ratio: CompressRatio;
  /** the plan's workspace layout of this ratio */
  declare layout: WorkspaceLayout;
  declare q: Tensor<'bf16'> | DeviceTensor<'bf16'>;
  declare hQ: number;
  declare attnSink: Tensor<'float32'> | DeviceTensor<'float32'> | undefined;
  declare smScale: number;
  /** the checked views the layer steps read */
  declare caches: CheckedCaches<DeviceBuffer>;
  /** ratio 4: the indexer's top-k and the width of its rows */
  declare topk: CheckedTopk<DeviceBuffer> | undefined;
  declare output: Placement;
  declare route: RouteDecision;
  /** whether q, the sink (if any), the caches and the top-k (if any) are all in device memory */
  declare device: boolean;
  /** { dropped: 'later' }: a device c4 layer resolves once queued, its dropped count read later */
  declare droppedLater: boolean;
  /** the copies of host operands taken at the call (copyAtCall): give their slab back once the layer has settled */
  declare copies: { release(): void } | undefined;
  /** @internal the paged form its budget check peeked (checkPagedOp), which the layer keeps and runs with rather than building it again */
  declare peeked: PeekedPagedForm | undefined;
  constructor(
    plan: Plan,
    ratio: CompressRatio,
    layout: WorkspaceLayout,
    q: Tensor<'bf16'> | DeviceTensor<'bf16'>,
    hQ: number,
    attnSink: Tensor<'float32'> | DeviceTensor<'float32'> | undefined,
    smScale: number,
    caches: CheckedCaches<DeviceBuffer>,
    topk: CheckedTopk<DeviceBuffer> | undefined,
    output: Placement,
    route: RouteDecision,
    device: boolean,
    droppedLater: boolean,
  ) {
    this.plan = plan;
    this.ratio = ratio;
    this.layout = layout;
    this.q = q;
    this.hQ = hQ;
    this.attnSink = attnSink;
    this.smScale = smScale;
    this.caches = caches;
    this.topk = topk;
    this.output = output;
    this.route = route;
    this.device = device;
    this.droppedLater = droppedLater;
    this.copies = undefined;
    this.peeked = undefined;
  }
}

/**
 * Every check of a layer call, each argument read once, in the order the errors are reported;
 * `read`: what prepareDeviceLayer read before it stopped (LayerRead), not read again. This runs on
 * every layer, mostly before V8 has optimized it (a process's first layers): no spreads or per-call
 * closures here.
 */
function prepareLayer(engine: SparseMlaEngine, args: PrefillLayerArgs, options: unknown, read?: LayerRead): LayerCall {
  checkArgsObject(args, 'args');
  const plan = arg(args, read, 'plan'), ratio = arg(args, read, 'compressRatio');
  if (!Plan.isPlan(plan)) fail('INVALID_VALUE', 'plan', 'a Plan from createPlan()', describe(plan));
  if (ratio !== 0 && ratio !== 4 && ratio !== 128) fail('INVALID_VALUE', 'compressRatio', '0, 4 or 128', describe(ratio));
  if (!plan.ratios.includes(ratio)) ratioNotServed(ratio, 'compressRatio', plan.ratios);
  const output = checkOutputOption(options, read === undefined ? NOT_READ : read.output);
  const droppedLater = checkDroppedOption(options, read === undefined ? NOT_READ : read.dropped);
  const hasDevice = engine.hasDevice;
  if (!hasDevice && output === 'device') noDevice(engine, 'options.output');
  const { q, rows: nq, hQ, dQK } = checkQuery(arg(args, read, 'q'), '[numQueries, hQ, 512]', hasDevice, read?.qFields);
  if (nq !== plan.numQueries || dQK !== WORKSPACE_ROW_DIMS) badQueryShape(plan, q);
  // as the ops refuse it, also where a chunk without queries runs no op
  checkInt32Size(hQ, 'q', 'hQ');
  const smScale = checkSmScale(arg(args, read, 'smScale'));
  const sink = arg(args, read, 'attnSink') ?? undefined; // null: no sink, as the ops take it
  const sinkFields = read?.sinkFields;
  const attnSink = sink === undefined ? undefined : hasDevice ? checkPlacedTensor(sink, 'attnSink', FLOAT32_DTYPE, sinkFields) : checkTensor(sink, 'attnSink', FLOAT32_DTYPE, sinkFields);
  if (attnSink && (attnSink.shape.length !== 1 || attnSink.shape[0] !== hQ)) badSinkShape(hQ, attnSink);
  const topkIndices = arg(args, read, 'topkIndices');
  if (ratio === 4) {
    if (topkIndices === undefined) fail('INVALID_VALUE', 'topkIndices', 'the indexer top-k int32 [numQueries, topk] of a c4 layer', 'undefined');
  } else if (topkIndices !== undefined) {
    noIndexer(ratio, topkIndices);
  }
  const caches = plan.checkCaches(arg(args, read, 'caches') as PlanCaches, ratio, read?.cachesFields);
  if (!hasDevice && (isDeviceBuffer(caches.swa.data) || isDeviceBuffer(caches.compressed?.data))) noDevice(engine, 'caches');
  // an env that is not given (or falsy) leaves the router to read process.env
  const route = read?.route ?? routePrefill(nq, { path: args.path, threshold: args.threshold, env: args.env || undefined, backend: engine.backend, compressRatio: ratio });
  const topk = ratio === 4 ? plan.checkTopk(topkIndices, hasDevice, read?.topkFields) : undefined;
  if (hasDevice) {
    // device operands the engine's own, on its device, before any work (the ops' own check comes at their launch, after the plan's uploads)
    onEngineDevice(engine, q.data, 'q');
    onEngineDevice(engine, attnSink?.data, 'attnSink');
    onEngineDevice(engine, caches.swa.data, 'caches.swa');
    onEngineDevice(engine, caches.compressed?.data, ratio === 4 ? 'caches.c4' : 'caches.c128');
    onEngineDevice(engine, topk?.data, 'topkIndices');
  }
  checkViewsIntact({ q: q.data, attnSink: attnSink?.data, swa: caches.swa.data, compressed: caches.compressed?.data, topk: topk?.data });
  const device = isDeviceBuffer(q.data) && (attnSink === undefined || isDeviceBuffer(attnSink.data)) && isDeviceBuffer(caches.swa.data) && (caches.compressed === undefined || isDeviceBuffer(caches.compressed.data)) && (topk === undefined || isDeviceBuffer(topk.data));
  // the layer's steps read q, the sink and the top-k after its first await: host ones are copied now
  const layerCall = new LayerCall(plan, ratio, plan.layout(ratio), q, hQ, attnSink, smScale, caches, topk, output, route, device, droppedLater);
  copyOperandsAtCall(engine, layerCall);
  return layerCall;
}

/**
 * The call's host q, sink and top-k as they are at the call (README "Memory a call owns"): the
 * caller may rewrite or detach its arrays once the call has returned its promise, while the
 * layer's later steps (the combine, the prefill or paged op after the plan's and the dequant's
 * awaits) still read them. Each is copied now into one slab lent by the engine's staging
 * (copyAtCall), marked as the call's own copy; the ops read that copy in place as shared memory
 * instead of staging it again, and the slab goes back once the layer has settled (runLayer). Data in
 * device memory or in a SharedArrayBuffer is taken as it is. The copies and the host outputs are
 * checked against the engine's memory budget first, and each op the layer will run (checkLayerOps):
 * TOO_LARGE before any work.
 */
function copyOperandsAtCall(engine: SparseMlaEngine, call: LayerCall): void {
  const q = call.q, sink = call.attnSink, topk = call.topk;
  const qData = hostData(q.data), sinkData = hostData(sink?.data), topkData = hostData(topk?.data);
  const bytes = alignStaging(copyBytes(qData)) + alignStaging(copyBytes(sinkData)) + alignStaging(copyBytes(topkData));
  const { staging: arena, budgetBytes: budget } = engine.hostMemory();
  if (budget !== undefined && bytes > 0) {
    const outputs = call.output === 'host' ? attentionOutputBytes(call.plan.numQueries, call.hQ, WORKSPACE_ROW_DIMS) : 0;
    checkCallMemory('prefillLayer', 'q', [{ what: 'copies of q, attnSink and topkIndices at the call', bytes }, { what: 'outputs', bytes: outputs }], budget);
  }
  checkOpsMemory(engine, call);
  if (bytes === 0) return;
  if (arena === undefined || arena.closed) {
    // a disposed engine's layer rejects with DISPOSED when it runs, as any call on it does (a
    // sharded layer refuses it before any shard runs); every backend has a staging, else a private
    // copy each, which the ops stage again
    if (qData) call.q = { ...q, data: qData.slice() } as typeof q;
    if (sink && sinkData) call.attnSink = { ...sink, data: sinkData.slice() } as typeof sink;
    if (topk && topkData) call.topk = { ...topk, data: topkData.slice() };
    return;
  }
  const copies = copyAtCall(arena, [qData, sinkData, topkData] as const);
  const [qCopy, sinkCopy, topkCopy] = copies.views;
  call.copies = copies;
  if (qCopy !== qData) call.q = { ...q, data: qCopy } as typeof q;
  if (sink && sinkCopy !== sinkData) call.attnSink = { ...sink, data: sinkCopy } as typeof sink;
  if (topk && topkCopy !== topkData) call.topk = { ...topk, data: topkCopy! };
}

const NO_BYTES: InputBytes = { unshared: 0, callCopy: 0 };
/** An array of `bytes` the layer's steps make (not shared, not a copy of an operand). */
const madeBytes = (bytes: number): InputBytes => ({ unshared: bytes, callCopy: 0 });
/** A host operand as the ops will see it: copied at the call when it is not shared (copyOperandsAtCall), else read in place. */
function operandBytes(d: Uint16Array | Float32Array | null): InputBytes {
  if (d === null) return NO_BYTES;
  return copyBytes(d) > 0 ? { unshared: 0, callCopy: d.byteLength } : inputBytes(d);
}

/** checkLayerOps against the engine's budget, where it has one (not on a disposed engine: its layer rejects with DISPOSED when it runs). */
function checkOpsMemory(engine: SparseMlaEngine, call: LayerCall): void {
  const { staging: arena, budgetBytes: budget, ops } = engine.hostMemory();
  if (budget !== undefined && ops !== undefined && arena !== undefined && !arena.closed) checkLayerOps(call, ops, budget, engine.hasDevice);
}

/** A layer's cache as its ops count it: a host cache's bytes (copied when not shared), none in device memory. */
function cacheBytes(d: Uint8Array | DeviceBuffer): InputBytes {
  return ArrayBuffer.isView(d) ? inputBytes(d) : NO_BYTES;
}

/**
 * The ops a layer will run fit the engine's host memory budget, and a worker's heap where its ops
 * run in workers of a bounded heap (wasm: HostOpMemory.workerHeap), checked at the call before any
 * work (TOO_LARGE, as each op would be after the plan's work and the combine): each op by the
 * backend's own arithmetic (HostOpMemory, what the op's checks call) over what the layer knows now —
 * the plan's rows, widths and workspace, the ids each dequant widens, its operands as they will be
 * copied, its outputs where they go. On a cuda engine (`onDevice`) the steps keep the plan's rows,
 * ids and workspace in device memory: no host bytes; its host q, sink, caches and outputs count.
 * Exact on every path: see checkPagedOp for the paged op.
 */
function checkLayerOps(call: LayerCall, ops: HostOpMemory, budget: number, onDevice: boolean): void {
  const { plan, ratio, layout, hQ, caches, route, output } = call;
  const nq = plan.numQueries;
  if (nq === 0) return;
  const q = operandBytes(hostData(call.q.data)), sink = operandBytes(hostData(call.attnSink?.data));
  const layerOp = `prefillLayer (a c${ratio} layer, ${route.path} path): its`;
  if (route.path === 'paged') {
    checkPagedOp(call, ops, budget, onDevice, q, sink, `${layerOp} pagedSparseAttention`);
    return;
  }
  const heap = ops.workerHeap;
  // the dequants write the workspace: in host memory through a host output, on a device in place by device ids
  const ids = (n: number) => (onDevice ? null : madeBytes(n * 4));
  const dequantOutput = onDevice ? 'device' : 'host';
  if (layout.compressedRows > 0) {
    const n = layout.compressedRows, op = `${layerOp} dequantizeKCachePaged of caches.c${ratio}`;
    heap?.check(heap.dequantizeKCache('v4', WORKSPACE_ROW_DIMS), 'plan', op);
    checkCallMemory(op, 'plan', ops.dequantizeKCache('v4', n, WORKSPACE_ROW_DIMS, cacheBytes(caches.compressed!.data), ids(n), dequantOutput), budget);
  }
  if (layout.swaRows > 0) {
    const n = layout.swaRows, op = `${layerOp} dequantizeKCachePaged of caches.swa`;
    heap?.check(heap.dequantizeKCache('v4', WORKSPACE_ROW_DIMS), 'plan', op);
    checkCallMemory(op, 'plan', ops.dequantizeKCache('v4', n, WORKSPACE_ROW_DIMS, cacheBytes(caches.swa.data), ids(n), dequantOutput), budget);
  }
  // the workspace is shared memory (read in place) or on the device; the rows and their lengths are the plan's host arrays, or on the device
  const made = (bytes: number) => (onDevice ? NO_BYTES : madeBytes(bytes));
  const width = plan.layerWidths(ratio, call.topk?.topk ?? 0).rows;
  const op = `${layerOp} sparsePrefill`;
  // its kv: the workspace's rows (a worker holds them all)
  if (heap !== undefined) checkPrefillHeap(heap, layout.rows, hQ, width, op);
  checkCallMemory(op, 'q', ops.sparsePrefill([q, NO_BYTES, made(nq * width * 4), made(nq * 4), sink], nq, hQ, WORKSPACE_ROW_DIMS, output), budget);
}

/**
 * The layer's sparsePrefill over the workspace fits a worker's heap (WorkerHeap.sparsePrefill: a
 * task holds the workspace's `rows` whole, and per query row its heads' q, outputs and scratch).
 * Refused naming the larger share of one row's task: `q` (what grows with its heads) or `plan` (what
 * grows with the workspace's rows and the index rows' width), both stated (checkNamingLargerShare).
 */
function checkPrefillHeap(heap: WorkerHeap, rows: number, hQ: number, width: number, op: string): void {
  const D = WORKSPACE_ROW_DIMS;
  const need = heap.sparsePrefill(rows * D * 2, hQ, D, D, width);
  if (heap.fits(need)) return;
  checkNamingLargerShare(heap, need, heap.sparsePrefill(0, 0, D, D, 0), heap.sparsePrefill(0, hQ, D, D, 0), hQ, 'plan', `the plan's workspace of ${rows} rows and index rows ${width} wide`, op);
}

/**
 * heap.check of a task `need` that does not fit a worker's heap, naming the larger share of one row's
 * task: q's (what its `hQ` heads add to the op's constant `base`: `withQ` − `base`) or the rest's
 * (`other`, described by `otherWhat`), both stated. The ops' heap arithmetic is a sum of the two
 * shares and a constant, so each share is read from it with the other's sizes at 0.
 */
function checkNamingLargerShare(heap: WorkerHeap, need: TaskHeap, base: TaskHeap, withQ: TaskHeap, hQ: number, other: string, otherWhat: string, op: string): void {
  const bytes = (t: TaskHeap) => t.fixedBytes + t.bytesPerRow;
  const qShare = bytes(withQ) - bytes(base);
  const otherShare = bytes(need) - bytes(base) - qShare;
  heap.check(need, qShare > otherShare ? 'q' : other, `${op} (q's ${hQ} heads: ${qShare} bytes; ${otherWhat}: ${otherShare} bytes)`);
}

/**
 * The layer's paged op fits the budget and a worker's heap, exactly. An op that reads every set
 * whole (cuda) counts sizes the layer knows. A host backend's op reads each set's cache whole or
 * through a compact cache of the tokens its ids name (choosePagedRead), which only the ids tell:
 * the op within the budget and the heap at the most it can need whatever it reads (mostPagedParts,
 * mostPagedCacheBytes: from sizes) fits; else the ids it will read decide, the plan's paged form
 * peeked (Plan.peekPagedForm: what it keeps read, the rest — a c4 layer's combine — built without
 * keeping or counting it) and each set counted by the op's own choice (pagedSetReads): the one case
 * a check costs work like the op's, which the layer then runs with (call.peeked, kept by the plan
 * as if built by the layer: Plan.layerPagedForm).
 */
function checkPagedOp(call: LayerCall, ops: HostOpMemory, budget: number, onDevice: boolean, q: InputBytes, sink: InputBytes, op: string): void {
  const { plan, ratio, hQ, caches, output, topk } = call;
  const nq = plan.numQueries;
  const widths = plan.layerWidths(ratio, topk?.topk ?? 0);
  // the form's arrays: on the engine's device for a cuda c0 / c128 layer with a device q (placed by the plan), else the plan's host arrays
  const formOnDevice = onDevice && ratio !== 4 && isDeviceBuffer(call.q.data);
  const made = (bytes: number) => (formOnDevice ? NO_BYTES : madeBytes(bytes));
  const fixed = [q, made(nq * 4), sink];
  const mainIds = nq * widths.pagedMain * 4;
  const swa = caches.swa, compressed = caches.compressed;
  const sets = [{ cache: cacheBytes(swa.data), indices: made(mainIds), indicesBytes: mainIds, mostTokens: Math.min(swa.numTokens, nq * widths.pagedMain), wholeBytes: swa.bytes }];
  if (compressed !== undefined && widths.pagedExtra > 0) {
    const extraIds = nq * widths.pagedExtra * 4;
    fixed.push(made(nq * 4));
    sets.push({ cache: cacheBytes(compressed.data), indices: made(extraIds), indicesBytes: extraIds, mostTokens: Math.min(compressed.numTokens, nq * widths.pagedExtra), wholeBytes: compressed.bytes });
  }
  // A c4 layer's device top-k is downloaded for the plan's host combine and dropped once combined,
  // before the op copies the form (c4PagedForm): never beside the op's parts, and less than them (the
  // form's extra set alone is as wide as the top-k), so the op's parts are the layer's need.
  const parts = (s: readonly PagedSetBytes[]) => ops.pagedSparseAttention(fixed, s, nq, hQ, output);
  const copies = ops.pagedCopies;
  if (copies === null) {
    checkCallMemory(op, 'q', parts(sets.map((s) => ({ whole: true, cache: s.cache, indices: s.indices }))), budget);
    return;
  }
  // a worker's heap holds the caches as the op reads them (whole or compact), and every set's ids per row
  const heap = ops.workerHeap;
  const heapNeed = (cacheBytesRead: readonly number[], entries: number) => heap!.pagedSparseAttention(cacheBytesRead.reduce((a, b) => a + b, 0), entries, hQ);
  const mostFits = heap === undefined || heap.fits(heapNeed(sets.map((s) => mostPagedCacheBytes(s.wholeBytes, s.mostTokens)), widths.pagedMain + (sets.length > 1 ? widths.pagedExtra : 0)));
  if (mostFits && mostPagedParts(parts, sets).reduce((a, p) => a + p.bytes, 0) <= budget) return;
  const form = plan.peekPagedForm(ratio, topk);
  const read: HostPagedSet[] = [{ cache: swa as CacheView, indices: form.main, topk: form.mainWidth, topkLength: form.mainLengths }];
  if (compressed !== undefined && form.extra !== undefined) read.push({ cache: compressed as CacheView, indices: form.extra, topk: form.extraWidth, topkLength: form.extraLengths! });
  const reads = pagedSetReads(read, nq, copies);
  if (heap !== undefined) checkPagedHeap(heap, reads.map((r) => r.cacheBytes), read.reduce((a, s) => a + s.topk, 0), hQ, ratio, op);
  checkCallMemory(op, 'q', parts(reads.map((r) => r.bytes)), budget);
  call.peeked = form;
}

/**
 * The layer's paged op fits a worker's heap (WorkerHeap.pagedSparseAttention: a task holds the
 * caches as the op reads them, whole or compact, and per query row its heads' q, outputs and
 * scratch and every set's ids). Refused naming the larger share of one row's task: `q` (what grows
 * with its heads) or the caches (the caches as read and their ids), then the set whose cache is the
 * larger as the op names it (`caches.swa`, or `caches.c4` / `caches.c128`); both shares stated
 * (checkNamingLargerShare).
 */
function checkPagedHeap(heap: WorkerHeap, cacheBytes: readonly number[], entries: number, hQ: number, ratio: CompressRatio, op: string): void {
  const need = heap.pagedSparseAttention(cacheBytes.reduce((a, b) => a + b, 0), entries, hQ);
  if (heap.fits(need)) return;
  const names = ['caches.swa', `caches.c${ratio}`];
  const read = cacheBytes.map((b, i) => `${names[i]} ${b} bytes`).join(', ');
  const cache = (cacheBytes[1] ?? 0) > cacheBytes[0]! ? names[1]! : names[0]!;
  checkNamingLargerShare(heap, need, heap.pagedSparseAttention(0, 0, 0), heap.pagedSparseAttention(0, 0, hQ), hQ, cache, `the caches as read (${read}) and their ${entries} ids a row`, op);
}

/** A host operand's typed array (null for device memory or no operand). */
function hostData<T extends Uint16Array | Float32Array | Int32Array>(d: T | DeviceBuffer | undefined): T | null {
  return d !== undefined && ArrayBuffer.isView(d) ? d : null;
}

/**
 * prepareLayer for the call a cuda engine's layer loop makes (every tensor and cache in device
 * memory), in one function without messages: the same checks, each field read once into a local
 * and handed on as read (the plan's device checks take a cache's or top-k's fields, not the
 * caller's object), and the same LayerCall where they pass. Where anything differs (a host
 * operand, another engine kind, bad input) it stops, and prepareLayer checks the call and throws
 * its typed error over what was read here (stopped.call; undefined where nothing was), not over the
 * caller's objects again: every field, dim and cache field of a call is read once in all, in
 * prepareLayer's order (a getter asked a second time could throw or answer otherwise). It exists
 * for a process's first layers, which V8 runs in its interpreter: one function warms up and is
 * compiled in one piece where prepareLayer's checks are a dozen. V8 gives a function its inline
 * caches once it has run about eight times its own bytecode, so what was read is packaged outside
 * it (fellBack, left in `stopped`; an operand's checks below leave theirs there too), and a stop here
 * is a jump.
 */
function prepareDeviceLayer(engine: SparseMlaEngine, args: PrefillLayerArgs, options: unknown, stopped: Stopped): LayerCall | undefined {
  // each device operand is checked live, of its bytes and the engine's own in one call (DeviceOps.ownsLive)
  const device = engine.layerDevice();
  if (device === undefined || typeof args !== 'object' || args === null || Array.isArray(args)) return undefined;
  // each argument as read (NOT_READ: not read), or as checked once it passed, for prepareLayer where the checks stop
  let output: unknown = NOT_READ, dropped: unknown = NOT_READ, qRead: unknown = NOT_READ, smScale: unknown = NOT_READ;
  let sinkRead: unknown = NOT_READ, topkRead: unknown = NOT_READ, cachesRead: unknown = NOT_READ;
  let route: RouteDecision | undefined;
  const plan = args.plan, ratio = args.compressRatio;
  checks: {
    if (!Plan.isPlan(plan)) break checks;
    // a ratio 0, 4 or 128 the plan serves, and its layout
    const layout = plan.servedLayout(ratio);
    if (layout === undefined) break checks;
    // checkOutputOption, checkDroppedOption
    if (options !== undefined) {
      if (typeof options !== 'object' || options === null || Array.isArray(options)) break checks;
      output = (options as PrefillLayerOptions).output;
      if (output !== undefined && output !== 'host' && output !== 'device') break checks;
      dropped = (options as PrefillLayerOptions).dropped;
      if (dropped !== undefined && dropped !== 'await' && dropped !== 'later') break checks;
    }
    const nq = plan.numQueries;
    const q = deviceQuery(args.q, nq, device, stopped);
    if (q === undefined) {
      qRead = stopped.read;
      break checks;
    }
    qRead = q;
    const hQ = q.shape[1]!;
    // checkSmScale: finite with |smScale| ≤ MAX_SM_SCALE (NaN fails both comparisons, ±inf one)
    const scale: unknown = (smScale = args.smScale);
    if (typeof scale !== 'number' || !(scale <= MAX_SM_SCALE && scale >= -MAX_SM_SCALE)) break checks;
    // a live device float32 [hQ] (null: no sink, as the ops take it)
    const sinkArg: unknown = (sinkRead = args.attnSink);
    let attnSink: DeviceTensor<'float32'> | undefined;
    if (sinkArg !== undefined && sinkArg !== null) {
      const sink = deviceSink(sinkArg, hQ, device, stopped);
      if (sink === undefined) {
        sinkRead = stopped.read;
        break checks;
      }
      sinkRead = attnSink = sink;
    }
    const topkIndices: unknown = (topkRead = args.topkIndices);
    if ((ratio === 4) !== (topkIndices !== undefined)) break checks;
    const caches = deviceCaches(plan, args.caches, ratio, device, stopped);
    if (caches === undefined) {
      cachesRead = stopped.read;
      break checks;
    }
    cachesRead = caches;
    // a forced path (the layer loop's usual call) without the router's options object and decision
    const path = args.path, threshold = args.threshold;
    route = forcedRoute(path, threshold) ?? routeLayer(engine, args, nq, path, threshold, ratio);
    let topk: CheckedTopk<DeviceBuffer> | undefined;
    if (ratio === 4) {
      const t = deviceTopk(plan, topkIndices, device, stopped);
      if (t === undefined) {
        topkRead = stopped.read;
        break checks;
      }
      topk = t;
    }
    return new LayerCall(plan, ratio, layout, q, hQ, attnSink, scale, caches, topk, output === 'device' ? 'device' : 'host', route, true, dropped === 'later');
  }
  stopped.call = fellBack(stopped, plan, ratio, output, dropped, qRead, smScale, sinkRead, topkRead, cachesRead, route);
  return undefined;
}

/** The router's decision for a layer whose path is not forced (`path` and `threshold` as read; env read now, as prepareLayer reads it). */
function routeLayer(engine: SparseMlaEngine, args: PrefillLayerArgs, nq: number, path: PrefillLayerArgs['path'], threshold: PrefillLayerArgs['threshold'], ratio: CompressRatio): RouteDecision {
  return routePrefill(nq, { path, threshold, env: args.env || undefined, backend: engine.backend, compressRatio: ratio });
}

/**
 * Where prepareDeviceLayer stopped (its caller's, one a call): the operand its check stopped at, as
 * read, and what it read of that operand's fields (in the operand's own slot: undefined where none
 * was read); then the call as read there for prepareLayer (undefined where nothing was read).
 */
class Stopped {
  declare read: unknown;
  declare q: TensorRead | undefined;
  declare attnSink: TensorRead | undefined;
  declare caches: CachesRead | undefined;
  declare topk: TensorRead | undefined;
  declare call: LayerRead | undefined;
  constructor() {
    this.read = NOT_READ;
    this.q = undefined;
    this.attnSink = undefined;
    this.caches = undefined;
    this.topk = undefined;
    this.call = undefined;
  }

  /** An operand's check stopped at `value` (the operand `key`), its fields as read (tensorRead's): undefined, for the check to return. */
  stopAtTensor(key: 'q' | 'attnSink' | 'topk', value: unknown, dtype: unknown, shape: unknown, data: unknown, length: unknown, d0: unknown, d1: unknown, d2: unknown): undefined {
    this.read = value;
    this[key] = tensorRead(dtype, shape, data, length, d0, d1, d2);
    return undefined;
  }

  /** deviceCaches stopped at the caches `given`: each cache as read and its fields where read (format NOT_READ: not read). */
  stopAtCaches(given: unknown, swa: unknown, swaFormat: unknown, swaPageSize: unknown, swaNumPages: unknown, swaData: unknown, compressed: unknown, format: unknown, pageSize: unknown, numPages: unknown, data: unknown): undefined {
    this.read = given;
    this.caches = {
      swa,
      swaFields: swaFormat === NOT_READ ? undefined : { format: swaFormat, pageSize: swaPageSize, numPages: swaNumPages, data: swaData },
      compressed,
      compressedFields: format === NOT_READ ? undefined : { format, pageSize, numPages, data },
    };
    return undefined;
  }
}

/** A device operand as the device checks passed it (a DeviceTensor of the library's own, made by a constructor as LayerCall is). */
class CheckedDeviceTensor<D extends 'bf16' | 'float32'> implements DeviceTensor<D> {
  declare readonly dtype: D;
  declare readonly shape: readonly number[];
  declare readonly data: DeviceBuffer;
  constructor(dtype: D, shape: readonly number[], data: DeviceBuffer) {
    this.dtype = dtype;
    this.shape = shape;
    this.data = data;
  }
}

/**
 * checkQuery for a device layer: `value` as a live device bf16 [nq, hQ ≥ 1, 512] of `device`'s own
 * (the checked tensor), read as readTensorFields reads a tensor (dtype, shape, data, then the
 * shape's length and its dims in order, here up to the first one the device call does not take);
 * else undefined, what was read of it in `stopped`. Integers are checked as int32 ((x | 0) === x), not as safe
 * integers: no builtin call, and a larger hQ (no device memory holds such a q) only goes to
 * prepareLayer.
 */
function deviceQuery(value: unknown, nq: number, device: OwnedBufferCheck, stopped: Stopped): DeviceTensor<'bf16'> | undefined {
  if (!hasTensorFields(value)) {
    stopped.read = value;
    return undefined;
  }
  const dtype = value.dtype, shape = value.shape, data = value.data;
  let rank: unknown = NOT_READ, q0: unknown = NOT_READ, hQ: unknown = NOT_READ, q2: unknown = NOT_READ;
  read: {
    if (dtype !== 'bf16' || !Array.isArray(shape)) break read;
    rank = shape.length;
    if (rank !== 3) break read;
    q0 = shape[0];
    if (q0 !== nq) break read;
    hQ = shape[1];
    if (typeof hQ !== 'number' || (hQ | 0) !== hQ || hQ < 1) break read;
    q2 = shape[2];
    if (q2 !== WORKSPACE_ROW_DIMS || !device.ownsLive(data, nq * hQ * WORKSPACE_ROW_DIMS * 2)) break read;
    return new CheckedDeviceTensor('bf16', [nq, hQ, WORKSPACE_ROW_DIMS], data as DeviceBuffer);
  }
  return stopped.stopAtTensor('q', value, dtype, shape, data, rank, q0, hQ, q2);
}

/** A device layer's sink: `value` as a live device float32 [hQ] of `device`'s own, read as deviceQuery reads q; else undefined, what was read of it in `stopped`. */
function deviceSink(value: unknown, hQ: number, device: OwnedBufferCheck, stopped: Stopped): DeviceTensor<'float32'> | undefined {
  if (!hasTensorFields(value)) {
    stopped.read = value;
    return undefined;
  }
  const dtype = value.dtype, shape = value.shape, data = value.data;
  let rank: unknown = NOT_READ, s0: unknown = NOT_READ;
  read: {
    if (dtype !== 'float32' || !Array.isArray(shape)) break read;
    rank = shape.length;
    if (rank !== 1) break read;
    s0 = shape[0];
    if (s0 !== hQ || !device.ownsLive(data, hQ * 4)) break read;
    return new CheckedDeviceTensor('float32', [hQ], data as DeviceBuffer);
  }
  return stopped.stopAtTensor('attnSink', value, dtype, shape, data, rank, s0, NOT_READ, NOT_READ);
}

/**
 * Plan.checkCaches for a device layer: each cache's fields read as checkV4Cache reads them
 * (format, pageSize, numPages, data) and checked as read by Plan.deviceSwaCache and
 * Plan.deviceCompressedCache, the SWA cache before the compressed one is read; the checked views,
 * else undefined, what was read of them in `stopped`.
 */
function deviceCaches(plan: Plan, given: unknown, ratio: CompressRatio, device: OwnedBufferCheck, stopped: Stopped): CheckedCaches<DeviceBuffer> | undefined {
  if (typeof given !== 'object' || given === null) {
    stopped.read = given;
    return undefined;
  }
  const swa: unknown = (given as PlanCaches).swa;
  const key = ratio === 4 ? 'c4' : 'c128';
  let swaFormat: unknown = NOT_READ, swaPageSize: unknown, swaNumPages: unknown, swaData: unknown;
  let compressed: unknown = NOT_READ, format: unknown = NOT_READ, pageSize: unknown, numPages: unknown, data: unknown;
  read: {
    if (typeof swa !== 'object' || swa === null) break read;
    const s = swa as KvCache;
    (swaFormat = s.format), (swaPageSize = s.pageSize), (swaNumPages = s.numPages), (swaData = s.data);
    const swaView = plan.deviceSwaCache(swaFormat, swaPageSize, swaNumPages, swaData, device);
    if (swaView === undefined) break read;
    if (ratio === 0) return new CheckedCaches(swaView, undefined);
    compressed = (given as PlanCaches)[key];
    if (typeof compressed !== 'object' || compressed === null) break read;
    const c = compressed as KvCache;
    (format = c.format), (pageSize = c.pageSize), (numPages = c.numPages), (data = c.data);
    const compressedView = plan.deviceCompressedCache(ratio, format, pageSize, numPages, data, device);
    if (compressedView === undefined) break read;
    return new CheckedCaches(swaView, compressedView);
  }
  return stopped.stopAtCaches(given, swa, swaFormat, swaPageSize, swaNumPages, swaData, compressed, format, pageSize, numPages, data);
}

/**
 * Plan.checkTopk for a device layer: int32 [numQueries, topk] or [numQueries, 1, topk], read as
 * deviceQuery reads q and its width and data checked as read by Plan.deviceTopk; the checked
 * top-k, else undefined, what was read of it in `stopped`.
 */
function deviceTopk(plan: Plan, value: unknown, device: OwnedBufferCheck, stopped: Stopped): CheckedTopk<DeviceBuffer> | undefined {
  if (!hasTensorFields(value)) {
    stopped.read = value;
    return undefined;
  }
  const dtype = value.dtype, shape = value.shape, data = value.data;
  let rank: unknown = NOT_READ, t0: unknown = NOT_READ, t1: unknown = NOT_READ, t2: unknown = NOT_READ;
  read: {
    if (dtype !== 'int32' || !Array.isArray(shape)) break read;
    rank = shape.length;
    if (rank !== 2 && rank !== 3) break read;
    t0 = shape[0];
    if (t0 !== plan.numQueries) break read;
    t1 = shape[1];
    if (rank === 3) {
      if (t1 !== 1) break read;
      t2 = shape[2];
    }
    const topk = plan.deviceTopk(rank === 3 ? t2 : t1, data, device);
    if (topk !== undefined) return topk;
  }
  return stopped.stopAtTensor('topk', value, dtype, shape, data, rank, t0, t1, t2);
}

/**
 * What prepareDeviceLayer read of a call before it stopped, for prepareLayer to go on from: each
 * argument as read (NOT_READ: not read), or as checked where it passed (the library's own object,
 * which prepareLayer checks again without reading the caller's; the caches as the record {swa, c4
 * or c128} of the checked views); the fields it read of the operand it stopped at; the route where
 * it was decided.
 */
interface LayerRead {
  readonly plan: unknown;
  readonly compressRatio: unknown;
  readonly output: unknown;
  readonly dropped: unknown;
  readonly q: unknown;
  readonly smScale: unknown;
  readonly attnSink: unknown;
  readonly topkIndices: unknown;
  readonly caches: unknown;
  readonly route: RouteDecision | undefined;
  readonly qFields: TensorRead | undefined;
  readonly sinkFields: TensorRead | undefined;
  readonly cachesFields: CachesRead | undefined;
  readonly topkFields: TensorRead | undefined;
}

/** args[key] as prepareDeviceLayer read it (`read`), else read now. */
function arg(args: PrefillLayerArgs, read: LayerRead | undefined, key: 'plan' | 'compressRatio' | 'q' | 'smScale' | 'attnSink' | 'topkIndices' | 'caches'): unknown {
  const value = read === undefined ? NOT_READ : read[key];
  return value === NOT_READ ? args[key] : value;
}

/** What prepareDeviceLayer read of a call it leaves to prepareLayer (LayerRead), with what the operand check it stopped at read (`stopped`). */
function fellBack(stopped: Stopped, plan: unknown, ratio: unknown, output: unknown, dropped: unknown, q: unknown, smScale: unknown, attnSink: unknown, topkIndices: unknown, caches: unknown, route: RouteDecision | undefined): LayerRead {
  if (route !== undefined) {
    const checked = caches as { swa: CacheView<DeviceBuffer>; compressed?: CacheView<DeviceBuffer> };
    caches = ratio === 0 ? { swa: checked.swa } : { swa: checked.swa, [ratio === 4 ? 'c4' : 'c128']: checked.compressed };
  }
  return { plan, compressRatio: ratio, output, dropped, q, smScale, attnSink, topkIndices, caches, route, qFields: stopped.q, sinkFields: stopped.attnSink, cachesFields: stopped.caches, topkFields: stopped.topk };
}

/** A tensor's fields as read: its dtype, shape and data, and (where read, else NOT_READ) its shape's length and first dims in order. */
function tensorRead(dtype: unknown, shape: unknown, data: unknown, length: unknown, ...dims: unknown[]): TensorRead {
  let n = 0;
  while (n < dims.length && dims[n] !== NOT_READ) n++;
  return { dtype, shape, data, length, dims: dims.slice(0, n) };
}

// prepareLayer's messages, built only to throw: it runs on every layer, mostly before V8 has
// optimized it, and V8 gives a function its inline caches once it has run about eight times its own
// bytecode (a message built inline would only make the function bigger)
const FLOAT32_DTYPE = ['float32'] as const;

function noDevice(engine: SparseMlaEngine, argument: 'options.output' | 'caches'): never {
  if (argument === 'options.output') fail('BACKEND_UNAVAILABLE', 'options.output', "a cuda engine for { output: 'device' }", `the ${engine.backend} backend`);
  fail('BACKEND_UNAVAILABLE', 'caches', `host caches (the ${engine.backend} backend has no device memory; device caches need { backend: 'cuda' })`, 'a device cache');
}
function badQueryShape(plan: Plan, q: { shape: readonly number[] }): never {
  fail('INVALID_SHAPE', 'q', `[numQueries = ${plan.numQueries}, hQ, ${WORKSPACE_ROW_DIMS}]`, `[${q.shape.join(', ')}]`);
}
function badSinkShape(hQ: number, attnSink: { shape: readonly number[] }): never {
  fail('INVALID_SHAPE', 'attnSink', `[hQ = ${hQ}]`, `[${attnSink.shape.join(', ')}]`);
}

/** A device operand of a cuda engine's layer is a buffer of the engine's backend on its device (host data: nothing to check). */
function onEngineDevice(engine: SparseMlaEngine, data: unknown, argument: string): void {
  if (isDeviceBuffer(data) && !engine.ownsDeviceBuffer(data)) notOwned(engine, data, argument);
}
function notOwned(engine: SparseMlaEngine, data: DeviceBuffer, argument: string): never {
  const device = engine.device!, other = data.deviceIndex;
  if (other !== device) fail('INVALID_VALUE', argument, `a tensor on this engine's CUDA device ${device}`, `one on device ${typeof other === 'number' ? other : describe(other)} (engine.copyFrom moves it)`);
  fail('INVALID_VALUE', argument, "a device buffer of this engine's backend (from upload, uploadKvCache or an op's device output)", 'a device buffer from another backend or process');
}
function noIndexer(ratio: CompressRatio, topkIndices: unknown): never {
  fail('INVALID_VALUE', 'topkIndices', `nothing for a ratio-${ratio} layer (only c4 layers have an indexer)`, describe(topkIndices));
}

/** options.dropped (options already checked to be undefined or an object; `dropped`: as read, else NOT_READ): whether the count may come later. */
function checkDroppedOption(options: unknown, dropped: unknown): boolean {
  if (options === undefined) return false;
  const d = dropped === NOT_READ ? (options as PrefillLayerOptions).dropped : dropped;
  if (d === undefined || d === 'await') return false;
  if (d === 'later') return true;
  fail('INVALID_VALUE', 'options.dropped', '"await" or "later"', describe(d));
}

/** @internal A checked layer call, ready for runLayer: what prefillLayer checks before any work. */
export type CheckedLayer = LayerCall;

/**
 * @internal Every check of prefillLayer(engine, args, options), each argument read once, before any
 * work; prefillLayerSharded checks every shard's call this way before it runs any of them.
 * `hostOperand`: the caller knows the call has an operand in host memory (a sharded layer's sink),
 * where the device checks would stop: the full checks at once, over the caller's objects.
 */
export function checkLayer(given: Engine, args: PrefillLayerArgs, options?: unknown, engineArgument = 'engine', hostOperand = false): CheckedLayer {
  // (checkEngine only to throw: its refusal is most of its bytecode, which V8 counts against it
  // while it runs cold — it gives a function feedback once it has run about eight times its bytecode)
  const engine = SparseMlaEngine.isEngine(given) ? given : checkEngine(given, engineArgument);
  // (compared with undefined, not told apart by instanceof: this runs on every layer, mostly cold)
  const stopped = new Stopped();
  const fast = hostOperand ? undefined : prepareDeviceLayer(engine, args, options, stopped);
  if (fast === undefined) {
    return checkFully(engine, args, options, stopped.call);
  }
  // (a device layer's ops take host memory only for host outputs, or a paged c4 layer's for its
  // top-k downloaded and the paged form built on the host; prepareLayer checks its own call's)
  if (fast.output === 'host' || (fast.ratio === 4 && fast.route.path === 'paged')) checkOpsMemory(engine, fast);
  deviceOperandsLive(fast);
  return fast;
}

/** checkLayer's call where prepareDeviceLayer does not pass it: every check of prepareLayer (over what prepareDeviceLayer read), then its device operands still live. */
function checkFully(engine: SparseMlaEngine, args: PrefillLayerArgs, options: unknown, read: LayerRead | undefined): CheckedLayer {
  const call = prepareLayer(engine, args, options, read);
  if (engine.hasDevice) deviceOperandsLive(call);
  return call;
}

/**
 * A cuda layer's device operands are still live once every argument has been read: a getter read
 * after an operand's check (smScale, caches, path, threshold, env) can free one, which is then
 * INVALID_VALUE naming the layer's argument before any work (the ops' own checks, at their launch,
 * would name theirs: cache, kCache.data). Gives back the call's copies when it throws.
 */
function deviceOperandsLive(call: LayerCall): void {
  const sink = call.attnSink, caches = call.caches, compressed = caches.compressed, topk = call.topk;
  if (isFreed(call.q.data) || (sink !== undefined && isFreed(sink.data)) || isFreed(caches.swa.data) || (compressed !== undefined && isFreed(compressed.data)) || (topk !== undefined && isFreed(topk.data))) operandFreed(call);
}
/** deviceOperandsLive's refusal, naming the first operand freed in the call's order. */
function operandFreed(call: LayerCall): never {
  const compressed = call.caches.compressed;
  const argument =
    isFreed(call.q.data) ? 'q'
    : call.attnSink !== undefined && isFreed(call.attnSink.data) ? 'attnSink'
    : isFreed(call.caches.swa.data) ? 'caches.swa'
    : compressed !== undefined && isFreed(compressed.data) ? `caches.c${call.ratio}`
    : 'topkIndices';
  releaseLayer(call);
  fail('INVALID_VALUE', argument, 'a live device buffer until the call has read its arguments', 'one freed during the call (by a getter of a later argument)');
}
const isFreed = (d: unknown): boolean => isDeviceBuffer(d) && d.freed;

/** @internal Gives back what a checked layer call holds (its copies taken at the call) when it will not run. */
export function releaseLayer(call: CheckedLayer): void {
  call.copies?.release();
}

/**
 * @internal prepareLayer and prepareDeviceLayer, for the tests that hold the second to the first
 * (prepareDeviceLayer's call, or undefined where it leaves the call to prepareLayer).
 */
export const layerChecks = {
  prepareLayer: (engine: SparseMlaEngine, args: PrefillLayerArgs, options: unknown): LayerCall => prepareLayer(engine, args, options),
  prepareDeviceLayer: (engine: SparseMlaEngine, args: PrefillLayerArgs, options: unknown): LayerCall | undefined => prepareDeviceLayer(engine, args, options, new Stopped()),
};
