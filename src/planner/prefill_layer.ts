/**
 * prefillLayer: one attention layer of a prefill chunk through its plan, down the path the router
 * picks. Workspace path: the engine's layer steps (src/backends/backend.ts, LayerSteps) build the
 * layer's index rows, dequantize its compressed rows and SWA gather into the plan's workspace and
 * run sparsePrefill over the combined rows. What does not change within the chunk — the c0 / c128
 * rows, the compressed and SWA gather ids, the workspace — is built once per plan and memory and
 * kept by the plan (LayerResources); only the dequant (every layer has its own caches) and a c4
 * layer's combine run per layer (on a device into row buffers the plan keeps between c4 layers).
 * Paged path: pagedSparseAttention straight over the layer's caches with the plan's paged form of
 * the same rows (a c0 / c128 form kept in the engine's memory by the plan, like the rows and ids;
 * once it is kept, a device layer hands the steps the op's job as its checks left it).
 *
 * On a host engine (cpu, wasm) the steps work in host memory. On a cuda engine they work on the
 * GPU: rows and ids are built there from the plan's lengths and page tables, the SWA ids are
 * uploaded once, and with device q, caches, sink and (with { output: 'device' }) outputs the
 * layer's launches are queued back to back on the engine's stream with no host round trip (a host
 * sink is a host operand: the prefill then waits for its own work, README "Stream order"); only a
 * c4 layer's dropped total (8 bytes, summed on the device) comes back, read while the rest of the
 * layer is queued, and the call resolves once it is in (device outputs are then queued, not
 * necessarily finished: a download or engine.synchronize() waits for them). Once the plan keeps
 * what a layer reads (its rows, or c4 rows to combine into, and its ids) and every operand is on
 * the device, device steps queue the whole layer at once (LayerSteps.queueLayer: the cuda engine's
 * layer program, one addon call), which takes most of the host time out of a short layer. Every id was checked against the caches by the
 * plan (checkCaches), and the dequant kernel checks each again.
 *
 * A call's checks, before any work, are in prefill_layer_checks.ts; this file runs a checked call.
 */
import { INT32_MAX } from '../ops/common.js';
import { deviceTensor, isDeviceBuffer, placedTensor, tensor } from '../tensor.js';
import { detached } from '../backends/staging.js';
import type { SparseMlaEngine } from '../engine.js';
import type { DeviceBuffer, DeviceKvCache, DeviceTensor, Engine, KvCache, Placement, PlacedTensor, Tensor } from '../types.js';
import type { CacheView, LayerSteps, PagedSparseAttentionJob, QueuedLayerOutput, WorkspaceDequantizeJob, WorkspacePrefillJob } from '../backends/backend.js';
import { Plan } from './plan.js';
import { WORKSPACE_ROW_DIMS } from './chunk_geometry.js';
import type { CheckedTopk } from './plan_checks.js';
import { workspaceDequants, type C4LayerRows, type LayerResources, type LayerRows, type PlacedPagedForm } from './layer_resources.js';
import { checkLayer, type CheckedLayer, type LayerCall, type PrefillLayerArgs, type PrefillLayerOptions } from './prefill_layer_checks.js';
import type { PagedForm, RouteDecision } from './types.js';

export interface PrefillLayerResult<P extends Placement = 'host', D extends number | null = number> extends RouteDecision {
  /** bf16 [numQueries, hQ, 512] (a device tensor with { output: 'device' }) */
  out: PlacedTensor<'bf16', P>;
  /** float32 [numQueries, hQ] */
  lse: PlacedTensor<'float32', P>;
  /** float32 [numQueries, hQ] */
  maxLogits: PlacedTensor<'float32', P>;
  /** bytes of workspace this layer filled (0 on the paged path) */
  workspaceBytes: number;
  /** top-k entries dropped for causality in this layer; null with { dropped: 'later' } where it is read later (plan.settleDropped) */
  dropped: D;
}

/** What a layer gives inside this module: outputs where they were asked for, a dropped count or null (read later). */
type LayerResult = PrefillLayerResult<Placement, number | null>;

/**
 * The caches as the paged path's op takes them: the views Plan.checkCaches read and checked (caches
 * of the library's own, whose numTokens and bytes the op does not read), never the caller's objects
 * again (a getter of theirs read a second time could answer another cache, which the op would attend
 * silently: ids the plan checked against the first, outside the second, are skipped by the op).
 */
function opCaches(caches: LayerCall['caches']): { swa: KvCache | DeviceKvCache; compressed?: KvCache | DeviceKvCache } {
  return caches as { swa: KvCache | DeviceKvCache; compressed?: KvCache | DeviceKvCache };
}

export function prefillLayer<P extends Placement = 'host'>(engine: Engine, args: PrefillLayerArgs, options: PrefillLayerOptions<P> & { dropped: 'later' }): Promise<PrefillLayerResult<P, number | null>>;
export function prefillLayer<P extends Placement = 'host'>(engine: Engine, args: PrefillLayerArgs, options?: PrefillLayerOptions<P>): Promise<PrefillLayerResult<P>>;
export function prefillLayer<P extends Placement = 'host'>(engine: Engine, args: PrefillLayerArgs, options?: PrefillLayerOptions<P>): Promise<PrefillLayerResult<P, number | null>> {
  // not an async function itself (a bad call still rejects, never throws): one async frame a layer, runLayer's layer()
  let call: CheckedLayer;
  try {
    call = checkLayer(engine, args, options);
  } catch (e) {
    return Promise.reject(e);
  }
  // runLayer inline (a device layer holds no copies)
  const copies = call.copies;
  return (copies === undefined ? layer(engine as SparseMlaEngine, call) : layerThenRelease(engine as SparseMlaEngine, call, copies)) as Promise<PrefillLayerResult<P, number | null>>;
}

/**
 * @internal Runs a checked layer call on the engine it was checked for, and gives back the slab of
 * its copies taken at the call once it has settled (a call checked and never run: releaseLayer).
 */
export function runLayer(engine: SparseMlaEngine, call: CheckedLayer): Promise<LayerResult> {
  if (call.copies !== undefined) return layerThenRelease(engine, call, call.copies);
  return layer(engine, call);
}

/** runLayer for a call holding copies (their own function: a closure here would give runLayer a context every call). */
function layerThenRelease(engine: SparseMlaEngine, call: CheckedLayer, copies: { release(): void }): Promise<LayerResult> {
  return layer(engine, call).finally(() => copies.release());
}

/**
 * A layer: queued whole by the steps where it can be (a device layer of a plan that keeps what it
 * reads: see below), else step by step (stepwiseLayer). This runs on every layer, mostly before V8
 * has given it feedback, which it does once the function has run about eight times its own
 * bytecode: only the queued path is here, the others one call away.
 */
async function layer(engine: SparseMlaEngine, call: CheckedLayer): Promise<LayerResult> {
  // a disposed engine's layer rejects with DISPOSED as any call on it does (layerSteps), a chunk without queries too
  const steps = engine.layerSteps();
  if (steps.queueLayer !== undefined && call.output === 'device' && call.device && call.plan.numQueries !== 0 && call.route.path !== 'paged') {
    // the whole layer queued by the steps (LayerResources.queuedJob: undefined, with nothing taken,
    // until the plan keeps what the layer reads): one await, nothing between the call's checks and
    // the launches but taking what the plan keeps
    const res = call.plan.resources(steps);
    const job = res.queuedJob(steps, call as LayerCall & { q: DeviceTensor<'bf16'> });
    if (job !== undefined) {
      let r: QueuedLayerOutput<DeviceBuffer> | undefined;
      try {
        r = await steps.queueLayer(job, call.droppedLater);
      } catch (e) {
        res.giveBackJob(job);
        throw e;
      }
      if (r !== undefined) return queuedLayerResult(call, res, r, res.queuedLayerDone(job, r.dropped)) as LayerResult;
      // (an operand is another engine's: the steps run one by one)
      res.giveBackJob(job);
    }
  }
  return await stepwiseLayer(engine, steps, call);
}

/** A layer step by step: a chunk without queries, the paged path, or the workspace path's steps one by one. */
async function stepwiseLayer(engine: SparseMlaEngine, steps: LayerSteps<DeviceBuffer>, call: CheckedLayer): Promise<LayerResult> {
  if (call.plan.numQueries === 0) return (await emptyLayer(engine, call)) as LayerResult;
  if (call.route.path === 'paged') return (await pagedLayer(engine, call)) as LayerResult;
  return (await workspaceLayer(steps, call.plan.resources(steps), call)) as LayerResult;
}

/** A chunk without queries: empty outputs where they were asked for, no work. */
async function emptyLayer(engine: Engine, { hQ, output, route }: LayerCall): Promise<LayerResult> {
  const out = tensor('bf16', [0, hQ, WORKSPACE_ROW_DIMS]), lse = tensor('float32', [0, hQ]), maxLogits = tensor('float32', [0, hQ]);
  if (output === 'device') {
    // uploaded one by one: when one cannot be, the ones before it are freed
    const placed: DeviceTensor<'bf16' | 'float32'>[] = [];
    try {
      for (const t of [out, lse, maxLogits] as Tensor<'bf16' | 'float32'>[]) placed.push(await engine.upload(t));
    } catch (e) {
      for (const t of placed) t.data.free();
      throw e;
    }
    return { ...route, out: placed[0] as DeviceTensor<'bf16'>, lse: placed[1] as DeviceTensor<'float32'>, maxLogits: placed[2] as DeviceTensor<'float32'>, workspaceBytes: 0, dropped: 0 };
  }
  return { ...route, out, lse, maxLogits, workspaceBytes: 0, dropped: 0 };
}

/**
 * The paged path: the plan's rows in their paged form, one pagedSparseAttention. A c0 / c128 layer
 * with a device q reads the form from the engine's memory (placed once per plan), so nothing waits
 * for the host; a c4 layer's form comes from its top-k on the host (a device top-k is downloaded).
 * Once the plan keeps the form, the layer's launch follows its checks with nothing in between
 * (no await), so the steps take the op's job as the checks left it (LayerSteps.pagedAttention);
 * the layer that places the form awaits that, and then goes through the public op, which checks its
 * operands again (the caller may have freed one meanwhile).
 */
async function pagedLayer(engine: SparseMlaEngine, call: LayerCall): Promise<LayerResult> {
  const { plan, ratio, q, output } = call;
  if (ratio !== 4 && isDeviceBuffer(q.data)) {
    const steps = engine.layerSteps();
    if (steps.memory === 'device') {
      const res = plan.resources(steps);
      const kept = res.keptPagedForm(ratio);
      const job = kept === undefined ? undefined : pagedJob(call, kept);
      if (job !== undefined && steps.pagedAttention !== undefined) return layerResult(call, await steps.pagedAttention(job, output, res), 0, 0);
      return pagedOp(engine, call, kept ?? (await res.pagedForm(steps, ratio, () => plan.layerPagedForm(ratio, undefined, undefined).form)));
    }
  }
  return pagedLayerFromHost(engine, call);
}

/**
 * The device paged op's job over a layer's checked operands and its plan's placed form, as
 * preparePagedSparseAttention would make it from them: everything it checks was checked by the
 * layer call (q, sink, smScale) or the plan (the caches, the form), but for the op's 32-bit sizes
 * of q and the caches; past those (no memory holds such a q or cache) undefined, and pagedOp's
 * public op refuses them.
 */
function pagedJob({ plan, q, hQ, attnSink, smScale, caches }: LayerCall, form: PlacedPagedForm<DeviceBuffer>): PagedSparseAttentionJob<DeviceBuffer> | undefined {
  const swa = caches.swa, compressed = caches.compressed;
  const extra = compressed !== undefined && form.extra !== undefined && form.extraLengths !== undefined;
  if (hQ > INT32_MAX || swa.numTokens > INT32_MAX || (extra && compressed.numTokens > INT32_MAX)) return undefined;
  return {
    q: q.data,
    n: plan.numQueries,
    hQ,
    main: { cache: swa, indices: form.main, topk: form.mainWidth, topkLength: form.mainLengths },
    extra: extra ? { cache: compressed, indices: form.extra!, topk: form.extraWidth, topkLength: form.extraLengths! } : null,
    attnSink: attnSink === undefined ? null : attnSink.data,
    smScale,
  };
}

/** The public paged op over the caller's caches and the plan's placed form, every argument checked by it. */
async function pagedOp(engine: SparseMlaEngine, { plan, ratio, q, attnSink, smScale, caches: checked, output, route }: LayerCall, f: PlacedPagedForm<DeviceBuffer>): Promise<LayerResult> {
  const caches = opCaches(checked);
  const nq = plan.numQueries;
  const onDevice = (b: Int32Array | DeviceBuffer, width: number) => deviceTensor('int32', width > 0 ? [nq, width] : [nq], b as DeviceBuffer);
  const extra = ratio !== 0 && f.extra !== undefined && f.extraLengths !== undefined;
  const r = await engine.pagedSparseAttention(
    {
      q,
      kCache: caches.swa,
      indices: onDevice(f.main, f.mainWidth),
      topkLength: onDevice(f.mainLengths, 0),
      ...(extra ? { extraKCache: caches.compressed!, extraIndices: onDevice(f.extra!, f.extraWidth), extraTopkLength: onDevice(f.extraLengths!, 0) } : {}),
      ...(attnSink ? { attnSink } : {}),
      smScale,
    },
    { output },
  );
  return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: 0, dropped: 0 };
}

/** The paged path over a paged form built on the host (host engines, c4 layers, host q). */
async function pagedLayerFromHost(engine: SparseMlaEngine, { plan, ratio, q, attnSink, smScale, caches: checked, topk, output, route, peeked }: LayerCall): Promise<LayerResult> {
  const caches = opCaches(checked);
  // the plan's own form (no copies of its rows, nothing compared); where the layer's budget check
  // peeked it (checkPagedOp), kept now and counted as the layer's own build
  const { form: paged, dropped } = peeked !== undefined || ratio !== 4 ? plan.layerPagedForm(ratio, undefined, peeked) : await c4PagedForm(engine, plan, topk!);
  const extra = ratio !== 0 && paged.extra !== undefined;
  const r = await engine.pagedSparseAttention(
    {
      q,
      kCache: caches.swa,
      indices: paged.main,
      topkLength: paged.mainLengths,
      ...(extra ? { extraKCache: caches.compressed!, extraIndices: paged.extra!, extraTopkLength: paged.extraLengths! } : {}),
      ...(attnSink ? { attnSink } : {}),
      smScale,
    },
    { output },
  );
  return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: 0, dropped };
}

/**
 * A c4 layer's paged form by the plan's host combine (the plan's own, Plan.layerPagedForm). A device
 * top-k (cuda engines) comes to the host for it and is dropped with this frame, before the layer's
 * op (checkPagedOp counts it so).
 */
async function c4PagedForm(engine: SparseMlaEngine, plan: Plan, t: CheckedTopk<DeviceBuffer>): Promise<{ form: PagedForm; dropped: number }> {
  const data = isDeviceBuffer(t.data) ? (await engine.downloadArgument({ dtype: 'int32', shape: t.shape, data: t.data }, 'topkIndices')).data : t.data;
  return plan.layerPagedForm(4, tensor('int32', t.shape, data), undefined);
}

/** The workspace path step by step over the engine's layer steps (see the file comment). */
async function workspaceLayer(steps: LayerSteps<DeviceBuffer>, res: LayerResources<DeviceBuffer>, call: LayerCall): Promise<LayerResult> {
  const { ratio, layout, topk, output } = call;
  let rows: LayerRows<DeviceBuffer>;
  let dropped: Promise<number> = Promise.resolve(0);
  let c4: C4LayerRows<DeviceBuffer> | undefined;
  if (ratio === 4) {
    c4 = await res.combineC4(steps, topk!);
    rows = c4;
    dropped = c4.dropped;
  } else {
    rows = await res.denseRows(steps, ratio);
  }
  let ws: Uint16Array | DeviceBuffer | undefined;
  try {
    ws = res.takeWorkspace(steps);
    // kept ids are taken as they are: an await of them would only add event-loop turns before the launch
    const compressedIds = layout.compressedRows > 0 ? (res.keptCompressedIds(ratio as 4 | 128) ?? (await res.compressedIds(steps, ratio as 4 | 128))) : null;
    const swaIds = layout.swaRows > 0 ? (res.keptSwaIds() ?? (await res.swaIds(steps))) : null;
    cachesAttached(call);
    for (const job of dequantJobs(call, ws, compressedIds, swaIds)) await steps.dequantizeKCacheInto(job);
    const r = await steps.prefill(prefillJob(call, ws, rows), output);
    // { dropped: 'later' } on a device: the count is the plan's to wait for (settleDropped)
    if (call.droppedLater && c4 !== undefined && steps.memory === 'device') return layerResult(call, r, call.layout.bytes, res.countLater(dropped));
    return layerResult(call, r, call.layout.bytes, await dropped);
  } catch (e) {
    await dropped.catch(() => undefined);
    throw e;
  } finally {
    if (ws !== undefined) res.giveBackWorkspace(ws);
    if (c4) res.giveBackC4Rows(c4);
  }
}

/**
 * The layer's host caches still have their memory when its dequant comes to read them, after the
 * layer's awaits (a cache is read while the layer runs: README "Memory a call owns"): one detached
 * or shrunk since the call is INVALID_VALUE naming it, as the layer's argument, before the dequant.
 */
function cachesAttached({ caches, ratio }: LayerCall): void {
  const { swa, compressed } = caches;
  if (ArrayBuffer.isView(swa.data) && swa.data.byteLength !== swa.bytes) detached('caches.swa.data', 'after the layer was called');
  if (compressed !== undefined && ArrayBuffer.isView(compressed.data) && compressed.data.byteLength !== compressed.bytes) detached(`caches.c${ratio}.data`, 'after the layer was called');
}

/** A layer's dequants into its workspace: the compressed rows first, then the SWA rows (null ids: none of that kind). */
function dequantJobs<B>({ layout, caches }: LayerCall, workspace: Uint16Array | B, compressedIds: BigInt64Array | B | null, swaIds: BigInt64Array | B | null): WorkspaceDequantizeJob<B>[] {
  return workspaceDequants(caches as { swa: CacheView<B>; compressed?: CacheView<B> }, workspace, compressedIds, layout.compressedRows, swaIds, layout.swaRows);
}

/** A layer's sparsePrefill over its workspace rows. */
function prefillJob({ plan, layout, q, hQ, attnSink, smScale }: LayerCall, workspace: Uint16Array | DeviceBuffer, rows: LayerRows<DeviceBuffer>): WorkspacePrefillJob<DeviceBuffer> {
  return { q: q.data, workspace, rows: layout.rows, indices: rows.rows, lengths: rows.lens, attnSink: attnSink === undefined ? null : attnSink.data, numQueries: plan.numQueries, hQ, width: rows.width, smScale };
}

/** A layer's result: its outputs as tensors of the layer's shape, where they were made. */
function layerResult({ plan, hQ, route }: LayerCall, r: { out: Uint16Array | DeviceBuffer; lse: Float32Array | DeviceBuffer; maxLogits: Float32Array | DeviceBuffer }, workspaceBytes: number, dropped: number | null): LayerResult {
  const nq = plan.numQueries;
  return {
    path: route.path,
    reason: route.reason,
    out: placedTensor('bf16', [nq, hQ, WORKSPACE_ROW_DIMS], r.out),
    lse: placedTensor('float32', [nq, hQ], r.lse),
    maxLogits: placedTensor('float32', [nq, hQ], r.maxLogits),
    workspaceBytes,
    dropped,
  };
}

/**
 * A queued layer's result (layerResult for outputs the steps made on the device): device tensors
 * over shapes the plan keeps frozen for the layer's hQ, the object frozen as placedTensor freezes one.
 */
function queuedLayerResult({ hQ, route, layout }: LayerCall, res: LayerResources<DeviceBuffer>, r: QueuedLayerOutput<DeviceBuffer>, dropped: number | null): PrefillLayerResult<'device', number | null> {
  const shapes = res.outputShapes(hQ);
  return {
    path: route.path,
    reason: route.reason,
    out: Object.freeze({ dtype: 'bf16', shape: shapes[0], data: r.out }),
    lse: Object.freeze({ dtype: 'float32', shape: shapes[1], data: r.lse }),
    maxLogits: Object.freeze({ dtype: 'float32', shape: shapes[1], data: r.maxLogits }),
    workspaceBytes: layout.bytes,
    dropped,
  };
}
