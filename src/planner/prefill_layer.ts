/**
 * prefillLayer: one attention layer of a prefill chunk through its plan, down the path the router
 * picks. Workspace path: dequantize the layer's compressed rows and SWA gather into the plan's
 * workspace (the buffer and the index rows are reused across layers; the dequant runs per layer
 * because every layer has its own caches), then sparsePrefill over the combined rows. Paged path:
 * pagedSparseAttention straight over the layer's caches with the plan's paged form of the same rows.
 */
import { fail } from '../errors.js';
import { checkArgsObject, checkRank, checkTensor, describe } from '../ops/common.js';
import { tensor } from '../tensor.js';
import type { Engine, Tensor } from '../types.js';
import { Plan, WORKSPACE_ROW_DIMS } from './plan.js';
import { routePrefill } from './router.js';
import type { CombinedRows, PrefillLayerArgs, PrefillLayerResult } from './types.js';

export async function prefillLayer(engine: Engine, args: PrefillLayerArgs): Promise<PrefillLayerResult> {
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
  const q = checkTensor(args.q, 'q', ['bf16']);
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
  const route = routePrefill(nq, { ...(args.path !== undefined ? { path: args.path } : {}), ...(args.threshold !== undefined ? { threshold: args.threshold } : {}), ...(args.env ? { env: args.env } : {}), backend: engine.backend });

  // Index rows: chunk-invariant for ratios 0 / 128 (built once by the plan), per layer for c4.
  const rows: CombinedRows =
    ratio === 4 ? plan.combineC4(args.topkIndices as Tensor<'int32'>) : plan.combinedRows(ratio);

  if (nq === 0) {
    return {
      ...route,
      out: tensor('bf16', [0, hQ, WORKSPACE_ROW_DIMS]),
      lse: tensor('float32', [0, hQ]),
      maxLogits: tensor('float32', [0, hQ]),
      workspaceBytes: 0,
      dropped: rows.dropped,
    };
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
    });
    return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: 0, dropped: rows.dropped };
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
    return { ...route, out: r.out, lse: r.lse, maxLogits: r.maxLogits, workspaceBytes: layout.bytes, dropped: rows.dropped };
  } finally {
    plan.releaseWorkspace(ws);
  }
}
