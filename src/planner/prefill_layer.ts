/**
 * prefillLayer: one attention layer of a prefill chunk through its plan, down the path the router
 * picks. Workspace path: dequantize the layer's compressed rows and SWA gather into the plan's
 * workspace (the buffer and the index rows are reused across layers; the dequant runs per layer
 * because every layer has its own caches), then sparsePrefill over the combined rows. Paged path:
 * pagedSparseAttention straight over the layer's caches with the plan's paged form of the same rows.
 *
 * With a cuda engine the workspace path stays on the GPU: the chunk-invariant c0 / c128 rows are
 * built on the GPU (planRows, dense_row) once per plan and engine, the compressed flat token ids
 * of each ratio are built on the GPU from the page tables (planCompressedTokenIds,
 * compressed_token_id) once per plan and engine — the page tables are range-checked against the
 * caches by plan.checkCaches — the SWA gather ids are uploaded and range-checked once per plan
 * and engine, a c4
 * layer's rows are combined on the GPU (planRows, from a
 * host or device top-k), the workspace is one device buffer per plan and engine that dequant writes
 * into and sparsePrefill reads, and q, caches and (with { output: 'device' }) the results may be
 * device tensors — nothing comes back to the host between layers. With device inputs and outputs
 * the layer's launches are queued back to back on the engine's stream with no host round trip;
 * only a c4 layer's dropped counts come back, read while the rest of the layer runs, and the call
 * resolves once they are in (device outputs are then queued, not necessarily finished: a download
 * or engine.synchronize() waits for them).
 */
import { fail } from '../errors.js';
import { checkArgsObject, checkPlacedTensor, checkRank, checkTensor, describe, INT32_MAX, isDeviceTensor } from '../ops/common.js';
import { prepareDequantizeKCache } from '../ops/kv_cache.js';
import { tensor } from '../tensor.js';
import { engineBackend } from '../engine.js';
import type { DeviceBuffer, DeviceKvCache, DeviceTensor, Engine, KvCache, OutputOptions, Placement, Tensor } from '../types.js';
import type { DequantizeKCacheJob } from '../backends/backend.js';
import { combinedWidth } from './core.js';
import { Plan, WORKSPACE_ROW_DIMS } from './plan.js';
import { routePrefill } from './router.js';
import type { CombinedRows, PrefillLayerArgs, PrefillLayerResult } from './types.js';

/** The cuda backend's device planner ops (src/backends/native/cuda_backend.ts), found by shape. */
interface DevicePlannerOps {
  alloc(bytes: number): DeviceBuffer;
  upload(data: ArrayBufferView): Promise<DeviceBuffer>;
  download(buffer: DeviceBuffer, into: ArrayBufferView): Promise<void>;
  dequantizeKCacheIdsInto(cache: { format: 'v4' | 'v32'; pageSize: number; numPages: number; data: Uint8Array | DeviceBuffer }, tokenIds: DeviceBuffer, n: number, out: DeviceBuffer, rowOffset: number): Promise<void>;
  planCompressedTokenIds(
    args: { seqLens: Int32Array; extendLens: Int32Array; ratio: 4 | 128; pageTables: Int32Array | DeviceBuffer; pageTableOffsets: ArrayLike<number>; pageSize: number },
    placement: Placement,
  ): Promise<BigInt64Array | DeviceBuffer>;
  planRows(
    args: { seqLens: Int32Array; extendLens: Int32Array; window: number; ratio: number; topkIndices: Int32Array | DeviceBuffer | null; topk: number; width: number },
    placement: Placement,
    droppedPlacement: Placement,
  ): Promise<{ rows: Int32Array | DeviceBuffer; lens: Int32Array | DeviceBuffer; dropped: Int32Array | DeviceBuffer }>;
}

function devicePlanner(engine: Engine): DevicePlannerOps | null {
  if (engine.backend !== 'cuda' || !engine.hasDevice) return null;
  const b = engineBackend(engine) as Partial<DevicePlannerOps> | undefined;
  return b && typeof b.planRows === 'function' && typeof b.planCompressedTokenIds === 'function' && typeof b.dequantizeKCacheIdsInto === 'function' && typeof b.alloc === 'function' && typeof b.upload === 'function' && typeof b.download === 'function' ? (b as DevicePlannerOps) : null;
}

function checkOutputOption(options: unknown): Placement {
  if (options === undefined) return 'host';
  checkArgsObject(options, 'options');
  const o = (options as OutputOptions).output;
  if (o === undefined || o === 'host' || o === 'device') return o ?? 'host';
  fail('INVALID_VALUE', 'options.output', '"host" or "device"', describe(o));
}

export async function prefillLayer<P extends Placement = 'host'>(engine: Engine, args: PrefillLayerArgs, options?: OutputOptions<P>): Promise<PrefillLayerResult<P>> {
  if (typeof engine !== 'object' || engine === null || typeof engine.sparsePrefill !== 'function') {
    fail('INVALID_VALUE', 'engine', 'an Engine from createEngine()', describe(engine));
  }
  checkArgsObject(args, 'args');
  const { plan, compressRatio: ratio, smScale } = args;
  if (!(plan instanceof Plan)) fail('INVALID_VALUE', 'plan', 'a Plan from createPlan()', describe(plan));
  if (ratio !== 0 && ratio !== 4 && ratio !== 128) fail('INVALID_VALUE', 'compressRatio', '0, 4 or 128', describe(ratio));
  if (!plan.ratios.includes(ratio)) {
    fail('INVALID_VALUE', 'compressRatio', `a ratio the plan serves (${plan.ratios.join(', ')})`, `${ratio}; pass chunk.c${ratio}PageSize and page tables to createPlan`);
  }
  const output = checkOutputOption(options);
  const dev = devicePlanner(engine);
  if (!dev && output === 'device') fail('BACKEND_UNAVAILABLE', 'options.output', "a cuda engine for { output: 'device' }", `the ${engine.backend} backend`);
  const q = dev ? checkPlacedTensor(args.q, 'q', ['bf16']) : checkTensor(args.q, 'q', ['bf16']);
  const [nq, hQ, dQK] = checkRank(q, 'q', 3, '[numQueries, hQ, 512]');
  if (nq !== plan.numQueries || dQK !== WORKSPACE_ROW_DIMS) {
    fail('INVALID_SHAPE', 'q', `[numQueries = ${plan.numQueries}, hQ, ${WORKSPACE_ROW_DIMS}]`, `[${q.shape.join(', ')}]`);
  }
  if (typeof smScale !== 'number' || !Number.isFinite(smScale)) fail('INVALID_VALUE', 'smScale', 'a finite number', describe(smScale));
  const attnSink = args.attnSink === undefined ? undefined : checkTensor(args.attnSink, 'attnSink', ['float32']);
  if (attnSink && (attnSink.shape.length !== 1 || attnSink.shape[0] !== hQ)) {
    fail('INVALID_SHAPE', 'attnSink', `[hQ = ${hQ}]`, `[${attnSink.shape.join(', ')}]`);
  }
  if (ratio === 4) {
    if (args.topkIndices === undefined) fail('INVALID_VALUE', 'topkIndices', 'the indexer top-k int32 [numQueries, topk] of a c4 layer', 'undefined');
  } else if (args.topkIndices !== undefined) {
    fail('INVALID_VALUE', 'topkIndices', `nothing for a ratio-${ratio} layer (only c4 layers have an indexer)`, describe(args.topkIndices));
  }
  const caches = plan.checkCaches(args.caches, ratio);
  const route = routePrefill(nq, { ...(args.path !== undefined ? { path: args.path } : {}), ...(args.threshold !== undefined ? { threshold: args.threshold } : {}), ...(args.env ? { env: args.env } : {}), backend: engine.backend, compressRatio: args.compressRatio });

  if (dev && route.path === 'sparse' && nq > 0) {
    return (await devicePrefillLayer(engine, dev, plan, ratio, q, caches, args, attnSink, smScale, output, route)) as PrefillLayerResult<P>;
  }
  // The paged path on a cuda engine with a device top-k: the plan's host combine needs the values.
  const topkHost =
    ratio === 4 && isDeviceTensor(checkPlacedTensor(args.topkIndices, 'topkIndices', ['int32'])) ? await engine.download(args.topkIndices as DeviceTensor<'int32'>) : args.topkIndices;
  // Index rows: chunk-invariant for ratios 0 / 128 (built once by the plan), per layer for c4.
  const rows: CombinedRows =
    ratio === 4 ? plan.combineC4(topkHost as Tensor<'int32'>) : plan.combinedRows(ratio);

  if (nq === 0) {
    const empty = { out: tensor('bf16', [0, hQ, WORKSPACE_ROW_DIMS]), lse: tensor('float32', [0, hQ]), maxLogits: tensor('float32', [0, hQ]) };
    if (output === 'device') {
      return { ...route, out: await engine.upload(empty.out), lse: await engine.upload(empty.lse), maxLogits: await engine.upload(empty.maxLogits), workspaceBytes: 0, dropped: rows.dropped } as PrefillLayerResult<P>;
    }
    return { ...route, ...empty, workspaceBytes: 0, dropped: rows.dropped } as PrefillLayerResult<P>;
  }

  if (route.path === 'paged') {
    const paged = plan.pagedForm(rows);
    const extra = ratio !== 0 && paged.extra !== undefined;
    const r = await engine.pagedSparseAttention({
      q,
      kCache: caches.swa,
      indices: paged.main,
      topkLength: paged.mainLengths,
      ...(extra ? { extraKCache: caches.compressed!, extraIndices: paged.extra!, extraTopkLength: paged.extraLengths! } : {}),
      ...(attnSink ? { attnSink } : {}),
      smScale,
    }, { output });
    return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: 0, dropped: rows.dropped } as PrefillLayerResult<P>;
  }

  const layout = plan.layout(ratio);
  const rowElems = WORKSPACE_ROW_DIMS;
  const ws = plan.acquireWorkspace();
  try {
    const kvData = ws.subarray(0, layout.rows * rowElems);
    if (layout.compressedRows > 0) {
      const c = await engine.dequantizeKCachePaged({ cache: caches.compressed!, tokenIds: plan.compressedTokenIds(ratio as 4 | 128) });
      kvData.set(c.data, 0);
    }
    if (layout.swaRows > 0) {
      const s = await engine.dequantizeKCachePaged({ cache: caches.swa, tokenIds: plan.swaTokenIds });
      kvData.set(s.data, layout.compressedRows * rowElems);
    }
    const r = await engine.sparsePrefill({
      q,
      kv: tensor('bf16', [layout.rows, rowElems], kvData),
      indices: rows.indices,
      topkLength: rows.lengths,
      ...(attnSink ? { attnSink } : {}),
      smScale,
    });
    return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: layout.bytes, dropped: rows.dropped } as PrefillLayerResult<P>;
  } finally {
    plan.releaseWorkspace(ws);
  }
}

interface DeviceRows {
  indices: DeviceTensor<'int32'>;
  lengths: DeviceTensor<'int32'>;
}

/**
 * The workspace path on the GPU (see the file comment). Rows are the same as the host path's: all
 * come from the same per-row code (planner.h: dense_row for c0 / c128, built once and cached;
 * topk_row for c4, per layer) in a kernel.
 */
async function devicePrefillLayer(
  engine: Engine,
  dev: DevicePlannerOps,
  plan: Plan,
  ratio: 0 | 4 | 128,
  q: Tensor<'bf16'> | DeviceTensor<'bf16'>,
  caches: { swa: KvCache | DeviceKvCache; compressed?: KvCache | DeviceKvCache },
  args: PrefillLayerArgs,
  attnSink: Tensor<'float32'> | undefined,
  smScale: number,
  output: Placement,
  route: { path: 'sparse' | 'paged'; reason: string },
): Promise<PrefillLayerResult<Placement>> {
  const res = plan.deviceResources(engine);
  const nq = plan.numQueries;
  let rows: DeviceRows;
  let dropped = 0;
  let droppedRead: Promise<void> = Promise.resolve();
  const temps: DeviceBuffer[] = [];
  if (ratio === 4) {
    const t = checkPlacedTensor(args.topkIndices, 'topkIndices', ['int32']);
    const shape = t.shape.length === 3 && t.shape[1] === 1 ? [t.shape[0]!, t.shape[2]!] : t.shape;
    if (shape.length !== 2 || shape[0] !== nq) fail('INVALID_SHAPE', 'topkIndices', `[numQueries = ${nq}, topk]`, `[${t.shape.join(', ')}]`);
    const topk = shape[1]!;
    const width = combinedWidth(4, topk, 0, plan.window, plan.align);
    if (nq * width > INT32_MAX) fail('TOO_LARGE', 'topkIndices', `c4 index rows of at most ${INT32_MAX} entries`, `${nq} × ${width}`);
    const { seqLens, extendLens } = plan.chunkLengths();
    const r = await dev.planRows({ seqLens, extendLens, window: plan.window, ratio: 4, topkIndices: t.data as Int32Array | DeviceBuffer, topk, width }, 'device', 'device');
    // The dropped counts come back while the rest of the layer is queued behind the combine.
    const perQuery = new Int32Array(nq);
    const droppedBuf = r.dropped as DeviceBuffer;
    droppedRead = dev.download(droppedBuf, perQuery).then(
      () => {
        droppedBuf.free();
        for (let i = 0; i < nq; i++) dropped += perQuery[i]!;
        plan.stats.c4Dropped += dropped;
      },
      (e: unknown) => {
        droppedBuf.free();
        throw e;
      },
    );
    plan.stats.c4Combines++;
    plan.deviceStats.deviceC4Combines++;
    rows = {
      indices: { dtype: 'int32', shape: [nq, width], data: r.rows as DeviceBuffer },
      lengths: { dtype: 'int32', shape: [nq], data: r.lens as DeviceBuffer },
    };
    temps.push(r.rows as DeviceBuffer, r.lens as DeviceBuffer);
  } else {
    const key = `rows${ratio}`;
    let have = res.get(key) as DeviceRows | undefined;
    if (!have || have.indices.data.freed || have.lengths.data.freed) {
      const width = plan.denseWidth(ratio);
      const { seqLens, extendLens } = plan.chunkLengths();
      const r = await dev.planRows({ seqLens, extendLens, window: plan.window, ratio, topkIndices: null, topk: 0, width }, 'device', 'host');
      have = {
        indices: { dtype: 'int32', shape: [nq, width], data: r.rows as DeviceBuffer },
        lengths: { dtype: 'int32', shape: [nq], data: r.lens as DeviceBuffer },
      };
      if (ratio === 0) plan.deviceStats.deviceC0Builds++;
      else plan.deviceStats.deviceC128Builds++;
      res.set(key, have);
    }
    rows = have;
  }

  // The device workspace: one per plan and engine at the plan's largest layout; a concurrent layer
  // takes a fresh one rather than sharing.
  let ws = res.get('workspace') as DeviceBuffer | undefined;
  res.delete('workspace');
  if (!ws || ws.freed) {
    ws = dev.alloc(plan.workspaceBytes);
    plan.deviceStats.deviceWorkspaceAllocations++;
  }
  const layout = plan.layout(ratio);
  try {
    if (layout.compressedRows > 0) {
      const ids = await deviceCompressedIds(dev, plan, res, ratio as 4 | 128);
      await dev.dequantizeKCacheIdsInto(caches.compressed!, ids, layout.compressedRows, ws, 0);
    }
    if (layout.swaRows > 0) {
      const ids = await deviceTokenIds(dev, plan, res, 'idsSwa', plan.swaTokenIds, caches.swa);
      await dev.dequantizeKCacheIdsInto(caches.swa, ids, layout.swaRows, ws, layout.compressedRows);
    }
    // kv is the whole buffer; the rows index only [0, layout.rows), the rest is never read.
    const r = await engine.sparsePrefill(
      {
        q,
        kv: { dtype: 'bf16', shape: [plan.workspaceBytes / (2 * WORKSPACE_ROW_DIMS), WORKSPACE_ROW_DIMS], data: ws },
        indices: rows.indices,
        topkLength: rows.lengths,
        ...(attnSink ? { attnSink } : {}),
        smScale,
      },
      { output },
    );
    await droppedRead;
    return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: layout.bytes, dropped };
  } catch (e) {
    await droppedRead.catch(() => undefined);
    throw e;
  } finally {
    if (!res.has('workspace')) res.set('workspace', ws);
    else ws.free();
    for (const b of temps) b.free();
  }
}

/**
 * A ratio's compressed flat token ids (int64) built on the device from the plan's page tables
 * (planCompressedTokenIds: the host planner's compressed_token_id per entry), once per plan and
 * engine. No host-built ids are uploaded; the page tables were checked against this layer's cache
 * by plan.checkCaches (every page id ≤ the plan's largest, below the cache's page count), so every
 * id is in range, and the dequant kernel checks every id again.
 */
async function deviceCompressedIds(dev: DevicePlannerOps, plan: Plan, res: Map<string, unknown>, ratio: 4 | 128): Promise<DeviceBuffer> {
  const key = `ids${ratio}`;
  const have = res.get(key) as DeviceBuffer | undefined;
  if (have && !have.freed) return have;
  const { seqLens, extendLens } = plan.chunkLengths();
  const t = plan.compressedPageTables(ratio);
  const buf = (await dev.planCompressedTokenIds({ seqLens, extendLens, ratio, pageTables: t.pageTables, pageTableOffsets: t.pageTableOffsets, pageSize: t.pageSize }, 'device')) as DeviceBuffer;
  plan.deviceStats.deviceCompressedIdBuilds++;
  res.set(key, buf);
  return buf;
}

/**
 * A plan's dequant token ids (int64) on the device, uploaded once per plan and engine. They are
 * range-checked here, once, against the cache of the layer that uploads them (the shared
 * validation, prepareDequantizeKCache); later layers' caches are checked by plan.checkCaches
 * against the plan's largest ids (O(1) per layer). The kernel checks every id again and never
 * reads outside the cache.
 */
async function deviceTokenIds(
  dev: DevicePlannerOps,
  plan: Plan,
  res: Map<string, unknown>,
  key: string,
  ids: Tensor<'int64'>,
  cache: KvCache | DeviceKvCache,
): Promise<DeviceBuffer> {
  const have = res.get(key) as DeviceBuffer | undefined;
  if (have && !have.freed) return have;
  prepareDequantizeKCache({ cache, tokenIds: ids });
  const data = ids.data as BigInt64Array;
  const buf = await dev.upload(data);
  plan.deviceStats.deviceUploads++;
  res.set(key, buf);
  return buf;
}
