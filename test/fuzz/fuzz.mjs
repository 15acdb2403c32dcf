/**
 * One fuzz case: (seed, index) → a target, a valid call built from a seeded stream, one or two
 * mutations of it, the call, and a verdict. Every case is reproducible from (seed, index, backend).
 *
 * Verdicts: 'valid' (resolved, judged right), 'refused' (SparseMlaError with a documented code),
 * 'sentinel' (the caller's own getter threw and that error came back), 'accepted' (a mutated
 * call resolved: judged against the reference on the mutated arguments where they are plain
 * values), or a finding: anything else a caller could not rely on (see FINDING_KINDS).
 */
import { SparseMlaError } from '../../dist/index.js';
import { makeRng } from '../../dist/check/grid.js';
import { CaseHooks, SentinelError, mutateArgs } from './mutate.mjs';
import { TARGETS } from './targets.mjs';

/** errors.ts's ErrorCode list (SPEC §9). */
export const ERROR_CODES = ['INVALID_DTYPE', 'INVALID_SHAPE', 'INVALID_VALUE', 'OUT_OF_RANGE', 'TOO_LARGE', 'BACKEND_UNAVAILABLE', 'BACKEND_FAILURE', 'WORKER_DIED', 'DISPOSED'];

/**
 * hard findings break SPEC §9 / §4.1; soft ones are for a reader to judge (a call that differs
 * from a valid one only in form was refused; a mutated call was accepted that the reference refuses).
 */
export const FINDING_KINDS = {
  untyped: 'hard', // an error that is not a SparseMlaError with a documented code
  'backend-error': 'hard', // bad input that reached a backend (BACKEND_FAILURE / WORKER_DIED)
  'wrong-result': 'hard', // resolved outside SPEC §4.1's bounds (or an exact op not exact)
  'input-written': 'hard', // an input array changed by the call (or a cache by a refused call)
  hang: 'hard',
  crash: 'hard', // the process died (abort, segfault, OOM)
  'neutral-refused': 'soft',
  'ref-refused': 'soft',
};

export const CASE_TIMEOUT_MS = 30_000;

function caseRng(seed, index) {
  // two rounds of a 32-bit mix: neighbouring indices give unrelated streams
  let h = (Math.imul(seed >>> 0, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d) >>> 0;
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b) >>> 0;
  return makeRng((h ^ (h >>> 16)) >>> 0);
}

function pickTarget(rng, only) {
  const list = only ? TARGETS.filter(([t]) => only.includes(t.name)) : TARGETS;
  const total = list.reduce((a, [, w]) => a + w, 0);
  let r = rng.uniform() * total;
  for (const [t, w] of list) if ((r -= w) < 0) return t;
  return list[list.length - 1][0];
}

class Timeout extends Error {}

function withTimeout(p, ms) {
  let timer;
  return Promise.race([p, new Promise((_, reject) => (timer = setTimeout(() => reject(new Timeout(`no answer in ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

function bytesOf(a) {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength).slice();
}

function errText(e) {
  if (e instanceof Error) return `${e.name}${e.code ? ` ${e.code}` : ''}: ${String(e.message).slice(0, 300)}`;
  return `a thrown ${typeof e}: ${String(e).slice(0, 100)}`;
}

/**
 * Runs case `index` of `seed` on `env` ({ engine, backend }). Returns { target, muts, verdict,
 * finding?: { kind, detail } }. `env.broken` is set when the engine cannot be trusted afterwards
 * (a hang): the runner starts a fresh process.
 */
export async function runCase(env, seed, index, only) {
  const rng = caseRng(seed, index);
  const target = pickTarget(rng, only);
  if (target.engine && !env.engine) return { target: target.name, muts: [], verdict: 'skipped' };
  const buildSeed = rng.u32();
  const hooks = new CaseHooks(makeRng(rng.u32()));
  const built = target.build(makeRng(buildSeed), env, hooks);
  const u = rng.uniform();
  const muts = mutateArgs(built.args, rng, hooks, u < 0.12 ? 0 : u < 0.75 ? 1 : 2);
  const neutral = muts.every((m) => m.neutral);
  const dynamic = muts.some((m) => m.dynamic);
  const sentinel = muts.some((m) => m.sentinel);
  const snapshots = new Map(hooks.arrays.filter((a) => !a.buffer.detached).map((a) => [a, bytesOf(a)]));
  const written = new Set(built.written ?? []);
  const res = { target: target.name, muts };
  const finding = (kind, detail) => Object.assign(res, { verdict: 'finding', finding: { kind, severity: FINDING_KINDS[kind], detail } });

  let result, error, threw = false;
  try {
    result = await withTimeout(Promise.resolve().then(() => built.call(built.args)), CASE_TIMEOUT_MS);
  } catch (e) {
    threw = true;
    error = e;
  }

  // what the call may not have written: every input, and a cache a refused call was given
  if (!dynamic) {
    for (const [a, before] of snapshots) {
      if (a.buffer.detached) continue;
      if (!threw && written.has(a)) continue;
      const now = bytesOf(a);
      const i = now.findIndex((b, k) => b !== before[k]);
      if (i !== -1 || now.length !== before.length) {
        finding('input-written', `${a.constructor.name}(${a.length}) changed at byte ${i} by a ${threw ? 'refused' : 'resolved'} call`);
        break;
      }
    }
  }
  if (res.verdict === 'finding') return res;

  if (threw) {
    if (error instanceof Timeout) {
      env.broken = true;
      return finding('hang', error.message);
    }
    if (error instanceof SentinelError) return sentinel ? Object.assign(res, { verdict: 'sentinel' }) : finding('untyped', errText(error));
    if (!(error instanceof SparseMlaError) || !ERROR_CODES.includes(error.code)) return finding('untyped', errText(error));
    if (error.code === 'BACKEND_FAILURE' || error.code === 'WORKER_DIED') return finding('backend-error', errText(error));
    if (neutral && !built.mayRefuse) return finding('neutral-refused', errText(error));
    return Object.assign(res, { verdict: 'refused', code: error.code });
  }

  if (sentinel || dynamic) return Object.assign(res, { verdict: 'accepted' });
  const pre = (a) => snapshots.get(a) ? new a.constructor(snapshots.get(a).buffer) : a;
  let refArgs = built.args;
  if (neutral) refArgs = target.build(makeRng(buildSeed), env, new CaseHooks()).args;
  let problem;
  try {
    problem = built.judge ? built.judge(result, { refArgs, args: built.args, pre, neutral }) : null;
  } catch (e) {
    if (neutral) return finding('wrong-result', `the judge could not read the result: ${errText(e)}`);
    return finding('ref-refused', `accepted, but the reference refuses these arguments: ${errText(e)}`);
  }
  if (problem) return finding('wrong-result', problem);
  return Object.assign(res, { verdict: neutral ? 'valid' : 'accepted' });
}

/** A one-line reproducer of a case. */
export function reproducer(backend, seed, index, only) {
  return `node test/fuzz/run.mjs --backends ${backend} --seed ${seed} --case ${index}${only ? ` --targets ${only.join(',')}` : ''}`;
}
