import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Tests import the built package (dist/), whose WASM backend spawns worker_threads from
    // compiled files; child processes give each test file a clean process to spawn them from.
    pool: 'forks',
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The machine has few cores and every engine starts a worker pool; run files one at a time so
    // pools do not oversubscribe the CPU and make timings (and timeouts) erratic.
    fileParallelism: false,
  },
});
