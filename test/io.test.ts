/** .npy, .safetensors and the prefill directory: round trips, byte-exact fixtures, typed errors. */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { tensor } from '../dist/index.js';
import type { SparsePrefillArgs, Tensor } from '../dist/index.js';
import {
  encodeNpy,
  encodeSafetensors,
  loadPrefillInputs,
  loadPrefillOutputs,
  parseNpy,
  parseSafetensors,
  tensorToNpy,
  npyToTensor,
  writePrefillDir,
  writePrefillOutputs,
} from '../dist/io/index.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { tempDirs } from './helpers/temp_dirs.js';

const rng = testRng('io.test');
const tempDir = tempDirs('smla-io-');

const code = (c: string) => expect.objectContaining({ code: c });

/** What numpy 2.x writes for np.save(f, np.arange(3, dtype='<i4')). */
const NUMPY_ARANGE3_I4 = (() => {
  const header = "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }";
  const padded = header + ' '.repeat(118 - header.length - 1) + '\n';
  const bytes = new Uint8Array(10 + 118 + 12);
  bytes.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, 118, 0]);
  for (let i = 0; i < padded.length; i++) bytes[10 + i] = padded.charCodeAt(i);
  new DataView(bytes.buffer).setInt32(128, 0, true);
  new DataView(bytes.buffer).setInt32(132, 1, true);
  new DataView(bytes.buffer).setInt32(136, 2, true);
  return bytes;
})();

function npyHeader(header: string, data: Uint8Array): Uint8Array {
  const padded = header + ' '.repeat((64 - ((10 + header.length + 1) % 64)) % 64) + '\n';
  const out = new Uint8Array(10 + padded.length + data.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, padded.length, true);
  for (let i = 0; i < padded.length; i++) out[10 + i] = padded.charCodeAt(i);
  out.set(data, 10 + padded.length);
  return out;
}

describe('npy', () => {
  test('byte-identical to numpy for a small int32 array, both ways', () => {
    const a = parseNpy(NUMPY_ARANGE3_I4, 'x.npy');
    expect(a.descr).toBe('<i4');
    expect(a.shape).toEqual([3]);
    expect(Array.from(a.data as Int32Array)).toEqual([0, 1, 2]);
    expect(Buffer.from(encodeNpy(a)).equals(Buffer.from(NUMPY_ARANGE3_I4))).toBe(true);
  });

  test('round trip of every dtype, shapes incl. empty and 3-D; data starts 64-aligned', () => {
    const cases: Tensor[] = [
      tensor('bf16', [2, 3, 4], randomBf16Bits(rng, 24)),
      tensor('float32', [5], Float32Array.from([1.5, -0, NaN, Infinity, 3e-45])),
      tensor('int32', [2, 1, 3], Int32Array.from([-(2 ** 31), -1, 0, 1, 2 ** 31 - 1, 7])),
      tensor('int64', [3], BigInt64Array.from([-(2n ** 63n), 2n ** 40n, -1n])),
      tensor('float32', [0, 7]),
      tensor('uint8', [4], Uint8Array.from([0, 1, 254, 255])),
    ];
    for (const t of cases) {
      const bytes = encodeNpy(tensorToNpy(t));
      const headerLen = new DataView(bytes.buffer).getUint16(8, true);
      expect((10 + headerLen) % 64).toBe(0);
      const back = npyToTensor(parseNpy(bytes));
      expect(back.dtype).toBe(t.dtype);
      expect(back.shape).toEqual(t.shape);
      expect(Buffer.from(back.data.buffer, back.data.byteOffset, back.data.byteLength).equals(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))).toBe(true);
    }
  });

  test('unaligned data offsets (a version 2.0 header) are read correctly', () => {
    const header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
    const data = new Uint8Array(Float32Array.from([1.25, -2]).buffer);
    const bytes = new Uint8Array(12 + header.length + 1 + 8);
    bytes.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 2, 0]);
    new DataView(bytes.buffer).setUint32(8, header.length + 1, true);
    for (let i = 0; i < header.length; i++) bytes[12 + i] = header.charCodeAt(i);
    bytes[12 + header.length] = 0x0a;
    bytes.set(data, 12 + header.length + 1);
    expect(Array.from(parseNpy(bytes).data as Float32Array)).toEqual([1.25, -2]);
  });

  test('typed errors: bad magic, other dtypes, big-endian, fortran order, truncated data', () => {
    const four = new Uint8Array(8);
    expect(() => parseNpy(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), 'a.npy')).toThrow(code('INVALID_VALUE'));
    expect(() => parseNpy(npyHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", four), 'a.npy')).toThrow(code('INVALID_DTYPE'));
    expect(() => parseNpy(npyHeader("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", four), 'a.npy')).toThrow(code('INVALID_DTYPE'));
    expect(() => parseNpy(npyHeader("{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }", four), 'a.npy')).toThrow(code('INVALID_DTYPE'));
    expect(() => parseNpy(npyHeader("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2), }", four), 'a.npy')).toThrow(code('INVALID_VALUE'));
    expect(() => parseNpy(npyHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", four), 'a.npy')).toThrow(code('INVALID_SHAPE'));
    expect(() => parseNpy(npyHeader("{'descr': '<f4', 'shape': (2,), }", four), 'a.npy')).toThrow(code('INVALID_VALUE'));
    expect(() => parseNpy(NUMPY_ARANGE3_I4.subarray(0, 60), 'a.npy')).toThrow(/a\.npy/);
  });

  test('a descr that names an Object.prototype member is an unknown dtype, not a shape too large to hold', () => {
    for (const descr of ['toString', 'constructor', '__proto__']) {
      expect(() => parseNpy(npyHeader(`{'descr': '${descr}', 'fortran_order': False, 'shape': (2,), }`, new Uint8Array(8)), 'a.npy')).toThrow(code('INVALID_DTYPE'));
    }
  });
});

describe('safetensors', () => {
  test('round trip of BF16/F32/I32/I64 with metadata; layout per the format', () => {
    const named: Record<string, Tensor> = {
      q: tensor('bf16', [2, 3], randomBf16Bits(rng, 6)),
      s: tensor('float32', [3], Float32Array.from([1, -2, 0.5])),
      i: tensor('int32', [1, 2], Int32Array.from([-1, 7])),
      l: tensor('int64', [2], BigInt64Array.from([2n ** 40n, -5n])),
    };
    const bytes = encodeSafetensors(named, { sm_scale: '0.125' });
    const dv = new DataView(bytes.buffer);
    const n = Number(dv.getBigUint64(0, true));
    expect(n % 8).toBe(0);
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
    expect(header.q).toEqual({ dtype: 'BF16', shape: [2, 3], data_offsets: [0, 12] });
    expect(header.s.dtype).toBe('F32');
    expect(header.l.dtype).toBe('I64');
    expect(header.__metadata__).toEqual({ sm_scale: '0.125' });
    // q's first element, straight from the data section
    expect(dv.getUint16(8 + n, true)).toBe(named.q!.data[0]);
    const back = parseSafetensors(bytes);
    expect(back.metadata).toEqual({ sm_scale: '0.125' });
    for (const [k, t] of Object.entries(named)) {
      const b = back.tensors.get(k)!;
      expect([b.dtype, b.shape]).toEqual([t.dtype, t.shape]);
      expect(Array.from(b.data as ArrayLike<unknown>)).toEqual(Array.from(t.data as ArrayLike<unknown>));
    }
  });

  /** A safetensors file of the header `json` and `dataLen` zero bytes of data. */
  const make = (json: string, dataLen = 0): Uint8Array => {
    const j = new TextEncoder().encode(json);
    const out = new Uint8Array(8 + j.length + dataLen);
    new DataView(out.buffer).setBigUint64(0, BigInt(j.length), true);
    out.set(j, 8);
    return out;
  };

  test('typed errors: short file, header past the end, bad JSON, unknown dtype, wrong span', () => {
    expect(() => parseSafetensors(new Uint8Array(4), 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    const huge = new Uint8Array(16);
    new DataView(huge.buffer).setBigUint64(0, 1000n, true);
    expect(() => parseSafetensors(huge, 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    expect(() => parseSafetensors(make('{not json'), 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    expect(() => parseSafetensors(make('{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}', 2), 'x.safetensors')).toThrow(code('INVALID_DTYPE'));
    expect(() => parseSafetensors(make('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4), 'x.safetensors')).toThrow(code('INVALID_SHAPE'));
    expect(() => parseSafetensors(make('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}', 4), 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    expect(() => parseSafetensors(make('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4), 'x.safetensors')).toThrow(code('INVALID_SHAPE'));
  });

  test('hostile headers: Object.prototype names as dtypes, metadata that is not a map of strings', () => {
    // were INVALID_SHAPE "needs NaN bytes"
    for (const dtype of ['toString', 'constructor', '__proto__']) {
      expect(() => parseSafetensors(make(`{"a":{"dtype":"${dtype}","shape":[2],"data_offsets":[0,8]}}`, 8), 'x.safetensors')).toThrow(code('INVALID_DTYPE'));
    }
    // a deeply nested metadata value overflowed the stack when turned into text (an untyped RangeError)
    const deep = '['.repeat(100_000) + ']'.repeat(100_000);
    expect(() => parseSafetensors(make(`{"__metadata__":{"sm_scale":${deep}}}`), 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    expect(() => parseSafetensors(make('{"__metadata__":[1,2]}'), 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    expect(() => parseSafetensors(make('{"__metadata__":{"a":{"b":1}}}'), 'x.safetensors')).toThrow(code('INVALID_VALUE'));
    // strings stay as they are; numbers and booleans are read as their text
    expect(parseSafetensors(make('{"__metadata__":{"sm_scale":"0.5","d_v":512,"__proto__":"x"}}')).metadata).toEqual(Object.fromEntries([['sm_scale', '0.5'], ['d_v', '512'], ['__proto__', 'x']]));
  });
});

describe('prefill directory', () => {
  const sQ = 3, hQ = 2, dQK = 576, sKV = 40, topk = 8;
  const args: SparsePrefillArgs = {
    ...randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }, { invalidFraction: 0.2 }),
    topkLength: tensor('int32', [sQ], Int32Array.from([8, 0, 5])),
    attnSink: tensor('float32', [hQ], Float32Array.from([0.5, -Infinity])),
    smScale: 0.0416,
    dV: 512,
  };
  const outputs = {
    out: tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512)),
    lse: tensor('float32', [sQ, hQ], Float32Array.from([1, 2, Infinity, Infinity, 3, 4])),
    maxLogits: tensor('float32', [sQ, hQ], Float32Array.from([0, 1, -Infinity, -Infinity, 2, 3])),
  };

  for (const format of ['npy', 'safetensors'] as const) {
    test(`${format}: inputs and outputs load back unchanged`, async () => {
      const dir = await tempDir();
      await writePrefillDir(dir, args, { format, outputs: format === 'safetensors' ? outputs : undefined });
      if (format === 'npy') await writePrefillOutputs(dir, outputs);
      const got = await loadPrefillInputs(dir);
      expect(got.shapes).toEqual({ sQ, hQ, dQK, sKV, topk, dV: 512 });
      expect(got.args.smScale).toBe(0.0416);
      expect(Array.from(got.args.q.data)).toEqual(Array.from(args.q.data));
      expect(Array.from(got.args.indices.data as Int32Array)).toEqual(Array.from(args.indices.data as Int32Array));
      expect(Array.from(got.args.topkLength!.data)).toEqual([8, 0, 5]);
      expect(Array.from(got.args.attnSink!.data)).toEqual([0.5, -Infinity]);
      const out = await loadPrefillOutputs(dir, got.shapes);
      expect(out.out.dtype).toBe('bf16');
      expect(Array.from(out.out.data)).toEqual(Array.from(outputs.out.data));
      expect(Array.from(out.lse.data)).toEqual(Array.from(outputs.lse.data));
      expect(Array.from(out.maxLogits.data)).toEqual(Array.from(outputs.maxLogits.data));
    });
  }

  test('int64 indices and topk_length are accepted; topk_length saturates to int32', async () => {
    const dir = await tempDir();
    const idx64 = tensor('int64', [sQ, 1, topk], BigInt64Array.from(args.indices.data as Int32Array, (v) => BigInt(v)));
    idx64.data[0] = 2n ** 40n;
    await writePrefillDir(dir, { ...args, indices: idx64, topkLength: undefined });
    const { writeNpyFile } = await import('../dist/io/index.js');
    await writeNpyFile(join(dir, 'topk_length.npy'), tensor('int64', [sQ], BigInt64Array.from([2n ** 40n, -(2n ** 40n), 3n])));
    const got = await loadPrefillInputs(dir);
    expect(got.args.indices.dtype).toBe('int64');
    expect(got.args.indices.shape).toEqual([sQ, 1, topk]);
    expect(Array.from(got.args.topkLength!.data)).toEqual([2 ** 31 - 1, -(2 ** 31), 3]);
  });

  test('missing or garbled files give typed errors naming the file', async () => {
    const expectErr = async (mutate: (dir: string) => Promise<void>, c: string, file: RegExp, checkOutputs = false): Promise<void> => {
      const dir = await tempDir();
      await writePrefillDir(dir, args);
      await writePrefillOutputs(dir, outputs);
      await mutate(dir);
      const run = checkOutputs ? loadPrefillInputs(dir).then((i) => loadPrefillOutputs(dir, i.shapes)) : loadPrefillInputs(dir);
      await expect(run).rejects.toThrow(code(c));
      await expect(run).rejects.toThrow(file);
    };
    await expectErr((d) => rm(join(d, 'q.npy')), 'INVALID_VALUE', /q\.npy/);
    await expectErr((d) => rm(join(d, 'meta.json')), 'INVALID_VALUE', /meta\.json/);
    await expectErr((d) => writeFile(join(d, 'meta.json'), '{"sm_scale": "x"}'), 'INVALID_VALUE', /meta\.json/);
    await expectErr((d) => writeFile(join(d, 'meta.json'), '{"sm_scale": 1, "d_v": 600}'), 'INVALID_VALUE', /meta\.json/);
    await expectErr((d) => writeFile(join(d, 'meta.json'), 'garbage'), 'INVALID_VALUE', /meta\.json/);
    await expectErr((d) => writeFile(join(d, 'kv.npy'), 'garbage'), 'INVALID_VALUE', /kv\.npy/);
    await expectErr((d) => writeFile(join(d, 'q.npy'), encodeNpy({ descr: '<f4', shape: [sQ, hQ, dQK], data: new Float32Array(sQ * hQ * dQK) })), 'INVALID_DTYPE', /q\.npy/);
    await expectErr((d) => writeFile(join(d, 'kv.npy'), encodeNpy({ descr: '<u2', shape: [sKV, 512], data: new Uint16Array(sKV * 512) })), 'INVALID_SHAPE', /kv\.npy/);
    await expectErr((d) => writeFile(join(d, 'indices.npy'), encodeNpy({ descr: '<f4', shape: [sQ, topk], data: new Float32Array(sQ * topk) })), 'INVALID_DTYPE', /indices\.npy/);
    await expectErr((d) => writeFile(join(d, 'indices.npy'), encodeNpy({ descr: '<i4', shape: [sQ + 1, topk], data: new Int32Array((sQ + 1) * topk) })), 'INVALID_SHAPE', /indices\.npy/);
    await expectErr((d) => writeFile(join(d, 'attn_sink.npy'), encodeNpy({ descr: '<f4', shape: [hQ + 1], data: new Float32Array(hQ + 1) })), 'INVALID_SHAPE', /attn_sink\.npy/);
    await expectErr((d) => writeFile(join(d, 'topk_length.npy'), encodeNpy({ descr: '<i4', shape: [1, sQ], data: new Int32Array(sQ) })), 'INVALID_SHAPE', /topk_length\.npy/);
    await expectErr((d) => rm(join(d, 'lse.npy')), 'INVALID_VALUE', /lse\.npy/, true);
    await expectErr((d) => writeFile(join(d, 'out.npy'), encodeNpy({ descr: '<u2', shape: [sQ, hQ, 448], data: new Uint16Array(sQ * hQ * 448) })), 'INVALID_SHAPE', /out\.npy/, true);
    await expectErr((d) => writeFile(join(d, 'max_logits.npy'), encodeNpy({ descr: '<i4', shape: [sQ, hQ], data: new Int32Array(sQ * hQ) })), 'INVALID_DTYPE', /max_logits\.npy/, true);
    await expectErr(async (d) => { await writeFile(join(d, 'a.safetensors'), encodeSafetensors({})); await writeFile(join(d, 'b.safetensors'), encodeSafetensors({})); }, 'INVALID_VALUE', /safetensors/);
    await expectErr(async (d) => { await rm(join(d, 'kv.npy')); await writeFile(join(d, 'x.safetensors'), 'garbage!garbage!'); }, 'INVALID_VALUE', /x\.safetensors/);
    await expect(loadPrefillInputs(join(tempDir(), 'does-not-exist'))).rejects.toThrow(code('INVALID_VALUE'));
  });
});
