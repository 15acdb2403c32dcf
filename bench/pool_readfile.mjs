// A file read issued behind N cpu sparsePrefill calls (inputs in shared memory, so the calls are
// queued at once): how many calls settled before it, how long it took, and how long all the calls
// took. Compare two builds by pointing SPARSE_MLA_DIST at another dist/ (alternate the runs).
//   node bench/pool_readfile.mjs [calls=40] [sQ=32]
import { readFile } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';

const dist = process.env.SPARSE_MLA_DIST ? pathToFileURL(`${process.env.SPARSE_MLA_DIST}/`).href : new URL('../dist/', import.meta.url).href;
const { createEngine, tensor } = await import(`${dist}index.js`);
const { makeRng, randomBf16Bits, randomIndices } = await import(`${dist}check/grid.js`);
const [count = 40, sQ = 32] = process.argv.slice(2).map(Number);
const engine = await createEngine({ backend: 'cpu', workers: 2 });
const rng = makeRng(1);
const hQ = 16, sKV = 3000, topk = 512;
const shared = (x) => {
  const s = new x.constructor(new SharedArrayBuffer(x.byteLength));
  s.set(x);
  return s;
};
const args = {
  q: tensor('bf16', [sQ, hQ, 512], shared(randomBf16Bits(rng, sQ * hQ * 512))),
  kv: tensor('bf16', [sKV, 512], shared(randomBf16Bits(rng, sKV * 512))),
  indices: tensor('int32', [sQ, topk], shared(randomIndices(rng, sQ, topk, sKV, 0, 0, []))),
  smScale: 0.05,
};
await engine.sparsePrefill(args);
let settled = 0;
const t0 = performance.now();
const calls = Array.from({ length: count }, () => engine.sparsePrefill(args).then(() => settled++));
const t1 = performance.now();
await readFile(new URL(import.meta.url));
const readFileMs = performance.now() - t1;
const settledBeforeRead = settled;
await Promise.all(calls);
console.log(JSON.stringify({ calls: count, settledBeforeRead, readFileMs: +readFileMs.toFixed(1), allCallsMs: Math.round(performance.now() - t0) }));
await engine.dispose();
