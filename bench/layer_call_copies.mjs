// The host copies of one prefillLayer with a host q, two builds side by side in one process: the
// ArrayBuffer bytes a layer leaves allocated (process.memoryUsage().arrayBuffers right after the
// layer resolves, against right before it after a full collection: the copies the layer made that
// are not reused memory, plus its outputs) and its wall time, the builds' layers alternated
// (A B, then B A) so that load on the host falls on both alike. Run with --expose-gc.
//   node --expose-gc bench/layer_call_copies.mjs <distA> <distB> <backend> <numQueries> <hQ> <rounds> [path] [window]
// window: the plan's SWA window (default the library's); a small one makes the attention small
// beside the copies.
// distA / distB: absolute paths of two builds' dist/ (each loads the native addon of its own tree).
// Prints one JSON line: per build the median bytes and ms per layer, and B/A ratios of the medians
// and the median of the per-round ratios.
import { performance } from 'node:perf_hooks';
import { median } from './lib.mjs';

const [distA, distB, backend, nqArg, hQArg, roundsArg, pathArg = 'sparse', windowArg] = process.argv.slice(2);
const nq = Number(nqArg), hQ = Number(hQArg), rounds = Number(roundsArg);
if (typeof globalThis.gc !== 'function') throw new Error('run with --expose-gc');

async function build(dist) {
  const lib = await import(`${dist}/index.js`);
  const engine = await lib.createEngine({ backend, workers: 2 });
  // one fresh request of nq tokens: its SWA gather is its own nq tokens
  const chunk = { requests: [{ seqLen: nq, extendLen: nq, swaTokenIds: Int32Array.from({ length: nq }, (_, i) => i) }] };
  const caches = { swa: lib.createKvCache('v4', { pageSize: 64, numPages: Math.ceil(nq / 64) }) };
  const plan = lib.createPlan(chunk, windowArg === undefined ? {} : { window: Number(windowArg) });
  const bits = new Uint16Array(nq * hQ * 512);
  for (let i = 0; i < bits.length; i++) bits[i] = 0x3c00 + (i % 251); // small finite bf16 values
  const q = lib.tensor('bf16', [nq, hQ, 512], bits);
  return {
    engine,
    layer: () => lib.prefillLayer(engine, { q, compressRatio: 0, plan, caches, smScale: 0.05, path: pathArg }),
  };
}

const builds = [await build(distA), await build(distB)];
for (const b of builds) for (let i = 0; i < 3; i++) await b.layer(); // warm-up: plans, staging, JIT

const bytes = [[], []], ms = [[], []];
let lse = [null, null];
for (let r = 0; r < rounds; r++) {
  for (const k of r % 2 === 0 ? [0, 1] : [1, 0]) {
    globalThis.gc();
    const before = process.memoryUsage().arrayBuffers;
    const t0 = performance.now();
    const res = await builds[k].layer();
    const t1 = performance.now();
    bytes[k].push(process.memoryUsage().arrayBuffers - before);
    ms[k].push(t1 - t0);
    lse[k] = res.lse.data[0];
  }
}
for (const b of builds) await b.engine.dispose();
const perRound = ms[1].map((t, i) => t / ms[0][i]);
process.stdout.write(
  `${JSON.stringify({
    backend,
    path: pathArg,
    window: windowArg === undefined ? 'default' : Number(windowArg),
    numQueries: nq,
    hQ,
    qBytes: nq * hQ * 512 * 2,
    outputBytes: nq * hQ * (512 * 2 + 8),
    rounds,
    A: { dist: distA, medianBytes: median(bytes[0]), medianMs: +median(ms[0]).toFixed(2) },
    B: { dist: distB, medianBytes: median(bytes[1]), medianMs: +median(ms[1]).toFixed(2) },
    bytesSavedPerLayer: median(bytes[0]) - median(bytes[1]),
    msRatioOfMedians: +(median(ms[1]) / median(ms[0])).toFixed(4),
    medianOfRoundRatios: +median(perRound).toFixed(4),
    sameLse0: Object.is(lse[0], lse[1]),
  })}\n`,
);
