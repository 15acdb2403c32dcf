/**
 * A tensor check that refuses reads each field once, its message included (SPEC §9: a getter is
 * not asked twice): the message describes the dtype and the shape's length as the check read them.
 * Every op's tensor check (ops/common.ts) on the cpu engine (wasm without the addon), through three ops that take q.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, tensor, type Engine } from '../dist/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { refusal } from './helpers/errors.js';

let engine: Engine;
beforeAll(async () => {
  // the check is the library's TS, the same for every engine: the cpu one where the addon is built
  engine = await createEngine({ backend: nativeAddonBuilt() ? 'cpu' : 'wasm' });
});
afterAll(async () => {
  await engine.dispose();
});

/** A q whose dtype is a getter answering a number (counted), and one whose shape claims 65 dims (its length reads counted). */
function countedQueries(): { dtypeQ: object; shapeQ: object; reads: { dtype: number; length: number } } {
  const reads = { dtype: 0, length: 0 };
  const dtypeQ = {
    get dtype() {
      reads.dtype++;
      return 7;
    },
    shape: [1, 1, 512],
    data: new Uint16Array(512),
  };
  const shape = new Proxy([1, ...Array<number>(64).fill(1)], {
    get: (target, key) => {
      if (key === 'length') reads.length++;
      return Reflect.get(target, key);
    },
  });
  return { dtypeQ, shapeQ: { dtype: 'bf16', shape, data: new Uint16Array(512) }, reads };
}

const cache = () => ({ format: 'v4' as const, pageSize: 64, numPages: 1, data: new Uint8Array(64 * 584) });
const ops: [string, (q: unknown) => Promise<unknown>][] = [
  ['sparsePrefill', (q) => engine.sparsePrefill({ q, kv: tensor('bf16', [4, 512]), indices: tensor('int32', [1, 4], new Int32Array(4)), smScale: 0.1 } as never)],
  ['pagedSparseAttention', (q) => engine.pagedSparseAttention({ q, kCache: cache(), indices: tensor('int32', [1, 4], new Int32Array(4)), smScale: 0.1 } as never)],
];

describe.each(ops)('%s refuses a hostile q reading each field once', (_, call) => {
  test('a dtype that is a number: INVALID_VALUE naming q, the dtype read once', async () => {
    const { dtypeQ, reads } = countedQueries();
    const e = await refusal(() => call(dtypeQ));
    expect([e.code, e.argument]).toEqual(['INVALID_VALUE', 'q']);
    expect(e.message).toBe('q: expected a bf16 tensor {dtype, shape, data}, got an object with keys {dtype, shape, data}');
    expect(reads.dtype).toBe(1);
  });

  test('a shape of 65 dims: INVALID_SHAPE naming q.shape, its length read once', async () => {
    const { shapeQ, reads } = countedQueries();
    const e = await refusal(() => call(shapeQ));
    expect([e.code, e.argument]).toEqual(['INVALID_SHAPE', 'q.shape']);
    expect(e.message).toBe('q.shape: expected an array of at most 64 non-negative integers, got [1, 1, 1, 1, 1, 1, 1, 1, … (65 dims)]');
    expect(reads.length).toBe(1);
  });
});
