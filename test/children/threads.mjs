// Child process of test/threads.test.ts: the library inside the caller's own worker_threads. A
// crash (what this guards against) ends the process with a signal instead of a report.
//   node threads.mjs engines <seed>            cpu engines in the main thread and 3 Workers at once
//   node threads.mjs end <backend> <how> <seed> Workers ended mid-call (how: terminate | exit)
//   node threads.mjs shared-cache <backend> <seed> a Worker quantizing into a cache in a SharedArrayBuffer of
//                                                the main thread, terminated mid-call, and one left to finish
//   node threads.mjs readfile <seed>           cpu calls in the main thread and 3 Workers, a file read behind them
//   node threads.mjs cancel <seed>             a Worker terminated during one long addon call writing into the
//                                                main thread's shared memory
//   node threads.mjs unload                    the addon loaded by Workers only, each ended right after its calls
//                                                (while an addon thread lingers), the process waiting past the linger
// Every mode prints one JSON report on stdout.
import { readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { createEngine, createKvCache, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits, randomIndices } from '../../dist/check/grid.js';
import { randomPrefillCall, withinBounds } from './judge.mjs';

const threadCount = () => readdirSync('/proc/self/task').length;
const hex = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('hex');

/** Inputs of each op from one seed: every thread given the same seed builds the same calls. */
function opInputs(seed) {
  const rng = makeRng(seed);
  const sQ = 24, hQ = 8, sKV = 700, topk = 128;
  const prefill = randomPrefillCall(rng, { sQ, hQ, sKV, topk });
  const tokens = 16 * 40, n = 500;
  const ids = Int32Array.from({ length: n }, () => rng.int(0, tokens));
  const rows = tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512));
  const m = 12;
  const paged = {
    q: tensor('bf16', [m, hQ, 512], randomBf16Bits(rng, m * hQ * 512)),
    indices: tensor('int32', [m, 96], randomIndices(rng, m, 96, tokens, 0.1, 0.05, [])),
    smScale: 1 / Math.sqrt(512),
  };
  return { prefill, quantize: { ids, rows, tokens }, paged };
}

/** One thread's share of `engines`: every op on its own cpu engine, several calls in flight at once. */
async function engineWork(seed) {
  const engine = await createEngine({ backend: 'cpu', workers: 2 });
  const { prefill, quantize, paged } = opInputs(seed);
  const cache = createKvCache('v4', { pageSize: 16, numPages: 40 });
  const refCache = createKvCache('v4', { pageSize: 16, numPages: 40 });
  R.quantizeKCacheReference(refCache, Array.from(quantize.ids), quantize.rows);
  const all = Array.from({ length: quantize.tokens }, (_, i) => i);
  const [p1, p2] = await Promise.all([engine.sparsePrefill(prefill), engine.sparsePrefill(prefill), engine.quantizeKCache({ cache, tokenIds: tensor('int32', [quantize.ids.length], quantize.ids), rows: quantize.rows })]);
  const pagedArgs = { ...paged, kCache: cache };
  const [pa, dq] = await Promise.all([engine.pagedSparseAttention(pagedArgs), engine.dequantizeKCachePaged({ cache, tokenIds: all })]);
  await engine.dispose();
  const refRows = R.dequantizeKCacheReference(refCache, all);
  return {
    prefillWithinBounds: withinBounds(p1, R.sparsePrefillReference(prefill), 8),
    prefillTwiceSame: hex(p1.out.data) === hex(p2.out.data) && hex(p1.lse.data) === hex(p2.lse.data),
    quantizeEqualsReference: Buffer.compare(cache.data, refCache.data) === 0,
    dequantEqualsReference: dq.data.every((b, i) => R.decodeBf16(b) === refRows[i]),
    pagedWithinBounds: withinBounds(pa, R.pagedSparseAttentionReference({ ...paged, kCache: refCache }), 8),
    bits: hex(new Uint8Array(await crypto.subtle.digest('SHA-256', Buffer.concat([p1.out.data, pa.out.data, cache.data].map((a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)))))),
  };
}

/** A long call of `op` on a fresh engine of `backend`, `count` of them in flight (more than libuv's 4 pool threads). */
async function startLongCalls(backend, op, count, seed) {
  const rng = makeRng(seed);
  const engine = await createEngine({ backend, workers: 2 });
  const calls = [];
  if (op === 'sparsePrefill' || op === 'pagedSparseAttention') {
    const sQ = 32, hQ = 16, topk = 512;
    const q = tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512));
    if (op === 'sparsePrefill') {
      const sKV = 3000;
      const a = { q, kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0, 0, [])), smScale: 0.05 };
      for (let i = 0; i < count; i++) calls.push(engine.sparsePrefill(a));
    } else {
      const kCache = createKvCache('v4', { pageSize: 64, numPages: 50 });
      const a = { q, kCache, indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, 64 * 50, 0, 0, [])), smScale: 0.05 };
      for (let i = 0; i < count; i++) calls.push(engine.pagedSparseAttention(a));
    }
  } else {
    const n = 6000;
    // the cache in shared memory, read in place: issuing a dequant copies nothing, so the 12 are in
    // flight together (with a copied cache, issuing them took about as long as running them, and
    // the last settled before terminate() now and then)
    const template = createKvCache('v4', { pageSize: 64, numPages: Math.ceil(n / 64) });
    const cache = { ...template, data: new Uint8Array(new SharedArrayBuffer(template.data.byteLength)) };
    const ids = tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => i));
    const rows = tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512));
    for (let i = 0; i < count; i++) calls.push(op === 'quantizeKCache' ? engine.quantizeKCache({ cache, tokenIds: ids, rows }) : engine.dequantizeKCachePaged({ cache, tokenIds: ids }));
  }
  return calls;
}

const OPS = ['sparsePrefill', 'quantizeKCache', 'dequantizeKCachePaged', 'pagedSparseAttention'];

/**
 * `readfile`: this thread's long cpu calls (inputs in shared memory: queued at once), each counted
 * in `settled[0]` when it settles; made once `ready()` (its inputs built) has returned.
 */
async function longPrefills(seed, count, settled, ready = () => {}) {
  const rng = makeRng(seed);
  const engine = await createEngine({ backend: 'cpu', workers: 1 });
  const shared = (x) => {
    const s = new x.constructor(new SharedArrayBuffer(x.byteLength));
    s.set(x);
    return s;
  };
  const sQ = 128, hQ = 16, sKV = 3000, topk = 512;
  const args = {
    q: tensor('bf16', [sQ, hQ, 512], shared(randomBf16Bits(rng, sQ * hQ * 512))),
    kv: tensor('bf16', [sKV, 512], shared(randomBf16Bits(rng, sKV * 512))),
    indices: tensor('int32', [sQ, topk], shared(randomIndices(rng, sQ, topk, sKV, 0, 0, []))),
    smScale: 0.05,
  };
  ready();
  const calls = Array.from({ length: count }, () => engine.sparsePrefill(args).finally(() => Atomics.add(settled, 0, 1)));
  return { calls, engine };
}

/**
 * `cancel`: one sparsePrefill of many long rows straight on the addon (one thread), its outputs in
 * the main thread's shared memory, so the main thread sees which rows were written and when.
 */
async function longAddonCall(seed, out, maxLogits, lse) {
  const { loadNativeAddon } = await import('../../dist/backends/native/binding.js');
  const rng = makeRng(seed);
  const sQ = out.length / (64 * 512), hQ = 64, sKV = 4096, topk = 2048;
  const call = loadNativeAddon().addon.cpu.sparsePrefill(1, {
    q: randomBf16Bits(rng, sQ * hQ * 512), kv: randomBf16Bits(rng, sKV * 512), indices: randomIndices(rng, sQ, topk, sKV, 0, 0, []),
    topkLength: null, attnSink: null, sQ, hQ, dQK: 512, dV: 512, sKV, topk, smScale: 0.05, out, maxLogits, lse,
  });
  return { call };
}

/**
 * Quantizes random rows into every token of `cache` (the main thread's shared memory), 4 calls in
 * flight, counting the calls that settle in `settled[0]` (shared memory too: a count is not lost
 * with the Worker, as a message in flight is).
 */
async function quantizeIntoShared(backend, cache, settled, seed) {
  const rng = makeRng(seed);
  const engine = await createEngine({ backend, workers: 2 });
  const n = cache.pageSize * cache.numPages;
  const ids = tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => i));
  // rows in shared memory are read in place: no staging per call
  const rowBits = new Uint16Array(new SharedArrayBuffer(n * 512 * 2));
  rowBits.set(randomBf16Bits(rng, n * 512));
  const rows = tensor('bf16', [n, 512], rowBits);
  return Array.from({ length: 4 }, () => engine.quantizeKCache({ cache, tokenIds: ids, rows }).finally(() => Atomics.add(settled, 0, 1)));
}

if (!isMainThread) {
  const { mode } = workerData;
  if (mode === 'engines') parentPort.postMessage(await engineWork(workerData.seed));
  else if (mode === 'readfile') {
    const { go } = workerData;
    const { calls, engine } = await longPrefills(workerData.seed, workerData.count, workerData.settled, () => {
      parentPort.postMessage('ready');
      Atomics.wait(go, 0, 0); // every thread's calls start together
    });
    parentPort.postMessage('started');
    await Promise.all(calls);
    await engine.dispose();
  } else if (mode === 'cancel') {
    const { call } = await longAddonCall(workerData.seed, workerData.out, workerData.maxLogits, workerData.lse);
    parentPort.postMessage('started');
    await call;
    parentPort.postMessage('finished');
  }
  else if (mode === 'unload') {
    // a few small calls, then this Worker ends as told while the addon thread that ran them lingers
    const engine = await createEngine({ backend: 'cpu', workers: 1 });
    const cache = createKvCache('v4', { pageSize: 16, numPages: 4 });
    const tokenIds = Array.from({ length: 64 }, (_, i) => i);
    await Promise.all([1, 2, 3].map(() => engine.dequantizeKCachePaged({ cache, tokenIds })));
    if (workerData.how === 'exit') process.exit(5);
    if (workerData.how === 'exit-in-then') {
      engine.dequantizeKCachePaged({ cache, tokenIds }).then(() => process.exit(6));
      engine.dequantizeKCachePaged({ cache, tokenIds });
    } else {
      if (workerData.how === 'terminate') setInterval(() => {}, 1000); // alive until terminated
      parentPort.postMessage('done');
    }
  }
  else if (mode === 'shared-cache') {
    const calls = await quantizeIntoShared(workerData.backend, workerData.cache, workerData.settled, workerData.seed);
    parentPort.postMessage('started');
    await Promise.all(calls);
  } else {
    const calls = await startLongCalls(workerData.backend, workerData.op, 12, workerData.seed);
    parentPort.postMessage({ started: threadCount() }); // counted here: with exit, the worker is gone at once
    if (workerData.how === 'exit') process.exit(0);
    await Promise.allSettled(calls);
    parentPort.postMessage('finished'); // before the main thread ended it: the report says so
  }
} else {
  const [mode, ...rest] = process.argv.slice(2);
  const spawn = (data) => new Worker(new URL(import.meta.url), { workerData: data });
  const first = (w, what) =>
    new Promise((resolve, reject) => {
      w.once('message', resolve);
      w.once('error', reject);
      w.once('exit', (code) => reject(new Error(`the worker exited (code ${code}) before ${what}`)));
    });
  if (mode === 'readfile') {
    // Every thread's calls are queued before the read: it must not wait for them (libuv's pool is
    // not theirs).
    const seed = Number(rest[0]) >>> 0;
    const count = 6;
    const settled = new Int32Array(new SharedArrayBuffer(4));
    const go = new Int32Array(new SharedArrayBuffer(4));
    const workers = [1, 2, 3].map((i) => spawn({ mode, seed: seed + i, count, settled, go }));
    const exits = workers.map((w) => new Promise((r) => w.once('exit', r)));
    await Promise.all(workers.map((w) => first(w, 'its inputs built')));
    const started = Promise.all(workers.map((w) => first(w, 'its calls started')));
    const { calls, engine } = await longPrefills(seed, count, settled, () => {
      Atomics.store(go, 0, 1);
      Atomics.notify(go, 0);
    });
    await started;
    const before = Atomics.load(settled, 0);
    await readFile(new URL(import.meta.url));
    const during = Atomics.load(settled, 0) - before;
    await Promise.all([...calls, ...exits]);
    await engine.dispose();
    process.stdout.write(`${JSON.stringify({ calls: 4 * count, settledBeforeRead: before, settledDuringRead: during, settledAtEnd: Atomics.load(settled, 0) })}\n`);
  } else if (mode === 'cancel') {
    // The Worker's one call writes query rows in order: a row still all zero was not computed.
    const seed = Number(rest[0]) >>> 0;
    const sQ = 256, hQ = 64; // about 2 s of one core's work
    const out = new Uint16Array(new SharedArrayBuffer(sQ * hQ * 512 * 2));
    const shared32 = () => new Float32Array(new SharedArrayBuffer(sQ * hQ * 4));
    const rowsWritten = () => {
      let n = 0;
      for (let r = 0; r < sQ; r++) if (out.subarray(r * hQ * 512, (r + 1) * hQ * 512).some((b) => b !== 0)) n++;
      return n;
    };
    const w = spawn({ mode, seed, out, maxLogits: shared32(), lse: shared32() });
    let finished = false;
    w.on('message', (m) => (finished ||= m === 'finished'));
    await first(w, 'its call started');
    // terminated once the call is surely running (a row is out)
    const t0 = Date.now();
    while (rowsWritten() === 0 && Date.now() - t0 < 20_000) await new Promise((r) => setTimeout(r, 5));
    const startedRows = rowsWritten();
    const t1 = performance.now();
    await w.terminate();
    const terminateMs = performance.now() - t1;
    const atTerminate = Buffer.from(out.buffer).toString('base64');
    const rowsAtTerminate = rowsWritten();
    await new Promise((r) => setTimeout(r, 300));
    const changedLater = Buffer.from(out.buffer).toString('base64') !== atTerminate;
    const engine = await createEngine({ backend: 'cpu', workers: 2 });
    const { prefill } = opInputs(seed + 1);
    const healthy = withinBounds(await engine.sparsePrefill(prefill), R.sparsePrefillReference(prefill), 8);
    await engine.dispose();
    process.stdout.write(`${JSON.stringify({ rows: sQ, startedRows, rowsAtTerminate, changedLater, finishedFirst: finished, terminateMs: Math.round(terminateMs), healthy })}\n`);
  } else if (mode === 'unload') {
    // This thread never loads the addon: when the last Worker that did ends, Node unloads it, while
    // the addon thread that ran the Worker's calls still lingers (1 s) in its code.
    const codes = [];
    for (const how of ['exit', 'terminate', 'finish', 'exit-in-then']) {
      const w = spawn({ mode, how });
      const exited = new Promise((r) => w.once('exit', r));
      if (how === 'terminate') {
        await first(w, 'its calls settled');
        await w.terminate();
      }
      codes.push(await exited);
      await new Promise((r) => setTimeout(r, 1500)); // past the linger
    }
    process.stdout.write(`${JSON.stringify({ codes })}\n`);
  } else if (mode === 'shared-cache') {
    // The cache lives in the main thread's shared memory; each Worker gets a view of it.
    const [backend, seedArg] = rest;
    const seed = Number(seedArg) >>> 0;
    const report = {};
    for (const ending of ['terminated', 'finished']) {
      const template = createKvCache('v4', { pageSize: 64, numPages: 400 });
      const cache = { ...template, data: new Uint8Array(new SharedArrayBuffer(template.data.byteLength)) };
      const settled = new Int32Array(new SharedArrayBuffer(4));
      const w = spawn({ mode, backend, cache, settled, seed });
      await first(w, 'its calls started');
      if (ending === 'terminated') await w.terminate();
      else await new Promise((r) => w.once('exit', r));
      const written = cache.data.some((b) => b !== 0);
      await new Promise((r) => setTimeout(r, 200)); // nothing lands later either
      report[ending] = { settled: Atomics.load(settled, 0), writtenAtEnd: written, writtenLater: !written && cache.data.some((b) => b !== 0) };
    }
    process.stdout.write(`${JSON.stringify(report)}\n`);
  } else if (mode === 'engines') {
    const seed = Number(rest[0]) >>> 0;
    const workers = [1, 2, 3].map(() => spawn({ mode, seed }));
    const reports = await Promise.all([engineWork(seed), ...workers.map((w) => first(w, 'its report'))]);
    process.stdout.write(`${JSON.stringify({ threads: reports })}\n`);
  } else {
    const [backend, how, seedArg] = rest;
    const seed = Number(seedArg) >>> 0;
    // Start the process's own pools first (libuv's, and what an engine here starts), so what the
    // rounds leave behind is what they add.
    const warm = await createEngine({ backend, workers: 2 });
    await warm.dispose();
    const rounds = [];
    const before = threadCount();
    for (const op of OPS) {
      const t0 = Date.now();
      const w = spawn({ mode, backend, op, how, seed });
      const exited = new Promise((r) => w.once('exit', r));
      let finished = false;
      w.on('message', (m) => (finished ||= m === 'finished'));
      const during = (await first(w, 'its calls started')).started;
      if (how === 'terminate') await w.terminate();
      const code = await exited;
      // threads exit asynchronously after their Worker (a loaded host can lag): a leak stays past 3 s
      for (let waited = 0; threadCount() - before > 1 && waited < 3000; waited += 20) await new Promise((r) => setTimeout(r, 20));
      rounds.push({ ms: Date.now() - t0, op, code, finishedFirst: finished, threadsDuring: during - before, threadsAfter: threadCount() - before });
    }
    // The process still works: a call here, against the reference.
    const engine = await createEngine({ backend, workers: 2 });
    const { prefill } = opInputs(seed + 1);
    const healthy = withinBounds(await engine.sparsePrefill(prefill), R.sparsePrefillReference(prefill), 8);
    await engine.dispose();
    process.stdout.write(`${JSON.stringify({ rounds, healthy })}\n`);
  }
}
