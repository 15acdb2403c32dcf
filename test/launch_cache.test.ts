/**
 * native/cuda/launch_cache.cuh, the launchers' per-device cache of SM counts and kernel
 * attributes, checked on the host (test/cpp/launch_cache_check.cpp: stand-in queries, no GPU):
 * each device gets its own value, asked once; a failed query is not kept; devices outside the
 * table are asked every time; concurrent first use is safe. Needs a C++ compiler and the CUDA
 * headers (cuda_runtime.h); skipped without them.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, test } from 'vitest';

const root = fileURLToPath(new URL('..', import.meta.url));

/** The CUDA include directory: CUDA_PATH / CUDA_HOME, next to the nvcc on PATH, or /usr/local/cuda. */
function cudaInclude(): string | null {
  const candidates = [process.env.CUDA_PATH, process.env.CUDA_HOME].filter((d): d is string => !!d).map((d) => join(d, 'include'));
  const nvcc = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' }).stdout.trim();
  if (nvcc) candidates.push(join(dirname(dirname(nvcc)), 'include'));
  candidates.push('/usr/local/cuda/include');
  return candidates.find((d) => existsSync(join(d, 'cuda_runtime.h'))) ?? null;
}

const include = cudaInclude();
const cxx = process.env.CXX || 'c++';
const haveCxx = spawnSync(cxx, ['--version']).status === 0;
if (!include || !haveCxx) console.log(`[skip] launch_cache.test: needs a C++ compiler (${cxx}) and the CUDA headers (cuda_runtime.h)`);

test.skipIf(!include || !haveCxx)('the launch cache keeps one value per device, asked once', () => {
  const dir = mkdtempSync(join(os.tmpdir(), 'smla-launch-cache-'));
  try {
    const exe = join(dir, 'launch_cache_check');
    const build = spawnSync(cxx, ['-std=c++17', '-O1', '-Wall', '-Wextra', '-pthread', `-I${join(root, 'native/cuda')}`, `-I${include}`, join(root, 'test/cpp/launch_cache_check.cpp'), '-o', exe], { encoding: 'utf8' });
    expect(build.status, build.stderr).toBe(0);
    const run = spawnSync(exe, { encoding: 'utf8' });
    expect(run.stdout).toContain('launch_cache: all checks passed');
    expect(run.status, run.stdout).toBe(0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
