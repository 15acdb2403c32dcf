/**
 * Host-engine targets for what was added after the first targets (targets.mjs):
 *
 * - pagedGather: the host paged op's compact gather (src/backends/paged_gather.ts) — windows of
 *   consecutive ids across pages, duplicates, −1 and ids outside the cache, topkLength 0 and above
 *   topk, caches and ids in SharedArrayBuffers, the whole-or-compact choice forced either way or
 *   left to the estimate, caches described by huge shapes (never allocated) — and the caller's
 *   arrays rewritten or detached as soon as the call has returned its promise.
 * - stagingWait: calls made back to back on an engine with a small memoryBudgetBytes, so later
 *   ones wait for staging behind earlier ones, each one's arrays rewritten or detached as soon as it
 *   returned its promise.
 * - engineDispose: a fresh engine with calls in flight when dispose() runs (at once, after a
 *   microtask, a macrotask, a few ms, or the first call's end).
 * - workerThreads (cpu): several Worker threads, each with its own cpu engine over inputs in shared
 *   memory, running calls on the addon's threads together with the main thread; some Workers are
 *   terminated or exit with calls in flight.
 *
 * README ("Memory a call owns"): each tensor is read when the call is made; an input that is not
 * in a SharedArrayBuffer may be reused, rewritten or detached as soon as the call has returned its
 * promise, so the results are those of the arrays at the call. Shared inputs are read in place:
 * rewriting them mid-call may change the results (then only shapes are judged), never crash.
 */
import { Worker } from 'node:worker_threads';
import { SparseMlaError, createEngine, createKvCache, createPlan, createShardedPlan, prefillLayer, prefillLayerSharded, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { withDotScales } from './regime.mjs';
import { randomBf16Bits, makeRng } from '../../dist/check/grid.js';
import { pagedReadForTests } from '../../dist/backends/paged_gather.js';
import { isDetachedBuffer } from './mutate.mjs';
import { fieldsByMemory, judgeAttention, judgeLayer, layerScenario, sparsePrefillTarget, pagedSparseAttentionTarget, dequantizeKCachePagedTarget } from './targets.mjs';

const D = 512;
const isShared = (a) => a.buffer instanceof SharedArrayBuffer;

function sharedCopy(a) {
  const s = new a.constructor(new SharedArrayBuffer(a.byteLength));
  s.set(a);
  return s;
}

/** A typed array as the call gets it: in shared memory (tracked as it is) or tracked by the hooks (which may make it resizable). */
function placeArray(rng, hooks, a, sharedOdds) {
  if (rng.uniform() < sharedOdds) {
    const s = sharedCopy(a);
    hooks.arrays.push(s);
    return s;
  }
  return hooks.track(a);
}

/**
 * Ids of `rows` rows of `topk` entries into a cache of `tokens`: runs of consecutive ids (a window,
 * across pages and past either end of the cache), repeats of earlier entries, −1 and other ids the
 * op skips, and scattered valid ids.
 */
function gatherIds(rng, rows, topk, tokens) {
  const out = new Int32Array(rows * topk);
  for (let i = 0; i < rows; i++) {
    const row = i * topk;
    let k = 0;
    while (k < topk) {
      const u = rng.uniform();
      if (u < 0.35) {
        const len = rng.int(1, Math.min(topk - k, 48) + 1);
        const start = rng.int(-3, tokens + 3);
        for (let j = 0; j < len; j++) out[row + k++] = start + j;
      } else if (u < 0.5 && k > 0) {
        out[row + k] = out[row + rng.int(0, k)];
        k++;
      } else if (u < 0.65) {
        out[row + k++] = rng.pick([-1, -1, -2, tokens, tokens + 1, 2 ** 31 - 1, -(2 ** 31)]);
      } else {
        out[row + k++] = rng.int(0, tokens);
      }
    }
  }
  return out;
}

function gatherLengths(rng, rows, topk) {
  return Int32Array.from({ length: rows }, () => rng.pick([0, topk, topk + 1, 2 ** 31 - 1, rng.int(0, topk + 1)]));
}

function gatherSink(rng, hQ) {
  return new Float32Array(hQ).map(() => (rng.uniform() < 0.1 ? rng.pick([Infinity, -Infinity]) : rng.normal()));
}

/**
 * A v4 cache of random bytes (SPEC §3.1 layout) with every value finite and of moderate size: e4m3
 * nope bytes without the top exponent bit, rope bf16 in ±[2^-8, 2), scales 2^-8..2^0, pad 0. Much
 * faster than quantizing rows; the op and the reference read the same bytes.
 */
function byteCache(rng, pageSize, numPages) {
  const cache = createKvCache('v4', { pageSize, numPages });
  const d = cache.data;
  const pageBytes = d.length / Math.max(1, numPages);
  for (let p = 0; p < numPages; p++) {
    for (let t = 0; t < pageSize; t++) {
      const tok = p * pageBytes + t * 576;
      for (let i = 0; i < 448; i++) d[tok + i] = rng.u32() & 0xb7;
      for (let i = 448; i < 576; i += 2) {
        const r = rng.u32();
        d[tok + i] = r & 0xff;
        d[tok + i + 1] = ((r >>> 8) & 0x80) | (0x3c + ((r >>> 9) & 3));
      }
      const sc = p * pageBytes + pageSize * 576 + t * 8;
      for (let i = 0; i < 7; i++) d[sc + i] = 119 + (rng.u32() % 9);
    }
  }
  return cache;
}

/** One index set of the paged op: a v4 cache, its ids and lengths; `own` collects the typed arrays the call gets. */
function gatherSet(rng, hooks, n, own, sharedOdds) {
  const pageSize = rng.pick([1, 2, 16, 64, 256]);
  const numPages = Math.ceil(rng.int(1, 700) / pageSize);
  const built = byteCache(rng, pageSize, numPages);
  const cache = { ...built, data: placeArray(rng, hooks, built.data, sharedOdds) };
  const tokens = pageSize * numPages;
  const topk = rng.pick([0, 1, 4, 9, 33, 130]);
  const ids = gatherIds(rng, n, topk, tokens);
  const shape = rng.uniform() < 0.2 ? [n, 1, topk] : [n, topk];
  const indices = rng.uniform() < 0.2 ? tensor('int64', shape, placeArray(rng, hooks, BigInt64Array.from(ids, (v) => BigInt(v)), sharedOdds)) : tensor('int32', shape, placeArray(rng, hooks, ids, sharedOdds));
  const lengths = rng.uniform() < 0.4 ? tensor('int32', [n], placeArray(rng, hooks, gatherLengths(rng, n, topk), sharedOdds)) : undefined;
  own.push(cache.data, indices.data, ...(lengths ? [lengths.data] : []));
  return { cache, indices, lengths };
}

/**
 * What a caller does right after a call returned its promise: 'rewrite' its arrays with other
 * bytes (put back once the call settled), 'detach' them (transfer their buffers away), or nothing.
 * Returns { undo, sharedRewritten }.
 */
function afterReturn(arrays, act, rng) {
  const saved = [];
  let sharedRewritten = false;
  for (const a of arrays) {
    if (isDetachedBuffer(a.buffer) || a.byteLength === 0) continue;
    if (act === 'rewrite') {
      const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
      saved.push([bytes, bytes.slice()]);
      for (let i = 0; i < bytes.length; i++) bytes[i] = rng.u32() & 0xff;
      if (isShared(a)) sharedRewritten = true;
    } else if (act === 'detach' && !isShared(a)) {
      try {
        structuredClone(a.buffer, { transfer: [a.buffer] });
      } catch {
        /* a buffer that cannot be transferred: leave it */
      }
    }
  }
  return { undo: () => saved.forEach(([bytes, before]) => bytes.set(before)), sharedRewritten };
}

function pickAfter(rng) {
  const u = rng.uniform();
  return u < 0.4 ? 'none' : u < 0.8 ? 'rewrite' : 'detach';
}

const pagedGather = {
  name: 'pagedGather',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const n = rng.pick([1, 2, 3, 6]);
    const hQ = rng.pick([1, 2, 3]);
    const sharedOdds = rng.pick([0, 0, 0.3, 1]);
    const own = [];
    const q = tensor('bf16', [n, hQ, D], placeArray(rng, hooks, randomBf16Bits(rng, n * hQ * D), sharedOdds));
    own.push(q.data);
    const main = gatherSet(rng, hooks, n, own, sharedOdds);
    const a = { q, kCache: main.cache, indices: main.indices, smScale: 1 / Math.sqrt(576) };
    if (main.lengths) a.topkLength = main.lengths;
    if (rng.uniform() < 0.4) {
      const extra = gatherSet(rng, hooks, n, own, sharedOdds);
      Object.assign(a, { extraKCache: extra.cache, extraIndices: extra.indices, ...(extra.lengths ? { extraTopkLength: extra.lengths } : {}) });
    }
    if (rng.uniform() < 0.5) {
      a.attnSink = tensor('float32', [hQ], placeArray(rng, hooks, gatherSink(rng, hQ), sharedOdds));
      own.push(a.attnSink.data);
    }
    // a cache described past the WASM heap's 4 GiB or past 2^31 tokens, over its real (small) bytes: refused, never allocated
    const huge = rng.uniform() < 0.06 ? rng.pick([{ pageSize: 256, numPages: 2 ** 15 }, { pageSize: 64, numPages: 2 ** 17 + 3 }, { pageSize: 2 ** 16, numPages: 2 ** 16 }]) : null;
    if (huge) a[rng.uniform() < 0.5 || !a.extraKCache ? 'kCache' : 'extraKCache'] = { ...a.kCache, ...huge };
    const force = rng.pick([null, 'compact', 'whole']);
    const act = pickAfter(rng);
    const actRng = makeRng(rng.u32());
    let sharedRewritten = false;
    return {
      args: [a],
      mostlyValid: true, // half the cases unmutated: the gather's own inputs are what is fuzzed here
      mayRefuse: huge !== null,
      call: async ([x]) => {
        // the whole-or-compact choice is made at the call, synchronously
        pagedReadForTests.force = force;
        let p;
        try {
          p = env.engine.pagedSparseAttention(x);
        } finally {
          pagedReadForTests.force = null;
        }
        const after = afterReturn(own, act, actRng);
        sharedRewritten = after.sharedRewritten;
        try {
          return await p;
        } finally {
          after.undo();
        }
      },
      judge: (got, { refArgs, neutral, stub }) => {
        if (huge) return neutral ? `resolved with a cache described as ${huge.pageSize} × ${huge.numPages} (${R.kvCacheBytesReference('v4', huge.pageSize, huge.numPages)} bytes) over ${a.kCache.data.byteLength} bytes` : null; // a mutation may have made it a valid cache
        // a mutated call over arrays detached after it returned: its own arguments are gone (a neutral one is judged on a rebuild)
        if (act === 'detach' && !neutral) return null;
        const r = refArgs[0];
        return judgeAttention(got, () => withDotScales('pagedSparseAttention', R.pagedSparseAttentionReference, fieldsByMemory(r, ['kCache', 'extraKCache'])), r.q.shape[0], r.q.shape[1], D, stub || sharedRewritten);
      },
    };
  },
};

/** Engines with a small memory budget (one per backend and process), so calls made together wait for staging. */
const STAGING_BUDGET = 1 << 20; // 1 MiB (the least createEngine takes): two or three of the calls below at a time
const smallBudget = new Map();
function smallBudgetEngine(backend) {
  if (!smallBudget.has(backend)) smallBudget.set(backend, createEngine({ backend, memoryBudgetBytes: STAGING_BUDGET, ...(backend === 'wasm' ? { workers: 2 } : {}) }));
  return smallBudget.get(backend);
}

/** Disposes what the host targets made for the process (run.mjs at its end). */
export async function closeHostTargets() {
  await racer?.terminate();
  racer = null;
  for (const p of smallBudget.values()) await (await p.catch(() => null))?.dispose();
  smallBudget.clear();
}

function copyTensor(t) {
  return t === undefined ? undefined : { ...t, data: t.data.slice() };
}

/** A call of 150-450 KB of inputs for stagingWait: { args, ref (copies of its arguments), arrays, run(engine), reference() }. */
function stagingCall(rng, hooks) {
  const hQ = rng.int(1, 3);
  const n = rng.int(1, 4);
  const sink = rng.uniform() < 0.5 ? tensor('float32', [hQ], hooks.track(gatherSink(rng, hQ))) : undefined;
  const q = tensor('bf16', [n, hQ, D], hooks.track(randomBf16Bits(rng, n * hQ * D)));
  if (rng.uniform() < 0.5) {
    const sKV = rng.int(150, 450);
    const topk = rng.pick([1, 8, 16]);
    const kv = tensor('bf16', [sKV, D], hooks.track(randomBf16Bits(rng, sKV * D)));
    const indices = tensor('int32', [n, topk], hooks.track(gatherIds(rng, n, topk, sKV)));
    const args = { q, kv, indices, smScale: 1 / Math.sqrt(D), ...(sink ? { attnSink: sink } : {}) };
    const ref = { ...args, q: copyTensor(q), kv: copyTensor(kv), indices: copyTensor(indices), attnSink: copyTensor(sink) };
    return { op: 'sparsePrefill', args, arrays: [q.data, kv.data, indices.data, ...(sink ? [sink.data] : [])], reference: () => withDotScales('sparsePrefill', R.sparsePrefillReference, ref) };
  }
  const built = byteCache(rng, 64, rng.int(4, 13));
  const cache = { ...built, data: hooks.track(built.data) };
  const topk = rng.pick([1, 8, 40]);
  const indices = tensor('int32', [n, topk], hooks.track(gatherIds(rng, n, topk, cache.pageSize * cache.numPages)));
  const args = { q, kCache: cache, indices, smScale: 1 / Math.sqrt(576), ...(sink ? { attnSink: sink } : {}) };
  const ref = { ...args, q: copyTensor(q), kCache: { ...cache, data: cache.data.slice() }, indices: copyTensor(indices), attnSink: copyTensor(sink) };
  return { op: 'pagedSparseAttention', args, arrays: [q.data, cache.data, indices.data, ...(sink ? [sink.data] : [])], reference: () => withDotScales('pagedSparseAttention', R.pagedSparseAttentionReference, ref) };
}

const settle = (p) => p.then((value) => ({ value }), (error) => ({ error }));

const stagingWait = {
  name: 'stagingWait',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const calls = Array.from({ length: rng.int(2, 6) }, () => stagingCall(rng, hooks));
    const acts = calls.map(() => pickAfter(rng));
    const actRng = makeRng(rng.u32());
    return {
      args: [], // nothing to mutate: the calls' own arrays are changed after each returns
      call: async () => {
        const engine = await smallBudgetEngine(env.backend);
        const undo = [];
        const pending = calls.map((c, i) => {
          const p = settle(engine[c.op](c.args));
          undo.push(afterReturn(c.arrays, acts[i], actRng).undo);
          return p;
        });
        const results = await Promise.all(pending);
        undo.forEach((u) => u());
        return results;
      },
      judge: (results) => {
        for (let i = 0; i < calls.length; i++) {
          const { value, error } = results[i];
          const what = `call ${i + 1} of ${calls.length} (${calls[i].op}, arrays ${acts[i]} after it returned)`;
          if (error) return `${what} rejected: ${error?.name} ${error?.code ?? ''} ${String(error?.message).slice(0, 200)}`;
          const p = judgeAttention(value, calls[i].reference, calls[i].args.q.shape[0], calls[i].args.q.shape[1], D);
          if (p) return `${what}: ${p}`;
        }
        return null;
      },
    };
  },
};

const engineDispose = {
  name: 'engineDispose',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const local = { backend: env.backend, engine: null };
    // with a small budget, some of the calls wait for staging when dispose() runs
    const budget = rng.uniform() < 0.3 ? STAGING_BUDGET : undefined;
    const ops = Array.from({ length: rng.int(1, 7) }, () => {
      if (budget && rng.uniform() < 0.6) {
        const c = stagingCall(rng, hooks);
        return { call: () => local.engine[c.op](c.args), judge: (got) => judgeAttention(got, c.reference, c.args.q.shape[0], c.args.q.shape[1], D) };
      }
      const op = rng.pick([sparsePrefillTarget, pagedSparseAttentionTarget, dequantizeKCachePagedTarget]).build(rng, local, hooks);
      return { call: () => op.call(op.args), judge: (got) => op.judge(got, { refArgs: op.args, stub: false, neutral: true }) };
    });
    const when = rng.pick(['sync', 'microtask', 'immediate', 'timeout', 'first-settled']);
    const ms = rng.int(0, 6);
    const workers = rng.int(1, env.backend === 'wasm' ? 3 : 5);
    const late = sparsePrefillTarget.build(rng, local, hooks);
    return {
      args: [],
      call: async () => {
        local.engine = await createEngine({ backend: env.backend, workers, ...(budget ? { memoryBudgetBytes: budget } : {}) });
        const pending = ops.map((op) => settle(Promise.resolve().then(() => op.call())));
        if (when === 'microtask') await Promise.resolve();
        else if (when === 'immediate') await new Promise((r) => setImmediate(r));
        else if (when === 'timeout') await new Promise((r) => setTimeout(r, ms));
        else if (when === 'first-settled') await Promise.race(pending);
        const disposed = settle(local.engine.dispose());
        const results = await Promise.all(pending);
        const afterDispose = await settle(Promise.resolve().then(() => late.call(late.args)));
        return { results, disposed: await disposed, afterDispose, again: await settle(local.engine.dispose()) };
      },
      judge: ({ results, disposed, afterDispose, again }) => {
        const isDisposed = (e) => e instanceof SparseMlaError && e.code === 'DISPOSED';
        if (disposed.error) return `dispose() (${when}) rejected: ${disposed.error}`;
        if (again.error) return `a second dispose() rejected: ${again.error}`;
        if (!isDisposed(afterDispose.error)) return `a call after dispose() ${afterDispose.error ? `rejected with ${afterDispose.error}` : 'resolved'}, expected DISPOSED`;
        for (let i = 0; i < ops.length; i++) {
          const { value, error } = results[i];
          if (error) {
            if (!isDisposed(error)) return `call ${i + 1} of ${ops.length} in flight at dispose() (${when}) rejected with ${error?.name} ${error?.code ?? ''}: ${String(error?.message).slice(0, 200)}`;
            continue;
          }
          const p = ops[i].judge(value);
          if (p) return `call ${i + 1} of ${ops.length} in flight at dispose() (${when}): ${p}`;
        }
        return null;
      },
    };
  },
};

/**
 * prefillLayer (or prefillLayerSharded over this engine) with q, the sink and the indexer's top-k rewritten or detached as soon as the call
 * returned its promise (the layer's steps run after it has: each must use the arrays as they were
 * at the call). The caches are left alone: a layer's dequant may read them while it runs (README).
 */
const layerAfterReturn = {
  name: 'layerAfterReturn',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    const shards = rng.uniform() < 0.3 ? rng.int(1, hQ + 1) : 0; // prefillLayerSharded over this engine, split by heads or queries
    const split = rng.pick(['heads', 'queries']);
    layer.plan = shards ? createShardedPlan(sc.chunk, { shards: split === 'heads' ? shards : rng.int(1, 4), split, window }) : createPlan(sc.chunk, { window });
    hooks.plans.push(layer.plan);
    const own = [layer.q.data, ...(layer.attnSink ? [layer.attnSink.data] : []), ...(layer.topkIndices ? [layer.topkIndices.data] : [])];
    const copy = (t) => (t ? { ...t, data: t.data.slice() } : undefined);
    const atCall = { ...layer, q: copy(layer.q), ...(layer.attnSink ? { attnSink: copy(layer.attnSink) } : {}), ...(layer.topkIndices ? { topkIndices: copy(layer.topkIndices) } : {}) };
    const act = rng.pick(['rewrite', 'detach']);
    const actRng = makeRng(rng.u32());
    return {
      args: [],
      call: async () => {
        const p = shards ? prefillLayerSharded(Array.from({ length: layer.plan.shards.length }, () => env.engine), layer) : prefillLayer(env.engine, layer);
        const after = afterReturn(own, act, actRng);
        try {
          return await p;
        } finally {
          after.undo();
        }
      },
      judge: (got) => judgeLayer(got, sc, atCall),
    };
  },
};

/**
 * A copy of a typed array (the builder's own stays as it was): plain, at an odd offset of a larger
 * plain or shared buffer, or a fixed-length view inside a resizable one.
 */
function placeOperand(rng, a, how) {
  const ctor = a.constructor, el = a.BYTES_PER_ELEMENT;
  const pad = el * rng.int(1, 4); // aligned for its type, never on the staging's 64-byte grid
  if (how === 'plain') return a.slice();
  if (how === 'offset' || how === 'sharedOffset') {
    const buf = how === 'sharedOffset' ? new SharedArrayBuffer(a.byteLength + 2 * pad) : new ArrayBuffer(a.byteLength + 2 * pad);
    const v = new ctor(buf, pad, a.length);
    v.set(a);
    return v;
  }
  if (how === 'resizable') {
    const buf = new ArrayBuffer(a.byteLength + pad, { maxByteLength: 2 * a.byteLength + 2 * pad });
    const v = new ctor(buf, pad, a.length);
    v.set(a);
    return v;
  }
  throw new Error(`placeOperand: ${how}`);
}

/** Bytes of `a` now (null when its memory is gone). */
function snapshot(a) {
  if (isDetachedBuffer(a.buffer)) return null;
  try {
    return a.slice();
  } catch {
    return null; // a view out of its shrunk buffer's bounds
  }
}

/** What a getter of a later argument does to an operand after its check: its memory detached, shrunk (and grown back), rewritten, or nothing. */
function midCheck(a, act, rng) {
  if (act === 'detach') {
    if (!(a.buffer instanceof SharedArrayBuffer)) structuredClone(a.buffer, { transfer: [a.buffer] });
  } else if (act === 'shrink' || act === 'shrinkRegrow') {
    const b = a.buffer;
    if (b instanceof ArrayBuffer && b.resizable) {
      const full = b.byteLength;
      b.resize(Math.max(0, a.byteOffset + a.byteLength - a.BYTES_PER_ELEMENT));
      if (act === 'shrinkRegrow') b.resize(full); // the view is whole again, its last element now 0
    }
  } else if (act === 'rewrite') {
    // other values of the same kind (moderate bf16 / float32, small ids): the layer must use these, as they are when the call returns
    for (let i = 0; i < a.length; i += rng.int(1, 16)) {
      if (a instanceof Uint16Array) a[i] = (rng.u32() & 0x807f) | 0x3f00;
      else if (a instanceof Int32Array) a[i] = rng.int(-1, 64);
      else a[i] = rng.normal();
    }
  }
}

/** The options objects prefillLayer is given: valid ones (as literals, frozen, a Proxy, inherited, getters) and hostile ones. */
function layerOptions(rng) {
  const valid = [undefined, {}, { dropped: 'await' }, { dropped: 'later' }, { output: 'host', dropped: 'later' }, { output: 'host' }, { dropped: undefined }];
  if (rng.uniform() < 0.6) {
    const o = rng.pick(valid);
    if (o === undefined) return { options: undefined, refuse: null };
    const how = rng.pick(['plain', 'frozen', 'proxy', 'inherited', 'getters']);
    const reads = {};
    if (how === 'frozen') return { options: Object.freeze({ ...o }), refuse: null };
    if (how === 'proxy') return { options: new Proxy({ ...o }, {}), refuse: null };
    if (how === 'inherited') return { options: Object.create({ ...o }), refuse: null };
    if (how === 'getters') {
      const g = {};
      for (const [k, v] of Object.entries(o)) Object.defineProperty(g, k, { enumerable: true, get: () => ((reads[k] = (reads[k] ?? 0) + 1), v) });
      return { options: g, refuse: null, reads };
    }
    return { options: { ...o }, refuse: null };
  }
  const bad = rng.pick([
    [{ dropped: rng.pick(['LATER', 'later ', '', 'never', 'await\0']) }, 'INVALID_VALUE', 'options.dropped'],
    [{ dropped: rng.pick([null, true, 1, 0, NaN, {}, [], 1n, Symbol('later')]) }, 'INVALID_VALUE', 'options.dropped'],
    [{ dropped: new String('later') }, 'INVALID_VALUE', 'options.dropped'],
    [{ output: 'device', dropped: rng.pick(['later', 'await']) }, 'BACKEND_UNAVAILABLE', 'options.output'],
    [{ output: rng.pick(['Host', 'gpu', null, 1]), dropped: 'later' }, 'INVALID_VALUE', 'options.output'],
    [rng.pick([null, 'later', 1, [], () => ({ dropped: 'later' })]), 'INVALID_VALUE', 'options'],
  ]);
  return { options: bad[0], refuse: { code: bad[1], argument: bad[2] } };
}

const LAYER_FIELDS_READ_LATE = ['smScale', 'caches', 'path', 'threshold', 'env'];

/**
 * prefillLayer (src/planner/prefill_layer.ts) driven where the other targets do not reach:
 * - options: { output, dropped } valid (frozen, Proxy, inherited, getters: each read once) or
 *   hostile (typed refusal naming it, before any work); then plan.settleDropped() once, twice at once,
 *   or after a fresh engine that ran a layer of the plan was disposed: it resolves to
 *   plan.stats.c4Dropped, the sum of the layers' counts (a host engine knows each at once);
 * - q, the sink and the top-k at odd offsets of larger plain or shared buffers or in resizable ones,
 *   with a getter of a later argument (smScale, caches, path, threshold, env) that detaches,
 *   shrinks, shrinks and grows back, or rewrites one of them after its check: detached or shrunk is
 *   INVALID_VALUE naming it; otherwise the layer's result is that of the arrays as they were when the
 *   call returned its promise (copied then: copyAtCall), and they are rewritten or detached right after;
 * - the engine's memoryBudgetBytes at its edges (invalid values refused by createEngine; a budget
 *   too small for the layer's copies and outputs TOO_LARGE before any work).
 */
const layerHostile = {
  name: 'layerHostile',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    layer.plan = createPlan(sc.chunk, { window });
    hooks.plans.push(layer.plan);
    const mode = rng.pick(['options', 'options', 'views', 'views', 'budget']);
    const operands = ['q', 'attnSink', 'topkIndices'].filter((k) => layer[k] !== undefined);
    // where each operand lies, and what a late getter does to one of them
    const place = Object.fromEntries(operands.map((k) => [k, mode === 'views' ? rng.pick(['plain', 'offset', 'sharedOffset', 'resizable']) : 'plain']));
    for (const k of operands) layer[k] = tensor(layer[k].dtype, layer[k].shape, placeOperand(rng, layer[k].data, place[k]));
    const victim = mode === 'views' ? rng.pick(operands) : null;
    const atCallLength = Object.fromEntries(operands.map((k) => [k, layer[k].data.length]));
    const act = mode === 'views' ? rng.pick(['none', 'detach', 'shrink', 'shrinkRegrow', 'rewrite']) : 'none';
    const lateField = rng.pick(LAYER_FIELDS_READ_LATE);
    const after = rng.pick(['none', 'rewrite', 'detach']);
    const { options, refuse, reads } = mode === 'options' ? layerOptions(rng) : { options: undefined, refuse: null };
    const settleHow = rng.pick(['once', 'twice', 'afterDispose']);
    const budget = mode === 'budget' ? rng.pick([0, -1, NaN, Infinity, 2 ** 20 - 1, 1.5 * 2 ** 20, '2097152', 2 ** 53, 2 ** 20, 2 ** 20 + 1, 2 ** 53 - 1, 3 * 2 ** 20]) : undefined;
    const budgetValid = budget === undefined || (Number.isSafeInteger(budget) && budget >= 2 ** 20);
    const actRng = makeRng(rng.u32());
    return {
      args: [],
      call: async () => {
        const engine = mode === 'budget' || settleHow === 'afterDispose' ? await settle(createEngine({ backend: env.backend, workers: 1, ...(budget === undefined ? {} : { memoryBudgetBytes: budget }) })) : { value: env.engine };
        if (engine.error) return { created: engine };
        const e = engine.value;
        try {
          const args = { ...layer };
          const target = victim && layer[victim].data;
          if (victim) {
            const v = args[lateField];
            Object.defineProperty(args, lateField, { enumerable: true, configurable: true, get: () => (midCheck(target, act, actRng), v) });
          }
          const pending = settle(prefillLayer(e, args, options));
          // the operands as the call has them: copied before it returned its promise
          const atCall = Object.fromEntries(operands.map((k) => [k, snapshot(layer[k].data)]));
          const changed = after === 'none' ? { undo: () => undefined, sharedRewritten: false } : afterReturn(operands.map((k) => layer[k].data), after, actRng);
          const r = await pending;
          changed.undo();
          const settled = settleHow === 'twice' ? await Promise.all([settle(layer.plan.settleDropped()), settle(layer.plan.settleDropped())]) : settleHow === 'afterDispose' ? (await e.dispose(), [await settle(layer.plan.settleDropped())]) : [await settle(layer.plan.settleDropped())];
          return { r, atCall, settled, c4Dropped: layer.plan.stats.c4Dropped, lent: e.hostMemory().staging?.lentBytes ?? 0, sharedRewritten: changed.sharedRewritten };
        } finally {
          if (e !== env.engine) await e.dispose();
        }
      },
      judge: ({ created, r, atCall, settled, c4Dropped, lent, sharedRewritten }) => {
        const typed = (err, code, argument) => err instanceof SparseMlaError && err.code === code && (argument === undefined || err.argument === argument);
        if (created) {
          if (budgetValid) return `createEngine({ memoryBudgetBytes: ${String(budget)} }) rejected: ${created.error}`;
          return typed(created.error, 'INVALID_VALUE', 'memoryBudgetBytes') ? null : `createEngine({ memoryBudgetBytes: ${String(budget)} }) gave ${created.error}, expected INVALID_VALUE naming memoryBudgetBytes`;
        }
        if (!budgetValid) return `createEngine({ memoryBudgetBytes: ${String(budget)} }) resolved`;
        if (lent !== 0) return `${lent} bytes of the staging still lent once the layer settled`;
        for (const s of settled) {
          if (s.error) return `plan.settleDropped() (${settleHow}) rejected: ${s.error}`;
          if (s.value !== c4Dropped) return `plan.settleDropped() (${settleHow}) gave ${s.value}, plan.stats.c4Dropped ${c4Dropped}`;
        }
        // (an operand of no elements has no memory to lose: a chunk without queries)
        const gone = victim && atCallLength[victim] > 0 && (act === 'detach' ? !(layer[victim].data.buffer instanceof SharedArrayBuffer) : act === 'shrink' && place[victim] === 'resizable');
        if (refuse) return r.error && typed(r.error, refuse.code, refuse.argument) ? null : `options ${describeOptions(options)}: ${r.error ?? 'resolved'}, expected ${refuse.code} naming ${refuse.argument}`;
        if (r.error) {
          // INVALID_SHAPE where the getter ran before the operand's own check (a view out of its shrunk buffer has no elements)
          if (gone && (typed(r.error, 'INVALID_VALUE', `${victim}.data`) || typed(r.error, 'INVALID_SHAPE', `${victim}.data`))) return null;
          // an operand of no elements whose buffer went before its check: refused as detached, or taken as the empty array it is
          if (victim && atCallLength[victim] === 0 && act === 'detach' && typed(r.error, 'INVALID_VALUE', `${victim}.data`)) return null;
          if (mode === 'budget' && typed(r.error, 'TOO_LARGE')) return null;
          return `rejected (${mode}${victim ? `, ${victim} ${place[victim]} ${act} in the ${lateField} getter` : ''}, options ${describeOptions(options)}): ${r.error?.name} ${r.error?.code ?? ''} ${String(r.error?.message).slice(0, 200)}`;
        }
        if (gone) return `resolved with ${victim} ${act === 'detach' ? 'detached' : 'shrunk'} by the ${lateField} getter after its check`;
        if (reads) for (const [k, n] of Object.entries(reads)) if (n !== 1) return `options.${k} read ${n} times`;
        const v = r.value;
        if (typeof v.dropped !== 'number') return `dropped ${v.dropped} on a host engine (it knows the count at once)`;
        if (c4Dropped !== v.dropped) return `plan.stats.c4Dropped ${c4Dropped} after one layer that dropped ${v.dropped}`;
        const ref = { ...layer };
        // (an operand of no elements detached by the getter was taken as the empty array it is: the reference gets one, not null;
        // cpu seed 169 case 681, since the reference refuses a tensor whose data is no typed array)
        for (const k of operands) ref[k] = { ...layer[k], data: atCall[k] ?? (atCallLength[k] === 0 ? new layer[k].data.constructor(0) : null) };
        // shared operands rewritten after the call returned are read in place: then only shapes are judged
        return judgeLayer(v, sc, ref, sharedRewritten);
      },
    };
  },
};

/**
 * prefillLayer calls in flight on a fresh engine when its dispose() runs (at once, after a
 * microtask, a macrotask, a few ms, or the first layer's end), some of them { dropped: 'later' },
 * some with a small memoryBudgetBytes: each resolves judged against the reference or rejects with
 * DISPOSED; nothing of the engine's staging stays lent; plan.settleDropped() gives plan.stats.c4Dropped;
 * a layer after dispose() (one of the same plan) rejects with DISPOSED, as any call does.
 */
const layerDispose = {
  name: 'layerDispose',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    layer.plan = createPlan(sc.chunk, { window });
    hooks.plans.push(layer.plan);
    const copy = (t) => (t ? { ...t, data: t.data.slice() } : undefined);
    const calls = Array.from({ length: rng.int(1, 5) }, () => ({ options: rng.pick([undefined, { dropped: 'later' }, { dropped: 'await' }]), after: rng.pick(['none', 'rewrite', 'detach']) }));
    const when = rng.pick(['sync', 'microtask', 'immediate', 'timeout', 'first-settled']);
    const ms = rng.int(0, 6);
    const workers = rng.int(1, env.backend === 'wasm' ? 3 : 5);
    const budget = rng.uniform() < 0.3 ? STAGING_BUDGET : undefined;
    const actRng = makeRng(rng.u32());
    return {
      args: [],
      call: async () => {
        const e = await createEngine({ backend: env.backend, workers, ...(budget ? { memoryBudgetBytes: budget } : {}) });
        const undo = [];
        const pending = calls.map((c) => {
          // each call its own arrays (rewritten or detached right after it returned its promise)
          const own = { ...layer, q: copy(layer.q), ...(layer.attnSink ? { attnSink: copy(layer.attnSink) } : {}), ...(layer.topkIndices ? { topkIndices: copy(layer.topkIndices) } : {}) };
          const p = settle(prefillLayer(e, own, c.options));
          undo.push(afterReturn(['q', 'attnSink', 'topkIndices'].filter((k) => own[k]).map((k) => own[k].data), c.after, actRng).undo);
          return p;
        });
        if (when === 'microtask') await Promise.resolve();
        else if (when === 'immediate') await new Promise((r) => setImmediate(r));
        else if (when === 'timeout') await new Promise((r) => setTimeout(r, ms));
        else if (when === 'first-settled') await Promise.race(pending);
        const disposed = await settle(e.dispose());
        const results = await Promise.all(pending);
        undo.forEach((u) => u());
        const lent = e.hostMemory().staging?.lentBytes ?? 0;
        const afterDispose = await settle(prefillLayer(e, { ...layer }));
        const settledDropped = await settle(layer.plan.settleDropped());
        return { results, disposed, lent, afterDispose, settledDropped, c4Dropped: layer.plan.stats.c4Dropped };
      },
      judge: ({ results, disposed, lent, afterDispose, settledDropped, c4Dropped }) => {
        const isDisposed = (x) => x instanceof SparseMlaError && x.code === 'DISPOSED';
        if (disposed.error) return `dispose() (${when}) rejected: ${disposed.error}`;
        if (lent !== 0) return `${lent} bytes of the disposed engine's staging still lent`;
        if (!isDisposed(afterDispose.error)) return `a layer after dispose() ${afterDispose.error ? `rejected with ${afterDispose.error}` : `resolved (numQueries ${sc.numQueries})`}, expected DISPOSED`;
        if (settledDropped.error) return `plan.settleDropped() rejected: ${settledDropped.error}`;
        if (settledDropped.value !== c4Dropped) return `plan.settleDropped() gave ${settledDropped.value}, plan.stats.c4Dropped ${c4Dropped}`;
        let sum = 0;
        for (let i = 0; i < calls.length; i++) {
          const { value, error } = results[i];
          const what = `layer ${i + 1} of ${calls.length} in flight at dispose() (${when}, options ${describeOptions(calls[i].options)}, arrays ${calls[i].after} after it returned)`;
          if (error) {
            if (!isDisposed(error)) return `${what} rejected with ${error?.name} ${error?.code ?? ''}: ${String(error?.message).slice(0, 200)}`;
            continue;
          }
          if (typeof value.dropped !== 'number') return `${what}: dropped ${value.dropped} on a host engine`;
          sum += value.dropped;
          const p = judgeLayer(value, sc, layer);
          if (p) return `${what}: ${p}`;
        }
        // (a layer rejected with DISPOSED after its combine ran has its count in plan.stats too, as its combine)
        if (sum > c4Dropped) return `plan.stats.c4Dropped ${c4Dropped}, less than the resolved layers dropped (${sum})`;
        return null;
      },
    };
  },
};

const RACER_URL = new URL('./racer_worker.mjs', import.meta.url);
let racer = null; // one racer Worker per process, made at its first use (closeHostTargets ends it)

/**
 * Rewrites `buffers` (SharedArrayBuffers) from another thread until the returned stop() resolves;
 * with `ranges` ([buffer index, byte offset, words] each, race_targets.mjs), only those 32-bit words.
 */
export async function race(buffers, seed, ranges) {
  racer ??= new Worker(RACER_URL);
  const stop = new SharedArrayBuffer(4);
  const next = (what) => new Promise((resolve) => racer.once('message', (m) => m === what && resolve()));
  const started = next('started');
  racer.postMessage({ buffers, stop, seed, ranges });
  await started;
  return async () => {
    const stopped = next('stopped');
    Atomics.store(new Int32Array(stop), 0, 1);
    await stopped;
  };
}

/**
 * A layer (prefillLayer, or prefillLayerSharded over this engine) whose q, sink, top-k and caches lie
 * in SharedArrayBuffers that another thread rewrites throughout the call (README "Memory a call
 * owns": results may change, the call may never read or write outside its buffers): it resolves
 * with outputs of the layer's shapes and a dropped count, or rejects with a typed error that is not
 * a backend's failure; the process lives on.
 */
const layerRace = {
  name: 'layerRace',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    const sharded = rng.uniform() < 0.25;
    layer.plan = sharded ? createShardedPlan(sc.chunk, { shards: 2, split: rng.pick(['heads', 'queries']), window }) : createPlan(sc.chunk, { window });
    hooks.plans.push(layer.plan);
    if (sharded && layer.plan.split === 'heads' && layer.q.shape[1] < 2) layer.plan = createShardedPlan(sc.chunk, { shards: 2, split: 'queries', window });
    const args = { ...layer, caches: {} };
    for (const k of ['q', 'attnSink', 'topkIndices']) if (layer[k]) args[k] = { ...layer[k], data: sharedCopy(layer[k].data) };
    for (const [k, c] of Object.entries(layer.caches)) args.caches[k] = { ...c, data: sharedCopy(c.data) };
    const buffers = [...['q', 'attnSink', 'topkIndices'].filter((k) => args[k]).map((k) => args[k].data.buffer), ...Object.values(args.caches).map((c) => c.data.buffer)].filter(() => rng.uniform() < 0.8);
    const seed = rng.u32();
    return {
      args: [],
      call: async () => {
        const stop = await race(buffers, seed);
        try {
          return await settle(sharded ? prefillLayerSharded([env.engine, env.engine], args) : prefillLayer(env.engine, args));
        } finally {
          await stop();
        }
      },
      judge: ({ value, error }) => {
        if (error) {
          if (!(error instanceof SparseMlaError) || error.code === 'BACKEND_FAILURE' || error.code === 'WORKER_DIED') return `rejected with ${error?.name} ${error?.code ?? ''}: ${String(error?.message).slice(0, 200)}`;
          return null;
        }
        return judgeLayer(value, sc, layer, true);
      },
    };
  },
};

function describeOptions(o) {
  try {
    return typeof o === 'object' && o !== null ? JSON.stringify(o) ?? String(o) : String(o);
  } catch {
    return typeof o;
  }
}

const WORKER_URL = new URL('./thread_worker.mjs', import.meta.url);
const DIST_URL = new URL('../../dist/', import.meta.url).href;

/** A call for workerThreads, its inputs in shared memory (a Worker reads them in place): larger, so it is mid-flight when its Worker ends. */
function threadCall(rng, hooks) {
  const n = rng.int(4, 33);
  const hQ = rng.pick([2, 4]);
  const q = tensor('bf16', [n, hQ, D], sharedCopy(randomBf16Bits(rng, n * hQ * D)));
  hooks.arrays.push(q.data);
  const sink = rng.uniform() < 0.5 ? tensor('float32', [hQ], sharedCopy(gatherSink(rng, hQ))) : undefined;
  if (sink) hooks.arrays.push(sink.data);
  if (rng.uniform() < 0.5) {
    const sKV = rng.int(64, 600);
    const topk = rng.pick([64, 128, 256]);
    const kv = tensor('bf16', [sKV, D], sharedCopy(randomBf16Bits(rng, sKV * D)));
    const indices = tensor('int32', [n, topk], sharedCopy(gatherIds(rng, n, topk, sKV)));
    hooks.arrays.push(kv.data, indices.data);
    return { op: 'sparsePrefill', args: { q, kv, indices, smScale: 1 / Math.sqrt(D), ...(sink ? { attnSink: sink } : {}) } };
  }
  const built = byteCache(rng, 64, rng.int(2, 9));
  const cache = { ...built, data: sharedCopy(built.data) };
  const topk = rng.pick([64, 200]);
  const indices = tensor('int32', [n, topk], sharedCopy(gatherIds(rng, n, topk, cache.pageSize * cache.numPages)));
  hooks.arrays.push(cache.data, indices.data);
  return { op: 'pagedSparseAttention', args: { q, kCache: cache, indices, smScale: 1 / Math.sqrt(576), ...(sink ? { attnSink: sink } : {}) } };
}

const sameBits = (a, b) => a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

const workerThreads = {
  name: 'workerThreads',
  engine: true,
  hostEngineOnly: true,
  cpuOnly: true,
  build(rng, env, hooks) {
    const plans = Array.from({ length: rng.int(1, 4) }, () => ({
      calls: Array.from({ length: rng.int(1, 5) }, () => threadCall(rng, hooks)),
      end: rng.pick(['finish', 'finish', 'terminate', 'exit']),
      delayMs: rng.int(0, 12),
      workers: rng.int(1, 5),
    }));
    return {
      args: [],
      call: async () => {
        const runs = plans.map((plan) => runWorker(plan));
        // the same calls on this thread's engine meanwhile: the bits a Worker's calls must give
        const expected = await Promise.all(plans.map((plan) => Promise.all(plan.calls.map((c) => env.engine[c.op](c.args)))));
        return { outcomes: await Promise.all(runs), expected, after: await settle(env.engine[plans[0].calls[0].op](plans[0].calls[0].args)) };
      },
      judge: ({ outcomes, expected, after }) => {
        if (after.error) return `a call on this thread after the Workers ended rejected: ${after.error}`;
        if (!after.value.out.data.every((b, i) => b === expected[0][0].out.data[i])) return 'a call on this thread after the Workers ended gave other bits';
        for (let w = 0; w < plans.length; w++) {
          const o = outcomes[w];
          const what = `Worker ${w + 1} of ${plans.length} (${plans[w].calls.length} calls, ${plans[w].end})`;
          if (o.error) return `${what}: ${o.error}`;
          if (plans[w].end !== 'finish') continue; // ended mid-call: what matters is that this process lives on
          if (o.results.length !== plans[w].calls.length) return `${what}: ${o.results.length} results`;
          for (let i = 0; i < o.results.length; i++) {
            const r = o.results[i];
            if (r.error) return `${what}: call ${i + 1} rejected: ${r.error}`;
            const e = expected[w][i];
            for (const k of ['out', 'lse', 'maxLogits']) if (!sameBits(r.value[k], e[k].data)) return `${what}: call ${i + 1}'s ${k} differs from the same call on this thread`;
          }
        }
        return null;
      },
    };
  },
};

/** Runs one Worker's plan: { results } once it finished, {} once it was ended, { error } when the Worker failed otherwise. */
function runWorker(plan) {
  return new Promise((resolve) => {
    const worker = new Worker(WORKER_URL, { workerData: { dist: DIST_URL, workers: plan.workers, end: plan.end } });
    let settled = false;
    const done = (v) => {
      if (!settled) {
        settled = true;
        resolve(v);
      }
    };
    worker.on('message', (m) => {
      if (m.type === 'ready') worker.postMessage({ calls: plan.calls.map((c) => ({ op: c.op, args: c.args })) });
      else if (m.type === 'issued' && plan.end === 'terminate') setTimeout(() => worker.terminate().then(() => done({}), (e) => done({ error: `terminate() rejected: ${e}` })), plan.delayMs);
      else if (m.type === 'done') {
        done({ results: m.results });
        void worker.terminate();
      } else if (m.type === 'failed') done({ error: m.error });
    });
    worker.on('error', (e) => done({ error: `the Worker threw: ${e?.stack ?? e}` }));
    worker.on('exit', (code) => done(plan.end === 'finish' ? { error: `the Worker exited (${code}) before its calls were done` } : {}));
  });
}

/** The host targets with their weights (fuzz.mjs adds them to a host engine's mix; cpuOnly ones on the cpu backend). */
export const HOST_TARGETS = [
  [pagedGather, 4],
  [stagingWait, 2],
  [engineDispose, 1],
  [layerAfterReturn, 1],
  [workerThreads, 1],
  [layerHostile, 2],
  [layerDispose, 1],
  [layerRace, 1],
];
