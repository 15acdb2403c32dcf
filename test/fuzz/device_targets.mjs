/**
 * The fuzzer's device targets (a cuda engine: a GPU, or the stub of stub_cuda.mjs): the engine's
 * ops and the layer API with device operands made by the engine's own upload API, and device-tensor
 * lifecycle abuse. Each builds the host call of its host target (targets.mjs), then its `prepare`
 * uploads some operands (and, in some cases, abuses one: freed, of another size or device, int64
 * indices on the device: `mustRefuse`), before the mutations. A resolved neutral call is judged on
 * the host twin's reference (a rebuild from the same seed, never uploaded) after its device outputs
 * are downloaded; on the stub only shapes and placements are judged (fuzz.mjs).
 */
import {
  createPlan,
  createShardedPlan,
  prefillLayer,
  prefillLayerSharded,
  tensor,
} from '../../dist/index.js';
import { isDeviceBuffer } from '../../dist/tensor.js';
import {
  D,
  DTYPES,
  gatherShards as gather,
  judgeLayer,
  layerScenario,
  randomHostTensor,
  randomV4Cache,
  dequantizeKCachePagedTarget,
  pagedSparseAttentionTarget,
  sparsePrefillTarget,
} from './targets.mjs';

const BYTES = { bf16: 2, float32: 4, int32: 4, int64: 8, uint8: 1 };

/**
 * Where each operand goes, drawn at build time (so the neutral rebuild draws the same): 'host',
 * 'device' (this engine), 'peer' (another engine of the same device), or one abuse for at most one
 * operand: 'freed', 'resized', 'other-device'.
 */
function placements(rng, env, names, allDevice = 0) {
  const where = {};
  const every = rng.uniform() < allDevice; // all on this engine's device (a device layer loop's call)
  for (const n of names) where[n] = every || rng.uniform() < 0.7 ? 'device' : rng.uniform() < 0.7 ? 'host' : 'peer';
  let abuse = null;
  if (names.length > 0 && rng.uniform() < 0.25) {
    const n = rng.pick(names);
    const kinds = ['freed', 'resized', ...(env.deviceCount > 1 ? ['other-device'] : [])];
    where[n] = rng.pick(kinds);
    abuse = `${n} ${where[n]}`;
  }
  return { where, abuse };
}

/** A device tensor or cache (an unfrozen copy: the mutator edits it) of `t` placed `how`, its buffer freed after the case. */
async function place(env, hooks, t, how, isCache = false) {
  if (how === 'host' || t === undefined || t === null) return t;
  const device = env.engine.device;
  const engine = how === 'peer' ? await env.engineOn(device) : how === 'other-device' ? await env.engineOn(device + 1) : env.engine;
  const d = isCache ? await engine.uploadKvCache(t) : await engine.upload(t);
  hooks.deviceBuffers.push(d.data);
  let data = d.data;
  if (how === 'freed') data.free();
  if (how === 'resized') {
    // a live buffer of another size under the same dtype and shape
    const bytes = data.byteLength + (data.byteLength > 0 && hooks.rng?.uniform() < 0.5 ? -Math.min(data.byteLength, 4) : 8);
    data = hooks.deviceBuffer(bytes);
  }
  return isCache ? { format: d.format, pageSize: d.pageSize, numPages: d.numPages, data } : { dtype: d.dtype, shape: [...d.shape], data };
}

/** Places args[key] for every key of `where` (in place). */
async function placeAll(env, hooks, obj, where, caches = []) {
  for (const [k, how] of Object.entries(where)) {
    if (obj[k] !== undefined) obj[k] = await place(env, hooks, obj[k], how, caches.includes(k));
  }
}

/** The output option: none, host or device. */
function outputOption(rng) {
  const r = rng.uniform();
  return r < 0.2 ? undefined : r < 0.4 ? { output: 'host' } : { output: 'device' };
}

/** Where outputs were asked for, they are: device tensors for { output: 'device' }, host ones otherwise. */
function placementProblem(raw, option, keys = ['out', 'lse', 'maxLogits']) {
  const want = option?.output === 'device';
  for (const k of keys) {
    const t = raw?.[k];
    if (!t) return `no ${k}`;
    if (isDeviceBuffer(t.data) !== want) return `${k} is in ${isDeviceBuffer(t.data) ? 'device' : 'host'} memory, ${want ? 'device' : 'host'} asked for`;
  }
  return null;
}

/** A device op target over a host target: its call with some operands on the device. */
function deviceOp(name, host, fields, caches = []) {
  return {
    name,
    engine: true,
    build(rng, env, hooks) {
      const built = host.build(rng, env, hooks);
      const a = built.args[0];
      const present = fields.filter((k) => a[k] !== undefined);
      const { where, abuse } = placements(rng, env, present);
      // int64 indices cannot be on the device (INVALID_DTYPE): a device abuse of its own
      const int64OnDevice = a.indices?.dtype === 'int64' && where.indices !== undefined && where.indices !== 'host';
      const option = outputOption(rng);
      const args = option === undefined ? [a] : [a, option];
      return {
        args,
        mustRefuse: abuse ?? (int64OnDevice ? 'int64 indices in device memory' : undefined),
        prepare: (x) => placeAll(env, hooks, x[0], where, caches),
        call: built.call,
        judge: (got, ctx) => {
          if (!ctx.neutral) return null; // the device args' host twin is the unmutated rebuild only
          return placementProblem(ctx.raw, option, name === 'deviceDequantize' ? [] : undefined) ?? built.judge(got, ctx);
        },
      };
    },
  };
}

const deviceSparsePrefill = deviceOp('deviceSparsePrefill', sparsePrefillTarget, ['q', 'kv', 'indices', 'topkLength', 'attnSink']);
const devicePagedSparseAttention = deviceOp('devicePagedSparseAttention', pagedSparseAttentionTarget, ['q', 'kCache', 'indices', 'topkLength', 'extraKCache', 'extraIndices', 'extraTopkLength', 'attnSink'], ['kCache', 'extraKCache']);
const deviceDequantize = deviceOp('deviceDequantize', dequantizeKCachePagedTarget, ['cache'], ['cache']);

/** upload / download / uploadKvCache / copyFrom / synchronize: exact bytes back (the stub keeps them too). */
const deviceMemory = {
  name: 'deviceMemory',
  engine: true,
  build(rng, env, hooks) {
    const method = rng.pick(['upload', 'download', 'uploadKvCache', 'copyFrom', 'copyFrom', 'synchronize']);
    const t = method === 'uploadKvCache' ? randomV4Cache(rng, hooks, rng.pick([1, 2, 16]), rng.int(0, 3)) : randomHostTensor(rng, hooks);
    const from = method === 'copyFrom' ? rng.pick(['device', 'peer', ...(env.deviceCount > 1 ? ['other-device'] : [])]) : 'device';
    const abuse = method !== 'upload' && method !== 'uploadKvCache' && method !== 'synchronize' && rng.uniform() < 0.2 ? rng.pick(['freed', 'resized']) : null;
    return {
      args: [t],
      mustRefuse: abuse ? `tensor ${abuse}` : undefined,
      otherDeviceOk: method === 'copyFrom', // what it is for
      prepare: async (x) => {
        if (method === 'download' || method === 'copyFrom') {
          x[0] = await place(env, hooks, x[0], from === 'device' ? 'device' : from);
          if (abuse) x[0] = await abuseOf(env, hooks, x[0], abuse);
        }
      },
      call: async (x) => {
        if (method === 'synchronize') {
          const pending = env.engine.upload(x[0]); // queued, then waited for
          await env.engine.synchronize();
          return pending;
        }
        return env.engine[method](...x);
      },
      judge: (got, { neutral, refArgs }) => {
        if (!neutral) return null;
        const source = refArgs[0]; // the host twin's tensor or cache (the rebuild): the bytes every result must hold
        // got: the result downloaded (fuzz.mjs hostify) when it is a device tensor
        const want = method === 'uploadKvCache' ? source.data : new Uint8Array(source.data.buffer, source.data.byteOffset, source.data.byteLength);
        const data = method === 'uploadKvCache' ? null : got?.data;
        if (method === 'uploadKvCache') {
          if (got?.format !== source.format || got.pageSize !== source.pageSize || got.numPages !== source.numPages || !isDeviceBuffer(got.data) || got.data.byteLength !== want.length) return `device cache ${got?.format} ${got?.pageSize}×${got?.numPages}`;
          return null; // its bytes: checked by a download in the layer targets
        }
        if (got?.dtype !== source.dtype || JSON.stringify(got.shape) !== JSON.stringify(source.shape)) return `${got?.dtype} ${JSON.stringify(got?.shape)}, expected ${source.dtype} ${JSON.stringify(source.shape)}`;
        const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        const i = bytes.findIndex((b, k) => b !== want[k]);
        return i === -1 && bytes.length === want.length ? null : `byte ${i} of ${want.length}: got ${bytes[i]}, want ${want[i]}`;
      },
    };
  },
};

/** A device tensor abused after it was placed: its buffer freed, or swapped for one of another size. */
async function abuseOf(env, hooks, t, how) {
  if (how === 'freed') {
    t.data.free();
    return t;
  }
  return { ...t, data: hooks.deviceBuffer(t.data.byteLength + 8) };
}

/**
 * prefillLayer on the device path: q, caches, top-k and sink uploaded (some left on the host, or
 * abused), outputs on the device mostly. Warm-up layers of the same plan before the mutated call
 * (in prepare) make the plan keep its rows, ids and paged form, so the call under test takes the
 * queued layer program of the engine (workspace or paged) where everything is on the device.
 */
const devicePrefillLayer = {
  name: 'devicePrefillLayer',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    layer.plan = createPlan(sc.chunk, { window });
    hooks.plans.push(layer.plan);
    if (layer.topkIndices && layer.topkIndices.shape.length === 3) layer.topkIndices = tensor('int32', [layer.topkIndices.shape[0], layer.topkIndices.shape[2]], layer.topkIndices.data);
    const fields = ['q', 'topkIndices', 'attnSink'].filter((k) => layer[k] !== undefined);
    const { where, abuse } = placements(rng, env, [...fields, 'caches'], 0.6);
    const cacheHow = where.caches;
    delete where.caches;
    let option = rng.uniform() < 0.75 ? { output: 'device' } : rng.uniform() < 0.5 ? { output: 'host' } : undefined;
    const warm = rng.pick([0, 1, 1, 2]);
    // { dropped: 'later' } (drawn last: the draws above are those of the cases before it was added)
    const later = rng.uniform() < 0.35;
    const plan = layer.plan; // (the mutations may replace args[1].plan)
    if (later) option = { ...option, dropped: 'later' };
    const args = option ? [env.engine, layer, option] : [env.engine, layer];
    return {
      args,
      mustRefuse: abuse ?? undefined,
      prepare: async (x) => {
        const l = x[1];
        await placeAll(env, hooks, l, where);
        const caches = {};
        for (const [k, c] of Object.entries(l.caches)) caches[k] = await place(env, hooks, c, cacheHow, true);
        l.caches = caches;
        // warm-up layers: the same plan and operands, unmutated; their outputs freed at once
        for (let i = 0; i < warm && !abuse; i++) {
          const r = await prefillLayer(env.engine, { ...l }, option);
          for (const t of [r.out, r.lse, r.maxLogits]) if (isDeviceBuffer(t.data)) t.data.free();
        }
      },
      call: async (x) => {
        if (!later) return prefillLayer(...x);
        // a c4 layer's count may come later (null): plan.settleDropped() waits for it, and it counts
        // in plan.stats.c4Dropped (with the warm-up layers' ones, which settle here too)
        await plan.settleDropped();
        const before = plan.stats.c4Dropped;
        const r = await prefillLayer(...x);
        const [total, again] = await Promise.all([plan.settleDropped(), plan.settleDropped()]);
        const landed = plan.stats.c4Dropped - before;
        // a problem keeps the layer's result, whose device outputs the case then frees
        if (total !== plan.stats.c4Dropped || again !== total) return { settleProblem: `settleDropped gave ${total} and ${again}, plan.stats.c4Dropped ${plan.stats.c4Dropped}`, r };
        if (r.dropped !== null && r.dropped !== landed) return { settleProblem: `dropped ${r.dropped}, but ${landed} counted in plan.stats`, r };
        // the ratio as the call read it: a plain field's value; a getter is not read again and not judged
        // (its second read differs from what the call saw: stub seed 14 case 8008 judged a c4 layer as ratio 23)
        const ratioField = Object.getOwnPropertyDescriptor(x[1], 'compressRatio');
        const ratioRead = ratioField && 'value' in ratioField ? ratioField.value : undefined;
        if (r.dropped === null && ratioRead !== undefined && !(ratioRead === 4 && env.engine.hasDevice)) return { settleProblem: `dropped null on a ratio-${ratioRead} layer (only a device c4 layer reads its count later)`, r };
        return Object.freeze({ ...r, dropped: r.dropped ?? landed });
      },
      judge: (got, ctx) => {
        if (got?.settleProblem) return got.settleProblem;
        if (!ctx.neutral) return null;
        return placementProblem(ctx.raw, option) ?? judgeLayer(got, sc, ctx.refArgs[1], ctx.stub);
      },
    };
  },
};

/**
 * prefillLayerSharded over engines of the devices there are (one device: engines of it), q and
 * top-k given per shard (already split, on each shard's device), caches per engine: the sharded
 * layer on device operands. Abuse: one shard's caches on another device.
 */
const devicePrefillLayerSharded = {
  name: 'devicePrefillLayerSharded',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    const split = rng.pick(['heads', 'queries']);
    const shards = rng.int(1, split === 'heads' ? hQ + 1 : 4);
    const plan = createShardedPlan(sc.chunk, { shards, split, window });
    hooks.plans.push(plan);
    const devices = Array.from({ length: shards }, (_, s) => (env.deviceCount > 1 ? s % env.deviceCount : env.engine.device));
    const qOnDevice = rng.uniform() < 0.8, topkOnDevice = rng.uniform() < 0.5;
    const wrongCaches = env.deviceCount > 1 && shards > 1 && rng.uniform() < 0.2 ? rng.int(0, shards) : -1;
    const option = rng.uniform() < 0.6 ? { output: 'device' } : { output: 'host' };
    const args = [[], { ...layer, plan }, option];
    delete args[1].path;
    if (layer.path) args[1].path = layer.path;
    return {
      args,
      mustRefuse: wrongCaches >= 0 && devices[wrongCaches] !== devices[(wrongCaches + 1) % shards] ? `shard ${wrongCaches}'s caches on device ${devices[(wrongCaches + 1) % shards]}` : undefined,
      prepare: async (x) => {
        const engines = await Promise.all(devices.map((d, s) => (s === 0 && d === env.engine.device ? env.engine : env.engineOn(d))));
        x[0] = engines;
        const l = x[1];
        const nq = sc.numQueries;
        const heads = evenRanges(hQ, shards);
        // per shard: q [shard rows, shard heads, 512], top-k [shard rows, topk]; uploaded to the shard's engine
        const qs = [], topks = [];
        for (let s = 0; s < shards; s++) {
          const sh = plan.shards[s];
          const [h0, h1] = split === 'heads' ? heads[s] : [0, hQ];
          const rows = split === 'heads' ? [0, nq] : [sh.queryOffset, sh.queryOffset + sh.numQueries];
          const qd = new Uint16Array((rows[1] - rows[0]) * (h1 - h0) * D);
          for (let i = rows[0]; i < rows[1]; i++) qd.set(layer.q.data.subarray((i * hQ + h0) * D, (i * hQ + h1) * D), (i - rows[0]) * (h1 - h0) * D);
          const qt = tensor('bf16', [rows[1] - rows[0], h1 - h0, D], qd);
          qs.push(qOnDevice ? await uploadOn(hooks, engines[s], qt) : qt);
          if (layer.topkIndices) {
            const w = layer.topkIndices.shape[layer.topkIndices.shape.length - 1];
            const tt = tensor('int32', [rows[1] - rows[0], w], layer.topkIndices.data.slice(rows[0] * w, rows[1] * w));
            topks.push(topkOnDevice ? await uploadOn(hooks, engines[s], tt) : tt);
          }
        }
        l.q = qs;
        if (layer.topkIndices) l.topkIndices = topks;
        const caches = [];
        for (let s = 0; s < shards; s++) {
          const e = s === wrongCaches ? engines[(s + 1) % shards] : engines[s];
          const c = {};
          for (const [k, cache] of Object.entries(layer.caches)) {
            const d = await e.uploadKvCache(cache);
            hooks.deviceBuffers.push(d.data);
            c[k] = { format: d.format, pageSize: d.pageSize, numPages: d.numPages, data: d.data };
          }
          caches.push(c);
        }
        l.caches = caches;
      },
      call: (x) => prefillLayerSharded(...x),
      judge: (got, ctx) => {
        if (!ctx.neutral) return null;
        if (!got || !Array.isArray(got.shards) || got.shards.length !== shards) return `${got?.shards?.length} shards`;
        for (const [s, r] of ctx.raw.shards.entries()) {
          const p = placementProblem(r, option);
          if (p) return `shard ${s}: ${p}`;
        }
        // the chunk's outputs, gathered here from the shards where they stayed on the devices
        const whole = option.output === 'host' ? got : gather(got.shards, sc.numQueries, hQ);
        return judgeLayer(whole, sc, layer, ctx.stub);
      },
    };
  },
};

async function uploadOn(hooks, engine, t) {
  const d = await engine.upload(t);
  hooks.deviceBuffers.push(d.data);
  return { dtype: d.dtype, shape: [...d.shape], data: d.data };
}

function evenRanges(total, parts) {
  const out = [];
  for (let p = 0, start = 0; p < parts; p++) {
    const size = Math.floor(total / parts) + (p < total % parts ? 1 : 0);
    out.push([start, start + size]);
    start += size;
  }
  return out;
}

/**
 * An engine's lifecycle around device tensors: a fresh engine disposed while its op is in flight
 * (resolves, or DISPOSED), then called again (DISPOSED), and its device tensor used by the fuzz
 * engine afterwards (same device: the buffer outlives its engine).
 */
const deviceLifecycle = {
  name: 'deviceLifecycle',
  engine: true,
  build(rng, env, hooks) {
    const t = randomHostTensor(rng, hooks);
    const act = rng.pick(['dispose-mid-upload', 'use-after-dispose', 'tensor-outlives-engine', 'free-mid-download', 'views']);
    if (act === 'views') {
      // an op's device outputs are views of one allocation: freeing one leaves the others readable,
      // and the allocation goes back once all are freed (the stub's leak check)
      const op = sparsePrefillTarget.build(rng, env, hooks);
      const keep = rng.pick(['out', 'lse', 'maxLogits']);
      return {
        args: [op.args[0]],
        mayRefuse: true,
        call: async ([x]) => {
          const r = await env.engine.sparsePrefill(x, { output: 'device' });
          for (const k of ['out', 'lse', 'maxLogits']) if (k !== keep) r[k].data.free();
          const kept = await env.engine.download(r[keep]);
          r[keep].data.free();
          return kept;
        },
        judge: (got, { neutral, refArgs }) => {
          if (!neutral) return null;
          const { q, dV = 512 } = refArgs[0];
          const shape = keep === 'out' ? [q.shape[0], q.shape[1], dV] : [q.shape[0], q.shape[1]];
          return JSON.stringify(got?.shape) === JSON.stringify(shape) && got.data.length === shape.reduce((a, b) => a * b, 1) ? null : `${keep} read back as ${JSON.stringify(got?.shape)}, expected ${JSON.stringify(shape)}`;
        },
      };
    }
    return {
      args: [t],
      mayRefuse: act === 'use-after-dispose' || act === 'dispose-mid-upload' || act === 'free-mid-download',
      call: async ([x]) => {
        if (act === 'free-mid-download') {
          const d = await env.engine.upload(x);
          hooks.deviceBuffers.push(d.data);
          const p = env.engine.download(d);
          d.data.free(); // after the call was made: the read was queued before the free
          return p;
        }
        const e = await env.freshEngine();
        try {
          if (act === 'dispose-mid-upload') {
            const p = e.upload(x);
            const disposed = e.dispose();
            const d = await p;
            hooks.deviceBuffers.push(d.data);
            await disposed;
            return await env.engine.download(d);
          }
          const d = await e.upload(x);
          hooks.deviceBuffers.push(d.data);
          await e.dispose();
          hooks.markCall(env.stub); // the call under test is the one after the dispose
          if (act === 'use-after-dispose') return await e.download(d);
          return await env.engine.download(d);
        } finally {
          await e.dispose();
        }
      },
      judge: (got, { neutral, refArgs }) => {
        if (!neutral) return null;
        const src = refArgs[0];
        if (got?.dtype !== src.dtype || JSON.stringify(got.shape) !== JSON.stringify(src.shape)) return `${got?.dtype} ${JSON.stringify(got?.shape)}`;
        const a = new Uint8Array(got.data.buffer, got.data.byteOffset, got.data.byteLength), b = new Uint8Array(src.data.buffer, src.data.byteOffset, src.data.byteLength);
        const i = a.findIndex((v, k) => v !== b[k]);
        return i === -1 && a.length === b.length ? null : `byte ${i}: got ${a[i]}, want ${b[i]}`;
      },
    };
  },
};

void BYTES;
void DTYPES;

/** The device targets with their weights (added to TARGETS for a cuda engine). */
export const DEVICE_TARGETS = [
  [deviceSparsePrefill, 5],
  [devicePagedSparseAttention, 4],
  [deviceDequantize, 2],
  [deviceMemory, 3],
  [devicePrefillLayer, 6],
  [devicePrefillLayerSharded, 2],
  [deviceLifecycle, 1],
];
