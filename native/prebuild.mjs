#!/usr/bin/env node
// `npm pack` / `npm publish` (prepack): builds the prebuilt addons the package carries, so that
// `npm install sparse-mla` on a linux-x64 machine gets the cpu and cuda backends with no toolchain:
//   prebuilds/linux-x64/sparse_mla_native.x86-64-v3.node   AVX2+FMA core (the loader checks the CPU)
//   prebuilds/linux-x64/sparse_mla_native.x86-64-v2.node   SSE core, for CPUs without AVX2
// each with the sm_90a kernels and cudart linked statically, and prebuilds/linux-x64/manifest.json
// describing them (with the glibc version they need). `--clean` (postpack) removes prebuilds/ again,
// so a checkout never loads a stale prebuilt addon. Build trees stay in build/prebuild-<level>/,
// so packing again rebuilds only what changed.
// Environment:
//   SPARSE_MLA_PACK_CUDA=ON|OFF   ON (default): fail rather than pack addons without the kernels
//   SPARSE_MLA_NATIVE_VERBOSE=1   stream the build output instead of logging it
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ADDON_NAME, MANIFEST_NAME, PACKAGE_ROOT, PREBUILDS_DIR, PREBUILT_LEVELS, platformKey } from './addon_locate.mjs';
import { buildAddon, findBuildTools, logExcerpt, probeAddon } from './build_tools.mjs';

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

const PLATFORM = 'linux-x64';
if (platformKey() !== PLATFORM) die(`prebuilt addons are built on ${PLATFORM}; this is ${platformKey()}`);
const cudaMode = (env.SPARSE_MLA_PACK_CUDA || 'ON').toUpperCase();
if (cudaMode !== 'ON' && cudaMode !== 'OFF') die(`SPARSE_MLA_PACK_CUDA: expected ON or OFF, got ${JSON.stringify(env.SPARSE_MLA_PACK_CUDA)}`);
const tools = findBuildTools(PACKAGE_ROOT, env);
if (!tools.ok) die(`cannot build the prebuilt addons: ${tools.why}`);

/** The newest GLIBC_x.y symbol version the file needs (objdump -T), or null without objdump. */
function glibcNeeded(file) {
  const r = spawnSync('objdump', ['-T', file], { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) return null;
  const versions = [...r.stdout.matchAll(/\bGLIBC_(\d+)\.(\d+)/g)].map((m) => [Number(m[1]), Number(m[2])]);
  if (versions.length === 0) return null;
  versions.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  return versions.at(-1).join('.');
}

function gitCommit() {
  const r = spawnSync('git', ['rev-parse', 'HEAD'], { cwd: PACKAGE_ROOT, encoding: 'utf8' });
  if (r.status !== 0) return null;
  const dirty = spawnSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: PACKAGE_ROOT, encoding: 'utf8' }).stdout?.trim();
  return `${r.stdout.trim()}${dirty ? '-dirty' : ''}`;
}

const outDir = join(PREBUILDS_DIR, PLATFORM);
rmSync(PREBUILDS_DIR, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });
const version = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')).version;
const addons = [];
let cuda = null;
const glibc = [];
for (const level of PREBUILT_LEVELS) {
  const buildDir = join(PACKAGE_ROOT, 'build', `prebuild-${level}`);
  const logPath = join(buildDir, 'build.log');
  say(`building ${level} (CUDA ${cudaMode})${env.SPARSE_MLA_NATIVE_VERBOSE === '1' ? '' : `, log: ${logPath}`}`);
  const r = await buildAddon({ root: PACKAGE_ROOT, cmakeJs: tools.cmakeJs, compilers: tools.compilers, outDir: buildDir, cpuArch: level, withCuda: cudaMode, portable: true, logPath, verbose: env.SPARSE_MLA_NATIVE_VERBOSE === '1' });
  if (!r.ok) die(`${level}: ${r.problem} (log: ${logPath})\n${logExcerpt(logPath).map((l) => `  ${l}`).join('\n')}`);
  const probe = probeAddon(r.addon);
  if (!probe.ok) die(`${level}: the built addon does not load: ${probe.why}`);
  const { build, cuda: c } = probe.info;
  if (build?.cpuArch !== level) die(`${level}: the addon reports cpuArch ${build?.cpuArch}`);
  if (c.built !== (cudaMode === 'ON')) die(`${level}: CUDA ${c.built ? 'built' : 'not built'} although SPARSE_MLA_PACK_CUDA=${cudaMode} (log: ${logPath})`);
  const file = `${ADDON_NAME}.${level}.node`;
  copyFileSync(r.addon, join(outDir, file));
  const bytes = readFileSync(join(outDir, file));
  addons.push({ file, cpuArch: level, simd: build.simd, bytes: statSync(join(outDir, file)).size, sha256: createHash('sha256').update(bytes).digest('hex') });
  cuda = c.built ? { built: true, arch: c.arch, nvcc: c.compilerVersion, runtime: 'static' } : { built: false, why: 'the package was packed without the CUDA kernels (SPARSE_MLA_PACK_CUDA=OFF, no nvcc where it was packed)' };
  const g = glibcNeeded(join(outDir, file));
  if (g) glibc.push(g);
  say(`${file}: ${build.simd}, ${c.built ? `CUDA ${c.arch}` : 'no CUDA'}, ${(addons.at(-1).bytes / 2 ** 20).toFixed(2)} MiB, ${Math.round(r.seconds)} s`);
}
glibc.sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
const manifest = {
  package: 'sparse-mla',
  version,
  platform: PLATFORM,
  builtAt: new Date().toISOString(),
  commit: gitCommit(),
  compiler: spawnSync(tools.cxx, ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0] ?? tools.cxx,
  nodeApi: 8,
  glibc: glibc.at(-1) ?? null,
  cuda,
  addons,
};
writeFileSync(join(outDir, MANIFEST_NAME), `${JSON.stringify(manifest, null, 2)}\n`);
say(`wrote ${join(outDir, MANIFEST_NAME)} (glibc >= ${manifest.glibc ?? 'unknown'})`);
