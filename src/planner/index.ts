/** The planner (SPEC §6), the layer API and the router (SPEC §7). */
export { createPlan, Plan, DEFAULT_WORKSPACE_BUDGET_BYTES } from './plan.js';
export { swaTokenIdsFromTable, swaGatherLength, requestVisible, combinedWidth, DEFAULT_WINDOW, DEFAULT_ALIGN, WORKSPACE_ROW_DIMS } from './chunk_geometry.js';
export { prefillLayer, type PrefillLayerResult } from './prefill_layer.js';
export type { PrefillLayerArgs, PrefillLayerOptions } from './prefill_layer_checks.js';
export { createShardedPlan, prefillLayerSharded, ShardedPlan, type Shard, type ShardSplit, type ShardedPlanOptions, type ShardedLayerArgs, type ShardedLayerResult, type ShardResult } from './sharded_layer.js';
export { routePrefill, DEFAULT_SPARSE_PREFILL_THRESHOLD, SPARSE_PREFILL_THRESHOLDS, SPARSE_PREFILL_ENV } from './router.js';
export type {
  ChunkRequest,
  CombinedRows,
  CompressRatio,
  IdList,
  PagedForm,
  PlanCaches,
  PlanChunk,
  PlanOptions,
  PlanRequestLayout,
  PlanDeviceStats,
  PlanStats,
  PrefillPath,
  PrefillPathChoice,
  RouteDecision,
  RouteOptions,
  WorkspaceLayout,
} from './types.js';
