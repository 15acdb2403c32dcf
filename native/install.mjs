#!/usr/bin/env node
// `npm install` hook: builds the native addon (build/addon/Release/sparse_mla_native.node) with
// cmake-js when CMake and a C++ compiler exist. It never fails the install: a skip or a failed build
// prints one line and the library runs on its WASM backend.
//   SPARSE_MLA_SKIP_NATIVE=1            skip the build
//   SPARSE_MLA_NATIVE_TIMEOUT_S=<s>     give up after s seconds (default 1200; the CUDA kernels take minutes)
//   SPARSE_MLA_NATIVE_VERBOSE=1         stream the build output instead of logging it
//   SPARSE_MLA_WITH_CUDA=ON|OFF|AUTO    build the CUDA kernels (default AUTO: when nvcc is found)
//   SPARSE_MLA_CPU_ARCH=<march>         the core's -march (default native: this machine)
import { spawn, spawnSync } from 'node:child_process';
import { createWriteStream, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'build', 'addon');
const logPath = join(outDir, 'build.log');
const env = process.env;
const say = (line) => console.log(`sparse-mla: ${line}`);
const rel = (p) => relative(process.cwd(), p) || '.';

function has(cmd, args = ['--version']) {
  const r = spawnSync(cmd, args, { stdio: 'ignore', timeout: 30_000 });
  return r.status === 0;
}

function main() {
  if (['1', 'true', 'yes'].includes((env.SPARSE_MLA_SKIP_NATIVE ?? '').toLowerCase())) {
    say('native addon skipped (SPARSE_MLA_SKIP_NATIVE is set); using the wasm backend');
    return;
  }
  if (!has(env.CMAKE ?? 'cmake')) {
    say('native addon not built: cmake not found (install CMake and a C++ compiler, then `npm rebuild sparse-mla`); using the wasm backend');
    return;
  }
  const cxx = [env.CXX, 'c++', 'g++', 'clang++'].filter(Boolean).find((c) => has(c));
  if (!cxx) {
    say('native addon not built: no C++ compiler found (install g++ or clang++, then `npm rebuild sparse-mla`); using the wasm backend');
    return;
  }
  let cmakeJs;
  try {
    cmakeJs = createRequire(join(root, 'package.json')).resolve('cmake-js/bin/cmake-js');
  } catch {
    say('native addon not built: the cmake-js package is missing (reinstall sparse-mla); using the wasm backend');
    return;
  }

  const timeoutS = Number(env.SPARSE_MLA_NATIVE_TIMEOUT_S ?? 1200);
  const common = ['--directory', root, '--out', outDir, '--log-level', 'warn'];
  // Configure every time with explicit options (a cached SMLA_WITH_CUDA=OFF must not stick), then
  // build only the addon target (incremental).
  const configure = [cmakeJs, 'configure', ...common, `--CDSMLA_WITH_CUDA=${env.SPARSE_MLA_WITH_CUDA || 'AUTO'}`, `--CDSMLA_CPU_ARCH=${env.SPARSE_MLA_CPU_ARCH ?? 'native'}`];
  const build = [cmakeJs, 'build', ...common, '--target', 'sparse_mla_native', '--parallel', String(os.availableParallelism?.() ?? os.cpus().length)];
  const verbose = env.SPARSE_MLA_NATIVE_VERBOSE === '1';
  mkdirSync(outDir, { recursive: true });
  const log = verbose ? null : createWriteStream(logPath);
  const where = verbose ? 'output above' : `log: ${rel(logPath)}`;
  const started = Date.now();
  const deadline = started + timeoutS * 1000;

  const step = (args) =>
    new Promise((resolve) => {
      // Its own process group, so a timeout stops the compilers under cmake-js too.
      const child = spawn(process.execPath, args, { cwd: root, detached: process.platform !== 'win32', stdio: verbose ? 'inherit' : ['ignore', 'pipe', 'pipe'] });
      child.stdout?.pipe(log, { end: false });
      child.stderr?.pipe(log, { end: false });
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        try {
          process.kill(process.platform === 'win32' ? child.pid : -child.pid, 'SIGTERM');
        } catch {
          child.kill('SIGTERM');
        }
      }, Math.max(0, deadline - Date.now()));
      child.on('error', (e) => {
        clearTimeout(timer);
        resolve(`could not run cmake-js (${e.message})`);
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve(timedOut ? `stopped after ${timeoutS} s` : code === 0 ? null : `${args[1]} failed`);
      });
    });

  (async () => {
    const problem = (await step(configure)) ?? (await step(build));
    log?.end();
    const secs = ((Date.now() - started) / 1000).toFixed(0);
    if (problem) say(`native addon build ${problem} (${where}); using the wasm backend`);
    else say(`built the native addon in ${secs} s → ${rel(join(outDir, 'Release', 'sparse_mla_native.node'))} (${where})`);
  })();
}

main();
