/**
 * SPEC §3 caches through the engine: byte positions for v4 (P ∈ {2, 64, 256}) and v32, engine
 * quantize == reference quantize byte for byte, dequantize == reference exactly, the
 * quantize → dequantize round trip within the formats' error, out-of-range ids rejected up front.
 */
import { describe, expect, test } from 'vitest';
import { createKvCache, kvCacheBytes, tensor } from '../dist/index.js';
import type { KvCache } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { randomBf16Bits, randomDistinctIds } from './helpers/random.js';
import { opSuite } from './helpers/suite.js';

const suite = opSuite('kv_cache.test');
const rng = suite.rng;

const code = (c: string) => expect.objectContaining({ code: c });
const bf16Value = (b: number): number => R.decodeBf16(b);

/** Rows with a per-tile spread of magnitudes, so scales differ tile to tile. */
function randomRows(n: number, width: number): Float32Array {
  const rows = new Float32Array(n * width);
  for (let r = 0; r < n; r++) {
    for (let t = 0; t < width / 64; t++) {
      const mag = 2 ** rng.int(-12, 12);
      for (let j = 0; j < 64; j++) rows[r * width + t * 64 + j] = Math.fround(rng.normal() * mag);
    }
  }
  return rows;
}

describe('layout', () => {
  for (const P of [2, 64, 256]) {
    test(`v4, page size ${P}: one token's bytes land at page·pageBytes + slot·576 and + P·576 + slot·8`, async () => {
      const numPages = 3;
      const pageBytes = Math.ceil((P * 584) / 576) * 576; // SPEC §3.1, worked here by hand
      expect(kvCacheBytes('v4', { pageSize: P, numPages })).toBe(numPages * pageBytes);
      const cache = createKvCache('v4', { pageSize: P, numPages });
      expect(cache.data.length).toBe(numPages * pageBytes);
      for (const id of [0, P - 1, P, 2 * P + Math.floor(P / 2), numPages * P - 1]) {
        cache.data.fill(0xa5);
        const row = new Float32Array(512).fill(1); // nope: 0x78 at scale byte 119; rope: bf16 1.0 = 0x3f80
        await suite.engine.quantizeKCache({ cache, tokenIds: [id], rows: tensor('float32', [1, 512], row) });
        const page = Math.floor(id / P), slot = id % P;
        const data = page * pageBytes + slot * 576;
        const scales = page * pageBytes + P * 576 + slot * 8;
        const expected = new Uint8Array(cache.data.length).fill(0xa5);
        expected.fill(0x78, data, data + 448);
        for (let j = 0; j < 64; j++) { expected[data + 448 + 2 * j] = 0x80; expected[data + 448 + 2 * j + 1] = 0x3f; }
        expected.fill(119, scales, scales + 7);
        expected[scales + 7] = 0; // pad byte written 0
        const diff = cache.data.findIndex((b, i) => b !== expected[i]);
        expect(diff === -1 ? 'identical' : `byte ${diff}: got ${cache.data[diff]}, want ${expected[diff]}`).toBe('identical');
        // and the reference agrees on where things are
        expect(R.tokenLayoutReference(cache, id)).toEqual({ nope: data, rope: data + 448, scales });
      }
    });
  }

  test('v32: token t at t·656: [512 e4m3][4 float32 scales][64 bf16 rope]', async () => {
    const cache = createKvCache('v32', { numTokens: 5 });
    expect(cache.data.length).toBe(5 * 656);
    expect(kvCacheBytes('v32', { numTokens: 5 })).toBe(5 * 656);
    cache.data.fill(0xa5);
    const row = new Float32Array(576).fill(-2); // amax 2 → e = -7 → -256 → 0xf8; scale 2^-7; rope bf16 -2 = 0xc000
    await suite.engine.quantizeKCache({ cache, tokenIds: [3], rows: tensor('float32', [1, 576], row) });
    const expected = new Uint8Array(cache.data.length).fill(0xa5);
    const base = 3 * 656;
    expected.fill(0xf8, base, base + 512);
    const dv = new DataView(expected.buffer);
    for (let t = 0; t < 4; t++) dv.setFloat32(base + 512 + 4 * t, 2 ** -7, true);
    for (let j = 0; j < 64; j++) dv.setUint16(base + 528 + 2 * j, 0xc000, true);
    const diff = cache.data.findIndex((b, i) => b !== expected[i]);
    expect(diff === -1 ? 'identical' : `byte ${diff}: got ${cache.data[diff]}, want ${expected[diff]}`).toBe('identical');
  });
});

describe('engine vs reference', () => {
  const geometries: [string, () => KvCache][] = [
    ['v4 P=2', () => createKvCache('v4', { pageSize: 2, numPages: 97 })],
    ['v4 P=64', () => createKvCache('v4', { pageSize: 64, numPages: 4 })],
    ['v4 P=256', () => createKvCache('v4', { pageSize: 256, numPages: 2 })],
    ['v32', () => createKvCache('v32', { numTokens: 300 })],
  ];
  for (const [name, make] of geometries) {
    test(`${name}: quantize byte for byte, dequantize exactly, round trip within format error`, async () => {
      const cache = make();
      const tokens = R.cacheTokenCount(cache);
      const width = cache.format === 'v4' ? 512 : 576;
      const quantDims = cache.format === 'v4' ? 448 : 512;
      const tile = cache.format === 'v4' ? 64 : 128;
      // start from random bytes: bytes outside the written tokens must survive untouched
      for (let i = 0; i < cache.data.length; i++) cache.data[i] = rng.u32() & 0xff;
      const n = Math.min(tokens - 3, 150);
      const ids = randomDistinctIds(rng, tokens, n);
      for (const dtype of ['float32', 'bf16'] as const) {
        const f = randomRows(n, width);
        const rows = dtype === 'float32' ? tensor('float32', [n, width], f) : tensor('bf16', [n, width], Uint16Array.from(f, (x) => R.encodeBf16(x)));
        const ref: KvCache = { ...cache, data: cache.data.slice() };
        // int64 token ids for the bf16 pass
        const tokenIds = dtype === 'bf16' ? tensor('int64', [n], BigInt64Array.from(ids, (v) => BigInt(v))) : ids;
        await suite.engine.quantizeKCache({ cache, tokenIds, rows });
        R.quantizeKCacheReference(ref, ids, rows);
        const diff = cache.data.findIndex((b, i) => b !== ref.data[i]);
        expect(diff === -1 ? 'identical' : `byte ${diff}: got ${cache.data[diff]}, want ${ref.data[diff]}`).toBe('identical');

        // dequantize a gather (with repeats, in a random order) == reference, exactly
        const gather = [...ids.slice(0, 40), ids[0]!, ids[0]!, ...randomDistinctIds(rng, tokens, 20)];
        const got = await suite.engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [gather.length], Int32Array.from(gather)) });
        expect(got.dtype).toBe('bf16');
        expect(got.shape).toEqual([gather.length, width]);
        const want = R.dequantizeKCacheReference(ref, gather);
        const gotValues = Array.from(got.data, bf16Value);
        const bad = gotValues.findIndex((v, i) => !(Number.isNaN(v) ? Number.isNaN(want[i]!) : v === want[i]));
        expect(bad === -1 ? 'equal' : { index: bad, got: gotValues[bad], want: want[bad] }).toBe('equal');

        // round trip: each quantized dim within half an e4m3 step of its tile's scale (plus bf16 rounding)
        const back = await suite.engine.dequantizeKCachePaged({ cache, tokenIds: ids });
        for (let r = 0; r < n; r++) {
          for (let t = 0; t < quantDims / tile; t++) {
            let amax = 0;
            const x = (j: number): number => (dtype === 'float32' ? f[r * width + j]! : R.roundToBf16(f[r * width + j]!));
            for (let j = t * tile; j < (t + 1) * tile; j++) amax = Math.max(amax, Math.abs(x(j)));
            const scale = 2 ** R.tileExponentReference(amax);
            for (let j = t * tile; j < (t + 1) * tile; j++) {
              const v = bf16Value(back.data[r * width + j]!);
              const a = Math.abs(x(j)) / scale;
              // half an e4m3 step: 2^-10 below 2^-6, else 2^(floor(log2 a) - 4); the product is exact in bf16
              const bound = (a < 2 ** -6 ? 2 ** -10 : 2 ** (R.exponentOf(a) - 4)) * scale;
              if (!(Math.abs(v - x(j)) <= bound)) expect({ row: r, dim: j, x: x(j), back: v, bound }).toBe('within the format error');
            }
          }
          for (let j = quantDims; j < width; j++) {
            // float32 rows are rounded to bf16 once, bf16 rows copied: either way roundToBf16(x)
            expect(bf16Value(back.data[r * width + j]!)).toBe(R.roundToBf16(f[r * width + j]!));
          }
        }
      }
    }, 30_000);
  }
});

describe('bad token ids', () => {
  test('out-of-range ids are rejected with OUT_OF_RANGE before any byte is written', async () => {
    const cache = createKvCache('v4', { pageSize: 64, numPages: 2 });
    for (let i = 0; i < cache.data.length; i++) cache.data[i] = i & 0xff;
    const before = cache.data.slice();
    const rows = tensor('bf16', [3, 512], randomBf16Bits(rng, 3 * 512));
    const badIds: unknown[] = [
      [0, 1, 128],
      [0, -1, 5],
      [0, 1, 2 ** 31 - 1],
      tensor('int32', [3], Int32Array.from([0, 1, -(2 ** 31)])),
      tensor('int64', [3], BigInt64Array.from([0n, 1n, 2n ** 40n])),
      tensor('int64', [3], BigInt64Array.from([0n, 1n, -1n])),
    ];
    for (const tokenIds of badIds) {
      await expect(suite.engine.quantizeKCache({ cache, tokenIds: tokenIds as number[], rows })).rejects.toThrow(code('OUT_OF_RANGE'));
      await expect(suite.engine.dequantizeKCachePaged({ cache, tokenIds: tokenIds as number[] })).rejects.toThrow(code('OUT_OF_RANGE'));
      expect(() => R.dequantizeKCacheReference(cache, tokenIds as number[])).toThrow(code('OUT_OF_RANGE'));
    }
    expect(Buffer.from(cache.data).equals(Buffer.from(before))).toBe(true);
    const v32 = createKvCache('v32', { numTokens: 4 });
    await expect(suite.engine.dequantizeKCachePaged({ cache: v32, tokenIds: [4] })).rejects.toThrow(code('OUT_OF_RANGE'));
    await expect(suite.engine.dequantizeKCachePaged({ cache: v32, tokenIds: [3] })).resolves.toBeDefined();
  });
});
