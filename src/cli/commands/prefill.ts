/**
 * `sparse-mla prefill <dir> --out <dir>`: run sparsePrefill on the inputs stored in a directory
 * (.npy files or one .safetensors file; see verify) and write out / lse / max_logits the same way.
 */
import { SparseMlaError } from '../../errors.js';
import { createEngine } from '../../engine.js';
import { prepareOutputDir, prepareOutputFiles } from '../../io/files.js';
import { checkOutputsFolder, loadPrefillInputs, prefillOutputFiles, writePrefillOutputs, type DirFormat } from '../../io/prefill_dir.js';
import { prefillFlops } from '../../ops/sparse_prefill.js';
import { formatOptions, onePositional, parseArgs, type OptionTable } from '../args.js';
import { BACKEND_CHOICES, engineOptions, type CliCommand } from '../command.js';
import { Progress } from '../progress.js';
import { fitLines, formatRate, formatSeconds } from '../table.js';

const OPTIONS = {
  out: { type: 'string', short: 'o', metavar: 'DIR', help: 'directory for out / lse / max_logits (created if missing; required)' },
  backend: { type: 'string', choices: BACKEND_CHOICES, help: 'backend (default: SPARSE_MLA_BACKEND, else auto)' },
  workers: { type: 'int', min: 1, max: 256, metavar: 'N', help: 'WASM worker-pool size (default: the cores)' },
  format: { type: 'string', choices: ['npy', 'safetensors'], default: 'npy', help: 'output files: out.npy/lse.npy/max_logits.npy, or outputs.safetensors' },
  json: { type: 'boolean', help: 'print what ran and what was written as JSON on stdout' },
  quiet: { type: 'boolean', short: 'q', help: 'no progress on stderr' },
} satisfies OptionTable;

const USAGE = `Usage: sparse-mla prefill <dir> --out <dir> [options]

Run the sparse prefill forward (SPEC §4) on the inputs in <dir> and write the outputs to --out:
out.npy (bf16 bits as <u2) [sQ, hQ, dV], lse.npy (<f4) [sQ, hQ], max_logits.npy (<f4) [sQ, hQ].

<dir> holds q.npy (bf16 bits as <u2) [sQ, hQ, dQK], kv.npy (<u2) [sKV, dQK], indices.npy (<i4|<i8)
[sQ, topk], optional topk_length.npy (<i4) [sQ] and attn_sink.npy (<f4) [hQ], and meta.json
{"sm_scale": ..., "d_v": 512}; or one .safetensors file holding the same names (BF16 there).
Check the result with: sparse-mla verify <dir-with-inputs-and-outputs>
An --out already holding outputs in the other format (an earlier run's out.npy, or its
outputs.safetensors) is refused before the run: remove them first, or write that format.

Options:
${formatOptions(OPTIONS)}
`;

export const command: CliCommand = {
  name: 'prefill',
  summary: 'run sparsePrefill on .npy/.safetensors inputs in a directory and write the outputs',
  usage: USAGE,
  options: OPTIONS,
  async run(argv) {
    const { options, positionals } = parseArgs(argv, OPTIONS);
    const inputDir = onePositional(positionals, 'input directory');
    if (options.out === undefined) throw new SparseMlaError('INVALID_VALUE', '--out: expected an output directory, got none', 'argv');
    // made and checked before any work, so a bad --out fails in milliseconds
    await prepareOutputDir(options.out, '--out');
    await prepareOutputFiles(options.out, prefillOutputFiles(options.format as DirFormat));
    // no outputs beside an older run's in the other format (a folder verify refuses)
    await checkOutputsFolder(options.out, options.format as DirFormat, '--out');
    const progress = new Progress({ enabled: !options.quiet });

    progress.start('load inputs', 0);
    const inputs = await loadPrefillInputs(inputDir);
    const { sQ, hQ, dQK, sKV, topk, dV } = inputs.shapes;
    progress.finish(`q [${sQ}, ${hQ}, ${dQK}], kv [${sKV}, ${dQK}], topk ${topk}`);

    progress.start('start engine', 0);
    const engine = await createEngine(engineOptions(options));
    try {
      progress.finish(`${engine.backend}${engine.workers ? `, ${engine.workers} workers` : ''}`);
      progress.start('sparse prefill', 0);
      const t0 = performance.now();
      const res = await engine.sparsePrefill(inputs.args);
      const seconds = (performance.now() - t0) / 1000;
      progress.finish();

      // FLOPs as SPEC §4 counts them: 2 · Σ_i (topkLength[i] or topk) · hQ · (dQK + dV)
      let entries = 0;
      const lens = inputs.args.topkLength?.data;
      for (let i = 0; i < sQ; i++) entries += lens ? Math.max(0, Math.min(topk, lens[i]!)) : topk;
      const flops = prefillFlops(entries, hQ, dQK, dV);

      const written = await writePrefillOutputs(options.out, res, options.format as DirFormat);
      if (options.json) {
        const report = { command: 'prefill', ok: true, backend: engine.backend, workers: engine.workers ?? 0, shapes: inputs.shapes, seconds, gflops: flops / 1e9, outDir: options.out, written };
        process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
        return 0;
      }
      const lines = [
        `prefill: ${engine.backend} backend, sQ=${sQ} hQ=${hQ} dQK=${dQK} sKV=${sKV} topk=${topk} dV=${dV}: ` +
          `${formatSeconds(seconds)}, ${formatRate(flops / seconds / 1e9, 'GFLOP/s')}`,
        `wrote ${written.join(', ')} to ${options.out}`,
      ];
      process.stdout.write(`${fitLines(lines).join('\n')}\n`);
      return 0;
    } finally {
      await engine.dispose();
    }
  },
};
