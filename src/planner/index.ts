/** The planner (SPEC §6), the layer API and the router (SPEC §7). */
export { createPlan, Plan, swaTokenIdsFromTable, DEFAULT_WINDOW, DEFAULT_ALIGN, DEFAULT_WORKSPACE_BUDGET_BYTES, WORKSPACE_ROW_DIMS } from './plan.js';
export { prefillLayer, type PrefillLayerArgs, type PrefillLayerOptions, type PrefillLayerResult } from './prefill_layer.js';
export { createShardedPlan, prefillLayerSharded, ShardedPlan, type Shard, type ShardSplit, type ShardedPlanOptions, type ShardedLayerArgs, type ShardedLayerResult, type ShardResult } from './sharded_layer.js';
export { routePrefill, DEFAULT_SPARSE_PREFILL_THRESHOLD, SPARSE_PREFILL_THRESHOLDS, SPARSE_PREFILL_ENV } from './router.js';
export { swaGatherLength, requestVisible, combinedWidth } from './plan.js';
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
