#!/usr/bin/env node
/**
 * The API fuzzer's runner (needs a built dist/: `npx tsc -p tsconfig.json`).
 *
 *   node test/fuzz/run.mjs --seconds 600 --seed 7              # both backends, 10 minutes each
 *   node test/fuzz/run.mjs --cases 2000 --seed 7 --backends wasm
 *   node test/fuzz/run.mjs --backends cpu --seed 7 --case 1234  # replay one case, verbosely
 *   node test/fuzz/run.mjs --backends cuda --seconds 120 --seed 1 --json
 *   options: --targets sparsePrefill,createPlan  --json  --quiet  --stub-cuda
 *
 * `cuda`: a real cuda engine where createEngine({ backend: 'cuda' }) succeeds (its device from
 * SPARSE_MLA_DEVICE, peers on every other device the machine has), its results downloaded and
 * judged against the reference as the host backends' are; where it does not (or with --stub-cuda),
 * the same cases over a stub of the addon's cuda op table (stub_cuda.mjs: values unknown, so
 * shapes, typed refusals before any op, the params the addon would check, and device leaks are
 * judged). Which one ran, and why, is in the report (`cuda` in --json). On the H200 through the
 * device tool (bench/device/README.md): `bash bench/device/ship.sh fuzz=HEAD` here (the CUDA addon and
 * dist of a commit), then run with carry [".gpu", "node_modules/comlink", ".cudabuild/ship.tar.xz"]:
 *   export PATH=$(bash .gpu/unpack-node.sh .gpu):$PATH; (cd .cudabuild && tar xJf ship.tar.xz) && rm -rf dist && cp -r .cudabuild/dist_fuzz dist && SPARSE_MLA_NATIVE_ADDON=$PWD/.cudabuild/addon_fuzz.node node test/fuzz/run.mjs --backends cuda --seconds 120 --seed 1 --json > $OUT/fuzz_cuda.json
 *
 * Each backend runs in a child process that records the case it is on before running it, so a
 * case that kills the process (abort, segfault, OOM) or hangs is a finding with its reproducer and
 * the run goes on in a fresh child from the next case.
 */
import { fork } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const argv = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : fallback;
};
const flag = (name) => argv.includes(`--${name}`);

const seed = Number(opt('seed', String(Math.floor(Math.random() * 2 ** 31)))) >>> 0;
const targets = opt('targets') ? opt('targets').split(',') : undefined;

if (flag('child')) await child();
else if (opt('case') !== undefined) await replay();
else await parent();

async function makeEnv(backend) {
  const { createEngine } = await import('../../dist/index.js');
  if (backend === 'cuda') return makeCudaEnv(createEngine);
  const engine = await createEngine({ backend, ...(backend === 'wasm' ? { workers: 2 } : {}) });
  return { engine, backend };
}


/**
 * The cuda env: { engine, backend, stub (null on a GPU), cuda: { mode, reason }, deviceCount,
 * engineOn(device) (a peer engine on that device, made once; null where there is none),
 * freshEngine(), deviceHooks (the mutator's synchronous device allocations), close() }.
 */
async function makeCudaEnv(createEngine) {
  const { engineBackend } = await import('../../dist/engine.js');
  let reason = 'asked for (--stub-cuda)';
  if (!flag('stub-cuda')) {
    try {
      const engine = await createEngine({ backend: 'cuda' });
      const { listBackends } = await import('../../dist/index.js');
      const info = (await listBackends()).find((b) => b.name === 'cuda');
      const deviceCount = Number(info?.details?.devices ?? 1);
      const peers = new Map();
      const engineOn = async (device) => {
        if (!(device >= 0 && device < deviceCount)) return null;
        if (!peers.has(device)) peers.set(device, await createEngine({ backend: 'cuda', device }));
        return peers.get(device);
      };
      for (let d = 0; d < deviceCount; d++) await engineOn(d);
      return {
        engine,
        backend: 'cuda',
        stub: null,
        cuda: { mode: 'gpu', device: engine.device, devices: deviceCount },
        deviceCount,
        engineOn,
        freshEngine: () => createEngine({ backend: 'cuda', device: engine.device }),
        deviceHooks: deviceHooks(engineBackend, engine, peers),
        close: () => Promise.all([engine, ...peers.values()].map((e) => e.dispose())),
      };
    } catch (e) {
      if (e?.code !== 'BACKEND_UNAVAILABLE') throw e;
      reason = e.message;
    }
  }
  const { stubCuda } = await import('./stub_cuda.mjs');
  const stub = await stubCuda(new URL('../../dist', import.meta.url).href);
  const { engine } = stub.makeEngine(0);
  const peers = new Map(Array.from({ length: 3 }, (_, d) => [d, stub.makeEngine(d).engine]));
  return {
    engine,
    backend: 'cuda',
    stub,
    cuda: { mode: 'stub', reason, hostCore: stub.hostCore },
    deviceCount: 3, // STUB_DEVICES
    engineOn: async (device) => peers.get(device) ?? null,
    freshEngine: async () => stub.makeEngine(0).engine,
    deviceHooks: deviceHooks(engineBackend, engine, peers),
    close: () => Promise.all([engine, ...peers.values()].map((e) => e.dispose())),
  };
}

/** Synchronous device allocations for the mutator: on the fuzz engine, or on a peer engine of a device (null where there is none). */
function deviceHooks(engineBackend, engine, peers) {
  return {
    alloc: (bytes) => backendOf(engine).alloc(bytes),
    allocOn: (device, bytes) => (peers.has(device) ? backendOf(peers.get(device)).alloc(bytes) : null),
  };
  function backendOf(e) {
    // an engine made over a backend directly (the stub) is not in createEngine's registry: its impl field
    return engineBackend(e) ?? e.impl;
  }
}

async function replay() {
  const { runCase } = await import('./fuzz.mjs');
  const { removeTempDir } = await import('./targets.mjs');
  const { closeHostTargets } = await import('./host_targets.mjs');
  const { closeSideTargets } = await import('./side_targets.mjs');
  const { closeShardedDeviceTargets } = await import('./sharded_device_targets.mjs');
  const backend = (opt('backends', 'wasm')).split(',')[0];
  const env = await makeEnv(backend);
  if (env.cuda) console.log(`cuda: ${JSON.stringify(env.cuda)}`);
  const r = await runCase(env, seed, Number(opt('case')), targets);
  console.log(JSON.stringify(r, null, 2));
  await (env.close?.() ?? env.engine.dispose());
  await closeHostTargets();
  await closeSideTargets();
  await closeShardedDeviceTargets();
  removeTempDir();
}

/** One backend's loop: cases start.. until the deadline or the case limit; progress in a file. */
async function child() {
  const { runCase } = await import('./fuzz.mjs');
  const { removeTempDir } = await import('./targets.mjs');
  const { closeHostTargets } = await import('./host_targets.mjs');
  const { closeSideTargets } = await import('./side_targets.mjs');
  const { closeShardedDeviceTargets } = await import('./sharded_device_targets.mjs');
  const { REGIME_COUNTS } = await import('./regime.mjs');
  const backend = opt('backend');
  const start = Number(opt('start'));
  const end = Number(opt('end'));
  const deadline = Number(opt('deadline'));
  const progress = openSync(opt('progress'), 'w');
  const env = await makeEnv(backend);
  const send = (m) => new Promise((resolve) => process.send(m, resolve));
  if (env.cuda) await send({ type: 'cuda', ...env.cuda });
  const counts = {};
  let i = start;
  for (; i < end && Date.now() < deadline; i++) {
    writeSync(progress, `${String(i).padStart(12)}\n`, 0);
    const r = await runCase(env, seed, i, targets);
    const key = `${r.target} ${r.verdict}`;
    counts[key] = (counts[key] ?? 0) + 1;
    if (r.verdict === 'finding') await send({ type: 'finding', backend, index: i, ...r });
    if (env.broken) {
      await send({ type: 'counts', counts, regime: REGIME_COUNTS, next: i + 1 });
      process.exit(3);
    }
  }
  closeSync(progress);
  // the engine's dispose() after every case is judged too (a case had frozen the shared engine, and
  // its dispose() threw TypeError: the child died here unseen, its workers never stopped, its temp
  // folder left behind)
  try {
    await (env.close?.() ?? env.engine.dispose());
    await closeHostTargets();
    await closeSideTargets();
    await closeShardedDeviceTargets();
  } catch (e) {
    const what = e instanceof Error ? `${e.name}${e.code ? ` ${e.code}` : ''}: ${String(e.message).slice(0, 300)}` : String(e);
    await send({ type: 'finding', backend, index: i, target: 'teardown', muts: [], finding: { kind: 'untyped', severity: 'hard', detail: `the engine's dispose() after the run's cases threw ${what}` } });
  }
  removeTempDir();
  await send({ type: 'counts', counts, regime: REGIME_COUNTS, next: i, done: true });
  process.exit(0);
}

async function parent() {
  const { reproducer, FINDING_KINDS } = await import('./fuzz.mjs');
  const backends = opt('backends', 'cpu,wasm').split(',');
  const seconds = Number(opt('seconds', opt('cases') ? '1e9' : '60'));
  const cases = Number(opt('cases', String(Number.MAX_SAFE_INTEGER)));
  const json = flag('json');
  const quiet = flag('quiet') || json;
  const deadline = Date.now() + seconds * 1000;
  const dir = mkdtempSync(join(tmpdir(), 'sparse-mla-fuzz-run-'));
  const findings = [];
  const counts = {};
  // heads judged against the reference, and those each tensor judged by place only (regime.mjs)
  const regime = { heads: 0, out: 0, lse: 0, maxLogits: 0, nonFinite: 0 };
  let cuda = null;
  const began = Date.now();
  let ran = 0;
  if (!quiet) console.log(`seed ${seed}, backends ${backends.join(', ')}, ${opt('cases') ? `${cases} cases each` : `${seconds} s`}`);

  const runBackend = async (backend) => {
    let next = 0;
    let restarts = 0;
    while (next < cases && Date.now() < deadline) {
      const progress = join(dir, `${backend}.progress`);
      const from = next;
      const outcome = await new Promise((resolve) => {
        const c = fork(fileURLToPath(import.meta.url), ['--child', '--backend', backend, '--seed', String(seed), '--start', String(from), '--end', String(cases), '--deadline', String(deadline), '--progress', progress, ...(targets ? ['--targets', targets.join(',')] : []), ...(flag('stub-cuda') ? ['--stub-cuda'] : [])], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'], env: { ...process.env, SPARSE_MLA_FUZZ_TMPDIR: dir } });
        let stderr = '';
        let last = null;
        c.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
        c.on('message', (m) => {
          if (m.type === 'finding') {
            const f = { backend: m.backend, index: m.index, target: m.target, muts: m.muts, ...m.finding, reproducer: reproducer(m.backend, seed, m.index, targets, flag('stub-cuda')) };
            findings.push(f);
            if (!quiet) printFinding(f);
          } else if (m.type === 'counts') last = m;
          else if (m.type === 'cuda' && !cuda) {
            const { type: _, ...info } = m;
            cuda = info;
            if (!quiet) console.log(info.mode === 'gpu' ? `cuda: a real GPU engine on device ${info.device} (${info.devices} device(s))` : `cuda: the STUB op table (no values judged): ${info.reason}`);
          }
        });
        c.on('exit', (code, signal) => resolve({ code, signal, last, stderr }));
      });
      const { last } = outcome;
      if (last) {
        for (const [k, v] of Object.entries(last.counts)) {
          counts[`${backend} ${k}`] = (counts[`${backend} ${k}`] ?? 0) + v;
          ran += v;
        }
        for (const k of Object.keys(regime)) regime[k] += last.regime?.[k] ?? 0;
        next = last.next;
        if (last.done) break;
        continue; // a hang: the child reported it and left; go on from the next case
      }
      // the child died without reporting: the case in the progress file killed it
      let index = from;
      try {
        index = Number(readFileSync(progress, 'utf8').trim());
      } catch {
        /* died before its first case */
      }
      if (Number.isNaN(index) || ++restarts > 50) break;
      const f = { backend, index, target: '?', muts: [], kind: 'crash', severity: FINDING_KINDS.crash, detail: `exit ${outcome.code} signal ${outcome.signal}: ${outcome.stderr.trim().split('\n').slice(-6).join(' | ')}`, reproducer: reproducer(backend, seed, index, targets, flag('stub-cuda')) };
      findings.push(f);
      if (!quiet) printFinding(f);
      ran += index - from + 1;
      next = index + 1;
    }
  };
  await Promise.all(backends.map(runBackend));
  rmSync(dir, { recursive: true, force: true });
  const seconds_ = (Date.now() - began) / 1000;
  const summary = { seed, backends, ...(cuda ? { cuda } : {}), cases: ran, seconds: Math.round(seconds_), casesPerSecond: Math.round((ran / seconds_) * 10) / 10, counts, regime, findings };
  if (json) console.log(JSON.stringify(summary));
  else {
    console.log(`\n${ran} cases in ${seconds_.toFixed(0)} s (${summary.casesPerSecond}/s), seed ${seed}`);
    const byVerdict = {};
    for (const [k, v] of Object.entries(counts)) {
      const verdict = k.split(' ').pop();
      byVerdict[verdict] = (byVerdict[verdict] ?? 0) + v;
    }
    console.log(Object.entries(byVerdict).map(([k, v]) => `${k} ${v}`).join(', '));
    console.log(`heads judged against the reference ${regime.heads}; by place only: out ${regime.out}, lse ${regime.lse}, maxLogits ${regime.maxLogits}, ${regime.nonFinite} of them over ±inf or NaN data (regime.mjs)`);
    console.log(`${findings.length} finding(s): ${findings.filter((f) => f.severity === 'hard').length} hard`);
  }
  process.exitCode = findings.some((f) => f.severity === 'hard') ? 1 : 0;
}

function printFinding(f) {
  console.log(`\n[${f.severity} ${f.kind}] ${f.backend} ${f.target} case ${f.index}`);
  for (const m of f.muts) console.log(`  mutation ${m.where}: ${m.desc}`);
  console.log(`  ${f.detail}`);
  console.log(`  replay: ${f.reproducer}`);
}
