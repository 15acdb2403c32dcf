/**
 * The sparse prefill reference spread over worker threads, for judging large (GPU-sized) outputs:
 * the inputs are copied once into SharedArrayBuffers that every worker reads, and each call runs a
 * list of query rows on one worker. Node-only; not part of `sparse-mla/reference`'s index.
 * A worker that dies is replaced (ReferenceWorkerPool says how); no run waits on a dead one.
 */
import type { Worker } from 'node:worker_threads';
import { SparseMlaError } from '../errors.js';
import { startWorker } from '../worker_start.js';
import type { SparsePrefillArgs, Tensor } from '../types.js';
import { readInteger } from './checks.js';
import { checkQueries, readSparsePrefillArgs, type PrefillShapes, type ReferenceAttentionResult } from './sparse_prefill.js';

export interface ReferencePool {
  readonly shapes: PrefillShapes;
  /** the workers asked for (one that dies is replaced) */
  readonly workers: number;
  /** the reference for these query rows, computed on the next free worker */
  run(queries: readonly number[]): Promise<ReferenceAttentionResult>;
  /** Ends every worker; runs queued or in flight reject with DISPOSED, and so do later ones. */
  close(): Promise<void>;
  /** @internal End a worker as a crash would, and look at the pool, from tests. */
  readonly testing: {
    terminateWorker(index: number): Promise<void>;
    states(): WorkerState[];
    /** 'message' listeners on each worker, this side */
    messageListeners(): number[];
    queued(): number;
  };
}

export type WorkerState = 'starting' | 'idle' | 'busy' | 'dead';

/** @internal Called with every worker a pool starts, so tests can make a start fail. */
export const referencePoolTesting: { onSpawn: ((worker: Worker) => void) | null } = { onSpawn: null };

/** A copy of a tensor whose data lives in a SharedArrayBuffer (zero-copy to workers). */
function shared<T extends Tensor>(t: T): T {
  const src = t.data;
  if (src.buffer instanceof SharedArrayBuffer) return t;
  const sab = new SharedArrayBuffer(src.byteLength);
  new Uint8Array(sab).set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
  const Ctor = src.constructor as new (b: SharedArrayBuffer) => typeof src;
  return { dtype: t.dtype, shape: [...t.shape], data: new Ctor(sab) } as unknown as T;
}

/** The most worker threads one pool starts. */
const MAX_WORKERS = 1024;

/** Failed starts in a row after which a dead worker's place stays empty. */
const MAX_START_FAILURES = 3;

interface Pending {
  queries: readonly number[];
  resolve(r: ReferenceAttentionResult): void;
  reject(e: Error): void;
}

interface Slot {
  readonly index: number;
  /** one of the workers createReferencePool waits for (not a replacement) */
  readonly first: boolean;
  readonly worker: Worker;
  state: WorkerState;
  job: Pending | null;
  /** what the worker's 'error' event said, for the message of its exit */
  lastError: Error | null;
  /** settles once the worker is ready, or rejects when it exits first */
  started: Promise<void>;
  markStarted(): void;
  failStart(e: SparseMlaError): void;
}

const WORKER_URL = new URL('./parallel_worker.js', import.meta.url);

function describeRows(rows: readonly number[]): string {
  return `query rows ${rows.slice(0, 8).join(', ')}${rows.length > 8 ? `, … (${rows.length} rows)` : ''}`;
}

const closedError = (): SparseMlaError => new SparseMlaError('DISPOSED', 'reference pool: closed');

/**
 * The workers and their queue. A worker that exits (a crash, terminate(), out of memory) while idle
 * or busy is replaced at once, and the rows it was computing reject with WORKER_DIED; queued rows go
 * on. A replacement that exits before it is ready is started again, up to MAX_START_FAILURES in a
 * row; after that its place stays empty, and once no worker is left, queued and later runs reject
 * with BACKEND_FAILURE naming the cause instead of waiting for a worker that will not come.
 * Idle workers are unref'd, so a pool that was never closed does not hold the process open.
 */
class ReferenceWorkerPool implements ReferencePool {
  private readonly slots: Slot[] = [];
  private readonly queue: Pending[] = [];
  private closed = false;
  /** while createReferencePool waits for the first workers: one of those failing to start fails the pool */
  private creating = true;
  private startFailures = 0;
  private broken: SparseMlaError | null = null;

  constructor(
    readonly shapes: PrefillShapes,
    readonly workers: number,
    private readonly args: SparsePrefillArgs,
  ) {}

  async start(): Promise<void> {
    try {
      for (let i = 0; i < this.workers; i++) this.slots.push(this.spawn(i, true));
      await Promise.all(this.slots.map((s) => s.started));
    } catch (e) {
      // the workers that did start would keep the process alive
      await this.close();
      throw e instanceof SparseMlaError ? e : new SparseMlaError('BACKEND_FAILURE', `reference pool: a worker could not be started: ${e instanceof Error ? e.message : String(e)}`);
    }
    this.creating = false;
  }

  private spawn(index: number, first: boolean): Slot {
    const worker = startWorker(WORKER_URL, { workerData: { args: this.args } });
    let markStarted!: () => void;
    let failStart!: (e: SparseMlaError) => void;
    const started = new Promise<void>((resolve, reject) => {
      markStarted = resolve;
      failStart = reject;
    });
    started.catch(() => {}); // a replacement's failed start is handled in onExit
    const slot: Slot = { index, first, worker, state: 'starting', job: null, lastError: null, started, markStarted, failStart };
    worker.on('message', (msg: { ready?: true; error?: string; result?: ReferenceAttentionResult }) => this.onMessage(slot, msg));
    worker.on('messageerror', (e: Error) => this.finish(slot, (job) => job.reject(new SparseMlaError('BACKEND_FAILURE', `reference pool: the result of ${describeRows(job.queries)} could not be read: ${e.message}`))));
    worker.on('error', (e: Error) => {
      slot.lastError = e;
    });
    worker.on('exit', (code: number) => this.onExit(slot, code));
    referencePoolTesting.onSpawn?.(worker);
    return slot;
  }

  private onMessage(slot: Slot, msg: { ready?: true; error?: string; result?: ReferenceAttentionResult }): void {
    if (msg.ready) {
      if (slot.state !== 'starting') return;
      slot.state = 'idle';
      this.startFailures = 0;
      slot.worker.unref();
      slot.markStarted();
      this.pump();
      return;
    }
    this.finish(slot, (job) => {
      if (msg.error !== undefined) job.reject(new SparseMlaError('BACKEND_FAILURE', `reference worker: ${msg.error}`));
      else job.resolve(msg.result!);
    });
  }

  /** A busy worker's job is done (settled by `settle`): the worker takes the next one. */
  private finish(slot: Slot, settle: (job: Pending) => void): void {
    const job = slot.job;
    if (slot.state !== 'busy' || job === null) return;
    slot.job = null;
    slot.state = 'idle';
    slot.worker.unref();
    settle(job);
    this.pump();
  }

  private onExit(slot: Slot, code: number): void {
    const previous = slot.state;
    slot.state = 'dead';
    const job = slot.job;
    slot.job = null;
    const cause = `reference worker #${slot.index} exited (code ${code})${slot.lastError ? `: ${slot.lastError.message}` : ''}`;
    if (previous === 'starting') slot.failStart(new SparseMlaError('BACKEND_FAILURE', `reference pool: a worker failed to start: ${cause}`));
    if (this.closed) {
      job?.reject(closedError());
      return;
    }
    if (job) job.reject(new SparseMlaError('WORKER_DIED', `reference pool: ${cause} while computing ${describeRows(job.queries)}; those rows were lost (the pool starts a replacement)`, 'worker'));
    if (this.slots[slot.index] !== slot) return;
    if (previous === 'starting') {
      if (slot.first && this.creating) return; // start() fails the pool
      if (++this.startFailures >= MAX_START_FAILURES) {
        this.breakIfNoWorker(`${this.startFailures} replacement workers in a row failed to start (the last: ${cause})`);
        return;
      }
    }
    try {
      this.slots[slot.index] = this.spawn(slot.index, false);
    } catch (e) {
      // no worker can even be made here (thrown, not emitted): the place stays empty
      this.breakIfNoWorker(`a replacement for ${cause} could not be started: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  /** With no worker running or starting, queued and later runs reject instead of waiting. */
  private breakIfNoWorker(why: string): void {
    if (this.slots.some((s) => s.state !== 'dead')) return;
    this.broken = new SparseMlaError('BACKEND_FAILURE', `reference pool: no worker is running: ${why}; create a new pool`);
    for (const p of this.queue.splice(0)) p.reject(this.broken);
  }

  private pump(): void {
    while (this.queue.length > 0) {
      const slot = this.slots.find((s) => s.state === 'idle');
      if (!slot) return;
      const job = this.queue.shift()!;
      slot.state = 'busy';
      slot.job = job;
      slot.worker.ref(); // a run in flight keeps the process alive
      slot.worker.postMessage({ queries: job.queries });
    }
  }

  run(queries: readonly number[]): Promise<ReferenceAttentionResult> {
    if (this.closed) return Promise.reject(closedError());
    if (this.broken) return Promise.reject(this.broken);
    // checked here, copied: a worker's refusal came back as BACKEND_FAILURE, and a Proxy could not be posted
    let rows: number[];
    try {
      rows = checkQueries(queries, this.shapes.sQ);
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise((resolve, reject) => {
      this.queue.push({ queries: rows, resolve, reject });
      this.pump();
    });
  }

  async close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      for (const p of this.queue.splice(0)) p.reject(closedError());
      for (const s of this.slots) {
        s.job?.reject(closedError());
        s.job = null;
      }
    }
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }

  readonly testing = {
    terminateWorker: async (index: number): Promise<void> => {
      await this.slots[index]?.worker.terminate();
    },
    states: (): WorkerState[] => this.slots.map((s) => s.state),
    messageListeners: (): number[] => this.slots.map((s) => s.worker.listenerCount('message')),
    queued: (): number => this.queue.length,
  };
}

export async function createReferencePool(args: SparsePrefillArgs, workers: number): Promise<ReferencePool> {
  // the arguments as checked, each read once: what the workers get is what was checked
  const { shapes, plain } = readSparsePrefillArgs(args);
  // a count that is no integer ≥ 1 made no worker (NaN): run() then waited forever
  const count = readInteger(workers, 'workers', 1, MAX_WORKERS);
  const sharedArgs: SparsePrefillArgs = {
    q: shared(plain.q),
    kv: shared(plain.kv),
    indices: shared(plain.indices),
    smScale: plain.smScale,
    dV: plain.dV,
    attnSink: plain.attnSink && shared(plain.attnSink),
    topkLength: plain.topkLength && shared(plain.topkLength),
  };
  const pool = new ReferenceWorkerPool(shapes, count, sharedArgs);
  await pool.start();
  return pool;
}
