/**
 * `sparse-mla run` (what `npm start` runs): one DeepSeek-V4-shaped prefill chunk end to end on the
 * best backend — quantize random rows into a v4 paged cache, dequantize the chunk's gather into a
 * bf16 workspace, run the sparse prefill with a sink — then check the results against the float64
 * reference and print a table. Exit 0 when every check passes, 1 when one fails.
 *
 * The prefill runs as several calls of `--block` queries each, so the progress bar moves; the
 * times reported are sums of the engine calls alone (input generation and checks are separate).
 */
import { availableParallelism } from 'node:os';
import { SparseMlaError } from '../../errors.js';
import { createEngine, createKvCache } from '../../index.js';
import {
  compareToReference,
  dequantizeKCacheReference,
  quantizeKCacheReference,
  prepareSparsePrefillReference,
  TOLERANCES,
} from '../../reference/index.js';
import { bf16BitsToFloat32, tensor } from '../../tensor.js';
import type { BackendChoice, Engine, KvCache, Tensor } from '../../types.js';
import { formatOptions, parseArgs, type OptionTable } from '../args.js';
import type { CliCommand } from '../command.js';
import { Progress } from '../progress.js';
import { formatError, formatRate, formatSeconds, formatTable } from '../table.js';
import {
  buildWorkload,
  checkShape,
  DQK,
  DV,
  dequantBytes,
  prefillFlops,
  quantizeBytes,
  sampleQueries,
  sliceQueries,
  V4_ROW,
  type Workload,
} from '../workload.js';

const BACKENDS = ['auto', 'cuda', 'cpu', 'wasm'] as const;

export const RUN_OPTIONS = {
  queries: { type: 'int', default: 8192, min: 1, help: 'query tokens in the chunk (sQ)', short: 'n' },
  heads: { type: 'int', default: 64, min: 1, max: 1024, help: 'query heads (hQ)' },
  topk: { type: 'int', default: 512, min: 0, help: 'compressed entries per query chosen by the indexer' },
  window: { type: 'int', default: 128, min: 1, max: 4096, help: 'sliding-window length W' },
  context: { type: 'int', default: 8192, min: 0, help: 'tokens before the chunk (sets how many compressed entries exist: (context + queries) / 4)' },
  'page-size': { type: 'int', default: 64, min: 1, max: 4096, help: 'v4 cache page size' },
  backend: { type: 'string', choices: BACKENDS, help: 'backend (default: SPARSE_MLA_BACKEND, else auto)' },
  workers: { type: 'int', min: 1, max: 256, help: 'worker threads: the WASM pool or the native CPU threads (default: the cores)' },
  seed: { type: 'int', default: 1, min: 0, max: 2 ** 32 - 1, help: 'seed of the random inputs' },
} as const satisfies OptionTable;

const OPTIONS = {
  ...RUN_OPTIONS,
  block: { type: 'int', min: 1, help: 'queries per sparsePrefill call (default: queries / 16)' },
  check: { type: 'int', default: 32, min: 0, help: 'queries checked against the float64 reference' },
  json: { type: 'boolean', help: 'print the results as JSON on stdout instead of a table' },
  quiet: { type: 'boolean', short: 'q', help: 'no progress output on stderr' },
} as const satisfies OptionTable;

const USAGE = `Usage: sparse-mla run [options]

Run a DeepSeek-V4-shaped prefill chunk (one c4 layer: topk compressed entries + a causal sliding
window per query, dQK = dV = 512, a sink per head) on the best backend: quantize a random v4 paged
cache, dequantize the chunk's gather into a bf16 workspace, run sparsePrefill, and check sampled
queries against the float64 reference (SPEC §4 tolerances). Exit 0 when all checks pass, 1 if not.

Options:
${formatOptions(OPTIONS)}
`;

interface CheckRow {
  name: string;
  pass: boolean;
  count: number;
  failures: number;
  maxAbsErr: number;
  maxRelErr: number;
  cosineGap?: number;
  tolerance: { abs: number; rel: number; cos?: number };
  /** a bit-exact check (no tolerance) */
  exact?: boolean;
  note?: string;
}

interface StepRow {
  step: string;
  seconds: number;
  calls: number;
  rate?: { value: number; unit: string };
  note: string;
}

/** v4 byte ranges of one token: its 576 data bytes and its 8 scale bytes. */
function tokenBytes(cache: KvCache, token: number): [number, number][] {
  const pageBytes = Math.ceil((cache.pageSize * 584) / 576) * 576;
  const page = Math.floor(token / cache.pageSize);
  const slot = token % cache.pageSize;
  const base = page * pageBytes;
  return [
    [base + slot * 576, 576],
    [base + cache.pageSize * 576 + slot * 8, 8],
  ];
}

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const value = await fn();
  return [value, (performance.now() - t0) / 1000];
}

/** Quantize: the engine's bytes against the reference's, token by token, on a sample. */
function checkQuantize(w: Workload, cache: KvCache, sample: number[]): CheckRow {
  const ref = createKvCache('v4', { pageSize: w.shape.pageSize, numPages: w.numPages });
  const rows = new Uint16Array(sample.length * V4_ROW);
  sample.forEach((r, k) => rows.set(w.rows.data.subarray(r * V4_ROW, (r + 1) * V4_ROW), k * V4_ROW));
  const ids = sample.map((r) => w.tokenIds[r]!);
  quantizeKCacheReference(ref, ids, tensor('bf16', [sample.length, V4_ROW], rows));
  let failures = 0;
  for (const id of ids) {
    let same = true;
    for (const [start, length] of tokenBytes(cache, id)) {
      for (let b = start; b < start + length; b++) if (cache.data[b] !== ref.data[b]) same = false;
    }
    if (!same) failures++;
  }
  return {
    name: 'quantize bytes',
    pass: failures === 0,
    count: ids.length,
    failures,
    maxAbsErr: NaN,
    maxRelErr: NaN,
    tolerance: { abs: 0, rel: 0 },
    exact: true,
    note: `${ids.length - failures}/${ids.length} sampled tokens bit-identical to the reference`,
  };
}

/** Dequantize: every gathered value must equal the reference value exactly (NaN matches NaN). */
function checkDequantize(w: Workload, cache: KvCache, kv: Tensor<'bf16'>): CheckRow {
  const ref = dequantizeKCacheReference(cache, Array.from(w.tokenIds));
  let failures = 0;
  let maxAbsErr = 0;
  for (let i = 0; i < ref.length; i++) {
    const got = bf16BitsToFloat32(kv.data[i]!);
    const want = ref[i]!;
    if (got === want || (Number.isNaN(got) && Number.isNaN(want))) continue;
    failures++;
    maxAbsErr = Math.max(maxAbsErr, Math.abs(got - want));
  }
  return {
    name: 'dequantize values',
    pass: failures === 0 && ref.length === kv.data.length,
    count: ref.length,
    failures,
    maxAbsErr,
    maxRelErr: NaN,
    tolerance: { abs: 0, rel: 0 },
    exact: true,
    note: `${ref.length - failures}/${ref.length} values equal to the reference`,
  };
}

export async function runCommand(argv: string[]): Promise<number> {
  const { options: o, positionals } = parseArgs(argv, OPTIONS);
  if (positionals.length > 0) {
    throw new SparseMlaError('INVALID_VALUE', `run: unexpected argument '${positionals[0]}'`, 'argv');
  }
  const progress = new Progress({ enabled: !o.quiet });
  const shape = {
    queries: o.queries,
    heads: o.heads,
    topk: o.topk,
    window: o.window,
    context: o.context,
    pageSize: o['page-size'],
    seed: o.seed,
  };

  checkShape(shape); // sizes, then the backend, are refused before any work
  const steps: StepRow[] = [];
  const checks: CheckRow[] = [];

  progress.start('starting engine', 0);
  const [engine, startSeconds] = await timed(() =>
    createEngine({ ...(o.backend !== undefined ? { backend: o.backend as BackendChoice } : {}), ...(o.workers !== undefined ? { workers: o.workers } : {}) }),
  );
  const workers = engine.workers ?? 0;
  progress.finish(`${engine.backend}${workers > 0 ? `, ${workers} workers` : ''}`);
  steps.push({ step: 'engine start', seconds: startSeconds, calls: 1, note: `${engine.backend} backend${workers > 0 ? `, ${workers} workers` : ''}` });

  let w: Workload;
  try {
    progress.start('generating inputs', 0);
    const [built, genSeconds] = await timed(async () => buildWorkload(shape));
    w = built;
    progress.finish(`${w.kvRows} workspace rows, ${shape.queries} queries`);
    steps.push({ step: 'inputs', seconds: genSeconds, calls: 0, note: 'random rows, queries, indices (JS, untimed work)' });
  } catch (err) {
    await engine.dispose();
    throw err;
  }

  let sampledCount = 0;
  try {
    // 1. quantize the rows into a v4 paged cache at their (shuffled) token ids
    const cache = createKvCache('v4', { pageSize: shape.pageSize, numPages: w.numPages });
    progress.start('quantizeKCache', 0);
    const [, quantSeconds] = await timed(() => engine.quantizeKCache({ cache, tokenIds: tensor('int32', [w.kvRows], w.tokenIds), rows: w.rows }));
    progress.finish(formatSeconds(quantSeconds));
    steps.push({
      step: 'quantizeKCache',
      seconds: quantSeconds,
      calls: 1,
      rate: { value: quantizeBytes(w.kvRows) / quantSeconds / 1e9, unit: 'GB/s' },
      note: `${w.kvRows} bf16 rows -> v4 pages of ${shape.pageSize} (${w.numPages} pages)`,
    });

    // 2. dequantize the chunk's gather into the bf16 workspace
    progress.start('dequantizeKCachePaged', 0);
    const [kv, dequantSeconds] = await timed(() => engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [w.kvRows], w.tokenIds) }));
    progress.finish(formatSeconds(dequantSeconds));
    steps.push({
      step: 'dequantizeKCachePaged',
      seconds: dequantSeconds,
      calls: 1,
      rate: { value: dequantBytes(w.kvRows) / dequantSeconds / 1e9, unit: 'GB/s' },
      note: `gather of ${w.compressedRows} compressed + ${w.windowRows} window rows -> bf16 [${w.kvRows}, 512]`,
    });

    // 3. the sparse prefill, in blocks of queries; keep the outputs of the sampled queries only
    const sample = sampleQueries(shape.queries, o.check, shape.seed);
    sampledCount = sample.length;
    const { heads } = shape;
    const gotOut = new Float32Array(sample.length * heads * DV);
    const gotLse = new Float32Array(sample.length * heads);
    const gotMax = new Float32Array(sample.length * heads);
    const block = o.block ?? Math.max(1, Math.ceil(shape.queries / 16));
    const calls = Math.ceil(shape.queries / block);
    let prefillSeconds = 0;
    let nonFinite = 0;
    let next = 0; // next sampled query to collect
    progress.start('sparsePrefill', shape.queries);
    for (let start = 0; start < shape.queries; start += block) {
      const end = Math.min(shape.queries, start + block);
      const part = sliceQueries(w, start, end);
      const [res, seconds] = await timed(() =>
        engine.sparsePrefill({ ...part, kv, smScale: w.smScale, dV: DV, attnSink: w.attnSink }),
      );
      prefillSeconds += seconds;
      const out = res.out.data;
      for (let i = 0; i < out.length; i++) if ((out[i]! & 0x7f80) === 0x7f80) nonFinite++;
      while (next < sample.length && sample[next]! < end) {
        const local = sample[next]! - start;
        for (let k = 0; k < heads * DV; k++) gotOut[next * heads * DV + k] = bf16BitsToFloat32(out[local * heads * DV + k]!);
        gotLse.set(res.lse.data.subarray(local * heads, (local + 1) * heads), next * heads);
        gotMax.set(res.maxLogits.data.subarray(local * heads, (local + 1) * heads), next * heads);
        next++;
      }
      progress.update(end);
    }
    const flops = prefillFlops(w.totalEntries, heads);
    progress.finish(`${formatSeconds(prefillSeconds)}, ${formatRate(flops / prefillSeconds / 1e9, 'GFLOP/s')}`);
    steps.push({
      step: 'sparsePrefill',
      seconds: prefillSeconds,
      calls,
      rate: { value: flops / prefillSeconds / 1e9, unit: 'GFLOP/s' },
      note: `${shape.queries} q x ${heads} heads, dQK ${DQK}, dV ${DV}, ${shape.topk}+${shape.window} entries/q, ${(flops / 1e9).toFixed(1)} GFLOP`,
    });
    checks.push({
      name: 'out finite',
      pass: nonFinite === 0,
      count: shape.queries * heads * DV,
      failures: nonFinite,
      maxAbsErr: NaN,
      maxRelErr: NaN,
      tolerance: { abs: 0, rel: 0 },
      exact: true,
      note: `all ${shape.queries} queries: ${nonFinite} non-finite outputs (every row has valid entries)`,
    });

    // 4. checks against the float64 reference
    progress.start('checking quantize + dequantize', 0);
    const tokenSample = sampleQueries(w.kvRows, Math.min(w.kvRows, 256), shape.seed + 1);
    checks.push(checkQuantize(w, cache, tokenSample));
    checks.push(checkDequantize(w, cache, kv));
    progress.finish();

    if (sample.length > 0) {
      const refOut = new Float64Array(sample.length * heads * DV);
      const refLse = new Float64Array(sample.length * heads);
      const refMax = new Float64Array(sample.length * heads);
      // The reference sees only the sampled queries (their q rows, index rows and lengths), so it
      // widens a few MB instead of the whole q.
      const { heads: h } = shape;
      const sq = new Uint16Array(sample.length * h * DQK);
      const si = new Int32Array(sample.length * w.width);
      const sl = new Int32Array(sample.length);
      sample.forEach((i, k) => {
        sq.set(w.q.data.subarray(i * h * DQK, (i + 1) * h * DQK), k * h * DQK);
        si.set(w.indices.data.subarray(i * w.width, (i + 1) * w.width), k * w.width);
        sl[k] = w.topkLength.data[i]!;
      });
      const prepared = prepareSparsePrefillReference({
        q: tensor('bf16', [sample.length, h, DQK], sq),
        kv,
        indices: tensor('int32', [sample.length, w.width], si),
        topkLength: tensor('int32', [sample.length], sl),
        attnSink: w.attnSink,
        smScale: w.smScale,
        dV: DV,
      });
      progress.start('float64 reference', sample.length);
      const [, refSeconds] = await timed(async () => {
        for (let k = 0; k < sample.length; k++) {
          const ref = prepared.run([k]);
          refOut.set(ref.out, k * heads * DV);
          refLse.set(ref.lse, k * heads);
          refMax.set(ref.maxLogits, k * heads);
          progress.update(k + 1);
          await new Promise((resolve) => setImmediate(resolve)); // let the bar redraw
        }
      });
      progress.finish();
      steps.push({ step: 'float64 reference', seconds: refSeconds, calls: sample.length, note: `${sample.length} sampled queries (JS, for the checks)` });
      const compare = (name: string, got: Float32Array, ref: Float64Array, tol: { abs: number; rel: number; cos?: number }): CheckRow => {
        const c = compareToReference(got, ref, tol);
        return {
          name,
          pass: c.pass,
          count: c.count,
          failures: c.failures,
          maxAbsErr: c.maxAbsErr,
          maxRelErr: c.maxRelErr,
          ...(tol.cos !== undefined ? { cosineGap: c.cosineGap } : {}),
          tolerance: tol,
          ...(c.infNanMismatch ? { note: `${c.infNanMismatch} inf/NaN placement mismatches` } : {}),
        };
      };
      checks.push(compare('prefill out', gotOut, refOut, TOLERANCES.out));
      checks.push(compare('prefill lse', gotLse, refLse, TOLERANCES.lse));
      checks.push(compare('prefill maxLogits', gotMax, refMax, TOLERANCES.maxLogits));
    }
  } finally {
    await engine.dispose();
  }

  const pass = checks.every((c) => c.pass);
  if (o.json) {
    process.stdout.write(
      `${JSON.stringify({ command: 'run', backend: engine.backend, workers, shape, workspaceRows: w.kvRows, indexWidth: w.width, sampledQueries: sampledCount, steps, checks, pass }, jsonNumbers, 2)}\n`,
    );
    return pass ? 0 : 1;
  }
  printReport(engine, workers, w, steps, checks, sampledCount, pass);
  return pass ? 0 : 1;
}

/** JSON has no NaN/inf: write them as null / strings. */
function jsonNumbers(_key: string, value: unknown): unknown {
  if (typeof value === 'number' && !Number.isFinite(value)) return Number.isNaN(value) ? null : String(value);
  return value;
}

function printReport(engine: Engine, workers: number, w: Workload, steps: StepRow[], checks: CheckRow[], sampled: number, pass: boolean): void {
  const s = w.shape;
  const header =
    `sparse-mla run: ${engine.backend} backend${workers > 0 ? `, ${workers} workers` : ''}; ` +
    `${s.queries} queries x ${s.heads} heads, dQK ${DQK}, dV ${DV}, topk ${s.topk} + window ${s.window} (index rows of ${w.width}), ` +
    `workspace ${w.kvRows} rows, v4 page size ${s.pageSize}, seed ${s.seed}`;
  const stepTable = formatTable(
    [
      ['step', 'time', 'calls', 'throughput', 'what'],
      ...steps.map((r) => [r.step, formatSeconds(r.seconds), String(r.calls), r.rate ? formatRate(r.rate.value, r.rate.unit) : '-', r.note]),
    ],
    ['left', 'right', 'right', 'right', 'left'],
  );
  const checkTable = formatTable(
    [
      ['check', 'max abs err', 'tol', 'max rel err', 'tol', '1 - cos', 'tol', 'failing', 'result'],
      ...checks.map((c) => [
        c.name,
        Number.isNaN(c.maxAbsErr) ? '-' : formatError(c.maxAbsErr),
        c.exact ? 'exact' : formatError(c.tolerance.abs),
        Number.isNaN(c.maxRelErr) ? '-' : formatError(c.maxRelErr),
        c.exact ? 'exact' : formatError(c.tolerance.rel),
        c.cosineGap !== undefined ? formatError(c.cosineGap) : '-',
        c.tolerance.cos !== undefined ? formatError(c.tolerance.cos) : '-',
        `${c.failures}/${c.count}`,
        c.pass ? 'PASS' : 'FAIL',
      ]),
    ],
    ['left', 'right', 'right', 'right', 'right', 'right', 'right', 'right', 'left'],
  );
  const notes = checks.filter((c) => c.note).map((c) => `  ${c.name}: ${c.note}`);
  const lines = [
    header,
    '',
    stepTable,
    '',
    `Checks (prefill: ${sampled} sampled queries vs the float64 reference; elementwise pass if abs <= tol OR rel <= tol):`,
    checkTable,
    ...notes,
    '',
    pass ? 'PASS' : 'FAIL',
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
}

export const command: CliCommand = {
  name: 'run',
  summary: 'run a DeepSeek-V4-shaped prefill chunk on the best backend and check it (npm start)',
  usage: USAGE,
  run: runCommand,
};
