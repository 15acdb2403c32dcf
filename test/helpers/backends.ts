/**
 * Which backend a suite runs on. vitest.config.ts runs the op suites once per backend under test
 * (project "wasm", and project "cpu" when the native addon is built), telling each run its backend
 * through SPARSE_MLA_TEST_BACKEND; a suite creates its engine with `{ backend: backendUnderTest() }`.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export type TestBackend = 'wasm' | 'cpu';
export const TEST_BACKEND_ENV = 'SPARSE_MLA_TEST_BACKEND';

/** The built addon, where the loader looks for it (src/backends/native/binding.ts). */
export const NATIVE_ADDON = fileURLToPath(new URL('../../build/addon/Release/sparse_mla_native.node', import.meta.url));

export function nativeAddonBuilt(): boolean {
  return existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON);
}

/** The backends the op suites run against on this machine. */
export function backendsUnderTest(): TestBackend[] {
  return nativeAddonBuilt() ? ['wasm', 'cpu'] : ['wasm'];
}

/** This run's backend (default wasm). */
export function backendUnderTest(): TestBackend {
  const v = process.env[TEST_BACKEND_ENV];
  if (v === undefined || v === '') return 'wasm';
  if (v !== 'wasm' && v !== 'cpu') throw new Error(`${TEST_BACKEND_ENV}: expected wasm | cpu, got ${JSON.stringify(v)}`);
  return v;
}
