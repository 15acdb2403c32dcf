#!/usr/bin/env node
// `npm pack` / `npm publish` (prepack): builds the prebuilt addons the package carries, so that
// `npm install sparse-mla` on linux-x64 or linux-arm64 gets the native backends with no toolchain:
//   prebuilds/linux-x64/sparse_mla_native.x86-64-v3.node   AVX2+FMA core (the loader checks the CPU)
//   prebuilds/linux-x64/sparse_mla_native.x86-64-v2.node   SSE core, for CPUs without AVX2
//     each with the sm_90a kernels and cudart linked statically
//   prebuilds/linux-arm64/sparse_mla_native.armv8-a.node   NEON core, cpu backend only: built with
//     the cross compiler aarch64-linux-gnu-g++ (the CUDA toolkit here has no aarch64/sbsa target)
// and prebuilds/<platform>/manifest.json describing them (with the glibc and libstdc++ versions
// they need; none may need more than the floor README states, FLOOR below).
// No addon ships a path of the tree it was built in: build_tools.mjs scrubBuildTree rewrites those
// nvcc's line info writes, relative to the package root, and packing fails if any remains. Builds
// of one commit are byte-identical wherever the tree is (native/CMakeLists.txt gives nvcc the
// sources by one spelling in every tree); .ci/package_check.sh rebuilds the packed x86-64-v2 addon
// from the unpacked tarball and requires the packed bytes.
// The levels are PREBUILT_TARGETS of addon_locate.mjs, the data the loader chooses by. `--clean`
// (postpack) removes prebuilds/ again, so a checkout never loads a stale prebuilt addon. Build
// trees stay in build/prebuild-<level>/, so packing again rebuilds only what changed.
// Environment:
//   SPARSE_MLA_PACK_CUDA=ON|OFF   ON (default): fail rather than pack x64 addons without the kernels
//   SPARSE_MLA_PACK_ARM64=ON|OFF  ON (default): fail rather than pack without the linux-arm64 addon
//                                 (needs g++-aarch64-linux-gnu); OFF: pack linux-x64 only, saying so
//   SPARSE_MLA_NATIVE_VERBOSE=1   stream the build output instead of logging it
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ADDON_NAME, MANIFEST_NAME, PACKAGE_ROOT, PREBUILDS_DIR, PREBUILT_TARGETS, platformKey } from './addon_locate.mjs';
import { buildAddon, findBuildTools, findCrossCompilers, inspectElf, logExcerpt, newerVersion, newestVersion, probeAddon } from './build_tools.mjs';

const env = process.env;
const say = (line) => console.error(`sparse-mla prebuild: ${line}`);
const die = (line) => {
  say(line);
  process.exit(1);
};

if (process.argv.includes('--clean')) {
  rmSync(PREBUILDS_DIR, { recursive: true, force: true });
  process.exit(0);
}

const HOST = 'linux-x64';
if (platformKey() !== HOST) die(`prebuilt addons are built on ${HOST}; this is ${platformKey()}`);
const onOff = (name) => {
  const mode = (env[name] || 'ON').toUpperCase();
  if (mode !== 'ON' && mode !== 'OFF') die(`${name}: expected ON or OFF, got ${JSON.stringify(env[name])}`);
  return mode;
};
const cudaMode = onOff('SPARSE_MLA_PACK_CUDA');
const arm64Mode = onOff('SPARSE_MLA_PACK_ARM64');
const tools = findBuildTools(PACKAGE_ROOT, env);
if (!tools.ok) die(`cannot build the prebuilt addons: ${tools.why}`);

// How each platform is built here. A cross build cannot be loaded on this machine, so its addon is
// judged by its ELF (machine, Node-API entry point, libraries, symbol versions) and the strings its
// build compiles in (the SIMD path and -march it reports); .ci/arm64_check.sh runs it emulated.
const BUILDS = {
  'linux-x64': { machine: 'Advanced Micro Devices X86-64', withCuda: cudaMode, cross: null },
  'linux-arm64': { machine: 'AArch64', withCuda: 'OFF', simd: 'NEON', cross: { prefix: 'aarch64-linux-gnu-', processor: 'aarch64', apt: 'g++-aarch64-linux-gnu' } },
};
// What a portable addon may link: glibc's and GCC's runtime libraries, which every distribution has.
const SYSTEM_LIBRARY = /^(libc\.so\.6|libm\.so\.6|libdl\.so\.2|librt\.so\.1|libpthread\.so\.0|libstdc\+\+\.so\.6|libgcc_s\.so\.1|ld-linux-[\w-]+\.so\.\d)$/;
const ARM64_SKIPPED = 'SPARSE_MLA_PACK_ARM64=OFF';

const platforms = [HOST];
const arm64Compilers = findCrossCompilers(BUILDS['linux-arm64'].cross.prefix);
if (arm64Mode === 'OFF') {
  say(`${ARM64_SKIPPED}: packing WITHOUT the linux-arm64 addon (arm64 installs then build from source or run on wasm)`);
} else if (!arm64Compilers.ok) {
  die(`cannot build the linux-arm64 addon: ${arm64Compilers.why} (apt-get install ${BUILDS['linux-arm64'].cross.apt}; or set ${ARM64_SKIPPED} to pack without it)`);
} else {
  platforms.push('linux-arm64');
}

function gitCommit() {
  const r = spawnSync('git', ['rev-parse', 'HEAD'], { cwd: PACKAGE_ROOT, encoding: 'utf8' });
  if (r.status !== 0) return null;
  const dirty = spawnSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: PACKAGE_ROOT, encoding: 'utf8' }).stdout?.trim();
  return `${r.stdout.trim()}${dirty ? '-dirty' : ''}`;
}

/** Builds one platform's levels into prebuilds/<platform>/ and returns its manifest. */
async function buildPlatform(platform) {
  const spec = BUILDS[platform];
  const compilers = spec.cross ? { cc: arm64Compilers.cc, cxx: arm64Compilers.cxx } : tools.compilers;
  const cxx = compilers?.cxx ?? tools.cxx;
  const defines = spec.cross ? { CMAKE_SYSTEM_NAME: 'Linux', CMAKE_SYSTEM_PROCESSOR: spec.cross.processor } : {};
  const outDir = join(PREBUILDS_DIR, platform);
  mkdirSync(outDir, { recursive: true });
  const addons = [];
  const glibc = [];
  const glibcxx = [];
  let cuda = null;
  for (const level of PREBUILT_TARGETS[platform].levels) {
    const buildDir = join(PACKAGE_ROOT, 'build', `prebuild-${level}`);
    const logPath = join(buildDir, 'build.log');
    say(`building ${platform} ${level} (CUDA ${spec.withCuda}${spec.cross ? `, ${cxx}` : ''})${env.SPARSE_MLA_NATIVE_VERBOSE === '1' ? '' : `, log: ${logPath}`}`);
    const r = await buildAddon({ root: PACKAGE_ROOT, cmakeJs: tools.cmakeJs, compilers, outDir: buildDir, cpuArch: level, withCuda: spec.withCuda, portable: true, defines, logPath, verbose: env.SPARSE_MLA_NATIVE_VERBOSE === '1' });
    if (!r.ok) die(`${level}: ${r.problem} (log: ${logPath})\n${logExcerpt(logPath).map((l) => `  ${l}`).join('\n')}`);
    // no path of this machine's build tree ships (build_tools.mjs scrubBuildTree)
    if (!r.scrub.ok) die(`${level}: ${r.scrub.why}`);
    if (r.scrub.left.length) die(`${level}: the addon holds paths of the build tree ${PACKAGE_ROOT}:\n${r.scrub.left.slice(0, 8).map((l) => `  ${l}`).join('\n')}`);
    const elf = inspectElf(r.addon);
    if (!elf.ok) die(`${level}: cannot read the built addon: ${elf.why}`);
    if (elf.machine !== spec.machine || elf.elfClass !== 'ELF64' || elf.type !== 'DYN') die(`${level}: built a ${elf.elfClass} ${elf.type} for ${elf.machine}, not a shared object for ${spec.machine}`);
    if (!elf.exportsNapiInit) die(`${level}: the addon does not export napi_register_module_v1`);
    const foreign = elf.needed.filter((l) => !SYSTEM_LIBRARY.test(l));
    if (foreign.length) die(`${level}: the addon needs ${foreign.join(', ')}, which a user's machine may lack`);
    const bytes = readFileSync(r.addon);
    let simd;
    if (spec.cross) {
      // the strings core_simd.cpp and addon.cpp compile in (build.simd, build.cpuArch)
      const has = (text) => bytes.includes(Buffer.from(`${text}\0`));
      if (!has(spec.simd) || !has(level)) die(`${level}: the addon does not name ${spec.simd} and ${level} as its SIMD path and -march (log: ${logPath})`);
      simd = spec.simd;
      cuda = { built: false, why: `the ${platform} prebuilt addon has the cpu backend only: the CUDA toolkit where the package was packed has no aarch64 target` };
    } else {
      // the manifest names each addon's own -march path, not the AVX-512 copy an x86-64-v3 addon hands its calls
      // to on a packing host that has AVX-512 (cpp/src/isa_dispatch.cpp)
      const probe = probeAddon(r.addon, 60_000, { SPARSE_MLA_CPU_ISA: 'baseline' });
      if (!probe.ok) die(`${level}: the built addon does not load: ${probe.why}`);
      const { build, cuda: c } = probe.info;
      if (build?.cpuArch !== level) die(`${level}: the addon reports cpuArch ${build?.cpuArch}`);
      if (c.built !== (spec.withCuda === 'ON')) die(`${level}: CUDA ${c.built ? 'built' : 'not built'} although SPARSE_MLA_PACK_CUDA=${spec.withCuda} (log: ${logPath})`);
      simd = build.simd;
      cuda = c.built ? { built: true, arch: c.arch, nvcc: c.compilerVersion, runtime: 'static' } : { built: false, why: 'the package was packed without the CUDA kernels (SPARSE_MLA_PACK_CUDA=OFF, no nvcc where it was packed)' };
    }
    const file = `${ADDON_NAME}.${level}.node`;
    copyFileSync(r.addon, join(outDir, file));
    addons.push({ file, cpuArch: level, simd, bytes: statSync(join(outDir, file)).size, sha256: createHash('sha256').update(bytes).digest('hex') });
    glibc.push(elf.glibc);
    glibcxx.push(elf.glibcxx);
    say(`${platform}/${file}: ${simd}, ${cuda.built ? `CUDA ${cuda.arch}` : 'no CUDA'}, glibc ${elf.glibc}, GLIBCXX ${elf.glibcxx}, ${(addons.at(-1).bytes / 2 ** 20).toFixed(2)} MiB, ${Math.round(r.seconds)} s${r.scrub.paths || r.scrub.stamps ? `; device line info: ${r.scrub.paths} build-tree paths made relative, ${r.scrub.stamps} file stamps zeroed` : ''}`);
  }
  return {
    package: 'sparse-mla',
    version,
    platform,
    builtAt: new Date().toISOString(),
    commit: gitCommit(),
    compiler: spawnSync(cxx, ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0] ?? cxx,
    nodeApi: 8,
    glibc: newestVersion(glibc),
    glibcxx: newestVersion(glibcxx),
    cuda,
    addons,
  };
}

rmSync(PREBUILDS_DIR, { recursive: true, force: true });
const version = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')).version;
const manifests = {};
for (const platform of platforms) manifests[platform] = await buildPlatform(platform);
// README states one floor for every platform: glibc 2.34 and GCC 11's libstdc++ (RHEL 9, Amazon
// Linux 2023); no addon may need more.
const FLOOR = { glibc: '2.34', glibcxx: '3.4.29' };
for (const [platform, m] of Object.entries(manifests)) {
  for (const key of ['glibc', 'glibcxx']) {
    if (newerVersion(m[key], FLOOR[key])) die(`${platform}: the addons need ${key} ${m[key]}, newer than the ${FLOOR[key]} README promises (an objdump -T of the addon names the symbols)`);
  }
}
for (const [platform, m] of Object.entries(manifests)) {
  writeFileSync(join(PREBUILDS_DIR, platform, MANIFEST_NAME), `${JSON.stringify(m, null, 2)}\n`);
  say(`wrote ${join(PREBUILDS_DIR, platform, MANIFEST_NAME)} (glibc >= ${m.glibc ?? 'unknown'}, GLIBCXX >= ${m.glibcxx ?? 'unknown'})`);
}
if (!manifests['linux-arm64']) say(`the package carries NO linux-arm64 addon (${ARM64_SKIPPED})`);
