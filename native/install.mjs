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
  const args = [cmakeJs, 'build', '--directory', root, '--out', outDir, '--target', 'sparse_mla_native', '--parallel', String(os.availableParallelism?.() ?? os.cpus().length), '--log-level', 'warn'];
  if (env.SPARSE_MLA_WITH_CUDA) args.push(`--CDSMLA_WITH_CUDA=${env.SPARSE_MLA_WITH_CUDA}`);
  if (env.SPARSE_MLA_CPU_ARCH !== undefined) args.push(`--CDSMLA_CPU_ARCH=${env.SPARSE_MLA_CPU_ARCH}`);
  const verbose = env.SPARSE_MLA_NATIVE_VERBOSE === '1';
  mkdirSync(outDir, { recursive: true });
  const log = verbose ? null : createWriteStream(logPath);
  const started = Date.now();
  const child = spawn(process.execPath, args, { cwd: root, stdio: verbose ? 'inherit' : ['ignore', 'pipe', 'pipe'] });
  child.stdout?.pipe(log, { end: false });
  child.stderr?.pipe(log, { end: false });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGTERM');
  }, timeoutS * 1000);
  child.on('error', (e) => {
    clearTimeout(timer);
    say(`native addon not built: could not run cmake-js (${e.message}); using the wasm backend`);
  });
  child.on('close', (code) => {
    clearTimeout(timer);
    log?.end();
    const secs = ((Date.now() - started) / 1000).toFixed(0);
    const where = verbose ? 'output above' : `log: ${rel(logPath)}`;
    if (timedOut) say(`native addon build stopped after ${timeoutS} s (${where}); using the wasm backend`);
    else if (code !== 0) say(`native addon build failed (${where}); using the wasm backend`);
    else say(`built the native addon in ${secs} s → ${rel(join(outDir, 'Release', 'sparse_mla_native.node'))} (${where})`);
  });
}

main();
