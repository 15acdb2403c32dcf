/** The public data types of sparse-mla. Backends, validation and the CLI all speak these. */

export type DType = 'bf16' | 'float32' | 'int32' | 'int64' | 'uint8';

export interface DTypeArrays {
  bf16: Uint16Array; // raw bf16 bit patterns
  float32: Float32Array;
  int32: Int32Array;
  int64: BigInt64Array;
  uint8: Uint8Array;
}

/** A dense row-major host tensor. */
export interface Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly data: DTypeArrays[D];
}

export type CacheFormat = 'v4' | 'v32';

/**
 * An FP8 KV cache (SPEC §3). v4: `numPages` pages of `pageSize` tokens, each page
 * roundUp(pageSize * 584, 576) bytes. v32: contiguous 656-byte tokens; `pageSize` is 1 and
 * `numPages` is the number of tokens.
 */
export interface KvCache {
  readonly format: CacheFormat;
  readonly pageSize: number;
  readonly numPages: number;
  readonly data: Uint8Array;
}

/** Token ids for the cache ops: int32 or int64 tensors of shape [n], or a plain array. */
export type TokenIds = Tensor<'int32'> | Tensor<'int64'> | readonly number[];

export interface QuantizeKCacheArgs {
  cache: KvCache;
  tokenIds: TokenIds;
  /** [n, 512] (v4) or [n, 576] (v32), bf16 or float32. */
  rows: Tensor<'bf16'> | Tensor<'float32'>;
}

export interface DequantizeKCacheArgs {
  cache: KvCache;
  tokenIds: TokenIds;
}

export interface SparsePrefillArgs {
  /** bf16 [sQ, hQ, dQK] */
  q: Tensor<'bf16'>;
  /** bf16 [sKV, dQK] (one KV head) */
  kv: Tensor<'bf16'>;
  /** int32 or int64 [sQ, topk] (or [sQ, 1, topk]) */
  indices: Tensor<'int32'> | Tensor<'int64'>;
  smScale: number;
  /** defaults to 512 */
  dV?: number;
  /** float32 [hQ] */
  attnSink?: Tensor<'float32'>;
  /** int32 [sQ] */
  topkLength?: Tensor<'int32'>;
}

export interface SparsePrefillResult {
  /** bf16 [sQ, hQ, dV] */
  out: Tensor<'bf16'>;
  /** float32 [sQ, hQ] */
  maxLogits: Tensor<'float32'>;
  /** float32 [sQ, hQ] */
  lse: Tensor<'float32'>;
}

export interface PagedSparseAttentionArgs {
  /** bf16 [n, hQ, 512] */
  q: Tensor<'bf16'>;
  /** a v4 cache */
  kCache: KvCache;
  /** int32 [n, topk] (or [n, 1, topk]) token ids into kCache */
  indices: Tensor<'int32'>;
  topkLength?: Tensor<'int32'>;
  /** a second v4 cache (its own page size), e.g. the compressed entries */
  extraKCache?: KvCache;
  extraIndices?: Tensor<'int32'>;
  extraTopkLength?: Tensor<'int32'>;
  attnSink?: Tensor<'float32'>;
  smScale: number;
  dV?: number;
}

export interface PagedSparseAttentionResult {
  out: Tensor<'bf16'>;
  lse: Tensor<'float32'>;
  maxLogits: Tensor<'float32'>;
}

export type BackendName = 'cuda' | 'cpu' | 'wasm';
export type BackendChoice = BackendName | 'auto';

export interface EngineOptions {
  /** 'auto' (default, or SPARSE_MLA_BACKEND): cuda, then cpu, then wasm. */
  backend?: BackendChoice;
  /** WASM worker-pool size; defaults to the machine's cores. */
  workers?: number;
}

export interface Engine {
  /** The backend that runs this engine's ops. */
  readonly backend: BackendName;
  /** Number of WASM workers (wasm backend), else 0/undefined. */
  readonly workers?: number;
  quantizeKCache(args: QuantizeKCacheArgs): Promise<void>;
  dequantizeKCachePaged(args: DequantizeKCacheArgs): Promise<Tensor<'bf16'>>;
  sparsePrefill(args: SparsePrefillArgs): Promise<SparsePrefillResult>;
  pagedSparseAttention(args: PagedSparseAttentionArgs): Promise<PagedSparseAttentionResult>;
  /** End the workers / free device state so the process can exit. Idempotent. */
  dispose(): Promise<void>;
}
