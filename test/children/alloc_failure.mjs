// Child process of test/alloc_failure.test.ts, run under the fault-injection shim
// (alloc_failure_shim.cpp, LD_PRELOAD): cpu calls of the main thread and two Workers while the
// native addon's allocations or thread starts fail now and then (the shim fails them while the
// switch file exists). A failure that escapes on any thread aborts the process; one that is
// swallowed leaves a promise unsettled (the process then exits with code 13, unsettled await).
//   node alloc_failure.mjs <seed> <switch file>
// The main thread and Worker A each run ROUNDS rounds of the four ops (four calls in flight, each
// checked against the float64 reference); the main thread also disposes a second engine with its
// calls in flight every round; Worker B is terminated mid-round. Then the switch is removed and
// every thread runs a round that must be right in full. Prints one JSON report.
// The main thread also makes SEQUENTIAL small calls one after another while the switch is on: each
// finished call wakes its JS thread once, so the addon's threads hand back that many calls.
import { unlinkSync, writeFileSync } from 'node:fs';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { SparseMlaError, createEngine, createKvCache, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits, randomIndices } from '../../dist/check/grid.js';
import { randomPrefillCall, withinBounds } from './judge.mjs';

const ROUNDS = 25;
const SEQUENTIAL = 300;

/** Each op's inputs and float64 reference from one seed. */
function opCase(seed) {
  const rng = makeRng(seed);
  const hQ = 8, sQ = 8, sKV = 300, topk = 64;
  const prefill = randomPrefillCall(rng, { sQ, hQ, sKV, topk });
  const pageSize = 16, numPages = 20, tokens = pageSize * numPages, n = 120;
  const ids = Int32Array.from({ length: n }, () => rng.int(0, tokens)); // duplicates: the last row wins
  const rows = tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512));
  const quantized = createKvCache('v4', { pageSize, numPages });
  R.quantizeKCacheReference(quantized, Array.from(ids), rows);
  const m = 6;
  const paged = {
    q: tensor('bf16', [m, hQ, 512], randomBf16Bits(rng, m * hQ * 512)),
    indices: tensor('int32', [m, topk], randomIndices(rng, m, topk, tokens, 0.1, 0.05, [])),
    smScale: 1 / Math.sqrt(512),
    kCache: quantized,
  };
  const dequantIds = Array.from({ length: 90 }, () => rng.int(0, tokens));
  return {
    prefill,
    paged,
    quantize: { ids, rows, pageSize, numPages },
    dequantIds,
    ref: {
      prefill: R.sparsePrefillReference(prefill),
      paged: R.pagedSparseAttentionReference(paged),
      quantized: quantized.data,
      rows: R.dequantizeKCacheReference(quantized, dequantIds),
    },
  };
}


/**
 * A rejection this test allows: the addon out of memory (TOO_LARGE) or out of threads
 * (BACKEND_FAILURE saying so), or DISPOSED for an engine disposed with the call in flight.
 */
function allowed(e, disposing) {
  if (!(e instanceof SparseMlaError)) return null;
  if (e.code === 'TOO_LARGE' && /out of memory|cannot allocate/.test(e.message)) return 'outOfMemory';
  if (e.code === 'BACKEND_FAILURE' && /no thread could be started/.test(e.message)) return 'noThread';
  if (disposing && e.code === 'DISPOSED') return 'disposed';
  return null;
}

/** The four ops' calls on `engine`, in flight together; each settles to an outcome. */
function roundOfCalls(engine, c, disposing = false) {
  const cache = createKvCache('v4', { pageSize: c.quantize.pageSize, numPages: c.quantize.numPages });
  const calls = {
    sparsePrefill: () => engine.sparsePrefill(c.prefill).then((r) => withinBounds(r, c.ref.prefill, 8)),
    pagedSparseAttention: () => engine.pagedSparseAttention(c.paged).then((r) => withinBounds(r, c.ref.paged, 8)),
    dequantizeKCachePaged: () => engine.dequantizeKCachePaged({ cache: c.paged.kCache, tokenIds: c.dequantIds }).then((r) => r.data.every((b, i) => R.decodeBf16(b) === c.ref.rows[i])),
    quantizeKCache: () => engine.quantizeKCache({ cache, tokenIds: tensor('int32', [c.quantize.ids.length], c.quantize.ids), rows: c.quantize.rows }).then(() => Buffer.compare(cache.data, c.ref.quantized) === 0),
  };
  return Object.entries(calls).map(([op, call]) => {
    let p;
    try {
      p = call();
    } catch (e) {
      p = Promise.reject(e);
    }
    return p.then(
      (right) => ({ op, outcome: right ? 'right' : 'wrong' }),
      (e) => {
        const kind = allowed(e, disposing);
        // a rejected quantize writes nothing
        if (kind && op === 'quantizeKCache' && cache.data.some((b) => b !== 0)) return { op, outcome: 'wrote after rejecting' };
        return kind ? { op, outcome: kind } : { op, outcome: 'unexpected', error: `${e?.name} ${e?.code}: ${e?.message}` };
      },
    );
  });
}

function tally(results, into = { right: 0, outOfMemory: 0, noThread: 0, disposed: 0, bad: [] }) {
  for (const r of results) {
    if (r.outcome in into && r.outcome !== 'bad') into[r.outcome]++;
    else into.bad.push(r);
  }
  return into;
}

/** ROUNDS rounds of four calls (and, when `disposeRounds`, a second engine disposed mid-round). */
async function stress(engine, c, disposeRounds, onRound = () => {}) {
  const counts = tally([]);
  for (let round = 0; round < ROUNDS; round++) {
    const calls = roundOfCalls(engine, c);
    if (disposeRounds) {
      let other = null;
      try {
        other = await createEngine({ backend: 'cpu', workers: 2 });
      } catch (e) {
        counts.bad.push({ op: 'createEngine', outcome: 'unexpected', error: `${e?.code}: ${e?.message}` });
      }
      if (other) {
        calls.push(...roundOfCalls(other, c, true));
        await other.dispose();
      }
    }
    tally(await Promise.all(calls), counts);
    onRound(round);
  }
  return counts;
}

/** A round with the switch off: every call right. */
async function healthy(engine, c) {
  const results = await Promise.all(roundOfCalls(engine, c));
  return results.every((r) => r.outcome === 'right');
}

if (!isMainThread) {
  const c = opCase(workerData.seed);
  const engine = await createEngine({ backend: 'cpu', workers: 2 });
  const next = () => new Promise((resolve) => parentPort.once('message', resolve));
  parentPort.postMessage({ ready: true });
  await next(); // go
  const counts = await stress(engine, c, false, (round) => parentPort.postMessage({ round }));
  parentPort.postMessage({ counts });
  await next(); // the switch is off
  const ok = await healthy(engine, c);
  await engine.dispose();
  parentPort.postMessage({ healthy: ok });
} else {
  const seed = Number(process.argv[2]);
  const switchFile = process.argv[3];
  const c = opCase(seed);
  const engine = await createEngine({ backend: 'cpu', workers: 2 });
  const start = (name, s) => {
    const w = new Worker(new URL(import.meta.url), { workerData: { seed: s } });
    const messages = [];
    const waiters = [];
    w.on('message', (m) => {
      messages.push(m);
      for (const f of waiters.splice(0)) f();
    });
    const exited = new Promise((resolve) => w.on('exit', resolve));
    const when = async (pred) => {
      for (;;) {
        const m = messages.find(pred);
        if (m) return m;
        await new Promise((resolve) => waiters.push(resolve));
      }
    };
    return { name, w, when, exited };
  };
  const a = start('a', seed + 1), b = start('b', seed + 2);
  await Promise.all([a.when((m) => m.ready), b.when((m) => m.ready)]);

  writeFileSync(switchFile, '');
  a.w.postMessage('go');
  b.w.postMessage('go');
  // Worker B is ended in its third round, with its calls in flight
  const bEnded = b.when((m) => m.round === 2).then(() => b.w.terminate()).then(() => b.exited);
  const [mainCounts, aCounts, bCode] = await Promise.all([stress(engine, c, true), a.when((m) => m.counts).then((m) => m.counts), bEnded]);
  const ids = c.dequantIds.slice(0, 4);
  for (let i = 0; i < SEQUENTIAL; i++) {
    const outcome = await engine.dequantizeKCachePaged({ cache: c.paged.kCache, tokenIds: ids }).then(
      (r) => ({ op: 'sequential dequant', outcome: r.data.every((b, j) => R.decodeBf16(b) === c.ref.rows[j]) ? 'right' : 'wrong' }),
      (e) => ({ op: 'sequential dequant', outcome: allowed(e, false) ?? 'unexpected', error: `${e?.name} ${e?.code}: ${e?.message}` }),
    );
    tally([outcome], mainCounts);
  }
  unlinkSync(switchFile);

  a.w.postMessage('health');
  const aHealthy = (await a.when((m) => 'healthy' in m)).healthy;
  const aCode = await a.exited;
  const mainHealthy = await healthy(engine, c);
  await engine.dispose();
  // a fresh engine after all of it
  const fresh = await createEngine({ backend: 'cpu', workers: 2 });
  const freshHealthy = await healthy(fresh, c);
  await fresh.dispose();
  console.log(JSON.stringify({ main: mainCounts, a: aCounts, aCode, bCode, mainHealthy, aHealthy, freshHealthy }));
}
