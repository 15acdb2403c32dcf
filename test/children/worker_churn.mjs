// Child process of test/worker_churn.test.ts: Workers started one after another, each making
// `calls` cpu calls of the native addon (small dequants) and then terminated while every one of
// them is still pending (its JS thread busy, so none is settled). Reports the process's anonymous
// resident memory after each block of rounds, so a per-call leak at Worker teardown shows as
// steady growth.
//   node --expose-gc worker_churn.mjs <rounds> <calls per Worker> <rounds per sample>
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { readFileSync } from 'node:fs';
import { loadNativeAddon } from '../../dist/backends/native/binding.js';
import { v4PageBytes } from '../../dist/kv_cache_layout.js';

const PAGE_SIZE = 16, NUM_PAGES = 4;

if (!isMainThread) {
  const load = loadNativeAddon();
  if (!load.ok) throw new Error(load.reason);
  const { cpu } = load.addon;
  // a v4 cache in shared memory (read in place: nothing copied per call), one token per call
  const cache = new Uint8Array(new SharedArrayBuffer(NUM_PAGES * v4PageBytes(PAGE_SIZE)));
  const pending = [];
  for (let i = 0; i < workerData.calls; i++) {
    const params = { format: 0, cache, pageSize: PAGE_SIZE, numPages: NUM_PAGES, tokenIds: Int32Array.of(i % (PAGE_SIZE * NUM_PAGES)), numTokens: 1, out: new Uint16Array(512) };
    pending.push(cpu.dequantizeKvCache(1, params, 1));
  }
  parentPort.postMessage('queued');
  // busy until terminated: no pending call is settled on this thread
  for (;;) {}
} else {
  const [rounds, calls, every] = process.argv.slice(2).map(Number);
  // anonymous memory only (a leaked block is there): file-backed pages of the executable and the
  // addon come and go with the machine's memory pressure
  const rssMiB = () => Number(/RssAnon:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) / 1024;
  const samples = [];
  for (let round = 0; round < rounds; round++) {
    const w = new Worker(new URL(import.meta.url), { workerData: { calls } });
    const exited = new Promise((resolve) => w.on('exit', resolve));
    await new Promise((resolve, reject) => {
      w.once('message', resolve);
      w.once('error', reject);
    });
    await w.terminate();
    await exited;
    if ((round + 1) % every === 0) {
      globalThis.gc();
      samples.push(rssMiB());
    }
  }
  process.stdout.write(`${JSON.stringify({ rounds, calls, samples })}\n`);
}
