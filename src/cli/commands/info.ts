/**
 * `sparse-mla info`: which backends this machine can run and, for each missing one, why (and how
 * to get it); the WASM pool's details; the machine (Node, cores, CPU).
 */
import { availableParallelism, cpus, totalmem } from 'node:os';
import { SparseMlaError } from '../../errors.js';
import { listBackends } from '../../index.js';
import { formatOptions, parseArgs, type OptionTable } from '../args.js';
import type { CliCommand } from '../command.js';

const OPTIONS = {
  json: { type: 'boolean', help: 'print the information as JSON' },
} as const satisfies OptionTable;

const USAGE = `Usage: sparse-mla info [options]

Show which backends are available on this machine (and why the others are not), the backend
'auto' picks, WASM details (workers, SIMD) and the machine.

Options:
${formatOptions(OPTIONS)}
`;

/** A module using one SIMD128 instruction (v128.const): validates only where V8 has SIMD128. */
const SIMD_PROBE = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
  0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // type: () -> v128
  0x03, 0x02, 0x01, 0x00, // one function of type 0
  0x0a, 0x16, 0x01, 0x14, 0x00, 0xfd, 0x0c, ...new Array<number>(16).fill(0), 0x0b, // body: v128.const 0
]);

/** lib ES2022 has no WebAssembly typings; this is the one call info needs. */
function wasmValidate(bytes: Uint8Array): boolean {
  const wasm = (globalThis as unknown as { WebAssembly?: { validate(b: Uint8Array): boolean } }).WebAssembly;
  return wasm ? wasm.validate(bytes) : false;
}

interface BackendRow {
  name: string;
  available: boolean;
  priority?: number;
  reason?: string;
  details?: Record<string, unknown>;
}

export async function infoCommand(argv: string[]): Promise<number> {
  const { options: o, positionals } = parseArgs(argv, OPTIONS);
  if (positionals.length > 0) throw new SparseMlaError('INVALID_VALUE', `info: unexpected argument '${positionals[0]}'`, 'argv');

  const backends = ((await listBackends()) as readonly BackendRow[]).map((b) => ({ ...b }));
  const env = process.env.SPARSE_MLA_BACKEND;
  const byPriority = [...backends].sort((a, b) => (a.priority ?? 0) - (b.priority ?? 0));
  const auto = byPriority.find((b) => b.available)?.name ?? null;
  const machine = {
    node: process.version,
    v8: process.versions.v8,
    platform: `${process.platform}-${process.arch}`,
    cpu: cpus()[0]?.model?.trim() ?? 'unknown',
    cores: availableParallelism(),
    memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    wasmSimd128: wasmValidate(SIMD_PROBE),
    defaultWasmWorkers: availableParallelism(),
  };

  if (o.json) {
    process.stdout.write(`${JSON.stringify({ backends, auto, env: env ?? null, machine }, null, 2)}\n`);
    return 0;
  }

  const detailText = (d: Record<string, unknown> | undefined): string =>
    d ? Object.entries(d).map(([k, v]) => `${k}=${String(v)}`).join(', ') : '';
  const nameWidth = Math.max(...byPriority.map((b) => b.name.length));
  const lines = [
    'Backends (auto tries them in this order):',
    ...byPriority.map((b) => {
      const why = [b.reason, detailText(b.details)].filter((t) => t).join('; ') || '-';
      return `  ${b.name.padEnd(nameWidth)}  ${(b.available ? 'available' : 'missing').padEnd(9)}  ${why}`;
    }),
    '',
    `auto picks: ${auto ?? 'none (no backend is available)'}`,
    `SPARSE_MLA_BACKEND: ${env === undefined ? '(unset)' : env}`,
    '',
    'Machine:',
    `  Node ${machine.node} (V8 ${machine.v8}), ${machine.platform}`,
    `  CPU ${machine.cpu}, ${machine.cores} cores, ${machine.memoryGiB} GiB`,
    `  WebAssembly SIMD128: ${machine.wasmSimd128 ? 'yes' : 'no'}; WASM pool default: ${machine.defaultWasmWorkers} workers`,
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
  return 0;
}

export const command: CliCommand = {
  name: 'info',
  summary: 'show available backends (and why others are missing), WASM details and the machine',
  usage: USAGE,
  run: infoCommand,
};
