/**
 * Which backend a suite runs on. vitest.config.ts runs the op suites once per backend under test
 * (project "wasm"; project "cpu" when the native addon is built; project "cuda" on a GPU host when
 * SPARSE_MLA_TEST_CUDA=1), telling each run its backend through SPARSE_MLA_TEST_BACKEND; a suite
 * creates its engine with `{ backend: backendUnderTest() }`.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export type TestBackend = 'wasm' | 'cpu' | 'cuda';
export const TEST_BACKEND_ENV = 'SPARSE_MLA_TEST_BACKEND';

/** The built addon, where the loader looks for it (src/backends/native/binding.ts). */
export const NATIVE_ADDON = fileURLToPath(new URL('../../build/addon/Release/sparse_mla_native.node', import.meta.url));

export function nativeAddonBuilt(): boolean {
  return existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON);
}

/** This run's backend (default wasm). */
export function backendUnderTest(): TestBackend {
  const v = process.env[TEST_BACKEND_ENV];
  if (v === undefined || v === '') return 'wasm';
  if (v !== 'wasm' && v !== 'cpu' && v !== 'cuda') throw new Error(`${TEST_BACKEND_ENV}: expected wasm | cpu | cuda, got ${JSON.stringify(v)}`);
  return v;
}
