/**
 * What the API fuzzer found in the host tensor and scalar helpers (tensor, toBf16, bf16ToFloat32,
 * numel, float32ToBf16Bits and the other exported number helpers), one focused case each: every one
 * threw an untyped error, misread a shape or hung before its fix. Each test names its session in its
 * describe, or its commit in a comment. Moved from test/fuzz_findings.test.ts.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, bf16BitsToFloat32, bf16ToFloat32, combinedWidth, float32ToBf16Bits, numel, requestVisible, swaGatherLength, tensor, toBf16 } from '../dist/index.js';
import type { Tensor } from '../dist/index.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';
import { errorOf } from './helpers/errors.js';
import { expectTyped, hostEngines, shrinkingAfterFirstRead } from './helpers/findings.js';

const rng = testRng('host_helpers_findings');
const engines = hostEngines();

// fuzzer findings, 0eef3b7
describe('host tensor helpers take what a typed array really is', () => {
  test('tensor(): a Proxy of a typed array is no typed array (was TypeError from its length getter); a Symbol in a shape is INVALID_SHAPE (was TypeError from the message)', async () => {
    await expectTyped(() => tensor('int32', [2], new Proxy(new Int32Array(2), {}) as Int32Array), 'INVALID_DTYPE', 'data');
    await expectTyped(() => tensor('int32', [Symbol('d') as unknown as number], new Int32Array(1)), 'INVALID_SHAPE', 'shape');
  });

  test('tensor(): a subclass whose length lies is judged by its memory, and the tensor holds a plain view of it', () => {
    class Lying extends Int32Array {
      override get length(): number {
        return super.length + 1000;
      }
    }
    const data = new Lying(3);
    data.set([1, 2, 3]);
    const t = tensor('int32', [3], data);
    expect(t.data).toBeInstanceOf(Int32Array);
    expect(Object.getPrototypeOf(t.data)).toBe(Int32Array.prototype);
    expect(Array.from(t.data)).toEqual([1, 2, 3]);
    const plain = new Int32Array(2);
    expect(tensor('int32', [2], plain).data).toBe(plain); // a plain array is kept, not copied
    const buffer = Buffer.alloc(3);
    expect(tensor('uint8', [3], buffer).data).toBe(buffer); // so is a subclass that does not lie (a Buffer)
  });

  test('toBf16: BigInt data, a Proxy of a Float32Array, non-numbers and an impossible length are typed errors (were TypeError / RangeError)', async () => {
    await expectTyped(() => toBf16({ shape: [2], data: new BigInt64Array(2) as unknown as ArrayLike<number> }), 'INVALID_DTYPE', 'src.data');
    await expectTyped(() => toBf16({ shape: [2], data: new Proxy(new Float32Array(2), {}) }), 'INVALID_VALUE', 'src.data');
    await expectTyped(() => toBf16({ shape: [2], data: [1, Symbol('x') as unknown as number] }), 'INVALID_VALUE', 'src.data');
    await expectTyped(() => toBf16({ shape: [2], data: { length: 2 ** 53 } as ArrayLike<number> }), 'INVALID_VALUE', 'src.data');
    // what it accepts is unchanged: typed arrays and arrays of numbers
    expect(Array.from(toBf16({ shape: [2], data: [1, -2] }).data)).toEqual([0x3f80, 0xc000]);
  });

  test('bf16ToFloat32: a BigInt dtype and a Proxy of its bits are INVALID_DTYPE (were TypeError)', async () => {
    await expectTyped(() => bf16ToFloat32({ dtype: 3n, shape: [1], data: new Uint16Array(1) } as unknown as Tensor<'bf16'>), 'INVALID_DTYPE', 'src');
    await expectTyped(() => bf16ToFloat32({ dtype: 'bf16', shape: [1], data: new Proxy(new Uint16Array(1), {}) }), 'INVALID_DTYPE', 'src');
  });
});

// fuzzer finding, 898e40d
test('the exported scalar helpers refuse what is not a number with a typed error (a BigInt or Symbol was TypeError)', async () => {
  for (const bad of [3n, Symbol('x')] as unknown as number[]) {
    await expectTyped(() => float32ToBf16Bits(bad), 'INVALID_VALUE', 'x');
    await expectTyped(() => bf16BitsToFloat32(bad), 'INVALID_VALUE', 'b');
    await expectTyped(() => numel([2, bad]), 'INVALID_SHAPE', 'shape');
    await expectTyped(() => swaGatherLength(bad, 1, 128), 'INVALID_VALUE', 'seqLen');
    await expectTyped(() => requestVisible(10, bad, 4), 'INVALID_VALUE', 'extendLen');
    await expectTyped(() => combinedWidth(4, bad, 0, 128, 128), 'INVALID_VALUE', 'topk');
  }
  // their answers for numbers are unchanged
  expect([float32ToBf16Bits(1), bf16BitsToFloat32(0x3f80), numel([2, 3]), swaGatherLength(300, 5, 128), requestVisible(300, 5, 4), combinedWidth(4, 64, 0, 128, 128)]).toEqual([0x3f80, 1, 6, 132, 75, 256]);
});

describe("hostile input the fuzzer's session-52 oracle and generators reach (session 52, helper-53)", () => {
  test("tensor() reads a shape's length once: a Proxy whose length shrinks by one after its first read keeps every dim (Array.from ran its iterator, which reads the length at each step: tensor('uint8', [3, 1], 3 bytes) came back as [3], silently; cpu seed 43 cases 1822 and 2447)", () => {
    const data = new Uint8Array(3);
    const t = tensor('uint8', shrinkingAfterFirstRead([3, 1]), data);
    expect(t.shape).toEqual([3, 1]);
    expect(t.data).toBe(data);
    const b = tensor('bf16', shrinkingAfterFirstRead([1, 3]));
    expect(b.shape).toEqual([1, 3]);
    expect(b.data.length).toBe(3);
  });

  test("numel reads a shape's length once: a Proxy whose length shrinks after its first read gives the product of every dim (a for-of ran the array iterator, which reads the length at each step: numel of [3, 4] came out 3, silently)", () => {
    const dims = [rng.int(2, 9), rng.int(2, 9), rng.int(2, 9)];
    expect(numel(shrinkingAfterFirstRead(dims))).toBe(dims[0]! * dims[1]! * dims[2]!);
    expect(numel(shrinkingAfterFirstRead([3, 4]))).toBe(12);
  });
});

describe('shapes that claim more dims than any tensor has (session 52, lead)', () => {
  /** A Proxy of an array claiming `length` dims, every one of them 1 (a loop over them all would not end). */
  const endlessOnes = (length: number): number[] => new Proxy([] as number[], { get: (t, k, r) => (k === 'length' ? length : typeof k === 'string' && /^\d+$/.test(k) ? 1 : Reflect.get(t, k, r)) });

  test('tensor() and numel() refuse a shape over 64 dims with INVALID_SHAPE at once (they looped over each claimed dim: a Proxy claiming 2^40 dims of 1 hung the call)', () => {
    const huge = 2 ** (30 + rng.int(0, 20));
    for (const shape of [endlessOnes(huge), endlessOnes(65)]) {
      const e1 = (() => { try { tensor('uint8', shape, new Uint8Array(1)); } catch (e) { return e; } })();
      expect(e1 instanceof SparseMlaError && e1.code, String(e1)).toBe('INVALID_SHAPE');
      expect((e1 as Error).message).toContain('at most 64');
      const e2 = (() => { try { numel(shape); } catch (e) { return e; } })();
      expect(e2 instanceof SparseMlaError && e2.code, String(e2)).toBe('INVALID_SHAPE');
    }
    // 64 dims of 1 is a shape (one element)
    expect(tensor('uint8', endlessOnes(64), new Uint8Array([7])).shape).toHaveLength(64);
    expect(numel(endlessOnes(64))).toBe(1);
  }, 10_000);

  test("an op's q whose shape claims 2^40 dims is INVALID_SHAPE naming q.shape on every engine, before any work", async () => {
    for (const engine of engines) {
      const args = randomPrefillArgs(rng, { sQ: 2, hQ: 2, dQK: 576, sKV: 8, topk: 4 });
      const e = await errorOf(() => engine.sparsePrefill({ ...args, q: { ...args.q, shape: endlessOnes(2 ** 40) } as unknown as Tensor<'bf16'> }));
      expect(e instanceof SparseMlaError && e.code, `${engine.backend}: ${String(e)}`).toBe('INVALID_SHAPE');
      expect((e as SparseMlaError).argument, engine.backend).toBe('q.shape');
    }
  }, 10_000);
});
