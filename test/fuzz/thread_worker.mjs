/**
 * A Worker of host_targets.mjs's workerThreads: its own cpu engine, the calls it is sent (inputs in
 * shared memory, read in place) all made at once, then, by `end`: their results posted back
 * ('finish'), or process.exit() with the calls in flight ('exit'); 'terminate' is the parent's.
 */
import { parentPort, workerData } from 'node:worker_threads';

const { dist, workers, end } = workerData;
try {
  const { createEngine } = await import(new URL('index.js', dist).href);
  const engine = await createEngine({ backend: 'cpu', workers });
  parentPort.on('message', async ({ calls }) => {
    const pending = calls.map(({ op, args }) =>
      engine[op](args).then(
        (r) => ({ value: { out: r.out.data, lse: r.lse.data, maxLogits: r.maxLogits.data } }),
        (e) => ({ error: `${e?.name} ${e?.code ?? ''}: ${String(e?.message).slice(0, 200)}` }),
      ),
    );
    parentPort.postMessage({ type: 'issued' });
    if (end === 'exit') process.exit(0);
    const results = await Promise.all(pending);
    const buffers = new Set(results.flatMap((r) => (r.value ? [r.value.out.buffer, r.value.lse.buffer, r.value.maxLogits.buffer] : [])));
    parentPort.postMessage({ type: 'done', results }, [...buffers].filter((b) => b instanceof ArrayBuffer));
  });
  parentPort.postMessage({ type: 'ready' });
} catch (e) {
  parentPort.postMessage({ type: 'failed', error: `the Worker's set-up failed: ${e?.stack ?? e}` });
}
