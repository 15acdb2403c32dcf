/**
 * The backend registry: backends as data, tried in priority order under `auto` (SPEC §8). The
 * native addon will plug in by replacing the cuda/cpu entries in native.ts; nothing here changes.
 * Probing never throws, so importing the library works whatever is missing.
 */
import { SparseMlaError, fail } from '../errors.js';
import { describe } from '../tensor.js';
import type { BackendChoice, BackendName } from '../types.js';
import type { Backend, BackendCreateOptions, BackendEntry, BackendProbe } from './backend.js';
import { cpuBackendEntry, cudaBackendEntry } from './native.js';
import { wasmBackendEntry } from './wasm/wasm_backend.js';

export const BACKENDS: readonly BackendEntry[] = [cudaBackendEntry, cpuBackendEntry, wasmBackendEntry].sort((a, b) => a.priority - b.priority);

export const BACKEND_ENV = 'SPARSE_MLA_BACKEND';
const CHOICES: readonly BackendChoice[] = ['auto', 'cuda', 'cpu', 'wasm'];

export interface BackendInfo extends BackendProbe {
  name: BackendName;
  priority: number;
}

/** Every registered backend with its availability, reason and details (for `sparse-mla info`). */
export async function listBackends(): Promise<BackendInfo[]> {
  return Promise.all(
    BACKENDS.map(async (b) => {
      let p: BackendProbe;
      try {
        p = await b.probe();
      } catch (e) {
        p = { available: false, reason: `probe failed: ${(e as Error).message}` };
      }
      return { name: b.name, priority: b.priority, ...p };
    }),
  );
}

/**
 * The option if given, else SPARSE_MLA_BACKEND, else auto; anything else is INVALID_VALUE. (`env`
 * is typed without the NodeJS namespace: this file's .d.ts is part of the package's public types,
 * which must compile for consumers without @types/node.)
 */
export function resolveBackendChoice(option: unknown, env: Readonly<Record<string, string | undefined>> = process.env): BackendChoice {
  if (option !== undefined) {
    if (!CHOICES.includes(option as BackendChoice)) fail('INVALID_VALUE', 'backend', CHOICES.map((c) => `"${c}"`).join(' | '), describe(option));
    return option as BackendChoice;
  }
  const fromEnv = env[BACKEND_ENV];
  if (fromEnv === undefined || fromEnv === '') return 'auto';
  const v = fromEnv.trim().toLowerCase();
  if (!CHOICES.includes(v as BackendChoice)) fail('INVALID_VALUE', BACKEND_ENV, CHOICES.join(' | '), JSON.stringify(fromEnv));
  return v as BackendChoice;
}

/** Creates the chosen backend; under auto the first available one by priority. */
export async function createBackend(choice: BackendChoice, options: BackendCreateOptions): Promise<Backend> {
  if (choice !== 'auto') {
    const entry = BACKENDS.find((b) => b.name === choice)!;
    const p = await entry.probe({ ...(options.device === undefined ? {} : { device: options.device }) });
    if (!p.available) throw new SparseMlaError('BACKEND_UNAVAILABLE', `backend "${choice}" is unavailable — ${p.reason ?? 'no reason given'}`, 'backend');
    return entry.create(options);
  }
  const reasons: string[] = [];
  for (const entry of BACKENDS) {
    const p = await entry.probe({ ...(options.device === undefined ? {} : { device: options.device }) });
    if (!p.available) {
      reasons.push(`${entry.name}: ${p.reason ?? 'unavailable'}`);
      continue;
    }
    return entry.create(options);
  }
  throw new SparseMlaError('BACKEND_UNAVAILABLE', `no backend is available — ${reasons.join('; ')}`, 'backend');
}
