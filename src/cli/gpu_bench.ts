/**
 * `sparse-mla bench --backend cuda`: the GPU benchmark through the addon (the same calls a
 * user makes, with device-resident inputs and outputs so no host copy is timed). Each figure is
 * the median over --repeat runs after --warmup runs of the op's device time, measured with CUDA
 * events around its launches (takeKernelMs), with L2 flushed before every run by a 2 × 256 MiB
 * device-to-device copy. Inputs: random bf16 blocks tiled on the device; caches are one quantized
 * random page tiled over every page (valid FP8 data and scales); indices random per entry.
 *
 * Reported: sparsePrefill TFLOPS at FlashMLA's configurations (FLOPs = 2·Σtopk·hQ·(dQK+dV));
 * dequant GB/s (record + id read, row written) against a 1 GiB device-to-device copy; the workspace
 * path (dequant + sparsePrefill) against the paged path on V4 c4 prefill chunks of 4K/16K/32K query
 * tokens (window 128 + 512 compressed entries per query, hQ 64; both paths attend the same entries).
 */
import { writeFileNoFollow } from '../io/files.js';
import { createEngine, createKvCache } from '../index.js';
import { engineBackend } from '../engine.js';
import { deviceTensor, tensor } from '../tensor.js';
import type { CacheFormat, DeviceBuffer, DeviceKvCache, DeviceTensor, Engine } from '../types.js';
import { CudaBackend } from '../backends/native/cuda_backend.js';
import { cacheOpBytes, rowDimOf } from '../kv_cache_layout.js';
import { prefillFlops } from '../ops/sparse_prefill.js';
import { makeRng, randomBf16, type Rng } from '../check/grid.js';
import { median, runSpreadNote } from './table.js';
import { combinedWidth, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, requestVisible, swaGatherLength, type ShardSplit } from '../planner/index.js';
import { evenRanges } from '../planner/sharded_layer.js';

export interface GpuBenchOptions {
  repeat: number;
  warmup: number;
  out?: string;
  commit?: string;
  command: string;
  device: Record<string, unknown>;
  host: object;
}

interface Row {
  name: string;
  median_ms: number;
  runs_ms: number[];
  value: number;
  unit: 'TFLOPS' | 'GB/s' | 'ms' | 'x' | '%';
  note?: string;
}

const MiB = 2 ** 20;
/** A device buffer of `rows` dequantized v4 rows (bf16), as a plan's workspace. */
const v4Workspace = (be: CudaBackend, rows: number): DeviceTensor<'bf16'> =>
  deviceTensor('bf16', [rows, rowDimOf('v4')], be.alloc(rows * rowDimOf('v4') * 2));
/**
 * Layers run untimed before the layer section's second timing, so it sees a process further on (an
 * engine makes thousands of layers, 61 a chunk). Not V8's steady state: TurboFan takes the layer's
 * largest functions only after a few thousand calls (bench/results/layer-host-js-by-calls.txt).
 */
const LAYER_JIT_WARMUP = 300;

/** The cuda backend of a cuda engine: the timing, device copies and device planner the benchmark drives. */
function cudaBackendOf(engine: Engine): CudaBackend {
  const be = engineBackend(engine, CudaBackend);
  if (!be) throw new Error(`the GPU benchmark needs a cuda engine, not ${engine.backend}`);
  return be;
}

/**
 * A device tensor of random bf16 values on a cuda engine: a random block of at most 16 MiB, tiled
 * over the tensor on the device (the layer scripts' device inputs too, bench/device_inputs.mjs).
 */
export async function randomDeviceBf16(engine: Engine, rng: Rng, shape: number[]): Promise<DeviceTensor<'bf16'>> {
  const be = cudaBackendOf(engine);
  const n = shape.reduce((a, b) => a * b, 1);
  const block = await engine.upload(randomBf16(rng, [Math.min(n, 8 * MiB)]));
  const buf = be.alloc(n * 2);
  await be.fillDevice(buf, block.data);
  block.data.free();
  return deviceTensor('bf16', shape, buf);
}

/** A device v4 / v32 cache of `pages` pages on a cuda engine: one quantized random page (64 tokens) tiled. */
export async function tiledDeviceCache(engine: Engine, rng: Rng, format: 'v4' | 'v32', pages: number): Promise<DeviceKvCache> {
  const be = cudaBackendOf(engine);
  const unit = format === 'v4' ? createKvCache('v4', { pageSize: 64, numPages: 1 }) : createKvCache('v32', { numTokens: 64 });
  await engine.quantizeKCache({ cache: unit, tokenIds: Array.from({ length: 64 }, (_, i) => i), rows: randomBf16(rng, [64, format === 'v4' ? 512 : 576]) });
  const block = await engine.uploadKvCache(unit);
  const numPages = format === 'v4' ? pages : pages * 64;
  const buf = be.alloc(unit.data.byteLength * pages);
  await be.fillDevice(buf, block.data);
  block.data.free();
  return { format, pageSize: format === 'v4' ? 64 : 1, numPages, data: buf };
}

/** A c4 layer's top-k for one fresh request of n queries (int32 [n, topk], −1 padded): random positions each query sees. */
export function randomC4Topk(rng: Rng, n: number, topk: number): Int32Array {
  const idx = new Int32Array(n * topk).fill(-1);
  for (let i = 0; i < n; i++) {
    const visible = Math.floor((i + 1) / 4);
    for (let k = 0; k < Math.min(topk, visible); k++) idx[i * topk + k] = rng.int(0, visible);
  }
  return idx;
}

/** Bytes a dequant of n tokens moves: its records and rows (cacheOpBytes) and the int64 ids the kernel reads. */
const dequantBytes = (format: CacheFormat, n: number): number => cacheOpBytes(format, n) + n * BigInt64Array.BYTES_PER_ELEMENT;

/**
 * SPARSE_MLA_GPU_BENCH_ONLY=comma list of sections (dequant, prefill, paged, planner, chunks, layer, router, multi) runs
 * only those; SPARSE_MLA_SWEEP_PREFIXES=comma list of prefixes (default 0,32768) and
 * SPARSE_MLA_SWEEP_RATIOS (default 4,128,0) narrow the router sweep.
 */
function sections(): (name: string) => boolean {
  const only = process.env.SPARSE_MLA_GPU_BENCH_ONLY;
  if (!only) return () => true;
  const set = new Set(only.split(',').map((x) => x.trim()));
  return (name) => set.has(name);
}

export async function gpuBench(o: GpuBenchOptions): Promise<number> {
  const want = sections();
  const engine = await createEngine({ backend: 'cuda' });
  const be = cudaBackendOf(engine);
  const rng = makeRng(0x5eed);
  const rows: Row[] = [];
  let sweep: RouterSweep | null = null;
  let multi: MultiDevice | null = null;
  be.setTiming(true);
  const flushA = be.alloc(256 * MiB), flushB = be.alloc(256 * MiB);
  const say = (r: Row): void => {
    // on a power-capped GPU a row of long launches can slow down mid-measurement (its median then
    // depends on when): the row says so
    if (r.note === undefined && r.unit === 'TFLOPS') {
      const note = runSpreadNote(r.runs_ms);
      if (note) r.note = note;
    }
    rows.push(r);
    console.log(`${r.name.padEnd(64)} ${r.median_ms.toFixed(3).padStart(9)} ms  ${r.value.toFixed(1).padStart(8)} ${r.unit}${r.note ? `  (${r.note})` : ''}`);
  };

  /**
   * Device ms of fn's launches (summed), per run, L2 flushed before each run. The flush and fn's
   * launches are queued back to back and their times taken after both (the first is the flush's),
   * as the harness and FlashMLA's benchmark time theirs: taking the flush's time first would wait
   * for it, so each run's first start event would be recorded on an idle stream and would also
   * time the host's launch of fn's first kernel.
   */
  const time = async (fn: () => Promise<void>, warmup = o.warmup, repeat = o.repeat): Promise<number[]> => {
    const runs: number[] = [];
    for (let i = 0; i < warmup + repeat; i++) {
      await be.copyDevice(flushA, flushB);
      await fn();
      const [, ...launches] = be.takeKernelMs();
      if (i >= warmup) runs.push(launches.reduce((a, b) => a + b, 0));
    }
    return runs;
  };
  /** fn with no events around its launches (as a caller runs it). */
  const untimed = async (fn: () => Promise<void>): Promise<void> => {
    be.setTiming(false);
    try {
      await fn();
    } finally {
      be.setTiming(true);
    }
  };
  /** Wall clock ms of fn until the device is done with it, per run, L2 flushed before each run (no events). */
  const wallClock = async (fn: () => Promise<void>, warmup = o.warmup, repeat = o.repeat): Promise<number[]> => {
    be.setTiming(false);
    const runs: number[] = [];
    try {
      for (let i = 0; i < warmup + repeat; i++) {
        await be.copyDevice(flushA, flushB);
        await engine.synchronize();
        const t0 = performance.now();
        await fn();
        await engine.synchronize();
        if (i >= warmup) runs.push(performance.now() - t0);
      }
    } finally {
      be.setTiming(true);
    }
    return runs;
  };

  /**
   * Device ms of fn as the wall-clock runs run it (no events around its launches), per run: from
   * the end of the timed flush queued before it to the start of a second timed flush queued after
   * it (gaps between its launches included, and any delay of the host's first launch past the
   * flush's end), so a wall clock above the kernels' time can be told apart as the host's or the
   * device's.
   */
  const untimedSpans = async (fn: () => Promise<void>, warmup = o.warmup, repeat = o.repeat): Promise<number[]> => {
    const runs: number[] = [];
    for (let i = 0; i < warmup + repeat; i++) {
      await be.copyDevice(flushA, flushB);
      await untimed(fn);
      await be.copyDevice(flushA, flushB);
      const [before, after] = be.takeKernelSpans();
      if (i >= warmup) runs.push(after![0] - before![1]);
    }
    return runs;
  };

  /**
   * How long the device waits for fn's first launch when the call starts on an idle device (as in
   * wallClock's runs), per pair of runs: one as untimedSpans runs it (the first launch hidden behind
   * a flush queued before it), then one from an idle device between two small timed copies (the
   * span from the first's end to the second's start: fn's launches untimed, the wait for the host's
   * first launch included). The pair's difference is the wait; `pastSpan` is how far the idle run's
   * wall clock (to the synchronize after the second copy) runs past its span: the host seeing the
   * device done.
   */
  const markA = be.alloc(4096), markB = be.alloc(4096);
  const firstLaunchWait = async (fn: () => Promise<void>, warmup = o.warmup, repeat = o.repeat): Promise<{ waitUs: number[]; pastSpanUs: number[] }> => {
    const waitUs: number[] = [], pastSpanUs: number[] = [];
    for (let i = 0; i < warmup + repeat; i++) {
      const [flushed] = await untimedSpans(fn, 0, 1);
      await be.copyDevice(flushA, flushB);
      await engine.synchronize();
      be.takeKernelSpans();
      const t0 = performance.now();
      await be.copyDevice(markA, markB);
      await untimed(fn);
      await be.copyDevice(markA, markB);
      await engine.synchronize();
      const wall = performance.now() - t0;
      const [before, after] = be.takeKernelSpans();
      const span = after![0] - before![1];
      if (i >= warmup) waitUs.push((span - flushed!) * 1000), pastSpanUs.push((wall - span) * 1000);
    }
    return { waitUs, pastSpanUs };
  };

  /**
   * fn's kernels' device time (events) and its wall clock (no events) in alternate runs, so both
   * see the same clock state: per run, L2 flushed before each. The ratio is the median of each
   * run's wall clock over the kernel time measured just before it: the prefill's large launches
   * slow down when the device's power cap lowers its clock mid-measurement (docs/perf-history.md),
   * and a ratio of two medians can compare one clock's wall clock with the other's kernel time.
   */
  const kernelsAndWall = async (fn: () => Promise<void>): Promise<{ kernelRuns: number[]; wallRuns: number[]; ratio: number }> => {
    const kernelRuns: number[] = [], wallRuns: number[] = [];
    for (let i = 0; i < o.warmup + o.repeat; i++) {
      const [k] = await time(fn, 0, 1);
      const [w] = await wallClock(fn, 0, 1);
      if (i >= o.warmup) kernelRuns.push(k!), wallRuns.push(w!);
    }
    return { kernelRuns, wallRuns, ratio: median(wallRuns.map((w, i) => w / kernelRuns[i]!)) };
  };

  const randomDevice = (shape: number[]): Promise<DeviceTensor<'bf16'>> => randomDeviceBf16(engine, rng, shape);
  const deviceCache = (format: 'v4' | 'v32', pages: number): Promise<DeviceKvCache> => tiledDeviceCache(engine, rng, format, pages);
  const randomIds = (r: Rng, n: number, bound: number): Int32Array => Int32Array.from({ length: n }, () => r.int(0, bound));

  try {
    const info = be.memInfo();
    console.log(`device memory: ${(info.free / 2 ** 30).toFixed(1)} GiB free of ${(info.total / 2 ** 30).toFixed(1)} GiB`);

    // ---- copy ceiling and dequant: ROUNDS interleaved rounds (copy, then each format at each
    // size), so drift of the card shows in every figure alike. 256K random tokens is the headline;
    // 4K-64K show where launch latency counts.
    const ROUNDS = 3;
    const DQ_SIZES = [262144, 65536, 16384, 4096];
    if (want('dequant')) {
      const ga = be.alloc(2 ** 30), gb = be.alloc(2 ** 30);
      const dqCaches = { v4: await deviceCache('v4', 4096), v32: await deviceCache('v32', 4096) };
      // The workspace path's dequant as a plan runs it: int64 ids on the device, rows written into a
      // device buffer that is reused (the backend call prefillLayer makes), enqueued at once behind
      // the L2 flush. Host ids go through the public op, which stages and widens them on a pool
      // thread and so starts the kernel microseconds after its timing event once the stream has
      // drained: one such row a format a round at 256K.
      const hostIds = new Map(DQ_SIZES.map((n) => [n, tensor('int32', [n], randomIds(rng, n, 262144))]));
      const dqIds = new Map<number, DeviceBuffer>();
      for (const [n, ids] of hostIds) dqIds.set(n, await be.upload(BigInt64Array.from(ids.data, (x) => BigInt(x))));
      const dqOut = be.alloc(DQ_SIZES[0]! * Math.max(rowDimOf('v4'), rowDimOf('v32')) * 2);
      const copyGBsRounds: number[] = [];
      const dqFraction: Record<string, number[]> = {};
      try {
        for (let round = 0; round < ROUNDS; round++) {
          const copyRuns = await time(() => be.copyDevice(ga, gb));
          const copyMs = median(copyRuns);
          const roundCopy = (2 * 2 ** 30) / copyMs / 1e6;
          copyGBsRounds.push(roundCopy);
          say({ name: `round ${round + 1}: device-to-device copy 1 GiB (read + write)`, median_ms: copyMs, runs_ms: copyRuns, value: roundCopy, unit: 'GB/s' });
          for (const format of ['v4', 'v32'] as const) {
            for (const n of DQ_SIZES) {
              const cache = dqCaches[format];
              const runs = await time(() => be.dequantizeKCacheIdsInto(cache, dqIds.get(n)!, n, dqOut, 0));
              const bytes = dequantBytes(format, n);
              const ms = median(runs);
              const gbs = bytes / ms / 1e6;
              (dqFraction[`${format}/${n}`] ??= []).push(gbs / roundCopy);
              say({ name: `round ${round + 1}: dequant ${format} ${n / 1024}K random tokens`, median_ms: ms, runs_ms: runs, value: gbs, unit: 'GB/s', note: `${((gbs / roundCopy) * 100).toFixed(1)}% of this round's copy` });
            }
            const n = DQ_SIZES[0]!;
            const hostRuns = await time(async () => {
              const out = await engine.dequantizeKCachePaged({ cache: dqCaches[format], tokenIds: hostIds.get(n)! }, { output: 'device' });
              out.data.free();
            });
            const hostGBs = dequantBytes(format, n) / median(hostRuns) / 1e6;
            say({ name: `round ${round + 1}: dequant ${format} ${n / 1024}K random tokens, host int32 ids`, median_ms: median(hostRuns), runs_ms: hostRuns, value: hostGBs, unit: 'GB/s', note: `${((hostGBs / roundCopy) * 100).toFixed(1)}% of this round's copy` });
          }
        }
      } finally {
        ga.free();
        gb.free();
        dqCaches.v4.data.free();
        dqCaches.v32.data.free();
        for (const ids of dqIds.values()) ids.free();
        dqOut.free();
      }
      const copyGBs = median(copyGBsRounds);
      say({ name: 'device-to-device copy 1 GiB: median of round medians', median_ms: (2 * 2 ** 30) / copyGBs / 1e6, runs_ms: [], value: copyGBs, unit: 'GB/s' });
      for (const [key, v] of Object.entries(dqFraction)) {
        const [format, n] = key.split('/');
        const f = median(v);
        say({ name: `dequant ${format} ${Number(n) / 1024}K random tokens: % of copy, median of rounds`, median_ms: 0, runs_ms: [], value: f * 100, unit: '%', note: `rounds ${v.map((x) => (x * 100).toFixed(1)).join('/')}%` });
      }
    }

    // ---- sparse prefill at FlashMLA's configurations
    // (FlashMLA's own figures for these rows: bench/RESULTS.md)
    const configs = [
      { name: 'V3.2 sQ4096 hQ128 dQK576 topk2048 sKV32768', sQ: 4096, hQ: 128, dQK: 576, topk: 2048, sKV: 32768 },
      { name: 'V4 sQ4096 hQ64 dQK512 topk512 sKV32768', sQ: 4096, hQ: 64, dQK: 512, topk: 512, sKV: 32768 },
      { name: 'V4 sQ4096 hQ64 dQK512 topk640 sKV32768', sQ: 4096, hQ: 64, dQK: 512, topk: 640, sKV: 32768 },
      { name: 'V4 sQ4096 hQ128 dQK512 topk1024 sKV32768', sQ: 4096, hQ: 128, dQK: 512, topk: 1024, sKV: 32768 },
      { name: 'V4 sQ32768 hQ64 dQK512 topk512 sKV65536', sQ: 32768, hQ: 64, dQK: 512, topk: 512, sKV: 65536 },
      { name: 'V4 sQ32768 hQ64 dQK512 topk640 sKV65536', sQ: 32768, hQ: 64, dQK: 512, topk: 640, sKV: 65536 },
    ];
    for (const c of want('prefill') ? configs : []) {
      const q = await randomDevice([c.sQ, c.hQ, c.dQK]);
      const kv = await randomDevice([c.sKV, c.dQK]);
      const indices = await engine.upload(tensor('int32', [c.sQ, c.topk], randomIds(rng, c.sQ * c.topk, c.sKV)));
      const sink = await engine.upload(tensor('float32', [c.hQ], Float32Array.from({ length: c.hQ }, () => rng.normal())));
      const runs = await time(async () => {
        const r = await engine.sparsePrefill({ q, kv, indices, attnSink: sink, smScale: 1 / Math.sqrt(c.dQK) }, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      });
      const ms = median(runs);
      say({ name: `sparsePrefill ${c.name}`, median_ms: ms, runs_ms: runs, value: prefillFlops(c.sQ * c.topk, c.hQ, c.dQK) / ms / 1e9, unit: 'TFLOPS' });
      for (const t of [q, kv, indices, sink]) t.data.free();
    }

    // ---- paged FP8 attention on FlashMLA's sparse decode workload (flash_mla_with_kvcache, V4
    // cache, P = 64): N queries with their own random token ids of one v4 cache, main 128 + extra
    // 512 (hQ 64) or 128 + 1024 (hQ 128). (FlashMLA's own figures: bench/RESULTS.md.)
    for (const [hQ, extraTopk] of want('paged') ? ([[64, 512], [128, 1024]] as const) : []) {
      const cache = await deviceCache('v4', 1024);
      const tokens = 1024 * 64;
      const sink = await engine.upload(tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())));
      // 16 and 64: decode-sized batches, fewer tiles than SMs, which the kernel splits along the KV
      for (const N of [2048, 4096, 8192, 11264, 16384, 32768, 16, 64]) {
        const q = await randomDevice([N, hQ, 512]);
        const main = await engine.upload(tensor('int32', [N, 128], randomIds(rng, N * 128, tokens)));
        const extra = await engine.upload(tensor('int32', [N, extraTopk], randomIds(rng, N * extraTopk, tokens)));
        const runs = await time(async () => {
          const r = await engine.pagedSparseAttention({ q, kCache: cache, indices: main, extraKCache: cache, extraIndices: extra, attnSink: sink, smScale: 1 / Math.sqrt(512) }, { output: 'device' });
          for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
        });
        const ms = median(runs);
        say({ name: `pagedSparseAttention N ${N} hQ ${hQ}, main 128 + extra ${extraTopk} (P 64)`, median_ms: ms, runs_ms: runs, value: prefillFlops(N * (128 + extraTopk), hQ) / ms / 1e9, unit: 'TFLOPS' });
        for (const t of [q, main, extra]) t.data.free();
      }
      sink.data.free();
      cache.data.free();
    }

    // ---- the planner's per-layer c4 rows on the GPU (32K-query chunk, device top-k in and rows out)
    if (want('planner')) {
      const N = 32768, topk = 512, width = combinedWidth(4, topk, 0, 128, 128);
      const idx = await engine.upload(tensor('int32', [N, topk], randomC4Topk(rng, N, topk)));
      const runs = await time(async () => {
        const r = await be.planRows({ seqLens: Int32Array.of(N), extendLens: Int32Array.of(N), window: 128, ratio: 4, topkIndices: idx.data, topk, width }, 'device');
        for (const b of [r.rows, r.lens, r.dropped]) (b as DeviceBuffer).free();
      });
      const ms = median(runs);
      say({ name: 'planner c4 rows on the GPU, 32K queries, topk 512, width 640', median_ms: ms, runs_ms: runs, value: (N * topk * 4 + N * width * 4 + N * 8) / ms / 1e6, unit: 'GB/s', note: 'index bytes read + rows written' });
      idx.data.free();
    }

    // ---- workspace path vs paged path on V4 c4 prefill chunks
    for (const N of want('chunks') ? [4096, 16384, 32768] : []) {
      const hQ = 64, W = 128, TOPK = 512, nComp = N / 4;
      // one v4 cache holding the compressed entries (ids [0, nComp), page table 0, 1, …) then the
      // SWA tokens (ids nComp + pos): workspace row = cache id; rows and paged form from the planner
      const cache = await deviceCache('v4', (nComp + N) / 64);
      const q = await randomDevice([N, hQ, 512]);
      const sink = await engine.upload(tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())));
      const plan = createPlan({
        requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => nComp + i), c4PageTable: Int32Array.from({ length: nComp / 64 }, (_, i) => i) }],
        c4PageSize: 64,
      }, { window: W });
      const rows = plan.combineC4(tensor('int32', [N, TOPK], randomC4Topk(rng, N, TOPK)));
      const paged = plan.pagedForm(rows);
      const width = rows.width;
      // the gather ids on the device, as a plan keeps them, dequantized as prefillLayer does (below)
      const gather = await be.upload(BigInt64Array.from([...plan.compressedTokenIds(4).data, ...plan.swaTokenIds.data]));
      const [mainD, extraD, combD] = await Promise.all([engine.upload(paged.main), engine.upload(paged.extra!), engine.upload(rows.indices)]);
      const pagedRuns = await time(async () => {
        const r = await engine.pagedSparseAttention({ q, kCache: cache, indices: mainD, extraKCache: cache, extraIndices: extraD, attnSink: sink, smScale: 1 / Math.sqrt(512) }, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      });
      const rowsTotal = nComp + N;
      const ws = v4Workspace(be, rowsTotal);
      const dequantRuns = await time(() => be.dequantizeKCacheIdsInto(cache, gather, rowsTotal, ws.data, 0));
      const prefillRuns = await time(async () => {
        const r = await engine.sparsePrefill({ q, kv: ws, indices: combD, attnSink: sink, smScale: 1 / Math.sqrt(512) }, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      });
      // the same layer end to end (wall clock, JS included: dequant then prefill, device in/out)
      const wall = await wallClock(async () => {
        await be.dequantizeKCacheIdsInto(cache, gather, rowsTotal, ws.data, 0);
        const r = await engine.sparsePrefill({ q, kv: ws, indices: combD, attnSink: sink, smScale: 1 / Math.sqrt(512) }, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      });
      const entries = N * (paged.main.shape[1]! + paged.extra!.shape[1]!); // index slots; attended: Σ the rows' lengths
      const flops = prefillFlops(rows.lengths.data.reduce((a, b) => a + b, 0), hQ);
      const pagedMs = median(pagedRuns), dqMs = median(dequantRuns), pfMs = median(prefillRuns);
      say({ name: `V4 chunk ${N / 1024}K: paged path (pagedSparseAttention)`, median_ms: pagedMs, runs_ms: pagedRuns, value: flops / pagedMs / 1e9, unit: 'TFLOPS' });
      say({ name: `V4 chunk ${N / 1024}K: workspace dequant (${rowsTotal} rows)`, median_ms: dqMs, runs_ms: dequantRuns, value: dequantBytes('v4', rowsTotal) / dqMs / 1e6, unit: 'GB/s' });
      say({ name: `V4 chunk ${N / 1024}K: workspace sparsePrefill (width ${width})`, median_ms: pfMs, runs_ms: prefillRuns, value: flops / pfMs / 1e9, unit: 'TFLOPS' });
      say({ name: `V4 chunk ${N / 1024}K: workspace path total (dequant + prefill)`, median_ms: dqMs + pfMs, runs_ms: [], value: pagedMs / (dqMs + pfMs), unit: 'x', note: `workspace ${(pagedMs / (dqMs + pfMs)).toFixed(2)}x the paged path's speed` });
      say({ name: `V4 chunk ${N / 1024}K: whole layer wall clock (JS → dequant → prefill)`, median_ms: median(wall), runs_ms: wall, value: median(wall), unit: 'ms', note: `${entries} index slots` });
      for (const t of [q, sink, mainD, extraD, combD, ws]) t.data.free();
      gather.free();
      cache.data.free();
    }

    // ---- a whole c4 layer through prefillLayer, device-resident: GPU planner rows from a device
    // top-k → dequant into the plan's device workspace → sparsePrefill, device q / caches / out
    for (const N of want('layer') ? [4096, 16384, 32768] : []) {
      const hQ = 64, TOPK = 512, c4PageSize = 64, nComp = N / 4;
      const plan = createPlan({
        requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: Int32Array.from({ length: nComp / c4PageSize }, (_, i) => i) }],
        c4PageSize,
      });
      const swa = await deviceCache('v4', N / 64);
      const c4 = await deviceCache('v4', nComp / 64);
      const q = await randomDevice([N, hQ, 512]);
      // the sink on the device like a weight: a host one would make the prefill wait for its own work
      const sink = await engine.upload(tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())));
      const topkIdx = randomC4Topk(rng, N, TOPK);
      const topk = await engine.upload(tensor('int32', [N, TOPK], topkIdx));
      const layer = async (): Promise<void> => {
        const r = await prefillLayer(engine, { plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, attnSink: sink, smScale: 1 / Math.sqrt(512), path: 'sparse' }, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      };
      const t0 = performance.now();
      await layer(); // first layer of the chunk: allocates the plan's device workspace, builds its ids
      await engine.synchronize();
      const firstMs = performance.now() - t0;
      // device time of the layer's launches (c4 combine, the two dequants, prefill) and its wall
      // clock with no events, from the call until the device is done, in alternate runs (layers
      // 2-27 of the process, as in every earlier run); then again after LAYER_JIT_WARMUP more
      // layers
      const cold = await kernelsAndWall(layer);
      const coldSpans = await untimedSpans(layer);
      const coldWait = await firstLaunchWait(layer);
      await wallClock(layer, LAYER_JIT_WARMUP, 0); // untimed, no events
      const warm = await kernelsAndWall(layer);
      // where the device waits between the layer's launches (dequants, combine, prefill): each gap's
      // median over repeat runs, from the launches' event spans
      const gapRuns: number[][] = [];
      for (let i = 0; i < o.repeat; i++) {
        await be.copyDevice(flushA, flushB);
        await layer();
        await engine.synchronize();
        const [, ...spans] = be.takeKernelSpans();
        gapRuns.push(spans.slice(1).map(([start], j) => (start - spans[j]![1]) * 1000));
      }
      const gapsUs = gapRuns[0]!.map((_, j) => median(gapRuns.map((g) => g[j]!)).toFixed(1));
      // attended entries: the planner's rows of the same top-k (a host combine, after the timing)
      const realEntries = plan.combineC4(tensor('int32', [N, TOPK], topkIdx)).lengths.data.reduce((a, b) => a + b, 0);
      const ms = median(cold.wallRuns), kernelMs = median(cold.kernelRuns);
      const kernelNote = (r: { kernelRuns: number[]; wallRuns: number[] }): string =>
        `kernel runs ${r.kernelRuns.map((k) => k.toFixed(3)).join(' ')} ms; ratio of the medians ${(median(r.wallRuns) / median(r.kernelRuns)).toFixed(3)}`;
      say({
        name: `prefillLayer c4 ${N / 1024}K queries, hQ 64, topk 512 (planner → dequant → prefill, device)`,
        median_ms: ms,
        runs_ms: cold.wallRuns,
        value: cold.ratio,
        unit: 'x',
        note: `median of each run's wall clock (JS included) over its kernels' device time in the run before; kernels' median ${kernelMs.toFixed(3)} ms (${(prefillFlops(realEntries, hQ) / ms / 1e9).toFixed(1)} TFLOPS by wall clock); ${kernelNote(cold)}; gaps between its launches on the device ${gapsUs.join(' / ')} µs; its device span without per-launch events ${median(coldSpans).toFixed(3)} ms (runs ${coldSpans.map((x) => x.toFixed(3)).join(' ')}); the device's wait for the first launch from an idle device (the layers after the cold runs, pairs of runs) ${median(coldWait.waitUs).toFixed(1)} µs (${coldWait.waitUs.map((x) => x.toFixed(1)).join(' ')}), the wall clock past the device's span ${median(coldWait.pastSpanUs).toFixed(1)} µs; first layer ${firstMs.toFixed(2)} ms; deviceStats ${JSON.stringify(plan.deviceStats)}`,
      });
      say({
        name: `prefillLayer c4 ${N / 1024}K queries, after ${LAYER_JIT_WARMUP} more layers`,
        median_ms: median(warm.wallRuns),
        runs_ms: warm.wallRuns,
        value: warm.ratio,
        unit: 'x',
        note: `the same layer further on in the process (V8 has not yet optimized all of the layer's JS: that takes thousands of calls), the same ratio; kernels' median ${median(warm.kernelRuns).toFixed(3)} ms (the kernels may run slower after the sustained load); ${kernelNote(warm)}`,
      });
      for (const t of [q, topk, sink]) t.data.free();
      swa.data.free();
      c4.data.free();
    }

    // ---- router threshold (SPEC §7): workspace path vs paged path over query counts
    if (want('router')) sweep = await routerSweep(engine, be, rng, time, say, deviceCache, randomDevice);
    if (want('multi')) multi = await multiDevice(engine, rng, o, say);
  } finally {
    flushA.free();
    markA.free();
    markB.free();
    flushB.free();
    await engine.dispose();
  }
  const report = { device: o.device, host: o.host, date: new Date().toISOString(), commit: o.commit ?? null, command: o.command, method: 'CUDA events around each launch, median of repeat runs after warmup, L2 flushed before each run', repeat: o.repeat, warmup: o.warmup, results: rows, routerSweep: sweep, multiDevice: multi };
  if (o.out) await writeFileNoFollow(o.out, `${JSON.stringify(report, null, 2)}\n`, '--out');
  return 0;
}

/** One chunk shape of the router sweep: a layer kind at one context length. */
interface SweepCase {
  ratio: 0 | 4 | 128;
  hQ: number;
  topk: number;
  /** tokens of the request before the chunk */
  prefix: number;
}
interface SweepPoint {
  queries: number;
  paged_ms: number;
  dequant_ms: number;
  prefill_ms: number;
  workspace_ms: number;
  /** paged / workspace: > 1 means the workspace path is faster */
  speedup: number;
  workspace_rows: number;
  width: number;
}
interface RouterSweep {
  queryCounts: number[];
  cases: Array<SweepCase & { name: string; points: SweepPoint[]; crossover: number | null; lastPagedWin: number | null }>;
  method: string;
}

const SWEEP_QUERIES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
const SWEEP_CASES: SweepCase[] = [];
for (const prefix of [0, 32768]) {
  SWEEP_CASES.push(
    { ratio: 4, hQ: 64, topk: 512, prefix },
    { ratio: 4, hQ: 128, topk: 1024, prefix },
    { ratio: 128, hQ: 64, topk: 0, prefix },
    { ratio: 128, hQ: 128, topk: 0, prefix },
    { ratio: 0, hQ: 64, topk: 0, prefix },
    { ratio: 0, hQ: 128, topk: 0, prefix },
  );
}

/**
 * One request whose chunk holds the last `queries` tokens of seqLen = prefix + queries (the shape of
 * SPEC §6 with W = 128): the paged path attends main = the window's SWA ids and extra = the
 * compressed ids (c4: min(topk, visible) random visible entries; c128: every visible entry); the
 * workspace path dequantizes the request's floor(seqLen / r) compressed rows and its SWA gather
 * g = min(seqLen, queries + 127) into one workspace (one dequant launch) and runs sparsePrefill over
 * the combined rows (compressed then window, −1 padded to a multiple of 128). One v4 cache (P 64)
 * holds the compressed entries then the gathered SWA tokens, so workspace row = cache id.
 */
async function routerSweep(
  engine: Engine,
  be: CudaBackend,
  rng: Rng,
  time: (fn: () => Promise<void>) => Promise<number[]>,
  say: (r: Row) => void,
  deviceCache: (format: 'v4' | 'v32', pages: number) => Promise<DeviceKvCache>,
  randomDevice: (shape: number[]) => Promise<DeviceTensor<'bf16'>>,
): Promise<RouterSweep> {
  const W = 128;
  const result: RouterSweep = { queryCounts: SWEEP_QUERIES, cases: [], method: 'device ms (CUDA events) per launch, median of repeat after warmup, L2 flushed before each; workspace = dequant + sparsePrefill' };
  const envList = (name: string): number[] | null => (process.env[name] ? process.env[name]!.split(',').map(Number) : null);
  const prefixes = envList('SPARSE_MLA_SWEEP_PREFIXES'), ratios = envList('SPARSE_MLA_SWEEP_RATIOS');
  for (const c of SWEEP_CASES.filter((k) => (!prefixes || prefixes.includes(k.prefix)) && (!ratios || ratios.includes(k.ratio)))) {
    const t0 = performance.now();
    const name = `c${c.ratio} hQ${c.hQ}${c.ratio === 4 ? ` topk${c.topk}` : ''} prefix ${c.prefix / 1024}K`;
    const points: SweepPoint[] = [];
    const sink = await engine.upload(tensor('float32', [c.hQ], Float32Array.from({ length: c.hQ }, () => rng.normal())));
    try {
      for (const nq of SWEEP_QUERIES) {
        const seqLen = c.prefix + nq;
        const g = swaGatherLength(seqLen, nq, W);
        const swaStart = seqLen - g;
        const nComp = requestVisible(seqLen, nq, c.ratio);
        // the paged path's extra set: topk (c4) or every visible entry (c128, at least one column)
        const compWidth = c.ratio === 4 ? c.topk : c.ratio === 128 ? Math.max(1, nComp) : 0;
        const width = combinedWidth(c.ratio, c.topk, compWidth, W, 128);
        const mainIds = new Int32Array(nq * W).fill(-1);
        const extraIds = compWidth > 0 ? new Int32Array(nq * compWidth).fill(-1) : null;
        const combined = new Int32Array(nq * width).fill(-1);
        for (let i = 0; i < nq; i++) {
          const pos = c.prefix + i;
          const visible = c.ratio > 0 ? Math.floor((pos + 1) / c.ratio) : 0;
          const k = c.ratio === 4 ? Math.min(c.topk, visible) : visible;
          for (let e = 0; e < k; e++) {
            const j = c.ratio === 4 ? rng.int(0, visible) : e;
            extraIds![i * compWidth + e] = j;
            combined[i * width + e] = j;
          }
          const swa = Math.min(pos + 1, W);
          for (let w = 0; w < swa; w++) {
            const id = nComp + (pos - swa + 1 + w - swaStart);
            mainIds[i * W + w] = id;
            combined[i * width + k + w] = id;
          }
        }
        const rowsTotal = nComp + g;
        const cache = await deviceCache('v4', Math.ceil(rowsTotal / 64));
        const q = await randomDevice([nq, c.hQ, 512]);
        // the workspace dequant as prefillLayer runs it: device int64 ids into a reused device buffer
        const gather = await be.upload(BigInt64Array.from({ length: rowsTotal }, (_, t) => BigInt(t)));
        const mainD = await engine.upload(tensor('int32', [nq, W], mainIds));
        const extraD = extraIds ? await engine.upload(tensor('int32', [nq, compWidth], extraIds)) : null;
        const combD = await engine.upload(tensor('int32', [nq, width], combined));
        const smScale = 1 / Math.sqrt(512);
        const ws = v4Workspace(be, rowsTotal);
        try {
          const pagedRuns = await time(async () => {
            const r = await engine.pagedSparseAttention({ q, kCache: cache, indices: mainD, ...(extraD ? { extraKCache: cache, extraIndices: extraD } : {}), attnSink: sink, smScale }, { output: 'device' });
            for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
          });
          const dequantRuns = await time(() => be.dequantizeKCacheIdsInto(cache, gather, rowsTotal, ws.data, 0));
          const prefillRuns = await time(async () => {
            const r = await engine.sparsePrefill({ q, kv: ws, indices: combD, attnSink: sink, smScale }, { output: 'device' });
            for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
          });
          const paged_ms = median(pagedRuns), dequant_ms = median(dequantRuns), prefill_ms = median(prefillRuns);
          const workspace_ms = dequant_ms + prefill_ms;
          points.push({ queries: nq, paged_ms, dequant_ms, prefill_ms, workspace_ms, speedup: paged_ms / workspace_ms, workspace_rows: rowsTotal, width });
          say({ name: `router ${name}: ${nq} queries, paged / workspace (${rowsTotal} rows, width ${width})`, median_ms: workspace_ms, runs_ms: [paged_ms, dequant_ms, prefill_ms], value: paged_ms / workspace_ms, unit: 'x', note: `paged ${paged_ms.toFixed(4)} ms, dequant ${dequant_ms.toFixed(4)} + prefill ${prefill_ms.toFixed(4)} ms` });
        } finally {
          for (const t of [q, mainD, extraD, combD, ws]) t?.data.free();
          gather.free();
          cache.data.free();
        }
      }
    } finally {
      sink.data.free();
    }
    // crossover: the smallest query count from which the workspace path wins at every larger count
    let crossover: number | null = null;
    for (let k = points.length - 1; k >= 0 && points[k]!.speedup > 1; k--) crossover = points[k]!.queries;
    const losing = points.filter((p) => p.speedup <= 1);
    const lastPagedWin = losing.length > 0 ? losing[losing.length - 1]!.queries : null;
    result.cases.push({ ...c, name, points, crossover, lastPagedWin });
    console.log(`  (${name}: ${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  }
  console.log('\nrouter sweep: paged / workspace device time (> 1: workspace faster)');
  console.log(`${'case'.padEnd(34)}${SWEEP_QUERIES.map((n) => String(n).padStart(7)).join('')}   workspace wins from`);
  for (const c of result.cases) {
    console.log(`${c.name.padEnd(34)}${c.points.map((p) => p.speedup.toFixed(2).padStart(7)).join('')}   ${c.crossover ?? 'never'}`);
  }
  return result;
}

/** Several GPUs (SPEC §10): concurrent engines and a sharded 32K c4 layer, against one device. */
interface MultiDevice {
  devices: number;
  concurrency: Array<{ hQ: number; aloneMs: number[]; togetherMs: number[]; keep: number[] }>;
  sharded: Array<{ hQ: number; split: ShardSplit; singleMs: number; shardedMs: number; speedup: number; shardKernelMs: number[]; singleKernelMs: number }>;
  correctness: Array<{ hQ: number; split: ShardSplit; queries: number; identical: boolean; maxAbsDiff: number }>;
}

async function multiDevice(first: Engine, rng: Rng, o: GpuBenchOptions, say: (r: Row) => void): Promise<MultiDevice | null> {
  const engines: Engine[] = [first];
  for (let d = 1; ; d++) {
    try {
      engines.push(await createEngine({ backend: 'cuda', device: d }));
    } catch {
      break;
    }
  }
  if (engines.length < 2) {
    console.log('multi: one CUDA device here; skipped');
    return null;
  }
  const n = engines.length;
  const bes = engines.map(cudaBackendOf);
  const result: MultiDevice = { devices: n, concurrency: [], sharded: [], correctness: [] };
  const TOPK = 512, P = 64;
  /** A c4 chunk of one request: its plan input, host caches (one quantized random page tiled) and the indexer's top-k. */
  const chunkOf = async (N: number) => {
    const nComp = N / 4;
    const chunk = { requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: Int32Array.from({ length: nComp / P }, (_, i) => i) }], c4PageSize: P };
    const unit = createKvCache('v4', { pageSize: P, numPages: 1 });
    await first.quantizeKCache({ cache: unit, tokenIds: tensor('int32', [P], Int32Array.from({ length: P }, (_, i) => i)), rows: randomBf16(rng, [P, 512]) });
    const tiled = (pages: number) => {
      const c = createKvCache('v4', { pageSize: P, numPages: pages });
      for (let p = 0; p < pages; p++) c.data.set(unit.data, p * unit.data.length);
      return c;
    };
    const swa = tiled(N / P), c4 = tiled(nComp / P);
    return { chunk, swa, c4, topk: tensor('int32', [N, TOPK], randomC4Topk(rng, N, TOPK)) };
  };
  const sinkOf = (hQ: number) => tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
  const smScale = 1 / Math.sqrt(512);
  const wall = async (fn: () => Promise<void>): Promise<number[]> => {
    for (const b of bes) b.setTiming(false);
    const runs: number[] = [];
    for (let i = 0; i < o.warmup + o.repeat; i++) {
      await Promise.all(engines.map((e) => e.synchronize()));
      const t0 = performance.now();
      await fn();
      await Promise.all(engines.map((e) => e.synchronize()));
      if (i >= o.warmup) runs.push(performance.now() - t0);
    }
    for (const b of bes) b.setTiming(true);
    return runs;
  };
  try {
    // ---- correctness: a 2K chunk on one device against the same chunk sharded over all (host in/out)
    {
      const N = 2048;
      const c = await chunkOf(N);
      for (const hQ of [64, 128]) {
        const q = randomBf16(rng, [N, hQ, 512]);
        const sink = sinkOf(hQ);
        const args = { compressRatio: 4 as const, q, caches: { swa: c.swa, c4: c.c4 }, topkIndices: c.topk, attnSink: sink, smScale, path: 'sparse' as const };
        const one = await prefillLayer(first, { ...args, plan: createPlan(c.chunk) });
        for (const split of ['heads', 'queries'] as const) {
          const sh = await prefillLayerSharded(engines, { ...args, plan: createShardedPlan(c.chunk, { shards: n, split }) });
          let maxAbsDiff = 0, identical = true;
          for (const [a, b] of [[sh.out!.data, one.out.data], [sh.lse!.data, one.lse.data], [sh.maxLogits!.data, one.maxLogits.data]] as const) {
            for (let i = 0; i < a.length; i++) {
              if (a[i] !== b[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) identical = false;
            }
          }
          const ao = sh.out!.data, bo = one.out.data, f = new Float32Array(1), u = new Uint32Array(f.buffer);
          const val = (x: number): number => ((u[0] = x << 16), f[0]!);
          for (let i = 0; i < ao.length; i++) maxAbsDiff = Math.max(maxAbsDiff, Math.abs(val(ao[i]!) - val(bo[i]!)));
          result.correctness.push({ hQ, split, queries: N, identical, maxAbsDiff });
          say({ name: `multi: 2K c4 layer hQ ${hQ} split by ${split} over ${n} devices vs one device`, median_ms: 0, runs_ms: [], value: identical ? 1 : 0, unit: 'x', note: identical ? 'bit-identical' : `max |out diff| ${maxAbsDiff}` });
        }
      }
    }
    // ---- timing: the 32K c4 layer, device-resident inputs and outputs on every device
    const N = 32768;
    const c = await chunkOf(N);
    for (const hQ of [64, 128]) {
      const sink = sinkOf(hQ);
      const caches = await Promise.all(engines.map(async (e) => ({ swa: await e.uploadKvCache(c.swa), c4: await e.uploadKvCache(c.c4) })));
      const topks = await Promise.all(engines.map((e) => e.upload(c.topk)));
      const randomOn = (e: Engine, shape: number[]) => randomDeviceBf16(e, rng, shape);
      const qs = await Promise.all(engines.map((e) => randomOn(e, [N, hQ, 512])));
      const plan = createPlan(c.chunk);
      const layerOn = (d: number) => async () => {
        const r = await prefillLayer(engines[d]!, { plan, compressRatio: 4, q: qs[d]!, caches: caches[d]!, topkIndices: topks[d]!, attnSink: sink, smScale, path: 'sparse' }, { output: 'device' });
        for (const t of [r.out, r.lse, r.maxLogits]) t.data.free();
      };
      // both GPUs busy at once: each engine's layer loop alone, then all together
      const LOOP = 8;
      const loop = (d: number) => async () => {
        for (let l = 0; l < LOOP; l++) await layerOn(d)();
      };
      const alone: number[] = [];
      for (let d = 0; d < n; d++) alone.push(median(await wall(loop(d))) / LOOP);
      const together = await wall(() => Promise.all(engines.map((_, d) => loop(d)())).then(() => undefined));
      const togetherMs = median(together) / LOOP;
      const keep = alone.map((a) => a / togetherMs);
      result.concurrency.push({ hQ, aloneMs: alone, togetherMs: engines.map(() => togetherMs), keep });
      say({ name: `multi: 32K c4 layer hQ ${hQ}, ${n} engines on ${n} devices at once`, median_ms: togetherMs, runs_ms: together, value: Math.min(...keep), unit: 'x', note: `each keeps ${keep.map((k) => (k * 100).toFixed(1)).join(' / ')}% of its alone throughput (alone ${alone.map((a) => a.toFixed(3)).join(' / ')} ms per layer)` });
      // one device, the whole layer
      for (const b of bes) b.takeKernelMs();
      const singleRuns = await wall(layerOn(0));
      await layerOn(0)();
      await engines[0]!.synchronize();
      const singleKernelMs = bes[0]!.takeKernelMs().reduce((x, y) => x + y, 0);
      // sharded: each device its heads or queries, inputs split ahead of time on each device
      for (const split of ['heads', 'queries'] as const) {
        const sp = createShardedPlan(c.chunk, { shards: n, split });
        const ranges = split === 'heads' ? evenRanges(hQ, n) : sp.shards.map((x): [number, number] => [x.queryOffset, x.queryOffset + x.numQueries]);
        const shardQ = await Promise.all(engines.map((e, d) => randomOn(e, split === 'heads' ? [N, ranges[d]![1] - ranges[d]![0], 512] : [sp.shards[d]!.numQueries, hQ, 512])));
        const shardTopk = await Promise.all(
          engines.map((e, d) => (split === 'heads' ? Promise.resolve(topks[d]!) : e.upload(tensor('int32', [sp.shards[d]!.numQueries, TOPK], c.topk.data.subarray(ranges[d]![0] * TOPK, ranges[d]![1] * TOPK))))),
        );
        const sharded = async () => {
          const r = await prefillLayerSharded(engines, { plan: sp, compressRatio: 4, q: shardQ, caches, topkIndices: shardTopk, attnSink: sink, smScale, path: 'sparse' }, { output: 'device' });
          for (const x of r.shards) for (const t of [x.out, x.lse, x.maxLogits]) t.data.free();
        };
        const runs = await wall(sharded);
        await sharded();
        await Promise.all(engines.map((e) => e.synchronize()));
        const shardKernelMs = bes.map((b) => b.takeKernelMs().reduce((x, y) => x + y, 0));
        const singleMs = median(singleRuns), shardedMs = median(runs);
        result.sharded.push({ hQ, split, singleMs, shardedMs, speedup: singleMs / shardedMs, shardKernelMs, singleKernelMs });
        say({ name: `multi: 32K c4 layer hQ ${hQ} split by ${split} over ${n} devices`, median_ms: shardedMs, runs_ms: runs, value: singleMs / shardedMs, unit: 'x', note: `one device ${singleMs.toFixed(3)} ms (kernels ${singleKernelMs.toFixed(3)}); shards' kernels ${shardKernelMs.map((k) => k.toFixed(3)).join(' / ')} ms` });
        for (const t of shardQ) t.data.free();
        if (split === 'queries') for (const t of shardTopk) t.data.free();
      }
      for (const t of [...qs, ...topks]) t.data.free();
      for (const cs of caches) (cs.swa.data.free(), cs.c4.data.free());
    }
  } finally {
    await Promise.all(engines.slice(1).map((e) => e.dispose()));
  }
  return result;
}

export type { Engine };
