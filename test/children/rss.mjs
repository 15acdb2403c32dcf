// Child process of test/memory.test.ts (run with --expose-gc): calls sparsePrefill `calls` times
// with the same large kv in an ordinary (non-shared) ArrayBuffer and reports how far the resident
// set grew after a warm-up. It stops early once the growth passes `boundMiB`, so a leak fails fast
// instead of exhausting the machine.
//   node --expose-gc test/children/rss.mjs <backend> <calls> <kvMiB> <boundMiB>
import { createEngine, tensor } from '../../dist/index.js';

const [backend, callsArg, kvMiBArg, boundArg] = process.argv.slice(2);
const calls = Number(callsArg), kvMiB = Number(kvMiBArg), bound = Number(boundArg) * 2 ** 20;
const engine = await createEngine({ backend, workers: 2 });
const dQK = 512, hQ = 2, sQ = 2, topk = 8;
const sKV = Math.round((kvMiB * 2 ** 20) / (dQK * 2));
const kv = tensor('bf16', [sKV, dQK], new Uint16Array(sKV * dQK).fill(0x3f80));
const q = tensor('bf16', [sQ, hQ, dQK], new Uint16Array(sQ * hQ * dQK).fill(0x3c00));
const indices = tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, (_, i) => (i * 7919) % sKV));
const call = () => engine.sparsePrefill({ q, kv, indices, smScale: 0.05 });

const WARMUP = 20;
for (let i = 0; i < WARMUP; i++) await call();
globalThis.gc();
const base = process.memoryUsage().rss;
let done = WARMUP, growth = 0;
while (done < calls) {
  await call();
  done++;
  if (done % 10 === 0) {
    globalThis.gc();
    growth = process.memoryUsage().rss - base;
    if (growth > bound) break;
  }
}
const first = await call();
await engine.dispose();
process.stdout.write(`${JSON.stringify({ calls: done, growthMiB: growth / 2 ** 20, lse0: first.lse.data[0] })}\n`);
