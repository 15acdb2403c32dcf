/**
 * createEngine: picks a backend (registry), then for every call validates and normalizes the
 * arguments once (src/ops/, before any work) and hands the job to the backend. The main thread
 * never does the math.
 */
import { SparseMlaError, fail } from './errors.js';
import { tensor } from './tensor.js';
import type {
  BackendName,
  DequantizeKCacheArgs,
  Engine,
  EngineOptions,
  PagedSparseAttentionArgs,
  PagedSparseAttentionResult,
  QuantizeKCacheArgs,
  SparsePrefillArgs,
  SparsePrefillResult,
  Tensor,
} from './types.js';
import type { Backend } from './backends/backend.js';
import { createBackend, resolveBackendChoice } from './backends/registry.js';
import { describe } from './ops/common.js';
import { prepareDequantizeKCache, prepareQuantizeKCache } from './ops/kv_cache.js';
import { preparePagedSparseAttention } from './ops/paged_sparse_attention.js';
import { prepareSparsePrefill } from './ops/sparse_prefill.js';

/** Upper bound on the worker option (far above any core count; guards typos like 1e6). */
export const MAX_WORKERS = 1024;

class SparseMlaEngine implements Engine {
  readonly backend: BackendName;
  readonly workers: number;
  private readonly impl: Backend;
  private disposed = false;

  constructor(impl: Backend) {
    this.impl = impl;
    this.backend = impl.name;
    this.workers = impl.workers;
  }

  private alive(): void {
    if (this.disposed) throw new SparseMlaError('DISPOSED', 'the engine was disposed; create a new one with createEngine()', 'engine');
  }

  async quantizeKCache(args: QuantizeKCacheArgs): Promise<void> {
    this.alive();
    await this.impl.quantizeKCache(prepareQuantizeKCache(args));
  }

  async dequantizeKCachePaged(args: DequantizeKCacheArgs): Promise<Tensor<'bf16'>> {
    this.alive();
    const job = prepareDequantizeKCache(args);
    return tensor('bf16', [job.n, job.rowDim], await this.impl.dequantizeKCache(job));
  }

  async sparsePrefill(args: SparsePrefillArgs): Promise<SparsePrefillResult> {
    this.alive();
    const job = prepareSparsePrefill(args);
    const r = await this.impl.sparsePrefill(job);
    return {
      out: tensor('bf16', [job.sQ, job.hQ, job.dV], r.out),
      maxLogits: tensor('float32', [job.sQ, job.hQ], r.maxLogits),
      lse: tensor('float32', [job.sQ, job.hQ], r.lse),
    };
  }

  async pagedSparseAttention(args: PagedSparseAttentionArgs): Promise<PagedSparseAttentionResult> {
    this.alive();
    const job = preparePagedSparseAttention(args);
    const r = await this.impl.pagedSparseAttention(job);
    return {
      out: tensor('bf16', [job.n, job.hQ, 512], r.out),
      lse: tensor('float32', [job.n, job.hQ], r.lse),
      maxLogits: tensor('float32', [job.n, job.hQ], r.maxLogits),
    };
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.impl.dispose();
  }
}

const internals = new WeakMap<Engine, Backend>();

/**
 * The backend object behind an engine — for tests and diagnostics (e.g. the wasm backend's pool
 * and its testing hooks). Not part of the public API.
 */
export function engineBackend(engine: Engine): Backend | undefined {
  return internals.get(engine);
}

/** Creates an engine on the requested backend (option, else SPARSE_MLA_BACKEND, else auto). */
export async function createEngine(options: EngineOptions = {}): Promise<Engine> {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) fail('INVALID_VALUE', 'options', 'an EngineOptions object', describe(options));
  const choice = resolveBackendChoice(options.backend);
  const workers = options.workers;
  if (workers !== undefined && (typeof workers !== 'number' || !Number.isSafeInteger(workers) || workers < 1 || workers > MAX_WORKERS)) {
    fail('INVALID_VALUE', 'workers', `an integer in [1, ${MAX_WORKERS}]`, describe(workers));
  }
  const impl = await createBackend(choice, workers === undefined ? {} : { workers });
  const engine = new SparseMlaEngine(impl);
  internals.set(engine, impl);
  return engine;
}
