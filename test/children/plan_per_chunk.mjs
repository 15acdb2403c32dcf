// Child process of test/memory.test.ts (run with --expose-gc): a server's loop of one plan per
// chunk, each plan dropped after one workspace-path layer. Reports how far the memory held in
// ArrayBuffers / SharedArrayBuffers grew (after global.gc()) past a warm-up, and how many host
// workspace buffers were allocated. A plan's workspace is a SharedArrayBuffer that the wasm workers
// read in place; they keep a reference until their own collector runs, so a fresh buffer per plan
// stayed alive after its plan was dropped.
//   node --expose-gc test/children/plan_per_chunk.mjs <backend> <plans> <tokens>
import { setImmediate as tick } from 'node:timers/promises';
import { createEngine, createKvCache, createPlan, prefillLayer, tensor } from '../../dist/index.js';
import { hostWorkspaces } from '../../dist/backends/wasm/planner.js';

const [backend, plansArg, tokensArg] = process.argv.slice(2);
const plans = Number(plansArg), tokens = Number(tokensArg);
const engine = await createEngine({ backend, workers: 2 });
const chunk = { requests: [{ seqLen: tokens, extendLen: tokens, swaTokenIds: Int32Array.from({ length: tokens }, (_, i) => i) }] };
const caches = { swa: createKvCache('v4', { pageSize: 64, numPages: Math.ceil(tokens / 64) }) };
const q = tensor('bf16', [tokens, 1, 512]);
const layer = async () => {
  const plan = createPlan(chunk);
  const r = await prefillLayer(engine, { q, compressRatio: 0, plan, caches, smScale: 0.05, path: 'sparse' });
  return { ws: plan.workspaceBytes, lse0: r.lse.data[0] };
};
const collect = async () => {
  for (let i = 0; i < 2; i++) {
    globalThis.gc();
    await tick(); // finalizers run after the collection
  }
};
const WARMUP = 4;
let last;
for (let i = 0; i < WARMUP; i++) last = await layer();
await collect();
const base = process.memoryUsage().arrayBuffers;
const allocationsAfterWarmup = hostWorkspaces?.allocations ?? null;
for (let i = WARMUP; i < plans; i++) {
  last = await layer();
  await collect();
}
const growth = process.memoryUsage().arrayBuffers - base;
await engine.dispose();
process.stdout.write(`${JSON.stringify({ plans, workspaceBytes: last.ws, arrayBuffersGrowthMiB: growth / 2 ** 20, allocationsAfterWarmup, allocations: hostWorkspaces?.allocations ?? null, lse0: last.lse0 })}\n`);
