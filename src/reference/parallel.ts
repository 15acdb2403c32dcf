/**
 * The sparse prefill reference spread over worker threads, for judging large (GPU-sized) outputs:
 * the inputs are copied once into SharedArrayBuffers that every worker reads, and each call runs a
 * list of query rows on one worker. Node-only; not part of `sparse-mla/reference`'s index.
 */
import type { Worker } from 'node:worker_threads';
import { SparseMlaError } from '../errors.js';
import { startWorker } from '../worker_start.js';
import type { SparsePrefillArgs, Tensor } from '../types.js';
import { readInteger } from './checks.js';
import { checkQueries, readSparsePrefillArgs, type PrefillShapes, type ReferenceAttentionResult } from './sparse_prefill.js';

export interface ReferencePool {
  readonly shapes: PrefillShapes;
  readonly workers: number;
  /** the reference for these query rows, computed on the next free worker */
  run(queries: readonly number[]): Promise<ReferenceAttentionResult>;
  close(): Promise<void>;
}

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

interface Pending {
  queries: readonly number[];
  resolve(r: ReferenceAttentionResult): void;
  reject(e: Error): void;
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
  const url = new URL('./parallel_worker.js', import.meta.url);
  const idle: Worker[] = [];
  const all: Worker[] = [];
  const queue: Pending[] = [];
  const busy = new Map<Worker, Pending>();
  let closed = false;

  const pump = (): void => {
    while (idle.length > 0 && queue.length > 0) {
      const w = idle.pop()!;
      const job = queue.shift()!;
      busy.set(w, job);
      w.postMessage({ queries: job.queries });
    }
  };

  await Promise.all(
    Array.from({ length: count }, () =>
      new Promise<void>((resolve, reject) => {
        const w = startWorker(url, { workerData: { args: sharedArgs } });
        all.push(w);
        w.on('message', (msg: { ready?: true; error?: string; result?: ReferenceAttentionResult }) => {
          if (msg.ready) {
            idle.push(w);
            resolve();
            pump();
            return;
          }
          const job = busy.get(w);
          busy.delete(w);
          idle.push(w);
          if (job) {
            if (msg.error !== undefined) job.reject(new SparseMlaError('BACKEND_FAILURE', `reference worker: ${msg.error}`));
            else job.resolve(msg.result!);
          }
          pump();
        });
        const die = (why: string): void => {
          const job = busy.get(w);
          busy.delete(w);
          const err = new SparseMlaError('WORKER_DIED', `a reference worker ${why}`);
          job?.reject(err);
          reject(err);
          if (!closed) {
            // fail everything still queued: the pool is no longer whole
            for (const p of queue.splice(0)) p.reject(err);
          }
        };
        w.on('error', (e) => die(`failed: ${e.message}`));
        w.on('exit', (code) => {
          if (!closed) die(`exited (code ${code})`);
        });
      }),
    ),
  );

  return {
    shapes,
    workers: all.length,
    run(queries) {
      if (closed) return Promise.reject(new SparseMlaError('DISPOSED', 'reference pool: closed'));
      // checked here, copied: a worker's refusal came back as BACKEND_FAILURE, and a Proxy could not be posted
      let rows: number[];
      try {
        rows = checkQueries(queries, shapes.sQ);
      } catch (e) {
        return Promise.reject(e);
      }
      return new Promise((resolve, reject) => {
        queue.push({ queries: rows, resolve, reject });
        pump();
      });
    },
    async close() {
      closed = true;
      await Promise.all(all.map((w) => w.terminate()));
    },
  };
}
