/**
 * Recognizing device memory in arguments. A backend with device memory (cuda) brands its buffers
 * with DEVICE_BUFFER_BRAND; validation (src/ops/) checks a device tensor's dtype, shape and byte
 * size exactly as it checks a host tensor's, and never reads its contents.
 */
import type { DType, DeviceBuffer } from './types.js';

export const DEVICE_BUFFER_BRAND: unique symbol = Symbol.for('sparse-mla.DeviceBuffer');

export function isDeviceBuffer(value: unknown): value is DeviceBuffer {
  return typeof value === 'object' && value !== null && (value as { [DEVICE_BUFFER_BRAND]?: unknown })[DEVICE_BUFFER_BRAND] === true;
}

export const BYTES_PER_ELEMENT: { readonly [D in DType]: number } = { bf16: 2, float32: 4, int32: 4, int64: 8, uint8: 1 };

/** Frees a device buffer now (ops already queued still finish with it); host memory is left to the GC. */
export function releaseDevice(value: unknown): void {
  if (isDeviceBuffer(value)) value.free();
}
