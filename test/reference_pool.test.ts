/**
 * The reference worker pool (src/reference/parallel.ts, what `sparse-mla verify` runs the float64
 * reference on) when its workers die: a worker that dies while idle is replaced and later work
 * completes (it stayed listed as idle, and a run() posted to it waited forever); a worker that dies
 * mid-task rejects that task with WORKER_DIED while the queued tasks complete on its replacement
 * (they were all rejected); when no replacement can start, queued and later runs reject with
 * BACKEND_FAILURE naming the cause, never hang; a pool that cannot start all its workers rejects
 * and leaves none running; close() rejects what is queued or running with DISPOSED (they hung) and
 * leaves no live worker, so the process exits, as it does when a pool is dropped unclosed; nothing
 * is added per call. Every result is compared with the single-thread float64 reference.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, test } from 'vitest';
import { SparseMlaError, tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { createReferencePool, referencePoolTesting } from '../dist/reference/parallel.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';
import { tempDirs } from './helpers/temp_dirs.js';

const rng = testRng('reference_pool');
const tempDir = tempDirs('reference_pool-');
const DIST_PARALLEL = pathToFileURL(join(import.meta.dirname, '..', 'dist', 'reference', 'parallel.js')).href;

/** Fresh random arguments with a sink, topkLength and invalid / duplicate indices. */
function freshArgs(sQ = 12, hQ = 4, topk = 48) {
  return {
    ...randomPrefillArgs(rng, { sQ, hQ, dQK: 576, sKV: topk + 40, topk }, { invalidFraction: 0.1, duplicateFraction: 0.05 }),
    dV: 512,
    attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
    topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(0, topk + 3))),
  };
}

/** The pool's result for `rows` is the single-thread float64 reference's, bit for bit. */
function expectReference(args: ReturnType<typeof freshArgs>, rows: number[], got: R.ReferenceAttentionResult): void {
  const want = R.sparsePrefillReference(args, { queries: rows });
  expect(Array.from(got.out), `out of rows ${rows}`).toEqual(Array.from(want.out));
  expect(Array.from(got.mag), `mag of rows ${rows}`).toEqual(Array.from(want.mag));
  expect(Array.from(got.lse), `lse of rows ${rows}`).toEqual(Array.from(want.lse));
  expect(Array.from(got.maxLogits), `maxLogits of rows ${rows}`).toEqual(Array.from(want.maxLogits));
}

/** What a promise settles to: its value, or the error it rejects with. */
const settle = <T>(p: Promise<T>): Promise<{ value?: T; error?: unknown }> => p.then((value) => ({ value }), (error: unknown) => ({ error }));

function expectTyped(e: unknown, code: string, message: RegExp): void {
  expect(e).toBeInstanceOf(SparseMlaError);
  expect((e as SparseMlaError).code).toBe(code);
  expect((e as SparseMlaError).message).toMatch(message);
}

afterEach(() => {
  referencePoolTesting.onSpawn = null;
});

describe('reference pool: dead workers', () => {
  test('a worker that dies while idle is replaced: later runs complete (they were posted to the dead worker and never settled)', async () => {
    const args = freshArgs();
    const pool = await createReferencePool(args, 1);
    try {
      await pool.testing.terminateWorker(0);
      const rows = [3, 0, 11];
      expectReference(args, rows, await pool.run(rows));
      // both workers of a pool of two, one after the other
      const two = await createReferencePool(args, 2);
      try {
        await two.testing.terminateWorker(0);
        await two.testing.terminateWorker(1);
        const lists = [[1, 2], [5], [11, 10, 9]];
        const got = await Promise.all(lists.map((r) => two.run(r)));
        lists.forEach((r, i) => expectReference(args, r, got[i]!));
        // both places filled again (the second replacement may still be starting)
        expect(two.testing.states().filter((state) => state !== 'idle' && state !== 'starting')).toEqual([]);
      } finally {
        await two.close();
      }
    } finally {
      await pool.close();
    }
  }, 10_000);

  test('a worker that dies mid-task rejects that task with WORKER_DIED naming the rows; the tasks queued behind it complete on its replacement (they were rejected too)', async () => {
    // the lost task is every row at hQ 16, topk 512: far longer than terminate() takes to land
    const args = freshArgs(12, 16, 512);
    const pool = await createReferencePool(args, 1);
    try {
      const lists = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7], [11, 4]];
      const runs = lists.map((r) => settle(pool.run(r)));
      expect(pool.testing.states()).toEqual(['busy']);
      await pool.testing.terminateWorker(0);
      const [lost, ...rest] = await Promise.all(runs);
      rest.forEach((r, i) => {
        expect(r.error).toBeUndefined();
        expectReference(args, lists[i + 1]!, r.value!);
      });
      expectTyped(lost!.error, 'WORKER_DIED', /exited.*query rows 0, 1, 2, 3, 4, 5, 6, 7, … \(12 rows\)/);
      // and the pool goes on
      expectReference(args, [6], await pool.run([6]));
    } finally {
      await pool.close();
    }
  }, 10_000);

  test('no replacement can start: a queued run and every later one reject with BACKEND_FAILURE naming the cause (they hung); with a worker still running, runs complete on it', async () => {
    const args = freshArgs();
    const pool = await createReferencePool(args, 1);
    try {
      referencePoolTesting.onSpawn = (w: Worker) => void w.terminate();
      await pool.testing.terminateWorker(0);
      const queued = await settle(pool.run([1]));
      expectTyped(queued.error, 'BACKEND_FAILURE', /no worker is running.*failed to start.*exited/);
      const later = await settle(pool.run([2]));
      expectTyped(later.error, 'BACKEND_FAILURE', /no worker is running/);
      expect(pool.testing.states()).toEqual(['dead']);
    } finally {
      await pool.close();
    }

    referencePoolTesting.onSpawn = null;
    const two = await createReferencePool(args, 2);
    try {
      referencePoolTesting.onSpawn = (w: Worker) => void w.terminate();
      await two.testing.terminateWorker(1);
      const lists = [[0], [3, 8], [10]];
      const got = await Promise.all(lists.map((r) => two.run(r)));
      lists.forEach((r, i) => expectReference(args, r, got[i]!));
    } finally {
      await two.close();
    }
  }, 10_000);

  test('a pool whose worker cannot start rejects with BACKEND_FAILURE and leaves no worker running (the others kept the process alive)', async () => {
    const started: Worker[] = [];
    const exited = new Set<Worker>();
    referencePoolTesting.onSpawn = (w: Worker) => {
      started.push(w);
      w.on('exit', () => exited.add(w));
      if (started.length === 2) void w.terminate();
    };
    const e = await settle(createReferencePool(freshArgs(), 3));
    expect(started.length).toBe(3);
    expect(started.filter((w) => !exited.has(w)).length, 'workers still running').toBe(0);
    expectTyped(e.error, 'BACKEND_FAILURE', /failed to start.*exited/);
  }, 10_000);
});

describe('reference pool: close and leaks', () => {
  test('close() rejects queued and running tasks with DISPOSED (they hung), ends every worker, and later runs reject with DISPOSED', async () => {
    const args = freshArgs();
    const pool = await createReferencePool(args, 2);
    const runs = [[0], [1, 2], [3], [4, 5]].map((r) => settle(pool.run(r)));
    await pool.close();
    for (const r of await Promise.all(runs)) {
      // a task may have finished before close(); what it gave is then the reference's
      if (r.error === undefined) continue;
      expectTyped(r.error, 'DISPOSED', /closed/);
    }
    expect(pool.testing.states()).toEqual(['dead', 'dead']);
    expectTyped((await settle(pool.run([0]))).error, 'DISPOSED', /closed/);
    await pool.close(); // again: nothing to do
  }, 10_000);

  test('many runs add nothing: the same listeners on each worker, nothing queued, every worker idle', async () => {
    const args = freshArgs(24, 2);
    const pool = await createReferencePool(args, 2);
    try {
      const before = pool.testing.messageListeners();
      const lists = Array.from({ length: 60 }, (_, i) => [i % 24, (i * 7) % 24]);
      const got = await Promise.all(lists.map((r) => pool.run(r)));
      for (const i of [0, 17, 59]) expectReference(args, lists[i]!, got[i]!);
      expect(pool.testing.messageListeners()).toEqual(before);
      expect(pool.testing.queued()).toBe(0);
      expect(pool.testing.states()).toEqual(['idle', 'idle']);
    } finally {
      await pool.close();
    }
  }, 20_000);

  test('the process exits on its own after close() (a worker killed mid-task and replaced first), and after a pool that was never closed', async () => {
    const dir = tempDir();
    const script = (closeIt: boolean): string => `
      import { createReferencePool } from ${JSON.stringify(DIST_PARALLEL)};
      const bf16 = (shape) => ({ dtype: 'bf16', shape, data: new Uint16Array(shape.reduce((a, b) => a * b)).fill(0x3f80) });
      // 64 queries of 16 heads over 512 rows: the first task is far longer than terminate() takes to land
      const indices = { dtype: 'int32', shape: [64, 512], data: Int32Array.from({ length: 64 * 512 }, (_, i) => (i * 7) % 600) };
      const args = { q: bf16([64, 16, 576]), kv: bf16([600, 576]), indices, smScale: 0.04, dV: 512 };
      const pool = await createReferencePool(args, 2);
      const runs = [Array.from({ length: 64 }, (_, i) => i), [2], [3]].map((r) => pool.run(r).then((x) => 'ok ' + x.lse.length, (e) => e.code));
      await pool.testing.terminateWorker(0);
      console.log((await Promise.all(runs)).join(' '));
      ${closeIt ? 'await pool.close();' : ''}
    `;
    for (const closeIt of [true, false]) {
      const file = join(dir, `pool_${closeIt}.mjs`);
      writeFileSync(file, script(closeIt));
      const r = spawnSync(process.execPath, [file], { encoding: 'utf8', timeout: 15_000 });
      expect([r.signal, r.status, r.stderr], `close() ${closeIt}`).toEqual([null, 0, '']);
      // worker 0 had every row in flight; [2] ran on worker 1; [3] on worker 1 or the replacement
      expect(r.stdout.trim(), `close() ${closeIt}`).toBe('WORKER_DIED ok 16 ok 16');
    }
  }, 40_000);
});
