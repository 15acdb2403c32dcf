// How long worker.terminate() takes while the Worker's cpu engine has calls running: a Worker
// queues N sparsePrefill calls (inputs in shared memory, so they are queued at once), says so, and
// is terminated; repeated R times. Compare two builds by pointing SPARSE_MLA_DIST at another dist/
// (alternate the runs).
//   node bench/terminate_wall.mjs [calls=12] [rounds=5] [sQ=32]
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { benchDist, median } from './lib.mjs';
import { sharedPrefillArgs } from './shared_prefill_args.mjs';

const dist = benchDist();

if (!isMainThread) {
  const { createEngine } = await import(`${dist}index.js`);
  const { calls, sQ } = workerData;
  const engine = await createEngine({ backend: 'cpu', workers: 2 });
  const args = await sharedPrefillArgs(dist, sQ);
  const t0 = performance.now();
  await engine.sparsePrefill(args);
  const oneCallMs = performance.now() - t0;
  const pending = Array.from({ length: calls }, () => engine.sparsePrefill(args));
  parentPort.postMessage({ oneCallMs });
  await Promise.all(pending);
  parentPort.postMessage('finished');
} else {
  const [calls = 12, rounds = 5, sQ = 32] = process.argv.slice(2).map(Number);
  const results = [];
  for (let r = 0; r < rounds; r++) {
    const w = new Worker(new URL(import.meta.url), { workerData: { calls, sQ } });
    let finished = false;
    const started = new Promise((resolve, reject) => {
      w.on('message', (m) => (m === 'finished' ? (finished = true) : resolve(m)));
      w.once('error', reject);
    });
    const { oneCallMs } = await started;
    await new Promise((resolve) => setTimeout(resolve, 50)); // the calls are running
    const t0 = performance.now();
    await w.terminate();
    results.push({ terminateMs: +(performance.now() - t0).toFixed(1), oneCallMs: +oneCallMs.toFixed(1), finishedFirst: finished });
  }
  console.log(JSON.stringify({ calls, sQ, medianTerminateMs: median(results.map((x) => x.terminateMs)), rounds: results }));
}
