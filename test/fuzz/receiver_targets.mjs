/**
 * foreignReceiver (session 62, from seed RECEIVER_FROM_SEED, host engines, drawn with numericEdges from the
 * session-58 stream): the methods and getters of the objects the API hands out, called on another `this`.
 * Every other target calls a method on the object that made it (`engine.sparsePrefill(...)`), so the
 * receiver checks the classes make first (SPEC §9: every public entry point refuses bad input with a typed
 * error) were reached by no case. A caller reaches them by taking a method off its object (`const { dispose }
 * = engine`, a callback), through a Proxy or an object inheriting from one (a wrapper, a decorator), or with
 * an object that has only the class's prototype (`Object.create(Class.prototype)`: a mocking library's stub
 * instance, a hand-made test double).
 *
 * - engine (an engine createEngine made): the four ops, upload / uploadKvCache / download / copyFrom,
 *   synchronize, dispose and the hasDevice / device getters. A Proxy of the engine or an object inheriting
 *   from it runs them as the engine does (engine.ts says so): judged as the engine's own call (the ops by
 *   the float64 reference, the device methods BACKEND_UNAVAILABLE on a host engine, dispose disposes, the
 *   getters answer as the engine's). Anything else refuses with INVALID_VALUE naming `this`: undefined,
 *   null, a number, a string, a function, a plain object, a plan, an object of the engine's prototype with
 *   or without the engine's public fields, a Proxy of an empty object claiming that prototype; an object
 *   inheriting from a disposed engine refuses with DISPOSED. dispose() always runs on a fresh engine of the
 *   case (the case's own is shared by every case): disposed after a call that resolved, alive after one
 *   that refused.
 * - plan (createPlan's): its public methods (layout, pageSize, compressedTokenIds, combinedRows, combineC4,
 *   pagedForm, checkCaches, checkTopk, release, settleDropped). Plan.isPlan takes only the plan itself (a
 *   Proxy of one, or an object inheriting from one, has not its private state): every other receiver
 *   refuses INVALID_VALUE naming `this`; the plan itself (a tenth of the cases) resolves.
 * - shardedPlan (createShardedPlan's): release(), likewise.
 * - reference: a DequantizedRows' offsetOf and an AttentionComparator's result(), likewise.
 *
 * Each receiver form may also be a Proxy whose getPrototypeOf trap throws a value of the caller's: that
 * value comes back (the caller's, let through) or a typed error. The arguments are valid as built (three
 * cases in four); the mutator's changes to them are judged as every target's are.
 */
import { createEngine, createKvCache, createPlan, createShardedPlan, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { chunkScenario } from '../../dist/check/chunks.js';
import { dequantizeKCachePagedTarget, layerScenario, pagedSparseAttentionTarget, quantizeKCacheTarget, randomV4Cache, sparsePrefillTarget } from './targets.mjs';

/** The first seed that draws foreignReceiver (seeds before it replay as run). */
export const RECEIVER_FROM_SEED = 391;

/** What a call whose receiver threw the caller's own value gave: that value came back (the caller's, let through). */
const LET_THROUGH = Symbol('the caller\'s thrown value, let through');

/** A value of the caller's that a getPrototypeOf trap throws (no Error: a library must neither wrap nor read it). */
const THROWN = Object.freeze({ thrownBy: 'foreignReceiver' });

/**
 * The receiver forms: [name, make(real, proto, other) → receiver, runsAs]; runsAs 'engine' where an engine
 * runs the method as its own (a Proxy of one, an object inheriting from one), true for the object itself.
 */
const FORMS = [
  ['itself', (real) => real, true],
  ['an object inheriting from it', (real) => Object.create(real), 'engine'],
  ['a Proxy of it', (real) => new Proxy(real, {}), 'engine'],
  ['undefined', () => undefined, false],
  ['null', () => null, false],
  ['a number', () => 7, false],
  ['a string', () => 'engine', false],
  ['a function', () => function receiver() {}, false],
  ['a plain object', () => ({}), false],
  ['an object of its prototype', (real, proto) => Object.create(proto), false],
  ['an object of its prototype with its public fields', (real, proto) => Object.assign(Object.create(proto), publicFields(real)), false],
  ['a Proxy of an empty object claiming its prototype', (real, proto) => new Proxy({}, { getPrototypeOf: () => proto }), false],
  ['another API object', (real, proto, other) => other(), false],
];
const PRIMITIVE = new Set(['undefined', 'null', 'a number', 'a string']);

/** The own enumerable fields of `real` but an engine's `impl` and `life` (TypeScript-private, JS-visible: they would be the real one's state). */
function publicFields(real) {
  const out = {};
  for (const k of Object.keys(real)) if (k !== 'impl' && k !== 'life') out[k] = real[k];
  return out;
}

/**
 * A receiver form drawn from `forms`: { name, make(real) (the receiver over the real object; made again
 * over another real one for a fresh engine), runsAs, throwing } — sometimes behind a Proxy whose
 * getPrototypeOf trap throws the caller's value.
 */
function formOf(rng, forms, proto, other) {
  const [name, make, runsAs] = rng.pick(forms);
  const throwing = !PRIMITIVE.has(name) && rng.uniform() < 0.1;
  const trap = (r) => new Proxy(r, { getPrototypeOf() { throw THROWN; } });
  return {
    name: throwing ? `${name}, behind a Proxy whose getPrototypeOf throws` : name,
    make: (real) => (throwing ? trap(make(real, proto, other)) : make(real, proto, other)),
    runsAs,
    throwing,
  };
}

/** A foreign receiver's refusal: INVALID_VALUE naming this (DISPOSED over a disposed engine); [kind, detail] where it is not. */
function refusalProblem(e, form, what) {
  if (form.runsAs === 'disposed') return e.code === 'DISPOSED' ? null : ['wrong-result', `${what}: refused with ${e.code}, expected DISPOSED`];
  if (e.code === 'INVALID_VALUE' && /\bthis\b/.test(String(e.message))) return null;
  return ['wrong-result', `${what}: refused with ${e.code} (${String(e.message).slice(0, 160)}), expected INVALID_VALUE naming this`];
}

const ENGINE_OPS = new Map([
  ['sparsePrefill', sparsePrefillTarget],
  ['pagedSparseAttention', pagedSparseAttentionTarget],
  ['dequantizeKCachePaged', dequantizeKCachePagedTarget],
  ['quantizeKCache', quantizeKCacheTarget],
]);
const DEVICE_METHODS = ['upload', 'uploadKvCache', 'download', 'copyFrom'];

function engineCase(rng, env, hooks) {
  const proto = Object.getPrototypeOf(env.engine);
  const method = rng.pick([...ENGINE_OPS.keys(), ...ENGINE_OPS.keys(), ...DEVICE_METHODS, 'synchronize', 'dispose', 'hasDevice', 'device']);
  // an object inheriting from a disposed engine (a fresh one): DISPOSED
  const overDisposed = !['dispose', 'hasDevice', 'device'].includes(method) && rng.uniform() < 0.08; // (the getters answer after dispose())
  const form = overDisposed
    ? { name: 'an object inheriting from a disposed engine', make: (real) => Object.create(real), runsAs: 'disposed', throwing: false }
    : formOf(rng, FORMS, proto, () => createPlan({ requests: [] }));
  const runsAs = form.runsAs === 'engine' || form.runsAs === true;
  // dispose() and a disposed base run on a fresh engine made in the call (the case's own serves every case; a rebuild for the judge makes none)
  const fresh = method === 'dispose' || overDisposed;
  const what = `engine.${method} on ${form.name}`;
  let engine = null;
  let aliveAfter; // dispose: whether the engine still answers once the call settled
  const apply = (name, args, receiver) => {
    const d = Object.getOwnPropertyDescriptor(proto, name);
    return d.get ? Reflect.apply(d.get, receiver, []) : Reflect.apply(d.value, receiver, args);
  };
  /** Runs `run(receiver)` over the case's engine or a fresh one; the caller's thrown value comes back as LET_THROUGH. */
  const settle = async (run) => {
    engine = fresh ? await createEngine({ backend: env.backend, workers: 1 }) : env.engine;
    try {
      if (overDisposed) await engine.dispose();
      const receiver = form.make(engine);
      let got, error, threw = false;
      try {
        got = await run(receiver);
      } catch (e) {
        threw = true;
        error = e;
      }
      if (method === 'dispose') aliveAfter = await engine.synchronize().then(() => true, (e) => (e?.code === 'DISPOSED' ? false : e));
      if (!threw) return got;
      if (form.throwing && Object.is(error, THROWN)) return LET_THROUGH;
      throw error;
    } finally {
      if (fresh) await engine.dispose();
    }
  };
  const refusal = (e, neutral, expectedWhereRuns) => {
    if (method === 'dispose' && aliveAfter !== true) return ['wrong-result', `${what} refused (${e.code}) but the engine ${aliveAfter === false ? 'was disposed' : `answers ${aliveAfter}`}`];
    if (!neutral) return null;
    if (!runsAs) return refusalProblem(e, form, what);
    if (expectedWhereRuns) return e.code === expectedWhereRuns ? null : ['wrong-result', `${what}: refused with ${e.code}, expected ${expectedWhereRuns} (a host engine)`];
    return ['neutral-refused', `${what}: ${e.code}: ${String(e.message).slice(0, 200)}`];
  };

  const op = ENGINE_OPS.get(method);
  if (op) {
    // the op's own builder and judge, its engine a shim that calls the method on the receiver
    let receiverNow;
    const shim = { backend: env.backend, hasDevice: false, device: undefined, [method]: (...a) => apply(method, a, receiverNow) };
    const built = op.build(rng, { ...env, engine: shim }, hooks);
    return {
      ...built,
      describe: what,
      mayRefuse: true,
      call: (x) => settle((receiver) => ((receiverNow = receiver), built.call(x))),
      judgeRefusal: (e, { neutral }) => (built.mayRefuse && runsAs ? null : refusal(e, neutral)),
      judge: (got, ctx) => (got === LET_THROUGH ? null : runsAs ? built.judge(got, ctx) : `${what} resolved`),
    };
  }
  if (DEVICE_METHODS.includes(method)) {
    const arg = method === 'uploadKvCache' ? createKvCache('v4', { pageSize: 1, numPages: 1 }) : tensor('float32', [2, 3], new Float32Array(6));
    hooks.track(arg.data);
    return {
      args: [arg],
      describe: what,
      mayRefuse: true,
      call: (x) => settle((receiver) => apply(method, x, receiver)),
      // a host engine has no device memory: BACKEND_UNAVAILABLE where the method runs as the engine's
      judgeRefusal: (e, { neutral }) => refusal(e, neutral, 'BACKEND_UNAVAILABLE'),
      judge: (got) => (got === LET_THROUGH ? null : `${what} resolved on a host engine`),
    };
  }
  // synchronize, dispose and the getters: no arguments
  const want = method === 'hasDevice' ? false : undefined; // a host engine's hasDevice and device
  return {
    args: [],
    describe: what,
    mayRefuse: true,
    call: () => settle((receiver) => apply(method, [], receiver)),
    judgeRefusal: (e, { neutral }) => refusal(e, neutral),
    judge: (got) => {
      if (got === LET_THROUGH) return null;
      if (!runsAs) return `${what} resolved (${String(got)})`;
      if (method === 'dispose' && aliveAfter !== false) return `${what} resolved but the engine ${aliveAfter === true ? 'still answers' : `answers ${aliveAfter}`}`;
      return Object.is(got, want) ? null : `${what} gave ${String(got)}, a host engine's is ${String(want)}`;
    },
  };
}

/** Forms for a plan, a sharded plan or a reference object: it takes only itself (a tenth of the cases). */
function objectForm(rng, real, other) {
  if (rng.uniform() < 0.1) return { name: 'itself', make: () => real, runsAs: true, throwing: false };
  return formOf(rng, FORMS.filter(([n]) => n !== 'itself'), Object.getPrototypeOf(real), other);
}

function planCase(rng, env, hooks) {
  const ratio = rng.pick([0, 4, 128]);
  const { sc, layer, window } = layerScenario(rng, hooks, ratio);
  const plan = createPlan(sc.chunk, { window });
  hooks.plans.push(plan);
  const methods = ['layout', 'combinedRows', 'pagedForm', 'checkCaches', 'release', 'settleDropped', ...(ratio === 0 ? [] : ['pageSize', 'compressedTokenIds']), ...(ratio === 4 ? ['combineC4', 'checkTopk'] : [])];
  const method = rng.pick(methods);
  const args =
    method === 'layout' || method === 'pageSize' || method === 'compressedTokenIds' ? [ratio]
    : method === 'combinedRows' ? [ratio === 128 ? 128 : 0]
    : method === 'checkCaches' ? [layer.caches, ratio]
    : method === 'combineC4' ? [layer.topkIndices]
    : method === 'checkTopk' ? [layer.topkIndices, false]
    : [];
  // a plan takes only itself: a Proxy of it, or an object inheriting from it, refuses too (Plan.isPlan)
  // pagedForm takes the plan's own rows (frozen: out of the mutator's reach, passed by the call)
  const rows = method === 'pagedForm' ? (ratio === 4 ? plan.combineC4(layer.topkIndices) : plan.combinedRows(ratio)) : undefined;
  const form = objectForm(rng, plan, () => env.engine);
  return foreignCall(`plan.${method}`, form, (x) => Reflect.apply(Object.getPrototypeOf(plan)[method], form.make(plan), rows ? [rows] : x), args);
}

function shardedPlanCase(rng) {
  const requests = Array.from({ length: rng.int(1, 3) }, () => {
    const seqLen = rng.int(1, 40);
    return { seqLen, extendLen: rng.int(1, Math.min(seqLen, 4) + 1) };
  });
  const sc = chunkScenario(rng, requests, { window: 16, swaPageSize: 16 });
  const sharded = createShardedPlan(sc.chunk, { shards: rng.int(1, 3), split: rng.pick(['heads', 'queries']), window: 16 });
  const form = objectForm(rng, sharded, () => sharded.shards[0].plan);
  return foreignCall('shardedPlan.release', form, () => Reflect.apply(Object.getPrototypeOf(sharded).release, form.make(sharded), []), []);
}

function referenceCase(rng, env, hooks) {
  if (rng.uniform() < 0.5) {
    const cache = randomV4Cache(rng, hooks, rng.pick([1, 4]), rng.int(1, 3));
    const rows = new R.DequantizedRows(cache, 512);
    const form = objectForm(rng, rows, () => new R.AttentionComparator({ heads: 1, dV: 512 }));
    return foreignCall('dequantizedRows.offsetOf', form, (x) => Reflect.apply(R.DequantizedRows.prototype.offsetOf, form.make(rows), x), [rng.int(0, cache.pageSize * cache.numPages)]);
  }
  const comparator = new R.AttentionComparator({ heads: rng.int(1, 4), dV: 512 });
  const form = objectForm(rng, comparator, () => env.engine);
  return foreignCall('attentionComparator.result', form, () => Reflect.apply(R.AttentionComparator.prototype.result, form.make(comparator), []), []);
}

/** A plan's, sharded plan's or reference object's method on a receiver: the object itself resolves, any other refuses INVALID_VALUE naming this. */
function foreignCall(method, form, run, args) {
  const what = `${method} on ${form.name}`;
  const itself = form.runsAs === true;
  return {
    args,
    describe: what,
    mayRefuse: true,
    call: async (x) => {
      try {
        return await run(x);
      } catch (e) {
        if (form.throwing && Object.is(e, THROWN)) return LET_THROUGH;
        throw e;
      }
    },
    judgeRefusal: (e, { neutral }) => (!neutral ? null : itself ? ['neutral-refused', `${what}: ${e.code}: ${String(e.message).slice(0, 200)}`] : refusalProblem(e, form, what)),
    judge: (got) => (got === LET_THROUGH || itself ? null : `${what} resolved`),
  };
}

const foreignReceiver = {
  name: 'foreignReceiver',
  fromSeed: RECEIVER_FROM_SEED,
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const kind = rng.pick(['engine', 'engine', 'engine', 'engine', 'plan', 'plan', 'plan', 'shardedPlan', 'reference']);
    const built = kind === 'engine' ? engineCase(rng, env, hooks) : kind === 'plan' ? planCase(rng, env, hooks) : kind === 'shardedPlan' ? shardedPlanCase(rng) : referenceCase(rng, env, hooks);
    // the receiver is the hostile part: three cases in four take the arguments as built
    return { validOdds: 0.75, ...built };
  },
};

export const RECEIVER_TARGETS = [[foreignReceiver, 1]];
