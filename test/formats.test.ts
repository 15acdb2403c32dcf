/**
 * SPEC §2 formats through the engine. The core's codecs are only reachable through the cache ops,
 * so crafted cache bytes go through dequantize (decoders) and crafted rows through quantize
 * (encoders); every result is compared with the float64 reference codecs, and those with the
 * tensor helpers' float32 → bf16.
 */
import { describe, expect, test } from 'vitest';
import { createKvCache, float32ToBf16Bits, tensor } from '../dist/index.js';
import type { KvCache } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { randomFloat32Bits, type Rng } from './helpers/random.js';
import { opSuite } from './helpers/suite.js';

const suite = opSuite('formats.test');
const rng = suite.rng;

const ids = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

/** bf16 bits → float value. */
const bf16Value = (b: number): number => R.decodeBf16(b);

/** Values equal, NaN equal to NaN, +0 distinct from -0. */
function sameValue(a: number, b: number): boolean {
  return Number.isNaN(a) ? Number.isNaN(b) : Object.is(a, b);
}

function firstMismatch(got: ArrayLike<number>, want: ArrayLike<number>): number {
  for (let i = 0; i < want.length; i++) if (!sameValue(got[i]!, want[i]!)) return i;
  return -1;
}

describe('decoders through dequantize', () => {
  test('every e4m3 byte under every ue8m0 scale byte (v4): engine == reference', async () => {
    // token s: all seven tiles carry scale byte s; nope byte j is j mod 256 → every (e4m3, ue8m0) pair
    const cache = createKvCache('v4', { pageSize: 64, numPages: 4 });
    for (let s = 0; s < 256; s++) {
      const at = R.tokenLayoutReference(cache, s);
      for (let j = 0; j < 448; j++) cache.data[at.nope + j] = j & 0xff;
      for (let t = 0; t < 7; t++) cache.data[at.scales + t] = s;
      const dv = new DataView(cache.data.buffer);
      for (let j = 0; j < 64; j++) dv.setUint16(at.rope + 2 * j, (s * 64 + j) & 0xffff, true); // every bf16 pattern over the tokens
    }
    const got = await suite.engine.dequantizeKCachePaged({ cache, tokenIds: ids(256) });
    expect(got.shape).toEqual([256, 512]);
    const want = R.dequantizeKCacheReference(cache, ids(256));
    const gotValues = Array.from(got.data, bf16Value);
    const bad = firstMismatch(gotValues, want);
    if (bad >= 0) {
      const tok = Math.floor(bad / 512), j = bad % 512;
      expect({ scaleByte: tok, dim: j, e4m3: j < 448 ? j & 0xff : undefined, got: gotValues[bad] }).toEqual({
        scaleByte: tok, dim: j, e4m3: j < 448 ? j & 0xff : undefined, got: want[bad],
      });
    }
    // spot checks that pin the reference itself
    expect(want[0x38]).toBe(2 ** -127); // token 0: 1.0 · 2^-127
    expect(want[127 * 512 + 0x7e]).toBe(448);
    expect(want[254 * 512 + 0x7e]).toBe(Infinity); // 448 · 2^127 overflows float32
    expect(want[255 * 512 + 0x38]).toBeNaN(); // ue8m0 0xFF
    expect(want[127 * 512 + 0x7f]).toBeNaN(); // e4m3 0x7F
  });

  test('v32: e4m3 × arbitrary float32 scales, rounded in float32 then to bf16', async () => {
    const n = 64;
    const cache = createKvCache('v32', { numTokens: n });
    const dv = new DataView(cache.data.buffer);
    const special = [1, 2 ** -127, 2 ** -149, 3.4e38, 1.5, 1 / 3, Math.PI, 1e-30, 7e37, -1, 0, -0, NaN, Infinity];
    for (let t = 0; t < n; t++) {
      const at = R.tokenLayoutReference(cache, t);
      for (let j = 0; j < 512; j++) cache.data[at.nope + j] = (j + t * 7) & 0xff;
      for (let k = 0; k < 4; k++) {
        const s = t * 4 + k < special.length ? special[t * 4 + k]! : (rng.uniform() < 0.5 ? -1 : 1) * 2 ** (rng.uniform() * 60 - 30) * (1 + rng.uniform());
        dv.setFloat32(at.scales + 4 * k, s, true);
      }
      for (let j = 0; j < 64; j++) dv.setUint16(at.rope + 2 * j, rng.u32() & 0xffff, true);
    }
    const got = await suite.engine.dequantizeKCachePaged({ cache, tokenIds: ids(n) });
    expect(got.shape).toEqual([n, 576]);
    const want = R.dequantizeKCacheReference(cache, ids(n));
    const gotValues = Array.from(got.data, bf16Value);
    const bad = firstMismatch(gotValues, want);
    expect(bad === -1 ? 'all equal' : { index: bad, got: gotValues[bad], want: want[bad] }).toBe('all equal');
  });
});

/** Quantize the same rows with the engine and the reference into copies of one cache. */
async function quantizeBoth(cache: KvCache, tokenIds: number[], rows: Float32Array): Promise<{ got: Uint8Array; want: Uint8Array }> {
  const width = cache.format === 'v4' ? 512 : 576;
  const ref: KvCache = { ...cache, data: cache.data.slice() };
  const t = tensor('float32', [tokenIds.length, width], rows);
  await suite.engine.quantizeKCache({ cache, tokenIds, rows: t });
  R.quantizeKCacheReference(ref, tokenIds, t);
  return { got: cache.data, want: ref.data };
}

/** The first differing byte of two caches, described (bf16 rope NaNs compare as NaN). */
function describeCacheDiff(cache: KvCache, got: Uint8Array, want: Uint8Array, tokens: number): string | null {
  const rope = cache.format === 'v4' ? 64 : 64;
  for (let t = 0; t < tokens; t++) {
    const at = R.tokenLayoutReference(cache, t);
    const nopeN = cache.format === 'v4' ? 448 : 512;
    for (let j = 0; j < nopeN; j++) {
      if (got[at.nope + j] !== want[at.nope + j]) return `token ${t} e4m3 dim ${j}: got 0x${got[at.nope + j]!.toString(16)}, want 0x${want[at.nope + j]!.toString(16)}`;
    }
    const scaleBytes = cache.format === 'v4' ? 8 : 16;
    for (let j = 0; j < scaleBytes; j++) {
      if (got[at.scales + j] !== want[at.scales + j]) return `token ${t} scale byte ${j}: got ${got[at.scales + j]}, want ${want[at.scales + j]}`;
    }
    for (let j = 0; j < rope; j++) {
      const g = got[at.rope + 2 * j]! | (got[at.rope + 2 * j + 1]! << 8);
      const w = want[at.rope + 2 * j]! | (want[at.rope + 2 * j + 1]! << 8);
      if (g !== w && !(Number.isNaN(bf16Value(g)) && Number.isNaN(bf16Value(w)) && (g >> 15) === (w >> 15))) {
        return `token ${t} rope dim ${j}: got 0x${g.toString(16)}, want 0x${w.toString(16)}`;
      }
    }
  }
  return null;
}

/** All finite e4m3 values and the midpoints (ties) between neighbours, both signs, plus nudges. */
function e4m3Probes(): number[] {
  const mags: number[] = [];
  for (let b = 0; b < 0x7f; b++) mags.push(R.decodeE4m3(b));
  const out: number[] = [];
  for (let i = 0; i < mags.length; i++) {
    out.push(mags[i]!);
    if (i + 1 < mags.length) {
      const mid = (mags[i]! + mags[i + 1]!) / 2; // an exact tie (float32-representable)
      out.push(mid, Math.fround(mid * (1 + 2 ** -20)), Math.fround(mid * (1 - 2 ** -20)));
    }
  }
  out.push(447.99, 440, 447, 2 ** -10, 2 ** -11, 2 ** -12, 1e-30, 0.00048828125, 0.0009765626);
  return [...out, ...out.map((x) => -x)];
}

function randomTileValues(rng: Rng, count: number): number[] {
  return Array.from({ length: count }, () => {
    const r = rng.uniform();
    if (r < 0.6) return Math.fround(rng.normal() * 100);
    if (r < 0.9) return Math.fround((rng.uniform() < 0.5 ? -1 : 1) * 2 ** (rng.uniform() * 22 - 13));
    return Math.fround(rng.uniform() * 896 - 448);
  });
}

describe('encoders through quantize', () => {
  test('e4m3 rounding at scale 2^0: every value, every tie, both neighbours of every tie (v4)', async () => {
    // each tile holds 448 (so e = 0 and x / 2^e = x) and 63 probes
    const probes = e4m3Probes();
    const perToken = 7 * 63;
    const tokens = Math.ceil(probes.length / perToken);
    const cache = createKvCache('v4', { pageSize: 64, numPages: Math.ceil(tokens / 64) });
    const rows = new Float32Array(tokens * 512);
    let p = 0;
    for (let t = 0; t < tokens; t++) {
      for (let tile = 0; tile < 7; tile++) {
        rows[t * 512 + tile * 64] = tile % 2 ? -448 : 448;
        for (let j = 1; j < 64; j++) rows[t * 512 + tile * 64 + j] = p < probes.length ? probes[p++]! : 0;
      }
    }
    const { got, want } = await quantizeBoth(cache, ids(tokens), rows);
    expect(describeCacheDiff(cache, got, want, tokens)).toBeNull();
    // the reference against hand facts on the same data: scale byte 127 everywhere
    for (let t = 0; t < tokens; t++) {
      const at = R.tokenLayoutReference(cache, t);
      expect(Array.from(want.subarray(at.scales, at.scales + 8))).toEqual([127, 127, 127, 127, 127, 127, 127, 0]);
    }
  });

  test('a large random float32 set: tile exponents, e4m3 and bf16 rounding, NaN, ±inf, subnormals (v4 and v32)', async () => {
    for (const format of ['v4', 'v32'] as const) {
      const width = format === 'v4' ? 512 : 576;
      const tileDims = format === 'v4' ? 64 : 128;
      const quantDims = format === 'v4' ? 448 : 512;
      const tokens = 600;
      const cache = format === 'v4' ? createKvCache('v4', { pageSize: 256, numPages: 3 }) : createKvCache('v32', { numTokens: tokens });
      const rows = new Float32Array(tokens * width);
      const raw = randomFloat32Bits(rng, tokens * 64); // every float32 class, for the bf16 rope dims
      const u = new Uint32Array(raw.buffer);
      for (let i = 0; i < u.length; i += 3) u[i] = (u[i]! & 0xffff0000) | 0x8000; // exact bf16 ties
      for (let t = 0; t < tokens; t++) {
        for (let tile = 0; tile < quantDims / tileDims; tile++) {
          const vals = randomTileValues(rng, tileDims);
          const kind = (t * 7 + tile) % 9;
          if (kind === 0) vals[rng.int(0, tileDims)] = NaN;
          if (kind === 1) vals[rng.int(0, tileDims)] = rng.uniform() < 0.5 ? Infinity : -Infinity;
          if (kind === 2) for (let j = 0; j < tileDims; j++) vals[j] = Math.fround(vals[j]! * 1e-7); // amax below 1e-4
          if (kind === 3) for (let j = 0; j < tileDims; j++) vals[j] = Math.fround(vals[j]! * 2 ** 100);
          if (kind === 4) vals.fill(0);
          if (kind === 5) { vals[0] = 448; vals[1] = -448; vals[2] = 448 * (1 + 2 ** -20); }
          if (kind === 6) { vals[0] = Infinity; vals[1] = 3e38; vals[2] = -(2 ** 120); vals[3] = NaN; }
          if (kind === 7) for (let j = 0; j < tileDims; j++) vals[j] = Math.fround((rng.uniform() - 0.5) * 2 ** -140); // float32 subnormals
          rows.set(vals, t * width + tile * tileDims);
        }
        rows.set(raw.subarray(t * 64, (t + 1) * 64), t * width + quantDims);
      }
      // token ids in a random order, not contiguous
      const order = ids(tokens).sort(() => rng.uniform() - 0.5);
      const { got, want } = await quantizeBoth(cache, order, rows);
      expect(describeCacheDiff(cache, got, want, tokens)).toBeNull();
      // the reference's rope against tensor.ts's float32ToBf16Bits (NaNs: both NaN, same sign)
      const dv = new DataView(want.buffer);
      for (let r = 0; r < tokens; r++) {
        const at = R.tokenLayoutReference(cache, order[r]!);
        for (let j = 0; j < 64; j++) {
          const w = dv.getUint16(at.rope + 2 * j, true);
          const helper = float32ToBf16Bits(rows[r * width + quantDims + j]!);
          if (w !== helper) {
            expect(Number.isNaN(bf16Value(w)) && Number.isNaN(bf16Value(helper)) && w >> 15 === helper >> 15).toBe(true);
          }
        }
      }
    }
  }, 60_000);

  test('bf16 rows: rope bits are stored unchanged, nope quantized from the bf16 values', async () => {
    const tokens = 64;
    const cache = createKvCache('v4', { pageSize: 2, numPages: 32 });
    const bits = new Uint16Array(tokens * 512);
    for (let i = 0; i < bits.length; i++) bits[i] = rng.u32() & 0xffff; // every class incl. NaN payloads
    const ref: KvCache = { ...cache, data: cache.data.slice() };
    const rows = tensor('bf16', [tokens, 512], bits);
    await suite.engine.quantizeKCache({ cache, tokenIds: ids(tokens), rows });
    R.quantizeKCacheReference(ref, ids(tokens), rows);
    expect(describeCacheDiff(cache, cache.data, ref.data, tokens)).toBeNull();
    const dv = new DataView(cache.data.buffer);
    for (let t = 0; t < tokens; t++) {
      const at = R.tokenLayoutReference(cache, t);
      for (let j = 0; j < 64; j++) expect(dv.getUint16(at.rope + 2 * j, true)).toBe(bits[t * 512 + 448 + j]);
    }
  });
});
