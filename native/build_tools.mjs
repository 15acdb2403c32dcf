// Builds and checks the addon: used by the install script (a source build) and by the packing
// step (the prebuilt addons). Configure runs every time with explicit options (a cached
// SMLA_WITH_CUDA=OFF must not stick), then only the addon target is built (incremental).
import { spawn, spawnSync } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { addonSourceFingerprint } from './addon_locate.mjs';

/** Whether `cmd args` runs and exits 0 (a tool is there). */
export function runs(cmd, args = ['--version']) {
  const r = spawnSync(cmd, args, { stdio: 'ignore', timeout: 30_000 });
  return r.status === 0;
}

/**
 * What a source build needs: CMake, a C++ compiler, and the cmake-js and node-addon-api packages
 * (optional peer dependencies of the package, dev dependencies of a checkout).
 * { ok: true, cmakeJs } or { ok: false, why } naming the first thing missing.
 */
export function findBuildTools(root, env = process.env) {
  const cmake = env.CMAKE || 'cmake';
  if (!runs(cmake)) return { ok: false, why: `CMake not found (\`${cmake} --version\` did not run; PATH=${env.PATH ?? ''})` };
  // cmake-js takes g++ or clang++ from PATH, or the compilers it is given (CC and CXX both set)
  const given = env.CXX && env.CC && runs(env.CXX) ? { cc: env.CC, cxx: env.CXX } : null;
  const cxx = given?.cxx ?? ['g++', 'clang++'].find((c) => runs(c));
  if (!cxx) return { ok: false, why: 'no C++ compiler found (g++ or clang++ on PATH, or CC and CXX set)' };
  const req = createRequire(join(root, 'package.json'));
  const missing = ['cmake-js/package.json', 'node-addon-api/package.json'].filter((m) => {
    try {
      req.resolve(m);
      return false;
    } catch {
      return true;
    }
  });
  if (missing.length) {
    const names = missing.map((m) => m.split('/')[0]);
    return { ok: false, why: `the package${names.length > 1 ? 's' : ''} ${names.join(' and ')} ${names.length > 1 ? 'are' : 'is'} not installed (\`npm install ${names.join(' ')}\`)` };
  }
  return { ok: true, cmakeJs: join(dirname(req.resolve('cmake-js/package.json')), 'bin', 'cmake-js'), cxx, compilers: given };
}

/**
 * A cross compiler pair on PATH (`<prefix>gcc`, `<prefix>g++`, e.g. prefix 'aarch64-linux-gnu-'):
 * { ok: true, cc, cxx } or { ok: false, why }.
 */
export function findCrossCompilers(prefix) {
  const cc = `${prefix}gcc`;
  const cxx = `${prefix}g++`;
  const missing = [cc, cxx].filter((c) => !runs(c));
  return missing.length ? { ok: false, why: `${missing.join(' and ')} not found on PATH` } : { ok: true, cc, cxx };
}

const compareVersions = (a, b) => a.localeCompare(b, 'en', { numeric: true });

/** A version list's newest entry ('2.34' > '2.17'; nulls skipped), or null when there is none. */
export function newestVersion(versions) {
  return versions.filter(Boolean).sort(compareVersions).at(-1) ?? null;
}

/** Whether version a is newer than b (false when either is unknown). */
export function newerVersion(a, b) {
  return a != null && b != null && compareVersions(a, b) > 0;
}

/**
 * What the dynamic loader will see in a shared object, read with readelf (which reads every ELF
 * machine, so a cross-built addon is inspected on the build machine): { ok: true, machine ('AArch64',
 * 'Advanced Micro Devices X86-64'), elfClass, type, needed (DT_NEEDED libraries), glibc / glibcxx
 * (the newest GLIBC_ / GLIBCXX_ symbol versions it needs), exportsNapiInit } or { ok: false, why }.
 */
export function inspectElf(file, readelf = 'readelf') {
  const run = (args) => spawnSync(readelf, [...args, '-W', file], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const header = run(['-h']);
  if (header.error || header.status !== 0) return { ok: false, why: `\`${readelf} -h\` failed: ${header.error?.message ?? header.stderr.trim().slice(0, 200)}` };
  const field = (name) => header.stdout.match(new RegExp(`^\\s*${name}:\\s*(.+)$`, 'm'))?.[1].trim() ?? null;
  const dynamic = run(['-d']).stdout ?? '';
  const versions = run(['-V']).stdout ?? '';
  const symbols = run(['--dyn-syms']).stdout ?? '';
  const needVersions = (prefix) => [...versions.matchAll(new RegExp(`Name: ${prefix}_([0-9.]+)\\b`, 'g'))].map((m) => m[1]);
  return {
    ok: true,
    machine: field('Machine'),
    elfClass: field('Class'),
    type: field('Type')?.split(' ')[0] ?? null,
    needed: [...dynamic.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]),
    glibc: newestVersion(needVersions('GLIBC')),
    glibcxx: newestVersion(needVersions('GLIBCXX')),
    // the entry point node looks up in a Node-API module, defined (not UND) and global
    exportsNapiInit: symbols.split('\n').some((l) => /\bGLOBAL\b/.test(l) && !/\bUND\b/.test(l) && /\snapi_register_module_v1$/.test(l)),
  };
}

/** Up to `max` lines of a build log that say what failed, each cut to 240 characters. */
export function logExcerpt(logPath, max = 4) {
  let text;
  try {
    text = readFileSync(logPath, 'utf8');
  } catch {
    return [];
  }
  const lines = text.split('\n').map((l) => l.trimEnd());
  const picked = lines.filter((l) => /\berror\b|CMake Error|FAILED:|fatal|not found/i.test(l) && !/^--\s/.test(l));
  const chosen = (picked.length ? picked : lines.filter((l) => l.trim()).slice(-max)).slice(0, max);
  return chosen.map((l) => (l.length > 240 ? `${l.slice(0, 237)}...` : l));
}

/**
 * Configure + build sparse_mla_native into outDir/Release (`defines`: more CMake cache entries, e.g.
 * CMAKE_SYSTEM_NAME / CMAKE_SYSTEM_PROCESSOR for a cross build). Resolves { ok, problem, seconds }:
 * problem is null on success, else 'configure failed' / 'build failed' / 'stopped after N s' / ...
 */
export async function buildAddon({ root, cmakeJs, compilers = null, outDir, cpuArch, withCuda = 'AUTO', portable = false, defines = {}, logPath, verbose = false, timeoutS = 1200, parallel }) {
  const jobs = String(parallel ?? os.availableParallelism?.() ?? os.cpus().length);
  const common = ['--directory', root, '--out', outDir, '--log-level', 'warn', ...(compilers ? ['--cc', compilers.cc, '--cxx', compilers.cxx] : [])];
  const configure = [cmakeJs, 'configure', ...common, `--CDSMLA_WITH_CUDA=${withCuda}`, `--CDSMLA_CPU_ARCH=${cpuArch}`, `--CDSMLA_PORTABLE_RUNTIME=${portable ? 'ON' : 'OFF'}`, `--CDSMLA_SOURCE_FINGERPRINT=${addonSourceFingerprint(root) ?? ''}`, ...Object.entries(defines).map(([k, v]) => `--CD${k}=${v}`)];
  const build = [cmakeJs, 'build', ...common, '--target', 'sparse_mla_native', '--parallel', jobs];
  mkdirSync(outDir, { recursive: true });
  const log = verbose ? null : createWriteStream(logPath);
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
        resolve(timedOut ? `stopped after ${timeoutS} s (SPARSE_MLA_NATIVE_TIMEOUT_S)` : code === 0 ? null : `${args[1]} failed`);
      });
    });

  const problem = (await step(configure)) ?? (await step(build));
  if (log) await new Promise((resolve) => log.end(resolve));
  return { ok: problem === null, problem, seconds: (Date.now() - started) / 1000, addon: join(outDir, 'Release', 'sparse_mla_native.node') };
}

/**
 * Loads an addon in a child process (a missing glibc symbol, an illegal instruction or a crash
 * cannot take this process down) and returns { ok: true, info } with its build description, or
 * { ok: false, why }.
 */
export function probeAddon(path, timeoutMs = 60_000) {
  const script =
    'const m = require(process.argv[1]);' +
    'process.stdout.write(JSON.stringify({ abiVersion: m.abiVersion, build: m.build, cuda: m.cuda && m.cuda.built ? { built: true, arch: m.cuda.arch, compilerVersion: m.cuda.compilerVersion, kernels: m.cuda.kernels } : { built: false } }));';
  const r = spawnSync(process.execPath, ['-e', script, path], { encoding: 'utf8', timeout: timeoutMs });
  if (r.error) return { ok: false, why: `could not run node to load it (${r.error.message})` };
  if (r.status !== 0) {
    const msg = (r.stderr || '').split('\n').find((l) => /Error|error:/.test(l)) ?? (r.signal ? `killed by ${r.signal}` : `exit ${r.status}`);
    return { ok: false, why: msg.trim().slice(0, 300) };
  }
  try {
    return { ok: true, info: JSON.parse(r.stdout) };
  } catch {
    return { ok: false, why: `unexpected output: ${r.stdout.slice(0, 200)}` };
  }
}
