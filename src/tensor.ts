/**
 * Building and converting host tensors (bf16 tensors hold raw bit patterns in a Uint16Array), and
 * recognizing device memory in arguments: a backend with device memory (cuda) brands its buffers
 * with DEVICE_BUFFER_BRAND; validation (src/ops/) checks a device tensor's dtype, shape and byte
 * size exactly as it checks a host tensor's, and never reads its contents.
 */
import { SparseMlaError } from './errors.js';
import type { DType, DTypeArrays, DeviceBuffer, DeviceTensor, Tensor } from './types.js';

export const DEVICE_BUFFER_BRAND: unique symbol = Symbol.for('sparse-mla.DeviceBuffer');

export function isDeviceBuffer(value: unknown): value is DeviceBuffer {
  return typeof value === 'object' && value !== null && (value as { [DEVICE_BUFFER_BRAND]?: unknown })[DEVICE_BUFFER_BRAND] === true;
}

export const BYTES_PER_ELEMENT: { readonly [D in DType]: number } = { bf16: 2, float32: 4, int32: 4, int64: 8, uint8: 1 };

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
  if (!Array.isArray(shape)) throw new SparseMlaError('INVALID_SHAPE', `numel: shape must be an array of dims, got ${typeof shape === 'object' ? String(shape) : typeof shape}`, 'shape');
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Whether `dtype` is one of the library's dtypes (an own key: 'toString' and the like are not). */
export function isDType(dtype: unknown): dtype is DType {
  return typeof dtype === 'string' && Object.hasOwn(HOST_ARRAY_TYPES, dtype);
}

function describeDType(dtype: unknown): string {
  return typeof dtype === 'string' ? JSON.stringify(dtype.slice(0, 40)) : dtype === null ? 'null' : typeof dtype;
}

/** A tensor over `data` (not copied) or, without data, a zero-filled one. */
export function tensor<D extends DType>(dtype: D, shape: readonly number[], data?: DTypeArrays[D]): Tensor<D> {
  if (!isDType(dtype)) {
    throw new SparseMlaError('INVALID_DTYPE', `tensor: dtype must be one of ${Object.keys(HOST_ARRAY_TYPES).join(', ')}, got ${describeDType(dtype)}`, 'dtype');
  }
  if (!Array.isArray(shape)) {
    throw new SparseMlaError('INVALID_SHAPE', `tensor: shape must be an array of non-negative integers, got ${shape === null ? 'null' : typeof shape}`, 'shape');
  }
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new SparseMlaError('INVALID_SHAPE', `tensor: shape must hold non-negative integers, got [${shape.join(', ')}]`, 'shape');
    }
  }
  const n = numel(shape);
  const arr = data ?? (allocHostArray(HOST_ARRAY_TYPES[dtype], n, 'tensor') as DTypeArrays[D]);
  if (!(arr instanceof HOST_ARRAY_TYPES[dtype])) {
    throw new SparseMlaError('INVALID_DTYPE', `tensor: ${dtype} data must be a ${HOST_ARRAY_TYPES[dtype].name}, got ${arr?.constructor?.name}`, 'data');
  }
  if (arr.length !== n) {
    throw new SparseMlaError('INVALID_SHAPE', `tensor: shape [${shape.join(', ')}] needs ${n} elements, data has ${arr.length}`, 'data');
  }
  return { dtype, shape: [...shape], data: arr };
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

/** float32 -> bf16 bits, round to nearest even; NaN stays NaN. */
export function float32ToBf16Bits(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16BitsToFloat32(b: number): number {
  u32[0] = (b & 0xffff) << 16;
  return f32[0]!;
}

/** Round every element to bf16. */
export function toBf16(src: Tensor<'float32'> | { shape: readonly number[]; data: ArrayLike<number> }): Tensor<'bf16'> {
  if (typeof src !== 'object' || src === null || typeof src.data !== 'object' || src.data === null || typeof src.data.length !== 'number') {
    throw new SparseMlaError('INVALID_VALUE', `toBf16: src must be {shape, data} with array data, got ${src === null ? 'null' : typeof src}`, 'src');
  }
  const out = new Uint16Array(src.data.length);
  for (let i = 0; i < out.length; i++) out[i] = float32ToBf16Bits(src.data[i]!);
  return tensor('bf16', src.shape, out);
}

/** Widen a bf16 tensor to float32 (exact). */
export function bf16ToFloat32(src: Tensor<'bf16'>): Tensor<'float32'> {
  if (typeof src !== 'object' || src === null || src.dtype !== 'bf16' || !(src.data instanceof Uint16Array)) {
    const got = typeof src === 'object' && src !== null ? `dtype ${JSON.stringify(src.dtype)}` : String(src);
    throw new SparseMlaError('INVALID_DTYPE', `bf16ToFloat32: src must be a bf16 tensor (Uint16Array bits), got ${got}`, 'src');
  }
  const i32 = new Uint32Array(src.data.length);
  for (let i = 0; i < i32.length; i++) i32[i] = src.data[i]! << 16;
  return tensor('float32', src.shape, new Float32Array(i32.buffer));
}
