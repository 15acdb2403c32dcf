/**
 * opRace (session 61, from seed OP_RACE_FROM_SEED, host engines, drawn with numericEdges from the
 * session-58 stream): the four ops (sparsePrefill, pagedSparseAttention, dequantizeKCachePaged,
 * quantizeKCache) over operands in SharedArrayBuffers that another thread (racer_worker.mjs) rewrites
 * from before the call until it settled. layerRace races a layer's operands; the ops' own (the host
 * gathers' kv rows and cache tokens planned from ids read in place, a cache written while its other
 * tokens change) were raced by no case. Each shared operand lies between two 64-byte guards that
 * nothing may write. Two modes:
 *
 * - unread (60%): only the bytes SPEC §4 / §5 / §3.3 say the call never reads are rewritten: kv rows no
 *   valid entry names, index entries past their row's topkLength, cache tokens (and page padding) no
 *   valid id names or, for quantizeKCache, no id writes. The results must be the reference's on the
 *   arrays as they are after the call (the reference reads none of the raced bytes): SPEC §4.1's bounds
 *   through the regime (judgeAttention), dequantized rows and written tokens bit-exact; and the bytes
 *   the call reads must be unchanged (no op writes its inputs).
 * - wild (40%): every word of some shared operands is rewritten (ids too: a copy checked before any
 *   work is the id used): a typed refusal other than a backend's failure, or outputs of the call's
 *   shapes; values are not judged.
 *
 * The host gathers' choice is left to the estimate or forced either way (prefillGatherForTests,
 * pagedReadForTests), over kvs of up to 2000 rows and caches of up to 300 tokens, so both the compact
 * and the whole read are raced. In both modes the guards must be as they were.
 */
import { createKvCache, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits } from '../../dist/check/grid.js';
import { prefillGatherForTests } from '../../dist/backends/prefill_gather.js';
import { pagedReadForTests } from '../../dist/backends/paged_gather.js';
import { withDotScales } from './regime.mjs';
import { judgeAttention } from './targets.mjs';
import { race } from './host_targets.mjs';

/** The first seed that draws opRace (seeds before it replay as run). */
export const OP_RACE_FROM_SEED = 329;

const GUARD = 64;
const GUARD_BYTE = 0xa5;
const D = 512;

/**
 * A copy of `src` (a typed array) in shared memory between two guards: { view, sab, check() (the
 * guards' first changed byte, or null) }.
 */
function guarded(src) {
  const body = Math.ceil(src.byteLength / 8) * 8;
  const sab = new SharedArrayBuffer(GUARD + body + GUARD);
  new Uint8Array(sab).fill(GUARD_BYTE);
  const view = new src.constructor(sab, GUARD, src.length);
  view.set(src);
  const bytes = new Uint8Array(sab);
  const check = () => {
    for (let i = 0; i < GUARD; i++) if (bytes[i] !== GUARD_BYTE) return `${i - GUARD}`;
    for (let i = GUARD + src.byteLength; i < bytes.length; i++) if (bytes[i] !== GUARD_BYTE) return `+${i - GUARD - src.byteLength} past its end`;
    return null;
  };
  return { view, sab, check };
}

/** The racer's ranges ([buffer index, byte offset, words]) of the words of `g` marked in `raced` (a Uint8Array, one a word). */
function rangesOf(b, raced) {
  const out = [];
  for (let w = 0; w < raced.length; ) {
    if (!raced[w]) {
      w++;
      continue;
    }
    let e = w;
    while (e < raced.length && raced[e]) e++;
    out.push([b, GUARD + 4 * w, e - w]);
    w = e;
  }
  return out;
}

/** Entries of `rows` rows of `topk` over `bound` ids: runs, repeats, edges, scattered ids and ones the op skips. */
function raceIds(rng, rows, topk, bound) {
  const out = new Int32Array(rows * topk);
  for (let i = 0; i < rows; i++) {
    const kind = rng.pick(['run', 'repeat', 'edge', 'scatter']);
    const start = rng.int(0, Math.max(1, bound));
    for (let k = 0; k < topk; k++) {
      let id;
      if (rng.uniform() < 0.15) id = rng.pick([-1, -7, bound, bound + 5, 2 ** 31 - 1]);
      else if (kind === 'run') id = start + k;
      else if (kind === 'repeat') id = k > 0 && rng.uniform() < 0.6 ? out[i * topk + rng.int(0, k)] : rng.int(0, bound);
      else if (kind === 'edge') id = rng.pick([0, bound - 1, bound - 2]);
      else id = rng.int(0, bound);
      out[i * topk + k] = id;
    }
  }
  return out;
}

/** Entries row i may read: its topkLength clamped to [0, topk], or topk. */
const rowLimit = (lengths, i, topk) => (lengths ? Math.min(Math.max(lengths[i], 0), topk) : topk);

/** An index set in shared memory: { tensor, g, unreadWords(): entries past their row's length (a Uint8Array a word) }. */
function sharedIndices(rng, ids, rows, topk, lengths) {
  const wide = rng.uniform() < 0.2;
  const g = guarded(wide ? BigInt64Array.from(ids, (v) => BigInt(v)) : ids);
  const per = wide ? 2 : 1;
  const words = new Uint8Array(ids.length * per);
  for (let i = 0; i < rows; i++) for (let k = rowLimit(lengths, i, topk); k < topk; k++) words.fill(1, (i * topk + k) * per, (i * topk + k + 1) * per);
  return { tensor: tensor(wide ? 'int64' : 'int32', [rows, topk], g.view), g, unread: words };
}

/** Valid ids of a set (entries within their row's length naming one of `bound` rows). */
function validIds(ids, rows, topk, lengths, bound) {
  const out = new Set();
  for (let i = 0; i < rows; i++) {
    for (let k = 0; k < rowLimit(lengths, i, topk); k++) {
      const id = ids[i * topk + k];
      if (id >= 0 && id < bound) out.add(id);
    }
  }
  return out;
}

/** The words of a cache's bytes that no token of `read` covers (its pages' padding included): a Uint8Array a word. */
function unreadCacheWords(cache, read) {
  const words = new Uint8Array(Math.ceil(cache.data.length / 4)).fill(1);
  const cover = (from, bytes) => words.fill(0, from >> 2, (from + bytes + 3) >> 2);
  for (const t of read) {
    const at = R.tokenLayoutReference(cache, t);
    if (cache.format === 'v4') {
      cover(at.nope, 576);
      cover(at.scales, 8);
    } else cover(at.nope, 656);
  }
  // a word the cache's last bytes share with the guard's padding is not the cache's to race
  if (cache.data.length % 4) words[words.length - 1] = 0;
  return words;
}

function v4Cache(rng, pageSize, numPages) {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  R.quantizeKCacheReference(cache, Array.from({ length: n }, (_, i) => i), tensor('bf16', [n, D], randomBf16Bits(rng, n * D, rng.pick([1, 1, 1e-3]))));
  return cache;
}

function v32Cache(rng, tokens) {
  const cache = createKvCache('v32', { numTokens: tokens });
  R.quantizeKCacheReference(cache, Array.from({ length: tokens }, (_, i) => i), tensor('bf16', [tokens, 576], randomBf16Bits(rng, tokens * 576)));
  return cache;
}

/** A cache in shared memory: { cache (the call's), g }. */
function sharedCache(cache) {
  const g = guarded(cache.data);
  return { cache: { format: cache.format, pageSize: cache.pageSize, numPages: cache.numPages, data: g.view }, g };
}

function lengthsOf(rng, rows, topk) {
  return rng.uniform() < 0.45 ? Int32Array.from({ length: rows }, () => rng.int(0, topk + 3)) : null;
}

/**
 * A case of one op: { op, mode, force, args, operands: [{ name, g, raced: Uint8Array | null (unread mode's words) }],
 * judge(got), describe }. Built at the call from its own seed (the case's rebuild for the judge costs nothing).
 */
function makeCase(rng) {
  const op = rng.pick(['sparsePrefill', 'sparsePrefill', 'sparsePrefill', 'pagedSparseAttention', 'pagedSparseAttention', 'pagedSparseAttention', 'dequantizeKCachePaged', 'quantizeKCache', 'quantizeKCache']);
  const mode = rng.uniform() < 0.6 ? 'unread' : 'wild';
  const operands = [];
  const add = (name, g, unread) => operands.push({ name, g, unread });
  // an attention op's case over `a` (rows × hQ outputs), judged against its reference by the regime
  const attentionCase = (a, rows, hQ, describe) => ({
    op,
    mode,
    operands,
    args: a,
    force: rng.pick([null, null, 'compact', 'whole']),
    describe,
    judge: (got) => judgeAttention(got, () => withDotScales(op, R[`${op}Reference`], a), rows, hQ, 512),
  });
  // a call's sink in 40% of the cases, in guarded shared memory, ±inf among its values
  const maybeSink = (a, hQ) => {
    if (rng.uniform() >= 0.4) return;
    const g = guarded(Float32Array.from({ length: hQ }, () => (rng.uniform() < 0.15 ? rng.pick([Infinity, -Infinity]) : rng.normal())));
    a.attnSink = tensor('float32', [hQ], g.view);
    add('attnSink', g, null);
  };
  if (op === 'sparsePrefill') {
    const sQ = rng.pick([1, 2, 3, 5]);
    const hQ = rng.pick([1, 2, 4, 8]);
    const dQK = rng.pick([512, 576]);
    const sKV = rng.pick([8, 40, 300, 2000]);
    const topk = rng.pick([1, 4, 16, 64]);
    const ids = raceIds(rng, sQ, topk, sKV);
    const lengths = lengthsOf(rng, sQ, topk);
    const kv = guarded(randomBf16Bits(rng, sKV * dQK));
    // unread mode: the kv now and then unshared (copied at the call, so the host gathers plan from it; not raced)
    const kvShared = mode === 'wild' || rng.uniform() < 0.6;
    const idx = sharedIndices(rng, ids, sQ, topk, lengths);
    const read = validIds(ids, sQ, topk, lengths, sKV);
    const kvUnread = new Uint8Array((sKV * dQK) >> 1);
    for (let r = 0; r < sKV; r++) if (!read.has(r)) kvUnread.fill(1, (r * dQK) >> 1, ((r + 1) * dQK) >> 1);
    const q = guarded(randomBf16Bits(rng, sQ * hQ * dQK));
    const a = { q: tensor('bf16', [sQ, hQ, dQK], q.view), kv: tensor('bf16', [sKV, dQK], kvShared ? kv.view : kv.view.slice()), indices: idx.tensor, smScale: 1 / Math.sqrt(dQK) };
    if (kvShared) add('kv', kv, kvUnread);
    add('indices', idx.g, idx.unread);
    add('q', q, null);
    if (lengths) {
      const g = guarded(lengths);
      a.topkLength = tensor('int32', [sQ], g.view);
      add('topkLength', g, null);
    }
    maybeSink(a, hQ);
    return attentionCase(a, sQ, hQ, `sparsePrefill${kvShared ? '' : ' (kv unshared)'} sQ ${sQ} hQ ${hQ} dQK ${dQK} sKV ${sKV} topk ${topk}, ${read.size} rows read${lengths ? ', topkLength' : ''}${a.attnSink ? ', sink' : ''}, ${idx.tensor.dtype}`);
  }
  if (op === 'pagedSparseAttention') {
    const n = rng.pick([1, 2, 3]);
    const hQ = rng.pick([1, 2, 4]);
    const set = (name, lengthName) => {
      const pageSize = rng.pick([1, 2, 16, 64]);
      const numPages = Math.max(1, Math.ceil(rng.int(1, 300) / pageSize));
      const plain = v4Cache(rng, pageSize, numPages);
      const { cache: shared, g } = sharedCache(plain);
      // unread mode: a cache now and then unshared (copied at the call; not raced)
      const cacheShared = mode === 'wild' || rng.uniform() < 0.6;
      const cache = cacheShared ? shared : plain;
      const tokens = pageSize * numPages;
      const topk = rng.pick([1, 4, 9, 32]);
      const ids = raceIds(rng, n, topk, tokens);
      const lengths = lengthsOf(rng, n, topk);
      const idx = sharedIndices(rng, ids, n, topk, lengths);
      if (cacheShared) add(`${name}'s cache`, g, unreadCacheWords(cache, validIds(ids, n, topk, lengths, tokens)));
      add(`${name}'s indices`, idx.g, idx.unread);
      let lengthTensor;
      if (lengths) {
        const lg = guarded(lengths);
        lengthTensor = tensor('int32', [n], lg.view);
        add(lengthName, lg, null);
      }
      return { cache, indices: idx.tensor, lengths: lengthTensor, desc: `${tokens} tokens of ${pageSize}, topk ${topk}, ${validIds(ids, n, topk, lengths, tokens).size} read${lengths ? ', lengths' : ''}` };
    };
    const q = guarded(randomBf16Bits(rng, n * hQ * D));
    add('q', q, null);
    const main = set('main', 'topkLength');
    const a = { q: tensor('bf16', [n, hQ, D], q.view), kCache: main.cache, indices: main.indices, smScale: 1 / Math.sqrt(576) };
    if (main.lengths) a.topkLength = main.lengths;
    let extraDesc = '';
    if (rng.uniform() < 0.4) {
      const extra = set('extra', 'extraTopkLength');
      Object.assign(a, { extraKCache: extra.cache, extraIndices: extra.indices, ...(extra.lengths ? { extraTopkLength: extra.lengths } : {}) });
      extraDesc = `; extra ${extra.desc}`;
    }
    maybeSink(a, hQ);
    return attentionCase(a, n, hQ, `pagedSparseAttention n ${n} hQ ${hQ}, main ${main.desc}${extraDesc}${a.attnSink ? ', sink' : ''}`);
  }
  const format = rng.pick(['v4', 'v32']);
  const base = format === 'v4' ? v4Cache(rng, rng.pick([1, 3, 16, 64]), rng.int(1, 5)) : v32Cache(rng, rng.int(1, 40));
  const tokens = base.pageSize * base.numPages;
  const width = format === 'v4' ? 512 : 576;
  const { cache, g } = sharedCache(base);
  if (op === 'dequantizeKCachePaged') {
    const ids = Int32Array.from({ length: rng.int(0, 13) }, () => rng.int(0, tokens));
    const idsG = guarded(ids);
    add('cache', g, unreadCacheWords(cache, new Set(ids)));
    // unread mode: the ids are read, so not raced (a plain array or a tensor); wild: a shared tensor rewritten
    const asArray = mode === 'unread' && rng.uniform() < 0.3;
    if (!asArray) add('tokenIds', idsG, new Uint8Array(ids.length));
    const a = { cache, tokenIds: asArray ? Array.from(ids) : tensor('int32', [ids.length], idsG.view) };
    return {
      op,
      mode,
      operands,
      args: a,
      force: null,
      describe: `dequantizeKCachePaged ${format} ${tokens} tokens of ${base.pageSize}, ${ids.length} ids${asArray ? ' (an array)' : ''}`,
      judge: (got) => {
        const want = R.dequantizeKCacheReference({ ...cache, data: cache.data.slice() }, Array.from(ids));
        if (!got || got.dtype !== 'bf16' || JSON.stringify(got.shape) !== JSON.stringify([ids.length, width])) return `got ${got?.dtype} ${JSON.stringify(got?.shape)}, expected bf16 [${ids.length}, ${width}]`;
        for (let i = 0; i < want.length; i++) {
          const v = R.decodeBf16(got.data[i]);
          if (!(Number.isNaN(v) ? Number.isNaN(want[i]) : v === want[i])) return `element ${i} (token ${ids[Math.floor(i / width)]}): got ${v}, want ${want[i]}`;
        }
        return null;
      },
    };
  }
  // quantizeKCache: distinct ids, rows of float32 or bf16; unread mode races the tokens it does not write
  const n = rng.int(0, Math.min(tokens, 8) + 1);
  const all = Array.from({ length: tokens }, (_, i) => i);
  for (let i = all.length - 1; i > 0; i--) {
    const j = rng.int(0, i + 1);
    [all[i], all[j]] = [all[j], all[i]];
  }
  const ids = Int32Array.from(all.slice(0, n));
  const f = new Float32Array(n * width).map(() => rng.normal() * rng.pick([1, 1e-3, 300]));
  const bf16 = rng.uniform() < 0.5;
  const rowsG = guarded(bf16 ? Uint16Array.from(f, (x) => R.encodeBf16(x)) : f);
  const idsG = guarded(ids);
  add('cache', g, unreadCacheWords(cache, new Set(ids)));
  add('tokenIds', idsG, new Uint8Array(ids.length));
  add('rows', rowsG, new Uint8Array(Math.ceil(rowsG.view.byteLength / 4)));
  const a = { cache, tokenIds: tensor('int32', [n], idsG.view), rows: tensor(bf16 ? 'bf16' : 'float32', [n, width], rowsG.view) };
  return {
    op,
    mode,
    operands,
    args: a,
    force: null,
    describe: `quantizeKCache ${format} ${tokens} tokens of ${base.pageSize}, ${n} ${bf16 ? 'bf16' : 'float32'} rows`,
    judge: (got) => {
      if (got !== undefined) return `resolved with ${typeof got}, expected undefined`;
      // the reference writes the same rows into a copy; only the written tokens' bytes are compared (the others raced)
      const want = { ...cache, data: cache.data.slice() };
      R.quantizeKCacheReference(want, Array.from(ids), { dtype: a.rows.dtype, shape: a.rows.shape, data: a.rows.data.slice() });
      for (const t of ids) {
        const at = R.tokenLayoutReference(cache, t);
        const spans = format === 'v4' ? [[at.nope, 576], [at.scales, 8]] : [[at.nope, 656]];
        for (const [from, bytes] of spans) for (let i = from; i < from + bytes; i++) if (cache.data[i] !== want.data[i]) return `token ${t}: cache byte ${i} is ${cache.data[i]}, want ${want.data[i]}`;
      }
      return null;
    },
  };
}

/** The words each operand's racer may rewrite in this case's mode: { buffers, ranges } for race(). */
function racedWords(rng, c) {
  const buffers = [], ranges = [];
  for (const o of c.operands) {
    const words = o.g.view.byteLength >> 2;
    let raced;
    if (c.mode === 'unread') {
      if (!o.unread || o.unread.every((w) => w === 0)) continue;
      raced = o.unread.subarray(0, words);
    } else {
      // wild: some operands whole (a quantizeKCache's rows / ids / cache, an attention op's every input)
      if (rng.uniform() < 0.3) continue;
      raced = new Uint8Array(words).fill(1);
    }
    buffers.push(o.g.sab);
    ranges.push(...rangesOf(buffers.length - 1, raced));
  }
  return { buffers, ranges };
}

/** Bytes of the operands the call reads (unread mode): a snapshot, and the first one changed. */
function readBytes(c) {
  const snap = c.operands.map((o) => {
    const bytes = new Uint8Array(o.g.sab, GUARD, o.g.view.byteLength);
    const mask = o.unread;
    return { o, bytes, before: bytes.slice(), mask };
  });
  return () => {
    for (const { o, bytes, before, mask } of snap) {
      for (let i = 0; i < bytes.length; i++) {
        if (mask && mask[i >> 2]) continue;
        if (c.op === 'quantizeKCache' && o.name === 'cache') continue; // written by the call: judged against the reference
        if (bytes[i] !== before[i]) return `${o.name} byte ${i} changed (${before[i]} → ${bytes[i]}): a byte the call reads, which no racer touched`;
      }
    }
    return null;
  };
}

const opRace = {
  name: 'opRace',
  fromSeed: OP_RACE_FROM_SEED,
  engine: true,
  hostEngineOnly: true,
  build(rng, env) {
    const caseSeed = rng.u32();
    const raceSeed = rng.u32();
    let c = null;
    const built = {
      args: [], // nothing for the mutator: the racer is the case's hostility
      rereads: true,
      call: async () => {
        c = makeCase(makeRng(caseSeed));
        built.describe = `${c.mode}: ${c.describe}${c.force ? `, gather forced ${c.force}` : ''}`;
        // wild: a refusal is the call's to make (an id raced out of range, ...); unread: the call is valid
        built.mayRefuse = c.mode === 'wild';
        const { buffers, ranges } = racedWords(makeRng(raceSeed), c);
        const unchanged = c.mode === 'unread' ? readBytes(c) : null;
        const stop = await race(buffers, raceSeed, ranges);
        const forced = [prefillGatherForTests.force, pagedReadForTests.force];
        if (c.op === 'sparsePrefill') prefillGatherForTests.force = c.force;
        if (c.op === 'pagedSparseAttention') pagedReadForTests.force = c.force;
        try {
          return await env.engine[c.op](c.args);
        } finally {
          [prefillGatherForTests.force, pagedReadForTests.force] = forced;
          await stop();
          built.unchanged = unchanged?.() ?? null;
        }
      },
      judgeRefusal: (error) => {
        const guard = guardsOf(c);
        if (guard) return ['input-written', guard];
        // unread mode: a valid call whose raced bytes it never reads
        return c?.mode === 'unread' ? ['neutral-refused', `${error?.name} ${error?.code ?? ''}: ${String(error?.message).slice(0, 200)}`] : null;
      },
      judge: (got) => {
        const guard = guardsOf(c);
        if (guard) return guard;
        if (c.mode === 'wild') return shapesOf(c, got);
        return built.unchanged ?? c.judge(got);
      },
    };
    return built;
  },
};

function guardsOf(c) {
  for (const o of c?.operands ?? []) {
    const at = o.g.check();
    if (at !== null) return `${o.name}'s guard written at byte ${at}: a write outside the operand`;
  }
  return null;
}

/** A wild case's result: the op's shapes (its values are the raced data's). */
function shapesOf(c, got) {
  const a = c.args;
  const expect =
    c.op === 'quantizeKCache'
      ? null
      : c.op === 'dequantizeKCachePaged'
        ? { out: [a.tokenIds.length ?? a.tokenIds.shape[0], a.cache.format === 'v4' ? 512 : 576] }
        : { out: [a.q.shape[0], a.q.shape[1], 512], lse: [a.q.shape[0], a.q.shape[1]], ...(c.op === 'sparsePrefill' ? { maxLogits: [a.q.shape[0], a.q.shape[1]] } : {}) };
  if (expect === null) return got === undefined ? null : `resolved with ${typeof got}, expected undefined`;
  for (const [k, shape] of Object.entries(expect)) {
    const t = k === 'out' && c.op === 'dequantizeKCachePaged' ? got : got?.[k];
    if (!t || JSON.stringify(t.shape) !== JSON.stringify(shape) || t.data.length !== shape.reduce((x, y) => x * y, 1)) return `${k}: got ${JSON.stringify(t?.shape)} (${t?.data?.length} elements), expected ${JSON.stringify(shape)}`;
  }
  return null;
}

/** The session-61 targets with their weights (fuzz.mjs SIDE4_TARGETS). */
export const RACE_TARGETS = [[opRace, 1]];
