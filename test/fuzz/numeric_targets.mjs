/**
 * numericEdges (session 58, from seed NUMERIC_FROM_SEED, every backend): valid sparsePrefill and
 * pagedSparseAttention calls whose values sit at the guards of the cpu core's AVX-512 bf16 dot
 * (cpp/src/sparse_attention_kernel.h: S = Q·Kᵀ through vdpbf16ps only for queries of 8 heads or more,
 * no bf16 subnormal in the query or the block's rows, |smScale| · dQK ≤ 2^80, since vdpbf16ps reads
 * subnormal inputs as 0 and flushes subnormal results). The other targets draw hQ 1-4 and values of
 * a normal distribution, so that path and its guards were reached by no case. Here hQ is 7, 8, 9,
 * 12, 16 or 17 (1-4 now and then, as a control), over dQK 64-576 and blocks of up to three kBlocks,
 * and each case takes one or two of:
 *
 * - qSub: bf16 subnormals in q at 1-4 dims (per query: in every head, in some heads, or none: zeros)
 *   where every KV row holds a value near 2^126 (paged: a rope dim, or a nope tile of scale 2^127),
 *   so each product is O(1): a kernel that reads the subnormal as 0 moves the logit by up to 2 per dim;
 * - kvSub: bf16 subnormals in some KV rows (one block's, not another's) at 1-4 dims, zero in the
 *   other rows, where q holds values near 2^126 (paged: a rope dim, or a nope tile of scale 2^-127);
 * - scale: smScale at the ends the ops take (±2^16 and an ulp below it; the ops refuse |smScale| > 2^16,
 *   MAX_SM_SCALE, so |smScale| · dQK ≤ 2^25.2 and the 2^80 guard holds for every call the API lets
 *   through), tiny (2^-126, float32 subnormals, 2^-149) or ±0, with q and kv scaled so that the logits
 *   stay O(1) where that keeps them finite;
 * - nonFinite: NaN or ±inf in q, in a KV row (a valid one or one no index reaches: never read), a
 *   nope tile's scale byte 0xff (NaN), or the sink.
 *
 * Values are kept where a float32 kernel can meet SPEC §4.1's bounds (no logit past 2^20, no dot
 * whose partial sums overflow). Judged as sparsePrefill's and pagedSparseAttention's targets judge:
 * against the float64 reference by SPEC §4.1's bounds, NaN and ±inf in the same places.
 */
import { createEngine, createKvCache, createPlan, prefillLayer, tensor } from '../../dist/index.js';
import { makeRng } from '../../dist/check/grid.js';
import * as R from '../../dist/reference/index.js';
import { withDotScales } from './regime.mjs';
import { fieldsByMemory, judgeAttention, judgeLayer, layerScenario } from './targets.mjs';

/** The first seed that draws numericEdges. */
export const NUMERIC_FROM_SEED = 221;

/**
 * The first seed whose numericEdges cases may be wide (one query row of 16-32 heads and 256-300 entries:
 * work enough for the cpu backend to split the row's heads into groups over its threads, 89be223), a
 * draw after the others so that earlier seeds build as they were run.
 */
export const WIDE_FROM_SEED = 226;

/**
 * The first seed whose wide cases may have no query row (15% of them): the cpu addon's head groups
 * divided by the row count (SIGFPE before bdc881b), a draw after the others.
 */
export const EMPTY_FROM_SEED = 232;

/**
 * The first seed whose wide cases on the cpu backend run on a fresh engine of 2-8 workers (the head
 * groups of rows 1-3 over up to 8 threads: their row offsets into q, the indices, the sink and the
 * outputs) and whose paged cases may carry the extra set (its own cache, edited as the main one).
 */
export const GROUPS_FROM_SEED = 233;

/** The first seed whose wide wasm cases run on a fresh engine of 2-4 workers (ce25a41: a row's heads in runs of 8-head blocks, a task a run). */
export const WASM_GROUPS_FROM_SEED = 241;

/** The seed of the case being built (the judge's rebuild gets hooks without one; as dir_targets.mjs does). */
let lastSeed = 0;

const D = 512;
const bf16 = (x) => R.encodeBf16(x);
const sign = (rng) => (rng.uniform() < 0.5 ? -1 : 1);
/** A bf16 subnormal's bits (random sign and fraction; mostly large fractions, whose products matter). */
const subnormalBits = (rng) => (rng.uniform() < 0.5 ? 0x8000 : 0) | (rng.uniform() < 0.7 ? rng.int(64, 128) : rng.int(1, 64));
/** A value near 2^e (times 1-2; e ≤ 126), as bf16 bits. */
const hugeBits = (rng, e = 126) => bf16(sign(rng) * 2 ** e * (1 + rng.uniform()));

/**
 * The exponent of the largest values a V dim may hold over `rows` rows: the kernels accumulate Σ p·v
 * with p ≤ 1 before they divide by Σ p (SPEC's out is the divided sum), so larger values overflow
 * float32 where the out is finite (reported: test/fuzz/README.md, session 58); dims past dV only
 * feed the logits and take 2^126.
 */
const vDimExponent = (rows) => 125 - Math.ceil(Math.log2(rows + 1));
const NON_FINITE = [0x7fc0, 0xffc0, 0x7f80, 0xff80, 0x7f81];

function normalBits(rng, n, scale) {
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = bf16(rng.normal() * scale);
  return out;
}

function someDims(rng, lo, hi) {
  return Array.from({ length: rng.int(1, 5) }, () => rng.int(lo, hi));
}

/** Index rows mostly valid (duplicates allowed), a few −1 / past the end / 2^31 − 1 (skipped, never read). */
function indexRows(rng, rows, topk, bound) {
  const out = new Int32Array(rows * topk);
  for (let i = 0; i < out.length; i++) out[i] = rng.uniform() < 0.1 ? rng.pick([-1, bound, 2 ** 31 - 1]) : rng.int(0, bound);
  return out;
}

/** The valid entries' rows of each index row (in order), as the kernel gathers them. */
function validRows(idx, rows, topk, bound, lengths) {
  return Array.from({ length: rows }, (_, i) => {
    const lim = lengths ? Math.max(0, Math.min(topk, lengths[i])) : topk;
    const out = [];
    for (let k = 0; k < lim; k++) {
      const v = idx[i * topk + k];
      if (v >= 0 && v < bound) out.push(v);
    }
    return out;
  });
}

/** q's values at dims `dims` for every query and head: per query all subnormal, a mix of subnormals and zeros, or zeros. */
function subnormalQ(rng, q, sQ, hQ, dQK, dims) {
  for (let i = 0; i < sQ; i++) {
    const mode = rng.pick(['all', 'all', 'some', 'zero']);
    for (let h = 0; h < hQ; h++) {
      const sub = mode === 'all' || (mode === 'some' && rng.uniform() < 0.5);
      for (const d of dims) q[(i * hQ + h) * dQK + d] = sub ? subnormalBits(rng) : rng.pick([0, 0x8000]);
    }
  }
}

function sinkOf(rng, hQ, nonFinite) {
  const s = new Float32Array(hQ).map(() => rng.normal());
  if (nonFinite) for (let n = rng.int(1, 3), i = 0; i < n; i++) s[rng.int(0, hQ)] = rng.pick([NaN, Infinity, -Infinity]);
  return s;
}

/**
 * smScale at the ends the ops take (|smScale| ≤ 2^16, MAX_SM_SCALE: so |smScale| · dQK stays far below
 * the bf16 dot's 2^80 guard), or tiny, or zero, and the value scale that keeps the logits O(1) where
 * that is a value of normal products.
 */
function scaleEdge(rng, dQK) {
  const smScale = sign(rng) * rng.pick([2 ** 16, Math.fround(2 ** 16 * (1 - 2 ** -24)), 2 ** 15 + 1, 2 ** -126, 1e-40, 2 ** -149, 0]);
  const value = smScale === 0 ? 1 : Math.min(2 ** 50, Math.sqrt(4 / (Math.abs(smScale) * Math.sqrt(dQK))));
  return { smScale, value, desc: `smScale ${smScale}, values of ${value.toPrecision(3)}` };
}

function sparsePrefillCase(rng, hooks, hQ, kinds, wide, empty, wideRows = 1, big = false) {
  const sQ = empty ? 0 : wide ? wideRows : rng.int(1, 4);
  const dQK = rng.pick([512, 576, 576, 64, 128]);
  const dV = dQK < 512 ? 64 * rng.int(1, dQK / 64 + 1) : 512;
  const sKV = big ? rng.pick([700, 900]) : wide ? rng.pick([260, 400]) : rng.pick([1, 31, 33, 64, 90]);
  const topk = big ? rng.pick([600, 700]) : wide ? rng.pick([256, 300]) : rng.pick([1, 8, 32, 33, 70, 96]);
  let smScale = rng.pick([1 / Math.sqrt(dQK), 0.25]);
  let qScale = 1, kvScale = 1;
  const notes = [];
  if (kinds.includes('scale')) {
    const s = scaleEdge(rng, dQK);
    ({ smScale } = s);
    qScale = kvScale = s.value;
    notes.push(s.desc);
  }
  const q = normalBits(rng, sQ * hQ * dQK, qScale);
  const kv = normalBits(rng, sKV * dQK, kvScale);
  const idx = indexRows(rng, sQ, topk, sKV);
  const lengths = rng.uniform() < 0.3 ? Int32Array.from({ length: sQ }, () => rng.int(0, topk + 2)) : undefined;
  if (kinds.includes('qSub')) {
    // mostly dims past dV where there are some (they feed the logits only)
    const dims = dQK > dV && rng.uniform() < 0.7 ? someDims(rng, dV, dQK) : someDims(rng, 0, dQK);
    for (let r = 0; r < sKV; r++) for (const d of dims) kv[r * dQK + d] = hugeBits(rng, d < dV ? vDimExponent(topk) : 126);
    subnormalQ(rng, q, sQ, hQ, dQK, dims);
    notes.push(`q subnormal × kv 2^126 at dims ${dims.join(',')}`);
  }
  if (kinds.includes('kvSub')) {
    const dims = someDims(rng, 0, dQK);
    // rows of one block's entries of a query (the kernel's blocks are of valid entries, in order): some rows subnormal, the rest 0
    const rowsOfQuery = sQ > 0 ? validRows(idx, sQ, topk, sKV, lengths)[rng.int(0, sQ)] : [];
    const subRows = new Set(rowsOfQuery.length > 0 ? Array.from({ length: rng.int(1, 3) }, () => rng.pick(rowsOfQuery)) : []);
    if (rng.uniform() < 0.3) subRows.add(rng.int(0, sKV));
    for (let r = 0; r < sKV; r++) for (const d of dims) kv[r * dQK + d] = subRows.has(r) ? subnormalBits(rng) : rng.pick([0, 0x8000]);
    for (let i = 0; i < sQ * hQ; i++) for (const d of dims) q[i * dQK + d] = hugeBits(rng);
    notes.push(`kv rows ${[...subRows].join(',')} subnormal × q 2^126 at dims ${dims.join(',')}`);
  }
  const nonFinite = kinds.includes('nonFinite') ? rng.pick(['q', 'kv', 'kvUnread', 'sink']) : undefined;
  if (nonFinite === 'q') for (let n = rng.int(1, 3), i = 0; i < n; i++) q[rng.int(0, q.length)] = rng.pick(NON_FINITE);
  if (nonFinite === 'kv' || nonFinite === 'kvUnread') {
    const read = new Set(validRows(idx, sQ, topk, sKV, lengths).flat());
    const rows = nonFinite === 'kv' ? [...read] : Array.from({ length: sKV }, (_, r) => r).filter((r) => !read.has(r));
    if (rows.length > 0) for (let n = rng.int(1, 3), i = 0; i < n; i++) kv[rng.pick(rows) * dQK + rng.int(0, dQK)] = rng.pick(NON_FINITE);
  }
  if (nonFinite) notes.push(`non-finite in ${nonFinite}`);
  const a = {
    q: tensor('bf16', [sQ, hQ, dQK], hooks.track(q)),
    kv: tensor('bf16', [sKV, dQK], hooks.track(kv)),
    indices: tensor('int32', [sQ, topk], hooks.track(idx)),
    smScale,
  };
  if (dV !== 512 || rng.uniform() < 0.3) a.dV = dV;
  if (nonFinite === 'sink' || rng.uniform() < 0.5) a.attnSink = tensor('float32', [hQ], hooks.track(sinkOf(rng, hQ, nonFinite === 'sink')));
  if (lengths) a.topkLength = tensor('int32', [sQ], hooks.track(lengths));
  return { a, notes, rows: sQ, dV, shape: `sQ ${sQ} hQ ${hQ} dQK ${dQK} dV ${dV} sKV ${sKV} topk ${topk}` };
}

/** A v4 cache of random rows of `scale` (SPEC's quantization), its layout per token. */
function v4Cache(rng, pageSize, numPages, scale) {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const rows = tensor('bf16', [n, D], normalBits(rng, n * D, scale));
  R.quantizeKCacheReference(cache, Array.from({ length: n }, (_, i) => i), rows);
  const layout = (t) => R.tokenLayoutReference(cache, t);
  return { cache, n, layout };
}

/** An e4m3 code of |value| < 2 (exponent field 0-7) with a random sign and mantissa. */
const smallE4m3 = (rng) => (rng.uniform() < 0.5 ? 0x80 : 0) | (rng.int(0, 8) << 3) | rng.int(0, 8);

function pagedCase(rng, hooks, hQ, kinds, wide, empty, wideRows = 1, big = false) {
  const n = empty ? 0 : wide ? wideRows : rng.int(1, 4);
  // the edits of every token of the main cache, applied to an extra cache too (addExtra)
  const edits = [];
  const pageSize = rng.pick([1, 16, 64]);
  const numPages = Math.max(1, Math.ceil((big ? rng.int(700, 900) : wide ? rng.int(260, 400) : rng.int(20, 100)) / pageSize));
  const notes = [];
  let smScale = rng.pick([1 / Math.sqrt(576), 0.25]);
  let qScale = 1, kvScale = rng.pick([1, 1e-3]);
  if (kinds.includes('scale')) {
    const s = scaleEdge(rng, D);
    ({ smScale } = s);
    // the cache's values are what quantization makes of rows of this scale (it holds nothing below
    // about 2^-31: a tile's scale is at least 2^-22), q takes the rest of the product
    kvScale = rng.pick([1, 2 ** -10]);
    qScale = (s.value * s.value) / kvScale;
    notes.push(s.desc);
  }
  const { cache, n: tokens, layout } = v4Cache(rng, pageSize, numPages, kvScale);
  const bytes = cache.data;
  const ropeView = (t) => new Uint16Array(bytes.buffer, bytes.byteOffset + layout(t).rope, 64);
  const q = normalBits(rng, n * hQ * D, qScale);
  const topk = big ? rng.pick([600, 700]) : wide ? rng.pick([256, 300]) : rng.pick([1, 9, 32, 40, 70]);
  const idx = indexRows(rng, n, topk, tokens);
  const lengths = rng.uniform() < 0.3 ? Int32Array.from({ length: n }, () => rng.int(0, topk + 2)) : undefined;
  if (kinds.includes('qSub')) {
    if (rng.uniform() < 0.5) {
      const dims = someDims(rng, 448, 512);
      const e = vDimExponent(topk);
      for (let t = 0; t < tokens; t++) for (const d of dims) ropeView(t)[d - 448] = hugeBits(rng, e);
      edits.push({ rope: dims, huge: e });
      subnormalQ(rng, q, n, hQ, D, dims);
      notes.push(`q subnormal × rope 2^${e} at dims ${dims.join(',')}`);
    } else {
      // a nope tile of a huge scale in every token, codes below 2: values up to 1.9 · 2^(e + 1)
      const tile = rng.int(0, 7), e = vDimExponent(topk);
      for (let t = 0; t < tokens; t++) {
        const at = layout(t);
        bytes[at.scales + tile] = 127 + e;
        for (let j = 0; j < 64; j++) bytes[at.nope + tile * 64 + j] = smallE4m3(rng);
      }
      edits.push({ tile, huge: 127 + e });
      const dims = Array.from({ length: 64 }, (_, j) => tile * 64 + j);
      subnormalQ(rng, q, n, hQ, D, dims);
      notes.push(`q subnormal × nope tile ${tile} of scale 2^${e}`);
    }
  }
  if (kinds.includes('kvSub')) {
    const rowsOfQuery = n > 0 ? validRows(idx, n, topk, tokens, lengths)[rng.int(0, n)] : [];
    const subRows = new Set(rowsOfQuery.length > 0 ? Array.from({ length: rng.int(1, 3) }, () => rng.pick(rowsOfQuery)) : []);
    if (rng.uniform() < 0.5) {
      const dims = someDims(rng, 448, 512);
      for (let t = 0; t < tokens; t++) for (const d of dims) ropeView(t)[d - 448] = subRows.has(t) ? subnormalBits(rng) : rng.pick([0, 0x8000]);
      edits.push({ rope: dims });
      for (let i = 0; i < n * hQ; i++) for (const d of dims) q[i * D + d] = hugeBits(rng);
      notes.push(`rope of tokens ${[...subRows].join(',')} subnormal × q 2^126 at dims ${dims.join(',')}`);
    } else {
      // a nope tile of scale 2^-127 (codes below 2: bf16 subnormals) in some tokens, codes 0 in the others
      const tile = rng.int(0, 7);
      for (let t = 0; t < tokens; t++) {
        const at = layout(t);
        if (subRows.has(t)) bytes[at.scales + tile] = rng.int(0, 2);
        for (let j = 0; j < 64; j++) bytes[at.nope + tile * 64 + j] = subRows.has(t) ? smallE4m3(rng) : rng.pick([0, 0x80]);
      }
      edits.push({ tile });
      for (let i = 0; i < n * hQ; i++) for (let j = 0; j < 64; j++) q[i * D + tile * 64 + j] = hugeBits(rng);
      notes.push(`nope tile ${tile} of scale 2^-127 in tokens ${[...subRows].join(',')} × q 2^126`);
    }
  }
  const nonFinite = kinds.includes('nonFinite') ? rng.pick(['q', 'rope', 'ropeUnread', 'scaleNaN', 'sink']) : undefined;
  if (nonFinite === 'q') for (let k = rng.int(1, 3), i = 0; i < k; i++) q[rng.int(0, q.length)] = rng.pick(NON_FINITE);
  if (nonFinite === 'rope' || nonFinite === 'ropeUnread' || nonFinite === 'scaleNaN') {
    const read = new Set(validRows(idx, n, topk, tokens, lengths).flat());
    const rows = nonFinite === 'ropeUnread' ? Array.from({ length: tokens }, (_, t) => t).filter((t) => !read.has(t)) : [...read];
    if (rows.length > 0) {
      const t = rng.pick(rows);
      if (nonFinite === 'scaleNaN') bytes[layout(t).scales + rng.int(0, 7)] = 0xff;
      else ropeView(t)[rng.int(0, 64)] = rng.pick(NON_FINITE);
    }
  }
  if (nonFinite) notes.push(`non-finite in ${nonFinite}`);
  hooks.track(bytes);
  const a = {
    q: tensor('bf16', [n, hQ, D], hooks.track(q)),
    kCache: cache,
    indices: tensor('int32', [n, topk], hooks.track(idx)),
    smScale,
  };
  if (nonFinite === 'sink' || rng.uniform() < 0.5) a.attnSink = tensor('float32', [hQ], hooks.track(sinkOf(rng, hQ, nonFinite === 'sink')));
  if (lengths) a.topkLength = tensor('int32', [n], hooks.track(lengths));
  /**
   * The extra set (GROUPS_FROM_SEED), from a stream of its own: a cache of its own page size edited as
   * the main one (values near 2^e where q is subnormal; zeros, some tokens subnormal, where q is huge),
   * up to topk ids (so the V sums stay finite), topkLength or not.
   */
  const addExtra = (xr) => {
    const ePage = xr.pick([1, 4, 64]);
    const extra = v4Cache(xr, ePage, Math.max(1, Math.ceil(xr.int(1, 80) / ePage)), kvScale);
    const eb = extra.cache.data;
    for (let t = 0; t < extra.n; t++) {
      const at = extra.layout(t), rope = new Uint16Array(eb.buffer, eb.byteOffset + at.rope, 64), sub = xr.uniform() < 0.1;
      for (const ed of edits) {
        if (ed.rope) for (const d of ed.rope) rope[d - 448] = ed.huge ? hugeBits(xr, ed.huge) : sub ? subnormalBits(xr) : 0;
        else {
          if (ed.huge || sub) eb[at.scales + ed.tile] = ed.huge ?? xr.int(0, 2);
          for (let j = 0; j < 64; j++) eb[at.nope + ed.tile * 64 + j] = ed.huge || sub ? smallE4m3(xr) : 0;
        }
      }
    }
    const etopk = xr.int(0, Math.min(topk, 40) + 1);
    a.extraKCache = extra.cache;
    a.extraIndices = tensor('int32', [n, etopk], hooks.track(indexRows(xr, n, etopk, extra.n)));
    if (xr.uniform() < 0.4) a.extraTopkLength = tensor('int32', [n], hooks.track(Int32Array.from({ length: n }, () => xr.int(0, etopk + 2))));
    hooks.track(eb);
    notes.push(`extra set: ${extra.n} tokens, ${etopk} ids`);
  };
  return { a, notes, rows: n, dV: D, addExtra, shape: `n ${n} hQ ${hQ} pageSize ${pageSize} tokens ${tokens} topk ${topk}` };
}

/**
 * A layer (c0, c4 or c128; the workspace path, the paged one or the router's choice) of hQ heads whose
 * caches' rope dims hold the hostile values: every token's huge where q is subnormal (qSub), some
 * tokens' subnormal and the others' zero where q is huge (kvSub); or NaN / ±inf in q, a token's rope
 * or the sink.
 */
function layerCase(rng, hooks, hQ, kinds) {
  const ratio = rng.pick([0, 4, 128]);
  const { sc, layer, window } = layerScenario(rng, hooks, ratio);
  const nq = sc.numQueries;
  const q = normalBits(rng, nq * hQ * D, 1);
  const caches = Object.values(layer.caches);
  const eachToken = (f) => {
    for (const cache of caches) {
      const tokens = cache.pageSize * cache.numPages;
      for (let t = 0; t < tokens; t++) f(new Uint16Array(cache.data.buffer, cache.data.byteOffset + R.tokenLayoutReference(cache, t).rope, 64), t, tokens);
    }
  };
  const notes = [];
  if (kinds.includes('qSub')) {
    const dims = someDims(rng, 448, 512), e = vDimExponent(256);
    eachToken((rope) => {
      for (const d of dims) rope[d - 448] = hugeBits(rng, e);
    });
    subnormalQ(rng, q, nq, hQ, D, dims);
    notes.push(`q subnormal × rope 2^${e} at dims ${dims.join(',')}`);
  }
  if (kinds.includes('kvSub')) {
    const dims = someDims(rng, 448, 512), odds = rng.pick([0.02, 0.1, 0.5]);
    eachToken((rope) => {
      const sub = rng.uniform() < odds;
      for (const d of dims) rope[d - 448] = sub ? subnormalBits(rng) : rng.pick([0, 0x8000]);
    });
    for (let i = 0; i < nq * hQ; i++) for (const d of dims) q[i * D + d] = hugeBits(rng);
    notes.push(`rope of ${odds * 100}% of the tokens subnormal × q 2^126 at dims ${dims.join(',')}`);
  }
  const nonFinite = kinds.includes('nonFinite') ? rng.pick(['q', 'rope', 'sink']) : undefined;
  if (nonFinite === 'q' && q.length > 0) for (let k = rng.int(1, 3), i = 0; i < k; i++) q[rng.int(0, q.length)] = rng.pick(NON_FINITE);
  if (nonFinite === 'rope') {
    const cache = rng.pick(caches), tokens = cache.pageSize * cache.numPages;
    const rope = new Uint16Array(cache.data.buffer, cache.data.byteOffset + R.tokenLayoutReference(cache, rng.int(0, tokens)).rope, 64);
    rope[rng.int(0, 64)] = rng.pick(NON_FINITE);
  }
  if (nonFinite) notes.push(`non-finite in ${nonFinite}`);
  if (kinds.includes('scale')) {
    // the layer's smScale at the ends the ops take, q scaled to keep the logits O(1)
    const s = scaleEdge(rng, D);
    layer.smScale = s.smScale;
    const k = s.value * s.value;
    for (let i = 0; i < q.length; i++) if (Math.abs(R.decodeBf16(q[i])) < 2 ** 126) q[i] = bf16(R.decodeBf16(q[i]) * k);
    notes.push(s.desc);
  }
  layer.q = tensor('bf16', [nq, hQ, D], hooks.track(q));
  if (nonFinite === 'sink' || layer.attnSink) layer.attnSink = tensor('float32', [hQ], hooks.track(sinkOf(rng, hQ, nonFinite === 'sink')));
  layer.plan = createPlan(sc.chunk, { window });
  hooks.plans.push(layer.plan);
  return { sc, layer, notes, shape: `c${ratio} layer, ${nq} queries, hQ ${hQ}, path ${layer.path ?? 'routed'}` };
}

const numericEdges = {
  name: 'numericEdges',
  fromSeed: NUMERIC_FROM_SEED,
  engine: true,
  mostlyValid: true,
  build(rng, env, hooks) {
    const u = rng.uniform();
    const op = u < 0.45 ? 'sparsePrefill' : u < 0.75 ? 'pagedSparseAttention' : 'prefillLayer';
    let hQ = rng.uniform() < 0.1 ? rng.int(1, 5) : rng.pick([7, 8, 8, 9, 12, 16, 17]);
    const KINDS = ['qSub', 'kvSub', 'scale', 'nonFinite'];
    const kinds = [rng.pick(KINDS)];
    if (rng.uniform() < 0.4) {
      const second = rng.pick(KINDS);
      // qSub and kvSub set the same kind of dims from both sides: one of them a case
      if (!kinds.includes(second) && !(second === 'scale' && kinds[0] !== 'nonFinite') && !(kinds[0] === 'scale' && second !== 'nonFinite') && !(kinds[0].endsWith('Sub') && second.endsWith('Sub'))) kinds.push(second);
    }
    const seed = hooks.rng ? hooks.seed : lastSeed;
    if (hooks.rng) lastSeed = hooks.seed;
    const wide = seed >= WIDE_FROM_SEED && op !== 'prefillLayer' && rng.uniform() < 0.25;
    if (wide) hQ = rng.pick([16, 17, 24, 32]);
    const empty = wide && seed >= EMPTY_FROM_SEED && rng.uniform() < 0.15;
    // on the cpu backend, a fresh engine of 2-8 workers: rows 1-3 split by head groups over up to 8 threads
    // (on the wasm backend from WASM_GROUPS_FROM_SEED: fresh pools of 2-4 workers)
    const groupWorkers = !wide ? undefined : env.backend === 'cpu' && seed >= GROUPS_FROM_SEED ? rng.pick([2, 3, 4, 8]) : env.backend === 'wasm' && seed >= WASM_GROUPS_FROM_SEED ? rng.pick([2, 3, 4]) : undefined;
    const wideRows = groupWorkers > 2 ? rng.int(1, 4) : 1;
    // a wasm task is worth its copy of kv from 2e7 of work (MIN_TASK_WORK): rows of 24-64 heads over 600-700 entries
    const big = groupWorkers !== undefined && env.backend === 'wasm';
    if (big) hQ = rng.pick([24, 32, 64]);
    if (op === 'prefillLayer') {
      const { sc, layer, notes, shape } = layerCase(rng, hooks, hQ, kinds);
      const args = [env.engine, layer];
      if (rng.uniform() < 0.3) args.push({ output: 'host' });
      return {
        args,
        describe: `${shape}, smScale ${layer.smScale}: ${notes.join('; ') || 'plain values'}`,
        call: (x) => prefillLayer(...x),
        validOdds: 0.75,
        judge: (got, { refArgs, stub, neutral }) => (neutral ? judgeLayer(got, sc, refArgs[1], stub) : null),
      };
    }
    const made = op === 'sparsePrefill' ? sparsePrefillCase(rng, hooks, hQ, kinds, wide, empty, wideRows, big) : pagedCase(rng, hooks, hQ, kinds, wide, empty, wideRows, big);
    const args = [made.a];
    if (rng.uniform() < 0.3) args.push({ output: 'host' });
    if (op === 'pagedSparseAttention' && seed >= GROUPS_FROM_SEED && rng.uniform() < 0.4) made.addExtra(makeRng(rng.u32()));
    const fields = op === 'sparsePrefill' ? ['q', 'kv', 'indices', 'topkLength', 'attnSink'] : ['q', 'kCache', 'indices', 'topkLength', 'attnSink', 'extraKCache', 'extraIndices', 'extraTopkLength'];
    const reference = op === 'sparsePrefill' ? R.sparsePrefillReference : R.pagedSparseAttentionReference;
    return {
      args,
      describe: `${op} ${made.shape}${groupWorkers ? ` on a ${env.backend} engine of ${groupWorkers} workers` : ''}, smScale ${made.a.smScale}: ${made.notes.join('; ') || 'plain values'}`,
      call: groupWorkers
        ? async (x) => {
            const engine = await createEngine({ backend: env.backend, workers: groupWorkers });
            try {
              return await engine[op](...x);
            } finally {
              await engine.dispose();
            }
          }
        : (x) => env.engine[op](...x),
      // 3 cases in 4 as built: the values are the hostile part (fuzz.mjs validOdds)
      validOdds: 0.75,
      judge: (got, { refArgs, stub, neutral }) => {
        // a mutated call (smScale 511 over values scaled for 2^-126, say) may resolve with logits past what float32
        // holds: the other targets judge the mutations; here only the calls as built (or read once as built)
        if (!neutral) return null;
        const r = refArgs[0];
        return judgeAttention(got, () => withDotScales(op, reference, fieldsByMemory(r, fields)), r.q.shape[0], r.q.shape[1], r.dV ?? 512, stub);
      },
    };
  },
};

/** The targets of this file, with their weights. */
export const NUMERIC_TARGETS = [[numericEdges, 1]];
