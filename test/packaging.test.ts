/**
 * What an installed package does about its native addon, on copies of the package in temp dirs:
 * which prebuilt addon the CPU's flags select (native/addon_locate.mjs), what the install script
 * records and why (native/install.mjs, run with PATHs that lack CMake or hold a failing stand-in),
 * and what `sparse-mla info` and BACKEND_UNAVAILABLE then say (the recorded reason, the build log's
 * absolute path and its failing line). The end-to-end check of the real tarball in an empty project
 * is .ci/package_check.sh.
 */
import { execFile, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, cpSync, existsSync, mkdirSync, readdirSync, readFileSync, realpathSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, posix } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, test } from 'vitest';
import { ADDON_SOURCE_DIRS, LEVEL_FLAGS, PREBUILT_TARGETS, addonCandidates, addonSourceFingerprint, readCpuFlags, selectPrebuilt, type InstallStatus } from '../native/addon_locate.mjs';
import { NATIVE_ADDON, nativeAddonBuilt } from './helpers/backends.js';
import { tempDirs } from './helpers/temp_dirs.js';

const PREBUILT_LEVELS = PREBUILT_TARGETS['linux-x64'].levels;

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const V2 = LEVEL_FLAGS['x86-64-v2']!;
const V3 = LEVEL_FLAGS['x86-64-v3']!;
const prebuiltDir = tempDirs('sparse-mla-prebuilt-');
const bareDir = tempDirs('sparse-mla-bare-');
const packageDir = tempDirs('sparse-mla-pkg-');
const pathDir = tempDirs('sparse-mla-path-');
const cpuinfo = (flags: readonly string[]): string => `processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 ${flags.join(' ')}\n\nprocessor\t: 1\n`;

/** A package root with prebuilds/<platform>/manifest.json listing the given levels (files optional). */
function prebuiltRoot(levels: readonly string[], extra: Record<string, unknown> = {}, platform = 'linux-x64', root = prebuiltDir()): string {
  const dir = join(root, 'prebuilds', platform);
  mkdirSync(dir, { recursive: true });
  const simd = (level: string) => ({ 'x86-64-v3': 'AVX2+FMA', 'x86-64-v2': 'SSE2', 'armv8-a': 'NEON' })[level] ?? '?';
  const addons = levels.map((level) => ({ file: `sparse_mla_native.${level}.node`, cpuArch: level, simd: simd(level), bytes: 0, sha256: '' }));
  writeFileSync(join(dir, 'manifest.json'), JSON.stringify({ package: 'sparse-mla', version: '0.0.0', platform, cuda: { built: true, arch: 'sm_90a' }, addons, ...extra }));
  return root;
}

/** /proc/cpuinfo of an AArch64 Linux machine (a Neoverse core): `Features`, no `flags`. */
const ARM_CPUINFO = 'processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n\n';

describe('prebuilt addon selection', () => {
  test('the x86-64 levels as /proc/cpuinfo flags: v3 holds v2, and a v3 CPU gets the v3 addon', () => {
    for (const f of V2) expect(V3).toContain(f);
    expect(V3).toEqual(expect.arrayContaining(['avx2', 'fma', 'bmi1', 'bmi2', 'movbe']));
    const root = prebuiltRoot(PREBUILT_LEVELS);
    const pick = selectPrebuilt({ root, platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V3) });
    expect(pick).toMatchObject({ ok: true, level: 'x86-64-v3', path: join(root, 'prebuilds', 'linux-x64', 'sparse_mla_native.x86-64-v3.node') });
  });

  test('a v3 CPU whose kernel lists no abm (LZCNT; a Firecracker guest\'s /proc/cpuinfo) still gets the v3 addon', () => {
    const root = prebuiltRoot(PREBUILT_LEVELS);
    const pick = selectPrebuilt({ root, platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V3.filter((f) => f !== 'abm')) });
    expect(pick).toMatchObject({ ok: true, level: 'x86-64-v3' });
  });

  test('a CPU without one v3 flag gets the v2 addon; one without v2 flags gets none and is told which flags it lacks', () => {
    const root = prebuiltRoot(PREBUILT_LEVELS);
    for (const missing of ['avx2', 'fma', 'bmi1', 'movbe']) {
      const pick = selectPrebuilt({ root, platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V3.filter((f) => f !== missing)) });
      expect(pick, missing).toMatchObject({ ok: true, level: 'x86-64-v2' });
    }
    const old = selectPrebuilt({ root, platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V2.filter((f) => f !== 'sse4_2' && f !== 'popcnt')) });
    expect(old.ok).toBe(false);
    if (!old.ok) expect(old.why).toBe('this CPU lacks popcnt, sse4_2, which the prebuilt addons need (x86-64-v2 at least)');
    // a package that carries only the v3 addon has nothing for a v2 CPU
    const v3only = selectPrebuilt({ root: prebuiltRoot(['x86-64-v3']), platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V2) });
    expect(v3only.ok).toBe(false);
  });

  test('flags only count from the flags line; without one only the v2 addon is taken', () => {
    expect(readCpuFlags('')).toBeNull();
    expect([...readCpuFlags(cpuinfo(['avx2']))!]).toEqual(['fpu', 'sse', 'sse2', 'avx2']);
    const pick = selectPrebuilt({ root: prebuiltRoot(PREBUILT_LEVELS), platform: 'linux', arch: 'x64', cpuinfo: 'model name\t: avx2 fma bmi2\n' });
    expect(pick).toMatchObject({ ok: true, level: 'x86-64-v2' });
  });

  test('another platform, or a package without prebuilds, has none, and says so', () => {
    const arm = selectPrebuilt({ root: prebuiltRoot(PREBUILT_LEVELS), platform: 'linux', arch: 'arm64', cpuinfo: '' });
    expect(arm).toEqual({ ok: false, why: 'no prebuilt addon for linux-arm64 (the package carries linux-x64)' });
    const bare = selectPrebuilt({ root: bareDir(), platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V3) });
    expect(bare).toEqual({ ok: false, why: 'this copy of the package carries no prebuilt addons' });
  });

  test('linux-arm64: the armv8-a addon on any AArch64 CPU, whatever /proc/cpuinfo says (none, Features, or an emulator\'s host flags)', () => {
    expect(PREBUILT_TARGETS['linux-arm64']).toEqual({ levels: ['armv8-a'], cuda: false });
    for (const [platform, target] of Object.entries(PREBUILT_TARGETS)) {
      for (const level of target.levels) expect(LEVEL_FLAGS[level], `${platform} ${level}`).toBeDefined();
    }
    expect([...readCpuFlags(ARM_CPUINFO)!]).toEqual(expect.arrayContaining(['fp', 'asimd', 'asimddp']));
    const root = prebuiltRoot(PREBUILT_LEVELS);
    prebuiltRoot(['armv8-a'], { cuda: { built: false, why: 'cpu only' } }, 'linux-arm64', root);
    const path = join(root, 'prebuilds', 'linux-arm64', 'sparse_mla_native.armv8-a.node');
    for (const info of [ARM_CPUINFO, '', cpuinfo(V2)]) {
      expect(selectPrebuilt({ root, platform: 'linux', arch: 'arm64', cpuinfo: info }), JSON.stringify(info)).toMatchObject({ ok: true, level: 'armv8-a', path, entry: { simd: 'NEON' } });
    }
    // the same package on x64 still takes the x64 addons, and elsewhere says what it carries
    expect(selectPrebuilt({ root, platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V3) })).toMatchObject({ ok: true, level: 'x86-64-v3' });
    expect(selectPrebuilt({ root, platform: 'darwin', arch: 'arm64', cpuinfo: '' })).toEqual({ ok: false, why: 'no prebuilt addon for darwin-arm64 (the package carries linux-arm64, linux-x64)' });
    // an arm64 manifest naming only levels the loader does not know of gives nothing, and says so
    const odd = prebuiltRoot(['armv9-a'], {}, 'linux-arm64');
    expect(selectPrebuilt({ root: odd, platform: 'linux', arch: 'arm64', cpuinfo: ARM_CPUINFO })).toEqual({ ok: false, why: 'the linux-arm64 manifest lists none of the levels armv8-a (it lists armv9-a)' });
  });

  test('load order: SPARSE_MLA_NATIVE_ADDON alone; a source build first only when the install made one', () => {
    const root = prebuiltRoot(PREBUILT_LEVELS);
    const prebuilt = selectPrebuilt({ root, platform: 'linux', arch: 'x64', cpuinfo: cpuinfo(V3) });
    const source = join(root, 'build', 'addon', 'Release', 'sparse_mla_native.node');
    const order = (status: Partial<InstallStatus> | null, env: NodeJS.ProcessEnv = {}) => addonCandidates({ env, root, status: status as InstallStatus, prebuilt }).map((c) => c.origin);
    expect(order(null)).toEqual(['prebuilt', 'source build']);
    expect(order({ addon: 'prebuilt' })).toEqual(['prebuilt', 'source build']);
    expect(order({ addon: 'built' })).toEqual(['source build', 'prebuilt']);
    expect(addonCandidates({ env: { SPARSE_MLA_NATIVE_ADDON: '/x.node' }, root, status: null, prebuilt })).toEqual([{ path: '/x.node', origin: 'env' }]);
    expect(addonCandidates({ env: {}, root, status: null, prebuilt: { ok: false, why: 'none' } })).toEqual([{ path: source, origin: 'source build' }]);
  });
});

/**
 * A copy of the package as npm installs it (dist, native/*.mjs, package.json, CMakeLists.txt, no
 * .git), its node_modules linked to this checkout's.
 */
function packageCopy(options: { dist?: boolean } = {}): string {
  const root = packageDir();
  mkdirSync(join(root, 'native'));
  for (const f of ['install.mjs', 'addon_locate.mjs', 'build_tools.mjs']) copyFileSync(join(ROOT, 'native', f), join(root, 'native', f));
  copyFileSync(join(ROOT, 'package.json'), join(root, 'package.json'));
  writeFileSync(join(root, 'CMakeLists.txt'), '# configure never gets this far in these tests\n');
  symlinkSync(join(ROOT, 'node_modules'), join(root, 'node_modules'));
  if (options.dist) cpSync(join(ROOT, 'dist'), join(root, 'dist'), { recursive: true });
  return root;
}

/** A PATH directory holding node and the given stand-in tools (shell scripts). */
function toolPath(tools: Record<string, string> = {}): string {
  const dir = pathDir();
  symlinkSync(process.execPath, join(dir, 'node'));
  for (const [name, script] of Object.entries(tools)) {
    writeFileSync(join(dir, name), `#!/bin/sh\n${script}\n`);
    chmodSync(join(dir, name), 0o755);
  }
  return dir;
}

const FAILING_CMAKE = {
  cmake: 'if [ "$1" = "--version" ]; then echo "cmake version 3.25.1"; exit 0; fi\necho "CMake Error at CMakeLists.txt:1: a stand-in cmake that fails on purpose" >&2\nexit 1',
  'g++': 'echo "g++ (stand-in) 12.2.0"',
};

function install(root: string, path: string, env: Record<string, string> = {}): { stdout: string; status: InstallStatus } {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(CXX|CC|CMAKE|CUDACXX|SPARSE_MLA_.*)$/.test(k)));
  const r = spawnSync(process.execPath, [join(root, 'native', 'install.mjs')], { cwd: root, encoding: 'utf8', timeout: 120_000, env: { ...clean, PATH: path, ...env } });
  expect(r.status, r.stderr).toBe(0); // never fails the install
  return { stdout: r.stdout, status: JSON.parse(readFileSync(join(root, 'build', 'install-status.json'), 'utf8')) as InstallStatus };
}

function cli(root: string, args: string[]): { code: number | null; stdout: string; stderr: string } {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SPARSE_MLA_')));
  const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'main.js'), ...args], { cwd: root, encoding: 'utf8', timeout: 60_000, env: clean });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

interface InfoJson {
  backends: { name: string; available: boolean; reason?: string }[];
  addon: { loaded: boolean; origin: string | null; level: string | null; reason: string | null; cuda: { built: boolean; why?: string }; install: InstallStatus | null };
}

describe('install script', () => {
  test('no prebuilt addon and no CMake: no addon, and the status says both, with what to do', () => {
    const root = packageCopy();
    const { stdout, status } = install(root, toolPath());
    expect(status.addon).toBe('none');
    expect(status.path).toBeNull();
    expect(status.root).toBe(root);
    expect(status.reason).toMatch(/^this copy of the package carries no prebuilt addons; cannot build from source: CMake not found/);
    expect(status.build).toMatchObject({ ran: false });
    expect(stdout).toContain('SPARSE_MLA_BUILD_FROM_SOURCE=1 npm rebuild sparse-mla');
    // skipping the build is recorded as such
    expect(install(root, toolPath(), { SPARSE_MLA_SKIP_NATIVE: '1' }).status.reason).toMatch(/SPARSE_MLA_SKIP_NATIVE is set/);
  });

  test('a failed source build: the status holds the absolute log path and the failing line; info and BACKEND_UNAVAILABLE show them', () => {
    const root = packageCopy({ dist: true });
    const { status } = install(root, toolPath(FAILING_CMAKE));
    const log = join(root, 'build', 'addon', 'build.log');
    expect(status.addon).toBe('none');
    expect(status.build).toMatchObject({ ran: true, result: 'failed', problem: 'configure failed', log });
    expect(existsSync(log)).toBe(true);
    expect(status.build!.excerpt!.join('\n')).toContain('CMake Error at CMakeLists.txt:1: a stand-in cmake that fails on purpose');

    const info = JSON.parse(cli(root, ['info', '--json']).stdout) as InfoJson;
    const cpu = info.backends.find((b) => b.name === 'cpu')!;
    expect(cpu.available).toBe(false);
    expect(cpu.reason).toContain(`the source build at install failed (configure failed; log: ${log}; CMake Error at CMakeLists.txt:1: a stand-in cmake`);
    expect(cpu.reason).toContain('no prebuilt addon: this copy of the package carries no prebuilt addons');
    expect(info.addon).toMatchObject({ loaded: false, origin: null });
    const text = cli(root, ['info']).stdout;
    expect(text).toContain(`  log      ${log}`);
    expect(text).toMatch(/^ {11}CMake Error at CMakeLists\.txt:1: a stand-in cmake that fails on purpose$/m);
    const run = cli(root, ['run', '--backend', 'cpu', '--json']);
    expect(run.code).toBe(2);
    const err = JSON.parse(run.stdout) as { ok: boolean; error: { code: string; message: string } };
    expect(err.ok).toBe(false);
    expect(err.error.code).toBe('BACKEND_UNAVAILABLE');
    expect(err.error.message).toContain(`log: ${log}`);
  }, 60_000);

  test.skipIf(process.platform !== 'linux' || process.arch !== 'x64')('nvcc on PATH beside a prebuilt addon without kernels (a GH200 with the arm64 one): the install says how to get them', () => {
    // a stand-in addon (the JS surface the probe reads) as the package's x86-64-v2 one, which any x64 CPU here runs
    const root = packageCopy();
    const dir = join(root, 'prebuilds', 'linux-x64');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'stand_in.cjs'), "module.exports = { abiVersion: 2, build: { cpuArch: 'x86-64-v2', simd: 'SSE2' }, cuda: { built: false } };\n");
    writeFileSync(join(dir, 'manifest.json'), JSON.stringify({ package: 'sparse-mla', version: '0.0.0', platform: 'linux-x64', cuda: { built: false, why: 'cpu only' }, addons: [{ file: 'stand_in.cjs', cpuArch: 'x86-64-v2', simd: 'SSE2', bytes: 0, sha256: '' }] }));
    const hint = 'nvcc is here but this addon has no CUDA kernels; for the cuda backend: build it from source with `SPARSE_MLA_BUILD_FROM_SOURCE=1 npm rebuild sparse-mla`';
    const withNvcc = install(root, toolPath({ nvcc: 'echo "nvcc (stand-in)"' }));
    expect(withNvcc.status).toMatchObject({ addon: 'prebuilt', cuda: { built: false } });
    expect(withNvcc.stdout).toContain(hint);
    expect(install(root, toolPath()).stdout).not.toContain('nvcc is here');
  });

  describe.skipIf(!nativeAddonBuilt())('with a prebuilt addon (this checkout\'s build, copied in as both levels)', () => {
    const withPrebuilt = (options: { dist?: boolean } = {}): string => {
      const root = packageCopy(options);
      const dir = join(root, 'prebuilds', 'linux-x64');
      mkdirSync(dir, { recursive: true });
      for (const level of PREBUILT_LEVELS) copyFileSync(process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON, join(dir, `sparse_mla_native.${level}.node`));
      const addons = PREBUILT_LEVELS.map((level) => ({ file: `sparse_mla_native.${level}.node`, cpuArch: level, simd: '?', bytes: 0, sha256: '' }));
      writeFileSync(join(dir, 'manifest.json'), JSON.stringify({ package: 'sparse-mla', version: '0.0.0', platform: 'linux-x64', cuda: { built: false, why: 'a test package' }, addons }));
      return root;
    };
    const expectedLevel = selectPrebuilt({ root: prebuiltRoot(PREBUILT_LEVELS), platform: 'linux', arch: 'x64' });

    test.skipIf(process.platform !== 'linux' || process.arch !== 'x64' || !expectedLevel.ok)('chosen without any toolchain, at the level this CPU runs; info shows it', () => {
      const root = withPrebuilt({ dist: true });
      const { stdout, status } = install(root, toolPath());
      const level = expectedLevel.ok ? expectedLevel.level : '';
      expect(status).toMatchObject({ addon: 'prebuilt', path: join(root, 'prebuilds', 'linux-x64', `sparse_mla_native.${level}.node`), prebuilt: { ok: true, level }, build: { ran: false } });
      expect(stdout).toContain(`using the prebuilt linux-x64 addon (`);
      const info = JSON.parse(cli(root, ['info', '--json']).stdout) as InfoJson;
      expect(info.addon).toMatchObject({ loaded: true, origin: 'prebuilt', level });
      expect(info.backends.find((b) => b.name === 'cpu')!.available).toBe(true);
      expect(cli(root, ['info']).stdout).toContain("Native addon: the package's prebuilt linux-x64 addon;");
    }, 60_000);

    test('a source build asked for but impossible falls back to the prebuilt addon and records why', () => {
      const root = withPrebuilt();
      const { status } = install(root, toolPath(), { SPARSE_MLA_BUILD_FROM_SOURCE: '1' });
      expect(status.addon).toBe('prebuilt');
      expect(status.build).toMatchObject({ ran: false });
      expect(status.build!.why).toMatch(/^a source build was wanted \(SPARSE_MLA_BUILD_FROM_SOURCE is set\) but cannot run: CMake not found/);
    });
  });
});

// The packing step refuses to pack a package that would silently lack the linux-arm64 addon.
// (Stand-in cmake and g++ that only answer --version: it must stop before building anything.)
describe.skipIf(process.platform !== 'linux' || process.arch !== 'x64')('packing step (native/prebuild.mjs)', () => {
  const STAND_INS = { cmake: 'echo "cmake version 3.25.1"', 'g++': 'echo "g++ (stand-in) 12.2.0"', gcc: 'echo "gcc (stand-in) 12.2.0"' };
  const prebuild = (env: Record<string, string>) => {
    const root = packageCopy();
    copyFileSync(join(ROOT, 'native', 'prebuild.mjs'), join(root, 'native', 'prebuild.mjs'));
    const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(CXX|CC|CMAKE|CUDACXX|SPARSE_MLA_.*)$/.test(k)));
    const r = spawnSync(process.execPath, [join(root, 'native', 'prebuild.mjs')], { cwd: root, encoding: 'utf8', timeout: 60_000, env: { ...clean, PATH: toolPath(STAND_INS), ...env } });
    return { status: r.status, stderr: r.stderr, built: existsSync(join(root, 'build')) || existsSync(join(root, 'prebuilds')) };
  };

  test('without the aarch64 cross compiler it fails, saying what to install and how to skip; a bad switch value fails too', () => {
    const missing = prebuild({});
    expect(missing.status).toBe(1);
    expect(missing.stderr).toContain('cannot build the linux-arm64 addon: aarch64-linux-gnu-gcc and aarch64-linux-gnu-g++ not found on PATH (apt-get install g++-aarch64-linux-gnu; or set SPARSE_MLA_PACK_ARM64=OFF to pack without it)');
    expect(missing.built).toBe(false);
    const bad = prebuild({ SPARSE_MLA_PACK_ARM64: 'maybe' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain('SPARSE_MLA_PACK_ARM64: expected ON or OFF, got "maybe"');
  });
});

// A source build left over from before a pull or merge has the same ABI and op names as a fresh
// one, yet may keep an older contract: an addon from before quantize committed on the JS thread
// wrote a cache transferred mid-call (test/ownership.test.ts saw { ok: true, movedUntouched: false }).
describe.skipIf(!nativeAddonBuilt() || Boolean(process.env.SPARSE_MLA_NATIVE_ADDON))('a source build and the sources it was built from', () => {
  /** A package copy holding the addon's sources and this checkout's source build of them. */
  const withSourceBuild = (): string => {
    const root = packageCopy({ dist: true });
    for (const f of [...ADDON_SOURCE_DIRS, 'CMakeLists.txt', 'native/CMakeLists.txt']) cpSync(join(ROOT, f), join(root, f), { recursive: true });
    mkdirSync(join(root, 'build', 'addon', 'Release'), { recursive: true });
    copyFileSync(NATIVE_ADDON, join(root, 'build', 'addon', 'Release', 'sparse_mla_native.node'));
    return root;
  };
  const cpuState = (root: string) => {
    const info = JSON.parse(cli(root, ['info', '--json']).stdout) as InfoJson;
    const cpu = info.backends.find((b) => b.name === 'cpu')!;
    return { available: cpu.available, reason: cpu.reason ?? null, origin: info.addon.origin };
  };

  test('loaded while its sources are unchanged; refused as stale, saying how to rebuild, once one changes; docs do not count', () => {
    const root = withSourceBuild();
    expect(addonSourceFingerprint(root)).toBe(addonSourceFingerprint(ROOT));
    expect(cpuState(root)).toEqual({ available: true, reason: null, origin: 'source build' });

    const file = join(root, 'native', 'addon', 'cpu_ops.cpp');
    const original = readFileSync(file);
    writeFileSync(file, Buffer.concat([original, Buffer.from('// a change pulled in after the build\n')]));
    const stale = cpuState(root);
    expect(stale).toMatchObject({ available: false, origin: null });
    const addon = join(root, 'build', 'addon', 'Release', 'sparse_mla_native.node');
    expect(stale.reason).toContain(`${addon} was not built from the native sources here (it has sources ${addonSourceFingerprint(ROOT)}, these are ${addonSourceFingerprint(root)}): a stale build`);
    expect(stale.reason).toContain('SPARSE_MLA_BUILD_FROM_SOURCE=1 npm rebuild sparse-mla');

    writeFileSync(file, original);
    writeFileSync(join(root, 'native', 'addon', 'README.md'), 'notes only\n');
    expect(cpuState(root)).toEqual({ available: true, reason: null, origin: 'source build' });
  }, 60_000);
});

// What a built addon carries of the machine that built it. nvcc's -lineinfo writes each kernel's
// source files into the cubins it embeds (.nv_fatbin): absolute paths of the build tree, and each
// file's mtime and size, which differ from checkout to checkout. Read here without the package's
// code: the cubins cut out of the ELF section by their own headers, their line tables by readelf.
const builtAddon = process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON;

/** The section's bytes, by name, from the ELF64 section headers (null when there is none). */
function elfSection(bytes: Buffer, name: string): Buffer | null {
  const shoff = Number(bytes.readBigUInt64LE(0x28));
  const [shentsize, shnum, shstrndx] = [bytes.readUInt16LE(0x3a), bytes.readUInt16LE(0x3c), bytes.readUInt16LE(0x3e)];
  const header = (i: number) => ({ name: bytes.readUInt32LE(shoff + i * shentsize), offset: Number(bytes.readBigUInt64LE(shoff + i * shentsize + 24)), size: Number(bytes.readBigUInt64LE(shoff + i * shentsize + 32)) });
  const names = header(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const h = header(i);
    const at = names.offset + h.name;
    if (bytes.toString('latin1', at, bytes.indexOf(0, at)) === name) return bytes.subarray(h.offset, h.offset + h.size);
  }
  return null;
}

/** Every embedded ELF image (cubin) in a fatbin section, each cut to the end of its section headers. */
function cubinsIn(fatbin: Buffer): Buffer[] {
  const cubins: Buffer[] = [];
  for (let at = fatbin.indexOf('\x7fELF', 0, 'latin1'); at >= 0; at = fatbin.indexOf('\x7fELF', at + 4, 'latin1')) {
    const image = fatbin.subarray(at);
    const end = Number(image.readBigUInt64LE(0x28)) + image.readUInt16LE(0x3a) * image.readUInt16LE(0x3c);
    cubins.push(image.subarray(0, end));
    at += end - 4;
  }
  return cubins;
}

interface LineFile { dir: string; time: number; size: number; name: string }

/** The file tables of a cubin's .debug_line, as `readelf --debug-dump=rawline` prints them. */
function lineTables(cubin: Buffer, dir: string): LineFile[] {
  const file = join(dir, 'image.cubin');
  writeFileSync(file, cubin);
  const text = spawnSync('readelf', ['--debug-dump=rawline', '-W', file], { encoding: 'utf8', maxBuffer: 64 << 20 }).stdout;
  const files: LineFile[] = [];
  for (const table of text.split(' The Directory Table').slice(1)) {
    const dirs = new Map([...table.matchAll(/^\s+(\d+)\t(.+)$/gm)].filter((m) => table.indexOf(m[0]) < table.indexOf('The File Name Table')).map((m) => [m[1]!, m[2]!]));
    const names = table.slice(table.indexOf('The File Name Table'), table.indexOf('Line Number Statements'));
    for (const m of names.matchAll(/^\s+\d+\t(\d+)\t(\d+)\t(\d+)\t(.+)$/gm)) files.push({ dir: m[1] === '0' ? '' : dirs.get(m[1]!)!, time: Number(m[2]), size: Number(m[3]), name: m[4]! });
  }
  return files;
}

const cudaSources = readdirSync(join(ROOT, 'native', 'cuda')).filter((f) => f.endsWith('.cu'));
const addonFatbin = nativeAddonBuilt() && process.platform === 'linux' ? elfSection(readFileSync(builtAddon), '.nv_fatbin') : null;
const scratchDir = tempDirs('sparse-mla-cubin-');

describe.skipIf(!nativeAddonBuilt() || process.platform !== 'linux')('what the built addon carries of the build machine', () => {
  test('no absolute path of the build tree, anywhere in the file', () => {
    const bytes = readFileSync(builtAddon);
    const roots = [...new Set([ROOT.replace(/\/$/, ''), realpathSync(ROOT)])];
    const found = roots.flatMap((root) => {
      const hits: string[] = [];
      for (let at = bytes.indexOf(root); at >= 0; at = bytes.indexOf(root, at + 1)) hits.push(`0x${at.toString(16)}: ${bytes.toString('latin1', at, bytes.indexOf(0, at)).slice(0, 120)}`);
      return hits;
    });
    expect(found).toEqual([]);
  });

  test.skipIf(!addonFatbin)('the kernels keep their line info, naming sources relative to the package root, with no mtime or size', () => {
    const cubins = cubinsIn(addonFatbin!);
    expect(cubins.length).toBe(cudaSources.length); // one sm_90a cubin per .cu
    const dir = scratchDir();
    const ours = new Set<string>();
    for (const [i, cubin] of cubins.entries()) {
      const files = lineTables(cubin, dir);
      expect(files.length, `cubin ${i} has no line table`).toBeGreaterThan(0);
      for (const f of files) {
        const path = f.dir ? `${f.dir}/${f.name}` : f.name;
        expect(path.startsWith(ROOT.replace(/\/$/, '')), path).toBe(false);
        expect(path.startsWith('/proc/'), `${path}: the spelling nvcc was given the sources by, not rewritten`).toBe(false);
        if (path.startsWith('/')) continue; // the CUDA toolkit's headers, where it is installed
        const relative = posix.normalize(path);
        expect(existsSync(join(ROOT, relative)), `${path}: not a file of the package`).toBe(true);
        expect({ path, time: f.time, size: f.size }).toEqual({ path, time: 0, size: 0 });
        ours.add(relative);
      }
    }
    // every kernel header the .cu files compile is named (what a profiler's source view opens)
    expect([...ours].sort()).toEqual(expect.arrayContaining(['native/cuda/kv_cache.cuh', 'native/cuda/paged_sparse_attention.cuh', 'native/cuda/sparse_prefill.cuh', 'cpp/include/sparse_mla/formats.h']));
  });

  // native/build_tools.mjs scrubBuildTree on copies of the built addon
  interface Scrub { ok: boolean; why?: string; paths?: number; stamps?: number; left: string[] }
  const scrubber = async () => (await import('../native/build_tools.mjs')) as unknown as { scrubBuildTree(file: string, root: string): Scrub; NVCC_TREE: string };
  const fatbinOffset = (bytes: Buffer) => bytes.indexOf(addonFatbin!.subarray(0, 64));

  test.skipIf(!addonFatbin)('another root written over the relative paths is rewritten to the same bytes; a rewritten addon is left as it is', async () => {
    const { scrubBuildTree, NVCC_TREE } = await scrubber();
    const bytes = readFileSync(builtAddon);
    const at = fatbinOffset(bytes);
    // the runs of './' the build wrote in place of the path nvcc was given the sources by and its
    // '/', each before native/ or cpp/: NVCC_TREE, as long in every build tree (native/CMakeLists.txt)
    const spots = [...bytes.subarray(at, at + addonFatbin!.length).toString('latin1').matchAll(/[./]+(?=(?:native|cpp)\/)/g)];
    expect(spots.length).toBe(3 * cudaSources.length); // per cubin: its name and two directories
    const rootLength = NVCC_TREE.length;
    expect(spots.map((m) => m[0].length)).toEqual(spots.map(() => rootLength + 1));
    const fake = `/${'q'.repeat(rootLength - 1)}`; // another build tree, as long
    const dirty = Buffer.from(bytes);
    for (const m of spots) dirty.write(`${fake}/`, at + m.index, 'latin1');
    const file = join(scratchDir(), 'dirty.node');
    writeFileSync(file, dirty);
    expect(scrubBuildTree(file, fake)).toMatchObject({ ok: true, paths: spots.length, stamps: 0, left: [] });
    const back = readFileSync(file);
    // the addon's own bytes again, apart from the build-id (the hash of the file as rewritten)
    const shoff = Number(bytes.readBigUInt64LE(0x28));
    const id = elfSection(bytes, '.note.gnu.build-id')!;
    const idStart = bytes.indexOf(id), idEnd = idStart + id.length;
    expect(shoff).toBeGreaterThan(idEnd);
    expect([...back.keys()].filter((i) => back[i] !== bytes[i] && (i < idStart || i >= idEnd))).toEqual([]);
    expect(scrubBuildTree(file, ROOT)).toMatchObject({ ok: true, paths: 0, stamps: 0, left: [] });
    expect(readFileSync(file).equals(back)).toBe(true);
  });

  test.skipIf(!addonFatbin)('device code it cannot read (a compressed cubin) is refused, not passed as clean', async () => {
    const { scrubBuildTree } = await scrubber();
    const bytes = Buffer.from(readFileSync(builtAddon));
    const at = fatbinOffset(bytes);
    expect(bytes.readUInt32LE(at)).toBe(0xba55ed50); // a fat binary header, its first entry after 16 bytes
    const flags = at + 16 + 40;
    bytes.writeBigUInt64LE(bytes.readBigUInt64LE(flags) | 0x2000n, flags); // "compressed"
    const file = join(scratchDir(), 'compressed.node');
    writeFileSync(file, bytes);
    const r = scrubBuildTree(file, ROOT);
    expect(r.ok).toBe(false);
    expect(r.why).toContain('compressed device code');
  });
});

describe('runtime without an install record (scripts not run: pnpm, --ignore-scripts)', () => {
  /** A stand-in prebuilt addon without CUDA: the JS surface the loader checks, no kernels. */
  const STAND_IN = `module.exports = { abiVersion: 2, build: { cpuArch: 'x86-64-v2', simd: 'SSE2', hardwareThreads: 1 },
    cpu: { sparsePrefill() {}, pagedSparseAttention() {}, dequantizeKvCache() {}, quantizeKvCache() {} }, cuda: { built: false } };\n`;

  test('the prebuilt addon still loads; cuda says the package was packed without CUDA; info says the script did not run', () => {
    const root = packageCopy({ dist: true });
    const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'stand_in.cjs'), STAND_IN);
    const why = 'the package was packed without the CUDA kernels (SPARSE_MLA_PACK_CUDA=OFF, no nvcc where it was packed)';
    writeFileSync(join(dir, 'manifest.json'), JSON.stringify({ package: 'sparse-mla', version: '0.0.0', platform: 'any', cuda: { built: false, why }, addons: [{ file: 'stand_in.cjs', cpuArch: 'x86-64-v2', simd: 'SSE2', bytes: 0, sha256: '' }] }));
    const info = JSON.parse(cli(root, ['info', '--json']).stdout) as InfoJson;
    expect(info.addon).toMatchObject({ loaded: true, origin: 'prebuilt', install: null, cuda: { built: false, why } });
    const cuda = info.backends.find((b) => b.name === 'cuda')!;
    expect(cuda.available).toBe(false);
    expect(cuda.reason).toContain(`the addon has no CUDA kernels: ${why}; for them, build it from source with \`SPARSE_MLA_BUILD_FROM_SOURCE=1 npm rebuild sparse-mla\``);
    expect(cli(root, ['info']).stdout).toContain('  install  the install script did not run (no ');
  });
});

describe('CommonJS', () => {
  const node = (args: string[]) => spawnSync(process.execPath, args, { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });

  test("require('sparse-mla') and require('sparse-mla/reference') give the ES modules' exports", () => {
    const r = node(['-e', "const m = require('sparse-mla'), r = require('sparse-mla/reference'); console.log(typeof m.createEngine, typeof m.createPlan, typeof r.sparsePrefillReference)"]);
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe('function function function');
  });

  test('without require(esm) the error says why and how to load the package instead', () => {
    const r = node(['--no-experimental-require-module', '-e', "require('sparse-mla')"]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('sparse-mla is an ES module: require() of it needs Node >= 20.19 with require(esm) on');
    expect(r.stderr).toContain("const m = await import('sparse-mla')");
  });
});

/**
 * The package as `npm pack` lists it (a dry run: prepack is not run, so no prebuilt addons; the
 * real tarball is checked end to end by .ci/package_check.sh), copied file by file into
 * node_modules/sparse-mla of an empty ESM project whose path holds a space and a non-ASCII letter,
 * with comlink (its dependency) beside it and a .bin link as npm makes one.
 */
describe('the package as npm ships it, in a consumer project', () => {
  let files: string[] = [];
  let app = '';
  let pkg = '';
  const consumerDir = tempDirs('sparse-mla consumer ü-');
  const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');

  beforeAll(() => {
    const r = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8', timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0]!.files.map((f) => f.path).sort();
    app = consumerDir();
    pkg = join(app, 'node_modules', 'sparse-mla');
    for (const f of files) {
      mkdirSync(dirname(join(pkg, f)), { recursive: true });
      copyFileSync(join(ROOT, f), join(pkg, f));
    }
    symlinkSync(join(ROOT, 'node_modules', 'comlink'), join(app, 'node_modules', 'comlink'));
    mkdirSync(join(app, 'node_modules', '.bin'));
    chmodSync(join(pkg, 'dist', 'cli', 'main.js'), 0o755);
    symlinkSync('../sparse-mla/dist/cli/main.js', join(app, 'node_modules', '.bin', 'sparse-mla'));
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  }, 120_000);

  test('it carries what a user runs and reads, and nothing of the development tree', () => {
    type Conditions = string | { [condition: string]: Conditions };
    const manifest = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
      main: string; types: string; bin: Record<string, string>; exports: Record<string, Conditions>;
      typesVersions: Record<string, Record<string, string[]>>;
    };
    const norm = (p: string) => p.replace(/^\.\//, '');
    const leaves = (e: Conditions): string[] => (typeof e === 'string' ? [e] : Object.values(e).flatMap(leaves));
    const targets = [manifest.main, manifest.types, ...Object.values(manifest.bin), ...Object.values(manifest.typesVersions['*']!).flat(),
      ...Object.values(manifest.exports).flatMap(leaves)];
    const needed = [...targets.map(norm), 'README.md', 'LICENSE', 'docs/SPEC.md', 'cjs/load.cjs', 'wasm/sparse_mla.wasm',
      'dist/backends/wasm/worker.js', 'dist/reference/parallel_worker.js', 'native/install.mjs', 'native/addon_locate.mjs',
      'native/build_tools.mjs', 'native/addon_locate.d.mts', 'CMakeLists.txt', 'native/CMakeLists.txt'];
    expect(needed.filter((f) => !files.includes(f))).toEqual([]);
    expect(files.filter((f) => f.startsWith('examples/')).length).toBeGreaterThan(0);
    // tests, benchmarks and their results, build trees, CI and GPU-session files, the perf diary
    const unwanted = files.filter((f) => /^(test|bench|build|\.ci|\.gpu|\.cudabuild|node_modules)\//.test(f) || /\.(tgz|log)$/.test(f) || f === 'docs/perf-history.md');
    expect(unwanted).toEqual([]);
    const big = files.filter((f) => statSync(join(ROOT, f)).size > 1 << 20);
    expect(big, 'files over 1 MiB (the prebuilt addons come from prepack, not from this list)').toEqual([]);
    // every source map points at files the package carries
    const dangling = files.filter((f) => f.endsWith('.js.map')).flatMap((m) =>
      (JSON.parse(readFileSync(join(ROOT, m), 'utf8')) as { sources: string[] }).sources
        .map((s) => join(dirname(m), s))
        .filter((s) => !files.includes(s))
        .map((s) => `${m} -> ${s}`));
    expect(dangling).toEqual([]);
    // no `any` in the declarations consumers compile against (outside comments)
    expect(files.filter((f) => f === 'cjs/make_types.mjs'), 'the build step of the CommonJS typings').toEqual([]);
    const anys = files.filter((f) => (f.startsWith('dist/') && /\.d\.c?ts$/.test(f)) || f.endsWith('.d.mts')).flatMap((f) =>
      readFileSync(join(ROOT, f), 'utf8').split('\n').map((line, i) => ({ line, at: `${f}:${i + 1}` }))
        .filter(({ line }) => !/^\s*(\*|\/\*|\/\/)/.test(line) && /\bany\b/.test(line.replace(/\/\/.*$|\/\*.*?\*\/|'[^']*'|`[^`]*`/g, '')))
        .map(({ at, line }) => `${at}: ${line.trim()}`));
    expect(anys).toEqual([]);
  });

  // What a strict TypeScript consumer compiles against the shipped .d.ts, with skipLibCheck off and
  // no @types/node (the public types must not need it), under each moduleResolution in use.
  const CONSUMER = `
import { createEngine, createKvCache, createPlan, listBackends, prefillLayer, tensor, toBf16, bf16ToFloat32, SparseMlaError } from 'sparse-mla';
import type { BackendInfo, Engine, EngineOptions, ErrorCode, KvCache, SparsePrefillResult, Tensor } from 'sparse-mla';
import { sparsePrefillReference } from 'sparse-mla/reference';
declare const console: { log(...values: unknown[]): void };
type NotAny<T> = 0 extends 1 & T ? never : T;
function notAny<T>(value: NotAny<T>): T {
  return value;
}

export async function main(): Promise<void> {
  const options: EngineOptions = { backend: 'wasm', workers: 1 };
  const engine: Engine = notAny(await createEngine(options));
  const device: number | undefined = engine.device;
  const backends: BackendInfo[] = notAny(await listBackends());
  const cache: KvCache = notAny(createKvCache('v4', { pageSize: 64, numPages: 1 }));
  const ids = [0, 1, 2, 3];
  await engine.quantizeKCache({ cache, tokenIds: ids, rows: toBf16({ shape: [4, 512], data: new Float32Array(4 * 512).fill(0.5) }) });
  const kv: Tensor<'bf16'> = notAny(await engine.dequantizeKCachePaged({ cache, tokenIds: ids }));
  const q = toBf16({ shape: [1, 64, 512], data: new Float32Array(64 * 512).fill(0.25) });
  const indices = tensor('int32', [1, 4], Int32Array.from(ids));
  const res: SparsePrefillResult = notAny(await engine.sparsePrefill({ q, kv, indices, smScale: 0.04 }));
  const out: Float32Array = bf16ToFloat32(res.out).data;
  const ref = notAny(sparsePrefillReference({ q, kv, indices, smScale: 0.04 }));
  try {
    await engine.sparsePrefill({ q, kv, indices, smScale: -1 });
  } catch (e) {
    if (e instanceof SparseMlaError) {
      const code: ErrorCode = e.code;
      console.log(code);
    }
  }
  console.log(device, backends.length, out.length, ref, notAny(createPlan), notAny(prefillLayer));
  await engine.dispose();
}
`;
  // `import x = require()` from a CommonJS file: the values and types through the namespace
  const CONSUMER_REQUIRE = `
import sparseMla = require('sparse-mla');
import reference = require('sparse-mla/reference');
declare const console: { log(...values: unknown[]): void };
export async function main(): Promise<void> {
  const engine: sparseMla.Engine = await sparseMla.createEngine({ backend: 'wasm', workers: 1 });
  const kv: sparseMla.Tensor<'bf16'> = sparseMla.toBf16({ shape: [4, 576], data: new Float32Array(4 * 576) });
  const q = sparseMla.toBf16({ shape: [1, 16, 576], data: new Float32Array(16 * 576) });
  const indices = sparseMla.tensor('int32', [1, 4], Int32Array.from([0, 1, 2, 3]));
  const res: sparseMla.SparsePrefillResult = await engine.sparsePrefill({ q, kv, indices, smScale: 0.04 });
  const ref = reference.sparsePrefillReference({ q, kv, indices, smScale: 0.04 });
  const code: sparseMla.ErrorCode | null = res.out.shape.length === 3 ? null : 'INVALID_SHAPE';
  console.log(code, ref.out.length, new sparseMla.SparseMlaError('INVALID_SHAPE', 'x') instanceof Error);
  await engine.dispose();
}
`;
  const STRICT = { strict: true, exactOptionalPropertyTypes: true, noUncheckedIndexedAccess: true, noImplicitOverride: true, noPropertyAccessFromIndexSignature: true,
    skipLibCheck: false, types: [], lib: ['ES2022'], target: 'ES2022', noEmit: true };

  test('a strict TypeScript consumer compiles against the shipped types: nodenext (ESM and CJS), node16 (ESM and CJS), bundler, node10', async () => {
    writeFileSync(join(app, 'consumer.ts'), CONSUMER);
    writeFileSync(join(app, 'consumer_cjs.cts'), CONSUMER.replace("import type {", "import type { Plan,").replace('export async function main', 'export type P = Plan;\nexport async function main'));
    writeFileSync(join(app, 'consumer_require.cts'), CONSUMER_REQUIRE);
    const configs: Record<string, { module: string; moduleResolution: string; files: string[] }> = {
      nodenext: { module: 'nodenext', moduleResolution: 'nodenext', files: ['consumer.ts', 'consumer_cjs.cts'] },
      node16: { module: 'node16', moduleResolution: 'node16', files: ['consumer.ts'] },
      // CommonJS files read the "require" condition's .d.cts (TS1479 on the ES module's .d.ts under
      // node16, and under nodenext before TS 5.8)
      'node16-cjs': { module: 'node16', moduleResolution: 'node16', files: ['consumer_cjs.cts', 'consumer_require.cts'] },
      'nodenext-require': { module: 'nodenext', moduleResolution: 'nodenext', files: ['consumer_require.cts'] },
      bundler: { module: 'preserve', moduleResolution: 'bundler', files: ['consumer.ts'] },
      // the legacy resolution reads "types" and "typesVersions" (sparse-mla/reference), not "exports"
      node10: { module: 'commonjs', moduleResolution: 'node10', files: ['consumer.ts'] },
    };
    // the four compilers at once (a few seconds each)
    const failures = await Promise.all(Object.entries(configs).map(([name, { files: entry, ...mode }]) => {
      writeFileSync(join(app, `tsconfig.${name}.json`), JSON.stringify({ compilerOptions: { ...STRICT, ...mode }, files: entry }));
      return new Promise<string>((resolve) => {
        execFile(process.execPath, [tsc, '-p', `tsconfig.${name}.json`], { cwd: app, encoding: 'utf8', timeout: 120_000 }, (e, stdout, stderr) => resolve(e ? `${name}:\n${stdout}${stderr}` : ''));
      });
    }));
    expect(failures.filter(Boolean).join('\n')).toBe('');
  }, 240_000);

  test('from node_modules with the cwd elsewhere: the CLI runs, the workers find their script and the .wasm, the process exits without dispose()', () => {
    const outside = os.tmpdir(); // not the project, not the package
    const bin = join(app, 'node_modules', '.bin', 'sparse-mla');
    const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SPARSE_MLA_')));
    const help = spawnSync(bin, ['--help'], { cwd: outside, encoding: 'utf8', timeout: 60_000, env: clean });
    expect(help.status, help.stderr).toBe(0);
    expect(help.stdout).toContain('Usage: sparse-mla <command>');
    const info = JSON.parse(spawnSync(bin, ['info', '--json'], { cwd: outside, encoding: 'utf8', timeout: 60_000, env: clean }).stdout) as InfoJson & { backends: { details?: { module?: string } }[] };
    const wasm = info.backends.find((b) => b.name === 'wasm')!;
    expect(wasm.available).toBe(true);
    expect(wasm.details!.module).toBe(join(pkg, 'wasm', 'sparse_mla.wasm')); // a path, not a URL's %20 / %C3%BC
    // ESM and require() from the consumer's files; an engine left undisposed must not hold the process
    writeFileSync(join(app, 'use.mjs'), `import { createRequire } from 'node:module';
import { createEngine, tensor, toBf16 } from 'sparse-mla';
const cjs = createRequire(import.meta.url)('sparse-mla');
const engine = await createEngine({ backend: 'wasm', workers: 2 });
const kv = toBf16({ shape: [8, 576], data: new Float32Array(8 * 576).fill(0.5) });
const q = toBf16({ shape: [2, 16, 576], data: new Float32Array(2 * 16 * 576).fill(0.25) });
const { out } = await engine.sparsePrefill({ q, kv, indices: tensor('int32', [2, 8], Int32Array.from({ length: 16 }, (_, i) => i % 8)), smScale: 0.04 });
console.log(engine.backend, out.shape.join('x'), cjs.createEngine === createEngine);
`);
    const start = Date.now();
    const use = spawnSync(process.execPath, [join(app, 'use.mjs')], { cwd: outside, encoding: 'utf8', timeout: 30_000, env: clean });
    expect(use.stderr).toBe('');
    expect(use.status).toBe(0);
    expect(use.stdout.trim()).toBe('wasm 2x16x512 true');
    expect(Date.now() - start).toBeLessThan(20_000);
  }, 120_000);
});
