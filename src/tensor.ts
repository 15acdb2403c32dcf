/**
 * Building and converting host tensors (bf16 tensors hold raw bit patterns in a Uint16Array), and
 * recognizing device memory in arguments: a backend with device memory (cuda) brands its buffers
 * with DEVICE_BUFFER_BRAND; validation (src/ops/) checks a device tensor's dtype, shape and byte
 * size exactly as it checks a host tensor's, and never reads its contents.
 */
import { types } from 'node:util';
import { SparseMlaError, fail } from './errors.js';
import type { DType, DTypeArrays, DeviceBuffer, DeviceTensor, Tensor } from './types.js';

export const DEVICE_BUFFER_BRAND: unique symbol = Symbol.for('sparse-mla.DeviceBuffer');

export function isDeviceBuffer(value: unknown): value is DeviceBuffer {
  return typeof value === 'object' && value !== null && (value as { [DEVICE_BUFFER_BRAND]?: unknown })[DEVICE_BUFFER_BRAND] === true;
}

export const BYTES_PER_ELEMENT: { readonly [D in DType]: number } = { bf16: 2, float32: 4, int32: 4, int64: 8, uint8: 1 };

// The typed-array intrinsics: what an array really is and where its memory lies, whatever a
// subclass or a Proxy claims through its own properties.
const TYPED_ARRAY_PROTOTYPE = Object.getPrototypeOf(Uint8Array.prototype) as object;
const intrinsicGetter = (key: PropertyKey): ((this: unknown) => unknown) =>
  Object.getOwnPropertyDescriptor(TYPED_ARRAY_PROTOTYPE, key)!.get as (this: unknown) => unknown;
const TYPED_ARRAY_KIND = intrinsicGetter(Symbol.toStringTag);
const TYPED_ARRAY_BUFFER = intrinsicGetter('buffer');
const TYPED_ARRAY_OFFSET = intrinsicGetter('byteOffset');
const TYPED_ARRAY_LENGTH = intrinsicGetter('length');

type HostArrayCtor = new (buffer: ArrayBufferLike, byteOffset: number, length: number) => ArrayBufferView;

/** The class name of a real typed array ('Float32Array', ...); undefined for anything else (a Proxy of one included). */
export function typedArrayKind(value: unknown): string | undefined {
  return TYPED_ARRAY_KIND.call(value) as string | undefined;
}

/**
 * An array-like argument as the library reads it, its length read once: a typed array as a plain
 * view of its memory (ownView; INVALID_VALUE when detached), anything else whose `length` is a safe
 * integer ≥ 0 as it is (its elements are the caller's to check, each read once by the caller of
 * this). null for anything else, a Proxy of a typed array included (the typed array's own length
 * getter refuses the Proxy with a TypeError).
 */
export function arrayLikeOf(value: unknown, argument: string): { values: ArrayLike<unknown>; length: number } | null {
  const kind = typedArrayKind(value);
  if (kind !== undefined) {
    const view = ownView(value, globalThis[kind as 'Float32Array'], argument)!;
    return { values: view, length: view.length };
  }
  if (typeof value !== 'object' || value === null) return null;
  let length: unknown;
  try {
    length = (value as ArrayLike<unknown>).length;
  } catch {
    return null;
  }
  return isCount(length) ? { values: value as ArrayLike<unknown>, length } : null;
}

/** A field a caller has not read (describe, shapeStr, dimsOnce read it then); any other value is one it read, not asked again. */
export const NOT_READ: unique symbol = Symbol('not read');

/** Whether a length a caller's array answered (read once) is a count: a safe integer ≥ 0. */
export function isCount(length: unknown): length is number {
  return typeof length === 'number' && Number.isSafeInteger(length) && length >= 0;
}

/**
 * The most dims a shape may have: a Proxy of an array can claim any length with every dim 1, and a
 * loop over 2^53 of them would hang the call.
 */
export const MAX_TENSOR_DIMS = 64;

/**
 * A caller's dims copied, its length read once and each dim once, up to the first dim that is no
 * safe integer ≥ 0 (kept, for the message); null when its length is no count or over MAX_TENSOR_DIMS. Not Array.from, which
 * runs an array's iterator, and the iterator reads the length again at every step: a Proxy whose
 * length shrank after its first read lost its last dims, silently (tensor('uint8', [3, 1]) gave [3]).
 * The one copy of a shape: tensor() and every op's tensor check (ops/common.ts). `length` and
 * `first`: the length and first dims as a caller already read them (not read again).
 */
export function dimsOnce(shape: readonly unknown[], length: unknown = NOT_READ, first?: readonly unknown[]): unknown[] | null {
  const n = length === NOT_READ ? shape.length : length;
  if (!isCount(n) || n > MAX_TENSOR_DIMS) return null;
  const dims: unknown[] = [];
  const known = first === undefined ? 0 : first.length;
  for (let i = 0; i < n; i++) {
    const d: unknown = i < known ? first![i] : shape[i];
    dims.push(d);
    if (!Number.isSafeInteger(d) || (d as number) < 0) break;
  }
  return dims;
}

/** The length each view ownView made had when it was made: checkViewsIntact compares. */
const viewLengths = new WeakMap<ArrayBufferView, { length: number; argument: string }>();

/**
 * `value` as a plain typed array of class `ctor` over the same memory, its buffer, offset and
 * length read once through the intrinsic getters, so that what was validated is what the backend
 * gets (a subclass overriding `length`, or a view that a resizable buffer later shrinks, cannot
 * change it). null when `value` is not a `ctor`; throws INVALID_VALUE when its buffer is detached.
 */
export function ownView<T extends ArrayBufferView>(value: unknown, ctor: abstract new (...args: never[]) => T, argument: string): T | null {
  if (TYPED_ARRAY_KIND.call(value) !== ctor.name) return null;
  const buffer = TYPED_ARRAY_BUFFER.call(value) as ArrayBufferLike;
  let view: T;
  try {
    view = new (ctor as unknown as HostArrayCtor)(buffer, TYPED_ARRAY_OFFSET.call(value) as number, TYPED_ARRAY_LENGTH.call(value) as number) as T;
  } catch {
    fail('INVALID_VALUE', argument, `a ${ctor.name} with attached memory`, 'one whose buffer was detached or transferred');
  }
  viewLengths.set(view, { length: TYPED_ARRAY_LENGTH.call(view) as number, argument });
  return view;
}

/**
 * After a call's checks, before any work: every view ownView made for it (found in `job`'s fields,
 * nested objects included) still has its memory. A getter or Proxy the checks read after an array
 * was validated can detach its buffer (transfer it) or shrink a resizable one; the backend would
 * then read a view of no memory, or of less than the checks saw.
 */
export function checkViewsIntact(job: object, depth = 0): void {
  for (const v of Object.values(job)) {
    if (ArrayBuffer.isView(v)) {
      const was = viewLengths.get(v);
      if (was !== undefined && TYPED_ARRAY_LENGTH.call(v) !== was.length) {
        fail('INVALID_VALUE', was.argument, `memory that stays attached and whole until the call has read it (${was.length} elements)`, 'a buffer detached or shrunk during the call\'s checks (by a getter or Proxy of another argument)');
      }
    } else if (typeof v === 'object' && v !== null && depth < 4 && !isDeviceBuffer(v)) {
      checkViewsIntact(v, depth + 1);
    }
  }
}

/**
 * A value as a message shows it, bounded, and safe on anything a caller can pass: a Proxy, a
 * Symbol, a typed array of detached memory (its kind and length read through the intrinsics).
 * The one description of every SparseMlaError message (ops/common.ts hands it on). `dtypeAsRead`:
 * a tensor-like object's dtype as its caller read it (not asked again).
 */
export function describe(value: unknown, dtypeAsRead: unknown = NOT_READ): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (typeof value === 'number' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  if (typeof value === 'bigint') return `bigint ${value}n`;
  if (typeof value === 'string') return `string ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)}`;
  if (typeof value === 'symbol') return `symbol ${String(value)}`;
  if (typeof value === 'function') return 'a function';
  const kind = typedArrayKind(value);
  if (kind !== undefined) return `${kind}(${TYPED_ARRAY_LENGTH.call(value) as number})`;
  try {
    if (ArrayBuffer.isView(value)) return `${value.constructor.name}(${value.byteLength})`;
    if (Array.isArray(value)) return `an Array of length ${value.length}`;
    const o = value as Record<string, unknown>;
    const dtype = dtypeAsRead === NOT_READ ? o.dtype : dtypeAsRead;
    if (typeof dtype === 'string') {
      const shape = o.shape;
      if (Array.isArray(shape)) return `a ${dtype} tensor ${listStr(shape, (d) => dimStr(d, (other) => typeof other))}`; // (not describe(d): a shape holding its own tensor would recurse)
    }
    return `an object with keys {${Object.keys(o).slice(0, 6).join(', ')}}`;
  } catch {
    return 'an object'; // a Proxy whose traps throw
  }
}

/** Bytes in binary units for messages and reports: 512 B, 1.50 KiB, 2.25 MiB, 1.00 GiB. */
export function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return '-';
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(2)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(2)} KiB`;
  return `${n} B`;
}

/**
 * A shape as a message shows it, safe on any dims a caller can pass: a number as it is, anything
 * else by describe() (String() of a null-prototype object or one whose toString throws is a
 * TypeError or the caller's error, not ours; a BigInt 1n is not the dim 1). At most 8 dims.
 * The one shape formatter of every SparseMlaError message (ops/common.ts hands it on). `lengthAsRead`:
 * its length as its caller read it (not asked again).
 */
export function shapeStr(shape: readonly unknown[], lengthAsRead: unknown = NOT_READ): string {
  return listStr(shape, (d) => dimStr(d, describe), lengthAsRead);
}

/** A dim as a message shows it: a number as written, a string quoted (at most 20 characters), anything else by `other`. */
function dimStr(d: unknown, other: (d: unknown) => string): string {
  return typeof d === 'number' ? String(d) : typeof d === 'string' ? JSON.stringify(d.slice(0, 20)) : other(d);
}

/**
 * A caller's array as a message shows it: its length read once and at most its first 8 elements,
 * each by index and shown by `show`, and no method of the array's own called (slice, map, join: a
 * null-prototype array has none, and an own one is the caller's code run in a refusal). A length
 * that is no count, or a read that throws (a Proxy's trap), is said so.
 */
function listStr(list: readonly unknown[], show: (d: unknown) => string, lengthAsRead: unknown = NOT_READ): string {
  let n: unknown = lengthAsRead;
  try {
    if (n === NOT_READ) n = list.length;
  } catch {
    return 'an array whose length cannot be read';
  }
  if (!isCount(n)) return `an array of length ${describe(n)}`;
  let text = '';
  for (let i = 0; i < n && i < 8; i++) {
    let d: unknown;
    try {
      d = list[i];
    } catch {
      d = undefined;
    }
    text += i === 0 ? show(d) : `, ${show(d)}`;
  }
  return `[${text}${n > 8 ? `, … (${n} dims)` : ''}]`;
}

/** Frees a device buffer now (ops already queued still finish with it); host memory is left to the GC. */
export function releaseDevice(value: unknown): void {
  if (isDeviceBuffer(value)) value.free();
}

/** Each dtype's host array (bf16: its bit patterns). */
export const HOST_ARRAY_TYPES: { readonly [D in DType]: new (length: number) => DTypeArrays[D] } = {
  bf16: Uint16Array,
  float32: Float32Array,
  int32: Int32Array,
  int64: BigInt64Array,
  uint8: Uint8Array,
};

export function numel(shape: readonly number[]): number {
  if (!Array.isArray(shape)) throw new SparseMlaError('INVALID_SHAPE', `numel: shape must be an array of dims, got ${describe(shape)}`, 'shape');
  // its length read once and each dim once, not a for-of: the array iterator reads the length at
  // every step (a Proxy whose length shrank after its first read gave the product of fewer dims)
  const count: unknown = shape.length;
  if (!isCount(count) || count > MAX_TENSOR_DIMS) throw new SparseMlaError('INVALID_SHAPE', `numel: shape must be an array of at most ${MAX_TENSOR_DIMS} dims, got one of length ${describe(count)}`, 'shape');
  let n = 1;
  for (let i = 0; i < count; i++) {
    const d: unknown = shape[i];
    if (typeof d !== 'number') throw new SparseMlaError('INVALID_SHAPE', `numel: shape must be an array of numbers, got ${describe(d)} in it`, 'shape');
    n *= d;
  }
  return n;
}

/** Whether `dtype` is one of the library's dtypes (an own key: 'toString' and the like are not). */
export function isDType(dtype: unknown): dtype is DType {
  return typeof dtype === 'string' && Object.hasOwn(HOST_ARRAY_TYPES, dtype);
}

function describeDType(dtype: unknown): string {
  return typeof dtype === 'string' ? JSON.stringify(dtype.slice(0, 40)) : dtype === null ? 'null' : typeof dtype;
}

/** tensor()'s shape: its dims copied (each read once) and checked, and their product. */
function tensorDims(shape: unknown): { dims: number[]; n: number } {
  if (!Array.isArray(shape)) {
    throw new SparseMlaError('INVALID_SHAPE', `tensor: shape must be an array of non-negative integers, got ${describe(shape)}`, 'shape');
  }
  const dims = dimsOnce(shape as readonly unknown[]);
  if (dims === null) throw new SparseMlaError('INVALID_SHAPE', `tensor: shape must be an array of at most ${MAX_TENSOR_DIMS} non-negative integers, got ${describe(shape)}`, 'shape');
  for (const d of dims) {
    if (!Number.isSafeInteger(d) || (d as number) < 0) {
      throw new SparseMlaError('INVALID_SHAPE', `tensor: shape must hold non-negative integers, got ${shapeStr(dims)}`, 'shape');
    }
  }
  return { dims: dims as number[], n: numel(dims as number[]) };
}

/** tensor()'s refusal of data that is not as long as its shape says. */
function checkTensorLength(dims: readonly number[], n: number, length: number): void {
  if (length !== n) {
    throw new SparseMlaError('INVALID_SHAPE', `tensor: shape ${shapeStr(dims)} needs ${n} elements, data has ${length}`, 'data');
  }
}

/** A tensor over `data` (not copied) or, without data, a zero-filled one; `shape`: at most MAX_TENSOR_DIMS (64) dims. */
export function tensor<D extends DType>(dtype: D, shape: readonly number[], data?: DTypeArrays[D]): Tensor<D> {
  if (!isDType(dtype)) {
    throw new SparseMlaError('INVALID_DTYPE', `tensor: dtype must be one of ${Object.keys(HOST_ARRAY_TYPES).join(', ')}, got ${describeDType(dtype)}`, 'dtype');
  }
  const { dims, n } = tensorDims(shape);
  const ctor = HOST_ARRAY_TYPES[dtype];
  const arr: unknown = data ?? allocHostArray(ctor, n, 'tensor');
  // read through the intrinsics: a Proxy or a subclass with its own `length` is no evidence of its memory
  const view = ownView(arr, ctor as unknown as abstract new (...args: never[]) => DTypeArrays[D], 'data');
  if (view === null) {
    throw new SparseMlaError('INVALID_DTYPE', `tensor: ${dtype} data must be a ${ctor.name}, got ${describe(arr)}`, 'data');
  }
  checkTensorLength(dims, n, view.length);
  // the caller's array itself (a Buffer stays a Buffer) unless it is a Proxy or its own length
  // disagrees with its memory; then the plain view of that memory
  let plain = !types.isProxy(arr);
  if (plain && Object.getPrototypeOf(arr) !== ctor.prototype) {
    try {
      plain = (arr as ArrayLike<unknown>).length === view.length;
    } catch {
      plain = false;
    }
  }
  return { dtype, shape: dims as number[], data: plain ? (arr as DTypeArrays[D]) : view };
}

/**
 * A zero-filled host array of n elements: one this process cannot hold is TOO_LARGE naming
 * `argument`, not V8's RangeError (tensors, caches and every backend's host outputs).
 */
export function allocHostArray<T>(ctor: new (n: number) => T, n: number, argument: string): T {
  try {
    return new ctor(n);
  } catch (e) {
    throw new SparseMlaError('TOO_LARGE', `${argument}: expected an array this process can allocate, got ${n} elements (${(e as Error).message})`, argument);
  }
}

/** A device tensor over `data` (frozen). */
export function deviceTensor<D extends DType>(dtype: D, shape: readonly number[], data: DeviceBuffer): DeviceTensor<D> {
  return Object.freeze({ dtype, shape: Object.freeze([...shape]), data });
}

/**
 * An output where it was placed: a host tensor over a host array, a device tensor over a device
 * buffer. `shape` is a new array the caller hands over: a device tensor freezes it instead of
 * copying it (a queued layer makes three of these).
 */
export function placedTensor<D extends DType>(dtype: D, shape: number[], data: DTypeArrays[D] | DeviceBuffer): Tensor<D> | DeviceTensor<D> {
  return isDeviceBuffer(data) ? (Object.freeze({ dtype, shape: Object.freeze(shape), data }) as DeviceTensor<D>) : tensor(dtype, shape, data);
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function notANumber(fn: string, argument: string, v: unknown): never {
  throw new SparseMlaError('INVALID_VALUE', `${fn}: ${argument} must be a number, got ${describe(v)}`, argument);
}

/** float32 -> bf16 bits, round to nearest even; NaN stays NaN. */
export function float32ToBf16Bits(x: number): number {
  if (typeof x !== 'number') notANumber('float32ToBf16Bits', 'x', x);
  f32[0] = x;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16BitsToFloat32(b: number): number {
  if (typeof b !== 'number') notANumber('bf16BitsToFloat32', 'b', b);
  u32[0] = (b & 0xffff) << 16;
  return f32[0]!;
}

/** Round every element to bf16. */
export function toBf16(src: Tensor<'float32'> | { shape: readonly number[]; data: ArrayLike<number> }): Tensor<'bf16'> {
  if (typeof src !== 'object' || src === null) {
    throw new SparseMlaError('INVALID_VALUE', `toBf16: src must be {shape, data} with array data, got ${describe(src)}`, 'src');
  }
  const shape = src.shape;
  const raw: unknown = src.data;
  const kind = typedArrayKind(raw);
  if (kind === 'BigInt64Array' || kind === 'BigUint64Array') {
    throw new SparseMlaError('INVALID_DTYPE', `toBf16: src.data must hold numbers, got a ${kind}`, 'src.data');
  }
  const given = arrayLikeOf(raw, 'src.data');
  if (given === null) throw new SparseMlaError('INVALID_VALUE', `toBf16: src.data must be an array of numbers, got ${describe(raw)}`, 'src.data');
  // the shape against the data's count before any value is read (tensor()'s refusals)
  const { dims, n } = tensorDims(shape);
  checkTensorLength(dims, n, given.length);
  const values = given.values;
  const out = allocHostArray(Uint16Array, given.length, 'src.data');
  for (let i = 0; i < out.length; i++) {
    const v = values[i];
    if (typeof v !== 'number') throw new SparseMlaError('INVALID_VALUE', `toBf16: src.data must hold numbers, got ${describe(v)} at ${i}`, 'src.data');
    out[i] = float32ToBf16Bits(v);
  }
  return { dtype: 'bf16', shape: dims, data: out };
}

/** Widen a bf16 tensor to float32 (exact). */
export function bf16ToFloat32(src: Tensor<'bf16'>): Tensor<'float32'> {
  const dtype: unknown = typeof src === 'object' && src !== null ? src.dtype : undefined;
  const data = dtype === 'bf16' ? ownView(src.data, Uint16Array, 'src.data') : null;
  if (data === null) {
    const got = typeof src === 'object' && src !== null ? `dtype ${describeDType(dtype)}` : describe(src);
    throw new SparseMlaError('INVALID_DTYPE', `bf16ToFloat32: src must be a bf16 tensor (Uint16Array bits), got ${got}`, 'src');
  }
  const i32 = allocHostArray(Uint32Array, data.length, 'src');
  for (let i = 0; i < i32.length; i++) i32[i] = data[i]! << 16;
  return tensor('float32', src.shape, new Float32Array(i32.buffer));
}
