#!/usr/bin/env node
/**
 * The `sparse-mla` command line. Each subcommand lives in src/cli/commands/<name>.ts and exports
 * `command: CliCommand`; modules are loaded on demand so `--help` and `info` stay quick.
 *
 * Exit codes: what the command returns (0 ok, 1 a failed check), 2 for bad usage or bad input
 * (a SparseMlaError), 1 for a failure while running (worker died, backend failure, internal error).
 */
import { readFileSync } from 'node:fs';
import { SparseMlaError, type ErrorCode } from '../errors.js';
import type { CliCommand } from './command.js';

/** Typed errors that say the work failed, not that the input was bad: exit 1, not 2. */
const RUNTIME_FAILURES: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['BACKEND_FAILURE', 'WORKER_DIED', 'DISPOSED']);

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

function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

async function usage(): Promise<string> {
  const loaded = await Promise.all(COMMAND_NAMES.map(loadCommand));
  const width = Math.max(...COMMAND_NAMES.map((n) => n.length));
  const lines = loaded.map(({ name, command, error }) =>
    `  ${name.padEnd(width)}  ${command ? command.summary : `(unavailable: ${error})`}`,
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
    'Run `sparse-mla <command> --help` for the options of one command.',
    'Backend selection: --backend, or SPARSE_MLA_BACKEND=auto|cuda|cpu|wasm.',
  ].join('\n');
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
  if (!(COMMAND_NAMES as readonly string[]).includes(first)) {
    process.stderr.write(`sparse-mla: unknown command '${first}'\n\n${await usage()}\n`);
    return 2;
  }
  const { command, error } = await loadCommand(first);
  if (!command) {
    process.stderr.write(`sparse-mla ${first}: this command is not available (${error})\n`);
    return 1;
  }
  if (wantsHelp(rest)) {
    process.stdout.write(`${command.usage.trimEnd()}\n`);
    return 0;
  }
  try {
    return await command.run(rest);
  } catch (err) {
    if (err instanceof SparseMlaError) {
      process.stderr.write(`sparse-mla ${first}: ${err.message} [${err.code}]\n`);
      // a failure while running (a worker died, the backend failed) is not the caller's input
      return RUNTIME_FAILURES.has(err.code) ? 1 : 2;
    }
    process.stderr.write(`sparse-mla ${first}: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    return 1;
  }
}

const code = await main(process.argv.slice(2));
// Exit explicitly so a stray handle (a worker that failed to end) cannot keep the process alive,
// but only after stdout has drained so piped tables and JSON are complete.
process.exitCode = code;
process.stdout.write('', () => process.exit(code));
