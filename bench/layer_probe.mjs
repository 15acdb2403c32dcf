// Where a device c4 layer's wall clock goes beyond its kernels' time (GPU only; `npm run build`
// first). For N = 4096 and 32768 queries (hQ 64, top-k 512, one fresh request: the layer section
// of `sparse-mla bench --backend cuda`) it prints, after JIT_WARMUP untimed layers of each variant
// (V8's steady state), medians of REPEAT runs after WARMUP, L2 flushed before each run:
//   kernels  each timed launch's device ms and its start from the first launch (gaps = untimed
//            device work or the device waiting for the host), their sum and the span;
//   wall     from the call until engine.synchronize() resolves (and until the call itself resolves);
//   queued   the layer behind ~1 ms of device copies, so the host is ahead: its device time
//            including untimed work, with host latency hidden (wall of blocker + layer − blocker);
//   trace    the native calls (a queued layer's one call shows as program.run): when JS made each
//            (µs from the call), when it returned, when its promise settled (medians);
//   host costs  what each native call costs the JS thread alone (median of 200 calls);
// for the layer as the bench runs it (device sink), with a host sink and without a sink, and for
// its pieces alone (the planner rows, the dropped-total read, the two dequants, the prefill, a
// synchronize of an idle stream, allocating the outputs). A variant that throws prints its error
// and the probe goes on.
//   node bench/layer_probe.mjs            (PROBE_N=4096,16384 to choose the sizes; PROBE_JIT_WARMUP=0
//                                          to measure before V8 has optimized the layer's JS)
import { performance } from 'node:perf_hooks';
import { createEngine, createPlan, prefillLayer, tensor } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import { CudaBackend } from '../dist/backends/native/cuda_backend.js';
import { makeRng } from '../dist/check/grid.js';
import { deviceInputs } from './device_inputs.mjs';
import { freshC4Chunk, median } from './lib.mjs';
import { checkPlacedTensor, checkQuery } from '../dist/ops/common.js';
import { routePrefill } from '../dist/planner/router.js';
import { Plan } from '../dist/planner/plan.js';
import { LayerResources } from '../dist/planner/layer_resources.js';

const REPEAT = 10, WARMUP = 3, HQ = 64, TOPK = 512, MiB = 2 ** 20;
const SIZES = (process.env.PROBE_N ?? '4096,32768').split(',').map(Number);
const JIT_WARMUP = Number(process.env.PROBE_JIT_WARMUP ?? 300);
const ms = (x) => (Number.isFinite(x) ? x.toFixed(3) : String(x));
const us = (x) => (Number.isFinite(x) ? String(Math.round(x * 1000)).padStart(6) : '     -');

const engine = await createEngine({ backend: 'cuda' });
const be = engineBackend(engine, CudaBackend);
if (!be) throw new Error('needs a cuda engine');
const rng = makeRng(0x5eed);
const { randomDevice, deviceCache, c4TopkIndices } = deviceInputs(engine, rng);
const flushA = be.alloc(256 * MiB), flushB = be.alloc(256 * MiB);
const spansOf = () => (typeof be.takeKernelSpans === 'function' ? be.takeKernelSpans() : be.takeKernelMs().map((d) => [NaN, d]));

/** Runs fn, printing its error instead of stopping the probe. */
async function variant(name, fn) {
  try {
    await fn();
  } catch (e) {
    console.log(`  ${name}: FAILED ${e?.code ?? ''} ${e?.message ?? e}`);
    try {
      await engine.synchronize();
    } catch {}
  }
}

async function flush() {
  await be.copyDevice(flushA, flushB);
  await engine.synchronize();
}

/** Device time of fn's launches: per launch (duration, start from the first), sum and span. */
async function kernels(name, fn) {
  be.setTiming(true);
  const runs = [];
  try {
    for (let i = 0; i < WARMUP + REPEAT; i++) {
      await flush();
      spansOf();
      await fn();
      const s = spansOf();
      if (i >= WARMUP) runs.push(s);
    }
  } finally {
    be.setTiming(false);
  }
  const n = runs[0].length;
  if (n === 0) return void console.log(`  ${name} kernels: none timed`);
  const dur = Array.from({ length: n }, (_, k) => median(runs.map((r) => r[k][1] - r[k][0])));
  const start = Array.from({ length: n }, (_, k) => median(runs.map((r) => r[k][0])));
  const sum = median(runs.map((r) => r.reduce((a, [b, e]) => a + e - b, 0)));
  const span = median(runs.map((r) => r[n - 1][1] - r[0][0]));
  console.log(`  ${name} kernels: sum ${ms(sum)} ms, span ${ms(span)} ms; launches (ms @ start): ${dur.map((d, k) => `${ms(d)} @ ${ms(start[k])}`).join(', ')}`);
  return sum;
}

/** Wall clock of fn until the device is done (and until fn resolved), no events. */
async function wall(name, fn, kernelSum, spinMs = 0) {
  const total = [], call = [];
  for (let i = 0; i < WARMUP + REPEAT; i++) {
    await flush();
    // spinMs: the JS thread kept busy that long before the call (a thread that just woke from a wait vs one already running)
    for (const until = performance.now() + spinMs; performance.now() < until; );
    const t0 = performance.now();
    await fn();
    const t1 = performance.now();
    await engine.synchronize();
    const t2 = performance.now();
    if (i >= WARMUP) total.push(t2 - t0), call.push(t1 - t0);
  }
  const w = median(total);
  console.log(`  ${name} wall: ${ms(w)} ms (call resolved at ${ms(median(call))} ms)${kernelSum ? `; ${(w / kernelSum).toFixed(3)}x the kernels, gap ${ms(w - kernelSum)} ms` : ''}`);
}

/** fn behind ~1 ms of device copies (the host gets ahead): the device time of fn with host latency hidden. */
async function queued(name, fn) {
  const blocker = () => Promise.all(Array.from({ length: 8 }, () => be.copyDevice(flushA, flushB)));
  const alone = [], both = [], enq = [];
  for (let i = 0; i < WARMUP + REPEAT; i++) {
    await flush();
    let t0 = performance.now();
    await blocker();
    await engine.synchronize();
    if (i >= WARMUP) alone.push(performance.now() - t0);
    await flush();
    t0 = performance.now();
    await blocker();
    await fn();
    const t1 = performance.now();
    await engine.synchronize();
    if (i >= WARMUP) both.push(performance.now() - t0), enq.push(t1 - t0);
  }
  console.log(`  ${name} queued: device ${ms(median(both) - median(alone))} ms (blocker ${ms(median(alone))} ms, blocker + call resolved at ${ms(median(enq))} ms)`);
}

/** fn's native calls, medians over REPEAT runs after WARMUP: when JS made each (µs from the call), when it returned, when its promise settled. */
async function trace(name, fn) {
  const orig = be.ops;
  let log = [];
  const wrapped = {};
  for (const op of ['planRows', 'planCompressedTokenIds', 'dequantizeKvCache', 'sparsePrefill', 'upload', 'download', 'copyDevice']) {
    wrapped[op] = (...args) => {
      const e = { op, call: performance.now(), ret: NaN, settle: NaN };
      log.push(e);
      const p = orig[op](...args);
      e.ret = performance.now();
      p.then(() => (e.settle = performance.now()), () => (e.settle = performance.now()));
      return p;
    };
  }
  // JS steps before the native calls, stamped on entry
  const steps = [
    [Plan.prototype, 'checkCaches'],
    [Plan.prototype, 'checkTopk'],
    [Plan.prototype, 'resources'],
    [LayerResources.prototype, 'combineC4'],
    [be.layer, 'planRows'],
    [CudaBackend.prototype, 'planRows'],
    [LayerResources.prototype, 'takeWorkspace'],
    [be.layer, 'prefill'],
    [CudaBackend.prototype, 'queueLayer'],
    [CudaBackend.prototype, 'alloc'],
  ];
  const saved = steps.map(([o, m]) => o[m]);
  steps.forEach(([o, m], k) => {
    const f = saved[k];
    o[m] = function (...args) {
      log.push({ op: `(js) ${m}`, call: performance.now(), ret: NaN, settle: NaN });
      return f.apply(this, args);
    };
  });
  // the plan's layer programs' run (a queued layer's one native call), traced like the ops
  const programs = be.layerProgramsOf(currentPlan.resources(engine.layerSteps()));
  for (const program of programs) {
    const run = program.run;
    Object.defineProperty(program, 'run', {
      configurable: true,
      value: (...a) => {
        const e = { op: 'program.run', call: performance.now(), ret: NaN, settle: NaN };
        log.push(e);
        const r = run.apply(program, a);
        e.ret = performance.now();
        r.done.then(() => (e.settle = performance.now()), () => (e.settle = performance.now()));
        return r;
      },
    });
  }
  const runs = [];
  be.ops = Object.assign(Object.create(orig), wrapped);
  try {
    for (let i = 0; i < WARMUP + REPEAT; i++) {
      await flush();
      log = [];
      const t0 = performance.now();
      await fn();
      const t1 = performance.now();
      await engine.synchronize();
      const t2 = performance.now();
      if (i >= WARMUP) runs.push({ t0, resolved: t1 - t0, synced: t2 - t0, log });
    }
  } finally {
    be.ops = orig;
    steps.forEach(([o, m], k) => (o[m] = saved[k]));
    for (const program of programs) delete program.run;
  }
  // runs may log different numbers of steps (a kept buffer, a settled download): each step's median over the runs that have it
  const at = (k, f) => median(runs.filter((r) => r.log[k]?.op === runs[0].log[k].op).map((r) => r.log[k][f] - r.t0).filter(Number.isFinite));
  console.log(`  ${name} trace (µs from the call: called / returned / settled): resolved ${us(median(runs.map((r) => r.resolved)))}, synchronized ${us(median(runs.map((r) => r.synced)))}`);
  runs[0].log.forEach((e, k) => console.log(`    ${e.op.padEnd(24)} ${us(at(k, 'call'))} ${us(at(k, 'ret'))} ${us(at(k, 'settle'))}`));
}


let currentPlan;
for (const N of SIZES) {
  const t = performance.now();
  const plan = createPlan(freshC4Chunk(N));
  currentPlan = plan;
  const swa = await deviceCache(N / 64), c4 = await deviceCache(N / 4 / 64);
  const q = await randomDevice([N, HQ, 512]);
  const sinkValues = Float32Array.from({ length: HQ }, () => rng.normal());
  const hostSink = tensor('float32', [HQ], sinkValues);
  const deviceSink = await engine.upload(hostSink);
  const topkIdx = c4TopkIndices(N, TOPK);
  const topk = await engine.upload(tensor('int32', [N, TOPK], topkIdx));
  const layerWith = (attnSink) => async () => {
    const r = await prefillLayer(engine, { plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, ...(attnSink ? { attnSink } : {}), smScale: 1 / Math.sqrt(512), path: 'sparse' }, { output: 'device' });
    for (const x of [r.out, r.lse, r.maxLogits]) x.data.free();
  };
  console.log(`\nN = ${N} queries, hQ ${HQ}, top-k ${TOPK} (setup ${ms(performance.now() - t)} ms)`);
  await variant('first layer', async () => {
    const t0 = performance.now();
    await layerWith(hostSink)();
    await engine.synchronize();
    console.log(`  first layer (builds the plan's device ids and workspace): ${ms(performance.now() - t0)} ms`);
  });

  // V8 optimizes the layer's JS only after some hundreds of calls (an engine makes thousands):
  // measured in that steady state unless PROBE_JIT_WARMUP=0
  await variant('JIT warm-up', async () => {
    for (const sink of [hostSink, deviceSink, undefined]) {
      for (let i = 0; i < JIT_WARMUP; i++) {
        await layerWith(sink)();
        await engine.synchronize();
      }
    }
  });

  for (const [name, sink] of [['host sink', hostSink], ['device sink (the bench)', deviceSink], ['no sink', undefined]]) {
    await variant(name, async () => {
      const fn = layerWith(sink);
      const sum = await kernels(name, fn);
      await wall(name, fn, sum);
      await wall(`${name} (JS thread busy 0.3 ms before the call)`, fn, sum, 0.3);
      await queued(name, fn);
      await trace(name, fn);
    });
  }

  // the layer's pieces alone, from the plan's device resources (built by the first layer)
  await variant('pieces', async () => {
    const steps = engine.layerSteps();
    const res = plan.resources(steps);
    const layout = plan.layout(4);
    const compIds = await res.compressedIds(steps, 4), swaIds = await res.swaIds(steps);
    const ws = res.takeWorkspace(steps);
    const { width } = plan.checkTopk(topk, true);
    const rowsJob = { seqLens: Int32Array.of(N), extendLens: Int32Array.of(N), window: plan.window, ratio: 4, topkIndices: topk.data, topk: TOPK, width };
    // as the layer builds them: no per-query counts, their total summed on the device
    const rows = await be.planRows(rowsJob, 'device', null, 'device');
    try {
      const idle = [];
      for (let i = 0; i < 20; i++) {
        const t0 = performance.now();
        await engine.synchronize();
        idle.push(performance.now() - t0);
      }
      console.log(`  synchronize of an idle stream: ${ms(median(idle))} ms`);
      await variant('alloc', async () => {
        const a = [];
        for (let i = 0; i < 20; i++) {
          const t0 = performance.now();
          const bufs = [be.alloc(N * HQ * 512 * 2), be.alloc(N * HQ * 4), be.alloc(N * HQ * 4), be.alloc(N * width * 4), be.alloc(N * 4), be.alloc(N * 4)];
          a.push(performance.now() - t0);
          for (const b of bufs) b.free();
        }
        console.log(`  allocating a layer's outputs and rows (6 buffers, ${ms((N * HQ * 1032 + N * width * 4) / MiB)} MiB): ${ms(median(a))} ms host`);
      });
      const planRows = async () => {
        const r = await be.planRows(rowsJob, 'device', null, 'device');
        for (const b of [r.rows, r.lens, r.droppedTotal]) b.free();
      };
      const dequants = async () => {
        await be.dequantizeKCacheIdsInto(c4, compIds, layout.compressedRows, ws, 0);
        await be.dequantizeKCacheIdsInto(swa, swaIds, layout.swaRows, ws, layout.compressedRows);
      };
      const prefill = (attnSink) => async () => {
        const r = await be.sparsePrefill({ q: q.data, kv: ws, indices: rows.rows, topkLength: rows.lens, attnSink, sQ: N, hQ: HQ, dQK: 512, dV: 512, sKV: ws.byteLength / 1024, topk: width, smScale: 1 / Math.sqrt(512) }, 'device');
        for (const b of [r.out, r.lse, r.maxLogits]) b.free();
      };
      const readDropped = () => be.download(rows.droppedTotal, new BigInt64Array(1));
      // what each native call costs the JS thread (no events, device operands: each is queued and
      // settled at once), median of 200 calls; the device work piles up behind and is waited for after
      const hostCost = async (name, fn) => {
        const t = [];
        for (let i = 0; i < 200; i++) {
          const t0 = performance.now();
          await fn();
          t.push(performance.now() - t0);
        }
        await engine.synchronize();
        // the same call right after the thread has waited for the device (as a layer's first call is)
        const w = [];
        for (let i = 0; i < 50; i++) {
          await flush();
          const t0 = performance.now();
          await fn();
          w.push(performance.now() - t0);
        }
        await engine.synchronize();
        console.log(`  host cost of ${name}: ${us(median(t))} µs a call (${us(median(w))} µs right after a wait for the device)`);
      };
      await variant('host costs', async () => {
        const rowsBytes = N * width * 4;
        await hostCost('alloc + free of rows, lens, total', async () => {
          for (const b of [be.alloc(rowsBytes), be.alloc(N * 4), be.alloc(8)]) b.free();
        });
        const pre = { rows: be.alloc(rowsBytes), lens: be.alloc(N * 4), total: be.alloc(8) };
        const op = (b) => b.native;
        await hostCost('ops.planRows (preallocated outputs)', () =>
          be.ops.planRows({ numRequests: 1, seqLens: Int32Array.of(N), extendLens: Int32Array.of(N), window: plan.window, ratio: 4, topkIndices: op(topk.data), topk: TOPK, width, rows: op(pre.rows), lens: op(pre.lens), dropped: null, droppedTotal: op(pre.total), numQueries: N }, be.stream));
        await hostCost('be.planRows (allocates)', planRows);
        await hostCost('8-byte download (call to return)', () => { be.download(pre.total, new BigInt64Array(1)); });
        await hostCost('dequantizeKCacheIdsInto (c4)', () => be.dequantizeKCacheIdsInto(c4, compIds, layout.compressedRows, ws, 0));
        await hostCost('sparsePrefill, device sink (allocates outputs)', prefill(deviceSink.data));
        await hostCost('synchronize of an idle stream', () => engine.synchronize());
        // the layer's checks before its first native call, each alone (JS only)
        await hostCost('check q + sink + caches + top-k + route (JS)', () => {
          checkQuery(q, '[numQueries, hQ, 512]', true);
          checkPlacedTensor(deviceSink, 'attnSink', ['float32']);
          plan.checkCaches({ swa, c4 }, 4);
          plan.checkTopk(topk, true);
          routePrefill(N, { path: 'sparse', backend: 'cuda', compressRatio: 4 });
        });
        for (const b of Object.values(pre)) b.free();
      });
      for (const [name, fn] of [
        ['planRows (c4 combine)', planRows],
        ['dropped-total read (8-byte download)', readDropped],
        ['both dequants', dequants],
        ['prefill, host sink', prefill(sinkValues)],
        ['prefill, device sink', prefill(deviceSink.data)],
        ['prefill, no sink', prefill(null)],
      ]) {
        await variant(name, async () => {
          const sum = await kernels(name, fn);
          await wall(name, fn, sum);
          await queued(name, fn);
        });
      }
    } finally {
      for (const b of [rows.rows, rows.lens, rows.droppedTotal]) b.free();
      res.giveBackWorkspace(ws);
    }
  });
  for (const x of [q, topk, deviceSink, swa, c4]) x.data.free();
}
flushA.free();
flushB.free();
await engine.dispose();
