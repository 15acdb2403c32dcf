// The JS host cost of a device c4 layer in a FRESH process, call by call: what a process's first
// layers pay while V8 still runs the layer's JS in its interpreter and baseline tiers (and later,
// once it has optimized it). Like bench/layer_host_js.mjs, the CudaBackend runs over a stub of the
// addon's cuda op table whose ops do nothing and settle at once, so only the library's own JS is
// timed (argument checks, plan lookups, the layer steps, operand marshalling, promise machinery).
// Shapes as the layer section of `sparse-mla bench --backend cuda` (N 4096, hQ 64, top-k 512, one
// fresh request, device q / caches / top-k / sink, { output: 'device' }, path 'sparse'). Each call
// is timed from prefillLayer's call until the outputs are freed and engine.synchronize() resolved
// (the bench's wall clock); before each, untimed, a device copy and a synchronize (the bench's L2
// flush).
//
//   node bench/layer_host_cold.mjs                 one fresh process: per-call µs of calls 1-30 and
//                                                  300-330, the median of calls 2-27 ("cold") and of
//                                                  300-330 ("warm"), as JSON on the last line
//   node bench/layer_host_cold.mjs --vs /abs/distA /abs/distB [--runs 20]
//                                                  alternates fresh processes over two builds' dist/
//                                                  (A B A B …) and prints, per build, the median over
//                                                  runs of each run's cold and warm medians, and A/B
//                                                  pair by pair (median of the pairs' ratios)
//   LAYER_DIST=/abs/dist   the build a single run times (default this checkout's dist/)
//   LAYER_HOST_SINK=1      the sink a host float32 [hQ]: the device checks stop at it every layer and
//                          the full checks take the call over (the fallback), the rest as above
//   NODE_FLAGS="…"         extra node flags for the children of --vs
import { performance } from 'node:perf_hooks';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { stubCudaEngine } from './stub_cuda_engine.mjs';

const med = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

if (process.argv[2] === '--vs') await driver(process.argv.slice(3));
else await child();

async function driver(argv) {
  const [distA, distB] = argv;
  const runsAt = argv.indexOf('--runs');
  const runs = runsAt >= 0 ? Number(argv[runsAt + 1]) : 20;
  if (!distA || !distB) throw new Error('usage: --vs /abs/distA /abs/distB [--runs N]');
  const self = fileURLToPath(import.meta.url);
  const flags = (process.env.NODE_FLAGS ?? '').split(/\s+/).filter(Boolean);
  const one = (dist) => {
    const r = spawnSync(process.execPath, [...flags, self], { env: { ...process.env, LAYER_DIST: dist }, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`child failed (${dist}): ${r.stderr}`);
    const lines = r.stdout.trim().split('\n');
    return JSON.parse(lines[lines.length - 1]);
  };
  const res = { A: [], B: [] };
  for (let i = 0; i < runs; i++) {
    res.A.push(one(distA));
    res.B.push(one(distB));
  }
  const f = (x) => x.toFixed(1).padStart(7);
  for (const k of ['A', 'B']) {
    const cold = res[k].map((r) => r.coldMedianUs), warm = res[k].map((r) => r.warmMedianUs), first = res[k].map((r) => r.firstUs);
    const coldL = res[k].map((r) => r.coldFirstLaunchUs), warmL = res[k].map((r) => r.warmFirstLaunchUs);
    console.log(`${k} ${k === 'A' ? distA : distB}`);
    console.log(`   cold (calls 2-27) median µs over ${runs} runs: ${f(med(cold))}  [min ${f(Math.min(...cold))}, max ${f(Math.max(...cold))}]`);
    console.log(`   warm (calls 300-330) median µs:             ${f(med(warm))}  [min ${f(Math.min(...warm))}, max ${f(Math.max(...warm))}]`);
    console.log(`   call -> first launch, cold / warm µs:       ${f(med(coldL))} / ${f(med(warmL))}`);
    console.log(`   first call µs:                              ${f(med(first))}`);
  }
  const ratio = (key) => med(res.A.map((a, i) => a[key] / res.B[i][key]));
  console.log(`A/B, median of the ${runs} pairs' ratios: cold ${ratio('coldMedianUs').toFixed(3)}, warm ${ratio('warmMedianUs').toFixed(3)}, first ${ratio('firstUs').toFixed(3)}; call -> first launch cold ${ratio('coldFirstLaunchUs').toFixed(3)}, warm ${ratio('warmFirstLaunchUs').toFixed(3)}`);
}

async function child() {
  const dist = process.env.LAYER_DIST ?? fileURLToPath(new URL('../dist', import.meta.url));
  const N = 4096, HQ = 64, TOPK = 512, LAST = 330;
  // when the layer's first and last launches were queued (the layer program's run, or its run and
  // finish in a build before one call per layer, or on a plan's first layer its first and last op
  // calls)
  let t0 = 0, firstOp = NaN, lastOp = NaN;
  const { engine, backend, prefillLayer, c4Layer } = await stubCudaEngine(dist, (t) => {
    if (Number.isNaN(firstOp)) firstOp = t;
    lastOp = t;
  });
  const { plan, q, caches, topkIndices: topk, attnSink: deviceSink } = c4Layer(N, HQ, TOPK);
  const sink = process.env.LAYER_HOST_SINK === '1' ? { dtype: 'float32', shape: [HQ], data: new Float32Array(HQ) } : deviceSink;
  const { swa, c4 } = caches;
  const flushA = backend.alloc(256), flushB = backend.alloc(256);
  // the bench's layer() as it calls it (a fresh args object per call)
  const layer = async () => {
    const r = await prefillLayer(engine, { plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, attnSink: sink, smScale: 1 / Math.sqrt(512), path: 'sparse' }, { output: 'device' });
    for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
  };
  const us = [], firstUs = [], lastUs = [];
  for (let i = 1; i <= LAST; i++) {
    await backend.copyDevice(flushA, flushB);
    await engine.synchronize();
    firstOp = lastOp = NaN;
    t0 = performance.now();
    await layer();
    await engine.synchronize();
    us.push((performance.now() - t0) * 1000);
    firstUs.push((firstOp - t0) * 1000);
    lastUs.push((lastOp - t0) * 1000);
  }
  const calls = (a, b, xs = us) => xs.slice(a - 1, b);
  const out = {
    dist,
    calls1to30: calls(1, 30).map((x) => Math.round(x * 10) / 10),
    calls300to330: calls(300, 330).map((x) => Math.round(x * 10) / 10),
    firstUs: us[0],
    coldMedianUs: med(calls(2, 27)),
    warmMedianUs: med(calls(300, 330)),
    // µs from the call to its first launch (the host time the device waits for) and to its last
    coldFirstLaunchUs: med(calls(2, 27, firstUs)),
    warmFirstLaunchUs: med(calls(300, 330, firstUs)),
    coldLastLaunchUs: med(calls(2, 27, lastUs)),
    warmLastLaunchUs: med(calls(300, 330, lastUs)),
    deviceStats: plan.deviceStats,
  };
  console.log(`calls 1-30 µs: ${out.calls1to30.join(' ')}`);
  console.log(`calls 300-330 µs: ${out.calls300to330.join(' ')}`);
  console.log(`cold median (calls 2-27) ${out.coldMedianUs.toFixed(1)} µs, warm median (300-330) ${out.warmMedianUs.toFixed(1)} µs; deviceStats ${JSON.stringify(out.deviceStats)}`);
  console.log(`call -> first launch: cold ${out.coldFirstLaunchUs.toFixed(1)} µs, warm ${out.warmFirstLaunchUs.toFixed(1)} µs; call -> last launch: cold ${out.coldLastLaunchUs.toFixed(1)} µs, warm ${out.warmLastLaunchUs.toFixed(1)} µs`);
  console.log(JSON.stringify(out));
}
