/**
 * `sparse-mla info`: which backends this machine can run and, for each missing one, why (and how
 * to get it); the WASM pool's details; the machine (Node, cores, CPU).
 */
import { availableParallelism } from 'node:os';
import { listBackends } from '../../index.js';
import { loadNativeAddon, queryCudaDevices, type AddonOrigin, type CudaDeviceInfo, type InstallStatus } from '../../backends/native/binding.js';
import { INSTALL_STATUS_FILE } from '../../../native/addon_locate.mjs';
import { expectNoPositionals, formatOptions, parseArgs, type OptionTable } from '../args.js';
import { machineFacts, packageVersion, type CliCommand } from '../command.js';
import { formatTable, setReportWidth, writeFittedLines } from '../table.js';

const OPTIONS = {
  json: { type: 'boolean', help: 'print the information as JSON' },
  wide: { type: 'boolean', help: 'do not fit the report to 100 columns' },
} as const satisfies OptionTable;

const USAGE = `Usage: sparse-mla info [options]

Show which backends are available on this machine (and why the others are not), the backend
'auto' picks, the native addon (the package's prebuilt one or one built here, or why there is
none, with the install's record and log), WASM details and the machine.

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

/** The native addon as info reports it: what loaded (or why nothing did) and what the install did. */
export interface AddonReport {
  loaded: boolean;
  path: string;
  origin: AddonOrigin | null;
  level: string | null;
  cpuArch: string | null;
  simd: string | null;
  cuda: { built: boolean; arch?: string; nvcc?: string; why?: string };
  /** why no addon loaded */
  reason: string | null;
  installStatusFile: string;
  /** build/install-status.json as the install script wrote it; null when it did not run */
  install: InstallStatus | null;
}

export function addonReport(): AddonReport {
  const l = loadNativeAddon();
  const base = { installStatusFile: INSTALL_STATUS_FILE, install: l.install };
  if (!l.ok) return { loaded: false, path: l.path, origin: null, level: null, cpuArch: null, simd: null, cuda: { built: false }, reason: l.reason, ...base };
  const c = l.addon.cuda;
  return {
    loaded: true,
    path: l.path,
    origin: l.origin,
    level: l.level ?? null,
    cpuArch: l.addon.build.cpuArch,
    simd: l.addon.build.simd,
    cuda: c.built ? { built: true, arch: c.arch, nvcc: c.compilerVersion } : { built: false, why: l.cudaWhyNot },
    reason: null,
    ...base,
  };
}

/** One line on what the install did. */
function installSummary(s: InstallStatus): string {
  const when = s.time.replace('T', ' ').replace(/:\d\d\.\d+Z$/, ' UTC');
  const b = s.build;
  if (s.addon === 'built') return `${when}: built here in ${b?.seconds} s (${b?.why}; -march=${b?.cpuArch}, CUDA ${b?.withCuda})`;
  const what = s.addon === 'prebuilt' ? `chose the prebuilt addon (${s.cpuArch})` : 'set up no addon';
  const build = !b ? '' : b.ran ? `; the source build failed (${b.problem}), tried because ${b.why}` : `; no source build: ${b.why}`;
  return `${when}: ${what}${build}`;
}

function addonLines(a: AddonReport): string[] {
  const lines: string[] = [];
  if (a.loaded) {
    const from = a.origin === 'prebuilt' ? `the package's prebuilt ${process.platform}-${process.arch} addon` : a.origin === 'env' ? 'the file SPARSE_MLA_NATIVE_ADDON names' : 'built here from source';
    const cuda = a.cuda.built ? `CUDA ${a.cuda.arch} (nvcc ${a.cuda.nvcc})` : `no CUDA (${a.cuda.why})`;
    lines.push(`Native addon: ${from}; ${a.simd} core (-march=${a.cpuArch}), ${cuda}`, `  file     ${a.path}`);
  } else {
    lines.push(`Native addon: none loaded; the cpu and cuda backends are unavailable`, `  why      ${a.reason}`);
  }
  const s = a.install;
  if (s) {
    lines.push(`  install  ${installSummary(s)}`);
    const b = s.build;
    if (b?.log) lines.push(`  log      ${b.log}`);
    if (b?.result === 'failed') for (const e of b.excerpt ?? []) lines.push(`           ${e.trim()}`);
    lines.push(`  status   ${a.installStatusFile}`);
  } else if (!process.env.SPARSE_MLA_NATIVE_ADDON) {
    lines.push(`  install  the install script did not run (no ${a.installStatusFile})`);
  }
  return lines;
}

/** Every CUDA device the addon sees (index, name, SMs, memory, peer access to each other device). */
export function cudaDevices(): { devices: CudaDeviceInfo[]; error: string | null } {
  const l = loadNativeAddon();
  if (!l.ok || !l.addon.cuda.built) return { devices: [], error: null };
  const q = queryCudaDevices(l.addon)!;
  return { devices: q.devices, error: q.error };
}

function deviceLines(d: { devices: CudaDeviceInfo[]; error: string | null }): string[] {
  if (d.devices.length === 0) return [];
  const peers = (x: CudaDeviceInfo): string => {
    const others = x.peerAccess.map((can, j) => ({ can, j })).filter(({ j }) => j !== x.index);
    if (others.length === 0) return '-';
    const direct = others.filter((o) => o.can).map((o) => o.j);
    return direct.length === others.length ? 'all' : direct.length === 0 ? 'none (copies go through the host)' : direct.join(', ');
  };
  return [
    'CUDA devices (createEngine({ backend: "cuda", device }) or SPARSE_MLA_DEVICE):',
    formatTable(
      [['device', 'name', 'cc', 'SMs', 'memory', 'L2', 'peer access'], ...d.devices.map((x) => [String(x.index), x.name, x.computeCapability, String(x.multiProcessors), `${(x.memoryBytes / 2 ** 30).toFixed(1)} GiB`, `${(x.l2Bytes / 2 ** 20).toFixed(0)} MiB`, peers(x)])],
      ['right', 'left', 'left', 'right', 'right', 'right', 'left'],
    ),
    '',
  ];
}

export async function infoCommand(argv: string[]): Promise<number> {
  const { options: o, positionals } = parseArgs(argv, OPTIONS);
  expectNoPositionals('info', positionals);
  if (o.wide) setReportWidth(Infinity);

  const backends = ((await listBackends()) as readonly BackendRow[]).map((b) => ({ ...b }));
  const env = process.env.SPARSE_MLA_BACKEND;
  const byPriority = [...backends].sort((a, b) => (a.priority ?? 0) - (b.priority ?? 0));
  const auto = byPriority.find((b) => b.available)?.name ?? null;
  const addon = addonReport();
  const cuda = cudaDevices();
  const { node, platform, cpu, cores, memoryGiB } = machineFacts();
  const machine = {
    node,
    v8: process.versions.v8,
    platform,
    cpu,
    cores,
    memoryGiB,
    wasmSimd128: wasmValidate(SIMD_PROBE),
    defaultWasmWorkers: availableParallelism(),
  };

  if (o.json) {
    process.stdout.write(`${JSON.stringify({ command: 'info', ok: true, version: packageVersion(), backends, auto, env: env ?? null, addon, cudaDevices: cuda.devices, machine }, null, 2)}\n`);
    return 0;
  }

  // the addon's path and origin have their own section
  const detailText = (d: Record<string, unknown> | undefined): string =>
    d ? Object.entries(d).filter(([k]) => k !== 'addon' && k !== 'addonOrigin').map(([k, v]) => `${k} ${String(v)}`).join(', ') : '';
  const table = formatTable(
    [
      ['backend', 'status', 'why / details'],
      ...byPriority.map((b) => [b.name, b.available ? 'available' : 'missing', [b.reason, detailText(b.details)].filter((t) => t).join('; ') || '-']),
    ],
    ['left', 'left', 'left'],
    { wrap: [2] },
  );
  const lines = [
    `sparse-mla ${packageVersion()} on ${machine.platform}; auto picks: ${auto ?? 'nothing (no backend is available)'} (SPARSE_MLA_BACKEND ${env === undefined ? 'unset' : `= ${env}`})`,
    '',
    'Backends, in the order auto tries them:',
    table,
    '',
    ...addonLines(addon),
    '',
    ...deviceLines(cuda),
    'Machine:',
    `  Node ${machine.node} (V8 ${machine.v8}), ${machine.platform}`,
    `  CPU ${machine.cpu}, ${machine.cores} cores, ${machine.memoryGiB} GiB`,
    `  WebAssembly SIMD128: ${machine.wasmSimd128 ? 'yes' : 'no'}; WASM pool default: ${machine.defaultWasmWorkers} workers`,
  ];
  writeFittedLines(lines);
  return 0;
}

export const command: CliCommand = {
  name: 'info',
  summary: 'show available backends (and why others are missing), WASM details and the machine',
  usage: USAGE,
  options: OPTIONS,
  run: infoCommand,
};
