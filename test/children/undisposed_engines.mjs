// Child of worker_pool.test.ts: wasm engines made, used and dropped without dispose(); prints the
// process's thread count before, with the engines made, and after collections (Linux /proc).
// Run with --expose-gc.
import { readFileSync } from 'node:fs';
import { createEngine, createKvCache } from '../../dist/index.js';

const threads = () => Number(/Threads:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))[1]);
const cache = createKvCache('v4', { pageSize: 64, numPages: 1 });
await (await createEngine({ backend: 'wasm', workers: 1 })).dispose(); // the host side's own threads first
const before = threads();
for (let i = 0; i < 6; i++) {
  const engine = await createEngine({ backend: 'wasm', workers: 2 });
  await engine.dequantizeKCachePaged({ cache, tokenIds: [0, 1] });
}
const made = threads();
for (let i = 0; i < 40 && threads() > before + 2; i++) {
  globalThis.gc();
  await new Promise((r) => setTimeout(r, 50));
}
console.log(JSON.stringify({ before, made, after: threads() }));
