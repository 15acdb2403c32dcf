#!/usr/bin/env node
// `npm install` hook: makes a native addon available and records what happened, and why, in
// build/install-status.json (read by `sparse-mla info` and by every BACKEND_UNAVAILABLE message).
// It never fails the install: without an addon the library runs on its WASM backend.
//   1. The package's prebuilt addon for this platform and CPU (prebuilds/: linux-x64 x86-64-v3 or
//      -v2 with the sm_90a kernels; linux-arm64 armv8-a, cpu only), when one fits and loads.
//      Nothing is compiled.
//   2. Otherwise, or when asked, a source build with cmake-js into build/addon/ (CMake, a C++
//      compiler and the packages cmake-js + node-addon-api; nvcc for the CUDA kernels).
// Environment:
//   SPARSE_MLA_BUILD_FROM_SOURCE=1    build here even when a prebuilt addon fits (-march=native)
//   SPARSE_MLA_SKIP_NATIVE=1          never build here (a fitting prebuilt addon is still used)
//   SPARSE_MLA_NATIVE_TIMEOUT_S=<s>   give up a source build after s seconds (default 1200)
//   SPARSE_MLA_NATIVE_VERBOSE=1       stream the build output instead of logging it
//   SPARSE_MLA_WITH_CUDA=ON|OFF|AUTO  source build: the CUDA kernels (default AUTO: when nvcc is found)
//   SPARSE_MLA_CPU_ARCH=<march>       source build: the core's -march (default native: this machine)
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import {
  BUILD_FROM_SOURCE_ENV,
  INSTALL_STATUS_FILE,
  PACKAGE_ROOT,
  SOURCE_BUILD_DIR,
  SOURCE_BUILD_LOG,
  howToBuild,
  isCheckout,
  isTruthyEnv,
  platformKey,
  selectPrebuilt,
} from './addon_locate.mjs';
import { buildAddon, findBuildTools, logExcerpt, probeAddon, runs } from './build_tools.mjs';

const env = process.env;
const say = (line) => console.log(`sparse-mla: ${line}`);

function packageVersion() {
  try {
    return JSON.parse(readFileSync(`${PACKAGE_ROOT}/package.json`, 'utf8')).version ?? null;
  } catch {
    return null;
  }
}

function writeStatus(status) {
  try {
    mkdirSync(dirname(INSTALL_STATUS_FILE), { recursive: true });
    writeFileSync(INSTALL_STATUS_FILE, `${JSON.stringify(status, null, 2)}\n`);
  } catch (e) {
    say(`could not write ${INSTALL_STATUS_FILE} (${e.message})`);
  }
}

/** The CUDA part of an addon's description: built, or why not. */
function cudaOf(info, whyNot) {
  return info.cuda?.built ? { built: true, arch: info.cuda.arch, nvcc: info.cuda.compilerVersion } : { built: false, why: whyNot };
}

/** Why a source build has no CUDA kernels, from its settings and its log. */
function sourceCudaWhy(withCuda) {
  if (withCuda === 'OFF') return 'the source build had CUDA turned off (SPARSE_MLA_WITH_CUDA=OFF)';
  let log = '';
  try {
    log = readFileSync(SOURCE_BUILD_LOG, 'utf8');
  } catch {
    /* streamed build (SPARSE_MLA_NATIVE_VERBOSE): no log */
  }
  if (/nvcc not found/.test(log)) return 'no CUDA compiler was found when it was built (nvcc not on PATH and CUDACXX unset)';
  return `the source build did not enable CUDA (see ${SOURCE_BUILD_LOG})`;
}

async function main() {
  const base = { schema: 1, package: packageVersion(), time: new Date().toISOString(), platform: platformKey(), node: process.version, root: PACKAGE_ROOT };
  const fromSource = isTruthyEnv(env[BUILD_FROM_SOURCE_ENV]) || isCheckout();
  const skipBuild = isTruthyEnv(env.SPARSE_MLA_SKIP_NATIVE);

  // 1. the prebuilt addon
  const pre = selectPrebuilt();
  let prebuilt = pre.ok ? { ok: true, path: pre.path, level: pre.level } : { ok: false, why: pre.why };
  let preInfo = null;
  if (pre.ok) {
    const probe = probeAddon(pre.path);
    if (probe.ok) preInfo = probe.info;
    else prebuilt = { ok: false, path: pre.path, level: pre.level, why: `the prebuilt addon ${pre.path} did not load: ${probe.why}` };
  }
  const usePrebuilt = () => {
    const cuda = cudaOf(preInfo, pre.manifest?.cuda?.why ?? 'the prebuilt addon was packed without CUDA');
    return { addon: 'prebuilt', path: pre.path, cpuArch: preInfo.build?.cpuArch, simd: preInfo.build?.simd, cuda };
  };

  if (prebuilt.ok && !fromSource) {
    const chosen = usePrebuilt();
    writeStatus({ ...base, ...chosen, prebuilt, build: { ran: false, why: `not needed (set ${BUILD_FROM_SOURCE_ENV}=1 for a build for this machine)` } });
    say(`using the prebuilt ${base.platform} addon (${chosen.cpuArch}, ${chosen.simd}${chosen.cuda.built ? `, CUDA ${chosen.cuda.arch}` : ', no CUDA'}): ${pre.path}`);
    // e.g. a GH200: the linux-arm64 prebuilt addon is cpu only, its kernels need a build here
    if (!chosen.cuda.built && runs(env.CUDACXX || 'nvcc')) say(`nvcc is here but this addon has no CUDA kernels; for the cuda backend: ${howToBuild()}`);
    return;
  }

  // 2. a source build
  const whyBuild = isTruthyEnv(env[BUILD_FROM_SOURCE_ENV]) ? `${BUILD_FROM_SOURCE_ENV} is set` : isCheckout() ? 'a source checkout builds its own addon' : prebuilt.why;
  const fallback = (build, problem) => {
    if (prebuilt.ok) {
      const chosen = usePrebuilt();
      writeStatus({ ...base, ...chosen, prebuilt, build });
      say(`${problem}; using the prebuilt ${base.platform} addon instead: ${pre.path}`);
    } else {
      writeStatus({ ...base, addon: 'none', path: null, reason: `${prebuilt.why}; ${problem}`, prebuilt, build });
      say(`no native addon (${prebuilt.why}; ${problem}); using the wasm backend. To get one: ${howToBuild()}`);
    }
  };
  if (skipBuild) {
    fallback({ ran: false, why: 'SPARSE_MLA_SKIP_NATIVE is set' }, 'the source build was skipped (SPARSE_MLA_SKIP_NATIVE is set)');
    return;
  }
  const tools = findBuildTools(PACKAGE_ROOT, env);
  if (!tools.ok) {
    fallback({ ran: false, why: `a source build was wanted (${whyBuild}) but cannot run: ${tools.why}` }, `cannot build from source: ${tools.why}`);
    return;
  }

  const withCuda = (env.SPARSE_MLA_WITH_CUDA || 'AUTO').toUpperCase();
  const cpuArch = env.SPARSE_MLA_CPU_ARCH ?? 'native';
  const verbose = env.SPARSE_MLA_NATIVE_VERBOSE === '1';
  const timeoutS = Number(env.SPARSE_MLA_NATIVE_TIMEOUT_S ?? 1200);
  const log = verbose ? null : SOURCE_BUILD_LOG;
  say(`building the native addon from source (${whyBuild}; -march=${cpuArch}, CUDA ${withCuda})${log ? `, log: ${log}` : ''}`);
  const r = await buildAddon({ root: PACKAGE_ROOT, cmakeJs: tools.cmakeJs, compilers: tools.compilers, outDir: SOURCE_BUILD_DIR, cpuArch, withCuda, logPath: SOURCE_BUILD_LOG, verbose, timeoutS });
  const build = { ran: true, why: whyBuild, cpuArch, withCuda, seconds: Math.round(r.seconds), log, addon: r.addon };
  if (!r.ok) {
    const excerpt = log ? logExcerpt(log) : [];
    fallback({ ...build, result: 'failed', problem: r.problem, excerpt }, `the source build ${r.problem}${log ? ` (log: ${log})` : ''}`);
    return;
  }
  const probe = probeAddon(r.addon);
  if (!probe.ok) {
    fallback({ ...build, result: 'failed', problem: `the built addon did not load: ${probe.why}` }, `the addon built here did not load: ${probe.why}`);
    return;
  }
  const cuda = cudaOf(probe.info, sourceCudaWhy(withCuda));
  writeStatus({ ...base, addon: 'built', path: r.addon, cpuArch: probe.info.build?.cpuArch, simd: probe.info.build?.simd, cuda, prebuilt, build: { ...build, result: 'ok' } });
  say(`built the native addon in ${build.seconds} s (${probe.info.build?.simd}${cuda.built ? `, CUDA ${cuda.arch}` : `, no CUDA: ${cuda.why}`}): ${r.addon}`);
}

main().catch((e) => {
  // never fail the install
  const reason = `the install script failed unexpectedly: ${e?.message ?? e}`;
  writeStatus({ schema: 1, time: new Date().toISOString(), platform: platformKey(), node: process.version, root: PACKAGE_ROOT, addon: 'none', path: null, reason });
  say(`${reason}; using the wasm backend`);
});
