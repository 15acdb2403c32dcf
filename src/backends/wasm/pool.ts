/**
 * A pool of worker_threads, each holding one instance of the WASM core, driven through comlink.
 *
 * How inputs reach the workers, and why
 * -------------------------------------
 * A WebAssembly instance can only read its own linear memory, and this toolchain builds no
 * threads/shared-memory variant of the module (Emscripten 3.1.6 standalone, no MEMORY64), so one
 * memory cannot be shared by several instances: every worker needs the bytes it works on inside
 * its own heap, i.e. at least one copy per worker. What we avoid is every *other* copy:
 * - the backend places each input array once per call in its staging, SharedArrayBuffer slabs
 *   reused from call to call (../staging.ts; no copy at all when the caller's array already lives
 *   in shared memory), and sends only views of it: postMessage shares a SharedArrayBuffer instead
 *   of cloning it, so sending the same kv to N workers costs nothing on the main thread, and the
 *   slabs being reused, the references an idle worker keeps do not pile up memory;
 * - each worker then copies straight from the shared buffer into its heap: its own row range of
 *   q / indices / topkLength (rows) and the whole of what every row may touch (kv, caches, sink);
 * - outputs are copied out of the heap into fresh ArrayBuffers and *transferred* back (no clone);
 *   the main thread only concatenates them when a call was split.
 * The price is one copy of kv (or the caches) per worker per call — memcpy speed, small next to
 * the attention itself — and a heap per worker that must hold it (checked before any work:
 * TOO_LARGE; a call too big for one heap is cut into more row ranges than there are workers).
 * The cache ops avoid even that: for a dequant the main thread gathers just the requested tokens
 * (584 or 656 bytes each), part by part, into a compact cache, and a quantize fills a compact cache
 * in the worker that the main thread scatters into the caller's cache once every part succeeded —
 * so neither ever copies a whole cache, and a failed call leaves the cache untouched.
 * Inputs are captured when the call is made (the staged copies are taken synchronously), so the
 * caller may reuse its arrays at once — unless they already live in SharedArrayBuffers, which the
 * workers then read while the call runs.
 *
 * Scheduling: calls are split into tasks by the backend; tasks run first-come first-served on the
 * first idle worker, so concurrent calls queue fairly and a split call spreads over the pool.
 * A worker that exits (crash, terminate, trap) is replaced; the task it was running rejects with
 * WORKER_DIED. A replacement that fails to start is retried with exponential backoff (at once, then
 * after 0.1 s doubling up to 10 s). Calls keep running on the healthy workers meanwhile; only when
 * no worker is running and MAX_START_FAILURES starts in a row have failed are calls refused
 * (BACKEND_FAILURE, saying so) — and the retries go on, so the pool serves calls again as soon as
 * a worker starts. Idle workers and retry timers are unref'd so a forgotten engine does not keep
 * the process alive; dispose() terminates the workers and rejects whatever is queued or running
 * with DISPOSED.
 */
import type { Worker } from 'node:worker_threads';
import * as Comlink from 'comlink/dist/esm/comlink.mjs';
import nodeEndpoint from 'comlink/dist/esm/node-adapter.mjs';
// the published declarations name comlink's types through its package entry, which resolves where the library is installed
import type { Remote } from 'comlink';
import { SparseMlaError, disposedError } from '../../errors.js';
import { startWorker } from '../../worker_start.js';
import type { TaskResult, WorkerApi, WorkerInit, WorkerMemory } from './protocol.js';

const WORKER_URL = new URL('./worker.js', import.meta.url);

/** A worker whose heap grew past this is replaced after its task, to hand the memory back. */
const RETIRE_HEAP_BYTES = 1 << 30;
/** Consecutive start failures, with no worker running, after which calls are refused (retries go on). */
const MAX_START_FAILURES = 3;
/** Delay before retrying a start after the second failure in a row; doubles per further failure. */
const START_RETRY_BASE_MS = 100;
const START_RETRY_MAX_MS = 10_000;

/** How long to wait before the next start after `failures` consecutive start failures. */
export function startRetryDelayMs(failures: number): number {
  if (failures <= 1) return 0;
  return Math.min(START_RETRY_MAX_MS, START_RETRY_BASE_MS * 2 ** (failures - 2));
}

export type TaskMethod = Exclude<keyof WorkerApi, 'ready' | 'memory'>;
type TaskArg<M extends TaskMethod> = Parameters<WorkerApi[M]>[0];
export type TaskValue<M extends TaskMethod> = ReturnType<WorkerApi[M]> extends TaskResult<infer T> ? T : never;

/** Tasks of one call: once one fails, its queued siblings are dropped instead of run. */
export interface TaskGroup {
  failed: boolean;
}

interface Task {
  group: TaskGroup | null;
  method: TaskMethod;
  arg: unknown;
  label: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
}

interface Slot {
  index: number;
  worker: Worker;
  remote: Remote<WorkerApi>;
  state: 'starting' | 'idle' | 'busy' | 'retiring' | 'dead';
  task: Task | null;
  started: Promise<void>;
  lastError: Error | null;
}

export class WorkerPool {
  readonly size: number;
  private readonly init: WorkerInit;
  private readonly slots: Slot[] = [];
  private queue: Task[] = [];
  private disposed = false;
  private broken: SparseMlaError | null = null;
  private startFailures = 0;
  private readonly retryTimers = new Set<NodeJS.Timeout>();
  private readonly dispatchListeners = new Set<(workerIndex: number, label: string) => void>();

  private constructor(size: number, init: WorkerInit) {
    this.size = size;
    this.init = init;
  }

  /** Starts `size` workers and waits until each has instantiated the core. */
  static async create(size: number, init: WorkerInit): Promise<WorkerPool> {
    const pool = new WorkerPool(size, init);
    for (let i = 0; i < size; i++) pool.slots.push(pool.spawn(i));
    try {
      await Promise.all(pool.slots.map((s) => s.started));
    } catch (e) {
      await pool.dispose();
      throw e;
    }
    return pool;
  }

  private spawn(index: number): Slot {
    const worker = startWorker(WORKER_URL, { workerData: this.init });
    const remote = Comlink.wrap<WorkerApi>(nodeEndpoint(worker));
    let onStarted!: () => void;
    let onFailed!: (e: Error) => void;
    const started = new Promise<void>((res, rej) => {
      onStarted = res;
      onFailed = rej;
    });
    started.catch(() => {}); // observed by create(); later replacements only log through exit
    const slot: Slot = { index, worker, remote, state: 'starting', task: null, started, lastError: null };
    worker.on('error', (e: Error) => {
      slot.lastError = e;
    });
    worker.on('exit', (code: number) => {
      if (slot.state === 'starting') {
        onFailed(new SparseMlaError('BACKEND_FAILURE', `wasm worker #${index} failed to start (exit code ${code})${slot.lastError ? `: ${slot.lastError.message}` : ''}`, 'backend'));
      }
      this.onExit(slot, code);
    });
    remote.ready().then(
      () => {
        if (slot.state !== 'starting') return;
        slot.state = 'idle';
        this.startFailures = 0;
        this.broken = null;
        worker.unref();
        onStarted();
        this.pump();
      },
      (e: Error) => {
        slot.lastError = e;
        void worker.terminate();
      },
    );
    return slot;
  }

  private onExit(slot: Slot, code: number): void {
    const previous = slot.state;
    slot.state = 'dead';
    const task = slot.task;
    slot.task = null;
    if (task) {
      if (this.disposed) task.reject(disposedError());
      else {
        const why = slot.lastError ? ` (${slot.lastError.message})` : '';
        task.reject(
          new SparseMlaError(
            'WORKER_DIED',
            `wasm worker #${slot.index} exited with code ${code}${why} while running ${task.label}; the call was lost and the worker has been replaced`,
            'worker',
          ),
        );
      }
    }
    if (this.disposed || this.slots[slot.index] !== slot) return;
    if (previous !== 'starting') {
      this.slots[slot.index] = this.spawn(slot.index);
      return;
    }
    const failures = ++this.startFailures;
    const delay = startRetryDelayMs(failures);
    const healthy = this.slots.some((s) => s.state === 'idle' || s.state === 'busy');
    if (!healthy && failures >= MAX_START_FAILURES) {
      this.broken = new SparseMlaError(
        'BACKEND_FAILURE',
        `wasm: no worker is running: ${failures} worker starts in a row failed${slot.lastError ? ` (${slot.lastError.message})` : ''}; retrying in ${delay / 1000} s`,
        'backend',
      );
      for (const t of this.queue.splice(0)) t.reject(this.broken);
    }
    this.respawnLater(slot, delay);
  }

  /** Replaces a slot whose worker failed to start, after `delay` ms (a timer that does not hold the process). */
  private respawnLater(slot: Slot, delay: number): void {
    if (delay === 0) {
      this.slots[slot.index] = this.spawn(slot.index);
      return;
    }
    const timer = setTimeout(() => {
      this.retryTimers.delete(timer);
      if (!this.disposed && this.slots[slot.index] === slot) this.slots[slot.index] = this.spawn(slot.index);
    }, delay);
    timer.unref();
    this.retryTimers.add(timer);
  }

  /** Queues one task; resolves with the worker's value or rejects with its typed error. */
  run<M extends TaskMethod>(method: M, arg: TaskArg<M>, label: string = method, group: TaskGroup | null = null): Promise<TaskValue<M>> {
    if (this.disposed) return Promise.reject(disposedError());
    if (this.broken) return Promise.reject(this.broken);
    return new Promise<TaskValue<M>>((resolve, reject) => {
      this.queue.push({ group, method, arg, label, resolve: resolve as (v: unknown) => void, reject });
      this.pump();
    });
  }

  /**
   * Runs the tasks of one call; rejects with the first failure, and the call's tasks still queued
   * at that moment are dropped (running ones cannot be interrupted and finish unobserved).
   */
  runAll<M extends TaskMethod>(method: M, args: readonly { arg: TaskArg<M>; label: string }[]): Promise<TaskValue<M>[]> {
    const group: TaskGroup = { failed: false };
    return Promise.all(
      args.map(({ arg, label }) =>
        this.run(method, arg, label, group).catch((e: unknown) => {
          group.failed = true;
          throw e;
        }),
      ),
    );
  }

  private pump(): void {
    while (this.queue.length > 0 && !this.disposed) {
      const slot = this.slots.find((s) => s.state === 'idle');
      if (!slot) return;
      const task = this.queue.shift()!;
      if (task.group?.failed) {
        task.reject(new SparseMlaError('BACKEND_FAILURE', `${task.label}: dropped because another part of the same call failed`, 'backend'));
        continue;
      }
      this.assign(slot, task);
    }
  }

  private assign(slot: Slot, task: Task): void {
    slot.state = 'busy';
    slot.task = task;
    slot.worker.ref(); // a call in flight keeps the process alive
    for (const fn of this.dispatchListeners) fn(slot.index, task.label);
    const call = slot.remote[task.method] as unknown as (arg: unknown) => Promise<TaskResult<unknown>>;
    call(task.arg).then(
      (result) => {
        if (slot.task !== task) return; // the worker died first; the task is already settled
        slot.task = null;
        if (result.ok) task.resolve(result.value);
        else task.reject(new SparseMlaError(result.error.code, result.error.message, result.error.argument));
        const retire = (!result.ok && result.error.fatal) || (result.ok && result.heapBytes > RETIRE_HEAP_BYTES);
        this.release(slot, retire);
      },
      (e: Error) => {
        if (slot.task !== task) return;
        slot.task = null;
        task.reject(new SparseMlaError('BACKEND_FAILURE', `wasm worker #${slot.index}: ${task.label} failed: ${e?.message ?? String(e)}`, 'backend'));
        this.release(slot, true);
      },
    );
  }

  private release(slot: Slot, retire: boolean): void {
    if (slot.state !== 'busy') return;
    if (retire && !this.disposed) {
      slot.state = 'retiring'; // its exit spawns the replacement
      void slot.worker.terminate();
    } else {
      slot.state = 'idle';
      slot.worker.unref();
    }
    this.pump();
  }

  /** Terminates every worker; queued and running tasks reject with DISPOSED. Idempotent. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    for (const t of this.retryTimers) clearTimeout(t);
    this.retryTimers.clear();
    for (const t of this.queue.splice(0)) t.reject(disposedError());
    await Promise.all(
      this.slots.map(async (s) => {
        const task = s.task;
        s.task = null;
        task?.reject(disposedError());
        s.state = 'dead';
        await s.worker.terminate();
      }),
    );
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  /**
   * Test and diagnostics hooks: observe dispatches, and end a worker as a crash would (so the
   * WORKER_DIED path can be exercised without a real crash).
   */
  readonly testing = {
    onDispatch: (fn: (workerIndex: number, label: string) => void): (() => void) => {
      this.dispatchListeners.add(fn);
      return () => this.dispatchListeners.delete(fn);
    },
    terminateWorker: async (workerIndex: number): Promise<void> => {
      await this.slots[workerIndex]?.worker.terminate();
    },
    threadIds: (): number[] => this.slots.map((s) => s.worker.threadId),
    busyWorkers: (): number[] => this.slots.filter((s) => s.state === 'busy').map((s) => s.index),
    idleWorkers: (): number[] => this.slots.filter((s) => s.state === 'idle').map((s) => s.index),
    states: (): Slot['state'][] => this.slots.map((s) => s.state),
    queued: (): number => this.queue.length,
    /** 'message' listeners on each worker, this side (comlink's one each) */
    messageListeners: (): number[] => this.slots.map((s) => s.worker.listenerCount('message')),
    /** Each running worker's memory (WorkerMemory), after a full collection in it when `collect` and the process has --expose-gc. */
    workerMemory: (collect = false): Promise<WorkerMemory[]> =>
      Promise.all(
        this.slots
          .filter((s) => s.state === 'idle' || s.state === 'busy')
          .map(async (s) => {
            s.worker.ref(); // an idle worker is unref'd: the answer must keep the process alive
            try {
              return (await s.remote.memory(collect)) as WorkerMemory;
            } finally {
              if (s.state === 'idle') s.worker.unref();
            }
          }),
      ),
  };
}

