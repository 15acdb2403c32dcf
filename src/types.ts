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

/**
 * Memory on the GPU owned by a cuda engine (engine.upload / alloc, or an op with
 * `{ output: 'device' }`). free() releases it now (ops already queued still finish with it); an
 * unreachable buffer is freed by the garbage collector too. Host↔device copies happen only in
 * engine.upload / engine.download (and inside an op given host tensors).
 */
export interface DeviceBuffer {
  readonly device: 'cuda';
  /** the CUDA device it lives on (an engine's `device`) */
  readonly deviceIndex: number;
  readonly byteLength: number;
  readonly freed: boolean;
  free(): void;
}

/** A dense row-major tensor in device memory. */
export interface DeviceTensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly data: DeviceBuffer;
}

/** Where an op's outputs go: host typed arrays (default) or device tensors (cuda only). */
export type Placement = 'host' | 'device';

export interface OutputOptions<P extends Placement = Placement> {
  output?: P;
}

/** A host tensor for 'host', a device tensor for 'device'. */
export type PlacedTensor<D extends DType, P extends Placement> = P extends 'device' ? DeviceTensor<D> : Tensor<D>;

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

/** A KV cache whose bytes live in device memory (engine.uploadKvCache). */
export interface DeviceKvCache {
  readonly format: CacheFormat;
  readonly pageSize: number;
  readonly numPages: number;
  readonly data: DeviceBuffer;
}

/**
 * An op's arguments with any tensor or cache allowed on the device (cuda engines). Device
 * indices must be int32; device topkLength values are clamped to [0, topk] instead of checked.
 */
export type OnDevice<A> = { [K in keyof A]: MaybeOnDevice<A[K]> };
/** A host tensor or cache type widened to also accept its device form (distributes over unions). */
export type MaybeOnDevice<T> = T extends Tensor<infer D> ? Tensor<D> | DeviceTensor<D> : T extends KvCache ? KvCache | DeviceKvCache : T;

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

export interface SparsePrefillResult<P extends Placement = 'host'> {
  /** bf16 [sQ, hQ, dV] */
  out: PlacedTensor<'bf16', P>;
  /** float32 [sQ, hQ] */
  maxLogits: PlacedTensor<'float32', P>;
  /** float32 [sQ, hQ] */
  lse: PlacedTensor<'float32', P>;
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

export interface PagedSparseAttentionResult<P extends Placement = 'host'> {
  out: PlacedTensor<'bf16', P>;
  lse: PlacedTensor<'float32', P>;
  maxLogits: PlacedTensor<'float32', P>;
}

export type BackendName = 'cuda' | 'cpu' | 'wasm';
export type BackendChoice = BackendName | 'auto';

export interface EngineOptions {
  /** 'auto' (default, or SPARSE_MLA_BACKEND): cuda, then cpu, then wasm. */
  backend?: BackendChoice;
  /** WASM worker-pool size; defaults to the machine's cores. */
  workers?: number;
  /**
   * Host memory one call may use beyond the caller's arrays — copies or staging of its inputs and
   * its outputs — in bytes; a call needing more is refused with TOO_LARGE before any work.
   * Default: half the machine's memory. On wasm it also caps the shared staging the engine keeps
   * and reuses for its calls' inputs.
   */
  memoryBudgetBytes?: number;
  /**
   * The CUDA device of a cuda engine (default SPARSE_MLA_DEVICE, else 0); its ops, buffers and
   * stream live there, and an op refuses another device's tensors. Ignored by the other backends.
   */
  device?: number;
}

export interface Engine {
  /** The backend that runs this engine's ops. */
  readonly backend: BackendName;
  /** Number of WASM workers (wasm backend), else 0/undefined. */
  readonly workers?: number;
  quantizeKCache(args: QuantizeKCacheArgs): Promise<void>;
  /** Device tensors and caches are accepted on a cuda engine; `{ output: 'device' }` keeps the result there. */
  dequantizeKCachePaged<P extends Placement = 'host'>(args: OnDevice<DequantizeKCacheArgs>, options?: OutputOptions<P>): Promise<PlacedTensor<'bf16', P>>;
  sparsePrefill<P extends Placement = 'host'>(args: OnDevice<SparsePrefillArgs>, options?: OutputOptions<P>): Promise<SparsePrefillResult<P>>;
  pagedSparseAttention<P extends Placement = 'host'>(args: OnDevice<PagedSparseAttentionArgs>, options?: OutputOptions<P>): Promise<PagedSparseAttentionResult<P>>;
  /** True when the engine has device memory (cuda): upload/download/uploadKvCache work. */
  readonly hasDevice: boolean;
  /**
   * The CUDA device index of a cuda engine, else undefined. (`| undefined` spelled out: every
   * engine has the property, so consumers compiling with exactOptionalPropertyTypes type-check.)
   */
  readonly device?: number | undefined;
  /**
   * Device tensors of another cuda engine (any device) copied onto this engine's device, after the
   * work queued on theirs: peer to peer where the GPUs allow it, through the host otherwise.
   */
  copyFrom<D extends DType>(t: DeviceTensor<D>): Promise<DeviceTensor<D>>;
  /**
   * Resolves once every op this engine queued has finished. A cuda op whose operands all stay on
   * the device resolves as soon as it is queued (its stream orders it before later ops and
   * downloads); await this to wait for the device (e.g. to time it). Other backends: at once.
   */
  synchronize(): Promise<void>;
  /** Copies a host tensor to the device (cuda engines; otherwise BACKEND_UNAVAILABLE). */
  upload<D extends DType>(t: Tensor<D>): Promise<DeviceTensor<D>>;
  /** Copies a host KV cache to the device (a snapshot: later host writes are not seen). */
  uploadKvCache(cache: KvCache): Promise<DeviceKvCache>;
  /** Copies a device tensor back into a new host tensor. */
  download<D extends DType>(t: DeviceTensor<D>): Promise<Tensor<D>>;
  /** End the workers / free device state so the process can exit. Idempotent. */
  dispose(): Promise<void>;
}
