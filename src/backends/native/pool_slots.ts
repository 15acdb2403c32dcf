/**
 * How many cpu addon calls of this thread run on libuv's thread pool at once.
 *
 * Why: each addon call holds one thread of libuv's pool (UV_THREADPOOL_SIZE, default 4) while it
 * computes, and that pool also serves the process's own file, DNS, zlib and crypto work, first
 * come first served. With every call in flight handed to it, a server's readFile waited behind all
 * of them. Here at most half the pool's threads take calls (each call still spreads over the
 * engine's own threads, so the cores stay busy); the other calls wait, first come first served.
 * The pool is the process's, these slots this thread's: several threads with cpu engines can
 * still fill it.
 */

/** libuv's pool size, as libuv reads it (UV_THREADPOOL_SIZE, 1..1024; default 4). */
export function uvThreadPoolSize(env: NodeJS.ProcessEnv = process.env): number {
  const n = Number(env.UV_THREADPOOL_SIZE);
  return Number.isInteger(n) && n >= 1 ? Math.min(n, 1024) : 4;
}

interface Waiter {
  owner: object;
  resolve(): void;
  reject(error: Error): void;
}

export class PoolSlots {
  private running = 0;
  private readonly waiting: Waiter[] = [];

  constructor(readonly limit: number) {}

  /** A slot now, or false when the call has to wait (slots taken, or calls waiting before it). */
  tryTake(): boolean {
    if (this.running >= this.limit || this.waiting.length > 0) return false;
    this.running++;
    return true;
  }

  /** A slot once one is free; rejects when cancel(owner) is called first. */
  take(owner: object): Promise<void> {
    if (this.tryTake()) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiting.push({ owner, resolve, reject }));
  }

  /** Gives a slot back: to the first waiting call, else free. */
  give(): void {
    const next = this.waiting.shift();
    if (next) next.resolve();
    else this.running--;
  }

  /** Rejects `owner`'s waiting calls with `error` (an engine disposed while its calls wait). */
  cancel(owner: object, error: Error): void {
    for (let i = this.waiting.length - 1; i >= 0; i--) {
      const w = this.waiting[i]!;
      if (w.owner !== owner) continue;
      this.waiting.splice(i, 1);
      w.reject(error);
    }
  }

  /** Calls holding a slot, and waiting for one. */
  get counts(): { running: number; waiting: number } {
    return { running: this.running, waiting: this.waiting.length };
  }
}

/** The slots of every cpu engine of this thread. */
export const addonPoolSlots = new PoolSlots(Math.max(1, Math.floor(uvThreadPoolSize() / 2)));
