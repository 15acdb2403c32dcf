import { existsSync } from 'node:fs';
import { defineConfig } from 'vitest/config';

// The op suites run once per backend under test: on wasm always, on the native `cpu` backend when
// the addon is built, and on `cuda` when asked (SPARSE_MLA_TEST_CUDA=1, on a GPU host:
// `SPARSE_MLA_TEST_CUDA=1 npx vitest run --project cuda`). See test/helpers/backends.ts.
const OP_SUITES = ['test/sparse_prefill.test.ts', 'test/paged_sparse_attention.test.ts', 'test/kv_cache.test.ts', 'test/formats.test.ts', 'test/sharded_layer.test.ts'];
const addonBuilt = existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || 'build/addon/Release/sparse_mla_native.node');

export default defineConfig({
  test: {
    // Tests import the built package (dist/), whose WASM backend spawns worker_threads from
    // compiled files; child processes give each test file a clean process to spawn them from.
    pool: 'forks',
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The machine has few cores and every engine starts a worker pool; run files one at a time so
    // pools do not oversubscribe the CPU and make timings (and timeouts) erratic.
    fileParallelism: false,
    projects: [
      { extends: true, test: { name: 'wasm', include: ['test/**/*.test.ts'], env: { SPARSE_MLA_TEST_BACKEND: 'wasm' } } },
      ...(addonBuilt ? [{ extends: true, test: { name: 'cpu', include: OP_SUITES, env: { SPARSE_MLA_TEST_BACKEND: 'cpu' } } }] : []),
      ...(process.env.SPARSE_MLA_TEST_CUDA === '1' ? [{ extends: true, test: { name: 'cuda', include: OP_SUITES, env: { SPARSE_MLA_TEST_BACKEND: 'cuda' } } }] : []),
    ],
  },
});
