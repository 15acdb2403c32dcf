/**
 * The call discipline shared by the native backends (cpu, cuda): every addon call is tracked so
 * dispose() can wait for the calls in flight, calls after dispose() reject with DISPOSED, and any
 * addon error (thrown synchronously or from the promise) becomes a typed SparseMlaError.
 */
import { disposedError } from '../../errors.js';
import type { BackendName } from '../../types.js';
import { addonFailure } from './binding.js';

export class AddonCalls {
  /**
   * A list, not a Set: a Set that empties after each call rebuilds its table (an allocation per
   * call, a queued layer's included); a call takes its promise out by a swap with the last.
   */
  private readonly inFlight: Promise<unknown>[] = [];
  private disposed = false;

  constructor(private readonly backend: Exclude<BackendName, 'wasm'>) {}

  /** Throws DISPOSED once dispose() has been called. */
  assertAlive(): void {
    if (this.disposed) throw disposedError();
  }

  async run(op: string, start: () => Promise<void>): Promise<void> {
    this.assertAlive();
    let p: Promise<void>;
    try {
      p = start();
    } catch (e) {
      throw addonFailure(this.backend, op, e);
    }
    this.inFlight.push(p);
    try {
      await p;
    } catch (e) {
      throw addonFailure(this.backend, op, e);
    } finally {
      this.end(p);
    }
  }

  /**
   * For a caller that makes an addon call itself (after assertAlive) and maps its errors with
   * addonFailure as run does: dispose() waits for `p` from begin(p) until end(p).
   */
  begin(p: Promise<unknown>): void {
    this.inFlight.push(p);
  }

  end(p: Promise<unknown>): void {
    const list = this.inFlight;
    const i = list.indexOf(p);
    if (i < 0) return;
    list[i] = list[list.length - 1]!;
    list.pop();
  }

  /** Later calls reject with DISPOSED; resolves once the calls in flight have settled. */
  async dispose(): Promise<void> {
    this.disposed = true;
    await Promise.allSettled([...this.inFlight]);
  }
}
