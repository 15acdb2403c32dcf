/**
 * The C ABI's ops (cpp/include/sparse_mla/sparse_mla.h) as the TS side knows them: each op's
 * params struct, field by field in struct order, with what a field holds. It is the one
 * description of the ops' arguments on this side: the WASM ops write these structs into the
 * module's memory (backends/wasm/ops.ts) and the native addon's cpu ops take params objects of
 * these types (backends/native/binding.ts); CUDA_OP_PARAMS below describes the addon's cuda ops,
 * whose launchers take the same structs. test/abi.test.ts holds both against the headers.
 *
 * Field kinds: `i32` / `f32` scalars; `in T` an input array, `in? T` one that may be null,
 * `out T` an output array, `out? T` one that may be null, `inout T` read and written; `ids` token
 * ids, int32 on this side and int64 in the C ABI (widened by whoever hands them over); `rows` a
 * quantize's rows, float32 or bf16 by its rowsDtype. T: u8, u16, i32, f32, i64.
 */

export const OP_PARAMS = {
  quantizeKvCache: { format: 'i32', cache: 'inout u8', pageSize: 'i32', numPages: 'i32', tokenIds: 'ids', numTokens: 'i32', rows: 'rows', rowsDtype: 'i32' },
  dequantizeKvCache: { format: 'i32', cache: 'in u8', pageSize: 'i32', numPages: 'i32', tokenIds: 'ids', numTokens: 'i32', out: 'out u16' },
  sparsePrefill: {
    q: 'in u16', kv: 'in u16', indices: 'in i32', topkLength: 'in? i32', attnSink: 'in? f32',
    sQ: 'i32', hQ: 'i32', dQK: 'i32', dV: 'i32', sKV: 'i32', topk: 'i32', smScale: 'f32',
    out: 'out u16', maxLogits: 'out f32', lse: 'out f32',
  },
  pagedSparseAttention: {
    q: 'in u16', n: 'i32', hQ: 'i32',
    kCache: 'in u8', pageSize: 'i32', numPages: 'i32', indices: 'in i32', topk: 'i32', topkLength: 'in? i32',
    extraKCache: 'in? u8', extraPageSize: 'i32', extraNumPages: 'i32', extraIndices: 'in? i32', extraTopk: 'i32', extraTopkLength: 'in? i32',
    attnSink: 'in? f32', smScale: 'f32', out: 'out u16', lse: 'out f32', maxLogits: 'out? f32',
  },
  planLayout: {
    numRequests: 'i32', seqLens: 'in i32', extendLens: 'in i32', window: 'i32', ratio: 'i32',
    queryOffsets: 'out? i64', swaOffsets: 'out? i64', compOffsets: 'out? i64', totals: 'out? i64',
  },
  planCompressedTokenIds: {
    numRequests: 'i32', seqLens: 'in i32', extendLens: 'in i32', ratio: 'i32',
    pageTables: 'in i32', pageTableOffsets: 'in i64', pageSize: 'i32', tokenIds: 'out i64',
  },
  planDenseRows: { numRequests: 'i32', seqLens: 'in i32', extendLens: 'in i32', window: 'i32', ratio: 'i32', width: 'i32', rows: 'out i32', lens: 'out i32' },
  planCombineTopk: {
    numRequests: 'i32', seqLens: 'in i32', extendLens: 'in i32', window: 'i32', ratio: 'i32',
    topkIndices: 'in i32', topk: 'i32', width: 'i32', rows: 'out i32', lens: 'out i32', dropped: 'out? i32', droppedTotal: 'out? i64',
  },
  planPagedForm: {
    numQueries: 'i32', rows: 'in i32', lens: 'in i32', width: 'i32', compRows: 'i32', swaRows: 'i32',
    compTokenIds: 'in i64', swaTokenIds: 'in i64',
    mainRows: 'out? i32', mainWidth: 'i32', mainLens: 'out? i32', extraRows: 'out? i32', extraWidth: 'i32', extraLens: 'out? i32',
  },
} as const;

export type OpName = keyof typeof OP_PARAMS;
export type FieldKind = { [Op in OpName]: (typeof OP_PARAMS)[Op][keyof (typeof OP_PARAMS)[Op]] }[OpName];

interface ArrayOf {
  u8: Uint8Array;
  u16: Uint16Array;
  i32: Int32Array;
  f32: Float32Array;
  i64: BigInt64Array;
}
export type ElementType = keyof ArrayOf;

/** The JS value a field of a kind holds. */
export type ValueOf<K> = K extends 'i32' | 'f32'
  ? number
  : K extends 'ids'
    ? Int32Array
    : K extends 'rows'
      ? Float32Array | Uint16Array
      : K extends `${'in' | 'out' | 'inout'} ${infer T extends ElementType}`
        ? ArrayOf[T]
        : K extends `${'in?' | 'out?'} ${infer T extends ElementType}`
          ? ArrayOf[T] | null
          : never;

/** An op's params, as an object of its fields. */
export type OpParams<Op extends OpName> = { -readonly [F in keyof (typeof OP_PARAMS)[Op]]: ValueOf<(typeof OP_PARAMS)[Op][F]> };

/** The C function of an op: smla_ and its name in snake case (sparsePrefill → smla_sparse_prefill). */
export function cFunctionName(op: OpName): string {
  return `smla_${snakeCase(op)}`;
}

/** camelCase → snake_case, an acronym staying one word (dQK → d_qk, extraKCache → extra_k_cache). */
export function snakeCase(name: string): string {
  return name
    .replace(/([A-Z]+)([A-Z][a-z])/g, '$1_$2')
    .replace(/([a-z\d])([A-Z])/g, '$1_$2')
    .toLowerCase();
}

/** The fields of an op in struct order, with their kinds. */
export function fieldsOf(op: OpName): readonly (readonly [string, FieldKind])[] {
  return Object.entries(OP_PARAMS[op]) as [string, FieldKind][];
}

/**
 * The addon's cuda kernel ops (native/addon/cuda_ops.cpp), each one launcher of
 * native/cuda/smla_cuda.h that takes the params struct of CUDA_OP_STRUCT[op] plus what only the
 * launch needs. Their params objects hold the struct's fields, where an array may also be a device
 * buffer (of int64 ids for `ids`), except `host` arrays, which the launcher walks on the host; then
 * the fields that are no part of the struct: planRows' numQueries and planCompressedTokenIds'
 * total (the length of their outputs, checked against the requests), dequantizeKvCache's
 * outRowOffset (`i32?`: a number or null; its rows land from that row of a device buffer on).
 * planRows is planCombineTopk's struct, its topkIndices null for the dense rows of ratio 0 / 128
 * (droppedTotal: a device int64 the kernel sums the dropped counts into, 0 for dense rows).
 */
export const CUDA_OP_PARAMS = {
  sparsePrefill: OP_PARAMS.sparsePrefill,
  pagedSparseAttention: OP_PARAMS.pagedSparseAttention,
  dequantizeKvCache: { ...OP_PARAMS.dequantizeKvCache, outRowOffset: 'i32?' },
  planRows: {
    numRequests: 'i32', seqLens: 'host i32', extendLens: 'host i32', window: 'i32', ratio: 'i32',
    topkIndices: 'in? i32', topk: 'i32', width: 'i32', rows: 'out i32', lens: 'out i32', dropped: 'out? i32', droppedTotal: 'out? i64', numQueries: 'i32',
  },
  planCompressedTokenIds: {
    numRequests: 'i32', seqLens: 'host i32', extendLens: 'host i32', ratio: 'i32',
    pageTables: 'in i32', pageTableOffsets: 'host i64', pageSize: 'i32', tokenIds: 'out i64', total: 'i32',
  },
} as const;

export type CudaOpName = keyof typeof CUDA_OP_PARAMS;

/** The C ABI op whose params struct each cuda op's launcher takes. */
export const CUDA_OP_STRUCT: { readonly [Op in CudaOpName]: OpName } = {
  sparsePrefill: 'sparsePrefill',
  pagedSparseAttention: 'pagedSparseAttention',
  dequantizeKvCache: 'dequantizeKvCache',
  planRows: 'planCombineTopk',
  planCompressedTokenIds: 'planCompressedTokenIds',
};

/** The JS value a cuda op's field of a kind holds, B being the addon's device buffer. */
export type DeviceValueOf<K, B> = K extends `host ${infer T extends ElementType}`
  ? ArrayOf[T]
  : K extends 'i32?'
    ? number | null
    : K extends 'ids'
      ? Int32Array | B
      : K extends `${'in' | 'out' | 'inout'} ${infer T extends ElementType}`
        ? ArrayOf[T] | B
        : K extends `${'in?' | 'out?'} ${infer T extends ElementType}`
          ? ArrayOf[T] | B | null
          : ValueOf<K>;

/** A cuda op's params, as an object of its fields. */
export type CudaOpParams<Op extends CudaOpName, B> = {
  -readonly [F in keyof (typeof CUDA_OP_PARAMS)[Op]]: DeviceValueOf<(typeof CUDA_OP_PARAMS)[Op][F], B>;
};
