/**
 * What the API fuzzer found in the io module's readers (parseNpy, parseSafetensors, readNpyFile,
 * readSafetensorsFile, loadPrefillInputs / loadPrefillOutputs, PrefillDir) over hostile bytes and
 * folders, one focused case each: every one threw an untyped error or read a file wrongly before
 * its fix. Each test names its session in its describe, or its commit in a comment. Moved from
 * test/fuzz_findings.test.ts.
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { SparseMlaError, tensor } from '../dist/index.js';
import { encodeNpy, encodeSafetensors, parseNpy, parseSafetensors, readNpyFile, readSafetensorsFile } from '../dist/io/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { errorOf } from './helpers/errors.js';
import { expectTyped, writtenBeside } from './helpers/findings.js';

const rng = testRng('io_readers_findings');

// fuzzer findings, 0eef3b7
describe('file readers', () => {
  const npy = encodeNpy({ descr: '<i4', shape: [2], data: new Int32Array([5, 6]) });
  const st = encodeSafetensors({ a: tensor('int32', [2], new Int32Array([5, 6])) });

  test('parseNpy / parseSafetensors: a DataView, a plain Array, a Proxy or a detached buffer is INVALID_VALUE (was TypeError)', async () => {
    for (const [parse, good] of [[parseNpy, npy], [parseSafetensors, st]] as const) {
      const detached = good.slice();
      structuredClone(detached.buffer, { transfer: [detached.buffer] });
      for (const bad of [new DataView(good.buffer), Array.from(good), new Proxy(good.slice(), {}), detached]) {
        await expectTyped(() => parse(bad as Uint8Array), 'INVALID_VALUE');
      }
    }
    // a Buffer and a view at an odd offset of a larger buffer read as the bytes they show
    const odd = new Uint8Array(npy.length + 3);
    odd.set(npy, 3);
    expect(Array.from(parseNpy(odd.subarray(3)).data as Int32Array)).toEqual([5, 6]);
    expect(Array.from(parseSafetensors(Buffer.from(st)).tensors.get('a')!.data as Int32Array)).toEqual([5, 6]);
  });

  test('readNpyFile / readSafetensorsFile: a path that is not a string is INVALID_VALUE (a Symbol was TypeError)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sparse-mla-fuzz-findings-'));
    try {
      writeFileSync(join(dir, 'a.npy'), npy);
      for (const read of [readNpyFile, readSafetensorsFile]) {
        await expectTyped(() => read(Symbol('p') as unknown as string), 'INVALID_VALUE', 'path');
        await expectTyped(() => read(join(dir, 'a.npy'), Symbol('n') as unknown as string), 'INVALID_VALUE', 'name');
      }
      expect((await readNpyFile(join(dir, 'a.npy'))).shape).toEqual([2]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('prefill directories with hostile contents, the fuzzer\'s hostileDir target (session 55, helper-67)', () => {
  const folders: string[] = [];
  const folder = (): string => {
    const d = mkdtempSync(join(tmpdir(), 'sparse-mla-h67-'));
    folders.push(d);
    return d;
  };
  afterAll(() => {
    for (const d of folders) rmSync(d, { recursive: true, force: true });
  });
  const bytesOf = (a: ArrayBufferView): number[] => Array.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  /** A .npy file written here, not by the library: magic, version 1.0, `header` as given, then `data`. */
  const npyFile = (header: string, data: Uint8Array): Uint8Array => {
    const h = new TextEncoder().encode(header);
    const out = new Uint8Array(10 + h.length + data.length);
    out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
    new DataView(out.buffer).setUint16(8, h.length, true);
    out.set(h, 10);
    out.set(data, 10 + h.length);
    return out;
  };
  /** A .safetensors file written here: the header's JSON as given, then `data`. */
  const safetensorsFile = (header: unknown, data: Uint8Array): Uint8Array => {
    const h = new TextEncoder().encode(JSON.stringify(header));
    const out = new Uint8Array(8 + h.length + data.length);
    new DataView(out.buffer).setBigUint64(0, BigInt(h.length), true);
    out.set(h, 8);
    out.set(data, 8 + h.length);
    return out;
  };
  /** A prefill directory of one .safetensors file holding q, kv and indices of random dims, and `metadata`. */
  const safetensorsDir = (metadata: Record<string, string>) => {
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), dQK = rng.pick([4, 16]), sKV = rng.int(1, 6), topk = rng.int(1, 5);
    const tensors = {
      q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
      kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
      indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.int(-1, sKV))),
    };
    const dir = folder();
    writeFileSync(join(dir, 'dump.safetensors'), encodeSafetensors(tensors, metadata));
    return { dir, tensors, dQK };
  };

  test("a .safetensors directory's sm_scale / d_v metadata is read as a decimal number or refused naming the metadata (Number() took '' and '  ' as 0, '0x10' as 16, '0b100' as 4: a file with an empty sm_scale was read as scale 0)", async () => {
    const io = await import('../dist/io/index.js');
    const smScale = rng.uniform() * 4 + 1e-3;
    const dV = rng.pick([1, 3, 4]);
    // decimal forms, as Python's str() and JS's String() write them, read back exactly
    const good: [string, string, number, number][] = [
      [String(smScale), String(dV), smScale, dV],
      [smScale.toExponential(), `${dV}.0`, smScale, dV],
      [`+${smScale}`, `${dV}e0`, smScale, dV],
      ['.5', String(dV), 0.5, dV],
      ['-2.5E-3', String(dV), -0.0025, dV],
    ];
    for (const [sm, dv, wantSm, wantDv] of good) {
      const { dir, tensors, dQK } = safetensorsDir({ sm_scale: sm, d_v: dv });
      const back = await io.loadPrefillInputs(dir);
      expect([back.args.smScale, back.args.dV, back.files.meta], `${sm}, ${dv}`).toEqual([wantSm, wantDv, 'dump.safetensors:__metadata__']);
      expect(back.shapes.dQK).toBe(dQK);
      for (const k of ['q', 'kv', 'indices'] as const) expect(bytesOf(back.args[k].data as ArrayBufferView), k).toEqual(bytesOf(tensors[k].data));
    }
    const bad: [string, string, string][] = [
      ['', '4', 'sm_scale'],
      ['  ', '4', 'sm_scale'],
      ['0x10', '4', 'sm_scale'],
      ['0b1', '4', 'sm_scale'],
      [' 0.5', '4', 'sm_scale'],
      ['0.5 ', '4', 'sm_scale'],
      ['Infinity', '4', 'sm_scale'],
      ['1e400', '4', 'sm_scale'],
      [String(smScale), '', 'd_v'],
      [String(smScale), '0b100', 'd_v'],
      [String(smScale), '0o4', 'd_v'],
      [String(smScale), '4.5', 'd_v'],
    ];
    for (const [sm, dv, field] of bad) {
      const { dir } = safetensorsDir({ sm_scale: sm, d_v: dv });
      const e = await errorOf(() => io.loadPrefillInputs(dir));
      expect(e, JSON.stringify([sm, dv])).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], JSON.stringify([sm, dv])).toEqual(['INVALID_VALUE', 'dump.safetensors:__metadata__']);
      expect((e as SparseMlaError).message, JSON.stringify([sm, dv])).toContain(`__metadata__: ${field}:`);
    }
  });

  test('a .npy header with text after its dict is refused naming the file (NumPy refuses it; the reader stopped at the closing brace and read the file); the padding NumPy writes (spaces, a newline) is taken', async () => {
    const values = Int32Array.from({ length: rng.int(1, 9) }, () => rng.int(-1000, 1000));
    const data = new Uint8Array(values.buffer);
    const dict = `{'descr': '<i4', 'fortran_order': False, 'shape': (${values.length},), }`;
    const dir = folder();
    for (const [label, header] of [['padded', `${dict}   \n`], ['bare', dict], ['spaces only', `${dict}      `]] as const) {
      const path = join(dir, `${label}.npy`);
      writeFileSync(path, npyFile(header, data));
      for (const arr of [parseNpy(npyFile(header, data), 'x.npy'), await readNpyFile(path)]) {
        expect([arr.descr, arr.shape, Array.from(arr.data as Int32Array)], label).toEqual(['<i4', [values.length], Array.from(values)]);
      }
    }
    for (const tail of [' junk\n', "{'descr': '<u2'}\n", ', }\n', ')\n', '}\n', "\n'shape': (1,)\n"]) {
      const header = dict + tail;
      const path = join(dir, 'tail.npy');
      writeFileSync(path, npyFile(header, data));
      await expectTyped(() => parseNpy(npyFile(header, data), 'tail.npy'), 'INVALID_VALUE', 'tail.npy');
      await expectTyped(() => readNpyFile(path, 'tail.npy'), 'INVALID_VALUE', 'tail.npy');
    }
  });

  test("a shape of more dims than a tensor may have (64) in a .npy or .safetensors file is INVALID_SHAPE naming the file (it was numel's refusal naming 'shape', which no caller passed, and a message that named no file); 64 dims read", async () => {
    const dir = folder();
    for (const dims of [64, 65, rng.int(66, 200)]) {
      const n = rng.int(0, 3);
      const shape = Array.from({ length: dims }, (_, i) => (i === 0 ? n : 1));
      const data = Uint8Array.from({ length: n }, () => rng.int(0, 256));
      const npy = npyFile(`{'descr': '|u1', 'fortran_order': False, 'shape': (${shape.join(', ')}), }\n`, data);
      const st = safetensorsFile({ t: { dtype: 'U8', shape, data_offsets: [0, n] } }, data);
      writeFileSync(join(dir, 'x.npy'), npy);
      writeFileSync(join(dir, 'x.safetensors'), st);
      if (dims <= 64) {
        for (const arr of [parseNpy(npy, 'x.npy'), await readNpyFile(join(dir, 'x.npy'))]) expect([arr.shape, Array.from(arr.data as Uint8Array)]).toEqual([shape, Array.from(data)]);
        for (const f of [parseSafetensors(st, 'x.safetensors'), await readSafetensorsFile(join(dir, 'x.safetensors'))]) expect([f.tensors.get('t')!.shape, Array.from(f.tensors.get('t')!.data as Uint8Array)]).toEqual([shape, Array.from(data)]);
        continue;
      }
      for (const [name, call] of [
        ['x.npy', () => parseNpy(npy, 'x.npy')],
        ['x.npy', () => readNpyFile(join(dir, 'x.npy'), 'x.npy')],
        ['x.safetensors', () => parseSafetensors(st, 'x.safetensors')],
        ['x.safetensors', () => readSafetensorsFile(join(dir, 'x.safetensors'), 'x.safetensors')],
      ] as const) {
        const e = await errorOf(call);
        expect(e, `${name} of ${dims} dims`).toBeInstanceOf(SparseMlaError);
        expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], `${name} of ${dims} dims`).toEqual(['INVALID_SHAPE', name]);
        expect((e as SparseMlaError).message, `${name} of ${dims} dims`).toMatch(new RegExp(`^${name.replace('.', '\\.')}: .*${dims} dims`));
      }
    }
  });
});

describe("a prefill folder of the library's two .safetensors files (session 55, helper-67)", () => {
  const folders: string[] = [];
  afterAll(() => {
    for (const d of folders) rmSync(d, { recursive: true, force: true });
  });
  const folder = (): string => {
    const d = mkdtempSync(join(tmpdir(), 'sparse-mla-h67s-'));
    folders.push(d);
    return d;
  };
  const bytesOf = (a: ArrayBufferView): number[] => Array.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  const prefill = () => {
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), dQK = rng.pick([4, 16]), sKV = rng.int(1, 6), topk = rng.int(1, 5), dV = rng.int(1, dQK + 1);
    const args = {
      q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
      kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
      indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.int(-1, sKV))),
      attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
      smScale: rng.uniform() + 0.01,
      dV,
    };
    const outputs = { out: tensor('bf16', [sQ, hQ, dV], randomBf16Bits(rng, sQ * hQ * dV)), lse: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())), maxLogits: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())) };
    return { args, outputs, shapes: { sQ, hQ, dV } };
  };

  test("writePrefillDir's prefill.safetensors and writePrefillOutputs' outputs.safetensors in one folder read back (loadPrefillInputs / loadPrefillOutputs refused the folder: 'expected at most one .safetensors file', so `sparse-mla prefill D --out D --format safetensors` then `verify D` was exit 2); a name in both, or sm_scale in both files' metadata without a meta.json, is INVALID_VALUE naming the folder; two .safetensors files besides outputs.safetensors stay refused", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs, shapes } = prefill();
    const dir = folder();
    await io.writePrefillDir(dir, args, { format: 'safetensors' });
    await io.writePrefillOutputs(dir, outputs, 'safetensors');
    expect(readdirSync(dir).sort()).toEqual(['outputs.safetensors', 'prefill.safetensors']);
    const back = await io.loadPrefillInputs(dir);
    expect([back.args.smScale, back.args.dV, back.files.meta, back.files.q]).toEqual([args.smScale, args.dV, 'prefill.safetensors:__metadata__', 'prefill.safetensors:q']);
    for (const k of ['q', 'kv', 'indices', 'attnSink'] as const) expect(bytesOf(back.args[k]!.data as ArrayBufferView), k).toEqual(bytesOf(args[k].data));
    const outs = await io.loadPrefillOutputs(dir, back.shapes);
    expect(outs.files).toEqual({ out: 'outputs.safetensors:out', lse: 'outputs.safetensors:lse', max_logits: 'outputs.safetensors:max_logits' });
    for (const k of ['out', 'lse', 'maxLogits'] as const) expect(bytesOf(outs[k].data as ArrayBufferView), k).toEqual(bytesOf(outputs[k].data));
    expect([back.shapes.sQ, back.shapes.hQ, back.shapes.dV]).toEqual([shapes.sQ, shapes.hQ, shapes.dV]);

    // the same name in two files: which one to read is not the library's to guess (the writers refuse to
    // make such a folder since 93b65ad: its second file is copied in, as an older library wrote it)
    const twice = folder();
    await io.writePrefillDir(twice, args, { format: 'safetensors', outputs });
    await expectTyped(() => io.writePrefillOutputs(twice, outputs, 'safetensors'), 'INVALID_VALUE', twice);
    await writtenBeside(twice, (d) => io.writePrefillOutputs(d, outputs, 'safetensors'));
    for (const call of [() => io.loadPrefillInputs(twice), () => io.loadPrefillOutputs(twice, shapes), () => io.PrefillDir.open(twice)]) {
      const e = await errorOf(call);
      expect(e).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument]).toEqual(['INVALID_VALUE', twice]);
      expect((e as SparseMlaError).message).toMatch(/tensor '(out|lse|max_logits)' is in both outputs\.safetensors and prefill\.safetensors/);
    }

    // sm_scale in both files' metadata: refused without a meta.json, meta.json's with one
    const scales = folder();
    writeFileSync(join(scales, 'a.safetensors'), encodeSafetensors({ q: args.q, kv: args.kv }, { sm_scale: String(args.smScale), d_v: String(args.dV) }));
    writeFileSync(join(scales, 'outputs.safetensors'), encodeSafetensors({ indices: args.indices }, { sm_scale: '1' }));
    await expectTyped(() => io.loadPrefillInputs(scales), 'INVALID_VALUE', 'meta.json');
    writeFileSync(join(scales, 'meta.json'), JSON.stringify({ sm_scale: args.smScale, d_v: args.dV }));
    const fromMeta = await io.loadPrefillInputs(scales);
    expect([fromMeta.args.smScale, fromMeta.files.meta, fromMeta.files.indices]).toEqual([args.smScale, 'meta.json', 'outputs.safetensors:indices']);

    // two .safetensors files neither of which is outputs.safetensors stay refused (which is the inputs' is not the library's to guess)
    writeFileSync(join(scales, 'b.safetensors'), encodeSafetensors({}));
    const e = await errorOf(() => io.loadPrefillInputs(scales));
    expect([(e as SparseMlaError).code, (e as SparseMlaError).argument]).toEqual(['INVALID_VALUE', scales]);
    expect((e as SparseMlaError).message).toContain('expected at most one .safetensors file besides outputs.safetensors, found a.safetensors, b.safetensors');
  });
});
