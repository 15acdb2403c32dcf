/**
 * Targets of several host engines at once (session 57, host runs, each from its fromSeed). The other
 * targets run a sharded layer over one engine repeated, and dispose only an engine whose own calls
 * are all that run; these reach what a server with several engines does:
 *
 * - shardedEngines: prefillLayerSharded over distinct engines (the case's, fresh ones of its
 *   backend, one of the other host kind; sometimes a small memoryBudgetBytes), q, the top-k and the
 *   caches given whole or one per shard / engine (copies of the same values), and one of: the layer
 *   twice (the engines in another order: a plan is its engines' to share), two layers at once over
 *   the plan, `plan.release()` during the layer, an engine disposed before the call (DISPOSED,
 *   before any shard ran) or while it runs (each layer right or DISPOSED). Then the layer again over
 *   the engines still alive must be right, and no engine still alive may hold staging.
 * - neighbourDispose: 2-3 fresh engines (of the case's backend, or one of each host kind) with calls
 *   in flight on each (ops and layers) when one of them is disposed (at once, after a microtask, a
 *   macrotask, a timer, its first call's end; sometimes twice at once). Engines share the cpu
 *   addon's threads and queue (dispose cancels the disposed engine's queued calls: only those), so
 *   the other engines' calls must all be right; the disposed engine's are right or DISPOSED; each
 *   engine still alive then runs a call right and holds no staging, and the disposed one refuses a
 *   call with DISPOSED.
 * - aliasedInputs (every backend): a valid sparsePrefill, pagedSparseAttention or prefillLayer whose
 *   operands all live in one buffer (plain, shared, or resizable), each at its own offset: q and kv
 *   overlapping each other, the index tensors overlapping each other, the topkLength tensors too,
 *   the caches and the sink beside them at odd (aligned) offsets, a cache or a topkLength given as
 *   the same object twice (the paged op's extra set). Inputs are only read, so the operands' values
 *   are whatever the shared bytes hold: the result is judged against the reference of that memory,
 *   and no byte of the buffer may change.
 * - devicePlanLifecycle (cuda engines: a GPU or the stub): one plan through 2-5 steps of device
 *   layers on the case's engine, a fresh engine of its device (disposed by a step, while the plan
 *   keeps its rows, ids and workspace there) and a peer engine of another device: layers with
 *   outputs on the device or the host, `plan.release()` between layers, two layers at once on two
 *   engines, a layer on the disposed engine (DISPOSED), `plan.settleDropped()`. Every layer of a
 *   live engine is right (on the stub: its shapes), device outputs read back by their engine; a
 *   layer refused DISPOSED only on the disposed engine. The stub's checks hold over the whole case:
 *   no freed or other device's buffer handed to an op, and nothing left on any device once the
 *   plan is released (a disposed engine's part of the plan included).
 * - workerChurn (host runs, from seed 199): a wasm engine's workers ended as a crash would while idle,
 *   their replacements ended while they start (once in a row: the pool refuses calls only after three
 *   failed starts), calls made while a replacement starts, the engine disposed while one starts. No
 *   call may fail (no worker ends under one), the pool ends with its workers all running and idle,
 *   each with one message listener, and no staging held; after the dispose a call is DISPOSED.
 */
import { SparseMlaError, createEngine, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, tensor } from '../../dist/index.js';
import { engineBackend } from '../../dist/engine.js';
import { judgeLayer, layerScenario, pagedSparseAttentionTarget, sparsePrefillTarget } from './targets.mjs';
import { oneCall } from './side_targets.mjs';

/** The first seed that draws these targets. */
export const ENGINES_FROM_SEED = 194;

const D = 512;
const settle = (f) => Promise.resolve().then(f).then((value) => ({ value }), (error) => ({ error }));
const isCode = (e, code) => e instanceof SparseMlaError && e.code === code;
const errStr = (e) => (e instanceof Error ? `${e.name}${e.code ? ` ${e.code}` : ''}: ${String(e.message).slice(0, 200)}` : `a thrown ${typeof e}`);
const otherKind = (backend) => (backend === 'cpu' ? 'wasm' : 'cpu');

/** A host engine of `backend` (a wasm one where this process has no cpu addon). */
async function hostEngine(backend, workers, budget) {
  const options = { workers, ...(budget ? { memoryBudgetBytes: budget } : {}) };
  try {
    return await createEngine({ backend, ...options });
  } catch (e) {
    if (backend !== 'cpu' || !isCode(e, 'BACKEND_UNAVAILABLE')) throw e;
    return createEngine({ backend: 'wasm', ...options });
  }
}

/** What an engine's staging holds handed out or lent (0 and 0 once its calls settled). */
function stagingHeld(engine) {
  const s = engineBackend(engine)?.staging;
  return s ? { busy: s.busyBytes, lent: s.lentBytes } : { busy: 0, lent: 0 };
}

/** Waits for a wasm engine's workers to go idle (a failed call's parts on other workers finish first). */
async function settleWorkers(engine) {
  const pool = engineBackend(engine)?.pool;
  if (!pool?.testing) return;
  for (const t0 = Date.now(); (pool.testing.busyWorkers().length > 0 || pool.testing.queued() > 0) && Date.now() - t0 < 10_000; ) await new Promise((r) => setTimeout(r, 5));
}

const copy = (t) => (t === undefined ? undefined : tensor(t.dtype, t.shape.slice(), t.data.slice()));
const copyCache = (c) => (c === undefined ? undefined : { format: c.format, pageSize: c.pageSize, numPages: c.numPages, data: c.data.slice() });
const copyCaches = (caches) => Object.fromEntries(Object.entries(caches).map(([k, c]) => [k, copyCache(c)]));

/** Rows [a, a + n) of a [numQueries, ...] tensor, as a tensor of its own memory. */
function rowsOf(t, a, n) {
  const row = t.shape.slice(1).reduce((x, y) => x * y, 1);
  return tensor(t.dtype, [n, ...t.shape.slice(1)], t.data.slice(a * row, (a + n) * row));
}

/** Heads [h0, h1) of a bf16 [n, hQ, 512] q, as a tensor of its own memory. */
function headsOf(q, h0, h1) {
  const [n, hQ] = q.shape;
  const out = new Uint16Array(n * (h1 - h0) * D);
  for (let i = 0; i < n; i++) out.set(q.data.subarray((i * hQ + h0) * D, (i * hQ + h1) * D), i * (h1 - h0) * D);
  return tensor('bf16', [n, h1 - h0, D], out);
}

/** `total` split into `parts` positive sizes (random cuts), as [start, end) ranges. */
function randomRanges(rng, total, parts) {
  const cuts = new Set();
  while (cuts.size < parts - 1) cuts.add(rng.int(1, total));
  const ends = [...cuts].sort((a, b) => a - b).concat(total);
  return ends.map((e, i) => [i === 0 ? 0 : ends[i - 1], e]);
}

const shardedEngines = {
  name: 'shardedEngines',
  engine: true,
  hostEngineOnly: true,
  fromSeed: ENGINES_FROM_SEED,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    const split = hQ < 2 || rng.uniform() < 0.5 ? 'queries' : 'heads';
    const n = split === 'heads' ? rng.int(2, hQ + 1) : rng.int(2, 5);
    const plan = createShardedPlan(sc.chunk, { shards: n, split, window });
    hooks.plans.push(plan);
    // each shard's engine: the case's, one of two fresh ones of its backend, or one of the other host kind
    const roles = Array.from({ length: n }, () => rng.pick(['own', 'fresh0', 'fresh1', 'other']));
    if (roles.every((r) => r === roles[0])) roles[rng.int(0, n)] = roles[0] === 'other' ? 'fresh0' : 'other';
    const fresh = { workers: rng.int(1, 3), budget: rng.uniform() < 0.25 ? rng.pick([2 ** 22, 2 ** 24]) : undefined };
    const qForm = rng.uniform() < 0.35 ? 'perShard' : 'whole';
    const topkForm = layer.topkIndices && rng.uniform() < 0.35 ? 'perShard' : 'whole';
    const cachesForm = rng.uniform() < 0.35 ? 'perEngine' : 'one';
    const output = rng.pick([undefined, 'host']);
    const event = rng.pick(['none', 'twice', 'both', 'release', 'disposeBefore', 'disposeDuring', 'disposeDuring']);
    const disposeWhen = rng.pick(['sync', 'microtask', 'timer']);
    const ms = rng.int(0, 4);
    const heads = split === 'heads' ? (qForm === 'perShard' ? randomRanges(rng, hQ, n) : null) : null;
    const victimRole = rng.pick(roles.filter((r) => r !== 'own'));

    const args = { ...layer, plan };
    if (qForm === 'perShard') args.q = plan.shards.map((s, i) => (split === 'heads' ? headsOf(layer.q, heads[i][0], heads[i][1]) : rowsOf(layer.q, s.queryOffset, s.numQueries)));
    if (topkForm === 'perShard') args.topkIndices = plan.shards.map((s) => (split === 'heads' ? copy(layer.topkIndices) : rowsOf(layer.topkIndices, s.queryOffset, s.numQueries)));
    if (cachesForm === 'perEngine') args.caches = plan.shards.map(() => copyCaches(layer.caches));
    const what = `${split} split into ${n} (${roles.join(', ')}; fresh: ${fresh.workers} worker(s)${fresh.budget ? `, memoryBudgetBytes ${fresh.budget}` : ''}), q ${qForm}${heads ? ` (heads ${heads.map(([a, b]) => `${a}-${b}`).join(', ')})` : ''}, top-k ${layer.topkIndices ? topkForm : 'none'}, caches ${cachesForm}, c${ratio}, ${sc.numQueries} queries; ${event}${event.startsWith('dispose') ? ` (${victimRole}${event === 'disposeDuring' ? `, ${disposeWhen}${disposeWhen === 'timer' ? ` ${ms} ms` : ''}` : ''})` : ''}`;
    // over a small budget, a shard may be refused TOO_LARGE (alone it would be)
    const tooLarge = (e) => fresh.budget !== undefined && isCode(e, 'TOO_LARGE');

    return {
      args: [],
      describe: what,
      call: async () => {
        const made = {};
        const engineOf = async (role) => {
          if (role === 'own') return env.engine;
          made[role] ??= hostEngine(role === 'other' ? otherKind(env.backend) : env.backend, fresh.workers, fresh.budget);
          return made[role];
        };
        try {
          const engines = await Promise.all(roles.map(engineOf));
          const byRole = Object.fromEntries(await Promise.all(Object.entries(made).map(async ([k, p]) => [k, await p])));
          const victim = byRole[victimRole];
          const run = (list) => settle(() => prefillLayerSharded(list, args, output ? { output } : undefined));
          const out = { first: [], again: null, held: [], victimCall: null };
          if (event === 'disposeBefore') await victim.dispose();
          if (event === 'both') out.first = await Promise.all([run(engines), run(engines.slice().reverse())]);
          else {
            const p = run(engines);
            if (event === 'release') plan.release();
            if (event === 'disposeDuring') {
              if (disposeWhen === 'microtask') await Promise.resolve();
              else if (disposeWhen === 'timer') await new Promise((r) => setTimeout(r, ms));
              await victim.dispose();
            }
            out.first.push(await p);
            if (event === 'twice') out.first.push(await run(engines.slice().reverse()));
          }
          const disposed = event.startsWith('dispose');
          // again over the engines still alive (the case's in place of a disposed one)
          const alive = engines.map((e) => (disposed && e === victim ? env.engine : e));
          out.again = await run(alive);
          for (const e of new Set(alive)) {
            await settleWorkers(e);
            out.held.push(stagingHeld(e));
          }
          if (disposed) out.victimCall = await run(engines);
          return out;
        } finally {
          for (const p of Object.values(made)) await (await p.catch(() => null))?.dispose();
        }
      },
      judge: ({ first, again, held, victimCall }) => {
        const disposed = event.startsWith('dispose');
        for (const [i, r] of first.entries()) {
          if (r.error) {
            if (disposed && isCode(r.error, 'DISPOSED')) continue;
            if (tooLarge(r.error)) continue;
            return `${what}: layer ${i + 1} rejected with ${errStr(r.error)}`;
          }
          if (event === 'disposeBefore') return `${what}: the layer resolved over an engine disposed before the call`;
          const p = judgeLayer(r.value, sc, layer);
          if (p) return `${what}: layer ${i + 1}: ${p}`;
        }
        if (again.error && !tooLarge(again.error)) return `${what}: the layer again over the engines still alive rejected with ${errStr(again.error)}`;
        if (!again.error) {
          const p = judgeLayer(again.value, sc, layer);
          if (p) return `${what}: the layer again over the engines still alive: ${p}`;
        }
        const h = held.find((x) => x.busy !== 0 || x.lent !== 0);
        if (h) return `${what}: once the layers settled an engine's staging still held ${h.busy} bytes handed out and ${h.lent} lent`;
        if (victimCall && !isCode(victimCall.error, 'DISPOSED')) return `${what}: a layer over the disposed engine ${victimCall.error ? `rejected with ${errStr(victimCall.error)}` : 'resolved'}, expected DISPOSED`;
        return null;
      },
    };
  },
};

const neighbourDispose = {
  name: 'neighbourDispose',
  engine: true,
  hostEngineOnly: true,
  fromSeed: ENGINES_FROM_SEED,
  build(rng, env, hooks) {
    const count = rng.int(2, 4);
    const mixed = rng.uniform() < 0.3;
    const kinds = Array.from({ length: count }, (_, i) => (mixed && i === count - 1 ? otherKind(env.backend) : env.backend));
    const workers = Array.from({ length: count }, () => rng.int(1, 3));
    const budget = rng.uniform() < 0.2 ? 2 ** 22 : undefined;
    const locals = kinds.map((backend) => ({ backend, engine: null, stub: null }));
    const calls = locals.map((local) => Array.from({ length: rng.int(1, 4) }, () => oneCall(rng, local, hooks)));
    const victim = rng.int(0, count);
    const when = rng.pick(['sync', 'microtask', 'immediate', 'timer', 'first-settled']);
    const ms = rng.int(0, 6);
    const twice = rng.uniform() < 0.25;
    const what = `${count} engines (${kinds.map((k, i) => `${k}/${workers[i]}w: ${calls[i].map((c) => c.name).join(' + ')}`).join('; ')})${budget ? `, memoryBudgetBytes ${budget}` : ''}; engine ${victim} disposed${twice ? ' twice at once' : ''} (${when}${when === 'timer' ? ` ${ms} ms` : ''})`;
    const tooLarge = (e) => budget !== undefined && isCode(e, 'TOO_LARGE');
    return {
      args: [],
      describe: what,
      call: async () => {
        try {
          for (const [i, local] of locals.entries()) local.engine = await hostEngine(local.backend, workers[i], budget);
          const pending = calls.map((list) => list.map((c) => settle(() => c.run(c.args))));
          if (when === 'microtask') await Promise.resolve();
          else if (when === 'immediate') await new Promise((r) => setImmediate(r));
          else if (when === 'timer') await new Promise((r) => setTimeout(r, ms));
          else if (when === 'first-settled') await Promise.race(pending[victim]);
          const engine = locals[victim].engine;
          const disposed = twice ? Promise.all([settle(() => engine.dispose()), settle(() => engine.dispose())]) : Promise.all([settle(() => engine.dispose())]);
          const results = await Promise.all(pending.map((list) => Promise.all(list)));
          const disposals = await disposed;
          const after = [], held = [];
          for (const [i, local] of locals.entries()) {
            after.push(await settle(() => calls[i][0].run(calls[i][0].args)));
            if (i !== victim) {
              await settleWorkers(local.engine);
              held.push(stagingHeld(local.engine));
            }
          }
          return { results, disposals, after, held };
        } finally {
          for (const local of locals) await local.engine?.dispose();
        }
      },
      judge: ({ results, disposals, after, held }) => {
        const bad = disposals.find((d) => d.error);
        if (bad) return `${what}: dispose() rejected with ${errStr(bad.error)}`;
        for (const [i, list] of results.entries()) {
          for (const [j, r] of list.entries()) {
            const name = `engine ${i}'s call ${j + 1} (${calls[i][j].name})`;
            if (r.error) {
              if (tooLarge(r.error) || (i === victim && isCode(r.error, 'DISPOSED'))) continue;
              return `${what}: ${name} rejected with ${errStr(r.error)}`;
            }
            const p = calls[i][j].judge(r.value);
            if (p) return `${what}: ${name}: ${p}`;
          }
        }
        for (const [i, r] of after.entries()) {
          if (i === victim) {
            if (!isCode(r.error, 'DISPOSED')) return `${what}: a call on the disposed engine ${r.error ? `rejected with ${errStr(r.error)}` : 'resolved'}, expected DISPOSED`;
            continue;
          }
          if (r.error) {
            if (tooLarge(r.error)) continue;
            return `${what}: engine ${i}'s call again, after the dispose, rejected with ${errStr(r.error)}`;
          }
          const p = calls[i][0].judge(r.value);
          if (p) return `${what}: engine ${i}'s call again, after the dispose: ${p}`;
        }
        const h = held.find((x) => x.busy !== 0 || x.lent !== 0);
        if (h) return `${what}: once the calls settled an engine still alive held ${h.busy} bytes of staging handed out and ${h.lent} lent`;
        return null;
      },
    };
  },
};

/**
 * The typed arrays of `items` ({ array, group }) moved into one buffer: items of a group that may
 * overlap ('bf16', 'index', 'length') at random offsets of a region as long as the group's longest
 * (so they share bytes), the others ('alone') one after another with odd gaps; each at an offset
 * its kind can take. The values are written in a random order, so where two overlap the later one's
 * bytes hold. Returns the new views in the order of `items`, and the buffer.
 */
function oneBuffer(rng, items, kind) {
  const regions = new Map();
  let at = rng.int(0, 9);
  const placed = items.map((item) => {
    const el = item.array.BYTES_PER_ELEMENT;
    const align = (x) => Math.ceil(x / el) * el;
    if (item.group === 'alone') {
      const offset = align(at);
      at = offset + item.array.byteLength + rng.int(0, 5);
      return { ...item, offset };
    }
    let region = regions.get(item.group);
    if (!region) {
      const longest = Math.max(...items.filter((x) => x.group === item.group).map((x) => x.array.byteLength));
      region = { start: align(at), length: longest };
      at = region.start + longest + 8 + rng.int(0, 5);
      regions.set(item.group, region);
    }
    const slack = (region.length - item.array.byteLength) / el;
    return { ...item, offset: region.start + el * rng.int(0, slack + 1) };
  });
  const bytes = at + 16;
  const buffer = kind === 'shared' ? new SharedArrayBuffer(bytes) : kind === 'resizable' ? new ArrayBuffer(bytes, { maxByteLength: bytes + 64 }) : new ArrayBuffer(bytes);
  const views = placed.map((p) => new p.array.constructor(buffer, p.offset, p.array.length));
  const order = placed.map((_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = rng.int(0, i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  for (const i of order) views[i].set(placed[i].array);
  return { views, buffer };
}

const retensor = (t, data) => tensor(t.dtype, t.shape, data);
const recache = (c, data) => ({ format: c.format, pageSize: c.pageSize, numPages: c.numPages, data });

const aliasedInputs = {
  name: 'aliasedInputs',
  engine: true,
  fromSeed: ENGINES_FROM_SEED,
  build(rng, env, hooks) {
    const op = rng.pick(['sparsePrefill', 'pagedSparseAttention', 'prefillLayer']);
    const kind = rng.pick(['plain', 'plain', 'shared', 'resizable']);
    // operands: [path into the args, group] (the builder's own arrays, copied into the one buffer)
    let built, fields, judge;
    const quiet = { track: (a) => a, arrays: [], plans: [], side: null, side2: null, side3: null };
    if (op === 'prefillLayer') {
      const { sc, layer, window } = layerScenario(rng, quiet, rng.pick([0, 4, 128]));
      layer.plan = createPlan(sc.chunk, { window });
      hooks.plans.push(layer.plan);
      built = layer;
      fields = [['q', 'bf16'], ['topkIndices', 'index'], ['attnSink', 'alone'], ['caches.swa', 'alone'], ['caches.c4', 'alone'], ['caches.c128', 'alone']];
      judge = (got, args, stub) => judgeLayer(got, sc, args, stub);
    } else {
      const target = op === 'sparsePrefill' ? sparsePrefillTarget : pagedSparseAttentionTarget;
      const t = target.build(rng, env, quiet);
      built = { ...t.args[0] };
      fields = op === 'sparsePrefill'
        ? [['q', 'bf16'], ['kv', 'bf16'], ['indices', 'index'], ['topkLength', 'length'], ['attnSink', 'alone']]
        : [['q', 'bf16'], ['kCache', 'alone'], ['indices', 'index'], ['topkLength', 'length'], ['extraKCache', 'alone'], ['extraIndices', 'index'], ['extraTopkLength', 'length'], ['attnSink', 'alone']];
      judge = (got, args, stub) => t.judge(got, { refArgs: [args], stub });
    }
    const get = (path) => path.split('.').reduce((o, k) => o?.[k], built);
    const present = fields.filter(([path]) => get(path) !== undefined);
    // int64 indices and int32 ones share no bytes (their values would be other ids): int64 alone
    const items = present.map(([path, group]) => ({ path, array: get(path).data, group: get(path).data instanceof BigInt64Array ? 'alone' : group }));
    const { views } = oneBuffer(rng, items, kind);
    const args = { ...built, ...(built.caches ? { caches: { ...built.caches } } : {}) };
    present.forEach(([path], i) => {
      const [a, b] = path.split('.');
      const old = get(path);
      const made = old.format !== undefined ? recache(old, views[i]) : retensor(old, views[i]);
      if (b) args[a][b] = made;
      else args[a] = made;
      hooks.arrays.push(views[i]); // judged unchanged by the call
    });
    // the same object twice: the paged op's extra set as its main one
    const same = op === 'pagedSparseAttention' && args.extraKCache && rng.uniform() < 0.4;
    if (same) {
      args.extraKCache = args.kCache;
      // its ids as the main ones where the widths agree (else those it has, over the main cache)
      if (args.extraIndices.shape[args.extraIndices.shape.length - 1] === args.indices.shape[args.indices.shape.length - 1] && args.indices.shape.length === 2) {
        args.extraIndices = args.indices;
        if (args.extraTopkLength && args.topkLength) args.extraTopkLength = args.topkLength;
      }
    }
    return {
      args: [],
      describe: `${op}, its ${present.map(([p]) => p).join(', ')} in one ${kind} buffer${same ? '; the extra cache the main one' : ''}`,
      call: () => (op === 'prefillLayer' ? prefillLayer(env.engine, args) : env.engine[op](args)),
      judge: (got, { stub }) => judge(got, args, stub),
    };
  },
};

const devicePlanLifecycle = {
  name: 'devicePlanLifecycle',
  engine: true,
  deviceEngineOnly: true,
  fromSeed: ENGINES_FROM_SEED,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    if (layer.topkIndices && layer.topkIndices.shape.length === 3) layer.topkIndices = tensor('int32', [layer.topkIndices.shape[0], layer.topkIndices.shape[2]], layer.topkIndices.data);
    // from seed DEVICE_PLAN_HOST_FROM_SEED also a layer of the plan on a host (wasm) engine, alone or at once with a device one
    const STEPS = ['own', 'own', 'fresh', 'fresh', 'peer', 'release', 'both', 'disposeFresh', 'settleDropped', ...(hooks.seed >= DEVICE_PLAN_HOST_FROM_SEED ? ['host', 'hostAndOwn'] : [])];
    const steps = Array.from({ length: rng.int(2, 6) }, () => ({ kind: rng.pick(STEPS), output: rng.pick(['device', 'device', 'host']), later: rng.uniform() < 0.3 }));
    // the fresh engine's layer after it was disposed, where a step disposed it
    if (steps.some((s) => s.kind === 'disposeFresh') && rng.uniform() < 0.5) steps.push({ kind: 'fresh', output: 'device', later: false });
    let plan;
    const what = `c${ratio} plan, ${sc.numQueries} queries: ${steps.map((s) => `${s.kind}${['own', 'fresh', 'peer', 'both', 'hostAndOwn'].includes(s.kind) ? `(${s.output}${s.later ? ', dropped later' : ''})` : ''}`).join(', ')}`;
    return {
      args: [],
      describe: what,
      prepare: () => {
        plan = createPlan(sc.chunk, { window });
        hooks.plans.push(plan);
      },
      call: async () => {
        const fresh = await env.freshEngine();
        const peer = (await env.engineOn(env.engine.device === 0 ? 1 : 0)) ?? env.engine;
        const host = steps.some((s) => s.kind.startsWith('host')) ? await createEngine({ backend: 'wasm', workers: 1 }) : null;
        const engines = { own: env.engine, fresh, peer, host };
        let freshDisposed = false;
        const out = [];
        // a layer's outputs, device ones read back by their engine (an engine of the buffers' device) and freed
        const layerOn = (which, s) =>
          settle(async () => {
            const e = engines[which];
            const r = await prefillLayer(e, { ...layer, plan }, { output: which === 'host' ? 'host' : s.output, ...(s.later ? { dropped: 'later' } : {}) });
            const reader = which === 'fresh' && freshDisposed ? env.engine : e;
            const back = {};
            for (const k of ['out', 'lse', 'maxLogits']) {
              const t = r[k];
              if (t.data?.free) {
                try {
                  back[k] = await reader.download(t);
                } finally {
                  t.data.free();
                }
              } else back[k] = t;
            }
            return { ...back, dropped: r.dropped };
          });
        try {
          for (const [i, s] of steps.entries()) {
            const label = `step ${i + 1} ${s.kind}`;
            if (s.kind === 'own' || s.kind === 'fresh' || s.kind === 'peer') out.push({ label, layer: await layerOn(s.kind, s), disposed: s.kind === 'fresh' && freshDisposed });
            else if (s.kind === 'both') {
              const [a, b] = await Promise.all([layerOn('own', s), layerOn('peer', s)]);
              out.push({ label: `${label} (own)`, layer: a }, { label: `${label} (peer)`, layer: b });
            } else if (s.kind === 'host') out.push({ label, layer: await layerOn('host', s), host: true });
            else if (s.kind === 'hostAndOwn') {
              const [a, b] = await Promise.all([layerOn('host', s), layerOn('own', s)]);
              out.push({ label: `${label} (host)`, layer: a, host: true }, { label: `${label} (own)`, layer: b });
            } else if (s.kind === 'release') out.push({ label, other: await settle(() => plan.release()) });
            else if (s.kind === 'disposeFresh') {
              freshDisposed = true;
              out.push({ label, other: await settle(() => fresh.dispose()) });
            } else out.push({ label, other: await settle(() => plan.settleDropped()) });
          }
        } finally {
          await fresh.dispose();
          await host?.dispose();
        }
        return out;
      },
      judge: (out, { stub }) => {
        for (const r of out) {
          if (r.layer) {
            if (r.disposed) {
              if (!isCode(r.layer.error, 'DISPOSED')) return `${what}: ${r.label}: a layer on the disposed engine ${r.layer.error ? `rejected with ${errStr(r.layer.error)}` : 'resolved'}, expected DISPOSED`;
              continue;
            }
            if (r.layer.error) return `${what}: ${r.label}: the layer rejected: ${errStr(r.layer.error)}`;
            const got = r.layer.value;
            // a count read later (null: a device c4 layer's, with { dropped: 'later' }): judged by the shapes only
            // (a host engine's layer computes on the stub too: judged by its values)
            const p = judgeLayer(got.dropped === null ? { ...got, dropped: 0 } : got, sc, layer, (stub && !r.host) || got.dropped === null);
            if (p) return `${what}: ${r.label}: ${p}`;
          } else if (r.other?.error) return `${what}: ${r.label}: ${errStr(r.other.error)}`;
        }
        return null;
      },
    };
  },
};

/** The first seed whose devicePlanLifecycle cases may run a layer of the plan on a host engine too. */
export const DEVICE_PLAN_HOST_FROM_SEED = 201;

/** The first seed that draws workerChurn. */
export const CHURN_FROM_SEED = 199;

const workerChurn = {
  name: 'workerChurn',
  engine: true,
  hostEngineOnly: true,
  fromSeed: CHURN_FROM_SEED,
  build(rng, env, hooks) {
    const workers = rng.int(1, 4);
    const local = { backend: 'wasm', engine: null, stub: null };
    const STEPS = ['call', 'call', 'killIdle', 'killIdle', 'killAndCall', 'killStarting', 'callsAtOnce'];
    const steps = Array.from({ length: rng.int(2, 6) }, () => rng.pick(STEPS));
    const disposeDuringStart = rng.uniform() < 0.25;
    const calls = Array.from({ length: 3 }, () => oneCall(rng, local, hooks));
    const what = `a wasm engine of ${workers} worker(s): ${steps.join(', ')}${disposeDuringStart ? ', disposed while a replacement starts' : ''}`;
    return {
      args: [],
      describe: what,
      call: async () => {
        local.engine = await createEngine({ backend: 'wasm', workers });
        const backend = engineBackend(local.engine);
        const pool = backend.pool;
        const out = { results: [], end: null, afterDispose: null, disposal: null };
        const run = async (label, c) => out.results.push({ label, c, r: await settle(() => c.run(c.args)) });
        const idle = async () => {
          for (const t0 = Date.now(); pool.testing.idleWorkers().length === 0 && Date.now() - t0 < 10_000; ) await new Promise((r) => setTimeout(r, 2));
          return pool.testing.idleWorkers()[0];
        };
        const starting = () => pool.testing.states().indexOf('starting');
        let lastKilledStarting = false;
        try {
          for (const [i, s] of steps.entries()) {
            const c = calls[i % calls.length];
            if (s === 'call') await run(`step ${i + 1}`, c);
            else if (s === 'callsAtOnce') await Promise.all(calls.map((x, k) => run(`step ${i + 1} call ${k + 1}`, x)));
            else {
              const w = await idle();
              if (w !== undefined) await pool.testing.terminateWorker(w);
              if (s === 'killAndCall') await run(`step ${i + 1} (a replacement starting)`, c);
              else if (s === 'killStarting' && !lastKilledStarting) {
                const k = starting();
                if (k >= 0) await pool.testing.terminateWorker(k);
              }
            }
            lastKilledStarting = s === 'killStarting';
          }
          // the pool settles: every worker running and idle
          for (const t0 = Date.now(); pool.testing.states().some((st) => st !== 'idle') && Date.now() - t0 < 10_000; ) await new Promise((r) => setTimeout(r, 5));
          out.end = { states: pool.testing.states(), listeners: pool.testing.messageListeners(), threads: new Set(pool.testing.threadIds()).size, busy: backend.staging.busyBytes, lent: backend.staging.lentBytes };
          if (disposeDuringStart) {
            const w = await idle();
            if (w !== undefined) await pool.testing.terminateWorker(w);
            out.disposal = await settle(() => local.engine.dispose());
            out.afterDispose = await settle(() => calls[0].run(calls[0].args));
          }
        } finally {
          await local.engine.dispose();
        }
        return out;
      },
      judge: ({ results, end, disposal, afterDispose }) => {
        for (const { label, c, r } of results) {
          if (r.error) return `${what}: ${label} (${c.name}) rejected with ${errStr(r.error)} (no worker ended under it)`;
          const p = c.judge(r.value);
          if (p) return `${what}: ${label} (${c.name}): ${p}`;
        }
        if (end.states.some((st) => st !== 'idle')) return `${what}: 10 s after the steps the pool's workers are ${end.states.join(', ')}`;
        if (end.listeners.some((n) => n !== 1)) return `${what}: the workers' message listeners are ${end.listeners.join(', ')} (one each)`;
        if (end.threads !== workers) return `${what}: ${end.threads} worker threads for a pool of ${workers}`;
        if (end.busy !== 0 || end.lent !== 0) return `${what}: the staging holds ${end.busy} bytes handed out and ${end.lent} lent once every call settled`;
        if (disposal?.error) return `${what}: dispose() while a replacement starts rejected with ${errStr(disposal.error)}`;
        if (afterDispose && !isCode(afterDispose.error, 'DISPOSED')) return `${what}: a call after dispose() ${afterDispose.error ? `rejected with ${errStr(afterDispose.error)}` : 'resolved'}, expected DISPOSED`;
        return null;
      },
    };
  },
};

/** The targets of this file, with their weights (fuzz.mjs draws them with the session-53 ones). */
export const ENGINES_TARGETS = [
  [shardedEngines, 1],
  [neighbourDispose, 1],
  [aliasedInputs, 1],
  [devicePlanLifecycle, 1],
  [workerChurn, 1],
];
