/**
 * CudaDeviceBuffer: a cuda engine's device allocation as users hold it (the addon's buffer, branded
 * so validation recognizes it), with the checks a layer runs on its operands in one call.
 */
import { DEVICE_BUFFER_BRAND } from '../../tensor.js';
import type { DeviceBuffer } from '../../types.js';
import type { NativeDeviceBuffer, NativeStream } from './binding.js';

/** A device allocation handed to users: the addon's buffer, branded so validation recognizes it. */
export class CudaDeviceBuffer implements DeviceBuffer {
  readonly device = 'cuda' as const;
  readonly [DEVICE_BUFFER_BRAND] = true;
  readonly byteLength: number;
  readonly deviceIndex: number;
  /** @internal the addon's buffer */
  readonly native: NativeDeviceBuffer;
  /** @internal the stream of the engine that allocated it (work on it is ordered there) */
  readonly stream: NativeStream;

  /**
   * `byteLength` and `deviceIndex`: the size and device the caller just allocated it with
   * (CudaBackend.alloc), so they are not read back through the addon's accessors (two native calls
   * per buffer); as numbers, not an object (a queued layer makes three of these).
   */
  constructor(native: NativeDeviceBuffer, stream: NativeStream, byteLength?: number, deviceIndex?: number) {
    this.native = native;
    this.stream = stream;
    this.byteLength = byteLength ?? native.byteLength;
    this.deviceIndex = deviceIndex ?? native.device;
  }

  /**
   * Kept here, not asked of the addon: only free() frees the addon's buffer, and a layer reads
   * `freed` of its operands and kept buffers many times before its first launch (each read of the
   * addon's accessor is a native call).
   */
  #freed = false;

  /**
   * Anything else that answers to this class (a Proxy of a buffer, an object made from its
   * prototype) reads as freed, so validation refuses it as it refuses a freed buffer (a typed
   * error naming the argument, not a TypeError from the private field).
   */
  get freed(): boolean {
    return #freed in this ? this.#freed : true;
  }

  /** Whether `b` is a buffer this class made (not a Proxy of one, nor an object from its prototype). */
  static made(b: unknown): b is CudaDeviceBuffer {
    return typeof b === 'object' && b !== null && #freed in b;
  }

  /**
   * @internal Whether `b` is a buffer this class made on device `deviceIndex`, branded, not freed
   * and of exactly `bytes` bytes: a live buffer's checks and CudaBackend.owns in one call, its state
   * read here rather than through the `freed` getter (a device layer checks each operand this way).
   */
  static ownedLive(b: unknown, deviceIndex: number, bytes: number): boolean {
    return typeof b === 'object' && b !== null && #freed in b && b[DEVICE_BUFFER_BRAND] === true && !b.#freed && b.byteLength === bytes && b.deviceIndex === deviceIndex;
  }

  /**
   * @internal The addon's buffer behind `b` where it is a buffer of this class (instanceof) on
   * `stream`, made by it and not freed; else null. A queued layer's run argument, no getter read.
   */
  static nativeOn(b: unknown, stream: NativeStream): NativeDeviceBuffer | null {
    return b instanceof CudaDeviceBuffer && b.stream === stream && #freed in b && !b.#freed ? b.native : null;
  }

  free(): void {
    this.#freed = true;
    this.native.free();
  }
}
