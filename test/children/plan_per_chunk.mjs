// Child process of test/memory.test.ts (run with --expose-gc): a server's loop of one plan per
// chunk, each plan dropped after one workspace-path layer. Reports how far the memory held in
// ArrayBuffers / SharedArrayBuffers grew (after global.gc()) past a warm-up, how many host
// workspace buffers were allocated, and how many dropped plans' workspaces were still not back in
// the free list 2 s after their collection. A plan's workspace is a SharedArrayBuffer that the wasm
// workers read in place; they keep a reference until their own collector runs, so a fresh buffer
// per plan stayed alive after its plan was dropped.
//   node --expose-gc test/children/plan_per_chunk.mjs <backend> <plans> <tokens>
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises';
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
// Collects the dropped plan, then waits until its workspace is back in the free list: the
// registry's callback that gives it back runs in a task of its own, which the two turns of the loop
// above often did not reach (wasm: most plans), so the next plan took a fresh buffer while the old
// one was on its way back, and the count said when that task ran rather than whether buffers are
// reused. Up to 2 s; `late` counts the plans whose workspace was not back by then (once one is late,
// the later ones are not waited for).
let late = 0;
const allFree = () => hostWorkspaces.free.length === hostWorkspaces.allocations;
const collect = async () => {
  for (let i = 0; i < 2; i++) {
    globalThis.gc();
    await tick(); // finalizers run after the collection
  }
  for (const deadline = Date.now() + (late > 0 ? 0 : 2000); !allFree() && Date.now() < deadline; ) {
    globalThis.gc();
    await sleep(5);
  }
  if (!allFree()) late++;
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
process.stdout.write(`${JSON.stringify({ plans, workspaceBytes: last.ws, arrayBuffersGrowthMiB: growth / 2 ** 20, allocationsAfterWarmup, allocations: hostWorkspaces?.allocations ?? null, late, lse0: last.lse0 })}\n`);
