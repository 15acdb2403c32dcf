#!/usr/bin/env node
/**
 * The API fuzzer's runner (needs a built dist/: `npx tsc -p tsconfig.json`).
 *
 *   node test/fuzz/run.mjs --seconds 600 --seed 7              # both backends, 10 minutes each
 *   node test/fuzz/run.mjs --cases 2000 --seed 7 --backends wasm
 *   node test/fuzz/run.mjs --backends cpu --seed 7 --case 1234  # replay one case, verbosely
 *   options: --targets sparsePrefill,createPlan  --json  --quiet
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
  const engine = await createEngine({ backend, ...(backend === 'wasm' ? { workers: 2 } : {}) });
  return { engine, backend };
}

async function replay() {
  const { runCase } = await import('./fuzz.mjs');
  const { removeTempDir } = await import('./targets.mjs');
  const backend = (opt('backends', 'wasm')).split(',')[0];
  const env = await makeEnv(backend);
  const r = await runCase(env, seed, Number(opt('case')), targets);
  console.log(JSON.stringify(r, null, 2));
  await env.engine.dispose();
  removeTempDir();
}

/** One backend's loop: cases start.. until the deadline or the case limit; progress in a file. */
async function child() {
  const { runCase } = await import('./fuzz.mjs');
  const { removeTempDir } = await import('./targets.mjs');
  const backend = opt('backend');
  const start = Number(opt('start'));
  const end = Number(opt('end'));
  const deadline = Number(opt('deadline'));
  const progress = openSync(opt('progress'), 'w');
  const env = await makeEnv(backend);
  const send = (m) => new Promise((resolve) => process.send(m, resolve));
  const counts = {};
  let i = start;
  for (; i < end && Date.now() < deadline; i++) {
    writeSync(progress, `${String(i).padStart(12)}\n`, 0);
    const r = await runCase(env, seed, i, targets);
    const key = `${r.target} ${r.verdict}`;
    counts[key] = (counts[key] ?? 0) + 1;
    if (r.verdict === 'finding') await send({ type: 'finding', backend, index: i, ...r });
    if (env.broken) {
      await send({ type: 'counts', counts, next: i + 1 });
      process.exit(3);
    }
  }
  closeSync(progress);
  await send({ type: 'counts', counts, next: i, done: true });
  await env.engine.dispose();
  removeTempDir();
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
        const c = fork(fileURLToPath(import.meta.url), ['--child', '--backend', backend, '--seed', String(seed), '--start', String(from), '--end', String(cases), '--deadline', String(deadline), '--progress', progress, ...(targets ? ['--targets', targets.join(',')] : [])], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
        let stderr = '';
        let last = null;
        c.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
        c.on('message', (m) => {
          if (m.type === 'finding') {
            const f = { backend: m.backend, index: m.index, target: m.target, muts: m.muts, ...m.finding, reproducer: reproducer(m.backend, seed, m.index, targets) };
            findings.push(f);
            if (!quiet) printFinding(f);
          } else if (m.type === 'counts') last = m;
        });
        c.on('exit', (code, signal) => resolve({ code, signal, last, stderr }));
      });
      const { last } = outcome;
      if (last) {
        for (const [k, v] of Object.entries(last.counts)) {
          counts[`${backend} ${k}`] = (counts[`${backend} ${k}`] ?? 0) + v;
          ran += v;
        }
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
      const f = { backend, index, target: '?', muts: [], kind: 'crash', severity: FINDING_KINDS.crash, detail: `exit ${outcome.code} signal ${outcome.signal}: ${outcome.stderr.trim().split('\n').slice(-6).join(' | ')}`, reproducer: reproducer(backend, seed, index, targets) };
      findings.push(f);
      if (!quiet) printFinding(f);
      ran += index - from + 1;
      next = index + 1;
    }
  };
  await Promise.all(backends.map(runBackend));
  rmSync(dir, { recursive: true, force: true });
  const seconds_ = (Date.now() - began) / 1000;
  const summary = { seed, backends, cases: ran, seconds: Math.round(seconds_), casesPerSecond: Math.round((ran / seconds_) * 10) / 10, counts, findings };
  if (json) console.log(JSON.stringify(summary));
  else {
    console.log(`\n${ran} cases in ${seconds_.toFixed(0)} s (${summary.casesPerSecond}/s), seed ${seed}`);
    const byVerdict = {};
    for (const [k, v] of Object.entries(counts)) {
      const verdict = k.split(' ').pop();
      byVerdict[verdict] = (byVerdict[verdict] ?? 0) + v;
    }
    console.log(Object.entries(byVerdict).map(([k, v]) => `${k} ${v}`).join(', '));
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
