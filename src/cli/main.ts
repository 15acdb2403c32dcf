#!/usr/bin/env node
/**
 * The `sparse-mla` command line. Each subcommand lives in src/cli/commands/<name>.ts and exports
 * `command: CliCommand`; modules are loaded on demand so `--help` and `info` stay quick.
 *
 * Exit codes: what the command returns (0 ok, 1 a failed check), 2 for bad usage or bad input
 * (a SparseMlaError, or a file system error on a path the user gave), 1 for a failure while
 * running (worker died, backend failure, internal error).
 * With `--json`, an error is also written to stdout as {"command", "ok": false, "exitCode", "error"}.
 */
import { jsonError, packageVersion, runCliCommand, wantsJson, type CliCommand } from './command.js';
import { REPORT_WIDTH, wrapText } from './table.js';

/** In the order the help lists them. */
const COMMAND_NAMES = ['info', 'run', 'prefill', 'verify', 'bench', 'check'] as const;

interface Loaded {
  name: string;
  command?: CliCommand;
  error?: string;
}

async function loadCommand(name: string): Promise<Loaded> {
  try {
    // A computed specifier keeps each command's dependencies out of the others' start-up.
    const mod = (await import(`./commands/${name}.js`)) as { command?: CliCommand };
    const command = mod.command;
    if (!command || typeof command.run !== 'function') return { name, error: 'module does not export `command`' };
    return { name, command };
  } catch (err) {
    return { name, error: err instanceof Error ? err.message : String(err) };
  }
}

async function usage(): Promise<string> {
  const loaded = await Promise.all(COMMAND_NAMES.map(loadCommand));
  const width = Math.max(...COMMAND_NAMES.map((n) => n.length));
  const lines = loaded.flatMap(({ name, command, error }) =>
    wrapText(`  ${name.padEnd(width)}  ${command ? command.summary : `(unavailable: ${error})`}`, REPORT_WIDTH, width + 4),
  );
  return [
    'Usage: sparse-mla <command> [options]',
    '',
    'DeepSeek-V4-style sparse-prefill MLA attention: FP8 paged KV-cache dequant and sparse attention',
    'with an attention sink, on CUDA or on WebAssembly in worker threads.',
    '',
    'Commands:',
    ...lines,
    '',
    'Run `sparse-mla <command> --help` for the options of one command. Every command takes --json',
    '(results, and errors, as JSON on stdout); reports fit 100 columns unless --wide is given.',
    'Backend selection: --backend, or SPARSE_MLA_BACKEND=auto|cuda|cpu|wasm.',
  ].join('\n');
}

/** Edit distance (insert, delete, substitute, swap two neighbours) between short words. */
function distance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i]![j] = Math.min(d[i]![j]!, d[i - 2]![j - 2]! + 1);
    }
  }
  return d[a.length]![b.length]!;
}

/** The command a mistyped name most likely meant: a prefix of one, or at most 2 edits away. */
function suggestCommand(name: string): string | undefined {
  const lower = name.toLowerCase();
  const prefixed = COMMAND_NAMES.filter((c) => lower.length >= 2 && c.startsWith(lower));
  if (prefixed.length === 1) return prefixed[0];
  const ranked = COMMAND_NAMES.map((c) => ({ c, d: distance(lower, c) })).sort((x, y) => x.d - y.d);
  return ranked[0]!.d <= Math.min(2, Math.ceil(lower.length / 2)) ? ranked[0]!.c : undefined;
}

function wantsHelp(argv: readonly string[]): boolean {
  for (const arg of argv) {
    if (arg === '--') return false;
    if (arg === '--help' || arg === '-h') return true;
  }
  return false;
}

export async function main(argv: readonly string[]): Promise<number> {
  const [first, ...rest] = argv;
  if (first === undefined) {
    process.stderr.write(`${await usage()}\n`);
    return 2;
  }
  if (first === '--help' || first === '-h') {
    process.stdout.write(`${await usage()}\n`);
    return 0;
  }
  if (first === '--version' || first === '-V') {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  if (first === 'help') {
    const topic = rest[0];
    if (topic === undefined) {
      process.stdout.write(`${await usage()}\n`);
      return 0;
    }
    return main([topic, '--help']);
  }
  const json = wantsJson(rest);
  if (!(COMMAND_NAMES as readonly string[]).includes(first)) {
    const guess = suggestCommand(first);
    const message = `unknown command '${first}'${guess ? ` (did you mean '${guess}'?)` : ''}`;
    if (json) jsonError(first, 2, 'UNKNOWN_COMMAND', message, guess ? { suggestion: guess } : {});
    process.stderr.write(`sparse-mla: ${message}\n\n${await usage()}\n`);
    return 2;
  }
  const { command, error } = await loadCommand(first);
  if (!command) {
    if (json) jsonError(first, 1, 'COMMAND_UNAVAILABLE', `this command is not available (${error})`);
    process.stderr.write(`sparse-mla ${first}: this command is not available (${error})\n`);
    return 1;
  }
  if (wantsHelp(rest)) {
    process.stdout.write(`${command.usage.trimEnd()}\n`);
    return 0;
  }
  return runCliCommand(first, command, rest);
}

const code = await main(process.argv.slice(2));
// Exit explicitly so a stray handle (a worker that failed to end) cannot keep the process alive,
// but only after stdout has drained so piped tables and JSON are complete.
process.exitCode = code;
process.stdout.write('', () => process.exit(code));
