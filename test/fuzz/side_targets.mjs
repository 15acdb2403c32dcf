/**
 * The session-52 targets, drawn in place of a case's target from the session-52 stream (fuzz.mjs
 * SIDE2_FROM_SEED, SIDE2_TARGET_ODDS), so that older seeds pick the targets they picked before:
 *
 * - quantizeAlias: quantizeKCache whose rows or token ids lie in the cache's own memory (the same
 *   ArrayBuffer or SharedArrayBuffer, overlapping the token slots it writes, or not): a call that
 *   resolves must leave the cache as the reference leaves a copy of it given the rows and ids as
 *   they were at the call (SPEC §9: the library owns what it reads during a call).
 * - budgetRefusal: valid calls over a 1 MiB memoryBudgetBytes (tens of MiB of outputs, or of copies
 *   of inputs): TOO_LARGE before anything of that size is allocated (the process's ArrayBuffer
 *   memory after the refusal is not up by the outputs' size), and a small call after it on the same
 *   engine is judged right (nothing of the budget stays lent).
 * - disposeInGetter: a fresh engine disposed by a getter of the call's own arguments, read during
 *   the call's checks (dispose() not awaited): the call rejects with DISPOSED or resolves judged
 *   right; never BACKEND_FAILURE, WORKER_DIED, an untyped error or a hang; dispose() resolves and
 *   a later call is DISPOSED.
 */
import { SparseMlaError, createEngine, createKvCache, createPlan, prefillLayer, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { randomBf16Bits } from '../../dist/check/grid.js';
import { D, judgeAttention, judgeLayer, layerScenario, randomHostTensor, sparsePrefillTarget, pagedSparseAttentionTarget, dequantizeKCachePagedTarget } from './targets.mjs';
import { PrefillDir, encodeNpy, encodeSafetensors, loadPrefillInputs, loadPrefillOutputs, npyToTensor, parseNpy, parseSafetensors, readNpyFile, readSafetensorsFile, tensorToNpy, writeNpyFile, writePrefillDir, writePrefillOutputs, writeSafetensorsFile } from '../../dist/io/index.js';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const settle = (p) => Promise.resolve().then(() => p).then((value) => ({ value }), (error) => ({ error }));
const isCode = (e, code) => e instanceof SparseMlaError && e.code === code;
const errStr = (e) => (e instanceof Error ? `${e.name}${e.code ? ` ${e.code}` : ''}: ${String(e.message).slice(0, 200)}` : `a thrown ${typeof e}`);

/** rows of `n` × `width` values as the quantizer takes them: moderate float32 or their bf16 bits. */
function rowValues(rng, n, width) {
  const scale = rng.pick([1, 1e-3, 300]);
  return Float32Array.from({ length: n * width }, () => rng.normal() * scale);
}

const quantizeAlias = {
  name: 'quantizeAlias',
  engine: true,
  build(rng, env) {
    const format = rng.pick(['v4', 'v32']);
    const pageSize = format === 'v32' ? 1 : rng.pick([1, 2, 16]);
    const numPages = format === 'v32' ? rng.int(4, 24) : rng.int(2, 6);
    const cacheBytes = createKvCache(format, { pageSize, numPages }).data.length;
    const tokens = pageSize * numPages;
    const width = format === 'v4' ? 512 : 576;
    const n = rng.int(1, Math.min(tokens, 4) + 1);
    const ids = Array.from({ length: tokens }, (_, i) => i);
    for (let i = ids.length - 1; i > 0; i--) {
      const j = rng.int(0, i + 1);
      [ids[i], ids[j]] = [ids[j], ids[i]];
    }
    const tokenIds = ids.slice(0, n);
    const dtype = rng.pick(['float32', 'bf16']);
    const el = dtype === 'float32' ? 4 : 2;
    const rowsBytes = n * width * el;
    // where the rows (and maybe the ids) lie: inside the cache's bytes (overlapping what it writes) or after them, in one buffer
    const where = rng.pick(['rowsInCache', 'rowsInCache', 'rowsAtCacheStart', 'rowsAfterCache', 'idsInCache']);
    const shared = rng.uniform() < 0.3;
    const total = cacheBytes + rowsBytes + 64;
    const buf = shared ? new SharedArrayBuffer(total) : new ArrayBuffer(total);
    const all = new Uint8Array(buf);
    for (let i = 0; i < cacheBytes; i++) all[i] = rng.u32() & 0x37; // finite e4m3, small scales
    const cacheData = new Uint8Array(buf, 0, cacheBytes);
    const rowsOffset = where === 'rowsAfterCache' || where === 'idsInCache' ? cacheBytes + 16 : where === 'rowsAtCacheStart' ? 0 : el * rng.int(0, Math.floor((cacheBytes - rowsBytes) / el) + 1);
    if (rowsOffset + rowsBytes > total || (where !== 'rowsAfterCache' && where !== 'idsInCache' && rowsOffset + rowsBytes > cacheBytes)) return quantizeAlias.build(rng, env); // rows larger than the cache: draw again
    const values = rowValues(rng, n, width);
    const rowsData = dtype === 'float32' ? new Float32Array(buf, rowsOffset, n * width) : new Uint16Array(buf, rowsOffset, n * width);
    if (dtype === 'float32') rowsData.set(values);
    else rowsData.set(Uint16Array.from(values, (x) => R.encodeBf16(x)));
    let idsArg = tokenIds;
    if (where === 'idsInCache') {
      const at = 4 * rng.int(0, Math.floor((cacheBytes - 4 * n) / 4) + 1);
      const view = new Int32Array(buf, at, n);
      view.set(tokenIds);
      idsArg = tensor('int32', [n], view);
    } else if (rng.uniform() < 0.5) idsArg = tensor('int32', [n], Int32Array.from(tokenIds));
    const cache = { format, pageSize, numPages, data: cacheData };
    const rows = tensor(dtype, [n, width], rowsData);
    // the reference's inputs as they are at the call (copies: the call writes the memory they lie in)
    const atCall = () => ({ cache: { format, pageSize, numPages, data: cacheData.slice() }, ids: idsArg === tokenIds ? tokenIds.slice() : tensor('int32', [n], idsArg.data.slice()), rows: tensor(dtype, [n, width], rowsData.slice()) });
    let want = null;
    return {
      args: [],
      describe: `${format} cache, ${n} ${dtype} rows ${where}${shared ? ' (shared memory)' : ''}`,
      call: async () => {
        const before = atCall();
        R.quantizeKCacheReference(before.cache, before.ids, before.rows);
        want = before.cache.data;
        return env.engine.quantizeKCache({ cache, tokenIds: idsArg, rows });
      },
      judge: () => {
        const i = cacheData.findIndex((b, k) => b !== want[k]);
        return i === -1 ? null : `${format} cache, ${n} ${dtype} rows ${where}${shared ? ' (shared)' : ''} at byte ${rowsOffset}: cache byte ${i} (token ${Math.floor(i / (format === 'v4' ? 576 : 656))}) got ${cacheData[i]}, want ${want[i]}`;
      },
    };
  },
};

const BUDGET = 1 << 20;
const budgetEngines = new Map();
function budgetEngine(backend) {
  if (!budgetEngines.has(backend)) {
    const made = createEngine({ backend, memoryBudgetBytes: BUDGET, ...(backend === 'wasm' ? { workers: 2 } : {}) });
    // a creation that failed is not kept: every later case would get its rejection (wasm seed 138: its
    // workers could not start while another session reinstalled node_modules, and 33 later cases failed so)
    made.catch(() => {
      if (budgetEngines.get(backend) === made) budgetEngines.delete(backend);
    });
    budgetEngines.set(backend, made);
  }
  return budgetEngines.get(backend);
}

/** Disposes what the side targets made for the process (run.mjs at its end). */
export async function closeSideTargets() {
  for (const p of budgetEngines.values()) await (await p.catch(() => null))?.dispose();
  budgetEngines.clear();
  if (fileRoot) rmSync(fileRoot, { recursive: true, force: true });
  fileRoot = undefined;
}

function sharedOf(a) {
  const s = new a.constructor(new SharedArrayBuffer(a.byteLength));
  s.set(a);
  return s;
}

/** A call whose outputs (or its copies of inputs) are far over BUDGET: { op, args, bytes (what it would allocate) }. */
function oversizedCall(rng) {
  const kind = rng.pick(['dequantIds', 'dequantArray', 'prefillOutputs', 'prefillCopies', 'pagedOutputs']);
  if (kind === 'dequantIds' || kind === 'dequantArray') {
    const n = 2 ** rng.int(12, 17); // 4 MiB .. 64 MiB of bf16 rows
    const cache = createKvCache('v4', { pageSize: 64, numPages: 1 });
    const ids = new Int32Array(n).map(() => rng.int(0, 64));
    return { kind, op: 'dequantizeKCachePaged', args: { cache, tokenIds: kind === 'dequantArray' ? Array.from(ids) : tensor('int32', [n], ids) }, bytes: n * 1024 };
  }
  const hQ = rng.pick([16, 64]);
  const sQ = rng.pick([64, 256, 512]);
  const copies = kind === 'prefillCopies';
  const qBits = randomBf16Bits(rng, sQ * hQ * D, 1e-2);
  const q = tensor('bf16', [sQ, hQ, D], copies ? qBits : sharedOf(qBits)); // shared: read in place, no copy
  const outBytes = sQ * hQ * (D * 2 + 8);
  if (kind === 'pagedOutputs') {
    const cache = createKvCache('v4', { pageSize: 64, numPages: 1 });
    return { kind, op: 'pagedSparseAttention', args: { q, kCache: { ...cache, data: sharedOf(cache.data) }, indices: tensor('int32', [sQ, 1], sharedOf(new Int32Array(sQ))), smScale: 0.04 }, bytes: outBytes };
  }
  const kv = tensor('bf16', [8, D], sharedOf(randomBf16Bits(rng, 8 * D)));
  return { kind, op: 'sparsePrefill', args: { q, kv, indices: tensor('int32', [sQ, 1], sharedOf(new Int32Array(sQ))), smScale: 0.04 }, bytes: copies ? qBits.byteLength : outBytes };
}

const budgetRefusal = {
  name: 'budgetRefusal',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const big = oversizedCall(rng);
    const local = { backend: env.backend, engine: null };
    const small = rng.pick([sparsePrefillTarget, pagedSparseAttentionTarget, dequantizeKCachePagedTarget]).build(rng, local, hooks);
    return {
      args: [],
      describe: `${big.kind} (${big.bytes} bytes) on a ${BUDGET}-byte budget`,
      call: async () => {
        local.engine = await budgetEngine(env.backend);
        const before = process.memoryUsage().arrayBuffers;
        const t0 = performance.now();
        const refused = await settle(local.engine[big.op](big.args));
        const ms = performance.now() - t0;
        const grew = process.memoryUsage().arrayBuffers - before;
        const after = await settle(small.call(small.args));
        return { refused, ms, grew, after };
      },
      judge: ({ refused, ms, grew, after }) => {
        const what = `${big.op} of ${big.kind} (${big.bytes} bytes) on a ${BUDGET}-byte memoryBudgetBytes`;
        if (!refused.error) return `${what} resolved`;
        if (!isCode(refused.error, 'TOO_LARGE')) return `${what} rejected with ${errStr(refused.error)}, expected TOO_LARGE`;
        if (grew >= big.bytes / 2) return `${what}: ArrayBuffer memory up ${grew} bytes across the refusal (allocated before refusing?), ${ms.toFixed(1)} ms`;
        if (after.error) return `a small call after the refusal rejected: ${errStr(after.error)}`;
        const p = small.judge(after.value, { refArgs: small.args, stub: false, neutral: true });
        return p ? `a small call after the refusal: ${p}` : null;
      },
    };
  },
};

const disposeInGetter = {
  name: 'disposeInGetter',
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const local = { backend: env.backend, engine: null };
    const layered = rng.uniform() < 0.3;
    let op, args, judge;
    if (layered) {
      const { sc, layer, window } = layerScenario(rng, hooks, rng.pick([0, 4, 128]));
      layer.plan = createPlan(sc.chunk, { window });
      hooks.plans.push(layer.plan);
      args = { ...layer };
      op = 'prefillLayer';
      judge = (got) => judgeLayer(got, sc, layer);
    } else {
      const t = rng.pick([sparsePrefillTarget, pagedSparseAttentionTarget, dequantizeKCachePagedTarget]).build(rng, local, hooks);
      op = t;
      args = { ...t.args[0] };
      judge = (got) => t.judge(got, { refArgs: t.args, stub: false, neutral: true });
    }
    const keys = Object.keys(args);
    const key = rng.pick(keys);
    const workers = rng.int(1, env.backend === 'wasm' ? 3 : 4);
    const when = rng.pick(['first', 'every']);
    // (from SIDE2_LATE_FROM_SEED) a layer's getter releases its plan's resources instead, or as well
    const act = layered && hooks.side2Late ? rng.pick(['dispose', 'release', 'both']) : 'dispose';
    const plan = layered ? args.plan : null;
    return {
      args: [],
      describe: `${layered ? 'prefillLayer' : op.name ?? 'an op'}, its ${key} getter ${act === 'dispose' ? 'disposing the engine' : act === 'release' ? 'releasing the plan' : 'releasing the plan and disposing the engine'} (${when} read)`,
      call: async () => {
        local.engine = await createEngine({ backend: env.backend, workers });
        const e = local.engine;
        const disposals = [];
        const v = args[key];
        const hostile = { ...args };
        Object.defineProperty(hostile, key, {
          enumerable: true,
          get() {
            if (when === 'every' || disposals.length === 0) {
              if (act !== 'dispose') plan.release();
              disposals.push(act === 'release' ? Promise.resolve({ value: undefined, released: true }) : settle(e.dispose()));
            }
            return v;
          },
        });
        const r = await settle(layered ? prefillLayer(e, hostile) : op.call([hostile, ...op.args.slice(1)]));
        const disposed = await Promise.all(disposals);
        const later = await settle(layered ? prefillLayer(e, args) : op.call(op.args));
        await e.dispose();
        return { r, disposed, later, read: disposals.length };
      },
      judge: ({ r, disposed, later, read }) => {
        const what = `${layered ? 'prefillLayer' : 'the op'} whose ${key} getter ${act === 'release' ? 'released its plan' : act === 'both' ? 'released its plan and disposed its engine' : 'disposed its engine'} (${read} read(s))`;
        for (const d of disposed) if (d.error) return `${what}: dispose() rejected: ${errStr(d.error)}`;
        // a released plan is usable after (its doc): only a disposed engine refuses the call after
        if (act === 'release') {
          if (later.error) return `${what}: a call after it rejected with ${errStr(later.error)}`;
          const p = judge(later.value);
          if (p) return `${what}: a call after it: ${p}`;
        } else if (read > 0 && !isCode(later.error, 'DISPOSED')) return `${what}: a call after it ${later.error ? `rejected with ${errStr(later.error)}` : 'resolved'}, expected DISPOSED`;
        if (r.error) return act !== 'release' && isCode(r.error, 'DISPOSED') ? null : `${what}: rejected with ${errStr(r.error)}, expected ${act === 'release' ? 'the result' : 'DISPOSED or the result'}`;
        return judge(r.value);
      },
    };
  },
};

/** The session-52 targets with their weights (fuzz.mjs draws one from the session-52 stream). */
export const SIDE_TARGETS = [
  [quantizeAlias, 2],
  [budgetRefusal, 1],
  [disposeInGetter, 2],
];

/**
 * planRows (session 53, from SIDE3_FROM_SEED): the combined rows a plan hands out (combinedRows,
 * combineC4) are frozen objects of tensors that are not, over arrays the plan keeps. Their tensors
 * are tampered with (a field reassigned: an array of another kind dressed as Int32Array, another
 * length, out-of-range ids, a detached one, the same ids in a copy or in shared memory; or the plan's
 * own array written into), then plan.pagedForm(rows) or a layer on the plan runs. Never
 * BACKEND_FAILURE or an untyped error (fuzz.mjs judges that); a call whose tampering is neutral (the
 * same ids in other memory) must give the untampered call's result.
 */
const planRows = {
  name: 'planRows',
  engine: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    const plan = createPlan(sc.chunk, { window });
    hooks.plans.push(plan);
    const rows = ratio === 4 ? plan.combineC4(layer.topkIndices) : plan.combinedRows(ratio);
    const which = rng.pick(['indices', 'lengths']);
    const t = rows[which];
    const own = t.data;
    const n = own.length;
    const how = rng.pick(['otherKind', 'otherLength', 'outOfRange', 'detached', 'sameCopy', 'sameShared', 'writeInto', 'shape', 'dtype']);
    const neutral = how === 'sameCopy' || how === 'sameShared';
    const op = rng.pick(['pagedForm', 'layer']);
    if (op === 'layer') layer.path = rng.pick(['sparse', 'paged']);
    const bad = rng.pick([2 ** 30, -5, 2 ** 31 - 1, -(2 ** 31), n + 7]);
    const tamper = () => {
      if (how === 'otherKind') {
        const other = rng.pick([Uint8Array, Float32Array, Uint32Array, Int16Array]);
        const v = new other(n);
        Object.setPrototypeOf(v, Int32Array.prototype);
        t.data = v;
      } else if (how === 'otherLength') t.data = new Int32Array(Math.max(0, n + rng.pick([-1, 1, 64])));
      else if (how === 'outOfRange') t.data = new Int32Array(n).fill(bad);
      else if (how === 'detached') {
        const c = own.slice();
        structuredClone(c.buffer, { transfer: [c.buffer] });
        t.data = c;
      } else if (how === 'sameCopy') t.data = own.slice();
      else if (how === 'sameShared') {
        const s = new Int32Array(new SharedArrayBuffer(own.byteLength));
        s.set(own);
        t.data = s;
      } else if (how === 'writeInto') {
        if (n > 0) own[rng.int(0, n)] = bad;
      } else if (how === 'shape') t.shape = [...t.shape, 1];
      else t.dtype = 'int64';
    };
    const what = `${ratio === 4 ? 'combineC4' : `combinedRows(${ratio})`}'s ${which} ${how}${how === 'outOfRange' || how === 'writeInto' ? ` (${bad})` : ''}, then ${op === 'layer' ? `a ${layer.path} layer` : 'pagedForm(rows)'}`;
    // the untampered plan's paged form (a fresh plan of the same chunk), for a neutral tampering
    const wantForm = () => {
      const p = createPlan(sc.chunk, { window });
      try {
        return p.pagedForm(ratio === 4 ? p.combineC4(layer.topkIndices) : p.combinedRows(ratio));
      } finally {
        p.release();
      }
    };
    return {
      args: [],
      describe: what,
      mayRefuse: !neutral,
      call: async () => {
        tamper();
        return op === 'layer' ? prefillLayer(env.engine, { ...layer, plan }) : plan.pagedForm(rows);
      },
      judge: (got, { stub }) => {
        if (!neutral) return null; // refused typed, or accepted: what tampered ids should attend is not defined
        if (op === 'layer') {
          const p = judgeLayer(got, sc, layer, stub);
          return p ? `${what}: ${p}` : null;
        }
        const want = wantForm();
        for (const k of ['main', 'mainLengths', 'extra', 'extraLengths']) {
          const a = got[k]?.data, b = want[k]?.data;
          if ((a === undefined) !== (b === undefined)) return `${what}: ${k} ${a === undefined ? 'absent' : 'present'}, the untampered plan's ${b === undefined ? 'absent' : 'present'}`;
          if (a && (a.length !== b.length || a.some((x, i) => x !== b[i]))) return `${what}: ${k} differs from the untampered plan's`;
        }
        return null;
      },
    };
  },
};

const TYPED_PROTO = Object.getPrototypeOf(Uint8Array.prototype);
const [TYPED_KIND, TYPED_BUFFER, TYPED_OFFSET, TYPED_BYTES] = [Symbol.toStringTag, 'buffer', 'byteOffset', 'byteLength'].map((k) => Object.getOwnPropertyDescriptor(TYPED_PROTO, k).get);
const ARRAY_OF = { bf16: 'Uint16Array', float32: 'Float32Array', int32: 'Int32Array', int64: 'BigInt64Array', uint8: 'Uint8Array' };
const DTYPE_OF_DESCR = { '<u2': 'bf16', '<f4': 'float32', '<i4': 'int32', '<i8': 'int64', '|u1': 'uint8' };

/** A typed array's bytes by its memory (intrinsics), or null (not a typed array, or detached). */
function memoryBytes(a) {
  if (TYPED_KIND.call(a) === undefined) return null;
  try {
    return new Uint8Array(TYPED_BUFFER.call(a), TYPED_OFFSET.call(a), TYPED_BYTES.call(a));
  } catch {
    return null;
  }
}

const sameBytes = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

/**
 * encoders (session 53, from seed 70): the writers of sparse-mla/io, encodeSafetensors
 * (a record of tensors, optional string metadata), encodeNpy (an npy array) and tensorToNpy, given
 * the fuzzer's mutations. The bytes a call returns must be a file the library's own reader takes
 * back, each tensor as it was given: the dtype's array kind, its shape, its bytes by its memory
 * (never a byte outside the array's view); the unmutated (or neutrally mutated) call's tensors,
 * exactly. A record of tensors (and the metadata) is a dictionary: the mutator does not take a
 * Proxy hiding its keys or an inherited field as neutral there (CaseHooks.records).
 */
const encoders = {
  name: 'encoders',
  fromSeed: 70, // added after seeds 64-69 were run
  build(rng, env, hooks) {
    const op = rng.pick(['encodeSafetensors', 'encodeSafetensors', 'encodeNpy', 'tensorToNpy']);
    if (op === 'encodeSafetensors') {
      const record = {};
      const n = rng.int(1, 4);
      for (let i = 0; i < n; i++) record[rng.pick(['q', 'kv', 'indices', 'out', 'lse', 'x.y', 'ключ'])] = randomHostTensor(rng, hooks);
      hooks.records.add(record);
      const args = [record];
      if (rng.uniform() < 0.5) {
        const metadata = { format: 'pt', note: rng.pick(['x', '', 'dims 512']) };
        hooks.records.add(metadata);
        args.push(metadata);
      }
      return {
        args,
        call: (x) => encodeSafetensors(...x),
        judge: (bytes, { refArgs, neutral }) => {
          const file = parseSafetensors(bytes, 'the encoded file'); // refused: the judge reports a file its reader refuses
          const given = refArgs[0];
          if (neutral) {
            const keys = Object.keys(given);
            const got = [...file.tensors.keys()];
            if (JSON.stringify(got) !== JSON.stringify(keys)) return `tensors ${JSON.stringify(got)}, given ${JSON.stringify(keys)}`;
            if (refArgs[1] !== undefined && JSON.stringify(file.metadata) !== JSON.stringify(refArgs[1])) return `metadata ${JSON.stringify(file.metadata)}, given ${JSON.stringify(refArgs[1])}`;
          }
          return judgeTensors(file.tensors, (k) => (neutral || Object.prototype.hasOwnProperty.call(given, k) ? given[k] : undefined));
        },
      };
    }
    const t = randomHostTensor(rng, hooks);
    if (op === 'tensorToNpy') {
      return {
        args: [t],
        call: (x) => encodeNpy(tensorToNpy(...x)),
        judge: (bytes, { refArgs }) => judgeTensors(new Map([['t', npyAsTensor(parseNpy(bytes, 'the encoded file'))]]), () => refArgs[0]),
      };
    }
    return {
      args: [{ descr: tensorToNpy(t).descr, shape: [...t.shape], data: t.data }],
      call: (x) => encodeNpy(...x),
      judge: (bytes, { refArgs }) => {
        const a = refArgs[0];
        return judgeTensors(new Map([['arr', npyAsTensor(parseNpy(bytes, 'the encoded file'))]]), () => ({ dtype: DTYPE_OF_DESCR[a.descr], shape: a.shape, data: a.data }));
      },
    };
  },
};

function npyAsTensor(arr) {
  return { dtype: DTYPE_OF_DESCR[arr.descr], shape: arr.shape, data: arr.data };
}

/** Each decoded tensor against the one given under its name (`givenOf(name)`; undefined: not judged). */
export function judgeTensors(decoded, givenOf) {
  for (const [k, t] of decoded) {
    let g, dtype, shape, data;
    try {
      g = givenOf(k);
      if (typeof g !== 'object' || g === null) continue;
      ({ dtype, shape, data } = g);
      shape = Array.from({ length: shape.length }, (_, i) => shape[i]);
    } catch {
      continue; // a thrower of the caller's (the call read it otherwise, or not at all)
    }
    const mem = memoryBytes(data);
    if (mem === null) return `${k}: written, but its data is ${data === null ? 'null' : typeof data === 'object' ? 'not an attached typed array' : typeof data}`;
    if (TYPED_KIND.call(data) !== ARRAY_OF[dtype]) return `${k}: written as ${t.dtype}, but its data is a ${TYPED_KIND.call(data)} (dtype ${typeof dtype === 'string' ? dtype : typeof dtype})`;
    if (t.dtype !== dtype) return `${k}: written as ${t.dtype}, given ${dtype}`;
    if (JSON.stringify(t.shape) !== JSON.stringify(shape)) return `${k}: shape ${JSON.stringify(t.shape)}, given ${JSON.stringify(shape)}`;
    const got = memoryBytes(t.data);
    if (!sameBytes(got, mem)) return `${k}: ${got.length} data bytes written, its memory holds ${mem.length}${got.length === mem.length ? ' (other bytes)' : ''}`;
  }
  return null;
}

// ---- fileWriters (session 54) ----

/** The process's folder of the fileWriters cases (closeSideTargets removes it); each case gets a fresh one inside, the last case's removed. */
let fileRoot;
let lastScratch;
/** The seed of the last case built (the judge's rebuild of a neutral case has hooks of no stream, nor a seed). */
let lastSeed = 0;
/** The first seed whose fileWriters cases draw writeSafetensorsFile and npyToTensor too. */
const FILE_OPS_LATER_FROM_SEED = 92;

/**
 * The first seed whose file targets (fileWriters, dir_targets.mjs hostileDirWrite) give the call paths relative
 * to the case's folder (its working directory during the call) instead of absolute ones: a mutated absolute
 * path ('/TMP/SPARSE-MLA-FUZZ-FILES-…' in upper case) was written outside the case's folder, at the root.
 */
export const RELATIVE_PATHS_FROM_SEED = 130;

export function scratchDir() {
  // (under the runner's folder when a runner started this child: a child that dies leaves nothing behind)
  fileRoot ??= mkdtempSync(join(process.env.SPARSE_MLA_FUZZ_TMPDIR || tmpdir(), 'sparse-mla-fuzz-files-'));
  if (lastScratch) rmSync(lastScratch, { recursive: true, force: true });
  lastScratch = mkdtempSync(join(fileRoot, 'c'));
  return lastScratch;
}

/** A case's folder: a fresh one, or the last case's for the judge's rebuild of a neutral case (hooks of no stream). */
export const caseScratch = (hooks) => (hooks.rng || !lastScratch ? scratchDir() : lastScratch);

/** Every regular file under `dir` (relative paths, sorted); a folder that cannot be listed counts as none. */
function filesUnder(dir) {
  const out = [];
  const walk = (d, rel) => {
    let entries;
    try {
      entries = readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (e.isDirectory()) walk(join(d, e.name), rel ? `${rel}/${e.name}` : e.name);
      else out.push(rel ? `${rel}/${e.name}` : e.name);
    }
  };
  walk(dir, '');
  return out.sort();
}

/** Tensor `dtype` of `shape` with random contents (bf16 as finite bits), tracked by the case. */
function filledTensor(rng, hooks, dtype, shape) {
  const n = shape.reduce((a, b) => a * b, 1);
  if (dtype === 'bf16') return tensor(dtype, shape, hooks.track(randomBf16Bits(rng, n)));
  const data = new { float32: Float32Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array }[dtype](n);
  for (let i = 0; i < n; i++) {
    if (dtype === 'float32') data[i] = rng.normal();
    else if (dtype === 'int64') data[i] = BigInt(rng.int(-1, 64));
    else data[i] = rng.int(-1, 64);
  }
  return tensor(dtype, shape, hooks.track(data));
}

/** A prefill's outputs of [sQ, hQ, dV] (out bf16 or float32). */
export function prefillOutputs(rng, hooks, sQ, hQ, dV) {
  return { out: filledTensor(rng, hooks, rng.pick(['bf16', 'float32']), [sQ, hQ, dV]), lse: filledTensor(rng, hooks, 'float32', [sQ, hQ]), maxLogits: filledTensor(rng, hooks, 'float32', [sQ, hQ]) };
}

/** A prefill's inputs as writePrefillDir takes them (dQK small, dV given at most dQK). */
export function prefillInputs(rng, hooks) {
  const sQ = rng.int(0, 4), hQ = rng.int(1, 4), dQK = rng.pick([4, 16, 512]), sKV = rng.int(0, 6), topk = rng.int(0, 5);
  const args = {
    q: filledTensor(rng, hooks, 'bf16', [sQ, hQ, dQK]),
    kv: filledTensor(rng, hooks, 'bf16', [sKV, dQK]),
    indices: filledTensor(rng, hooks, rng.pick(['int32', 'int64']), rng.uniform() < 0.7 ? [sQ, topk] : [sQ, 1, topk]),
    smScale: rng.pick([0.0625, 1 / Math.sqrt(dQK), 3]),
  };
  if (rng.uniform() < 0.4) args.topkLength = filledTensor(rng, hooks, 'int32', [sQ]);
  if (rng.uniform() < 0.4) args.attnSink = filledTensor(rng, hooks, 'float32', [hQ]);
  const dV = dQK === 512 && rng.uniform() < 0.5 ? undefined : rng.int(1, dQK + 1);
  if (dV !== undefined) args.dV = dV;
  return { args, shapes: { sQ, hQ, dV: dV ?? 512 } };
}

/** `given` (a path the call took) as the library resolves it in the case's folder; null when it is no string. */
const pathIn = (scratch, given) => (typeof given === 'string' && !given.includes('\0') ? resolve(scratch, given) : null);

/** Tensors read back by name against the ones given (judgeTensors); `given` read by the judge after the call (its getters restored). */
export function judgeFields(back, given, names) {
  const decoded = new Map();
  for (const [field, got] of names.map((k) => [k, back[k]])) if (got !== undefined) decoded.set(field, got);
  for (const k of names) {
    let g;
    try {
      g = given[k];
    } catch {
      continue;
    }
    if (g !== undefined && g !== null && back[k] === undefined) return `${k}: given, not read back`;
  }
  return judgeTensors(decoded, (k) => given[k]);
}

/**
 * fileWriters (session 54, from seed 88): the writers of sparse-mla/io that take a path
 * (writeNpyFile, writePrefillOutputs, writePrefillDir in either format, with or without outputs) and
 * the directory readers (loadPrefillInputs, loadPrefillOutputs of a directory the builder wrote), given
 * the fuzzer's mutations. Paths are in a fresh folder of the case, and the call runs with that folder
 * as the working directory, so a mutated path ('', 'v4', '__proto__', a long name) lands in it, never
 * in the repository. A writer that resolves must have written files the library's readers take back,
 * each tensor as given (its dtype's kind, shape and bytes), meta as given; a refused one (SPEC §9:
 * checked before any work) must leave no file in the folder. A reader must give back what was written.
 */
const fileWriters = {
  name: 'fileWriters',
  fromSeed: 88, // added after seeds 64-87 were run
  build(rng, env, hooks) {
    // (the judge's rebuild of a neutral case, with hooks of no stream, names the case's own folder)
    const scratch = hooks.rng || !lastScratch ? scratchDir() : lastScratch;
    // from seed 92 (FILE_OPS_LATER_FROM_SEED) also writeSafetensorsFile and npyToTensor (seeds 88-91 draw their ops as run)
    const ops = ['writeNpyFile', 'writePrefillOutputs', 'writePrefillDir', 'writePrefillDir', 'loadPrefillInputs', 'loadPrefillOutputs'];
    const seed = hooks.rng ? hooks.seed : lastSeed;
    if (hooks.rng) lastSeed = hooks.seed;
    const later = seed >= FILE_OPS_LATER_FROM_SEED ? ['writeSafetensorsFile', 'npyToTensor'] : [];
    // from seed 95 (after 4157104's PrefillDir checks) a PrefillDir's open and get of a tensor by name
    const latest = seed >= 95 ? ['prefillDirGet'] : [];
    const op = rng.pick([...ops, ...later, ...latest]);
    const inFolder = (fn) => async (x) => {
      const back = process.cwd();
      process.chdir(scratch);
      try {
        return await fn(...x);
      } finally {
        process.chdir(back);
      }
    };
    const dir = join(scratch, 'd');
    // what the call is given: from RELATIVE_PATHS_FROM_SEED a path in its folder relative to it (a mutated one stays there)
    const given = (name) => (seed >= RELATIVE_PATHS_FROM_SEED ? name : join(scratch, name));
    // a refused writer leaves the folder as it was (a reader's folder was written by prepare)
    let before = [];
    const afterRefusal = () => {
      const now = filesUnder(scratch).filter((f) => !before.includes(f));
      return now.length > 0 ? `a refused ${op} left ${now.length} file(s) in its folder: ${now.slice(0, 4).join(', ')}` : null;
    };
    if (op === 'writeSafetensorsFile') {
      const record = {};
      for (let k = rng.int(1, 4); k > 0; k--) record[rng.pick(['q', 'kv', 'out', 'a.b'])] = randomHostTensor(rng, hooks);
      hooks.records.add(record);
      const args = [given('x.safetensors'), record];
      if (rng.uniform() < 0.5) {
        const metadata = { sm_scale: '0.04', note: rng.pick(['x', '']) };
        hooks.records.add(metadata);
        args.push(metadata);
      }
      return {
        args,
        describe: op,
        afterRefusal,
        call: inFolder(writeSafetensorsFile),
        judge: async (got, { refArgs, neutral }) => {
          const path = pathIn(scratch, refArgs[0]);
          if (path === null) return `resolved with a path ${typeof refArgs[0]}`;
          const file = await readSafetensorsFile(path);
          const given = refArgs[1];
          if (neutral && JSON.stringify([...file.tensors.keys()]) !== JSON.stringify(Object.keys(given))) return `tensors ${JSON.stringify([...file.tensors.keys()])}, given ${JSON.stringify(Object.keys(given))}`;
          return judgeTensors(file.tensors, (k) => (neutral || Object.prototype.hasOwnProperty.call(given, k) ? given[k] : undefined));
        },
      };
    }
    if (op === 'npyToTensor') {
      const t = randomHostTensor(rng, hooks);
      return {
        args: [{ descr: tensorToNpy(t).descr, shape: [...t.shape], data: t.data }],
        describe: op,
        call: (x) => npyToTensor(...x),
        judge: (got, { refArgs }) => {
          const a = refArgs[0];
          return judgeTensors(new Map([['arr', got]]), () => ({ dtype: DTYPE_OF_DESCR[a.descr], shape: a.shape, data: a.data }));
        },
      };
    }
    if (op === 'writeNpyFile') {
      const t = randomHostTensor(rng, hooks);
      return {
        args: [given('x.npy'), t],
        describe: op,
        afterRefusal,
        call: inFolder(writeNpyFile),
        judge: async (got, { refArgs }) => {
          const path = pathIn(scratch, refArgs[0]);
          if (path === null) return `resolved with a path ${typeof refArgs[0]}`;
          return judgeTensors(new Map([['t', npyToTensor(await readNpyFile(path))]]), () => refArgs[1]);
        },
      };
    }
    if (op === 'writePrefillOutputs') {
      const res = prefillOutputs(rng, hooks, rng.int(0, 3), rng.int(1, 3), rng.pick([1, 4, 512]));
      const args = [given('d'), res];
      if (rng.uniform() < 0.6) args.push(rng.pick(['npy', 'safetensors']));
      return {
        args,
        describe: op,
        afterRefusal,
        call: inFolder(writePrefillOutputs),
        judge: async (names, { refArgs }) => {
          const path = pathIn(scratch, refArgs[0]);
          if (path === null) return `resolved with a directory ${typeof refArgs[0]}`;
          const format = refArgs[2] ?? 'npy';
          const want = format === 'safetensors' ? ['outputs.safetensors'] : ['out.npy', 'lse.npy', 'max_logits.npy'];
          if (JSON.stringify(names) !== JSON.stringify(want)) return `returned ${JSON.stringify(names)} for format ${describeValue(refArgs[2])}, expected ${JSON.stringify(want)}`;
          // read back as the verify command does: against the dims of the out it was given
          const shape = refArgs[1].out.shape;
          let back;
          try {
            back = await loadPrefillOutputs(path, { sQ: shape[0], hQ: shape[1], dV: shape[2] });
          } catch (e) {
            return `wrote outputs loadPrefillOutputs refuses: ${errStr(e)}`;
          }
          return judgeFields(back, refArgs[1], ['out', 'lse', 'maxLogits']);
        },
      };
    }
    if (op === 'writePrefillDir') {
      const { args, shapes } = prefillInputs(rng, hooks);
      const opts = {};
      if (rng.uniform() < 0.6) opts.format = rng.pick(['npy', 'safetensors']);
      if (rng.uniform() < 0.5) opts.outputs = prefillOutputs(rng, hooks, shapes.sQ, shapes.hQ, shapes.dV);
      return {
        args: rng.uniform() < 0.2 && opts.format === undefined && opts.outputs === undefined ? [given('d'), args] : [given('d'), args, opts],
        describe: op,
        afterRefusal,
        call: inFolder(writePrefillDir),
        judge: async (got, { refArgs }) => {
          const path = pathIn(scratch, refArgs[0]);
          if (path === null) return `resolved with a directory ${typeof refArgs[0]}`;
          const [, a, o = {}] = refArgs;
          let back;
          try {
            back = await loadPrefillInputs(path);
          } catch (e) {
            return `wrote a directory loadPrefillInputs refuses: ${errStr(e)}`;
          }
          const p = judgeFields(back.args, a, ['q', 'kv', 'indices', 'topkLength', 'attnSink']);
          if (p) return p;
          // (=== : JSON and the safetensors metadata write -0 as 0, the same scale)
          if (back.args.smScale !== a.smScale) return `sm_scale read back ${back.args.smScale}, given ${describeValue(a.smScale)}`;
          if (back.args.dV !== (a.dV ?? 512)) return `d_v read back ${back.args.dV}, given ${describeValue(a.dV)}`;
          if (o.outputs !== undefined) {
            let outs;
            try {
              outs = await loadPrefillOutputs(path, back.shapes);
            } catch (e) {
              return `wrote outputs loadPrefillOutputs refuses: ${errStr(e)}`;
            }
            return judgeFields(outs, o.outputs, ['out', 'lse', 'maxLogits']);
          }
          return null;
        },
      };
    }
    // the readers: a directory written by prepare (its files are the folder's before the call)
    const { args, shapes } = prefillInputs(rng, hooks);
    const outputs = prefillOutputs(rng, hooks, shapes.sQ, shapes.hQ, shapes.dV);
    const format = rng.pick(['npy', 'safetensors']);
    const prepare = async () => {
      await writePrefillDir(dir, args, { format, outputs });
      before = filesUnder(scratch);
    };
    if (op === 'prefillDirGet') {
      const names = { q: args.q, kv: args.kv, indices: args.indices, topk_length: args.topkLength, attn_sink: args.attnSink, out: outputs.out, lse: outputs.lse, max_logits: outputs.maxLogits };
      return {
        args: [given('d'), rng.pick([...Object.keys(names), 'missing'])],
        describe: op,
        prepare,
        call: inFolder(async (d, name) => {
          const opened = await PrefillDir.open(d);
          return { located: await opened.get(name), has: opened.has(name) };
        }),
        judge: ({ located, has }, { refArgs }) => {
          const want = typeof refArgs[1] === 'string' && Object.hasOwn(names, refArgs[1]) ? names[refArgs[1]] : undefined;
          if ((located !== undefined) !== has) return `get ${located === undefined ? 'found nothing' : 'found it'}, has said ${has}`;
          if (want === undefined) return located === undefined ? null : `found ${describeValue(refArgs[1])}, never written`;
          if (located === undefined) return `${refArgs[1]} not found`;
          return judgeTensors(new Map([[refArgs[1], located.value]]), () => want);
        },
      };
    }
    if (op === 'loadPrefillInputs') {
      return {
        args: [given('d')],
        describe: op,
        prepare,
        call: inFolder(loadPrefillInputs),
        judge: (back) => {
          const p = judgeFields(back.args, args, ['q', 'kv', 'indices', 'topkLength', 'attnSink']);
          if (p) return p;
          if (back.args.smScale !== args.smScale || back.args.dV !== shapes.dV) return `sm_scale ${back.args.smScale}, d_v ${back.args.dV}: written ${args.smScale}, ${shapes.dV}`;
          return JSON.stringify(back.shapes) === JSON.stringify({ ...back.shapes, ...shapes }) ? null : `shapes ${JSON.stringify(back.shapes)}, written ${JSON.stringify(shapes)}`;
        },
      };
    }
    return {
      args: [given('d'), { ...shapes }],
      describe: op,
      prepare,
      call: inFolder(loadPrefillOutputs),
      judge: (back) => judgeFields(back, outputs, ['out', 'lse', 'maxLogits']),
    };
  },
};

// ---- reentrantGetter (session 54) ----

/** One valid call on `env`'s engine: { name, args (one argument object), run(args), judge(got) }; a layer or an op. */
export function oneCall(rng, env, hooks) {
  if (rng.uniform() < 0.3) {
    const { sc, layer, window } = layerScenario(rng, hooks, rng.pick([0, 4, 128]));
    layer.plan = createPlan(sc.chunk, { window });
    hooks.plans.push(layer.plan);
    return { name: 'prefillLayer', args: { ...layer }, run: (a) => prefillLayer(env.engine, a), judge: (got) => judgeLayer(got, sc, layer, !!env.stub) };
  }
  const t = rng.pick([sparsePrefillTarget, pagedSparseAttentionTarget, dequantizeKCachePagedTarget]).build(rng, env, hooks);
  return { name: t.name ?? 'an op', args: { ...t.args[0] }, run: (a) => t.call([a, ...t.args.slice(1)]), judge: (got) => t.judge(got, { refArgs: t.args, stub: !!env.stub, neutral: true }) };
}

/**
 * reentrantGetter (session 54, from seed 93): a valid call on the case's engine whose argument has a
 * getter (of one of its fields, answering the field's own value) that starts other valid calls on
 * the same engine while the first call is reading its arguments: an independent call (another op or
 * a layer), or the same call with the same arguments again (once: the inner call's read of the
 * getter starts nothing more). Re-entered during its checks, an engine must give every call its own
 * right result (staging, budgets, worker queues, a plan's kept rows shared by both); nothing
 * rejects, nothing is left lent.
 */
const reentrantGetter = {
  name: 'reentrantGetter',
  engine: true,
  fromSeed: 93, // added after seeds 64-92 were run
  build(rng, env, hooks) {
    // on a host engine, sometimes a fresh one of a small memoryBudgetBytes: the calls contend for its staging
    const budget = !env.engine?.hasDevice && rng.uniform() < 0.4 ? rng.pick([2 ** 20, 2 ** 21, 2 ** 23]) : undefined;
    const local = budget === undefined ? env : { backend: env.backend, engine: null, stub: null };
    const workers = rng.int(1, 3);
    const outer = oneCall(rng, local, hooks);
    const key = rng.pick(Object.keys(outer.args));
    const same = rng.uniform() < 0.3;
    const inners = same ? [] : Array.from({ length: rng.int(1, 3) }, () => oneCall(rng, local, hooks));
    const when = rng.pick(['first', 'every']);
    const what = `${outer.name}, its ${key} getter starting ${same ? 'the same call again' : inners.map((c) => c.name).join(' and ')} (${when} read)${budget ? ` on an engine of memoryBudgetBytes ${budget}` : ''}`;
    // over a budget, a call may be refused TOO_LARGE (alone it would be): nothing else
    const refusedOk = (e) => budget !== undefined && isCode(e, 'TOO_LARGE');
    return {
      args: [],
      describe: what,
      call: async () => {
        if (budget === undefined) return calls();
        local.engine = await createEngine({ backend: env.backend, workers, memoryBudgetBytes: budget });
        try {
          return await calls();
        } finally {
          await local.engine.dispose();
        }
      },
      judge: ({ r, inner }) => {
        if (r.error && !refusedOk(r.error)) return `${what}: the outer call rejected with ${errStr(r.error)}`;
        const p = r.error ? null : outer.judge(r.value);
        if (p) return `${what}: the outer call: ${p}`;
        for (const [i, x] of inner.entries()) {
          if (x.r.error && refusedOk(x.r.error)) continue;
          if (x.r.error) return `${what}: inner call ${i} rejected with ${errStr(x.r.error)}`;
          const q = x.judge(x.r.value);
          if (q) return `${what}: inner call ${i}: ${q}`;
        }
        return null;
      },
    };
    async function calls() {
      const started = [];
      const v = outer.args[key];
      let depth = 0;
      const hostile = { ...outer.args };
      Object.defineProperty(hostile, key, {
        enumerable: true,
        get() {
          if (depth === 0 && (when === 'every' || started.length === 0) && started.length < 4) {
            depth++;
            try {
              if (same) started.push({ judge: outer.judge, p: settle(outer.run(hostile)) });
              else for (const c of inners) started.push({ judge: c.judge, p: settle(c.run(c.args)) });
            } finally {
              depth--;
            }
          }
          return v;
        },
      });
      const r = await settle(outer.run(hostile));
      const inner = [];
      for (const s of started) inner.push({ judge: s.judge, r: await s.p });
      return { r, inner };
    }
  },
};

// ---- workerDeath (session 54) ----

/**
 * workerDeath (session 54, from seed 100): a fresh wasm engine (1-3 workers, whatever the run's
 * backend; sometimes a 2-8 MiB memoryBudgetBytes) runs 1-3 valid calls at once (ops and layers) while
 * a worker of its pool ends as a crash would (WorkerPool.testing.terminateWorker): as the k-th task
 * is dispatched to it, or after a timer. Each call gives its right result or rejects with
 * WORKER_DIED (TOO_LARGE too, over a budget), never anything else or a hang; once they settle no
 * staging is held for them, and the same calls again on the same engine (its plans too: a layer that
 * failed midway) give their right results.
 */
const workerDeath = {
  name: 'workerDeath',
  engine: true,
  hostEngineOnly: true,
  fromSeed: 100, // added after seeds 64-99 were run
  build(rng, env, hooks) {
    const workers = rng.int(1, 4);
    const budget = rng.uniform() < 0.25 ? rng.pick([2 ** 21, 2 ** 23]) : undefined;
    const local = { backend: 'wasm', engine: null, stub: null };
    const calls = Array.from({ length: rng.int(1, 4) }, () => oneCall(rng, local, hooks));
    const kill = rng.uniform() < 0.6 ? { atDispatch: rng.int(0, 6) } : { afterMs: rng.pick([0, 1, 5, 20]) };
    const what = `${calls.map((c) => c.name).join(', ')} on a wasm engine of ${workers} worker(s)${budget ? `, memoryBudgetBytes ${budget}` : ''}, a worker ended ${kill.atDispatch !== undefined ? `at dispatch ${kill.atDispatch}` : `after ${kill.afterMs} ms`}`;
    const allowed = (e) => isCode(e, 'WORKER_DIED') || (budget !== undefined && isCode(e, 'TOO_LARGE'));
    return {
      args: [],
      describe: what,
      call: async () => {
        const { engineBackend } = await import('../../dist/engine.js');
        local.engine = await createEngine({ backend: 'wasm', workers, ...(budget ? { memoryBudgetBytes: budget } : {}) });
        try {
          const backend = engineBackend(local.engine);
          const pool = backend.pool;
          // (each end awaited before the calls run again: a worker whose terminate() is still under way
          // when its task finished takes the next call's task and dies with it, wasm seed 100 case 191)
          let dispatches = 0, killed = 0, timer;
          const ends = [];
          const off = pool.testing.onDispatch((w) => {
            if (kill.atDispatch !== undefined && dispatches++ === kill.atDispatch) {
              killed++;
              ends.push(pool.testing.terminateWorker(w));
            }
          });
          if (kill.afterMs !== undefined) {
            timer = setTimeout(() => {
              const busy = pool.testing.busyWorkers();
              if (busy.length > 0) {
                killed++;
                ends.push(pool.testing.terminateWorker(busy[0]));
              }
            }, kill.afterMs);
          }
          const first = await Promise.all(calls.map((c) => settle(c.run(c.args))));
          off();
          clearTimeout(timer);
          await Promise.all(ends);
          // the parts of a failed call left running on other workers finish before its staging comes back
          for (const t0 = Date.now(); (pool.testing.busyWorkers().length > 0 || pool.testing.queued() > 0) && Date.now() - t0 < 10_000; ) await new Promise((r) => setTimeout(r, 5));
          const held = { busy: backend.staging.busyBytes, lent: backend.staging.lentBytes };
          const again = await Promise.all(calls.map((c) => settle(c.run(c.args))));
          return { first, again, killed, held };
        } finally {
          await local.engine.dispose();
        }
      },
      judge: ({ first, again, killed, held }) => {
        for (const [i, r] of first.entries()) {
          if (r.error && !(allowed(r.error) && (killed > 0 || !isCode(r.error, 'WORKER_DIED')))) return `${what}: call ${i} (${calls[i].name}) rejected with ${errStr(r.error)} (${killed} worker(s) ended)`;
          const p = r.error ? null : calls[i].judge(r.value);
          if (p) return `${what}: call ${i} (${calls[i].name}): ${p}`;
        }
        if (held.busy !== 0 || held.lent !== 0) return `${what}: after the calls settled the staging still held ${held.busy} bytes handed out and ${held.lent} lent`;
        for (const [i, r] of again.entries()) {
          if (r.error && !(budget !== undefined && isCode(r.error, 'TOO_LARGE'))) return `${what}: the same call ${i} (${calls[i].name}) again rejected with ${errStr(r.error)}`;
          const p = r.error ? null : calls[i].judge(r.value);
          if (p) return `${what}: the same call ${i} (${calls[i].name}) again: ${p}`;
        }
        return null;
      },
    };
  },
};

const describeValue = (v) => (typeof v === 'string' ? JSON.stringify(v) : v === null ? 'null' : typeof v === 'object' ? 'an object' : typeof v === 'symbol' ? 'a Symbol' : String(v));

/** The session-53 targets (and session 54's, from their fromSeed) with their weights (fuzz.mjs draws one from the session-53 stream). */
export const SIDE3_TARGETS = [
  [planRows, 1],
  [encoders, 1],
  [fileWriters, 1],
  [reentrantGetter, 1],
  [workerDeath, 1],
];
