/**
 * `sparse-mla bench` (what `npm run bench` runs): throughput of sparsePrefill (GFLOP/s) and of the
 * KV-cache ops (GB/s, bytes read + written) on one backend, with a 1-worker and an N-worker engine
 * (N = the cores by default), median of several timed runs after warm-up. Each sparsePrefill is
 * one call over the whole chunk, so the N-worker figure is the pool splitting by query rows.
 * CPU figures are noisy: read the 1 → N ratio, not the absolute numbers alone.
 */
import { execFileSync } from 'node:child_process';
import { realpathSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { SparseMlaError } from '../../errors.js';
import { prepareOutputFile, writeFileNoFollow } from '../../io/files.js';
import { createEngine, createKvCache } from '../../index.js';
import { tensor } from '../../tensor.js';
import type { Engine, Tensor } from '../../types.js';
import { expectNoPositionals, formatOptions, parseArgs, type OptionTable } from '../args.js';
import { engineOptions, machineFacts, type CliCommand, type MachineFacts } from '../command.js';
import { Progress } from '../progress.js';
import { formatRate, formatSeconds, formatTable, median, setReportWidth, writeFittedLines } from '../table.js';
import { c4ChunkInputs, placeC4Chunk, shuffled, type C4ChunkInputs, type C4ChunkPlacement } from '../../check/chunks.js';
import { prefillFlops } from '../../ops/sparse_prefill.js';
import { makeRng, uniformBf16Bits } from '../../check/grid.js';
import { cacheOpBytes, rowDimOf } from '../../kv_cache_layout.js';
import { checkChunkShape, chunkShapeFromOptions, RUN_OPTIONS } from './run.js';

/** Head dims of the chunk (dQK = dV = 512, the v4 row). */
const D = rowDimOf('v4');

const OPTIONS = {
  ...RUN_OPTIONS,
  queries: { ...RUN_OPTIONS.queries, default: 512, help: 'query tokens per sparsePrefill call (the run shape, fewer queries)' },
  workers: { type: 'int', min: 1, max: 256, help: 'N, the larger pool (default: the cores); 1 worker is always measured too' },
  'dequant-tokens': { type: 'int', default: 32768, min: 1, help: 'tokens per quantize / dequantize call (a 32K-token chunk)' },
  repeat: { type: 'int', default: 5, min: 1, max: 1000, help: 'timed runs per measurement (the median is reported)' },
  warmup: { type: 'int', default: 1, min: 0, max: 100, help: 'untimed runs before the timed ones' },
  json: { type: 'boolean', help: 'print the results as JSON on stdout (instead of the table)' },
  wide: { type: 'boolean', help: 'do not fit the report to 100 columns' },
  out: { type: 'string', metavar: 'FILE', help: 'also write the JSON results to FILE' },
  quiet: { type: 'boolean', short: 'q', help: 'no progress output on stderr' },
} as const satisfies OptionTable;

const USAGE = `Usage: sparse-mla bench [options]

Measure sparsePrefill (GFLOP/s, FLOPs = 2·Σ topkLength·hQ·(dQK+dV)) and quantizeKCache /
dequantizeKCachePaged (GB/s, bytes read + written) on one backend with a 1-worker and an N-worker
engine (WASM workers or native CPU threads); each figure is the median of --repeat timed runs
after --warmup untimed ones. The prefill shape is the one of \`sparse-mla run\` (fewer queries by
default).

Options:
${formatOptions(OPTIONS)}
`;

interface Measurement {
  op: 'sparsePrefill' | 'dequantizeKCachePaged' | 'quantizeKCache';
  workers: number;
  runs_s: number[];
  median_s: number;
  min_s: number;
  max_s: number;
  /** work per call: FLOPs (prefill) or bytes (cache ops) */
  work: number;
  unit: 'GFLOP/s' | 'GB/s';
  /** work / median time, in unit */
  rate: number;
}

/**
 * The commit of the checkout this package runs from, or null: an installed package is no checkout
 * of its own, and git would answer for the project that holds node_modules.
 */
function gitCommit(): string | null {
  try {
    const root = fileURLToPath(new URL('../../../', import.meta.url));
    const git = (args: string[]) => execFileSync('git', args, { cwd: root, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
    if (realpathSync(git(['rev-parse', '--show-toplevel'])) !== realpathSync(root)) return null;
    const head = git(['rev-parse', 'HEAD']);
    const dirty = git(['status', '--porcelain', '--untracked-files=no']);
    return dirty ? `${head}-dirty` : head;
  } catch {
    return null;
  }
}

export interface MachineInfo extends MachineFacts {
  date: string;
  commit: string | null;
  /** 1-minute load average when the bench started: other work on the machine skews 1 → N ratios */
  loadAverage1m: number;
}

export function machineInfo(): MachineInfo {
  return {
    ...machineFacts(),
    date: new Date().toISOString(),
    commit: gitCommit(),
    loadAverage1m: Math.round(loadavg()[0]! * 100) / 100,
  };
}

/** Random bf16 rows and a shuffled page table for the cache-op benchmark. */
function cacheInputs(tokens: number, pageSize: number, seed: number): { rows: Uint16Array; tokenIds: Int32Array; numPages: number } {
  const rng = makeRng(seed ^ 0x0badcafe);
  const numPages = Math.ceil(tokens / pageSize);
  const pages = shuffled(rng, numPages);
  const tokenIds = new Int32Array(tokens);
  for (let t = 0; t < tokens; t++) tokenIds[t] = pages[Math.floor(t / pageSize)]! * pageSize + (t % pageSize);
  return { rows: uniformBf16Bits(rng, tokens * D, 2), tokenIds, numPages };
}

async function measure(
  progress: Progress,
  label: string,
  warmup: number,
  repeat: number,
  fn: () => Promise<unknown>,
): Promise<number[]> {
  progress.start(label, warmup + repeat);
  const runs: number[] = [];
  for (let i = 0; i < warmup + repeat; i++) {
    const t0 = performance.now();
    await fn();
    const seconds = (performance.now() - t0) / 1000;
    if (i >= warmup) runs.push(seconds);
    progress.update(i + 1);
  }
  progress.finish(`median ${formatSeconds(median(runs))}`);
  return runs;
}

function summarize(op: Measurement['op'], workers: number, runs: number[], work: number, unit: Measurement['unit']): Measurement {
  const med = median(runs);
  return {
    op,
    workers,
    runs_s: runs,
    median_s: med,
    min_s: Math.min(...runs),
    max_s: Math.max(...runs),
    work,
    unit,
    rate: work / med / 1e9,
  };
}

async function benchEngine(
  engine: Engine,
  workers: number,
  w: C4ChunkInputs,
  kv: Tensor<'bf16'>,
  cacheIn: ReturnType<typeof cacheInputs>,
  o: { 'page-size': number; warmup: number; repeat: number },
  progress: Progress,
): Promise<Measurement[]> {
  const tag = `${engine.backend}${workers > 0 ? ` x${workers}` : ''}`;
  const tokens = cacheIn.tokenIds.length;
  const cache = createKvCache('v4', { pageSize: o['page-size'], numPages: cacheIn.numPages });
  const ids = tensor('int32', [tokens], cacheIn.tokenIds);
  const rows = tensor('bf16', [tokens, D], cacheIn.rows);
  const results: Measurement[] = [];

  const quantRuns = await measure(progress, `quantizeKCache (${tag})`, o.warmup, o.repeat, () => engine.quantizeKCache({ cache, tokenIds: ids, rows }));
  results.push(summarize('quantizeKCache', workers, quantRuns, cacheOpBytes('v4', tokens), 'GB/s'));

  const dequantRuns = await measure(progress, `dequantizeKCachePaged (${tag})`, o.warmup, o.repeat, () => engine.dequantizeKCachePaged({ cache, tokenIds: ids }));
  results.push(summarize('dequantizeKCachePaged', workers, dequantRuns, cacheOpBytes('v4', tokens), 'GB/s'));

  const args = { q: w.q, kv, indices: w.indices, topkLength: w.topkLength, attnSink: w.attnSink, smScale: w.smScale, dV: D };
  const prefillRuns = await measure(progress, `sparsePrefill (${tag})`, o.warmup, o.repeat, () => engine.sparsePrefill(args));
  results.push(summarize('sparsePrefill', workers, prefillRuns, prefillFlops(w.entries, w.q.shape[1]!), 'GFLOP/s'));
  return results;
}

export async function benchCommand(argv: string[]): Promise<number> {
  const { options: o, positionals } = parseArgs(argv, OPTIONS);
  expectNoPositionals('bench', positionals);
  // checked before the measurements, written after ('' too: an empty path is refused, not skipped)
  if (o.out !== undefined) await prepareOutputFile(o.out, '--out');
  if (o.backend === 'cuda') {
    // The GPU benchmark (src/cli/gpu_bench.ts): FlashMLA's configurations, dequant vs copy, paths.
    const { gpuBench } = await import('../gpu_bench.js');
    const { listBackends } = await import('../../index.js');
    const cuda = (await listBackends()).find((b) => b.name === 'cuda');
    return gpuBench({ repeat: o.repeat, warmup: Math.max(o.warmup, 2), ...(o.out !== undefined ? { out: o.out } : {}), commit: process.env.SPARSE_MLA_COMMIT ?? machineInfo().commit ?? undefined, command: `sparse-mla bench ${argv.join(' ')}`, device: cuda?.details ?? {}, host: machineInfo() });
  }
  if (o.wide) setReportWidth(Infinity);
  const progress = new Progress({ enabled: !o.quiet });
  const shape = chunkShapeFromOptions(o);
  // sizes before anything else (the machine's facts run git)
  checkChunkShape(shape);
  // the cache ops' rows [tokens, 512] bf16: one tensor (past it the generator's RangeError, or minutes of filling)
  if (o['dequant-tokens'] * D > 2 ** 31 - 1) {
    throw new SparseMlaError('TOO_LARGE', `--dequant-tokens: ${o['dequant-tokens']} tokens × ${D} = ${o['dequant-tokens'] * D} elements is more than one rows tensor can hold (2^31 − 1)`, 'dequant-tokens');
  }
  const n = o.workers ?? availableParallelism();
  const machine = machineInfo(); // before the bench loads the machine itself
  if (!o.json && machine.loadAverage1m > 0.5) {
    progress.log(`note: load average ${machine.loadAverage1m} before starting; other work on the machine skews the figures`);
  }
  const poolSizes = [...new Set([1, n])];

  // Refuse a missing backend before generating anything.
  let engine: Engine | undefined = await createEngine(engineOptions({ backend: o.backend, workers: poolSizes[0]! }));

  progress.start('generating inputs', 0);
  let placement: C4ChunkPlacement;
  let w: C4ChunkInputs;
  let cacheIn: ReturnType<typeof cacheInputs>;
  try {
    placement = placeC4Chunk(shape, makeRng(shape.seed));
    w = c4ChunkInputs(placement, makeRng(shape.seed ^ 0x1b873593));
    cacheIn = cacheInputs(o['dequant-tokens'], o['page-size'], o.seed);
  } catch (err) {
    await engine.dispose();
    throw err;
  }
  progress.finish();

  const measurements: Measurement[] = [];
  let backend: string | undefined;
  let kv: Tensor<'bf16'> | undefined;
  for (const workers of poolSizes) {
    engine ??= await createEngine(engineOptions({ backend: o.backend, workers }));
    try {
      backend = engine.backend;
      if (!kv) {
        // the prefill's workspace: the run shape's gather, quantized and dequantized once
        const cache = createKvCache('v4', { pageSize: shape.pageSize, numPages: placement.numPages });
        const ids = tensor('int32', [placement.gatherIds.length], placement.gatherIds);
        await engine.quantizeKCache({ cache, tokenIds: ids, rows: w.rows });
        kv = await engine.dequantizeKCachePaged({ cache, tokenIds: ids });
      }
      const label = engine.workers ?? 0; // 0: a backend without host threads (cuda)
      const workspace: Tensor<'bf16'> = kv;
      measurements.push(...(await benchEngine(engine, label, w, workspace, cacheIn, o, progress)));
      if (!engine.workers) break; // worker counts mean nothing to a device backend
    } finally {
      await engine.dispose();
      engine = undefined;
    }
  }

  const speedup: Record<string, number> = {};
  if (poolSizes.length > 1) {
    for (const op of ['sparsePrefill', 'dequantizeKCachePaged', 'quantizeKCache'] as const) {
      const one = measurements.find((m) => m.op === op && m.workers === 1);
      const many = measurements.find((m) => m.op === op && m.workers === n);
      if (one && many) speedup[op] = one.median_s / many.median_s;
    }
  }

  const report = {
    command: ['sparse-mla', 'bench', ...argv].join(' '),
    machine,
    backend,
    workers: poolSizes,
    repeat: o.repeat,
    warmup: o.warmup,
    shape: {
      ...shape,
      dQK: D,
      dV: D,
      indexWidth: w.indices.shape[1]!,
      workspaceRows: placement.gatherIds.length,
      entries: w.entries,
      gflopPerCall: prefillFlops(w.entries, shape.heads) / 1e9,
      cacheOpTokens: o['dequant-tokens'],
    },
    results: measurements,
    speedup,
  };
  const json = `${JSON.stringify(report, null, 2)}\n`;
  if (o.out !== undefined) await writeFileNoFollow(o.out, json, '--out');
  if (o.json) {
    process.stdout.write(json);
    return 0;
  }

  const m = report.machine;
  const lines = [
    `sparse-mla bench: ${backend} backend on ${m.cpu} (${m.cores} cores), Node ${m.node}, ${m.date}`,
    `sparsePrefill: ${shape.queries} queries x ${shape.heads} heads, dQK ${D}, dV ${D}, topk ${shape.topk} + window ${shape.window}, ` +
      `${report.shape.gflopPerCall.toFixed(1)} GFLOP per call; cache ops: ${o['dequant-tokens']} tokens, page size ${shape.pageSize}`,
    `median of ${o.repeat} runs after ${o.warmup} warm-up; 1-min load average ${m.loadAverage1m} at start`,
    '',
    formatTable(
      [
        ['op', 'workers', 'median', 'min', 'max', 'throughput'],
        ...measurements.map((r) => [
          r.op,
          r.workers ? String(r.workers) : '-',
          formatSeconds(r.median_s),
          formatSeconds(r.min_s),
          formatSeconds(r.max_s),
          formatRate(r.rate, r.unit),
        ]),
      ],
      ['left', 'right', 'right', 'right', 'right', 'right'],
    ),
  ];
  if (Object.keys(speedup).length > 0) {
    lines.push('', `speedup 1 -> ${n} workers (median time ratio):`);
    for (const [op, ratio] of Object.entries(speedup)) lines.push(`  ${op.padEnd(22)} ${ratio.toFixed(2)}x`);
  }
  if (o.out !== undefined) lines.push('', `JSON written to ${o.out}`);
  writeFittedLines(lines);
  return 0;
}

export const command: CliCommand = {
  name: 'bench',
  summary: 'measure sparsePrefill GFLOP/s and dequant GB/s with 1 and N workers (npm run bench)',
  usage: USAGE,
  options: OPTIONS,
  run: benchCommand,
};
