/**
 * The float64 reference is itself tested: hand-worked cases with exact expected values, hand-checked
 * codec values, and properties that hold for any input.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, float32ToBf16Bits, tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import type { KvCache, SparsePrefillArgs, Tensor } from '../dist/index.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';

const rng = testRng('reference.test');

/** bf16 tensor from values that are exactly bf16. */
function bf16(shape: number[], values: number[]): Tensor<'bf16'> {
  const bits = new Uint16Array(values.map((v) => {
    const b = R.encodeBf16(v);
    if (R.decodeBf16(b) !== v) throw new Error(`${v} is not a bf16 value`);
    return b;
  }));
  return tensor('bf16', shape, bits);
}

const i32 = (shape: number[], v: number[]): Tensor<'int32'> => tensor('int32', shape, Int32Array.from(v));
const f32 = (shape: number[], v: number[]): Tensor<'float32'> => tensor('float32', shape, Float32Array.from(v));

describe('formats: hand-checked values', () => {
  test('e4m3 decode', () => {
    const cases: [number, number][] = [
      [0x00, 0], [0x01, 2 ** -9], [0x07, 7 * 2 ** -9], [0x08, 2 ** -6], [0x30, 0.5], [0x38, 1], [0x39, 1.125],
      [0x3f, 1.875], [0x40, 2], [0x77, 240], [0x78, 256], [0x7e, 448], [0x81, -(2 ** -9)], [0xb8, -1], [0xfe, -448],
    ];
    for (const [b, v] of cases) expect(R.decodeE4m3(b)).toBe(v);
    expect(Object.is(R.decodeE4m3(0x80), -0)).toBe(true);
    expect(R.decodeE4m3(0x7f)).toBeNaN();
    expect(R.decodeE4m3(0xff)).toBeNaN();
  });

  test('e4m3 encode: rounding, ties to even, saturation, NaN, subnormals', () => {
    const cases: [number, number][] = [
      [1, 0x38], [1.0625, 0x38] /* tie → even 1.0 */, [1.1875, 0x3a] /* tie → 1.25 */, [1.0624, 0x38], [1.0626, 0x39],
      [17, 0x58] /* tie → 16 */, [19, 0x5a] /* tie → 20 */, [448, 0x7e], [449, 0x7e], [464, 0x7e], [1e30, 0x7e],
      [Infinity, 0x7e], [-Infinity, 0xfe], [-448, 0xfe], [432, 0x7e] /* tie 416|448 → 448 (even) */, [420, 0x7d],
      [2 ** -9, 0x01], [2 ** -10, 0x00] /* tie → 0 */, [1.5 * 2 ** -9, 0x02] /* tie → 2 */, [2.5 * 2 ** -9, 0x02],
      [3 * 2 ** -11, 0x01], [7.5 * 2 ** -9, 0x08] /* rounds up into the normals */, [2 ** -6, 0x08], [1e-30, 0x00],
      [-1e-30, 0x80], [-0, 0x80], [0, 0x00], [-2, 0xc0],
    ];
    for (const [x, b] of cases) expect([x, R.encodeE4m3(x)]).toEqual([x, b]);
    expect(R.encodeE4m3(NaN)).toBe(0x7f);
  });

  test('bf16 encode/decode', () => {
    const cases: [number, number][] = [
      [1, 0x3f80], [-1, 0xbf80], [1 + 2 ** -8, 0x3f80] /* tie → even */, [1 + 3 * 2 ** -8, 0x3f82] /* tie → even up */,
      [1 + 2 ** -8 + 2 ** -20, 0x3f81], [65504, 0x4780], [R.BF16_MAX, 0x7f7f], [(2 - 2 ** -8) * 2 ** 127, 0x7f80] /* tie → inf */,
      [(2 - 2 ** -8 - 2 ** -20) * 2 ** 127, 0x7f7f], [Infinity, 0x7f80], [-Infinity, 0xff80], [2 ** -133, 0x0001],
      [2 ** -134, 0x0000] /* tie → 0 */, [1.5 * 2 ** -133, 0x0002], [2 ** -126, 0x0080], [-0, 0x8000], [0, 0],
    ];
    for (const [x, b] of cases) expect([x, R.encodeBf16(x)]).toEqual([x, b]);
    expect(R.encodeBf16(NaN) & 0x7fff).toBe(0x7fc0);
    expect(R.decodeBf16(0x7fc0)).toBeNaN();
    expect(R.decodeBf16(0x7f81)).toBeNaN();
    expect(R.decodeBf16(0xff80)).toBe(-Infinity);
    expect(R.decodeBf16(0x0001)).toBe(2 ** -133);
    expect(R.decodeBf16(0x4049)).toBe(3.140625);
  });

  test('bf16 encode agrees with tensor.ts float32ToBf16Bits on every bf16 and on random float32', () => {
    const u = new Uint32Array(1);
    const f = new Float32Array(u.buffer);
    for (let b = 0; b < 0x10000; b++) {
      // every bf16 pattern, and the exact tie just above it, and a hair above/below the tie
      for (const low of [0, 0x8000, 0x8001, 0x7fff, 0x1234]) {
        u[0] = (b << 16) | low;
        const x = f[0]!;
        const want = float32ToBf16Bits(x);
        const got = R.encodeBf16(x);
        if (Number.isNaN(x)) {
          expect(got & 0x7f80).toBe(0x7f80);
          expect(got & 0x7f).not.toBe(0);
          expect(got >> 15).toBe(want >> 15);
        } else if (got !== want) {
          expect([b, low, got]).toEqual([b, low, want]);
        }
      }
    }
  });

  test('ue8m0', () => {
    expect(R.decodeUe8m0(127)).toBe(1);
    expect(R.decodeUe8m0(0)).toBe(2 ** -127);
    expect(R.decodeUe8m0(254)).toBe(2 ** 127);
    expect(R.decodeUe8m0(119)).toBe(1 / 256);
    expect(R.decodeUe8m0(255)).toBeNaN();
  });

  test('e4m3 encode∘decode is the identity on every finite byte', () => {
    for (let b = 0; b < 256; b++) {
      const v = R.decodeE4m3(b);
      if (Number.isNaN(v)) continue;
      expect(R.encodeE4m3(v)).toBe(b);
    }
  });
});

describe('kv cache reference: layout and quantize', () => {
  test('page sizes and token positions', () => {
    expect(R.v4PageBytesReference(2)).toBe(1728); // 1168 → 3·576
    expect(R.v4PageBytesReference(64)).toBe(37440); // 37376 → 65·576
    expect(R.v4PageBytesReference(256)).toBe(149760); // 149504 → 260·576
    expect(R.tokenLayoutReference({ format: 'v4', pageSize: 2 }, 3)).toEqual({ nope: 2304, rope: 2752, scales: 2888 });
    expect(R.tokenLayoutReference({ format: 'v4', pageSize: 64 }, 64 * 5 + 7)).toEqual({
      nope: 5 * 37440 + 7 * 576, rope: 5 * 37440 + 7 * 576 + 448, scales: 5 * 37440 + 64 * 576 + 7 * 8,
    });
    expect(R.tokenLayoutReference({ format: 'v32', pageSize: 1 }, 2)).toEqual({ nope: 1312, scales: 1824, rope: 1840 });
  });

  test('tile exponent: smallest e with 448·2^e ≥ max(amax, 1e-4)', () => {
    expect(R.tileExponentReference(448)).toBe(0);
    expect(R.tileExponentReference(448.0001)).toBe(1);
    expect(R.tileExponentReference(1)).toBe(-8);
    expect(R.tileExponentReference(1.75)).toBe(-8);
    expect(R.tileExponentReference(1.7500001)).toBe(-7);
    expect(R.tileExponentReference(0)).toBe(-22);
    expect(R.tileExponentReference(1e-9)).toBe(-22);
    expect(R.tileExponentReference(3e38)).toBe(120);
    expect(R.tileExponentReference(Infinity)).toBe(127);
  });

  test('hand-worked v4 token', () => {
    const P = 2;
    const cache: KvCache = { format: 'v4', pageSize: P, numPages: 2, data: new Uint8Array(2 * 1728).fill(0xaa) };
    const row = new Float32Array(512);
    row.fill(1, 0, 64); // tile 0: amax 1 → e = -8, 1·2^8 = 256 → 0x78
    for (let j = 64; j < 128; j++) row[j] = j % 2 ? 448 : -3.5; // tile 1: e = 0
    row.fill(1e-5, 128, 192); // tile 2: e = -22; 1e-5·2^22 = 41.94 → 40 (0x5a... see below)
    row[192] = Infinity; row[193] = 1; row[194] = -Infinity; // tile 3: e = 127
    row[256] = NaN; row[257] = 2; row[258] = -2; // tile 4: NaN ignored, amax 2 → e = -7
    const u = new Uint32Array(row.buffer);
    u[259] = 0xffc00000; // a negative NaN
    // tile 5, 6 zero → e = -22
    for (let j = 448; j < 512; j++) row[j] = j - 480 + 0.5;
    R.quantizeKCacheReference(cache, [3], tensor('float32', [1, 512], row));
    const at = R.tokenLayoutReference(cache, 3);
    const d = cache.data;
    expect([...d.subarray(at.scales, at.scales + 8)]).toEqual([119, 127, 105, 254, 120, 105, 105, 0]);
    expect(d[at.nope]).toBe(0x78);
    expect(d[at.nope + 64]).toBe(0xc6); // -3.5 = -1.75·2^1 → sign, exp field 8, mant 6
    expect(d[at.nope + 65]).toBe(0x7e);
    expect(d[at.nope + 128]).toBe(R.encodeE4m3(1e-5 * 2 ** 22));
    expect(R.decodeE4m3(d[at.nope + 128]!)).toBe(40);
    expect([d[at.nope + 192], d[at.nope + 193], d[at.nope + 194], d[at.nope + 195]]).toEqual([0x7e, 0x00, 0xfe, 0x00]);
    expect([d[at.nope + 256], d[at.nope + 257], d[at.nope + 258], d[at.nope + 259]]).toEqual([0x7f, 0x78, 0xf8, 0xff]);
    const dv = new DataView(d.buffer);
    for (let j = 0; j < 64; j++) expect(dv.getUint16(at.rope + 2 * j, true)).toBe(float32ToBf16Bits(j - 32 + 0.5));
    // the other token of page 1 and all of page 0 are untouched
    expect(d.subarray(0, 1728).every((x) => x === 0xaa)).toBe(true);
    const other = R.tokenLayoutReference(cache, 2);
    expect(d.subarray(other.nope, other.nope + 576).every((x) => x === 0xaa)).toBe(true);

    const back = R.dequantizeKCacheReference(cache, [3]);
    expect(back[0]).toBe(1);
    expect(back[64]).toBe(-3.5);
    expect(back[65]).toBe(448);
    expect(back[128]).toBe(40 * 2 ** -22);
    expect(back[192]).toBe(Infinity); // 448·2^127 overflows float32
    expect(back[193]).toBe(0);
    expect(back[194]).toBe(-Infinity);
    expect(back[256]).toBeNaN();
    expect(back[257]).toBe(2);
    expect(back[448]).toBe(-31.5);
  });

  test('dequantize with a NaN scale byte gives NaN; v32 float32 scales', () => {
    const cache: KvCache = { format: 'v4', pageSize: 2, numPages: 1, data: new Uint8Array(1728) };
    const at = R.tokenLayoutReference(cache, 1);
    cache.data[at.nope] = 0x38;
    cache.data[at.scales] = 255;
    cache.data[at.nope + 64] = 0x38;
    cache.data[at.scales + 1] = 0;
    const back = R.dequantizeKCacheReference(cache, [1]);
    expect(back[0]).toBeNaN();
    expect(back[64]).toBe(2 ** -127); // float32 subnormal, still a bf16 subnormal? 2^-127 ≥ 2^-133: yes
    const v32: KvCache = { format: 'v32', pageSize: 1, numPages: 3, data: new Uint8Array(3 * 656) };
    const row = new Float32Array(576);
    for (let j = 0; j < 576; j++) row[j] = (j % 7) - 3;
    row[130] = 96; // tile 1: amax 96 → e = -2; 96·4 = 384 is exact in e4m3
    R.quantizeKCacheReference(v32, [2], tensor('float32', [1, 576], row));
    const dv = new DataView(v32.data.buffer);
    expect([0, 1, 2, 3].map((t) => dv.getFloat32(2 * 656 + 512 + 4 * t, true))).toEqual([2 ** -7, 2 ** -2, 2 ** -7, 2 ** -7]);
    const back32 = R.dequantizeKCacheReference(v32, [2]);
    expect(Array.from(back32)).toEqual(Array.from(row));
  });

  test('out-of-range token ids are rejected with OUT_OF_RANGE', () => {
    const cache: KvCache = { format: 'v4', pageSize: 2, numPages: 2, data: new Uint8Array(2 * 1728) };
    for (const bad of [4, -1, 2 ** 40]) {
      expect(() => R.dequantizeKCacheReference(cache, [0, bad])).toThrow(expect.objectContaining({ code: 'OUT_OF_RANGE' }));
    }
    // an id that is no integer is no id at all: INVALID_VALUE, as the library's cache ops say it (session 56)
    expect(() => R.dequantizeKCacheReference(cache, [0, 1.5])).toThrow(expect.objectContaining({ code: 'INVALID_VALUE', argument: 'tokenIds' }));
    expect(() => R.dequantizeKCacheReference(cache, tensor('int64', [1], BigInt64Array.from([2n ** 40n])))).toThrow(
      expect.objectContaining({ code: 'OUT_OF_RANGE' }),
    );
  });
});

describe('sparse prefill reference: hand-worked cases', () => {
  // dQK = dV = 2 keeps the arithmetic by hand; the reference takes any dims.
  const kv = bf16([3, 2], [2, 0, 0, 5, 1, 1]);
  const base = (over: Partial<SparsePrefillArgs>): SparsePrefillArgs => ({
    q: bf16([1, 1, 2], [1, 0]),
    kv,
    indices: i32([1, 2], [0, 1]),
    smScale: 1,
    dV: 2,
    ...over,
  });

  test('two rows, known logits', () => {
    // logits: <[1,0],[2,0]> = 2 and <[1,0],[0,5]> = 0
    const r = R.sparsePrefillReference(base({}));
    const z = Math.exp(2) + 1;
    expect(r.maxLogits[0]).toBe(2);
    expect(r.lse[0]).toBeCloseTo(Math.log(z), 15);
    expect(r.out[0]).toBeCloseTo((Math.exp(2) * 2) / z, 15);
    expect(r.out[1]).toBeCloseTo(5 / z, 15);
    // every V value ≥ 0 here, so mag = out
    expect(r.mag[0]).toBeCloseTo((Math.exp(2) * 2) / z, 15);
    expect(r.mag[1]).toBeCloseTo(5 / z, 15);
  });

  test('mag = Σ w_k·|v_k| with the weights of out (sink included): opposite signs cancel in out, not in mag', () => {
    // logits <[1,0],[1,-2]> = 1 and <[1,0],[0,3]> = 0; a sink of 0 adds one unit of mass
    const kvSigned = bf16([2, 2], [1, -2, 0, 3]);
    const r = R.sparsePrefillReference(base({ kv: kvSigned, attnSink: f32([1], [0]) }));
    const z = Math.E + 2, w0 = Math.E / z, w1 = 1 / z;
    expect(r.out[0]).toBeCloseTo(w0, 15);
    expect(r.out[1]).toBeCloseTo(-2 * w0 + 3 * w1, 15);
    expect(r.mag[0]).toBeCloseTo(w0, 15);
    expect(r.mag[1]).toBeCloseTo(2 * w0 + 3 * w1, 15);
    // all weight on a +inf sink, or no valid entry: out = mag = 0
    for (const over of [{ kv: kvSigned, attnSink: f32([1], [Infinity]) }, { kv: kvSigned, indices: i32([1, 2], [-1, 7]) }]) {
      const e = R.sparsePrefillReference(base(over));
      expect(Array.from(e.mag)).toEqual([0, 0]);
      expect(Array.from(e.out)).toEqual([0, 0]);
    }
  });

  test('smScale multiplies the logits; the sink does not get it', () => {
    const r = R.sparsePrefillReference(base({ smScale: 0.5, attnSink: f32([1], [0]) }));
    // logits 1 and 0; lse = ln(e + 1); lse' = ln(e + 2)
    expect(r.maxLogits[0]).toBe(1);
    expect(r.lse[0]).toBeCloseTo(Math.log(Math.E + 1), 15);
    expect(r.out[0]).toBeCloseTo((Math.E * 2) / (Math.E + 2), 15);
    expect(r.out[1]).toBeCloseTo(5 / (Math.E + 2), 15);
  });

  test('equal logits: out is the mean; a sink of 0 adds one more unit of mass', () => {
    const q = bf16([1, 1, 2], [0, 0]);
    const r = R.sparsePrefillReference(base({ q, indices: i32([1, 3], [0, 1, 2]) }));
    expect(r.lse[0]).toBeCloseTo(Math.log(3), 15);
    expect(r.maxLogits[0]).toBe(0);
    expect(r.out[0]).toBeCloseTo(1, 15);
    expect(r.out[1]).toBeCloseTo(2, 15);
    const s = R.sparsePrefillReference(base({ q, indices: i32([1, 3], [0, 1, 2]), attnSink: f32([1], [0]) }));
    expect(s.lse[0]).toBeCloseTo(Math.log(3), 15);
    expect(s.out[0]).toBeCloseTo(3 / 4, 15);
    expect(s.out[1]).toBeCloseTo(6 / 4, 15);
  });

  test('duplicates count, invalid entries are skipped', () => {
    const q = bf16([1, 1, 2], [0, 0]);
    const r = R.sparsePrefillReference(base({ q, indices: i32([1, 6], [0, 0, -1, 3, 1, -(2 ** 31)]) }));
    expect(r.lse[0]).toBeCloseTo(Math.log(3), 15);
    expect(r.out[0]).toBeCloseTo(4 / 3, 15);
    expect(r.out[1]).toBeCloseTo(5 / 3, 15);
  });

  test('sink ±inf: +inf gives out 0, -inf changes nothing; lse and maxLogits never change', () => {
    const plain = R.sparsePrefillReference(base({}));
    const neg = R.sparsePrefillReference(base({ attnSink: f32([1], [-Infinity]) }));
    const pos = R.sparsePrefillReference(base({ attnSink: f32([1], [Infinity]) }));
    expect(Array.from(neg.out)).toEqual(Array.from(plain.out));
    expect(Array.from(pos.out)).toEqual([0, 0]);
    for (const r of [neg, pos]) {
      expect(r.lse[0]).toBe(plain.lse[0]);
      expect(r.maxLogits[0]).toBe(plain.maxLogits[0]);
    }
  });

  test('no valid entry: lse +inf, maxLogits -inf, out 0 whatever the sink', () => {
    const cases: Partial<SparsePrefillArgs>[] = [
      { indices: i32([1, 3], [-1, 3, 2 ** 31 - 1]) },
      { indices: i32([1, 0], []) },
      { topkLength: i32([1], [0]) },
      { topkLength: i32([1], [-5]) },
      { indices: tensor('int64', [1, 2], BigInt64Array.from([2n ** 32n, -(2n ** 40n)])) },
    ];
    for (const c of cases) {
      for (const sink of [undefined, f32([1], [3]), f32([1], [Infinity]), f32([1], [-Infinity])]) {
        const r = R.sparsePrefillReference(base({ ...c, attnSink: sink }));
        expect(r.lse[0]).toBe(Infinity);
        expect(r.maxLogits[0]).toBe(-Infinity);
        expect(Array.from(r.out)).toEqual([0, 0]);
      }
    }
  });

  test('topkLength cuts the row; int64 indices equal int32', () => {
    const a = R.sparsePrefillReference(base({ indices: i32([1, 3], [0, 1, 2]), topkLength: i32([1], [2]) }));
    const b = R.sparsePrefillReference(base({ indices: i32([1, 2], [0, 1]) }));
    const c = R.sparsePrefillReference(base({ indices: tensor('int64', [1, 1, 2], BigInt64Array.from([0n, 1n])) }));
    expect(Array.from(a.out)).toEqual(Array.from(b.out));
    expect(Array.from(c.out)).toEqual(Array.from(b.out));
    expect(a.lse[0]).toBe(b.lse[0]);
  });

  test('NaN in a logit propagates to lse, maxLogits and out', () => {
    const kvNaN = bf16([2, 2], [1, 0, 0, 1]);
    kvNaN.data[3] = 0x7fc0;
    const r = R.sparsePrefillReference(base({ kv: kvNaN, q: bf16([1, 1, 2], [1, 1]) }));
    expect(r.lse[0]).toBeNaN();
    expect(r.maxLogits[0]).toBeNaN();
    expect(r.out[0]).toBeNaN();
  });

  test('sQ = 0 gives empty outputs', () => {
    const r = R.sparsePrefillReference(base({ q: bf16([0, 1, 2], []), indices: i32([0, 2], []) }));
    expect([r.out.length, r.lse.length, r.maxLogits.length]).toEqual([0, 0, 0]);
  });

  test('shape errors are typed', () => {
    expect(() => R.sparsePrefillReference(base({ indices: i32([2, 1], [0, 1]) }))).toThrow(expect.objectContaining({ code: 'INVALID_SHAPE' }));
    expect(() => R.sparsePrefillReference(base({ attnSink: f32([2], [0, 0]) }))).toThrow(expect.objectContaining({ code: 'INVALID_SHAPE' }));
    expect(() => R.sparsePrefillReference(base({ dV: 3 }))).toThrow(expect.objectContaining({ code: 'INVALID_VALUE' }));
    expect(() => R.sparsePrefillReference(base({}), { queries: [1] })).toThrow(expect.objectContaining({ code: 'INVALID_VALUE' }));
  });
});

describe('sparse prefill reference: properties on random inputs', () => {
  const sQ = 5, hQ = 6, dQK = 576, sKV = 200, topk = 64;
  const args = randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }, { invalidFraction: 0.2, duplicateFraction: 0.1 });
  const { q, kv: kvT, indices } = args;

  test('softmax weights sum to 1 without a sink (V rows of ones give out = 1)', () => {
    // V = first dV dims; set them to 1 in every row while keeping the logits random through dims 512..575
    const kvOnes = tensor('bf16', [sKV, dQK], kvT.data.slice());
    for (let r = 0; r < sKV; r++) kvOnes.data.fill(0x3f80, r * dQK, r * dQK + 512);
    const r = R.sparsePrefillReference({ ...args, kv: kvOnes });
    for (let i = 0; i < r.out.length; i++) expect(Math.abs(r.out[i]! - 1)).toBeLessThan(1e-12);
    // with a sink the mass is exp(lse) / (exp(lse) + exp(sink))
    const sink = f32([hQ], [0.5, -1, 2, 0, 10, -10]);
    const s = R.sparsePrefillReference({ ...args, kv: kvOnes, attnSink: sink });
    for (let i = 0; i < sQ; i++) for (let h = 0; h < hQ; h++) {
      const want = 1 / (1 + Math.exp(sink.data[h]! - s.lse[i * hQ + h]!));
      expect(Math.abs(s.out[(i * hQ + h) * 512]! - want)).toBeLessThan(1e-12);
    }
  });

  test('maxLogits ≤ lse ≤ maxLogits + ln(valid count)', () => {
    const r = R.sparsePrefillReference(args);
    for (let i = 0; i < sQ; i++) {
      let n = 0;
      for (let k = 0; k < topk; k++) { const v = indices.data[i * topk + k]!; if (v >= 0 && v < sKV) n++; }
      for (let h = 0; h < hQ; h++) {
        const m = r.maxLogits[i * hQ + h]!, l = r.lse[i * hQ + h]!;
        expect(l).toBeGreaterThanOrEqual(m);
        expect(l).toBeLessThanOrEqual(m + Math.log(n) + 1e-12);
      }
    }
  });

  test('permuting a row, or padding it with invalid entries, changes nothing beyond float64 rounding', () => {
    const perm = new Int32Array(sQ * (topk + 3));
    for (let i = 0; i < sQ; i++) {
      const row = Array.from(indices.data.subarray(i * topk, (i + 1) * topk)).reverse();
      perm.set([...row, -1, sKV, 2 ** 31 - 1], i * (topk + 3));
    }
    const a = R.sparsePrefillReference(args);
    const b = R.sparsePrefillReference({ ...args, indices: tensor('int32', [sQ, topk + 3], perm) });
    for (let i = 0; i < a.out.length; i++) expect(Math.abs(a.out[i]! - b.out[i]!)).toBeLessThan(1e-12);
    for (let i = 0; i < a.lse.length; i++) expect(Math.abs(a.lse[i]! - b.lse[i]!)).toBeLessThan(1e-12);
  });

  test('the queries option computes exactly the requested rows', () => {
    const full = R.sparsePrefillReference(args);
    const sub = R.sparsePrefillReference(args, { queries: [4, 1] });
    expect(Array.from(sub.out)).toEqual([
      ...full.out.subarray(4 * hQ * 512, 5 * hQ * 512),
      ...full.out.subarray(1 * hQ * 512, 2 * hQ * 512),
    ]);
    expect(Array.from(sub.lse)).toEqual([...full.lse.subarray(4 * hQ, 5 * hQ), ...full.lse.subarray(hQ, 2 * hQ)]);
  });

  test('a brute-force float64 re-derivation agrees (direct softmax, no max shift)', () => {
    const r = R.sparsePrefillReference(args, { queries: [2] });
    const i = 2, h = 3;
    const qv = (d: number): number => R.decodeBf16(q.data[(i * hQ + h) * dQK + d]!);
    const kvv = (row: number, d: number): number => R.decodeBf16(kvT.data[row * dQK + d]!);
    const logits: number[] = [];
    const rows: number[] = [];
    for (let k = 0; k < topk; k++) {
      const idx = indices.data[i * topk + k]!;
      if (idx < 0 || idx >= sKV) continue;
      let s = 0;
      for (let d = 0; d < dQK; d++) s += qv(d) * kvv(idx, d);
      logits.push(s / Math.sqrt(dQK));
      rows.push(idx);
    }
    const z = logits.reduce((a, l) => a + Math.exp(l), 0);
    expect(r.lse[h]).toBeCloseTo(Math.log(z), 12);
    expect(r.maxLogits[h]).toBeCloseTo(Math.max(...logits), 12);
    for (const d of [0, 17, 511]) {
      const want = logits.reduce((a, l, k) => a + (Math.exp(l) / z) * kvv(rows[k]!, d), 0);
      expect(r.out[h * 512 + d]).toBeCloseTo(want, 12);
      const wantMag = logits.reduce((a, l, k) => a + (Math.exp(l) / z) * Math.abs(kvv(rows[k]!, d)), 0);
      expect(r.mag[h * 512 + d]).toBeCloseTo(wantMag, 12);
    }
  });

  test('mag ≥ |out| everywhere, and mag = |out| where every attended V value has one sign', () => {
    const r = R.sparsePrefillReference(args, { queries: [0, 1, 2] });
    for (let e = 0; e < r.out.length; e++) expect(r.mag[e]!).toBeGreaterThanOrEqual(Math.abs(r.out[e]!) * (1 - 1e-15));
    const absKv = tensor('bf16', kvT.shape, kvT.data.map((b) => b & 0x7fff));
    const a = R.sparsePrefillReference({ ...args, kv: absKv }, { queries: [1] });
    for (let e = 0; e < a.out.length; e++) expect(a.mag[e]!).toBeCloseTo(a.out[e]!, 12);
  });
});

describe('paged reference equals sparse prefill reference over the dequantized rows', () => {
  test('main + extra caches with different page sizes', () => {
    const hQ = 4, n = 3;
    const main: KvCache = { format: 'v4', pageSize: 2, numPages: 5, data: new Uint8Array(5 * R.v4PageBytesReference(2)) };
    const extra: KvCache = { format: 'v4', pageSize: 64, numPages: 1, data: new Uint8Array(R.v4PageBytesReference(64)) };
    const mainRows = tensor('bf16', [10, 512], randomBf16Bits(rng, 10 * 512, 2));
    const extraRows = tensor('bf16', [64, 512], randomBf16Bits(rng, 64 * 512, 0.5));
    R.quantizeKCacheReference(main, Array.from({ length: 10 }, (_, i) => i), mainRows);
    R.quantizeKCacheReference(extra, Array.from({ length: 64 }, (_, i) => i), extraRows);
    const q = tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512));
    const indices = i32([n, 4], [0, 9, -1, 10, 3, 3, 5, 2, 7, 1, 8, 6]);
    const extraIndices = i32([n, 2], [63, 64, 0, 5, -7, 30]);
    const topkLength = i32([n], [4, 2, 4]);
    const paged = R.pagedSparseAttentionReference({ q, kCache: main, indices, topkLength, extraKCache: extra, extraIndices, smScale: 0.04, attnSink: f32([hQ], [0, 1, -Infinity, 2]) });
    // the same entries as a workspace: main rows 0..9 then extra rows at 10..73
    const ws = new Float64Array(74 * 512);
    ws.set(R.dequantizeKCacheReference(main, Array.from({ length: 10 }, (_, i) => i)));
    ws.set(R.dequantizeKCacheReference(extra, Array.from({ length: 64 }, (_, i) => i)), 10 * 512);
    const kvT = tensor('bf16', [74, 512], Uint16Array.from(ws, (v) => R.encodeBf16(v)));
    const wsIdx = i32([n, 6], [0, 9, -1, -1, 73, -1, 3, 3, -1, -1, 10, 15, 7, 1, 8, 6, -1, 40]);
    const sp = R.sparsePrefillReference({ q, kv: kvT, indices: wsIdx, smScale: 0.04, attnSink: f32([hQ], [0, 1, -Infinity, 2]) });
    expect(Array.from(paged.out)).toEqual(Array.from(sp.out));
    expect(Array.from(paged.mag)).toEqual(Array.from(sp.mag));
    expect(Array.from(paged.lse)).toEqual(Array.from(sp.lse));
    expect(Array.from(paged.maxLogits)).toEqual(Array.from(sp.maxLogits));
  });
});

describe('accuracy bounds (SPEC §4)', () => {
  test('the bound formulas', () => {
    expect(R.outBound(0)).toBe(1e-6);
    expect(R.outBound(0.5)).toBe(0.5 / 128 + 1e-6);
    expect(R.maxLogitsBound(-3)).toBe(1e-6 + 3 / 32768);
    // lse cancels to about 0 while maxLogits is several units: the bound follows the larger one
    expect(R.lseBound(0.01, -5.5)).toBe(1e-6 + 5.5 / 32768);
    expect(R.lseBound(-7, 2)).toBe(1e-6 + 7 / 32768);
    expect(R.OUT_COSINE_GAP_BOUND).toBe(7e-6);
  });

  test('1 − cos as SPEC defines it (2<a,b> / (|a|² + |b|²)): sees a scale error, unlike the usual cosine', () => {
    const a = Float64Array.from({ length: 1000 }, () => rng.normal());
    expect(R.cosineGap(a, a)).toBe(0);
    expect(R.cosineGap(a, a.map((x) => 1.01 * x))).toBeCloseTo(1e-4 / 2.0201, 10);
    expect(R.cosineGap([0, 0], [0, 0])).toBe(0);
    expect(R.cosineGap([0, 0], [0, 1])).toBe(1);
    expect(R.cosineGap([1, NaN, 2], [1, 5, 2])).toBe(0); // non-finite positions are left out
  });

  test('1 − cos leaves out elements where got and ref are both below bf16\'s smallest normal (2^-126), and only those', () => {
    const a = Float64Array.from({ length: 1000 }, () => rng.normal());
    // a reference of about 1.9e-49 (no bf16 value near it) against a kernel's correctly rounded 0
    expect(R.cosineGap([0, 0, 0], [1.87e-49, -3e-50, 2 ** -127])).toBe(0);
    // ... beside normal elements, which alone decide the cosine
    expect(R.cosineGap([...a, 0], [...a, 1.87e-49])).toBe(0);
    expect(R.cosineGap([...a.map((x) => 1.01 * x), 0], [...a, 1.87e-49])).toBeCloseTo(1e-4 / 2.0201, 10);
    // one side normal: compared (a result of 1e-30 where the reference is 1e-57 is wrong)
    expect(R.cosineGap([1e-30], [1e-57])).toBe(1);
    expect(R.cosineGap([0], [2 ** -126])).toBe(1);
    // the whole comparison: a tensor of such outputs passes, elementwise bound included
    const ref = { out: [1.87e-49, 0], lse: [0, 0], maxLogits: [-100, -100], mag: [1.87e-49, 0] };
    const c = R.compareAttention({ out: [0, 0], lse: [0, 0], maxLogits: [-100, -100] }, ref, { heads: 2, dV: 1 });
    expect(c.out.cosineGap).toBe(0);
    expect(c.pass).toBe(true);
  });

  // 3 rows (queries 4, 7, 9) × 2 heads × dV 2
  const heads = 2, dV = 2, queries = [4, 7, 9];
  const reference = (): R.BoundsReference & { out: Float64Array; mag: Float64Array; lse: Float64Array; maxLogits: Float64Array } => ({
    out: Float64Array.from([0.5, -0.25, 1, 2, 0, 0, 0.125, -1, 3, 0.75, -2, 0.5]),
    mag: Float64Array.from([1, 0.5, 1.5, 2.5, 0, 0, 0.5, 1, 3, 1, 2, 1]),
    lse: Float64Array.from([0.01, 3, Infinity, 1.5, -0.2, NaN]),
    maxLogits: Float64Array.from([-5.5, 2, -Infinity, 1, -4, NaN]),
  });
  const copy = (r: R.AttentionValues): { out: Float64Array; lse: Float64Array; maxLogits: Float64Array } => ({
    out: Float64Array.from(r.out), lse: Float64Array.from(r.lse), maxLogits: Float64Array.from(r.maxLogits),
  });

  test('the reference itself passes with ratio 0; ±inf and NaN in place', () => {
    const ref = reference();
    const c = R.compareAttention(copy(ref), ref, { heads, dV, queries });
    expect(c.pass).toBe(true);
    for (const t of R.ATTENTION_TENSORS) {
      expect(c[t].worstRatio).toBe(0);
      expect(c[t].overBound).toBe(0);
    }
    expect(c.out.count).toBe(12);
    expect(c.lse.count).toBe(6);
  });

  test('elementwise: error/bound ratio, elements over, where (query, head, col and flat index)', () => {
    const ref = reference();
    const got = copy(ref);
    got.out[9] = ref.out[9]! + 0.99 * R.outBound(ref.mag[9]!); // row 2 (query 9), head 0, col 1: inside
    got.out[10] = ref.out[10]! - 1.5 * R.outBound(ref.mag[10]!); // query 9, head 1, col 0: over
    got.lse[0] = ref.lse[0]! + 0.5 * R.lseBound(0.01, -5.5); // a cancelled lse: inside, though 1.4e-2 of |lse|
    got.maxLogits[3] = ref.maxLogits[3]! + 2 * R.maxLogitsBound(1); // query 7, head 1: over
    const c = R.compareAttention(got, ref, { heads, dV, queries });
    expect(c.pass).toBe(false);
    expect(c.out.overBound).toBe(1);
    expect(c.out.worstRatio).toBeCloseTo(1.5, 12);
    expect(c.out.worst!.at).toEqual({ query: 9, head: 1, col: 0 });
    expect(c.out.worst!.index).toBe((9 * heads + 1) * dV + 0);
    expect(c.out.worst!.bound).toBe(R.outBound(2));
    expect(c.lse.pass).toBe(true);
    expect(c.lse.worstRatio).toBeCloseTo(0.5, 10);
    expect(c.lse.worst!.at).toEqual({ query: 4, head: 0 });
    expect(c.maxLogits.overBound).toBe(1);
    expect(c.maxLogits.worst!.at).toEqual({ query: 7, head: 1 });
    expect(c.maxLogits.worst!.index).toBe(7 * heads + 1);
  });

  test('±inf / NaN misplaced: over the bound with ratio inf', () => {
    for (const [tensor, at, value] of [['lse', 2, 5], ['lse', 5, 0], ['maxLogits', 2, Infinity], ['out', 0, NaN]] as const) {
      const ref = reference();
      const got = copy(ref);
      got[tensor][at] = value;
      const c = R.compareAttention(got, ref, { heads, dV, queries });
      expect(c[tensor].infNanMismatch, `${tensor}[${at}] = ${value}`).toBe(1);
      expect(c[tensor].worstRatio).toBe(Infinity);
      expect(c.pass).toBe(false);
    }
  });

  test('the whole-tensor cosine bound fails a 1% scale error that every element passes', () => {
    const n = 4096, out = Float64Array.from({ length: n }, () => rng.normal());
    const ref = { out, mag: out.map((x) => 4 * Math.abs(x)), lse: new Float64Array(n / 2), maxLogits: new Float64Array(n / 2) };
    const got = { out: out.map((x) => 1.01 * x), lse: ref.lse, maxLogits: ref.maxLogits };
    const c = R.compareAttention(got, ref, { heads: 2, dV: 2 });
    expect(c.out.overBound).toBe(0);
    expect(c.out.worstRatio).toBeLessThan(1);
    expect(c.out.cosineGap).toBeGreaterThan(R.OUT_COSINE_GAP_BOUND);
    expect(c.out.pass).toBe(false);
  });

  test('chunks fed one by one equal one call; a number as mag bounds every element alike; sizes are checked', () => {
    const ref = reference();
    const got = copy(ref);
    for (let e = 0; e < 12; e++) got.out[e] = ref.out[e]! + (e % 3 - 1) * 1e-3;
    const whole = R.compareAttention(got, ref, { heads, dV, queries });
    const acc = new R.AttentionComparator({ heads, dV });
    const part = (v: R.AttentionValues & { mag?: Float64Array }, a: number, b: number) => ({
      out: (v.out as Float64Array).subarray(a * 4, b * 4), lse: (v.lse as Float64Array).subarray(a * 2, b * 2),
      maxLogits: (v.maxLogits as Float64Array).subarray(a * 2, b * 2), mag: v.mag?.subarray(a * 4, b * 4) ?? 0,
    });
    acc.add(part(got, 0, 1), part(ref, 0, 1), [4]);
    acc.add(part(got, 1, 3), part(ref, 1, 3), [7, 9]);
    expect(acc.result()).toEqual(whole);
    const flat = R.compareAttention(got, { ...ref, mag: 3 }, { heads, dV, queries });
    expect(flat.out.worst!.bound).toBe(R.outBound(3));
    // typed refusals since session 56 (RangeError before)
    expect(() => R.compareAttention({ ...got, lse: got.lse.subarray(1) }, ref, { heads, dV })).toThrow(expect.objectContaining({ name: 'SparseMlaError', code: 'INVALID_SHAPE', argument: 'got.lse' }));
    expect(() => R.compareAttention(got, ref, { heads, dV, queries: [1] })).toThrow(expect.objectContaining({ name: 'SparseMlaError', code: 'INVALID_SHAPE', argument: 'queries' }));
  });
});

describe('the reference refuses hostile arguments with typed errors (session 55; helper-67 found TypeErrors and NaN outputs)', () => {
  const refusal = (call: () => unknown): [string, string | undefined] => {
    try {
      call();
    } catch (e) {
      expect(e).toBeInstanceOf(SparseMlaError);
      return [(e as SparseMlaError).code, (e as SparseMlaError).argument];
    }
    throw new Error('expected a refusal, the call returned');
  };
  const args = (): SparsePrefillArgs => ({
    q: tensor('bf16', [1, 1, 64]),
    kv: tensor('bf16', [2, 64]),
    indices: tensor('int32', [1, 2], Int32Array.from([0, 1])),
    smScale: 0.1,
    dV: 64,
  });
  test('arguments that are no object', () => {
    for (const a of [null, undefined, 7, 'q']) {
      expect(refusal(() => R.sparsePrefillReference(a as never))).toEqual(['INVALID_VALUE', 'args']);
      expect(refusal(() => R.pagedSparseAttentionReference(a as never))).toEqual(['INVALID_VALUE', 'args']);
    }
  });
  // a data length other than the shape's count is INVALID_SHAPE, as the library's ops say it (INVALID_VALUE in session 55)
  test('a kv whose data is shorter than its shape (it resolved with every out NaN) or longer', () => {
    for (const n of [64, 3 * 64]) {
      const a = args();
      a.kv = { dtype: 'bf16', shape: [2, 64], data: new Uint16Array(n) };
      expect(refusal(() => R.sparsePrefillReference(a))).toEqual(['INVALID_SHAPE', 'kv.data']);
    }
  });
  test('q of a shape holding a Symbol, a negative or a fractional dim; q data of another length', () => {
    for (const shape of [[1, Symbol('h'), 64], [1, -1, 64], [1, 1.5, 64]]) {
      const a = args();
      a.q = { dtype: 'bf16', shape: shape as never, data: new Uint16Array(64) };
      expect(refusal(() => R.sparsePrefillReference(a))).toEqual(['INVALID_SHAPE', 'q']);
    }
    const a = args();
    a.q = { dtype: 'bf16', shape: [1, 1, 64], data: new Uint16Array(63) };
    expect(refusal(() => R.sparsePrefillReference(a))).toEqual(['INVALID_SHAPE', 'q.data']);
  });
  test('a cache that is null', () => {
    const q = tensor('bf16', [1, 1, 512]);
    expect(refusal(() => R.pagedSparseAttentionReference({ q, kCache: null as never, indices: tensor('int32', [1, 1], Int32Array.from([0])), smScale: 0.1 }))).toEqual(['INVALID_VALUE', 'kCache']);
  });
});
