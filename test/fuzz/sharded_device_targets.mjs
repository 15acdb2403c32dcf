/**
 * shardedDevice (session 59, from seed SHARDED_DEVICE_FROM_SEED, cuda engines: a GPU or the stub of
 * stub_cuda.mjs): prefillLayerSharded (SPEC §10) over engines of several devices with operands of
 * their own, each shard's q, top-k and caches placed on its engine's device, then one of:
 *
 * - valid forms: every part on its shard's device; some parts on the host; every shard on the case's
 *   own engine; one shard on a host (wasm) engine with host parts (the host and device steps at once);
 * - a part that must be refused before any work (`mustRefuse`: no op reached, no device memory left):
 *   one shard's q, top-k or cache on another shard's device, freed, or a live buffer of other bytes; a
 *   device attnSink (the sharded layer takes a host sink, cut per shard); a disposed engine; a host
 *   engine given a device q; one engine too few or too many; one shard's q of a row or a head more;
 * - something done while the layer runs (right, or the one typed refusal it allows; either way no op
 *   of the stub given a freed buffer, no device memory left): a device part freed (INVALID_VALUE: freed
 *   during the call), an engine disposed (DISPOSED), the plan released (right), at once, after a
 *   microtask, a macrotask or a timer.
 *
 * devicePrefillLayerSharded (device_targets.mjs) abuses only a shard's caches (on another device), and
 * shardedEngines (engines_targets.mjs) runs on host engines: per-shard device parts, device engines
 * disposed, and device buffers freed during a sharded layer were reached by no case.
 */
import { SparseMlaError, createEngine, createShardedPlan, prefillLayerSharded, tensor } from '../../dist/index.js';
import { D, gatherShards, judgeLayer, layerScenario } from './targets.mjs';

/** The first seed that draws shardedDevice. */
export const SHARDED_DEVICE_FROM_SEED = 257;

const VALID = ['allDevice', 'someHost', 'ownEngine', 'hostShard'];
const REFUSED = ['qOtherDevice', 'qFreed', 'qResized', 'topkOtherDevice', 'topkFreed', 'cacheOtherDevice', 'cacheFreed', 'cacheResized', 'sinkDevice', 'engineDisposed', 'hostEngineDeviceQ', 'engineCount', 'qRows', 'qHeads'];
const DURING = ['freeDuring', 'disposeDuring', 'releaseDuring'];
const WHEN = ['sync', 'microtask', 'macrotask', 'timer'];

let hostEngineOnce = null;
/** One wasm engine of one worker for the process (a host shard beside device ones). */
function sharedHostEngine() {
  hostEngineOnce ??= createEngine({ backend: 'wasm', workers: 1 });
  return hostEngineOnce;
}

/** Closes the shared host engine (the runner's end of a child). */
export async function closeShardedDeviceTargets() {
  if (hostEngineOnce) await (await hostEngineOnce).dispose();
  hostEngineOnce = null;
}

/** A fresh engine of `device` (stub: over the stub's table; GPU: createEngine). */
async function freshOn(env, device) {
  if (env.stub) return env.stub.makeEngine(device).engine;
  return createEngine({ backend: 'cuda', device });
}

function waitFor(when) {
  if (when === 'sync') return undefined;
  if (when === 'microtask') return Promise.resolve();
  if (when === 'macrotask') return new Promise((r) => setImmediate(r));
  return new Promise((r) => setTimeout(r, 1));
}

/** `total` split into `parts` positive sizes (random cuts), as [start, end) ranges. */
function randomRanges(rng, total, parts) {
  const cuts = new Set();
  while (cuts.size < parts - 1) cuts.add(rng.int(1, total));
  const ends = [...cuts].sort((a, b) => a - b).concat(total);
  return ends.map((e, i) => [i === 0 ? 0 : ends[i - 1], e]);
}

/** Rows [r0, r1) and heads [h0, h1) of a bf16 [n, hQ, D] q, as a tensor of its own memory. */
function cutQ(q, r0, r1, h0, h1) {
  const hQ = q.shape[1];
  const out = new Uint16Array((r1 - r0) * (h1 - h0) * D);
  for (let i = r0; i < r1; i++) out.set(q.data.subarray((i * hQ + h0) * D, (i * hQ + h1) * D), (i - r0) * (h1 - h0) * D);
  return tensor('bf16', [r1 - r0, h1 - h0, D], out);
}

const isCode = (e, code) => e instanceof SparseMlaError && e.code === code;

const shardedDevice = {
  name: 'shardedDevice',
  engine: true,
  deviceEngineOnly: true,
  fromSeed: SHARDED_DEVICE_FROM_SEED,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, hQ, layer, window } = layerScenario(rng, hooks, ratio);
    // one top-k form: [numQueries, topk] (the layer's [n, 1, topk] form is the host top-k's only)
    if (layer.topkIndices && layer.topkIndices.shape.length === 3) layer.topkIndices = tensor('int32', [layer.topkIndices.shape[0], layer.topkIndices.shape[2]], layer.topkIndices.data);
    const nq = sc.numQueries;
    const split = hQ > 1 && rng.uniform() < 0.5 ? 'heads' : 'queries';
    const shards = rng.int(1, (split === 'heads' ? hQ : 3) + 1);
    const devices = Array.from({ length: shards }, () => rng.int(0, env.deviceCount));
    const r = rng.uniform();
    let kind = r < 0.3 ? rng.pick(VALID) : r < 0.7 ? rng.pick(REFUSED) : rng.pick(DURING);
    const s0 = rng.int(0, shards); // the shard the abuse falls on
    const other = devices.findIndex((d) => d !== devices[s0]);
    // kinds that need what this case lacks fall back to a valid form
    if (kind.endsWith('OtherDevice') && other < 0) kind = 'allDevice';
    if (kind.startsWith('topk') && ratio !== 4) kind = 'allDevice';
    // a head more is refused only where something pins hQ: another shard's q (a split by queries)
    if (kind === 'qHeads' && !(split === 'queries' && shards > 1)) kind = 'qRows';
    if (kind === 'qRows' && split === 'heads' && nq === 0) kind = 'allDevice'; // (a chunk of no query: kept valid, as seeds 257-263 ran it)
    const when = rng.pick(WHEN);
    const freeWhat = rng.pick(['q', 'cache', ...(ratio === 4 ? ['topk'] : [])]);
    const heads = split === 'heads' ? (rng.uniform() < 0.5 ? randomRanges(rng, hQ, shards) : null) : null;
    // (a host engine's shard: the host outputs only, { output: 'device' } is a cuda engine's)
    const option = rng.uniform() < 0.6 && kind !== 'hostShard' ? { output: 'device' } : { output: 'host' };
    const qOnDevice = kind === 'allDevice' || kind === 'ownEngine' || kind.startsWith('q') || kind === 'hostEngineDeviceQ' || (kind === 'freeDuring' && freeWhat === 'q') || rng.uniform() < 0.7;
    const topkOnDevice = ratio === 4 && (kind.startsWith('topk') || (kind === 'freeDuring' && freeWhat === 'topk') || (kind !== 'someHost' && rng.uniform() < 0.6));
    const cachesPerEngine = kind.startsWith('cache') || (kind === 'freeDuring' && freeWhat === 'cache') || rng.uniform() < 0.8;
    const sinkOnDevice = kind === 'sinkDevice';
    if (sinkOnDevice && !layer.attnSink) layer.attnSink = tensor('float32', [hQ], hooks.track(Float32Array.from({ length: hQ }, () => rng.normal())));
    const mustRefuse = REFUSED.includes(kind) ? `${kind} (shard ${s0})` : undefined;
    const describe = `c${ratio}, ${nq} queries, hQ ${hQ}, ${shards} shard(s) by ${split} on devices ${devices.join(',')}: ${kind}${DURING.includes(kind) ? ` (${kind === 'freeDuring' ? `${freeWhat} of shard ${s0}, ` : kind === 'disposeDuring' ? `shard ${s0}'s engine, ` : ''}${when})` : mustRefuse ? ` (shard ${s0})` : ''}; q ${qOnDevice ? 'device' : 'host'}${ratio === 4 ? `, top-k ${topkOnDevice ? 'device' : 'host'}` : ''}, caches ${cachesPerEngine ? 'per engine' : 'one host set'}, output ${option.output}`;

    const plan = createShardedPlan(sc.chunk, { shards, split, window });
    hooks.plans.push(plan);
    let engines, fresh = [], argsOf, abuseDuring;

    return {
      args: [],
      describe,
      mustRefuse,
      prepare: async () => {
        const upload = async (engine, t) => {
          const d = await engine.upload(t);
          hooks.deviceBuffers.push(d.data);
          return { dtype: d.dtype, shape: [...d.shape], data: d.data };
        };
        const uploadCache = async (engine, c) => {
          const d = await engine.uploadKvCache(c);
          hooks.deviceBuffers.push(d.data);
          return { format: d.format, pageSize: d.pageSize, numPages: d.numPages, data: d.data };
        };
        engines = [];
        for (let s = 0; s < shards; s++) {
          if (kind === 'ownEngine') engines.push(env.engine);
          else if ((kind === 'engineDisposed' || kind === 'disposeDuring') && s === s0) {
            const e = await freshOn(env, devices[s]);
            fresh.push(e);
            engines.push(e);
          } else engines.push(devices[s] === env.engine.device && rng.uniform() < 0.5 ? env.engine : await env.engineOn(devices[s]));
        }
        if (kind === 'ownEngine') devices.fill(env.engine.device);
        const host = kind === 'hostShard' || kind === 'hostEngineDeviceQ' ? await sharedHostEngine() : null;
        const engineOfPart = (s) => (kind.endsWith('OtherDevice') && s === s0 ? engines[other] : engines[s]);
        const qs = [], topks = [], caches = [];
        const headRanges = split === 'heads' ? heads ?? evenRanges(hQ, shards) : null;
        for (let s = 0; s < shards; s++) {
          const sh = plan.shards[s];
          const [h0, h1] = split === 'heads' ? headRanges[s] : [0, hQ];
          const [r0, r1] = split === 'heads' ? [0, nq] : [sh.queryOffset, sh.queryOffset + sh.numQueries];
          let qt = cutQ(layer.q, r0, r1, h0, h1);
          // a row or a head more than the shard's (rows of zeros)
          if (kind === 'qRows' && s === s0) qt = tensor('bf16', [r1 - r0 + 1, h1 - h0, D], new Uint16Array((r1 - r0 + 1) * (h1 - h0) * D));
          if (kind === 'qHeads' && s === s0) qt = tensor('bf16', [r1 - r0, h1 - h0 + 1, D], new Uint16Array((r1 - r0) * (h1 - h0 + 1) * D));
          const hostPart = kind === 'hostShard' && s === s0;
          qs.push(!hostPart && (qOnDevice && !(kind === 'someHost' && rng.uniform() < 0.5)) ? await upload(engineOfPart(s), qt) : qt);
          if (layer.topkIndices) {
            const w = layer.topkIndices.shape[1];
            const tt = tensor('int32', [r1 - r0, w], layer.topkIndices.data.slice(r0 * w, r1 * w));
            topks.push(!hostPart && topkOnDevice ? await upload(engineOfPart(s), tt) : tt);
          }
          if (cachesPerEngine) {
            const set = {};
            for (const [k, c] of Object.entries(layer.caches)) set[k] = hostPart || (kind === 'someHost' && rng.uniform() < 0.3) ? c : await uploadCache(engineOfPart(s), c);
            caches.push(set);
          }
        }
        if (kind === 'hostShard' || kind === 'hostEngineDeviceQ') engines[s0] = host;
        const at = (s) => (kind === 'cacheFreed' || kind === 'cacheResized' ? caches[s].swa : kind.startsWith('topk') ? topks[s] : qs[s]);
        if (kind === 'qFreed' || kind === 'topkFreed' || kind === 'cacheFreed') at(s0).data.free();
        if (kind === 'qResized' || kind === 'cacheResized') {
          const b = at(s0).data;
          at(s0).data = hooks.deviceBuffer(b.byteLength + (b.byteLength >= 4 && rng.uniform() < 0.5 ? -4 : 8), devices[s0]);
        }
        if (kind === 'engineDisposed') await fresh[0].dispose();
        if (kind === 'engineCount') engines = rng.uniform() < 0.5 ? engines.slice(0, -1) : [...engines, engines[0]];
        if (kind === 'sinkDevice') layer.attnSink = await upload(engines.find((e) => e !== host) ?? env.engine, layer.attnSink);
        const args = { q: qs, compressRatio: ratio, plan, caches: cachesPerEngine ? caches : layer.caches, smScale: layer.smScale, ...(layer.path ? { path: layer.path } : {}) };
        if (layer.topkIndices) args.topkIndices = topkOnDevice || rng.uniform() < 0.5 ? topks : layer.topkIndices;
        if (layer.attnSink) args.attnSink = layer.attnSink;
        argsOf = args;
        abuseDuring = () => {
          if (kind === 'freeDuring') {
            const part = freeWhat === 'q' ? qs[s0] : freeWhat === 'topk' ? args.topkIndices[s0] ?? topks[s0] : cachesPerEngine ? caches[s0].swa : null;
            if (part?.data?.free && !part.data.freed) part.data.free();
          } else if (kind === 'disposeDuring') return fresh[0].dispose();
          else if (kind === 'releaseDuring') plan.release();
        };
      },
      call: async () => {
        try {
          const p = prefillLayerSharded(engines, argsOf, option);
          if (DURING.includes(kind)) {
            const waited = waitFor(when);
            if (waited) await waited;
            await abuseDuring();
          }
          try {
            return await p;
          } catch (e) {
            // the one refusal a call given this during its run may answer (the rest go to the fuzzer's judge)
            if ((kind === 'freeDuring' && isCode(e, 'INVALID_VALUE')) || (kind === 'disposeDuring' && isCode(e, 'DISPOSED'))) return { refusedDuring: e.code };
            throw e;
          }
        } finally {
          for (const e of fresh) await e.dispose();
        }
      },
      judge: (got, { stub }) => {
        if (got?.refusedDuring) return null;
        if (!got || !Array.isArray(got.shards) || got.shards.length !== shards) return `${describe}: ${got?.shards?.length} shards back, ${shards} asked for`;
        const whole = option.output === 'host' ? got : gatherShards(got.shards, nq, hQ);
        const p = judgeLayer(whole, sc, layer.attnSink && !(layer.attnSink.data instanceof Float32Array) ? { ...layer, attnSink: undefined } : layer, stub);
        return p ? `${describe}: ${p}` : null;
      },
    };
  },
};

function evenRanges(total, parts) {
  const out = [];
  for (let p = 0, start = 0; p < parts; p++) {
    const size = Math.floor(total / parts) + (p < total % parts ? 1 : 0);
    out.push([start, start + size]);
    start += size;
  }
  return out;
}

/** Drawn with numericEdges (fuzz.mjs SIDE4_TARGETS), each from its fromSeed. */
export const SHARDED_DEVICE_TARGETS = [[shardedDevice, 1]];
