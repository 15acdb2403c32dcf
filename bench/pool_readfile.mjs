// A file read issued behind N cpu sparsePrefill calls (inputs in shared memory, so the calls are
// queued at once), in this thread and in W Worker threads (N each, started together): how many
// calls settled before the read completed, how long it took, how long all the calls took, and the
// process's CPU time meanwhile (user + system, all threads).
// Compare two builds by pointing SPARSE_MLA_DIST at another dist/ (alternate the runs).
//   node bench/pool_readfile.mjs [calls=40] [sQ=32] [workers=0]
import { readFile } from 'node:fs/promises';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { benchDist } from './lib.mjs';
import { sharedPrefillArgs } from './shared_prefill_args.mjs';

const dist = benchDist();
const { createEngine } = await import(`${dist}index.js`);
const [count = 40, sQ = 32, workers = 0] = isMainThread ? process.argv.slice(2).map(Number) : [workerData.count, workerData.sQ, 0];
const settled = isMainThread ? new Int32Array(new SharedArrayBuffer(4)) : workerData.settled;
const engine = await createEngine({ backend: 'cpu', workers: 2 });
const args = await sharedPrefillArgs(dist, sQ);
await engine.sparsePrefill(args);
const start = () => Array.from({ length: count }, () => engine.sparsePrefill(args).then(() => Atomics.add(settled, 0, 1)));

if (!isMainThread) {
  parentPort.postMessage('ready');
  Atomics.wait(workerData.go, 0, 0);
  const calls = start();
  parentPort.postMessage('started');
  await Promise.all(calls);
  await engine.dispose();
} else {
  const go = new Int32Array(new SharedArrayBuffer(4));
  const threads = Array.from({ length: workers }, () => new Worker(new URL(import.meta.url), { workerData: { count, sQ, settled, go } }));
  const message = (w, m) => new Promise((resolve) => w.on('message', (x) => x === m && resolve()));
  const exits = threads.map((w) => new Promise((resolve) => w.once('exit', resolve)));
  await Promise.all(threads.map((w) => message(w, 'ready')));
  const started = Promise.all(threads.map((w) => message(w, 'started')));
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  Atomics.store(go, 0, 1);
  Atomics.notify(go, 0);
  const calls = start();
  await started;
  const t1 = performance.now();
  await readFile(new URL(import.meta.url));
  const readFileMs = performance.now() - t1;
  const settledBeforeRead = Atomics.load(settled, 0);
  await Promise.all([...calls, ...exits]);
  console.log(JSON.stringify({ calls: count * (workers + 1), threads: workers + 1, settledBeforeRead, readFileMs: +readFileMs.toFixed(1), allCallsMs: Math.round(performance.now() - t0), cpuMs: Math.round((process.cpuUsage(cpu0).user + process.cpuUsage(cpu0).system) / 1000) }));
  await engine.dispose();
}
