// Builds and checks the addon: used by the install script (a source build) and by the packing
// step (the prebuilt addons). Configure runs every time with explicit options (a cached
// SMLA_WITH_CUDA=OFF must not stick), then only the addon target is built (incremental).
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream, mkdirSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
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
 * CMAKE_SYSTEM_NAME / CMAKE_SYSTEM_PROCESSOR for a cross build), then scrubBuildTree the addon.
 * Resolves { ok, problem, seconds, addon, scrub }: problem is null on success, else 'configure
 * failed' / 'build failed' / 'stopped after N s' / ...; scrub is scrubBuildTree's answer (null when
 * the build failed).
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
  const addon = join(outDir, 'Release', 'sparse_mla_native.node');
  let scrub = null;
  if (problem === null) {
    try {
      scrub = scrubBuildTree(addon, root);
    } catch (e) {
      scrub = { ok: false, why: `${addon}: ${e.message}`, left: [] };
    }
  }
  return { ok: problem === null, problem, seconds: (Date.now() - started) / 1000, addon, scrub };
}

// nvcc's -lineinfo (profilers map SASS to source by it) writes into each cubin of an addon's
// .nv_fatbin the paths it was given the sources by, absolute ones (cicc joins its working directory
// to every file name, however relative the command line's, and no nvcc option maps them), and, in
// the line tables, each source's mtime and size, which differ from checkout to checkout. On Linux
// native/CMakeLists.txt gives nvcc the sources as NVCC_TREE/native/cuda/... and
// NVCC_TREE/cpp/include/..., one string wherever the tree is; elsewhere, or where that did not reach
// them, as <root>/native/cuda/... scrubBuildTree rewrites both in the built addon, each at its own
// byte length so that nothing moves:
//   <root>/native/cuda, NVCC_TREE/native/cuda  ->  ./././././native/cuda   (relative, as long as
//                                                  the prefix it replaces)
//   mtime, size                                ->  0 (in as many ULEB128 bytes: 0x80 ... 0x00)
// With NVCC_TREE the rewritten names are as long in every build tree, so builds of one commit at
// different paths are byte-identical.
export const NVCC_TREE = '/proc/self/cwd/nvcc-tree';
const FATBIN_MAGIC = 0xba55ed50;
const FATBIN_ELF = 2;
const FATBIN_COMPRESSED = 0x2000n;

/** An ELF64 little-endian file's sections ({ name, offset, size }), or null for anything else. */
function elf64Sections(bytes) {
  if (bytes.length < 64 || bytes.readUInt32BE(0) !== 0x7f454c46 || bytes[4] !== 2 || bytes[5] !== 1) return null;
  const shoff = Number(bytes.readBigUInt64LE(0x28));
  const [entsize, count, names] = [bytes.readUInt16LE(0x3a), bytes.readUInt16LE(0x3c), bytes.readUInt16LE(0x3e)];
  if (shoff + entsize * count > bytes.length || names >= count) return null;
  const header = (i) => shoff + i * entsize;
  const strings = Number(bytes.readBigUInt64LE(header(names) + 24));
  return Array.from({ length: count }, (_, i) => {
    const at = strings + bytes.readUInt32LE(header(i));
    return { name: bytes.toString('latin1', at, bytes.indexOf(0, at)), offset: Number(bytes.readBigUInt64LE(header(i) + 24)), size: Number(bytes.readBigUInt64LE(header(i) + 32)) };
  });
}

/** A relative path prefix of exactly n (>= 2) characters that ends in '/': './././' or '././/'. */
const relativePrefix = (n) => (n % 2 === 0 ? './'.repeat(n / 2) : `${'./'.repeat((n - 3) / 2)}.//`);

/** Sets the ULEB128 at `at` to 0 in as many bytes; returns [the offset after it, whether it was not 0]. */
function zeroUleb(bytes, at) {
  let end = at;
  while (bytes[end] & 0x80) end++;
  const wasSet = bytes.subarray(at, end + 1).some((b) => (b & 0x7f) !== 0);
  bytes.fill(0x80, at, end);
  bytes[end] = 0;
  return [end + 1, wasSet];
}

/** Zeroes the mtime and size of every file in a cubin's .debug_line (DWARF 2-4); returns how many were set, or a problem. */
function zeroLineStamps(cubin) {
  const line = elf64Sections(cubin)?.find((s) => s.name === '.debug_line');
  if (!line) return { stamps: 0 };
  const table = cubin.subarray(line.offset, line.offset + line.size);
  let stamps = 0;
  for (let unit = 0; unit + 10 <= table.length; ) {
    const length = table.readUInt32LE(unit);
    const version = table.readUInt16LE(unit + 4);
    if (length === 0xffffffff || version < 2 || version > 4) return { problem: `a DWARF ${length === 0xffffffff ? '64-bit' : `version ${version}`} line table` };
    const programStart = unit + 10 + table.readUInt32LE(unit + 6);
    const unknown = { problem: 'a line table header of an unknown layout' };
    if (programStart > unit + 4 + length || unit + 4 + length > table.length) return unknown;
    const header = table.subarray(0, programStart); // nothing below reads past it
    const afterString = (i) => (header.indexOf(0, i) < 0 ? header.length : header.indexOf(0, i) + 1);
    let at = unit + 10 + (version >= 4 ? 5 : 4); // minimum_instruction_length .. line_range
    at += header[at]; // opcode_base, then its opcode_base - 1 standard_opcode_lengths
    while (at < header.length && header[at] !== 0) at = afterString(at); // include_directories
    at++;
    while (at < header.length && header[at] !== 0) {
      at = afterString(at); // the name
      while (header[at] & 0x80) at++; // its directory index
      at++;
      for (let field = 0; field < 2 && at < header.length; field++) {
        const [next, wasSet] = zeroUleb(header, at);
        at = next;
        if (wasSet) stamps++;
      }
    }
    if (at + 1 > programStart) return unknown; // (ptxas pads it to programStart)
    unit += 4 + length;
  }
  return { stamps };
}

/**
 * The linker's build-id is a hash of what it wrote, mtimes included: it becomes the same hash of
 * the rewritten file (its own bytes taken as zeros), so that builds differing only in what was
 * rewritten stay byte-identical.
 */
function rehashBuildId(bytes, sections) {
  const note = sections.find((s) => s.name === '.note.gnu.build-id');
  if (!note || note.size < 16) return;
  const [nameSize, idSize] = [bytes.readUInt32LE(note.offset), bytes.readUInt32LE(note.offset + 4)];
  const at = note.offset + 12 + Math.ceil(nameSize / 4) * 4;
  if (idSize === 0 || at + idSize > note.offset + note.size) return;
  bytes.fill(0, at, at + idSize);
  createHash(idSize <= 20 ? 'sha1' : 'sha256').update(bytes).digest().copy(bytes, at, 0, idSize);
}

/**
 * Rewrites, in place, what nvcc leaves of the build machine in an addon's device code (above): the
 * paths under `root` (and its real path) and under NVCC_TREE in .nv_fatbin, and the line tables'
 * mtimes and sizes.
 * Returns { ok: true, paths, stamps } (how many it rewrote; a file without device code is left as
 * it is) or { ok: false, why }, and in either case `left`: where a path of `root` remains in the file.
 */
export function scrubBuildTree(file, root) {
  const bytes = readFileSync(file);
  let real = root;
  try {
    real = realpathSync(root);
  } catch {
    /* a root that is gone: its own spelling only */
  }
  const roots = [...new Set([root, real].map((r) => r.replace(/\/+$/, '')))].filter((r) => r.length >= 2);
  const left = () => roots.flatMap((r) => {
    const found = [];
    for (let at = bytes.indexOf(r); at >= 0; at = bytes.indexOf(r, at + 1)) found.push(`0x${at.toString(16)} ${bytes.toString('latin1', at, Math.min(bytes.indexOf(0, at), at + 160))}`);
    return found;
  });
  const sections = elf64Sections(bytes);
  const fatbin = sections?.find((s) => s.name === '.nv_fatbin');
  if (!fatbin) return { ok: true, paths: 0, stamps: 0, left: left() };
  const section = bytes.subarray(fatbin.offset, fatbin.offset + fatbin.size);
  const fail = (why) => ({ ok: false, why: `${file}: ${why}`, left: left() });

  let stamps = 0;
  for (let at = 0; at < section.length; ) {
    if (at + 16 > section.length || section.readUInt32LE(at) !== FATBIN_MAGIC) {
      if (section.subarray(at, Math.min(at + 8, section.length)).every((b) => b === 0)) {
        at += 8; // padding between the objects' fat binaries
        continue;
      }
      return fail(`no fat binary header at .nv_fatbin+0x${at.toString(16)}`);
    }
    const end = at + section.readUInt16LE(at + 6) + Number(section.readBigUInt64LE(at + 8));
    if (end > section.length) return fail(`a fat binary longer than .nv_fatbin at .nv_fatbin+0x${at.toString(16)}`);
    for (let entry = at + section.readUInt16LE(at + 6); entry < end; ) {
      if (entry + 48 > end) return fail('a fat binary entry cut short');
      const [kind, headerSize, size] = [section.readUInt16LE(entry), section.readUInt32LE(entry + 4), Number(section.readBigUInt64LE(entry + 8))];
      if (headerSize < 48 || entry + headerSize + size > end) return fail('a fat binary entry of an unknown layout');
      // a compressed image (nvcc compresses PTX, and everything with -compress-all) cannot be read here
      if (section.readBigUInt64LE(entry + 40) & FATBIN_COMPRESSED) return fail('compressed device code (nvcc -compress-all?), whose line tables cannot be rewritten');
      if (kind === FATBIN_ELF) {
        const r = zeroLineStamps(section.subarray(entry + headerSize, entry + headerSize + size));
        if (r.problem) return fail(`a cubin with ${r.problem}`);
        stamps += r.stamps;
      }
      entry += headerSize + size;
    }
    at = end;
  }

  let paths = 0;
  for (const r of [...roots, NVCC_TREE]) {
    for (let at = section.indexOf(r); at >= 0; at = section.indexOf(r, at + 1)) {
      const next = section[at + r.length];
      if (next !== 0x2f && next !== 0) continue; // '/work/main2' is not under '/work/main'
      const n = next === 0x2f ? r.length + 1 : r.length;
      section.write(relativePrefix(n), at, 'latin1');
      paths++;
    }
  }
  if (paths || stamps) {
    rehashBuildId(bytes, sections);
    writeFileSync(file, bytes);
  }
  return { ok: true, paths, stamps, left: left() };
}

/**
 * Loads an addon in a child process (a missing glibc symbol, an illegal instruction or a crash
 * cannot take this process down) and returns { ok: true, info } with its build description, or
 * { ok: false, why }.
 */
export function probeAddon(path, timeoutMs = 60_000, env = {}) {
  const script =
    'const m = require(process.argv[1]);' +
    'process.stdout.write(JSON.stringify({ abiVersion: m.abiVersion, build: m.build, cuda: m.cuda && m.cuda.built ? { built: true, arch: m.cuda.arch, compilerVersion: m.cuda.compilerVersion, kernels: m.cuda.kernels } : { built: false } }));';
  const r = spawnSync(process.execPath, ['-e', script, path], { encoding: 'utf8', timeout: timeoutMs, env: { ...process.env, ...env } });
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
