/** One worker of the reference pool (parallel.ts): prepares the reference once, then runs query lists. */
import { parentPort, workerData } from 'node:worker_threads';
import type { SparsePrefillArgs } from '../types.js';
import { prepareSparsePrefillReference } from './sparse_prefill.js';

const port = parentPort!;
const prepared = prepareSparsePrefillReference((workerData as { args: SparsePrefillArgs }).args);
port.on('message', (msg: { queries: number[] }) => {
  try {
    const result = prepared.run(msg.queries);
    port.postMessage({ result }, [result.out.buffer as ArrayBuffer, result.mag.buffer as ArrayBuffer, result.lse.buffer as ArrayBuffer, result.maxLogits.buffer as ArrayBuffer]);
  } catch (e) {
    port.postMessage({ error: e instanceof Error ? e.message : String(e) });
  }
});
port.postMessage({ ready: true });
