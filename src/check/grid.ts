/**
 * The correctness grid a backend is checked on, shippable so a GPU host with only Node and the
 * built package can run it (`sparse-mla check --backend cuda`). The CPU test suites import it too
 * (test/sparse_prefill.test.ts builds its grid from prefillCases/buildPrefillCase; test/helpers/
 * random.ts re-exports the RNG and input generators), so CPU tests and `check` run the same cases
 * and the same random streams for a seed: FlashMLA's (sKV, topk) pairs × hQ × dQK, sinks with ±inf,
 * topkLength with 0 and over-long values, invalid fillers, duplicates, all-invalid rows, int64
 * indices, sQ = 0; paged main + extra sets (one with NaN and large-scale cache bytes); dequant
 * v4 / v32; three data regimes (DATA_REGIMES).
 * Fresh random inputs from a logged seed. It holds the one RNG every generator draws from; the
 * chunks of the planner and layer cases are chunks.ts's.
 */
import { tensor } from '../tensor.js';
import type { KvCache, PagedSparseAttentionArgs, SparsePrefillArgs, Tensor } from '../types.js';
import { tokenLayoutReference } from '../reference/kv_cache.js';

export interface Rng {
  readonly seed: number;
  /** uniform uint32 */
  u32(): number;
  /** uniform in [0, 1) */
  uniform(): number;
  /** standard normal */
  normal(): number;
  /** integer in [lo, hi) */
  int(lo: number, hi: number): number;
  pick<T>(items: readonly T[]): T;
}

/** mulberry32: small, fast, good enough for test data; the same stream for a seed everywhere. */
export function makeRng(seed: number): Rng {
  let a = seed >>> 0;
  const u32 = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const uniform = (): number => u32() / 4294967296;
  return {
    seed,
    u32,
    uniform,
    normal: () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform()),
    int: (lo, hi) => lo + Math.floor(uniform() * (hi - lo)),
    pick: (items) => items[Math.floor(uniform() * items.length)]!,
  };
}

// The inputs' rounding is written here, not taken from the library under test.

/** float32 bits → bf16 bits, round to nearest even; a NaN stays a (quiet) NaN. */
function float32BitsToBf16(u: number): number {
  if ((u & 0x7fffffff) > 0x7f800000) return (u >>> 16) | 0x40;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

const f32 = new Float32Array(1);
const f32Bits = new Uint32Array(f32.buffer);

/** x rounded to float32, then to bf16 bits (round to nearest even both times). */
function bf16Bits(x: number): number {
  f32[0] = x;
  return float32BitsToBf16(f32Bits[0]!);
}

/** bf16 bits of n normal(mean, std) samples. */
export function randomBf16Bits(rng: Rng, n: number, std = 1, mean = 0): Uint16Array {
  const d = new Uint16Array(n);
  for (let i = 0; i < n; i++) d[i] = bf16Bits(rng.normal() * std + mean);
  return d;
}

export function randomBf16(rng: Rng, shape: number[], std = 1, mean = 0): Tensor<'bf16'> {
  return tensor('bf16', shape, randomBf16Bits(rng, shape.reduce((a, b) => a * b, 1), std, mean));
}

/**
 * bf16 bits of n values uniform in [−a, a): the bulk generator for inputs of millions of elements
 * (two 16-bit uniforms per draw, plenty for an 8-bit mantissa; no NaN by construction).
 */
export function uniformBf16Bits(rng: Rng, n: number, a: number): Uint16Array {
  const out = new Uint16Array(n);
  const chunk = new Float32Array(4096); // even, so the pairs never straddle chunks
  const bits = new Uint32Array(chunk.buffer);
  const scale = (2 * a) / 65536;
  for (let start = 0; start < n; start += chunk.length) {
    const m = Math.min(chunk.length, n - start);
    for (let i = 0; i < m; i += 2) {
      const u = rng.u32();
      chunk[i] = (u & 0xffff) * scale - a;
      chunk[i + 1] = (u >>> 16) * scale - a;
    }
    for (let i = 0; i < m; i++) out[start + i] = float32BitsToBf16(bits[i]!);
  }
  return out;
}

/**
 * bf16 bits of n v4 cache rows [n, 512]: each 64-dim nope tile of its own magnitude 2^−3 … 2^1
 * (so the tiles' ue8m0 scales differ), the 64 rope dims in [−1, 1).
 */
export function randomV4Rows(rng: Rng, n: number): Uint16Array {
  const rows = new Uint16Array(n * 512);
  for (let r = 0; r < n; r++) {
    for (let tile = 0; tile < 8; tile++) {
      const mag = tile < 7 ? 2 ** (rng.int(0, 5) - 3) : 1;
      for (let d = 0; d < 64; d++) rows[r * 512 + tile * 64 + d] = bf16Bits((2 * rng.uniform() - 1) * mag);
    }
  }
  return rows;
}

// ---- data regimes ---------------------------------------------------------------------------------

/**
 * The value regimes the accuracy bounds are checked in (SPEC §4):
 * - `unit`: q and kv normal(0, 1), smScale 1/√dQK: logits of order 1, a peaked softmax;
 * - `flashmla`: FlashMLA's own test data, normal(0, 0.1) plus one small common offset in
 *   [−0.05, 0.05] on q and kv: near-uniform weights, each out element a mean of many values;
 * - `cancel`: q = 0.5 + normal(0, 0.1), kv = c + normal(0, 0.1), with c putting every logit near
 *   −ln(entries), so lse = maxLogits + ln Σ cancels to about 0 while |maxLogits| is several units.
 */
export const DATA_REGIMES = ['unit', 'flashmla', 'cancel'] as const;
export type DataRegime = (typeof DATA_REGIMES)[number];

/** Normal parameters of q and kv (or cache rows) and the softmax scale of a regime. */
export interface RegimeValues {
  regime: DataRegime;
  std: number;
  qMean: number;
  kvMean: number;
  smScale: number;
}

/**
 * A regime's values for head dim dQK and about `entries` attended entries per query (the cancel
 * regime aims the logits at −ln(entries)). `unit` draws nothing from rng.
 */
export function regimeValues(rng: Rng, regime: DataRegime, dQK: number, entries: number): RegimeValues {
  const smScale = 1 / Math.sqrt(dQK);
  if (regime === 'unit') return { regime, std: 1, qMean: 0, kvMean: 0, smScale };
  if (regime === 'flashmla') {
    const offset = (rng.uniform() - 0.5) / 10;
    return { regime, std: 0.1, qMean: offset, kvMean: offset, smScale };
  }
  // logit ≈ smScale · dQK · qMean · kvMean = −ln(entries)
  const qMean = 0.5;
  return { regime, std: 0.1, qMean, kvMean: -Math.log(Math.max(1, entries)) / (smScale * dQK * qMean), smScale };
}

/** The invalid index fillers of SPEC §4's test grid for a KV length sKV. */
export function invalidFillers(sKV: number): number[] {
  return [-(2 ** 31), -123456, -1, sKV, 2 ** 31 - 1];
}

/**
 * [rows, topk] int32 indices: distinct valid rows (a partial shuffle while k < bound) with invalid
 * fillers and duplicates mixed in; `allInvalidRows` get only fillers.
 */
export function randomIndices(rng: Rng, rows: number, topk: number, bound: number, invalidFraction = 0, duplicateFraction = 0, allInvalidRows: readonly number[] = []): Int32Array {
  const fillers = invalidFillers(bound);
  const out = new Int32Array(rows * topk);
  const allInvalid = new Set(allInvalidRows);
  for (let i = 0; i < rows; i++) {
    const row = out.subarray(i * topk, (i + 1) * topk);
    const pool = Array.from({ length: bound }, (_, j) => j);
    for (let k = 0; k < topk; k++) {
      if (k < bound) {
        const j = k + rng.int(0, bound - k);
        [pool[k], pool[j]] = [pool[j]!, pool[k]!];
        row[k] = pool[k]!;
      } else {
        row[k] = bound > 0 ? rng.int(0, bound) : -1;
      }
      if (k > 0 && rng.uniform() < duplicateFraction) row[k] = row[rng.int(0, k)]!;
      if (allInvalid.has(i) || rng.uniform() < invalidFraction) row[k] = rng.pick(fillers);
    }
  }
  return out;
}

/** Spread `count` query rows over [0, n), always including the first and last. */
export function sampleRows(rng: Rng, n: number, count: number): number[] {
  if (count >= n) return Array.from({ length: n }, (_, i) => i);
  const set = new Set<number>([0, n - 1]);
  while (set.size < count) set.add(rng.int(0, n));
  return [...set].sort((a, b) => a - b);
}

// ---- sparse prefill -----------------------------------------------------------------------------

export const PREFILL_PAIRS: readonly [number, number][] = [[128, 128], [592, 128], [1840, 256], [1521, 512], [95, 128], [114, 384]];
export const PREFILL_HEADS = [1, 16, 64, 128] as const;
export const PREFILL_DQKS = [512, 576] as const;
export const PREFILL_SQS = [1, 62, 213] as const;

export interface PrefillCase {
  name: string;
  regime: DataRegime;
  sKV: number;
  topk: number;
  hQ: number;
  dQK: number;
  sQ: number;
  sink: 'none' | 'finite' | 'with-inf';
  lengths: 'none' | 'random' | 'with-zero-and-over';
  int64: boolean;
  threeD: boolean;
  allInvalidRow: boolean;
}

/**
 * Every (sKV, topk) × hQ × dQK; sQ, the data regime and the features rotate (each regime meets
 * every pair, hQ, dQK and sink kind); sQ capped by `flopCap` per case.
 */
export function prefillCases(flopCap = 1.2e10): PrefillCase[] {
  const cases: PrefillCase[] = [];
  let c = 0;
  for (const [sKV, topk] of PREFILL_PAIRS) {
    for (const hQ of PREFILL_HEADS) for (const dQK of PREFILL_DQKS) {
      let s = (c * 2 + 1 + Math.floor(c / 3)) % PREFILL_SQS.length;
      while (s > 0 && 2 * PREFILL_SQS[s]! * topk * hQ * (dQK + 512) > flopCap) s--;
      const sQ = PREFILL_SQS[s]!;
      const sink = (['none', 'finite', 'with-inf'] as const)[c % 3]!;
      const lengths = (['none', 'random', 'with-zero-and-over', 'none'] as const)[c % 4]!;
      const int64 = c % 5 === 4, threeD = c % 6 === 5, allInvalidRow = c % 2 === 0 && sQ > 1;
      const regime = DATA_REGIMES[Math.floor(c / 2) % DATA_REGIMES.length]!;
      const tags = [sink !== 'none' ? `sink:${sink}` : '', lengths !== 'none' ? `topkLength:${lengths}` : '', int64 ? 'int64' : '', threeD ? '[sQ,1,topk]' : '', allInvalidRow ? 'all-invalid row' : ''].filter(Boolean).join(' ');
      cases.push({ name: `prefill ${regime} sKV=${sKV} topk=${topk} hQ=${hQ} dQK=${dQK} sQ=${sQ} ${tags}`.trim(), regime, sKV, topk, hQ, dQK, sQ, sink, lengths, int64, threeD, allInvalidRow });
      c++;
    }
  }
  return cases;
}

/** Inputs of a case and the query rows the float64 reference checks (sampled to `refFlopCap`). */
export function buildPrefillCase(g: PrefillCase, r: Rng, refFlopCap = 4e8): { args: SparsePrefillArgs; queries: number[] } {
  const { sKV, topk, hQ, dQK, sQ } = g;
  const allInvalidRows = g.allInvalidRow ? [r.int(0, sQ)] : [];
  const idx32 = randomIndices(r, sQ, topk, sKV, 0.15, 0.05, allInvalidRows);
  const shape = g.threeD ? [sQ, 1, topk] : [sQ, topk];
  let indices: Tensor<'int32'> | Tensor<'int64'>;
  if (g.int64) {
    const wide = [2n ** 31n, 2n ** 32n, 2n ** 32n + 5n, -(2n ** 32n) + 3n, 2n ** 40n, -(2n ** 63n), 2n ** 63n - 1n];
    const d = BigInt64Array.from(idx32, (v) => BigInt(v));
    for (let i = 0; i < d.length; i++) if (r.uniform() < 0.1) d[i] = r.pick(wide);
    indices = tensor('int64', shape, d);
  } else {
    indices = tensor('int32', shape, idx32);
  }
  const v = regimeValues(r, g.regime, dQK, Math.min(topk, sKV));
  const args: SparsePrefillArgs = { q: randomBf16(r, [sQ, hQ, dQK], v.std, v.qMean), kv: randomBf16(r, [sKV, dQK], v.std, v.kvMean), indices, smScale: v.smScale };
  if (g.sink !== 'none') {
    const s = Float32Array.from({ length: hQ }, () => r.normal() * 2);
    if (g.sink === 'with-inf') {
      s[0] = r.uniform() < 0.5 || hQ === 1 ? Infinity : -Infinity;
      if (hQ > 1) s[hQ - 1] = -s[0]!;
    }
    args.attnSink = tensor('float32', [hQ], s);
  }
  if (g.lengths !== 'none') {
    const l = Int32Array.from({ length: sQ }, () => r.int(0, topk + 1));
    if (g.lengths === 'with-zero-and-over') {
      l[0] = 0;
      if (sQ > 1) l[sQ - 1] = topk + 1000;
    }
    args.topkLength = tensor('int32', [sQ], l);
  }
  const perQuery = 2 * topk * hQ * (dQK + 512);
  const nRef = Math.max(2, Math.min(sQ, Math.floor(refFlopCap / perQuery)));
  const queries = new Set(sampleRows(r, sQ, nRef));
  for (const q of allInvalidRows) queries.add(q);
  return { args, queries: [...queries].sort((a, b) => a - b) };
}

// ---- paged ----------------------------------------------------------------------------------------

export interface PagedCase {
  name: string;
  regime: DataRegime;
  n: number;
  hQ: number;
  pageSize: number;
  numPages: number;
  topk: number;
  /** extra set (compressed entries) in its own cache, or null */
  extra: { pageSize: number; numPages: number; topk: number } | null;
  sink: boolean;
  lengths: boolean;
  /** a few tokens of the built caches get NaN and large-scale bytes (pokeNonFiniteTokens) */
  nonFinite?: boolean;
}

export function pagedCases(): PagedCase[] {
  return [
    { name: 'paged unit main only hQ=64 P=64 topk=128', regime: 'unit', n: 24, hQ: 64, pageSize: 64, numPages: 6, topk: 128, extra: null, sink: false, lengths: false },
    { name: 'paged flashmla main+extra hQ=64 P=64/2 topk=128+512 sink lengths', regime: 'flashmla', n: 17, hQ: 64, pageSize: 64, numPages: 4, topk: 128, extra: { pageSize: 2, numPages: 400, topk: 512 }, sink: true, lengths: true },
    { name: 'paged cancel main+extra hQ=128 P=256/64 topk=128+1024 sink', regime: 'cancel', n: 9, hQ: 128, pageSize: 256, numPages: 2, topk: 128, extra: { pageSize: 64, numPages: 20, topk: 1024 }, sink: true, lengths: false },
    { name: 'paged cancel main+extra hQ=16 P=2/64 topk=64+100 lengths', regime: 'cancel', n: 31, hQ: 16, pageSize: 2, numPages: 90, topk: 64, extra: { pageSize: 64, numPages: 3, topk: 100 }, sink: false, lengths: true },
    { name: 'paged unit hQ=1 P=64 topk=200 sink', regime: 'unit', n: 40, hQ: 1, pageSize: 64, numPages: 5, topk: 200, extra: null, sink: true, lengths: true },
    { name: 'paged unit NaN/large-scale cache bytes main+extra hQ=64 P=64/2 topk=128+64 lengths', regime: 'unit', n: 16, hQ: 64, pageSize: 64, numPages: 4, topk: 128, extra: { pageSize: 2, numPages: 64, topk: 64 }, sink: false, lengths: true, nonFinite: true },
  ];
}

/** What pokeNonFiniteTokens did to a paged case, and what the reference must show for it. */
export interface NonFinitePlan {
  /** rows that attend a NaN token: out, lse and maxLogits NaN on every head */
  nanRows: number[];
  /** every other row: no NaN anywhere */
  finiteRows: number[];
  /** finite rows that attend a large-scale token (whose 2^73 tile puts |out| > 2^60 where its weight is 1) */
  largeRows: number[];
  /** finite rows with a NaN token beyond their topkLength (never read) */
  beyondRows: number[];
  /** the poked tokens, for a failure message */
  tokens: string[];
}

/**
 * SPEC §2 / §9: NaN in a cache propagates by the math; ue8m0 bytes up to 254 are finite scales.
 * Pokes bytes into a few tokens of the paged case's caches, after they were quantized and before
 * anyone reads them (the backend, WASM and the reference all see the poked bytes):
 * - NaN tokens: token 0 of both caches (a kernel that reads an invalid entry as token 0 and masks
 *   it by a zero weight gets 0 · NaN) and one more token each; between them an e4m3 NaN byte 0x7F
 *   and 0xFF in the nope data and a ue8m0 scale byte 0xFF (a NaN tile scale);
 * - large-scale tokens, one per cache: tile scale bytes 135, 142, 143 and 200 (2^8 … 2^73, finite;
 *   products beyond fp16's range from 135 on, the scale itself from 143 on). The 2^73 tile holds
 *   one spike (e4m3 256 … 448) among subnormal codes, so on every head the token's logit is that
 *   one exact product q·spike (~1e23) plus terms many orders smaller: no cancellation, so a float32
 *   dot product stays within lse's relative bound (a tile of 64 random products at 2^73 can cancel
 *   to 1e-3 of its terms, and a correct float32 kernel then misses the bound), and the weight is 0
 *   or 1 far beyond rounding. Where it is 1, out is that token's V, every tile at its own scale.
 * Then the index rows: every entry naming a poked token is made −1, and the poked tokens are placed
 * again by row (i mod 4): 3 → one NaN token inside the row's lengths (a NaN row); 0 → one
 * large-scale token (alternating main / extra); 2 → a NaN token beyond the row's topkLength, never
 * read; 1 → untouched. A length of 0 where a token must go
 * inside becomes the full topk. Draws the token ids and positions from rng.
 */
export function pokeNonFiniteTokens(args: PagedSparseAttentionArgs, rng: Rng): NonFinitePlan {
  const n = args.q.shape[0]!;
  interface PokedSet {
    name: string;
    cache: KvCache;
    idx: Int32Array;
    topk: number;
    len: Int32Array | null;
    nan: number[];
    large: number;
  }
  const sets: PokedSet[] = [];
  const tokens: string[] = [];
  const add = (name: string, cache: KvCache, indices: Tensor<'int32'>, lengths: Tensor<'int32'> | undefined): PokedSet => {
    const count = cache.pageSize * cache.numPages;
    if (count < 4) throw new RangeError(`pokeNonFiniteTokens: ${name} holds ${count} tokens, need 4`);
    const ids = new Set<number>([0]);
    while (ids.size < 3) ids.add(rng.int(1, count));
    const [, other, large] = [...ids] as [number, number, number];
    const set: PokedSet = { name, cache, idx: indices.data, topk: indices.shape[indices.shape.length - 1]!, len: lengths?.data ?? null, nan: [0, other], large };
    sets.push(set);
    return set;
  };
  const data = (set: PokedSet, id: number, dim: number, byte: number): void => {
    set.cache.data[tokenLayoutReference(set.cache, id).nope + dim] = byte;
    tokens.push(`${set.name} token ${id} nope dim ${dim} = 0x${byte.toString(16)}`);
  };
  const scales = (set: PokedSet, id: number, bytes: Record<number, number>): void => {
    const at = tokenLayoutReference(set.cache, id).scales;
    for (const [tile, byte] of Object.entries(bytes)) set.cache.data[at + Number(tile)] = byte;
    tokens.push(`${set.name} token ${id} scale bytes ${JSON.stringify(bytes)}`);
  };
  /** the large-scale token: the given tile scales, and its 2^73 tile one spike among tiny values */
  const large = (set: PokedSet, bytes: Record<number, number>, spikeTile: number): void => {
    scales(set, set.large, bytes);
    const at = tokenLayoutReference(set.cache, set.large).nope + spikeTile * 64;
    const spike = rng.int(0, 64);
    for (let d = 0; d < 64; d++) {
      const sign = rng.uniform() < 0.5 ? 0x80 : 0;
      // spike: 256 … 448 (e4m3 codes 0x70 … 0x7e); the rest subnormal 2^-9 … 7·2^-9
      set.cache.data[at + d] = sign | (d === spike ? rng.int(0x70, 0x7f) : rng.int(1, 8));
    }
    tokens.push(`${set.name} token ${set.large} spike at nope dim ${spikeTile * 64 + spike}`);
  };

  const main = add('main', args.kCache, args.indices, args.topkLength);
  data(main, 0, rng.int(0, 64), 0x7f);
  scales(main, main.nan[1]!, { [rng.int(0, 7)]: 0xff });
  large(main, { 0: 135, 1: 142, 2: 143, 5: 200 }, 5);
  if (args.extraKCache && args.extraIndices) {
    const extra = add('extra', args.extraKCache, args.extraIndices, args.extraTopkLength);
    scales(extra, 0, { [rng.int(0, 7)]: 0xff });
    data(extra, extra.nan[1]!, 448 - 64 + rng.int(0, 64), 0xff);
    large(extra, { 1: 200, 3: 135, 4: 143, 6: 142 }, 1);
  } else {
    // one cache: its second NaN token carries the 0xFF data byte as well
    data(main, main.nan[1]!, rng.int(0, 448), 0xff);
  }

  // no poked token anywhere but where it is placed below
  for (const s of sets) {
    const poked = new Set([...s.nan, s.large]);
    for (let e = 0; e < s.idx.length; e++) if (poked.has(s.idx[e]!)) s.idx[e] = -1;
  }
  const limit = (s: PokedSet, i: number): number => (s.len ? Math.min(Math.max(s.len[i]!, 0), s.topk) : s.topk);
  /** an entry of row i inside its lengths (a length of 0 becomes topk); -1 when topk is 0 */
  const inside = (s: PokedSet, i: number): number => {
    if (s.topk === 0) return -1;
    if (limit(s, i) === 0) s.len![i] = s.topk;
    return rng.int(0, limit(s, i));
  };
  const nanTokens = sets.flatMap((s) => s.nan.map((id) => ({ s, id })));
  const plan: NonFinitePlan = { nanRows: [], finiteRows: [], largeRows: [], beyondRows: [], tokens };
  let nanCount = 0, largeCount = 0;
  for (let i = 0; i < n; i++) {
    const role = i % 4;
    let nan = false;
    if (role === 3) {
      const { s, id } = nanTokens[nanCount++ % nanTokens.length]!;
      const k = inside(s, i);
      if (k >= 0) {
        s.idx[i * s.topk + k] = id;
        nan = true;
      }
    } else if (role === 0) {
      const s = sets[largeCount++ % sets.length]!;
      const k = inside(s, i);
      if (k >= 0) {
        s.idx[i * s.topk + k] = s.large;
        plan.largeRows.push(i);
      }
    } else if (role === 2) {
      let placed = false;
      for (const s of sets) {
        const lim = limit(s, i);
        if (lim < s.topk) {
          s.idx[i * s.topk + rng.int(lim, s.topk)] = s.nan[(i >> 2) % 2]!;
          placed = true;
        }
      }
      if (placed) plan.beyondRows.push(i);
    }
    (nan ? plan.nanRows : plan.finiteRows).push(i);
  }
  return plan;
}

/**
 * Throws unless the reference outputs (rows `queries`, hQ heads, dV columns) show the plan: every
 * head of a NaN row NaN in out, lse and maxLogits; no NaN in a finite row; some |out| > 2^60 in
 * the large-scale rows; and both kinds present, so the case can become neither all-finite nor all-NaN.
 */
export function expectNonFinitePlan(plan: NonFinitePlan, ref: { out: ArrayLike<number>; lse: ArrayLike<number>; maxLogits: ArrayLike<number> }, queries: readonly number[], hQ: number, dV: number): void {
  const fail = (what: string): never => {
    throw new Error(`non-finite case: ${what} (poked: ${plan.tokens.join('; ')})`);
  };
  const nanRows = new Set(plan.nanRows);
  const large = new Set(plan.largeRows);
  let nanSeen = 0, finiteSeen = 0, largeOut = 0;
  queries.forEach((i, j) => {
    const stats = [ref.lse, ref.maxLogits].flatMap((t) => Array.from({ length: hQ }, (_, h) => t[j * hQ + h]!));
    const out = Array.from({ length: hQ * dV }, (_, e) => ref.out[j * hQ * dV + e]!);
    if (nanRows.has(i)) {
      if (!stats.every(Number.isNaN) || !out.every(Number.isNaN)) fail(`row ${i} attends a NaN token, but the reference is not NaN on every head`);
      nanSeen++;
    } else {
      if (stats.some(Number.isNaN) || out.some(Number.isNaN)) fail(`row ${i} attends no NaN token, but the reference has NaN`);
      finiteSeen++;
      if (large.has(i)) largeOut = Math.max(largeOut, ...out.map(Math.abs));
    }
  });
  if (nanSeen === 0 || finiteSeen === 0) fail(`checked ${nanSeen} NaN rows and ${finiteSeen} finite rows; need both`);
  if (plan.largeRows.some((i) => queries.includes(i)) && !(largeOut > 2 ** 60)) fail(`largest |out| of the large-scale rows is ${largeOut}, not > 2^60`);
}
