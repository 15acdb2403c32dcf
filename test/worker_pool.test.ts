/**
 * The WASM worker pool (SPEC §8, §9): calls split across workers by rows give the single-worker
 * bits, tiny calls stay on one worker, concurrent calls equal sequential ones and are served in
 * order, a worker killed mid-call rejects that call with WORKER_DIED and is replaced, a worker that
 * fails to start is retried with backoff without stopping the healthy ones, dispose ends
 * the workers (the process exits) and later calls reject with DISPOSED.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import type { Engine, KvCache, SparsePrefillArgs, SparsePrefillResult } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import { startRetryDelayMs } from '../dist/backends/wasm/pool.js';
import { randomBf16Bits, randomIndices, randomPrefillArgs, testRng, type Rng } from './helpers/random.js';
import { expectWithinBounds } from './helpers/judge.js';
import { tempDirs } from './helpers/temp_dirs.js';

const rng = testRng('worker_pool');
let one: Engine;
let two: Engine;

beforeAll(async () => {
  [one, two] = await Promise.all([createEngine({ backend: 'wasm', workers: 1 }), createEngine({ backend: 'wasm', workers: 2 })]);
});
afterAll(async () => {
  await Promise.all([one?.dispose(), two?.dispose()]);
});

const poolOf = (e: Engine) => (engineBackend(e) as WasmBackend).pool;

function prefillArgs(r: Rng, sQ: number, hQ: number, dQK: number, sKV: number, topk: number, withExtras = true): SparsePrefillArgs {
  return {
    ...randomPrefillArgs(r, { sQ, hQ, dQK, sKV, topk }, { invalidFraction: 0.1, duplicateFraction: 0.05 }),
    dV: 512,
    ...(withExtras
      ? {
          attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => r.normal())),
          topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => r.int(0, topk + 3))),
        }
      : {}),
  };
}

const hex = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');
const resultBits = (r: { out: { data: Uint16Array }; lse: { data: Float32Array }; maxLogits: { data: Float32Array } }) =>
  `${hex(r.out.data)}|${hex(r.lse.data)}|${hex(r.maxLogits.data)}`;

/** A few rows against the float64 reference, with SPEC §4's bounds. */
function expectRowsMatchReference(a: SparsePrefillArgs, r: SparsePrefillResult, rows: number[]): void {
  expectWithinBounds('rows', r, R.sparsePrefillReference(a, { queries: rows }), rows);
}

/** Records which workers a pool dispatches to while fn runs. */
async function dispatches<T>(e: Engine, fn: () => Promise<T>): Promise<{ value: T; workers: number[]; labels: string[] }> {
  const workers: number[] = [];
  const labels: string[] = [];
  const off = poolOf(e).testing.onDispatch((w, label) => {
    workers.push(w);
    labels.push(label);
  });
  try {
    return { value: await fn(), workers, labels };
  } finally {
    off();
  }
}

describe('splitting', () => {
  test('a large sparsePrefill is split by query rows over both workers and equals one worker bit for bit', async () => {
    const a = prefillArgs(rng, 61, 16, 576, 700, 256);
    const split = await dispatches(two, () => two.sparsePrefill(a));
    expect(new Set(split.workers).size).toBe(2);
    expect(split.labels.join(' ')).toMatch(/rows 0\.\.30 .*rows 31\.\.60/);
    const single = await dispatches(one, () => one.sparsePrefill(a));
    expect(single.workers).toHaveLength(1);
    expect(resultBits(split.value)).toBe(resultBits(single.value));
    // ...and is real math: rows on both sides of the split against an inline float64 reference.
    expectRowsMatchReference(a, split.value, [0, 30, 31, 60]);
  });

  test('a tiny call stays on one worker', async () => {
    const a = prefillArgs(rng, 2, 1, 64, 16, 8);
    a.dV = 64;
    const d = await dispatches(two, () => two.sparsePrefill(a));
    expect(d.workers).toHaveLength(1);
    expectRowsMatchReference(a, d.value, [0, 1]);
  });

  test('sQ = 0 returns empty outputs without dispatching', async () => {
    const a = prefillArgs(rng, 0, 4, 512, 10, 16);
    const d = await dispatches(two, () => two.sparsePrefill(a));
    expect(d.workers).toHaveLength(0);
    expect(d.value.out.shape).toEqual([0, 4, 512]);
    expect(d.value.lse.data.length).toBe(0);
  });

  test('pagedSparseAttention split by rows equals one worker', async () => {
    const main = randomCache(rng, 64, 6);
    const extra = randomCache(rng, 2, 40);
    const n = 40;
    const hQ = 16;
    const args = {
      q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)),
      kCache: main,
      indices: tensor('int32', [n, 128], randomIndices(rng, n, 128, 64 * 6, { invalidFraction: 0.1 })),
      extraKCache: extra,
      extraIndices: tensor('int32', [n, 32], randomIndices(rng, n, 32, 80, { invalidFraction: 0.1 })),
      attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
      smScale: 0.04,
    };
    const split = await dispatches(two, () => two.pagedSparseAttention(args));
    expect(new Set(split.workers).size).toBe(2);
    const single = await one.pagedSparseAttention(args);
    expect(resultBits(split.value)).toBe(resultBits(single));
  });

  test('dequantize and quantize split by token rows equal one worker, for v4 and v32', async () => {
    for (const format of ['v4', 'v32'] as const) {
      const rowDim = format === 'v4' ? 512 : 576;
      const n = 12000;
      const geometry = format === 'v4' ? { pageSize: 64, numPages: Math.ceil((n + 100) / 64) } : { numTokens: n + 100 };
      const ids = Int32Array.from({ length: n }, () => rng.int(0, n + 100));
      const rows = tensor('bf16', [n, rowDim], randomBf16Bits(rng, n * rowDim, 3));
      const c1 = createKvCache(format, geometry);
      const c2 = createKvCache(format, geometry);
      const q2 = await dispatches(two, () => two.quantizeKCache({ cache: c2, tokenIds: tensor('int32', [n], ids), rows }));
      expect(new Set(q2.workers).size).toBe(2);
      await one.quantizeKCache({ cache: c1, tokenIds: tensor('int32', [n], ids), rows });
      expect(Buffer.compare(c1.data, c2.data)).toBe(0);
      expect(c2.data.some((b) => b !== 0)).toBe(true);
      const d2 = await dispatches(two, () => two.dequantizeKCachePaged({ cache: c2, tokenIds: Array.from(ids) }));
      expect(new Set(d2.workers).size).toBe(2);
      const d1 = await one.dequantizeKCachePaged({ cache: c1, tokenIds: Array.from(ids) });
      expect(hex(d2.value.data)).toBe(hex(d1.data));
      // Rope dims (v4: the last 64) round-trip exactly as bf16; pick a token written once.
      const lastWriter = new Map<number, number>();
      ids.forEach((id, i) => lastWriter.set(id, i));
      const probe = ids.findIndex((id, i) => lastWriter.get(id) === i);
      const ropeStart = format === 'v4' ? 448 : 512;
      for (let d = ropeStart; d < rowDim; d++) expect(d2.value.data[probe * rowDim + d]).toBe(rows.data[probe * rowDim + d]);
    }
  });
});

function randomCache(r: Rng, pageSize: number, numPages: number): KvCache {
  const c = createKvCache('v4', { pageSize, numPages });
  for (let i = 0; i < c.data.length; i++) c.data[i] = r.int(0, 256) & 0x77; // finite e4m3 / ue8m0 bytes
  return c;
}

describe('concurrency', () => {
  test('many concurrent calls give the same results as the same calls one after another', async () => {
    const calls = Array.from({ length: 14 }, (_, i) => prefillArgs(rng, 1 + rng.int(0, 40), [1, 4, 16][i % 3]!, i % 2 ? 512 : 576, 64 + rng.int(0, 400), [16, 128, 200][i % 3]!));
    const cache = randomCache(rng, 16, 8);
    const deqIds = Array.from({ length: 300 }, () => rng.int(0, 128));
    const sequential: string[] = [];
    for (const a of calls) sequential.push(resultBits(await two.sparsePrefill(a)));
    const seqDeq = hex((await two.dequantizeKCachePaged({ cache, tokenIds: deqIds })).data);
    const [concurrent, conDeq] = await Promise.all([
      Promise.all(calls.map(async (a) => resultBits(await two.sparsePrefill(a)))),
      two.dequantizeKCachePaged({ cache, tokenIds: deqIds }).then((t) => hex(t.data)),
    ]);
    expect(concurrent).toEqual(sequential);
    expect(conDeq).toBe(seqDeq);
  });

  test('calls queue first-come first-served', async () => {
    const order: number[] = [];
    const a = prefillArgs(rng, 8, 16, 512, 256, 128);
    await Promise.all([0, 1, 2, 3, 4].map((k) => one.sparsePrefill(a).then(() => order.push(k))));
    expect(order).toEqual([0, 1, 2, 3, 4]);
  });
});

describe('a worker that dies', () => {
  test('rejects its in-flight call with WORKER_DIED, is replaced, and the next call succeeds', async () => {
    const engine = await createEngine({ backend: 'wasm', workers: 2 });
    try {
      const pool = poolOf(engine);
      const threadsBefore = pool.testing.threadIds();
      const big = prefillArgs(rng, 48, 64, 512, 2048, 512, false);
      let killed = -1;
      const off = pool.testing.onDispatch((w) => {
        if (killed >= 0) return;
        killed = w;
        // Kill it while it computes (the call takes far longer than this delay).
        setTimeout(() => void pool.testing.terminateWorker(w), 30);
      });
      const err = await engine.sparsePrefill(big).catch((e: unknown) => e);
      off();
      expect(err).toBeInstanceOf(SparseMlaError);
      expect((err as SparseMlaError).code).toBe('WORKER_DIED');
      expect((err as SparseMlaError).message).toMatch(new RegExp(`worker #${killed} exited .*sparsePrefill rows .*replaced`));

      const small = prefillArgs(rng, 12, 4, 512, 100, 64);
      const [after, reference] = await Promise.all([engine.sparsePrefill(small), one.sparsePrefill(small)]);
      expect(resultBits(after)).toBe(resultBits(reference));
      const threadsAfter = pool.testing.threadIds();
      expect(threadsAfter[killed]).not.toBe(threadsBefore[killed]);
      expect(threadsAfter[killed]).toBeGreaterThan(0);
      // Both workers serve again, once the survivor has finished its (now unobserved) share and the
      // replacement has finished starting (a part queued before then goes to the idle survivor).
      while (pool.testing.idleWorkers().length < 2) await new Promise((r) => setTimeout(r, 10));
      const again = await dispatches(engine, () => engine.sparsePrefill(prefillArgs(rng, 40, 16, 512, 600, 256)));
      expect(new Set(again.workers).size).toBe(2);
    } finally {
      await engine.dispose();
    }
  });
});

/** Polls `cond` every 5 ms until it holds; throws after `ms`. */
async function until(cond: () => boolean, ms = 20_000, what = 'the condition'): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Ends worker `index` (idle), then its replacements while they start, `times` times. */
async function failStarts(e: Engine, index: number, times: number): Promise<void> {
  const pool = poolOf(e);
  await until(() => pool.testing.states()[index] === 'idle', 20_000, `worker #${index} idle`);
  await pool.testing.terminateWorker(index);
  for (let k = 0; k < times; k++) {
    await until(() => pool.testing.states()[index] === 'starting', 20_000, `a replacement of worker #${index} starting`);
    await pool.testing.terminateWorker(index);
  }
}

describe('workers that fail to start', () => {
  test('a replacement ended while it starts, three times: calls run on the healthy worker and the slot is retried until it starts', async () => {
    const engine = await createEngine({ backend: 'wasm', workers: 2 });
    try {
      await failStarts(engine, 0, 3);
      const a = prefillArgs(rng, 3, 2, 512, 50, 16);
      expectRowsMatchReference(a, await engine.sparsePrefill(a), [0, 1, 2]);
      await until(() => poolOf(engine).testing.states()[0] === 'idle', 20_000, 'worker #0 restarted');
      const b = prefillArgs(rng, 40, 16, 512, 600, 256);
      const again = await dispatches(engine, () => engine.sparsePrefill(b));
      expect(new Set(again.workers).size).toBe(2);
      expectRowsMatchReference(b, again.value, [0, 39]);
    } finally {
      await engine.dispose();
    }
  });

  test('with no worker running, calls are refused with BACKEND_FAILURE while starts fail, and served again once one starts', async () => {
    const engine = await createEngine({ backend: 'wasm', workers: 1 });
    try {
      await failStarts(engine, 0, 3);
      const a = prefillArgs(rng, 3, 2, 512, 50, 16);
      const err = await engine.sparsePrefill(a).catch((e: unknown) => e);
      // refused at once unless the retry has already brought a worker up
      if (err instanceof SparseMlaError) {
        expect(err.code).toBe('BACKEND_FAILURE');
        expect(err.message).toMatch(/no worker is running: 3 worker starts in a row failed.*retrying in/);
      } else {
        expectRowsMatchReference(a, err as SparsePrefillResult, [0, 1, 2]);
      }
      await until(() => poolOf(engine).testing.states()[0] === 'idle', 20_000, 'worker #0 restarted');
      expectRowsMatchReference(a, await engine.sparsePrefill(a), [0, 1, 2]);
    } finally {
      await engine.dispose();
    }
  });

  test('the retry delay: at once after one failure, then 0.1 s doubling up to 10 s', () => {
    expect([1, 2, 3, 4, 8, 9, 20].map(startRetryDelayMs)).toEqual([0, 100, 200, 400, 6400, 10_000, 10_000]);
  });
});

describe('dispose', () => {
  test('rejects running and queued calls and every later call with DISPOSED; idempotent', async () => {
    const engine = await createEngine({ backend: 'wasm', workers: 1 });
    const a = prefillArgs(rng, 32, 64, 512, 1024, 512, false);
    const running = engine.sparsePrefill(a).catch((e: unknown) => e);
    const queued = engine.sparsePrefill(a).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 20));
    await engine.dispose();
    await engine.dispose();
    for (const e of [await running, await queued, await engine.sparsePrefill(a).catch((x: unknown) => x), await engine.dequantizeKCachePaged({ cache: createKvCache('v4', { pageSize: 2, numPages: 1 }), tokenIds: [0] }).catch((x: unknown) => x)]) {
      expect(e).toBeInstanceOf(SparseMlaError);
      expect((e as SparseMlaError).code).toBe('DISPOSED');
    }
  });

  const distIndex = fileURLToPath(new URL('../dist/index.js', import.meta.url));
  const scriptDir = tempDirs('sparse-mla-exit-');
  function runScript(body: string): { status: number | null; stdout: string; stderr: string; ms: number } {
    const dir = scriptDir();
    const file = join(dir, 'script.mjs');
    writeFileSync(
      file,
      `import { createEngine, tensor } from ${JSON.stringify(distIndex)};\n` +
        `const e = await createEngine({ backend: 'wasm', workers: 2 });\n` +
        `const r = await e.sparsePrefill({ q: tensor('bf16', [4, 2, 512]), kv: tensor('bf16', [8, 512]), indices: tensor('int32', [4, 4], new Int32Array(16)), smScale: 0.1 });\n` +
        `console.log('lse', r.lse.data[0]);\n${body}\n`,
    );
    const t0 = Date.now();
    const p = spawnSync(process.execPath, [file], { timeout: 30_000, encoding: 'utf8' });
    return { status: p.status, stdout: p.stdout, stderr: p.stderr, ms: Date.now() - t0 };
  }

  test('after dispose the process exits on its own', () => {
    const r = runScript(`await e.dispose(); console.log('disposed');`);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('disposed');
    expect(r.stdout).toMatch(/lse [\d.]+/);
  });

  test.skipIf(process.platform !== 'linux')('engines dropped without dispose(): their workers end once the engines are collected', () => {
    const child = fileURLToPath(new URL('./children/undisposed_engines.mjs', import.meta.url));
    const p = spawnSync(process.execPath, ['--expose-gc', child], { timeout: 30_000, encoding: 'utf8' });
    expect(p.stderr).toBe('');
    const { before, made, after } = JSON.parse(p.stdout) as { before: number; made: number; after: number };
    expect(made).toBeGreaterThanOrEqual(before + 12); // six engines of two workers
    // (V8's and libuv's own threads may start meanwhile: a few, not the twelve workers)
    expect(after).toBeLessThanOrEqual(before + 3);
  });

  test('an engine that is never disposed does not keep the process alive either', () => {
    const r = runScript(`console.log('done');`);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('done');
  });
});
