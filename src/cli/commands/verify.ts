/**
 * `sparse-mla verify <dir>`: recompute the float64 reference of a sparse prefill from the inputs in
 * a directory and judge the outputs there with SPEC §4's accuracy bounds. Needs no backend: this is the
 * CPU-only check of outputs dumped from a GPU engine. Exit 0 pass, 1 fail, 2 bad input.
 *
 * The reference runs over chunks of query rows on worker threads and is compared chunk by chunk,
 * so a GPU-sized dump (sQ 4096, hQ 128, topk 2048) never needs its float64 reference in memory.
 */
import { availableParallelism } from 'node:os';
import { PrefillDir, loadPrefillInputs, loadPrefillOutputs } from '../../io/prefill_dir.js';
import { prefillFlops, prepareSparsePrefill } from '../../ops/sparse_prefill.js';
import { AttentionComparator, describeBounds, formatFigure, formatPosition, tensorValues, type TensorComparison } from '../../reference/compare.js';
import { createReferencePool, type ReferencePool } from '../../reference/parallel.js';
import { checkQueries, prepareSparsePrefillReference, type ReferenceAttentionResult } from '../../reference/sparse_prefill.js';
import { formatOptions, onePositional, parseArgs, type OptionTable } from '../args.js';
import type { CliCommand } from '../command.js';
import { Progress } from '../progress.js';
import { fitLines, formatTable, setReportWidth } from '../table.js';

const OPTIONS = {
  sample: { type: 'int', min: 1, metavar: 'N', help: 'judge only N query rows spread evenly over sQ (first and last included); default: all' },
  workers: { type: 'int', min: 1, max: 256, metavar: 'N', help: 'worker threads for the reference (default: the cores, or 1 for a small check)' },
  json: { type: 'boolean', help: 'print the report as JSON on stdout' },
  wide: { type: 'boolean', help: 'do not fit the report to 100 columns' },
  quiet: { type: 'boolean', short: 'q', help: 'no progress on stderr' },
} satisfies OptionTable;

const USAGE = `Usage: sparse-mla verify <dir> [options]

Recompute the float64 reference of a sparse prefill from <dir> and judge the outputs there with the
SPEC §4 accuracy bounds (docs/SPEC.md):
${describeBounds().map((l) => `  ${l}`).join('\n')}
Reports per tensor the worst error/bound ratio (pass <= 1) and where, and the elements over the
bound. No backend is needed.

<dir> holds q.npy (bf16 bits as <u2) [sQ, hQ, dQK], kv.npy (<u2) [sKV, dQK], indices.npy (<i4|<i8)
[sQ, topk], optional topk_length.npy (<i4) [sQ] and attn_sink.npy (<f4) [hQ], meta.json
{"sm_scale": ..., "d_v": 512}, and the outputs out.npy (<u2 or <f4) [sQ, hQ, dV], lse.npy (<f4)
[sQ, hQ], max_logits.npy (<f4) [sQ, hQ]; or one .safetensors file holding the same names.

Exit status: 0 every tensor passes, 1 a tensor fails, 2 bad input (missing/garbled files, shapes).

Options:
${formatOptions(OPTIONS)}
`;

/** `count` query rows spread evenly over [0, n), first and last included. */
export function evenlySpacedRows(n: number, count: number): number[] {
  if (count >= n) return Array.from({ length: n }, (_, i) => i);
  if (count === 1) return [0];
  const rows = new Set<number>();
  for (let j = 0; j < count; j++) rows.add(Math.round((j * (n - 1)) / (count - 1)));
  return [...rows].sort((a, b) => a - b);
}

export interface TensorReport {
  name: string;
  file: string;
  /** worst ratio error / bound and where (comparison.worst.at: query, head, col), elements over, 1 − cos */
  comparison: TensorComparison;
}

export interface VerifyReport {
  dir: string;
  pass: boolean;
  shapes: { sQ: number; hQ: number; dQK: number; sKV: number; topk: number; dV: number };
  queriesChecked: number;
  seconds: number;
  tensors: TensorReport[];
}

/** Verify a prefill directory; throws SparseMlaError on bad input. */
export async function verifyDirectory(
  dir: string,
  opts: { sample?: number; queries?: readonly number[]; workers?: number; progress?: Progress } = {},
): Promise<VerifyReport> {
  const started = performance.now();
  const handle = await PrefillDir.open(dir);
  const inputs = await loadPrefillInputs(handle);
  // The engine's own validation, so verify refuses (exit 2) exactly what prefill refuses.
  prepareSparsePrefill(inputs.args);
  const outputs = await loadPrefillOutputs(handle, inputs.shapes);
  const { sQ, hQ, dQK, topk, dV } = inputs.shapes;
  // explicit rows are judged in order, each once
  const queries = opts.queries !== undefined ? [...new Set(checkQueries(opts.queries, sQ))].sort((a, b) => a - b) : evenlySpacedRows(sQ, opts.sample ?? sQ);

  // chunks of roughly 1 GFLOP, enough to amortize a message, small enough for a lively progress bar
  const flopsPerQuery = prefillFlops(Math.max(1, topk), hQ, dQK, dV);
  const chunkRows = Math.max(1, Math.min(256, Math.floor(1e9 / flopsPerQuery)));
  const chunks: number[][] = [];
  for (let s = 0; s < queries.length; s += chunkRows) chunks.push(queries.slice(s, s + chunkRows));

  // threads only pay off when there is real work: by default a small check runs right here
  const totalFlops = flopsPerQuery * queries.length;
  const wanted = opts.workers ?? (totalFlops < 4e9 ? 1 : availableParallelism());
  const workers = Math.max(1, Math.min(wanted, chunks.length));
  let pool: ReferencePool | undefined;
  let local: ReturnType<typeof prepareSparsePrefillReference> | undefined;
  if (workers > 1) pool = await createReferencePool(inputs.args, workers);
  else local = prepareSparsePrefillReference(inputs.args);

  const acc = new AttentionComparator({ heads: hQ, dV });
  const progress = opts.progress;
  progress?.start(`reference (${queries.length} of ${sQ} queries, ${workers} thread${workers > 1 ? 's' : ''})`, queries.length);
  let done = 0;
  const absorb = (rows: number[], ref: ReferenceAttentionResult): void => {
    acc.add({ out: tensorValues(outputs.out, rows), lse: tensorValues(outputs.lse, rows), maxLogits: tensorValues(outputs.maxLogits, rows) }, ref, rows);
    done += rows.length;
    progress?.update(done);
  };
  try {
    if (pool) {
      await Promise.all(chunks.map((rows) => pool.run(rows).then((ref) => absorb(rows, ref))));
    } else {
      for (const rows of chunks) {
        absorb(rows, local!.run(rows));
        // let the event loop breathe (progress output, signals) between chunks
        await new Promise((r) => setImmediate(r));
      }
    }
  } finally {
    await pool?.close();
  }
  progress?.finish();

  const verdict = acc.result();
  const tensors: TensorReport[] = [
    { name: 'out', file: outputs.files.out!, comparison: verdict.out },
    { name: 'lse', file: outputs.files.lse!, comparison: verdict.lse },
    { name: 'max_logits', file: outputs.files.max_logits!, comparison: verdict.maxLogits },
  ];
  return {
    dir,
    pass: tensors.every((t) => t.comparison.pass),
    shapes: inputs.shapes,
    queriesChecked: queries.length,
    seconds: (performance.now() - started) / 1000,
    tensors,
  };
}

function formatReport(r: VerifyReport): string {
  const { sQ, hQ, dQK, sKV, topk, dV } = r.shapes;
  const rows: string[][] = [['tensor', 'worst err/bound', 'over bound', '1-cos', 'worst at', 'got / ref', 'result']];
  for (const t of r.tensors) {
    const c = t.comparison;
    const w = c.worst;
    rows.push([
      t.name,
      formatFigure(c.worstRatio),
      `${c.overBound}/${c.count}${c.infNanMismatch ? ` (${c.infNanMismatch} inf/NaN)` : ''}`,
      c.cosineGap !== undefined ? formatFigure(c.cosineGap) : '-',
      formatPosition(w?.at),
      w ? `${formatFigure(w.got)} / ${formatFigure(w.ref)}` : '-',
      c.pass ? 'pass' : 'FAIL',
    ]);
  }
  return fitLines([
    `verify ${r.dir}: sQ=${sQ} hQ=${hQ} dQK=${dQK} sKV=${sKV} topk=${topk} dV=${dV}; ${r.queriesChecked} of ${sQ} queries checked in ${r.seconds.toFixed(1)} s`,
    '',
    ...formatTable(rows, ['left', 'right', 'right', 'right', 'left', 'left', 'left']).split('\n'),
    'bounds (pass: worst err/bound <= 1):',
    ...describeBounds().map((l) => `  ${l}`),
    '',
    r.pass ? 'PASS: every tensor is within the SPEC §4 bounds' : `FAIL: ${r.tensors.filter((t) => !t.comparison.pass).map((t) => t.name).join(', ')} outside the SPEC §4 bounds`,
  ]).join('\n');
}

export const command: CliCommand = {
  name: 'verify',
  summary: 'judge sparse-prefill outputs in a directory against the float64 reference',
  usage: USAGE,
  options: OPTIONS,
  // Bad input (a SparseMlaError other than a runtime failure) reaches main.ts: exit 2, and with
  // --json an error object on stdout.
  async run(argv) {
    const { options, positionals } = parseArgs(argv, OPTIONS);
    const dir = onePositional(positionals, 'directory');
    if (options.wide) setReportWidth(Infinity);
    const progress = new Progress({ enabled: !options.quiet });
    const report = await verifyDirectory(dir, { sample: options.sample, workers: options.workers, progress });
    const json = { command: 'verify', ok: report.pass, ...report };
    process.stdout.write(options.json ? `${JSON.stringify(json, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v), 2)}\n` : `${formatReport(report)}\n`);
    return report.pass ? 0 : 1;
  },
};
