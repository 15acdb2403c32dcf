// Where the native addon can come from and which one a process should load. Shared by the install
// script (native/install.mjs), the packing step (native/prebuild.mjs) and the runtime loader
// (src/backends/native/binding.ts), so the three agree on every path and rule.
//
// Two sources:
//   prebuilt      prebuilds/<platform>-<arch>/ in the npm package (built by native/prebuild.mjs at
//                 `npm pack`): one addon per CPU level of PREBUILT_TARGETS, described by manifest.json
//   source build  build/addon/Release/sparse_mla_native.node, built by native/install.mjs (a
//                 checkout, a platform without a prebuilt addon, or SPARSE_MLA_BUILD_FROM_SOURCE=1)
// What the install chose, and why, is in build/install-status.json (INSTALL_STATUS_FILE).
// A source build records the fingerprint of the sources it was built from (build.sources), and
// the loader refuses one whose sources have changed since (addonSourceFingerprint).
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PACKAGE_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
export const ADDON_NAME = 'sparse_mla_native';
export const SOURCE_BUILD_DIR = join(PACKAGE_ROOT, 'build', 'addon');
export const SOURCE_BUILD_ADDON = join(SOURCE_BUILD_DIR, 'Release', `${ADDON_NAME}.node`);
export const SOURCE_BUILD_LOG = join(SOURCE_BUILD_DIR, 'build.log');
export const INSTALL_STATUS_FILE = join(PACKAGE_ROOT, 'build', 'install-status.json');
export const PREBUILDS_DIR = join(PACKAGE_ROOT, 'prebuilds');
export const MANIFEST_NAME = 'manifest.json';
export const ADDON_PATH_ENV = 'SPARSE_MLA_NATIVE_ADDON';
export const BUILD_FROM_SOURCE_ENV = 'SPARSE_MLA_BUILD_FROM_SOURCE';

const V2_FLAGS = ['cx16', 'lahf_lm', 'popcnt', 'sse4_1', 'sse4_2', 'ssse3'];
/**
 * The x86-64 psABI levels as Linux /proc/cpuinfo flag names. v3's LZCNT (Linux's `abm`) is not asked
 * for: every CPU with AVX2 and BMI1 has it, and some VMs' kernels leave `abm` out of /proc/cpuinfo
 * while the CPU has it (a Firecracker guest, as AWS Lambda runs), which would hand such a machine
 * the x86-64-v2 addon.
 */
export const LEVEL_FLAGS = {
  'x86-64-v2': V2_FLAGS,
  'x86-64-v3': [...V2_FLAGS, 'avx', 'avx2', 'bmi1', 'bmi2', 'f16c', 'fma', 'movbe', 'xsave'],
  // AArch64 Linux always has FP and Advanced SIMD (NEON), so the baseline asks for nothing: a
  // check would fail under emulators whose /proc/cpuinfo is the host's.
  'armv8-a': [],
};

/**
 * What the package carries prebuilt, per platform, as data: the addons best first, each a -march
 * value (cpuArch) and the /proc/cpuinfo flags it needs (LEVEL_FLAGS). The loader takes the first
 * the CPU has every flag of; where the flags cannot be read, only the last (the baseline). The
 * packing step (native/prebuild.mjs) builds exactly these; cuda: whether they carry the kernels.
 */
export const PREBUILT_TARGETS = {
  'linux-x64': { levels: ['x86-64-v3', 'x86-64-v2'], cuda: true },
  // cpu only: the CUDA toolkit where the package is packed has no aarch64 (sbsa) target
  'linux-arm64': { levels: ['armv8-a'], cuda: false },
};

export const platformKey = (platform = process.platform, arch = process.arch) => `${platform}-${arch}`;

export function isTruthyEnv(value) {
  return ['1', 'true', 'yes', 'on'].includes(String(value ?? '').trim().toLowerCase());
}

/** A checkout of the repository (not an installed package): the developer builds from source. */
export function isCheckout(root = PACKAGE_ROOT) {
  return existsSync(join(root, '.git'));
}

/** The command that builds the addon here, for messages. */
export function howToBuild(root = PACKAGE_ROOT) {
  return isCheckout(root)
    ? 'build it with `npm run build:native` (CMake and a C++ compiler; nvcc too for the cuda backend)'
    : 'build it from source with `SPARSE_MLA_BUILD_FROM_SOURCE=1 npm rebuild sparse-mla` (needs CMake, a C++ compiler and the packages cmake-js and node-addon-api; nvcc too for the cuda backend)';
}

/** The folders holding the sources compiled into the addon, and which of their files count. */
export const ADDON_SOURCE_DIRS = ['cpp/include', 'cpp/src', 'native/addon', 'native/cuda'];
const ADDON_SOURCE_FILE = /\.(c|cc|cpp|h|hpp|cu|cuh|inc)$/;
const ADDON_BUILD_FILES = ['CMakeLists.txt', 'native/CMakeLists.txt'];

/**
 * A hash of the sources the addon is compiled from (paths and bytes), or null where this copy of
 * the package has none. native/build_tools.mjs compiles it into the addon (build.sources); a
 * source build whose recorded hash differs from its sources' was built from other sources (a pull
 * or merge since, without a rebuild) and is not loaded: what its JS surface promises may have
 * changed under the same names, e.g. which memory an op writes and when.
 */
export function addonSourceFingerprint(root = PACKAGE_ROOT) {
  if (!existsSync(join(root, 'native', 'addon'))) return null;
  const files = ADDON_BUILD_FILES.filter((f) => existsSync(join(root, f)));
  const walk = (dir) => {
    for (const e of readdirSync(join(root, dir), { withFileTypes: true })) {
      const rel = `${dir}/${e.name}`;
      if (e.isDirectory()) walk(rel);
      else if (ADDON_SOURCE_FILE.test(e.name) && !e.name.startsWith('.')) files.push(rel);
    }
  };
  try {
    for (const dir of ADDON_SOURCE_DIRS) if (existsSync(join(root, dir))) walk(dir);
    files.sort();
    const hash = createHash('sha256');
    for (const f of files) hash.update(`${f}\0`).update(readFileSync(join(root, f))).update('\0');
    return hash.digest('hex').slice(0, 16);
  } catch {
    return null;
  }
}

/**
 * The /proc/cpuinfo flags of the first CPU (x86's `flags` line, AArch64's `Features`), or null
 * where there is no such file or line.
 */
export function readCpuFlags(cpuinfo) {
  let text = cpuinfo;
  if (text === undefined) {
    try {
      text = readFileSync('/proc/cpuinfo', 'utf8');
    } catch {
      return null;
    }
  }
  const line = text.split('\n').find((l) => /^(flags|Features)\s*:/.test(l));
  return line ? new Set(line.replace(/^(flags|Features)\s*:/, '').trim().split(/\s+/).filter(Boolean)) : null;
}

/** The flags of `level` that `flags` lacks. */
export function missingFlags(level, flags) {
  return LEVEL_FLAGS[level].filter((f) => !flags.has(f));
}

export function readJson(path) {
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch {
    return null;
  }
}

/** What the install script recorded, or null when it did not run (pnpm, --ignore-scripts). */
export function readInstallStatus(path = INSTALL_STATUS_FILE) {
  return readJson(path);
}

/**
 * The prebuilt addon this machine should load: { ok: true, path, level, manifest, entry }, or
 * { ok: false, why } saying why none fits.
 */
export function selectPrebuilt({ root = PACKAGE_ROOT, platform = process.platform, arch = process.arch, cpuinfo } = {}) {
  const prebuilds = join(root, 'prebuilds');
  const key = platformKey(platform, arch);
  const dir = join(prebuilds, key);
  const manifest = readJson(join(dir, MANIFEST_NAME));
  if (!manifest || !Array.isArray(manifest.addons)) {
    if (!existsSync(prebuilds)) return { ok: false, why: 'this copy of the package carries no prebuilt addons' };
    let carried = [];
    try {
      carried = readdirSync(prebuilds);
    } catch {
      /* unreadable: no list */
    }
    return { ok: false, why: `no prebuilt addon for ${key} (the package carries ${carried.length ? carried.join(', ') : 'none'})` };
  }
  const entries = manifest.addons.filter((a) => a && typeof a.file === 'string' && typeof a.cpuArch === 'string');
  const target = Object.hasOwn(PREBUILT_TARGETS, key) ? PREBUILT_TARGETS[key] : null;
  if (target) {
    const levels = target.levels;
    const lowest = levels[levels.length - 1];
    // Without /proc/cpuinfo the CPU cannot be checked: only the baseline level is taken.
    const flags = readCpuFlags(cpuinfo);
    const runs = (level) => LEVEL_FLAGS[level].length === 0 || (flags ? missingFlags(level, flags).length === 0 : level === lowest);
    for (const level of levels) {
      const entry = entries.find((a) => a.cpuArch === level);
      if (!entry) continue;
      if (runs(level)) return prebuiltAt(dir, entry, level, manifest);
    }
    const listed = entries.map((a) => a.cpuArch).join(', ') || 'none';
    if (!entries.some((a) => levels.includes(a.cpuArch))) return { ok: false, why: `the ${key} manifest lists none of the levels ${levels.join(', ')} (it lists ${listed})` };
    const lacking = flags ? missingFlags(lowest, flags) : [];
    if (lacking.length) return { ok: false, why: `this CPU lacks ${lacking.join(', ')}, which the prebuilt addons need (${lowest} at least)` };
    if (!flags) return { ok: false, why: 'the CPU could not be checked (no /proc/cpuinfo)' };
    return { ok: false, why: `the ${key} prebuilt addons (${listed}) all need more than this CPU has` };
  }
  const entry = entries[0];
  return entry ? prebuiltAt(dir, entry, entry.cpuArch, manifest) : { ok: false, why: `the ${key} manifest lists no addon` };
}

/** The chosen prebuilt addon, unless its file is not the one the manifest lists (damagedCopy). */
function prebuiltAt(dir, entry, level, manifest) {
  const path = join(dir, entry.file);
  const damage = damagedCopy(path, entry);
  return damage ? { ok: false, why: damage } : { ok: true, path, level, manifest, entry };
}

/**
 * Why a prebuilt addon file is not the one its manifest lists, or null. Only the size is compared,
 * before anything maps the file: a copy cut short (an interrupted copy or extraction, a full disk)
 * kills the process with SIGBUS when the dynamic loader maps it, which no try/catch can turn into
 * an error. A file that is not there is left for the loader to report.
 */
function damagedCopy(path, entry) {
  if (!Number.isSafeInteger(entry.bytes) || entry.bytes <= 0) return null;
  let size;
  try {
    size = statSync(path).size;
  } catch {
    return null;
  }
  return size === entry.bytes ? null : `${path} is ${size} bytes where the package's manifest says ${entry.bytes}: a damaged copy of the package; reinstall it`;
}

/**
 * The addons to try, in order: SPARSE_MLA_NATIVE_ADDON alone when set; else the one the install
 * chose first (a source build it made, or the prebuilt), then the other.
 */
export function addonCandidates({ env = process.env, root = PACKAGE_ROOT, status = readInstallStatus(join(root, 'build', 'install-status.json')), prebuilt = selectPrebuilt({ root }) } = {}) {
  if (env[ADDON_PATH_ENV]) return [{ path: env[ADDON_PATH_ENV], origin: 'env' }];
  const source = { path: join(root, 'build', 'addon', 'Release', `${ADDON_NAME}.node`), origin: 'source build' };
  const pre = prebuilt.ok ? { path: prebuilt.path, origin: 'prebuilt', level: prebuilt.level } : null;
  const order = status?.addon === 'built' ? [source, pre] : [pre, source];
  return order.filter(Boolean);
}
