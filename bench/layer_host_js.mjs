// The JS host cost of a device c4 layer (prefillLayer(engine, …, { output: 'device' }) on the cuda
// backend's code path), measurable on any machine: the CudaBackend runs over a stub of the addon's
// cuda op table whose ops do nothing and settle at once (as the addon's ops with device operands
// do), so what is timed is the library's own JS — argument checks, plan lookups, the layer steps,
// operand marshalling — and none of the addon's or the driver's time (those need a GPU:
// bench/layer_probe.mjs). Shapes as the layer section of `sparse-mla bench --backend cuda`: one
// fresh request, hQ 64, top-k 512. Prints medians of REPEAT layers after WARMUP:
//   first op   µs from the call to the layer's first op call (planRows; from the second layer of a
//              plan on, the layer program's run)
//   resolved   µs from the call until its promise resolved
//   ops        the op calls a layer made
//   node bench/layer_host_js.mjs            (LAYER_N=4096,32768  REPEAT=2000  IDLE_MS=1  LAYER_DIST=/abs/dist)
// Two builds compared:
//   node bench/layer_host_js.mjs --vs /abs/distA /abs/distB [--rounds 20] [--no-feedback]
//              fresh processes alternated (A B, B A, …), each as above: per build the median over the
//              processes [min-max], and A/B per pair (median [quartiles] of the pairs' ratios; above 1:
//              B faster). --no-feedback: the children in the state of a process's first layers held
//              for good (V8 allocates no feedback: no inline caches, literals built in its runtime, no
//              baseline or optimized code; REPEAT default 600 there)
//   node bench/layer_host_js.mjs --vs /abs/distA /abs/distB --one-process [--rounds 40]
//              both builds in this process, warm, alternated rounds of REPEAT layers (default 200) each,
//              compared round by round (a process's own optimizing decisions move the warm figure more
//              than most changes do, so fresh processes compare it poorly)
import { performance } from 'node:perf_hooks';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { alternated, median } from './lib.mjs';
import { stubCudaEngine } from './stub_cuda_engine.mjs';

const HQ = 64, TOPK = 512;
// the V8 flags of --no-feedback: feedback vectors never allocated, so no tier above the interpreter
const NO_FEEDBACK_FLAGS = ['--interrupt-budget-factor-for-feedback-allocation=1000000', '--interrupt-budget-for-feedback-allocation=1000000000', '--no-sparkplug', '--no-opt'];

const argv = process.argv.slice(2);
if (argv[0] === '--vs') await compare(argv.slice(1));
else await single();

/** One build's layers: a function that runs `calls` layers of n tokens and gives the median first-op and resolved µs and the op calls of a layer. */
async function layerRunner(dist, N) {
  let opCalls = 0, firstOpAt = NaN;
  const { engine, prefillLayer, c4Layer } = await stubCudaEngine(dist, (t) => {
    if (opCalls++ === 0) firstOpAt = t;
  });
  const { plan, q, caches, topkIndices, attnSink } = c4Layer(N, HQ, TOPK);
  const args = { plan, compressRatio: 4, q, caches, topkIndices, attnSink, smScale: 1 / Math.sqrt(512), path: 'sparse' };
  // the thread idles this long before each layer, as it does waiting for the previous layer's device work
  const idleMs = Number(process.env.IDLE_MS ?? 0);
  return async (calls, warmup = 0) => {
    const first = [], resolved = [];
    let opsPerLayer = 0;
    for (let i = 0; i < warmup + calls; i++) {
      if (idleMs > 0) await new Promise((resolve) => setTimeout(resolve, idleMs));
      opCalls = 0;
      const t0 = performance.now();
      const r = await prefillLayer(engine, args, { output: 'device' });
      const t1 = performance.now();
      for (const x of [r.out, r.lse, r.maxLogits]) x.data.free();
      if (i >= warmup) first.push(firstOpAt - t0), resolved.push(t1 - t0);
      opsPerLayer = opCalls;
    }
    return { firstUs: median(first) * 1000, resolvedUs: median(resolved) * 1000, opsPerLayer };
  };
}

async function single() {
  // LAYER_DIST: another build's dist/ to time (an absolute path; default this checkout's)
  const dist = process.env.LAYER_DIST ?? new URL('../dist', import.meta.url).pathname;
  const SIZES = (process.env.LAYER_N ?? '4096').split(',').map(Number);
  const REPEAT = Number(process.env.REPEAT ?? 2000), WARMUP = Math.min(500, REPEAT);
  const results = [];
  for (const N of SIZES) {
    const r = await (await layerRunner(dist, N))(REPEAT, WARMUP);
    results.push({ N, ...r });
    console.log(`N = ${N}: first op ${r.firstUs.toFixed(1)} µs, resolved ${r.resolvedUs.toFixed(1)} µs (medians of ${REPEAT}); ${r.opsPerLayer} op calls a layer`);
  }
  console.log(JSON.stringify(results));
}

async function compare(args) {
  const [distA, distB] = args;
  if (!distA?.startsWith('/') || !distB?.startsWith('/')) throw new Error('usage: --vs /abs/distA /abs/distB [--rounds N] [--no-feedback | --one-process]');
  const oneProcess = args.includes('--one-process'), noFeedback = args.includes('--no-feedback');
  const roundsAt = args.indexOf('--rounds');
  const rounds = roundsAt >= 0 ? Number(args[roundsAt + 1]) : oneProcess ? 40 : 20;
  const N = Number((process.env.LAYER_N ?? '4096').split(',')[0]);
  let runA, runB;
  if (oneProcess) {
    const calls = Number(process.env.REPEAT ?? 200);
    const [a, b] = [await layerRunner(distA, N), await layerRunner(distB, N)];
    for (let i = 0; i < 5; i++) await a(calls), await b(calls);
    [runA, runB] = [() => a(calls), () => b(calls)];
  } else {
    const self = fileURLToPath(import.meta.url);
    const env = { ...process.env, LAYER_N: String(N), REPEAT: process.env.REPEAT ?? (noFeedback ? '600' : '2000') };
    const child = (dist) => () => {
      const r = spawnSync(process.execPath, [...(noFeedback ? NO_FEEDBACK_FLAGS : []), self], { env: { ...env, LAYER_DIST: dist }, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`child failed (${dist}): ${r.stderr}`);
      return JSON.parse(r.stdout.trim().split('\n').at(-1))[0];
    };
    [runA, runB] = [child(distA), child(distB)];
  }
  const got = await alternated({ A: runA, B: runB }, rounds);
  console.log(`N = ${N}, ${rounds} ${oneProcess ? 'rounds in one process' : `fresh processes each${noFeedback ? ', no feedback' : ''}`}; A ${distA}, B ${distB}`);
  for (const [key, what] of [['firstUs', 'first op'], ['resolvedUs', 'resolved']]) {
    const a = got.A.map((r) => r[key]), b = got.B.map((r) => r[key]);
    const ratios = a.map((x, i) => x / b[i]).sort((x, y) => x - y);
    const span = (xs) => `${median(xs).toFixed(2)} [${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)}]`;
    console.log(`  ${what.padEnd(9)} A ${span(a)} µs, B ${span(b)} µs; A/B per pair: median ${median(ratios).toFixed(3)} [quartiles ${ratios[rounds >> 2].toFixed(3)}-${ratios[(3 * rounds) >> 2].toFixed(3)}]`);
  }
}
