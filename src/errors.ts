/** Every error the library throws on purpose is a SparseMlaError with a stable `code`. */
export type ErrorCode =
  | 'INVALID_DTYPE' // a tensor of the wrong element type
  | 'INVALID_SHAPE' // wrong rank or a dimension that does not match
  | 'INVALID_VALUE' // a scalar or option outside what is allowed (NaN scale, unknown enum, ...)
  | 'OUT_OF_RANGE' // a cache token id outside the cache
  | 'TOO_LARGE' // a size that would overflow 32-bit offsets, the WASM heap or a budget
  | 'BACKEND_UNAVAILABLE' // asked for a backend that is not built / has no device
  | 'BACKEND_FAILURE' // the backend reported an internal failure (CUDA error, core status)
  | 'WORKER_DIED' // a WASM worker exited with a call in flight
  | 'DISPOSED'; // the engine was disposed

export class SparseMlaError extends Error {
  readonly code: ErrorCode;
  /** The argument the error is about, when there is one (e.g. `indices`, `kCache.data`). */
  readonly argument?: string;

  constructor(code: ErrorCode, message: string, argument?: string) {
    super(message);
    this.name = 'SparseMlaError';
    this.code = code;
    this.argument = argument;
  }
}

/** Throw a typed error naming the argument, what was expected and what came. */
export function fail(code: ErrorCode, argument: string, expected: string, got: string): never {
  throw new SparseMlaError(code, `${argument}: expected ${expected}, got ${got}`, argument);
}

/** What every call on a disposed engine rejects with. */
export function disposedError(): SparseMlaError {
  return new SparseMlaError('DISPOSED', 'the engine was disposed; create a new one with createEngine()', 'engine');
}
