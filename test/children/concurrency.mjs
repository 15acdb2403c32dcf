// Child process of test/threads.test.ts (run with --expose-gc): 50 overlapping calls of mixed ops
// on one engine — quantizes into one cache while other ids of it are dequantized, sparsePrefill,
// pagedSparseAttention, and prefillLayer of every ratio down both paths on one plan — compared
// with the same calls run one at a time, round after round (memory measured after each), then
// dispose() while a round is in flight. One JSON report on stdout.
//   node --expose-gc concurrency.mjs <backend> <seed> <rounds> [memoryBudgetMiB]
import { readdirSync } from 'node:fs';
import { createEngine } from '../../dist/index.js';
import { makeRng } from '../../dist/check/grid.js';
import { mixedWorkload } from './mixed_calls.mjs';

const [backend, seedArg, roundsArg, budgetArg] = process.argv.slice(2);
const rng = makeRng(Number(seedArg) >>> 0);
const rounds = Number(roundsArg);
const threadCount = () => readdirSync('/proc/self/task').length;
const threadsAtStart = threadCount();
const engine = await createEngine({ backend, workers: 2, ...(budgetArg ? { memoryBudgetBytes: Number(budgetArg) * 2 ** 20 } : {}) });
const { initialCache, makeCalls } = mixedWorkload(engine, rng);
const calls = makeCalls();

// One at a time, each kind's first call checked against the reference.
const sequentialCache = structuredClone(initialCache);
const sequential = [];
const referenceFailures = [];
const checked = new Set();
for (const c of calls) {
  const result = await c.run(sequentialCache);
  sequential.push(c.bits(result));
  if (!checked.has(c.kind)) {
    checked.add(c.kind);
    if (!c.check(sequentialCache, result)) referenceFailures.push(c.kind);
  }
}

// All at once, `rounds` times: the same bits, and memory after each round.
const mismatches = [];
const memory = [];
for (let round = 0; round < rounds; round++) {
  const cache = structuredClone(initialCache);
  const results = await Promise.all(calls.map((c) => c.run(cache).then(c.bits)));
  results.forEach((r, i) => r !== sequential[i] && mismatches.push(`round ${round}: call ${i} (${calls[i].kind})`));
  if (Buffer.compare(cache.data, sequentialCache.data) !== 0) mismatches.push(`round ${round}: the quantized cache`);
  globalThis.gc();
  const m = process.memoryUsage();
  memory.push({ rss: m.rss, arrayBuffers: m.arrayBuffers, heapUsed: m.heapUsed });
}

// dispose() with a round in flight: every call settles (a result or DISPOSED), later calls are DISPOSED.
const cache = structuredClone(initialCache);
const inFlight = calls.map((c) => c.run(cache).then(() => 'resolved', (e) => e?.code ?? String(e)));
await new Promise((r) => setTimeout(r, 2));
const t0 = Date.now();
await engine.dispose();
const hang = new Promise((r) => setTimeout(() => r(null), 20_000).unref());
const settledAfterDispose = await Promise.race([Promise.all(inFlight), hang]);
const disposeMs = Date.now() - t0;
const afterDispose = [];
for (const c of [calls[0], calls[1], calls[2], calls[3], calls[4]]) afterDispose.push(await c.run(structuredClone(initialCache)).then(() => 'resolved', (e) => e?.code ?? String(e)));
// The engine's threads end: polled, not looked at once, since the cpu addon's last idle thread
// waits a while (a second) for a next call before it ends, and a thread done with its work takes a
// moment more to leave (longer on a loaded machine). Up to 5 s after dispose()'s calls settled.
const disposed = t0 + disposeMs;
let threadsAfterDispose = threadCount();
while (threadsAfterDispose > threadsAtStart && Date.now() < disposed + 5000) {
  await new Promise((r) => setTimeout(r, 10));
  threadsAfterDispose = threadCount();
}
const threadsEndedMs = Date.now() - disposed;
process.stdout.write(
  `${JSON.stringify({ referenceFailures, checkedKinds: [...checked], mismatches, memory, settledAfterDispose, disposeMs, afterDispose, threadsAtStart, threadsAfterDispose, threadsEndedMs })}\n`,
);
