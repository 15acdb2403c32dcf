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
import { isDeviceBuffer } from '../../dist/tensor.js';
import { Plan } from '../../dist/planner/plan.js';
import { ShardedPlan } from '../../dist/planner/sharded_layer.js';
import { SparseMlaEngine } from '../../dist/engine.js';
import { CaseHooks, SentinelError, isDetachedBuffer, mutateArgs } from './mutate.mjs';
import { TARGETS } from './targets.mjs';
import { DEVICE_TARGETS } from './device_targets.mjs';
import { HOST_TARGETS } from './host_targets.mjs';
import { SIDE_TARGETS, SIDE3_TARGETS as SIDE3_OWN } from './side_targets.mjs';
import { DIR_TARGETS, LAZY_DIR_TARGETS } from './dir_targets.mjs';
import { CLI_TARGETS } from './cli_targets.mjs';
import { IO_TARGETS } from './io_targets.mjs';
import { LIFECYCLE_TARGETS } from './lifecycle_targets.mjs';
import { REFERENCE_TARGETS } from './reference_targets.mjs';
import { ENGINES_TARGETS } from './engines_targets.mjs';
import { NUMERIC_TARGETS } from './numeric_targets.mjs';
import { SHARDED_DEVICE_TARGETS } from './sharded_device_targets.mjs';
import { RACE_TARGETS } from './race_targets.mjs';
import { RECEIVER_TARGETS } from './receiver_targets.mjs';

/** The targets drawn from the session-53 stream: session 53's, 54's (side_targets.mjs), 55's (dir_targets.mjs), 56's (cli_targets.mjs, io_targets.mjs, lifecycle_targets.mjs) and 57's (reference_targets.mjs, engines_targets.mjs; dir_targets.mjs lazyDirRead), each from its fromSeed. */
const SIDE3_TARGETS = [...SIDE3_OWN, ...DIR_TARGETS, ...CLI_TARGETS, ...IO_TARGETS, ...LIFECYCLE_TARGETS, ...REFERENCE_TARGETS, ...ENGINES_TARGETS, ...LAZY_DIR_TARGETS];

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
  // the cuda backend over the stub (test/fuzz/stub_cuda.mjs), where no value can be judged:
  'stub-fault': 'hard', // the library handed the addon's op params its binding would refuse (or a freed / other device's buffer)
  'device-leak': 'hard', // a device allocation the call made was neither freed nor owned by what it returned
  'accepted-bad-device': 'hard', // a call given a freed, wrongly sized or other device's buffer (and nothing else wrong) resolved
  'refused-after-work': 'soft', // a plain bad input refused only after an op had been reached (not 'before any work')
  'neutral-refused': 'soft',
  // a getter read a second time after the call's first read (its throw came back): a read too many,
  // not a wrong value (where the second read's value is used, the stable oracle judges it)
  'read-twice': 'soft',
  'ref-refused': 'soft',
  // a call read a key no entry point takes (mutate.mjs oddObjects): it read the caller's whole object
  // (a spread, Object.entries), every getter of it again included
  'foreign-read': 'soft',
  // dir_targets.mjs: a file handle on the case's folder still open after the call settled
  'handle-leak': 'hard',
  // dir_targets.mjs: a refusal of a hostile file whose message names neither the file nor its folder
  'refusal-unnamed': 'soft',
};

export const CASE_TIMEOUT_MS = 30_000;

/** The first seed whose cases draw the session-51 generators (mutate.mjs orSide); seeds 1-20 were run before them. */
export const SIDE_FROM_SEED = 21;

/**
 * The first seed whose cases draw the session-52 generators and targets (mutate.mjs orSide2,
 * side_targets.mjs) from a stream of their own (CaseHooks.side2); seeds 1-42 were run before them.
 */
export const SIDE2_FROM_SEED = 43;

/** The first seed of the session-52 generators added after seeds 43-46 were run (a second read that throws; plan.release() in disposeInGetter). */
export const SIDE2_LATE_FROM_SEED = 47;

/** The first seed of the session-52 generators added after seeds 47-49 were run (Symbol.toPrimitive throwers, thenables, WebAssembly memories): mutate.mjs orSide2Later. */
export const SIDE2_LATER_FROM_SEED = 50;

/** The odds that a case of a seed from SIDE2_FROM_SEED runs a session-52 target instead of its own. */
export const SIDE2_TARGET_ODDS = 0.08;

/**
 * The first seed whose cases draw the session-53 generators (mutate.mjs orSide3: lying methods,
 * species and prototypes, holes, edge numbers, odd strings and objects) and targets
 * (side_targets.mjs SIDE3_TARGETS) from a stream of their own (CaseHooks.side3); seeds 1-63 were run before them.
 */
export const SIDE3_FROM_SEED = 64;

/** The odds that a case of a seed from SIDE3_FROM_SEED runs a session-53 target instead of its own. */
export const SIDE3_TARGET_ODDS = 0.05;

/**
 * The first seed whose cases draw the session-58 targets (SIDE4_TARGETS: numeric_targets.mjs, ...) from a
 * stream of their own (from (seed, index) alone), drawn after every older stream's: seeds 1-220 replay as run.
 */
export const SIDE4_FROM_SEED = 221;

/** The odds that a case of a seed from SIDE4_FROM_SEED runs a session-58 target instead of its own. */
export const SIDE4_TARGET_ODDS = 0.06;

/** The session-58 targets and those added since (session 59's shardedDevice, cuda engines, from seed 257; session 61's opRace, host engines, race_targets.mjs; session 62's foreignReceiver, host engines, from seed 391, receiver_targets.mjs) with their weights, each from its fromSeed. */
const SIDE4_TARGETS = [...NUMERIC_TARGETS, ...SHARDED_DEVICE_TARGETS, ...RACE_TARGETS, ...RECEIVER_TARGETS];

function caseRng(seed, index) {
  // two rounds of a 32-bit mix: neighbouring indices give unrelated streams
  let h = (Math.imul(seed >>> 0, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d) >>> 0;
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b) >>> 0;
  return makeRng((h ^ (h >>> 16)) >>> 0);
}

/** The targets of an engine: a device engine (cuda) adds the device targets and leaves out the host-engine ones. */
function targetsOf(env) {
  // a host engine adds the host targets (cpuOnly ones on the cpu backend); a device engine's mix is unchanged
  if (!env.engine?.hasDevice) return [...TARGETS, ...HOST_TARGETS.filter(([t]) => !t.cpuOnly || env.backend === 'cpu')];
  // on the stub, quantizeKCache needs the addon's CPU core (the cuda backend quantizes on the host)
  const skip = (t) => t.hostEngineOnly || (env.stub && (t.noStub || (t.name === 'quantizeKCache' && !env.stub.hostCore)));
  return [...TARGETS.filter(([t]) => !skip(t)), ...DEVICE_TARGETS];
}

function pickTarget(rng, only, env) {
  const all = targetsOf(env);
  const list = only ? all.filter(([t]) => only.includes(t.name)) : all;
  if (list.length === 0) {
    rng.uniform(); // the draw a target takes (a --targets of session-52 targets only: cases stay those of the full mix)
    return null; // --targets names only targets of another backend (workerThreads on wasm)
  }
  return pickWeighted(list, rng.uniform());
}

/** The target of weighted `list` that `u` in [0, 1) falls on. */
function pickWeighted(list, u) {
  const total = list.reduce((a, [, w]) => a + w, 0);
  let r = u * total;
  for (const [t, w] of list) if ((r -= w) < 0) return t;
  return list[list.length - 1][0];
}

class Timeout extends Error {}

function withTimeout(p, ms) {
  let timer;
  return Promise.race([p, new Promise((_, reject) => (timer = setTimeout(() => reject(new Timeout(`no answer in ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

/** The intrinsic name of a typed array's kind ('Uint8Array', ...), whatever its class or getters say. */
const TYPED_PROTO = Object.getPrototypeOf(Uint8Array.prototype);
const TYPED_KIND = Object.getOwnPropertyDescriptor(TYPED_PROTO, Symbol.toStringTag).get;
const [TYPED_BUFFER, TYPED_OFFSET, TYPED_LENGTH] = ['buffer', 'byteOffset', 'length'].map((k) => Object.getOwnPropertyDescriptor(TYPED_PROTO, k).get);

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
  let target = pickTarget(rng, only, env);
  const buildSeed = rng.u32();
  const hooks = new CaseHooks(makeRng(rng.u32()));
  // the newer generators' own stream (mutate.mjs orSide), not drawn from the case's; not on the seeds
  // run before them, whose cases (and the findings' replays of seeds 14 and 19) stay as they were
  if (seed >= SIDE_FROM_SEED) hooks.side = caseRng((seed ^ 0x6d2b79f5) >>> 0, index);
  if (seed >= SIDE2_FROM_SEED) {
    hooks.side2 = caseRng((seed ^ 0x2545f491) >>> 0, index);
    hooks.side2Late = seed >= SIDE2_LATE_FROM_SEED;
    hooks.seed = seed;
    // a session-52 target in place of the case's own (drawn first from its stream; --targets may name one)
    const side = SIDE_TARGETS.filter(([t]) => (!only || only.includes(t.name)) && (!t.hostEngineOnly || !env.engine?.hasDevice) && (!env.stub || env.stub.hostCore));
    const u = hooks.side2.uniform();
    if (side.length > 0 && (u < SIDE2_TARGET_ODDS || !target)) target = pickWeighted(side, hooks.side2.uniform());
  }
  if (seed >= SIDE3_FROM_SEED) {
    hooks.side3 = caseRng((seed ^ 0x1b873593) >>> 0, index);
    // a session-53 target in place of the case's own (drawn first from its stream)
    // (a target added after some of these seeds were run draws only from its fromSeed: those replay as run)
    const side3 = SIDE3_TARGETS.filter(([t]) => (!only || only.includes(t.name)) && (!t.hostEngineOnly || !env.engine?.hasDevice) && (!t.deviceEngineOnly || env.engine?.hasDevice) && seed >= (t.fromSeed ?? SIDE3_FROM_SEED));
    const u = hooks.side3.uniform();
    if (side3.length > 0 && (u < SIDE3_TARGET_ODDS || !target)) target = pickWeighted(side3, hooks.side3.uniform());
  }
  if (seed >= SIDE4_FROM_SEED) {
    // a session-58 target in place of the case's own, from a stream of its own (the older streams drew as before)
    const side4Rng = caseRng((seed ^ 0x27d4eb2f) >>> 0, index);
    const side4 = SIDE4_TARGETS.filter(([t]) => (!only || only.includes(t.name)) && (!t.hostEngineOnly || !env.engine?.hasDevice) && (!t.deviceEngineOnly || env.engine?.hasDevice) && seed >= (t.fromSeed ?? SIDE4_FROM_SEED));
    const u = side4Rng.uniform();
    if (side4.length > 0 && (u < SIDE4_TARGET_ODDS || !target)) target = pickWeighted(side4, side4Rng.uniform());
  }
  if (!target) return { target: only.join(','), muts: [], verdict: 'skipped' };
  if (target.engine && !env.engine) return { target: target.name, muts: [], verdict: 'skipped' };
  const stub = env.stub ?? null;
  // what the stub device held before the case: anything the case allocates must be gone after it
  const live0 = stub ? new Set(stub.live) : null;
  const faults0 = stub ? stub.faults.length : 0;
  if (env.engine?.hasDevice) hooks.device = env.deviceHooks;
  const built = target.build(makeRng(buildSeed), env, hooks);
  // device operands: uploaded (and abused) by the target before the mutations
  if (built.prepare) await withTimeout(Promise.resolve().then(() => built.prepare(built.args)), CASE_TIMEOUT_MS);
  const u = rng.uniform();
  // (built.validOdds: a target whose hostile part is its own values, session 58; the older targets' odds are as they were)
  const validOdds = built.validOdds ?? (built.mostlyValid ? 0.5 : 0.12);
  const count = u < validOdds ? 0 : u < Math.max(0.75, (1 + validOdds) / 2) ? 1 : 2;
  const muts = mutateArgs(built.args, rng, hooks, built.mustRefuse && u < 0.5 ? 0 : count);
  const neutral = muts.every((m) => m.neutral);
  const dynamic = muts.some((m) => m.dynamic);
  const sentinel = muts.some((m) => m.sentinel);
  const snapshots = new Map(hooks.arrays.filter((a) => !isDetachedBuffer(a.buffer)).map((a) => [a, bytesOf(a)]));
  const written = new Set(built.written ?? []);
  const res = { target: target.name, muts };
  const finding = (kind, detail) => Object.assign(res, { verdict: 'finding', finding: { kind, severity: FINDING_KINDS[kind], detail } });

  let result, error, threw = false;
  hooks.markCall(stub);
  hooks.inCall = true;
  hooks.strictReads = !built.rereads;
  try {
    result = await withTimeout(Promise.resolve().then(() => built.call(built.args)), CASE_TIMEOUT_MS);
  } catch (e) {
    threw = true;
    error = e;
  }
  hooks.inCall = false;
  // getters that answer otherwise after their first read, first read by the call: a result must be the unmutated call's
  // (not where the target itself reads the arguments again, or makes two calls of them: built.rereads)
  const stable = !built.rereads && muts.some((m) => m.stable) && muts.every((m) => m.neutral || m.stable) && !hooks.stable.some((r) => r.early);
  hooks.restoreStable();
  if (built.describe) res.describe = built.describe;
  if (error instanceof Timeout) {
    env.broken = true;
    return finding('hang', error.message);
  }
  const verdict = await judgeCase();
  // the case's device memory: what it returned, its plans' and its own uploads; then nothing it made may be left
  await releaseCase(result, hooks);
  if (stub && verdict.verdict !== 'finding') {
    const left = [...stub.live].filter((a) => !live0.has(a));
    if (left.length > 0) return finding('device-leak', `${left.length} device allocation(s) of ${left.map((a) => a.bytes).join(', ')} bytes left after a ${threw ? `refused (${errText(error)})` : 'resolved'} call`);
  }
  return verdict;

  async function judgeCase() {
  // what the call opened (dir_targets.mjs; cli_targets.mjs also waits for threads to end): closed once it settled
  const open = await built.leftOpen?.();
  if (open) return finding('handle-leak', open);

  // what the call may not have written: every input, and a cache a refused call was given
  if (!dynamic) {
    for (const [a, before] of snapshots) {
      if (isDetachedBuffer(a.buffer)) continue;
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
  if (stub && stub.faults.length > faults0) return finding('stub-fault', `the addon would refuse: ${stub.faults.slice(faults0, faults0 + 3).join(' | ')}${threw ? `; the call: ${errText(error)}` : ''}`);

  if (threw) {
    // (a value a first-read thrower of the case throws too, such as null, may be that one's: not told apart, so not a finding; cuda seed 259 case 1241)
    if (hooks.secondReads.some((v) => Object.is(v, error)) && !hooks.thrown.some((v) => Object.is(v, error))) return finding('read-twice', `a getter read again after the call's first read of it threw: ${errText(error)}`);
    if (error instanceof SentinelError) return sentinel ? Object.assign(res, { verdict: 'sentinel' }) : finding('untyped', errText(error));
    // a value that is no Error, thrown by the case's own getter, let through (the caller's)
    if (sentinel && hooks.thrown.some((v) => Object.is(v, error))) return Object.assign(res, { verdict: 'sentinel' });
    if (process.env.FUZZ_STACK && !(error instanceof SparseMlaError)) console.error(error.stack); // FUZZ_STACK=1 with --case: where an untyped error came from
    if (!(error instanceof SparseMlaError) || !ERROR_CODES.includes(error.code)) return finding('untyped', errText(error));
    if (error.code === 'BACKEND_FAILURE' || error.code === 'WORKER_DIED') return finding('backend-error', errText(error));
    // a target that knows which refusals its case allows (dir_targets.mjs): [kind, detail] or null
    const judged = built.judgeRefusal?.(error, { neutral });
    if (judged) return finding(judged[0], judged[1]);
    if (neutral && !built.mayRefuse && !built.mustRefuse && !built.judgeRefusal) return finding('neutral-refused', errText(error));
    if (stub && !dynamic && stub.reached > hooks.reachedAtCall) return finding('refused-after-work', `${stub.reached - hooks.reachedAtCall} op(s) reached before: ${errText(error)}`);
    // a writer's refusal leaves what it writes to as it was (side_targets.mjs fileWriters: no file)
    const left = built.afterRefusal?.();
    if (left) return finding('input-written', `${left}: ${errText(error)}`);
    return Object.assign(res, { verdict: 'refused', code: error.code });
  }

  if (built.mustRefuse && muts.every((m) => m.neutral)) return finding('accepted-bad-device', `resolved with ${built.mustRefuse}`);
  // (a target whose op takes another device's buffer, copyFrom, says so: otherDeviceOk)
  const refusable = muts.filter((m) => m.mustRefuse && !(m.mustRefuse === 'other-device' && built.otherDeviceOk));
  if (refusable.length > 0 && muts.filter((m) => !m.neutral).length === 1 && !built.mustRefuse) return finding('accepted-bad-device', `resolved with ${refusable[0].desc}`);
  if (sentinel || (dynamic && !stable)) return Object.assign(res, { verdict: 'accepted' });
  // an array's bytes before the call, as the intrinsic typed array of its kind (a subclass's getters may lie: stub seed 4805 case 3343)
  const pre = (a) => {
    const kind = TYPED_KIND.call(a);
    if (kind === undefined) return a;
    const at = snapshots.get(a);
    if (at) return new globalThis[kind](at.buffer);
    try {
      return new globalThis[kind](TYPED_BUFFER.call(a), TYPED_OFFSET.call(a), TYPED_LENGTH.call(a));
    } catch {
      return a; // detached
    }
  };
  // a stable case is judged as the unmutated call (its getters read once give the unmutated values)
  const asBuilt = neutral || stable;
  let refArgs = built.args;
  if (asBuilt) refArgs = target.build(makeRng(buildSeed), env, new CaseHooks()).args;
  let problem;
  try {
    // device outputs come to the host for the judge (on the stub their values are unknown: only shapes are judged)
    const got = env.engine?.hasDevice ? await hostify(env, result) : result;
    problem = built.judge ? await built.judge(got, { refArgs, args: built.args, pre, neutral: asBuilt, stub: !!stub, raw: result }) : null;
  } catch (e) {
    if (asBuilt) return finding('wrong-result', `the judge could not read the result: ${errText(e)}`);
    return finding('ref-refused', `accepted, but the reference refuses these arguments: ${errText(e)}`);
  }
  if (problem) return finding('wrong-result', stable ? `resolved, read once its arguments are the unmutated call's, but: ${problem}` : problem);
  const foreign = hooks.foreign.find((r) => r.read);
  if (foreign) return finding('foreign-read', `the call read a key no entry point takes, of ${foreign.at} (it read the caller's whole object)`);
  return Object.assign(res, { verdict: neutral ? 'valid' : stable ? 'stable' : 'accepted' });
  }
}

/** Every device tensor in `v` (a result) as a host tensor read back by an engine of its device; the rest as it is. */
async function hostify(env, v, depth = 0) {
  if (typeof v !== 'object' || v === null || depth > 4 || ArrayBuffer.isView(v) || v instanceof Plan || v instanceof ShardedPlan || v instanceof SparseMlaEngine) return v;
  if (Array.isArray(v)) return Promise.all(v.map((x) => hostify(env, x, depth + 1)));
  if (isDeviceBuffer(v.data) && typeof v.dtype === 'string') {
    const engine = v.data.deviceIndex === env.engine.device ? env.engine : await env.engineOn(v.data.deviceIndex);
    return engine.download(v);
  }
  const proto = Object.getPrototypeOf(v);
  if (proto !== Object.prototype && proto !== null) return v; // a Map, a class instance: as it is
  const out = {};
  for (const [k, x] of Object.entries(v)) out[k] = await hostify(env, x, depth + 1);
  return out;
}

/** Frees every device buffer in `v` and releases its plans (a case's result); errors of hostile objects ignored. */
function releaseAll(v, seen, depth = 0) {
  if (typeof v !== 'object' || v === null || depth > 5 || seen.has(v) || ArrayBuffer.isView(v) || v instanceof SparseMlaEngine) return;
  seen.add(v);
  try {
    if (isDeviceBuffer(v)) return void (v.freed || v.free());
    if (v instanceof Plan || v instanceof ShardedPlan) return void v.release();
    for (const x of Array.isArray(v) ? v : Object.values(v)) releaseAll(x, seen, depth + 1);
  } catch {
    /* a Proxy whose traps throw */
  }
}

async function releaseCase(result, hooks) {
  const seen = new Set();
  releaseAll(result, seen);
  for (const p of hooks.plans) releaseAll(p, seen);
  for (const b of hooks.deviceBuffers) if (!b.freed) b.free();
}

/** A one-line reproducer of a case. */
export function reproducer(backend, seed, index, only, stubCuda = false) {
  return `node test/fuzz/run.mjs --backends ${backend} --seed ${seed} --case ${index}${only ? ` --targets ${only.join(',')}` : ''}${stubCuda ? ' --stub-cuda' : ''}`;
}
