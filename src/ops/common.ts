/**
 * Argument checks shared by every op's validation (SPEC §9). Each check throws a SparseMlaError via
 * fail(code, argument, expected, got) so the message names the argument, the expectation and what
 * came; nothing here does any of the op's work.
 */
import { fail } from '../errors.js';
import { BYTES_PER_ELEMENT, HOST_ARRAY_TYPES, MAX_TENSOR_DIMS, checkViewsIntact, describe, dimsOnce, isCount, isDeviceBuffer, NOT_READ, ownView, shapeStr } from '../tensor.js';
import type { DType, DeviceBuffer, DeviceTensor, OutputOptions, Placement, Tensor } from '../types.js';

// the typed-array intrinsics live in tensor.ts (tensor() and the file readers use them too)
export { ownView, typedArrayKind, checkViewsIntact, describe, shapeStr, NOT_READ } from '../tensor.js';

/** Largest value a 32-bit signed size or offset in the C ABI can hold. */
export const INT32_MAX = 0x7fffffff;

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null;
}

/** A tensor's shape of object, tested as readTensorFields tests one (`in` runs no getter): dtype, shape and data, in that order. */
export function hasTensorFields(value: unknown): value is Record<string, unknown> & { dtype: unknown; shape: unknown; data: unknown } {
  return isObject(value) && 'dtype' in value && 'shape' in value && 'data' in value;
}

export function checkArgsObject(value: unknown, argument: string): asserts value is Record<string, unknown> {
  if (!isObject(value) || Array.isArray(value)) fail('INVALID_VALUE', argument, 'an object of named arguments', describe(value));
}

// The checks below run on every op and layer call, mostly before V8 has optimized them; V8 gives a
// function its inline caches only after it has run about eight times its own bytecode, so their
// messages are built in the small functions here, called only to throw, not inline.

/** Throws: `value` is not a tensor object of `dtypes` (`dtype`: its dtype where read). */
function notATensor(value: unknown, argument: string, dtypes: readonly string[], dtype: unknown = NOT_READ): never {
  fail('INVALID_VALUE', argument, `a ${dtypes.join(' or ')} tensor {dtype, shape, data}`, describe(value, dtype));
}

/** Throws: `shape` (the caller's, or its copy) is not an array of non-negative integers (`length`: its length where read). */
function badShapeArray(argument: string, shape: unknown, length: unknown = NOT_READ): never {
  fail('INVALID_SHAPE', `${argument}.shape`, `an array of at most ${MAX_TENSOR_DIMS} non-negative integers`, Array.isArray(shape) ? shapeStr(shape, length) : describe(shape));
}

/** Throws: a tensor of another dtype. */
function badDtype(argument: string, dtypes: readonly string[], dtype: unknown): never {
  fail('INVALID_DTYPE', argument, `dtype ${dtypes.join(' or ')}`, `dtype ${JSON.stringify(dtype)}`);
}

/** Throws: a host tensor's data is not its dtype's array. */
function badHostArray(argument: string, dtype: DType, data: unknown): never {
  fail('INVALID_DTYPE', `${argument}.data`, `a ${HOST_ARRAY_TYPES[dtype].name} for dtype ${dtype}`, describe(data));
}

/** Throws: a host tensor's data is not as long as its shape says. */
function badHostLength(argument: string, shape: readonly number[], n: number, length: number): never {
  fail('INVALID_SHAPE', `${argument}.data`, `${n} elements for shape ${shapeStr(shape)}`, `${length} elements`);
}

/** Throws: a device tensor's buffer is freed, or not the size of its shape. */
function badDeviceData(argument: string, dtype: DType, shape: readonly number[], buffer: DeviceBuffer, bytes: number): never {
  if (buffer.freed) fail('INVALID_VALUE', `${argument}.data`, 'a live device buffer', 'a freed one');
  fail('INVALID_SHAPE', `${argument}.data`, `${bytes} bytes for ${dtype} ${shapeStr(shape)}`, `a device buffer of ${buffer.byteLength} bytes`);
}

/**
 * What a check without messages read of a tensor before it stopped (prefill_layer_checks.ts's device
 * layer checks), for the checks here to go on from: its dtype, shape and data, and its shape's
 * length (NOT_READ where not read) and first dims.
 */
export interface TensorRead {
  readonly dtype: unknown;
  readonly shape: unknown;
  readonly data: unknown;
  readonly length: unknown;
  readonly dims: readonly unknown[];
}

/**
 * A tensor's fields, each read once (a getter is not asked twice, nor one `read` holds); shape
 * copied and checked. `dtypes` spells what was wanted in a message.
 */
function readTensorFields(value: unknown, argument: string, dtypes: readonly string[], read?: TensorRead): { dtype: unknown; shape: number[]; data: unknown } {
  let dtype: unknown, rawShape: unknown, data: unknown, length: unknown = NOT_READ, first: readonly unknown[] | undefined;
  if (read === undefined) {
    if (!hasTensorFields(value)) notATensor(value, argument, dtypes);
    (dtype = value.dtype), (rawShape = value.shape), (data = value.data);
  } else {
    ({ dtype, shape: rawShape, data, length, dims: first } = read);
  }
  if (typeof dtype !== 'string') notATensor(value, argument, dtypes, dtype);
  if (!Array.isArray(rawShape)) badShapeArray(argument, rawShape);
  if (length === NOT_READ) length = (rawShape as unknown[]).length;
  const shape = dimsOnce(rawShape as unknown[], length, first);
  if (shape === null) badShapeArray(argument, rawShape, length);
  for (let i = 0; i < shape.length; i++) {
    const d = shape[i];
    if (!Number.isSafeInteger(d) || (d as number) < 0) badShapeArray(argument, shape);
  }
  return { dtype, shape: shape as number[], data };
}

/**
 * `value` must be a dense tensor of one of `dtypes` whose data length matches its shape. The shape
 * itself (rank, dims) is checked by the caller, which knows what it means. Returns a snapshot:
 * every field read once, the data a plain view of the same memory (ownView), so nothing the
 * caller's object does later changes what was validated.
 */
export function checkTensor<D extends DType>(value: unknown, argument: string, dtypes: readonly D[], read?: TensorRead): Tensor<D> {
  const { dtype: rawDtype, shape, data: rawData } = readTensorFields(value, argument, dtypes, read);
  if (!(dtypes as readonly string[]).includes(rawDtype as string)) badDtype(argument, dtypes, rawDtype);
  const dtype = rawDtype as D;
  if (isDeviceBuffer(rawData)) fail('INVALID_VALUE', argument, `a host ${dtypes.join(' or ')} tensor (this argument cannot be in device memory)`, 'a device tensor');
  const data = ownView(rawData, HOST_ARRAY_TYPES[dtype], `${argument}.data`);
  if (!data) badHostArray(argument, dtype, rawData);
  let n = 1;
  for (let i = 0; i < shape.length; i++) n *= shape[i]!;
  if (data.length !== n) badHostLength(argument, shape, n, data.length);
  return { dtype, shape, data } as unknown as Tensor<D>;
}

/**
 * Like checkTensor, but a device tensor (data: a DeviceBuffer) is accepted too: same dtype and
 * shape checks, its byte size checked against the shape, its contents never read.
 */
export function checkPlacedTensor<D extends DType>(value: unknown, argument: string, dtypes: readonly D[], read?: TensorRead): Tensor<D> | DeviceTensor<D> {
  const { dtype: rawDtype, shape, data } = readTensorFields(value, argument, dtypes, read);
  if (!isDeviceBuffer(data)) return checkTensor({ dtype: rawDtype, shape, data }, argument, dtypes);
  return checkDeviceFields(rawDtype, shape, data, argument, dtypes);
}

/** A device tensor's read fields: dtype one of `dtypes`, the buffer live and exactly the shape's bytes. */
function checkDeviceFields<D extends DType>(rawDtype: unknown, shape: number[], data: DeviceBuffer, argument: string, dtypes: readonly D[]): DeviceTensor<D> {
  if (!(dtypes as readonly string[]).includes(rawDtype as string)) badDtype(argument, dtypes, rawDtype);
  const dtype = rawDtype as D;
  let n = 1;
  for (let i = 0; i < shape.length; i++) n *= shape[i]!;
  const bytes = n * BYTES_PER_ELEMENT[dtype];
  if (data.freed || data.byteLength !== bytes) badDeviceData(argument, dtype, shape, data, bytes);
  return { dtype, shape, data } as unknown as DeviceTensor<D>;
}

const ALL_DTYPES = Object.keys(HOST_ARRAY_TYPES) as DType[];

/**
 * A tensor that must be in device memory (engine.download, engine.copyFrom): any dtype, checked as
 * checkPlacedTensor checks a device tensor (dtype, a shape of non-negative integers, a live buffer
 * of exactly the shape's bytes), every field read once; a host tensor or anything else is
 * INVALID_VALUE with `expected`. Returns a snapshot (the shape a copy).
 */
export function checkDeviceTensor(value: unknown, argument: string, expected: string): DeviceTensor<DType> {
  if (!hasTensorFields(value)) fail('INVALID_VALUE', argument, expected, describe(value));
  const { dtype, shape, data } = readTensorFields(value, argument, ALL_DTYPES);
  if (!isDeviceBuffer(data)) fail('INVALID_VALUE', argument, expected, describe(value));
  return checkDeviceFields(dtype, shape, data, argument, ALL_DTYPES);
}

export function isDeviceTensor<D extends DType>(t: Tensor<D> | DeviceTensor<D>): t is DeviceTensor<D> {
  return isDeviceBuffer(t.data);
}

/** Checks the rank; returns the shape. `expected` spells the shape for the message, e.g. "[sQ, hQ, dQK]". */
export function checkRank(t: { readonly shape: readonly number[] }, argument: string, rank: number, expected: string): readonly number[] {
  if (t.shape.length !== rank) badRank(t.shape, argument, rank, expected);
  return t.shape;
}

function badRank(shape: readonly number[], argument: string, rank: number, expected: string): never {
  fail('INVALID_SHAPE', argument, `rank ${rank} ${expected}`, `shape ${shapeStr(shape)}`);
}

/**
 * The query tensor of an attention op: bf16 of rank 3 with at least one head. Returns the tensor
 * and its [rows, hQ, dQK]; `expected` spells the shape for the message, e.g. "[sQ, hQ, dQK]".
 * allowDevice false: only a host tensor (an engine without device memory).
 */
export function checkQuery(value: unknown, expected: string, allowDevice = true, read?: TensorRead): { q: Tensor<'bf16'> | DeviceTensor<'bf16'>; rows: number; hQ: number; dQK: number } {
  const q = allowDevice ? checkPlacedTensor(value, 'q', ['bf16'] as const, read) : checkTensor(value, 'q', ['bf16'] as const, read);
  const shape = checkRank(q, 'q', 3, expected);
  // indexed, not destructured (an array pattern runs the iterator protocol)
  const hQ = shape[1]!;
  if (hQ < 1) noHeads(shape);
  return { q, rows: shape[0]!, hQ, dQK: shape[2]! };
}

function noHeads(shape: readonly number[]): never {
  fail('INVALID_SHAPE', 'q', 'hQ = shape[1] ≥ 1', `shape ${shapeStr(shape)}`);
}

/**
 * An array's length read once, as a count of `items` (a Proxy of an array may answer anything, or
 * otherwise on a second read): INVALID_VALUE when no count, TOO_LARGE above `max` (default what the
 * C ABI counts; `limit` says whose cap it is in the message).
 * The one read of a caller's array length: loops run to what it returned, never to `list.length`.
 */
export function listCount(list: readonly unknown[], argument: string, items: string, max = INT32_MAX, limit = ''): number {
  const n: unknown = list.length;
  if (!isCount(n)) fail('INVALID_VALUE', argument, `an array of ${items}`, `length ${describe(n)}`);
  if (n > max) fail('TOO_LARGE', argument, `at most ${max} ${items}${limit}`, `${n}`);
  return n;
}

/** A dimension passed to the core as a 32-bit size. */
export function checkInt32Size(value: number, argument: string, what: string): void {
  if (value > INT32_MAX) fail('TOO_LARGE', argument, `${what} ≤ ${INT32_MAX} (32-bit sizes in the core ABI)`, String(value));
}

/**
 * Largest |smScale| accepted. The kernels form the logits smScale · ⟨q, k⟩ in float32; with
 * |smScale| ≤ 2^16 they stay finite for every |⟨q, k⟩| ≤ 5e33 (q and kv elements up to ~1e15),
 * while a scale near float32's maximum turns every logit above 1 into +inf (and the output into
 * NaN) where the float64 math is finite. Models use 1/√dQK ≈ 0.04.
 */
export const MAX_SM_SCALE = 2 ** 16;

/** smScale: a finite number with |smScale| ≤ MAX_SM_SCALE (so it is finite as float32 too). */
export function checkSmScale(value: unknown, argument = 'smScale'): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || Math.abs(value) > MAX_SM_SCALE) badSmScale(value, argument);
  return value;
}

function badSmScale(value: unknown, argument: string): never {
  fail('INVALID_VALUE', argument, `a finite number with |${argument}| ≤ ${MAX_SM_SCALE} (logits smScale · q·k must stay finite in float32)`, describe(value));
}

/**
 * Index tensor [rows, topk] or [rows, 1, topk] (int32 or int64). Returns topk. The single-head
 * form of FlashMLA's [s_q, h_kv=1, topk] is accepted because callers pass it straight through.
 */
export function checkIndexShape(t: { readonly shape: readonly number[] }, argument: string, rows: number, rowsName: string): number {
  const s = t.shape;
  if (s.length === 2 || (s.length === 3 && s[1] === 1)) {
    if (s[0] !== rows) fail('INVALID_SHAPE', argument, `first dim = ${rowsName} = ${rows}`, `shape ${shapeStr(s)}`);
    return s[s.length - 1]!;
  }
  fail('INVALID_SHAPE', argument, `shape [${rowsName}, topk] or [${rowsName}, 1, topk]`, `shape ${shapeStr(s)}`);
}

/**
 * Attention indices as the core takes them: int32, anything outside [0, bound) is an invalid
 * entry. int32 data passes through untouched (the core skips invalid values itself); int64 is
 * narrowed with every out-of-range value, including ones ≥ 2^31 that would wrap into range,
 * mapped to −1.
 */
export function normalizeIndices(t: Tensor<'int32' | 'int64'>, bound: number): Int32Array;
export function normalizeIndices(t: Tensor<'int32' | 'int64'> | DeviceTensor<'int32' | 'int64'>, bound: number, argument?: string): Int32Array | DeviceBuffer;
export function normalizeIndices(t: Tensor<'int32' | 'int64'> | DeviceTensor<'int32' | 'int64'>, bound: number, argument = 'indices'): Int32Array | DeviceBuffer {
  if (isDeviceBuffer(t.data)) {
    // Device indices go to the kernel as they are; only int32 can (int64 would need narrowing here).
    if (t.dtype !== 'int32') fail('INVALID_DTYPE', argument, 'dtype int32 for indices in device memory (int64 is accepted on the host)', `dtype ${t.dtype}`);
    return t.data;
  }
  if (t.dtype === 'int32') return t.data as Int32Array;
  // read here, after every argument's getters ran (ops normalize last): still the memory checked?
  checkViewsIntact({ indices: t.data });
  const src = t.data as BigInt64Array;
  // Read each int64 as (lo, hi) int32 halves (little-endian) instead of BigInt per element.
  const halves = new Int32Array(src.buffer, src.byteOffset, src.length * 2);
  const out = new Int32Array(src.length);
  for (let i = 0; i < out.length; i++) {
    const lo = halves[2 * i]!;
    const hi = halves[2 * i + 1]!;
    out[i] = hi === 0 && lo >= 0 && lo < bound ? lo : -1;
  }
  return out;
}

/**
 * topkLength int32 [rows]: values must be ≥ 0; values above topk mean "all topk entries" and are
 * clamped here so the core never sees a length beyond its row.
 */
export function normalizeTopkLength(value: unknown, argument: string, rows: number, rowsName: string, topk: number): Int32Array | DeviceBuffer | null {
  if (value === undefined || value === null) return null;
  const p = checkPlacedTensor(value, argument, ['int32'] as const);
  if (p.shape.length !== 1 || p.shape[0] !== rows) fail('INVALID_SHAPE', argument, `shape [${rowsName}] = [${rows}]`, `shape ${shapeStr(p.shape)}`);
  if (isDeviceTensor(p)) return p.data; // values unread: the kernels clamp each length to [0, topk]
  // a copy, checked and clamped: a length rewritten after its check (a getter of a later argument,
  // shared memory) would let the core read past its row
  const data = p.data.slice();
  for (let i = 0; i < data.length; i++) {
    const v = data[i]!;
    if (v < 0) fail('INVALID_VALUE', argument, 'lengths ≥ 0', `${v} at position ${i}`);
    if (v > topk) data[i] = topk;
  }
  return data;
}

/** attnSink float32 [hQ], optional. Any value (±inf, NaN) is allowed; the math defines it. */
export function checkAttnSink(value: unknown, argument: string, hQ: number): Float32Array | DeviceBuffer | null {
  if (value === undefined || value === null) return null;
  const t = checkPlacedTensor(value, argument, ['float32'] as const);
  if (t.shape.length !== 1 || t.shape[0] !== hQ) fail('INVALID_SHAPE', argument, `shape [hQ] = [${hQ}]`, `shape ${shapeStr(t.shape)}`);
  return t.data;
}

/** An op's `options`: where its outputs go (default 'host'); `output`: options.output where already read. */
export function checkOutputOption(options: unknown, output: unknown = NOT_READ): Placement {
  if (options === undefined) return 'host';
  checkArgsObject(options, 'options');
  const o = output === NOT_READ ? (options as OutputOptions).output : output;
  if (o === undefined || o === 'host' || o === 'device') return o ?? 'host';
  fail('INVALID_VALUE', 'options.output', '"host" or "device"', describe(o));
}
