/** sparse-mla: DeepSeek-V4-style sparse-prefill MLA attention for Node.js. */
export type * from './types.js';
export { SparseMlaError, type ErrorCode } from './errors.js';
export { tensor, numel, float32ToBf16Bits, bf16BitsToFloat32, toBf16, bf16ToFloat32 } from './tensor.js';
export { createEngine } from './engine.js';
export { createKvCache, kvCacheBytes, type KvCacheGeometry } from './ops/kv_cache.js';
export { listBackends, type BackendInfo } from './backends/registry.js';
export * from './planner/index.js';
