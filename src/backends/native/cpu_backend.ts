/**
 * The `cpu` backend: the C++ core built natively for this machine (AVX2+FMA where it has them),
 * run by the addon on its own threads split by query rows (token rows for the cache ops), never on
 * the event loop. Inputs are passed as they are (the addon pins them for the call; no copies);
 * outputs are allocated here, so they are ordinary JS-owned typed arrays.
 */
import { AddonCalls } from './addon_calls.js';
import { SparseMlaError } from '../../errors.js';
import type {
  Backend,
  BackendEntry,
  BackendProbe,
  DequantizeKCacheJob,
  PagedSparseAttentionJob,
  PagedSparseAttentionOutput,
  QuantizeKCacheJob,
  SparsePrefillJob,
  SparsePrefillOutput,
} from '../backend.js';
import { defaultWorkerCount } from '../wasm/wasm_backend.js';
import { CACHE_FORMAT_CODE, ROWS_DTYPE_CODE, loadNativeAddon, type NativeAddon } from './binding.js';

/**
 * Smallest work (flop-equivalents) worth a thread of its own: starting and joining a thread costs
 * tens of microseconds, about what a core does with this much work.
 */
const MIN_THREAD_WORK = 4e6;

/** Threads for a call: the backend's count, no more than the rows or than the work justifies. */
export function threadsFor(workers: number, rows: number, workPerRow: number): number {
  return Math.max(1, Math.min(workers, rows, Math.floor((rows * workPerRow) / MIN_THREAD_WORK)));
}

/** Allocates an output, refusing (TOO_LARGE) what this process cannot hold. */
function alloc<T>(ctor: new (n: number) => T, n: number, argument: string): T {
  try {
    return new ctor(n);
  } catch (e) {
    throw new SparseMlaError('TOO_LARGE', `${argument}: an output of ${n} elements cannot be allocated (${(e as Error).message})`, argument);
  }
}

export class CpuBackend implements Backend {
  readonly name = 'cpu' as const;
  readonly workers: number;
  private readonly addon: NativeAddon;
  private readonly calls = new AddonCalls('cpu');

  constructor(addon: NativeAddon, workers: number) {
    this.addon = addon;
    this.workers = workers;
  }

  async sparsePrefill(job: SparsePrefillJob): Promise<SparsePrefillOutput> {
    const { sQ, hQ, dQK, dV, sKV, topk } = job;
    const out = alloc(Uint16Array, sQ * hQ * dV, 'out');
    const maxLogits = alloc(Float32Array, sQ * hQ, 'maxLogits');
    const lse = alloc(Float32Array, sQ * hQ, 'lse');
    const threads = threadsFor(this.workers, sQ, 2 * topk * hQ * (dQK + dV) + hQ * dV);
    await this.calls.run('sparsePrefill', () =>
      this.addon.cpu.sparsePrefill(threads, job.q, job.kv, job.indices, job.topkLength, job.attnSink, sQ, hQ, dQK, dV, sKV, topk, job.smScale, out, maxLogits, lse),
    );
    return { out, maxLogits, lse };
  }

  async pagedSparseAttention(job: PagedSparseAttentionJob): Promise<PagedSparseAttentionOutput> {
    const { n, hQ, main, extra } = job;
    const out = alloc(Uint16Array, n * hQ * 512, 'out');
    const lse = alloc(Float32Array, n * hQ, 'lse');
    const maxLogits = alloc(Float32Array, n * hQ, 'maxLogits');
    const entries = main.topk + (extra?.topk ?? 0);
    const threads = threadsFor(this.workers, n, 2 * entries * hQ * 1024 + entries * 1024 + hQ * 512);
    await this.calls.run('pagedSparseAttention', () =>
      this.addon.cpu.pagedSparseAttention(
        threads,
        job.q,
        n,
        hQ,
        main.cache.data,
        main.cache.pageSize,
        main.cache.numPages,
        main.indices,
        main.topk,
        main.topkLength,
        extra ? extra.cache.data : null,
        extra ? extra.cache.pageSize : 0,
        extra ? extra.cache.numPages : 0,
        extra ? extra.indices : null,
        extra ? extra.topk : 0,
        extra ? extra.topkLength : null,
        job.attnSink,
        job.smScale,
        out,
        lse,
        maxLogits,
      ),
    );
    return { out, lse, maxLogits };
  }

  async dequantizeKCache(job: DequantizeKCacheJob): Promise<Uint16Array> {
    const { cache, tokenIds, n, rowDim } = job;
    const out = alloc(Uint16Array, n * rowDim, 'out');
    const threads = threadsFor(this.workers, n, rowDim * 8);
    await this.calls.run('dequantizeKCachePaged', () =>
      this.addon.cpu.dequantizeKvCache(threads, CACHE_FORMAT_CODE[cache.format], cache.data, cache.pageSize, cache.numPages, tokenIds, n, out),
    );
    return out;
  }

  async quantizeKCache(job: QuantizeKCacheJob): Promise<void> {
    const { cache, tokenIds, n, rowDim, rows, rowsDtype } = job;
    const threads = threadsFor(this.workers, n, rowDim * 32);
    await this.calls.run('quantizeKCache', () =>
      this.addon.cpu.quantizeKvCache(threads, CACHE_FORMAT_CODE[cache.format], cache.data, cache.pageSize, cache.numPages, tokenIds, n, rows, ROWS_DTYPE_CODE[rowsDtype]),
    );
  }

  /** Later calls reject with DISPOSED; resolves once the calls in flight have settled. */
  dispose(): Promise<void> {
    return this.calls.dispose();
  }
}

export const cpuBackendEntry: BackendEntry = {
  name: 'cpu',
  priority: 20,
  async probe(): Promise<BackendProbe> {
    const l = loadNativeAddon();
    if (!l.ok) return { available: false, reason: l.reason, details: { addon: l.path } };
    const b = l.addon.build;
    return { available: true, details: { addon: l.path, addonOrigin: l.origin, simd: b.simd, cpuArch: b.cpuArch, defaultWorkers: defaultWorkerCount() } };
  },
  async create(options) {
    const l = loadNativeAddon();
    if (!l.ok) throw new SparseMlaError('BACKEND_UNAVAILABLE', `backend "cpu" is unavailable — ${l.reason}`, 'backend');
    return new CpuBackend(l.addon, options.workers ?? defaultWorkerCount());
  },
};
