/** One CLI subcommand, and how a command runs: its exit code, its errors as text or JSON. */
import { readFileSync } from 'node:fs';
import { availableParallelism, cpus, totalmem } from 'node:os';
import { SparseMlaError, type ErrorCode } from '../errors.js';
import type { BackendChoice, EngineOptions } from '../types.js';
import type { OptionTable } from './args.js';

/** One CLI subcommand. `run` returns the process exit code. */
export interface CliCommand {
  name: string;
  summary: string;
  usage: string;
  /** Its options, as parseArgs reads them from argv (the usage text lists them). */
  options: OptionTable;
  run(argv: string[]): Promise<number>;
}

/** The installed package's version (`unknown` when its package.json cannot be read). */
export function packageVersion(): string {
  try {
    return (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string }).version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/** The machine a report was made on, as `info` and `bench` report it. */
export interface MachineFacts {
  /** the first CPU's model */
  cpu: string;
  /** the cores this process may use */
  cores: number;
  /** total memory in GiB, to one decimal */
  memoryGiB: number;
  node: string;
  /** platform-arch, e.g. linux-x64 */
  platform: string;
}

export function machineFacts(): MachineFacts {
  return {
    cpu: cpus()[0]?.model?.trim() ?? 'unknown',
    cores: availableParallelism(),
    memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
  };
}

/** --backend's values: createEngine's backend choices. */
export const BACKEND_CHOICES = ['auto', 'cuda', 'cpu', 'wasm'] as const satisfies readonly BackendChoice[];

/**
 * createEngine's options from a command's --backend and --workers; one not given is left out, so
 * SPARSE_MLA_BACKEND and the core count apply.
 */
export function engineOptions(o: { backend?: string | undefined; workers?: number | undefined }): EngineOptions {
  return { ...(o.backend !== undefined ? { backend: o.backend as BackendChoice } : {}), ...(o.workers !== undefined ? { workers: o.workers } : {}) };
}

/** Typed errors that say the work failed, not that the input was bad: exit 1, not 2. */
const RUNTIME_FAILURES: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['BACKEND_FAILURE', 'WORKER_DIED', 'DISPOSED']);

/** `--json` among the options (before a `--`). */
export function wantsJson(argv: readonly string[]): boolean {
  for (const arg of argv) {
    if (arg === '--') return false;
    if (arg === '--json') return true;
  }
  return false;
}

/** An error as the JSON a `--json` caller parses (stdout), besides the message on stderr. */
export function jsonError(command: string, exitCode: number, code: string, message: string, extra: Record<string, unknown> = {}): void {
  process.stdout.write(`${JSON.stringify({ command, ok: false, exitCode, error: { code, message, ...extra } }, null, 2)}\n`);
}

/** An error from a system call (ENOENT, EACCES, ENOTDIR, ...), as Node's fs raises them. */
function isSystemError(err: unknown): err is Error & { code: string; syscall: string } {
  return err instanceof Error && typeof (err as { code?: unknown }).code === 'string' && typeof (err as { syscall?: unknown }).syscall === 'string';
}

/**
 * Runs a command and turns what it throws into an exit code: 2 for bad usage or bad input (a
 * SparseMlaError, or a file system error on a path the user gave), 1 for a failure while running
 * (worker died, backend failure, internal error).
 * The message goes to stderr; with `--json` the error also goes to stdout as JSON.
 */
export async function runCliCommand(name: string, command: CliCommand, argv: string[]): Promise<number> {
  const json = wantsJson(argv);
  try {
    return await command.run(argv);
  } catch (err) {
    if (err instanceof SparseMlaError) {
      // a failure while running (a worker died, the backend failed) is not the caller's input
      const exitCode = RUNTIME_FAILURES.has(err.code) ? 1 : 2;
      if (json) jsonError(name, exitCode, err.code, err.message, err.argument !== undefined ? { argument: err.argument } : {});
      process.stderr.write(`sparse-mla ${name}: ${err.message} [${err.code}]\n`);
      return exitCode;
    }
    if (isSystemError(err)) {
      // a file or path the command was given (missing, unwritable, not a directory, ...)
      if (json) jsonError(name, 2, err.code, err.message);
      process.stderr.write(`sparse-mla ${name}: ${err.message} [${err.code}]\n`);
      return 2;
    }
    if (json) jsonError(name, 1, 'INTERNAL_ERROR', err instanceof Error ? err.message : String(err));
    process.stderr.write(`sparse-mla ${name}: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    return 1;
  }
}
