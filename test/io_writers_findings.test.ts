/**
 * What the API fuzzer found in the io module's writers (encodeNpy, tensorToNpy, npyToTensor,
 * encodeSafetensors, writeNpyFile, writeSafetensorsFile, writePrefillDir, writePrefillOutputs,
 * prepareOutputDir) and the paths they take, one focused case each: every one threw an untyped
 * error, wrote bytes it should not have, or left a folder half written before its fix. Each test
 * names its session in its describe. Moved from test/fuzz_findings.test.ts and
 * test/fuzz_findings_s59.test.ts.
 *
 * The writers of files (the io module's writeNpyFile, writeSafetensorsFile, writePrefillDir,
 * writePrefillOutputs, and the CLI's `--out`) write a fresh file beside the target and rename it over
 * the target, so that a symlink there is replaced, never written through. A target that was a device
 * node or a socket was replaced as well: `sparse-mla bench --out /dev/null` run as root unlinked the
 * system's /dev/null (a regular file of JSON in its place), and a server's socket path given as an
 * output was gone. SPEC §9: a bad path is refused with a message; nothing a caller passes may break
 * what it did not ask to write.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, lstatSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, tensor } from '../dist/index.js';
import type { SparsePrefillArgs, Tensor } from '../dist/index.js';
import { encodeNpy, encodeSafetensors, npyToTensor, parseNpy, parseSafetensors, prepareOutputFile, readNpyFile, readSafetensorsFile, tensorToNpy, writeNpyFile, writePrefillDir, writePrefillOutputs, writeSafetensorsFile } from '../dist/io/index.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { errorOf } from './helpers/errors.js';
import { expectTyped, replayFuzzCase } from './helpers/findings.js';

const rng = testRng('io_writers_findings');
const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));

let root: string;
const servers: Server[] = [];
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'smla-fuzz-s59-'));
});
afterAll(async () => {
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  rmSync(root, { recursive: true, force: true });
});

let n = 0;
const freshDir = (): string => {
  const d = join(root, `case-${n++}`);
  spawnSync('mkdir', ['-p', d]);
  return d;
};

/** A listening Unix socket at `path` (closed after the file's tests). */
async function socketAt(path: string): Promise<void> {
  const server = createServer();
  servers.push(server);
  await new Promise<void>((r) => server.listen(path, r));
}

/** A character device node at `path` (/dev/null's numbers), where this process may make one (root); false where not. */
function deviceAt(path: string): boolean {
  return spawnSync('mknod', ['-m', '666', path, 'c', '1', '3']).status === 0 && lstatSync(path).isCharacterDevice();
}
const canMakeDevices = (() => {
  const d = mkdtempSync(join(tmpdir(), 'smla-mknod-'));
  try {
    return deviceAt(join(d, 'probe'));
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
})();

/** A float32 tensor of fresh random values. */
function randomTensor(): Tensor<'float32'> {
  const shape = [rng.int(1, 5), rng.int(1, 9)];
  return tensor('float32', shape, Float32Array.from({ length: shape[0]! * shape[1]! }, () => rng.normal()));
}

/** What a path is now: its kind and, for a device, its device numbers. */
function kindAt(path: string): string {
  const s = lstatSync(path);
  if (s.isSocket()) return 'socket';
  if (s.isCharacterDevice()) return `char ${s.rdev}`;
  if (s.isFile()) return 'file';
  if (s.isSymbolicLink()) return 'symlink';
  return 'other';
}

const invalidNaming = (what: RegExp) => expect.objectContaining({ code: 'INVALID_VALUE', message: expect.stringMatching(what) });

describe("the file writers against hostile tensors the fuzzer's session-53 target reaches (session 53, helper-57)", () => {
  // each encoder's output read back by the library's reader: the tensors as given, by their memory
  const kinds = { bf16: Uint16Array, float32: Float32Array, int32: Int32Array, uint8: Uint8Array } as const;
  const randomTensor = (dtype: keyof typeof kinds, n: number): Tensor => {
    const data = new kinds[dtype](n);
    const bytes = new Uint8Array(data.buffer);
    for (let i = 0; i < bytes.length; i++) bytes[i] = rng.u32() & 0xff;
    return tensor(dtype, [n], data as never);
  };
  const bytesOf = (a: ArrayBufferView): number[] => Array.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));

  test('encodeNpy never copies bytes past its data\'s view: data of another kind than descr is INVALID_DTYPE (wrote the buffer\'s next bytes: encoders cases of seed 1064)', async () => {
    const n = rng.int(2, 9);
    // a Uint8Array view at the start of a larger buffer whose other bytes are someone else's
    const buffer = new ArrayBuffer(8 * n);
    const secret = new Uint8Array(buffer);
    for (let i = 0; i < secret.length; i++) secret[i] = 0xa0 | (rng.u32() & 0xf);
    const view = new Uint8Array(buffer, 0, n);
    for (const descr of ['<f4', '<u2', '<i4', '<i8'] as const) {
      await expectTyped(() => encodeNpy({ descr, shape: [n], data: view as never }), 'INVALID_DTYPE', 'arr.data');
    }
    // its own kind: exactly its n bytes
    const file = parseNpy(encodeNpy({ descr: '|u1', shape: [n], data: view }));
    expect(bytesOf(file.data)).toEqual(bytesOf(view));
  });

  test('encodeNpy / tensorToNpy: an unknown descr or dtype, a missing field, a plain array, a detached one, a shape a tensor cannot have are typed (TypeError, RangeError before)', async () => {
    const t = randomTensor('float32', 3);
    for (const descr of ['float32', 'constructor', '__proto__', undefined, 3]) await expectTyped(() => encodeNpy({ descr, shape: [3], data: t.data } as never), 'INVALID_DTYPE', 'arr.descr');
    await expectTyped(() => encodeNpy({ descr: '<f4', shape: [3], data: Array.from(t.data as Float32Array) } as never), 'INVALID_DTYPE', 'arr.data');
    await expectTyped(() => encodeNpy(null as never), 'INVALID_VALUE', 'arr');
    const detached = (t.data as Float32Array).slice();
    structuredClone(detached.buffer, { transfer: [detached.buffer] });
    await expectTyped(() => encodeNpy({ descr: '<f4', shape: [3], data: detached }), 'INVALID_VALUE', 'arr.data');
    for (const shape of [[1.5, 2], [-1, -3], [3n], '3']) await expectTyped(() => encodeNpy({ descr: '<f4', shape, data: t.data } as never), 'INVALID_SHAPE', 'arr.shape');
    for (const dtype of ['float64', 'constructor', undefined]) await expectTyped(() => tensorToNpy({ ...t, dtype } as never), 'INVALID_DTYPE', 't.dtype');
    await expectTyped(() => tensorToNpy({ dtype: 'bf16', shape: [3], data: t.data } as never), 'INVALID_DTYPE', 't.data');
    // npyToTensor, the reader's side: the same checks (a null arr was a TypeError, descr 'constructor' named 'dtype')
    await expectTyped(() => npyToTensor(null as never), 'INVALID_VALUE', 'arr');
    await expectTyped(() => npyToTensor({ descr: 'constructor', shape: [3], data: t.data } as never), 'INVALID_DTYPE', 'arr.descr');
    await expectTyped(() => npyToTensor({ descr: '<u2', shape: [3], data: t.data } as never), 'INVALID_DTYPE', 'arr.data');
    expect(Array.from(npyToTensor({ descr: '<f4', shape: [3], data: t.data as Float32Array }).data as Float32Array)).toEqual(Array.from(t.data as Float32Array));
  });

  test('encodeSafetensors: each tensor checked as tensor() checks one, before any byte is written (a dtype its data is not of gave a file whose spans overlap; an unknown dtype, a shape its data does not fill, a BigInt dim, a missing tensor were RangeError / TypeError or a file its reader refuses)', async () => {
    const good = { a: randomTensor('bf16', rng.int(1, 6)), b: randomTensor('float32', rng.int(1, 6)) };
    // its data is a Uint16Array: as float32 the header claimed twice its bytes
    await expectTyped(() => encodeSafetensors({ ...good, c: { dtype: 'float32', shape: [4], data: new Uint16Array(4) } } as never), 'INVALID_DTYPE', 'tensors["c"].data');
    // as uint8 its 4 Float32 elements took 16 bytes over a 4-byte span, into the next tensor's
    await expectTyped(() => encodeSafetensors({ c: { dtype: 'uint8', shape: [4], data: new Float32Array(4) }, ...good } as never), 'INVALID_DTYPE', 'tensors["c"].data');
    await expectTyped(() => encodeSafetensors({ ...good, c: { dtype: 'float64', shape: [1], data: new Float64Array(1) } } as never), 'INVALID_DTYPE', 'tensors["c"].dtype');
    await expectTyped(() => encodeSafetensors({ ...good, c: { dtype: 'int32', shape: [5], data: new Int32Array(4) } } as never), 'INVALID_SHAPE', 'tensors["c"].data');
    await expectTyped(() => encodeSafetensors({ ...good, c: { dtype: 'int32', shape: [4n], data: new Int32Array(4) } } as never), 'INVALID_SHAPE', 'tensors["c"].shape');
    await expectTyped(() => encodeSafetensors({ ...good, c: undefined } as never), 'INVALID_VALUE', 'tensors["c"]');
    await expectTyped(() => encodeSafetensors({ ...good, __metadata__: good.a } as never), 'INVALID_VALUE', 'tensors["__metadata__"]');
    await expectTyped(() => encodeSafetensors(null as never), 'INVALID_VALUE', 'tensors');
    await expectTyped(() => encodeSafetensors(good, { note: 3 } as never), 'INVALID_VALUE', 'metadata["note"]');
    // and what passes is read back as given: names in order (__proto__ a name like any other: the
    // header object's prototype setter took it, so its bytes were written under no name), dtypes, shapes, bytes
    const meta = { format: 'pt', note: String(rng.u32()) };
    Object.defineProperty(good, '__proto__', { value: randomTensor('int32', rng.int(1, 4)), enumerable: true });
    const file = parseSafetensors(encodeSafetensors(good, meta));
    expect([...file.tensors.keys()]).toEqual(['a', 'b', '__proto__']);
    expect(file.metadata).toEqual(meta);
    for (const [k, t] of Object.entries(good) as [string, Tensor][]) {
      const got = file.tensors.get(k)!;
      expect([got.dtype, got.shape]).toEqual([t.dtype, t.shape]);
      expect(bytesOf(got.data as ArrayBufferView)).toEqual(bytesOf(t.data as ArrayBufferView));
    }
  });

  test('encodeSafetensors: a getter of a later tensor that detaches an earlier one\'s buffer is INVALID_VALUE, not a TypeError mid-write', async () => {
    const a = randomTensor('int32', 4);
    const record = { a, get b() {
      structuredClone((a.data as Int32Array).buffer, { transfer: [(a.data as Int32Array).buffer] });
      return randomTensor('uint8', 2);
    } };
    await expectTyped(() => encodeSafetensors(record), 'INVALID_VALUE', 'tensors["a"].data');
  });

  test('writePrefillDir / writePrefillOutputs (by reading, after the encoders): everything checked before the first file, so a refusal leaves the directory as it was (a bad kv was refused after q.npy was written, naming t.data; null args a TypeError; an smScale NaN or a string written into meta.json)', async () => {
    const { readdirSync } = await import('node:fs');
    const { writePrefillDir, writePrefillOutputs, loadPrefillInputs } = await import('../dist/io/index.js');
    const sQ = rng.int(1, 3), hQ = rng.int(1, 3), sKV = rng.int(1, 5), topk = rng.int(1, 4);
    const args = { q: tensor('bf16', [sQ, hQ, 512], randomBf16Bits(rng, sQ * hQ * 512)), kv: tensor('bf16', [sKV, 512], randomBf16Bits(rng, sKV * 512)), indices: tensor('int32', [sQ, topk], new Int32Array(sQ * topk)), smScale: 0.04 };
    const cases: [string, unknown, string, string][] = [
      ['null args', null, 'INVALID_VALUE', 'args'],
      ['a kv shorter than its shape', { ...args, kv: { dtype: 'bf16', shape: [sKV + 1, 512], data: args.kv.data } }, 'INVALID_SHAPE', 'args.kv.data'],
      ['smScale NaN', { ...args, smScale: NaN }, 'INVALID_VALUE', 'args.smScale'],
      ['smScale a string', { ...args, smScale: '0.04' }, 'INVALID_VALUE', 'args.smScale'],
      ['dV 1.5', { ...args, dV: 1.5 }, 'INVALID_VALUE', 'args.dV'],
    ];
    for (const [label, given, code, argument] of cases) {
      const dir = mkdtempSync(join(tmpdir(), 'sparse-mla-h57-'));
      try {
        await expectTyped(() => writePrefillDir(dir, given as never), code, argument);
        expect(readdirSync(dir), label).toEqual([]);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
    const dir = mkdtempSync(join(tmpdir(), 'sparse-mla-h57-'));
    try {
      await expectTyped(() => writePrefillOutputs(dir, null as never), 'INVALID_VALUE', 'res');
      expect(readdirSync(dir)).toEqual([]);
      // a valid one is read back as written
      await writePrefillDir(dir, args);
      const back = await loadPrefillInputs(dir);
      expect([back.args.smScale, back.args.dV, back.shapes.sQ, back.shapes.sKV]).toEqual([0.04, 512, sQ, sKV]);
      expect(Array.from(back.args.q.data as Uint16Array)).toEqual(Array.from(args.q.data as Uint16Array));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("the io functions that take a path or a directory, under the fuzzer's fileWriters target (session 54, helper-64)", () => {
  const bf16 = (shape: number[]) => tensor('bf16', shape, randomBf16Bits(rng, shape.reduce((a, b) => a * b, 1)));
  const f32 = (shape: number[]) => tensor('float32', shape, Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal()));
  const bytesOf = (a: ArrayBufferView): number[] => Array.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  /** A prefill's inputs and outputs of random dims (dQK small, dV at most dQK). */
  const prefill = () => {
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), dQK = rng.pick([4, 16]), sKV = rng.int(1, 6), topk = rng.int(1, 5), dV = rng.int(1, dQK + 1);
    const args = {
      q: bf16([sQ, hQ, dQK]),
      kv: bf16([sKV, dQK]),
      indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.int(-1, sKV))),
      topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(0, topk + 1))),
      attnSink: f32([hQ]),
      smScale: rng.uniform() + 0.01,
      dV,
    };
    const outputs = { out: rng.uniform() < 0.5 ? bf16([sQ, hQ, dV]) : f32([sQ, hQ, dV]), lse: f32([sQ, hQ]), maxLogits: f32([sQ, hQ]) };
    return { args, outputs, dims: { sQ, hQ, dQK, sKV, topk, dV } };
  };
  const folders: string[] = [];
  const folder = (): string => {
    const d = mkdtempSync(join(tmpdir(), 'sparse-mla-h64-'));
    folders.push(d);
    return d;
  };
  afterAll(() => {
    for (const d of folders) rmSync(d, { recursive: true, force: true });
  });

  test("a path or directory that is no string is INVALID_VALUE naming it, before any file (writePrefillDir, writePrefillOutputs, writeNpyFile, prepareOutputDir: node's ERR_INVALID_ARG_TYPE TypeError before; loadPrefillInputs / loadPrefillOutputs: TypeError 'dir.require is not a function'; fileWriters seed 88 cases 33, 135, 338, 1258)", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs, dims } = prefill();
    const dir = folder();
    for (const bad of [123, null, undefined, {}, new String(dir), Symbol('dir'), 3n, () => dir]) {
      await expectTyped(() => io.writePrefillDir(bad as never, args), 'INVALID_VALUE', 'dir');
      await expectTyped(() => io.writePrefillOutputs(bad as never, outputs), 'INVALID_VALUE', 'dir');
      await expectTyped(() => io.writeNpyFile(bad as never, args.q), 'INVALID_VALUE', 'path');
      await expectTyped(() => io.prepareOutputDir(bad as never), 'INVALID_VALUE', 'dir');
      await expectTyped(() => io.loadPrefillInputs(bad as never), 'INVALID_VALUE', 'dir');
      await expectTyped(() => io.loadPrefillOutputs(bad as never, dims), 'INVALID_VALUE', 'dir');
    }
    expect(readdirSync(dir)).toEqual([]);
  });

  test("loadPrefillOutputs reads its shapes once and refuses any that are not counts before reading the directory (null was a TypeError from a destructuring; a Symbol dim a TypeError, an object whose toString throws the caller's error, from the message's template; fileWriters seed 88 cases 5, 347, 946, 1551)", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs, dims } = prefill();
    const dir = folder();
    await io.writePrefillDir(dir, args, { outputs });
    const thrower = { toString() { throw new Error('coerced'); } };
    const cases: [unknown, string][] = [
      [null, 'shapes'],
      [7, 'shapes'],
      [{ ...dims, hQ: Symbol('h') }, 'shapes.hQ'],
      [{ ...dims, dV: thrower }, 'shapes.dV'],
      [{ ...dims, sQ: NaN }, 'shapes.sQ'],
      [{ ...dims, sQ: -1 }, 'shapes.sQ'],
      [{ ...dims, dV: 2.5 }, 'shapes.dV'],
      [{ sQ: dims.sQ, hQ: dims.hQ }, 'shapes.dV'],
    ];
    for (const [shapes, argument] of cases) await expectTyped(() => io.loadPrefillOutputs(dir, shapes as never), 'INVALID_VALUE', argument);
    // read once: a getter answering another count after its first read changes nothing
    let reads = 0;
    const once = { sQ: dims.sQ, hQ: dims.hQ, get dV() { return reads++ === 0 ? dims.dV : Symbol('later') as never; } };
    const back = await io.loadPrefillOutputs(dir, once);
    expect(reads).toBe(1);
    expect([bytesOf(back.out.data), bytesOf(back.lse.data), bytesOf(back.maxLogits.data)]).toEqual([bytesOf(outputs.out.data), bytesOf(outputs.lse.data), bytesOf(outputs.maxLogits.data)]);
  });

  test("writePrefillDir / writePrefillOutputs refuse, before any file, what their readers refuse: tensors whose dims disagree, dV past dQK, outputs of other dims, an unknown format (they wrote directories loadPrefillInputs / loadPrefillOutputs refuse, and npy files for format 'Safetensors' or a String object; fileWriters seed 88 cases 555, 1812, 1943, 3188); what they take is read back exactly", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs, dims } = prefill();
    const { sQ, hQ, dQK, sKV, dV } = dims;
    const cases: [string, unknown, unknown, string, string][] = [
      ['kv of another dQK', { ...args, kv: bf16([sKV, dQK + 1]) }, undefined, 'INVALID_SHAPE', 'args.kv'],
      ['q of rank 2', { ...args, q: bf16([sQ, hQ * dQK]) }, undefined, 'INVALID_SHAPE', 'args.q'],
      ['q float32', { ...args, q: f32([sQ, hQ, dQK]) }, undefined, 'INVALID_DTYPE', 'args.q'],
      ['indices of other rows', { ...args, indices: tensor('int32', [sQ + 1, 2], new Int32Array(2 * sQ + 2)) }, undefined, 'INVALID_SHAPE', 'args.indices'],
      ['indices float32', { ...args, indices: f32([sQ, 2]) }, undefined, 'INVALID_DTYPE', 'args.indices'],
      ['topkLength of other rows', { ...args, topkLength: tensor('int32', [sQ + 2], new Int32Array(sQ + 2)) }, undefined, 'INVALID_SHAPE', 'args.topkLength'],
      ['a sink of other heads', { ...args, attnSink: f32([hQ + 1]) }, undefined, 'INVALID_SHAPE', 'args.attnSink'],
      ['dV past dQK', { ...args, dV: dQK + 1 }, undefined, 'INVALID_VALUE', 'args.dV'],
      ['dV 2^32', { ...args, dV: 2 ** 32 }, undefined, 'INVALID_VALUE', 'args.dV'],
      ['outputs of another dV', args, { outputs: { ...outputs, out: f32([sQ, hQ, dV + 1]) } }, 'INVALID_SHAPE', 'opts.outputs.out'],
      ['lse of other heads', args, { outputs: { ...outputs, lse: f32([sQ, hQ + 1]) } }, 'INVALID_SHAPE', 'opts.outputs.lse'],
      ['format Safetensors', args, { format: 'Safetensors' }, 'INVALID_VALUE', 'opts.format'],
      ['format a String object', args, { format: new String('safetensors') }, 'INVALID_VALUE', 'opts.format'],
    ];
    for (const [label, given, opts, code, argument] of cases) {
      const dir = folder();
      const e = await errorOf(() => io.writePrefillDir(dir, given as never, opts as never));
      expect(e, label).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], label).toEqual([code, argument]);
      expect(readdirSync(dir), label).toEqual([]);
    }
    const outCases: [string, unknown, unknown, string, string][] = [
      ['out of rank 2', { ...outputs, out: f32([sQ, hQ]) }, undefined, 'INVALID_SHAPE', 'res.out'],
      ['maxLogits of other rows', { ...outputs, maxLogits: f32([sQ + 1, hQ]) }, undefined, 'INVALID_SHAPE', 'res.maxLogits'],
      ['lse bf16', { ...outputs, lse: bf16([sQ, hQ]) }, undefined, 'INVALID_DTYPE', 'res.lse'],
      ['format x', outputs, 'x', 'INVALID_VALUE', 'format'],
    ];
    for (const [label, given, format, code, argument] of outCases) {
      const dir = folder();
      const e = await errorOf(() => io.writePrefillOutputs(dir, given as never, format as never));
      expect(e, label).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], label).toEqual([code, argument]);
      expect(readdirSync(dir), label).toEqual([]);
    }
    // what they take reads back exactly, in either format
    for (const format of ['npy', 'safetensors'] as const) {
      const dir = folder();
      await io.writePrefillDir(dir, args, { format, outputs });
      const back = await io.loadPrefillInputs(dir);
      expect([back.args.smScale, back.args.dV, back.shapes]).toEqual([args.smScale, dV, dims]);
      for (const k of ['q', 'kv', 'indices', 'topkLength', 'attnSink'] as const) expect(bytesOf(back.args[k]!.data as ArrayBufferView), k).toEqual(bytesOf(args[k].data));
      const outs = await io.loadPrefillOutputs(dir, back.shapes);
      for (const k of ['out', 'lse', 'maxLogits'] as const) expect([outs[k].dtype, bytesOf(outs[k].data)], k).toEqual([outputs[k].dtype, bytesOf(outputs[k].data)]);
      const only = folder();
      expect(await io.writePrefillOutputs(only, outputs, format)).toEqual(format === 'npy' ? ['out.npy', 'lse.npy', 'max_logits.npy'] : ['outputs.safetensors']);
    }
  });

  test("PrefillDir (by reading, after the fileWriters finding): open() of a path that is no string, and has / get / require of a name that is no string, are INVALID_VALUE naming dir / name (a Symbol was a TypeError from a message's template, an object refused with the argument the object itself and the message '[object Object]: ...', a name whose toString throws the caller's error)", async () => {
    const io = await import('../dist/io/index.js');
    const { args } = prefill();
    const dir = folder();
    await io.writePrefillDir(dir, args);
    for (const bad of [Symbol('dir'), {}, 7, null]) await expectTyped(() => io.PrefillDir.open(bad as never), 'INVALID_VALUE', 'dir');
    const d = await io.PrefillDir.open(dir);
    for (const bad of [Symbol('q'), { toString() { throw new Error('coerced'); } }, 0, undefined]) {
      await expectTyped(() => d.has(bad as never), 'INVALID_VALUE', 'name');
      await expectTyped(() => d.get(bad as never), 'INVALID_VALUE', 'name');
      await expectTyped(() => d.require(bad as never), 'INVALID_VALUE', 'name');
    }
    expect(bytesOf((await d.require('q')).value.data)).toEqual(bytesOf(args.q.data));
  });

  test("writePrefillDir: a getter read after q was checked that detaches q's buffer is INVALID_VALUE naming args.q.data, with the directory as it was (q.npy was written, then the refusal: fileWriters seed 88 case 3645, a hard input-written)", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs } = prefill();
    const q = args.q.data as Uint16Array;
    const dir = folder();
    const detaching = { ...outputs, get out() {
      structuredClone(q.buffer, { transfer: [q.buffer] });
      return outputs.out;
    } };
    await expectTyped(() => io.writePrefillDir(dir, args, { outputs: detaching }), 'INVALID_VALUE', 'args.q.data');
    expect(readdirSync(dir)).toEqual([]);
    const replayed = await replayFuzzCase(['--backends', 'wasm', '--targets', 'fileWriters'], 88, 3645);
    expect(replayed.verdict).not.toBe('finding');
  }, 60_000);
});

describe('prefill writers over a folder whose file names are taken by directories (session 55, helper-67)', () => {
  const folders: string[] = [];
  afterAll(() => {
    for (const d of folders) rmSync(d, { recursive: true, force: true });
  });
  const bf16 = (shape: number[]) => tensor('bf16', shape, randomBf16Bits(rng, shape.reduce((a, b) => a * b, 1)));
  const f32 = (shape: number[]) => tensor('float32', shape, Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal()));
  /** A prefill's inputs and outputs of random dims (dQK small). */
  const prefill = () => {
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), dQK = rng.pick([4, 16]), sKV = rng.int(1, 6), topk = rng.int(1, 5);
    const args = { q: bf16([sQ, hQ, dQK]), kv: bf16([sKV, dQK]), indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => rng.int(-1, sKV))), attnSink: f32([hQ]), smScale: rng.uniform() + 0.01, dV: dQK };
    const outputs = { out: f32([sQ, hQ, dQK]), lse: f32([sQ, hQ]), maxLogits: f32([sQ, hQ]) };
    return { args, outputs };
  };
  /** Every file of `dir` by name with its bytes (a directory as 'dir'). */
  const contents = async (dir: string): Promise<Record<string, string>> => {
    const { readFileSync, statSync } = await import('node:fs');
    return Object.fromEntries(readdirSync(dir).sort().map((f) => [f, statSync(join(dir, f)).isDirectory() ? 'dir' : readFileSync(join(dir, f)).toString('base64')]));
  };

  test('writePrefillDir / writePrefillOutputs are refused before their first file when one of their names is a directory there, the older dump in the folder left as it was (they wrote the files before it, then were refused at the rename: a folder of new and old files)', async () => {
    const io = await import('../dist/io/index.js');
    const { mkdirSync } = await import('node:fs');
    const cases: [string, string[], (dir: string) => Promise<unknown>][] = [];
    const fresh = prefill();
    cases.push(['writePrefillDir', ['q.npy', 'kv.npy', 'indices.npy', 'attn_sink.npy', 'meta.json'], (d) => io.writePrefillDir(d, fresh.args)]);
    cases.push(['writePrefillDir with outputs', ['q.npy', 'kv.npy', 'indices.npy', 'attn_sink.npy', 'out.npy', 'lse.npy', 'max_logits.npy', 'meta.json'], (d) => io.writePrefillDir(d, fresh.args, { outputs: fresh.outputs })]);
    cases.push(['writePrefillDir as safetensors', ['prefill.safetensors'], (d) => io.writePrefillDir(d, fresh.args, { format: 'safetensors' })]);
    cases.push(['writePrefillOutputs', ['out.npy', 'lse.npy', 'max_logits.npy'], (d) => io.writePrefillOutputs(d, fresh.outputs)]);
    cases.push(['writePrefillOutputs as safetensors', ['outputs.safetensors'], (d) => io.writePrefillOutputs(d, fresh.outputs, 'safetensors')]);
    for (const [label, names, write] of cases) {
      // the taken name: the last one (every file before it was written) or another
      for (const taken of new Set([names[names.length - 1]!, rng.pick(names)])) {
        const dir = mkdtempSync(join(tmpdir(), 'sparse-mla-h67w-'));
        folders.push(dir);
        const older = prefill();
        await io.writePrefillDir(dir, older.args, { outputs: older.outputs });
        rmSync(join(dir, taken), { force: true });
        mkdirSync(join(dir, taken));
        const before = await contents(dir);
        const e = await errorOf(() => write(dir));
        expect(e, `${label}, ${taken} a directory`).toBeInstanceOf(SparseMlaError);
        expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], `${label}, ${taken}`).toEqual(['INVALID_VALUE', join(dir, taken)]);
        expect(await contents(dir), `${label}, ${taken}`).toEqual(before);
      }
    }
    // with the names free, each writes its files (read back as written)
    const dir = mkdtempSync(join(tmpdir(), 'sparse-mla-h67w-'));
    folders.push(dir);
    await io.writePrefillDir(dir, fresh.args, { outputs: fresh.outputs });
    const back = await io.loadPrefillInputs(dir);
    expect(new Uint8Array(back.args.q.data.buffer)).toEqual(new Uint8Array(fresh.args.q.data.buffer));
    expect(back.args.smScale).toBe(fresh.args.smScale);
  });
});

describe('writers: an output path that is a socket or a device is refused, not replaced (session 59, helper-86, by hand while writing the shardedDevice target)', () => {
  test('writeNpyFile and writeSafetensorsFile onto a listening socket: INVALID_VALUE naming it, the socket still there', async () => {
    const d = freshDir();
    for (const [name, write] of [
      ['t.npy', (p: string, t: Tensor) => writeNpyFile(p, t)],
      ['t.safetensors', (p: string, t: Tensor) => writeSafetensorsFile(p, { t })],
    ] as const) {
      const p = join(d, name);
      await socketAt(p);
      await expect(write(p, randomTensor())).rejects.toEqual(invalidNaming(/got a socket/));
      expect(kindAt(p)).toBe('socket');
    }
    expect(readdirSync(d).sort()).toEqual(['t.npy', 't.safetensors']); // no temporary file left
  });

  test.skipIf(!canMakeDevices)('writeNpyFile onto a character device (/dev/null\'s numbers, made with mknod): INVALID_VALUE, the device node still there', async () => {
    const d = freshDir();
    const p = join(d, 'null');
    expect(deviceAt(p)).toBe(true);
    const before = kindAt(p);
    await expect(writeNpyFile(p, randomTensor())).rejects.toEqual(invalidNaming(/got a character device/));
    expect(kindAt(p)).toBe(before);
  });

  test('writePrefillDir and writePrefillOutputs into a folder where one output name is a socket: refused before any file is written', async () => {
    const [sQ, hQ] = [rng.int(1, 4), rng.int(1, 3)];
    const args: SparsePrefillArgs = randomPrefillArgs(rng, { sQ, hQ, dQK: 576, topk: 8, sKV: 16 });
    const outputs = {
      out: tensor('bf16', [sQ, hQ, 512], new Uint16Array(sQ * hQ * 512).map(() => rng.u32() & 0x7f7f)),
      lse: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())),
      maxLogits: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())),
    };
    for (const [format, taken] of [
      ['npy', 'kv.npy'],
      ['safetensors', 'prefill.safetensors'],
    ] as const) {
      const d = freshDir();
      await socketAt(join(d, taken));
      await expect(writePrefillDir(d, args, { format })).rejects.toEqual(invalidNaming(/got a socket/));
      expect(readdirSync(d)).toEqual([taken]);
      expect(kindAt(join(d, taken))).toBe('socket');
    }
    const d = freshDir();
    await socketAt(join(d, 'lse.npy'));
    await expect(writePrefillOutputs(d, outputs)).rejects.toEqual(invalidNaming(/lse\.npy.*got a socket/));
    expect(readdirSync(d)).toEqual(['lse.npy']);
  });

  test('`sparse-mla bench --out <socket>`: exit 2 with a message before any work, the socket still there', async () => {
    const d = freshDir();
    const p = join(d, 'bench.json');
    await socketAt(p);
    // the child runs while this process's server listens: asynchronously, so the server is served
    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [MAIN, 'bench', '--backend', 'wasm', '--workers', '1', '--queries', '1', '--out', p, '-q'], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (b: Buffer) => (stderr += b));
      child.on('close', (code: number | null) => resolve({ code, stderr }));
    });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/sparse-mla bench: --out: expected a file path to write, got a socket/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(kindAt(p)).toBe('socket');
  });

  // helper-86's design question, settled by the lead: /dev/stdout is a symlink, so the rename would
  // replace it (as root, the system's own). Checked with prepareOutputFile, which writes nothing, so a
  // regression fails here without touching /dev; the write itself through /proc/self/fd/N, where a
  // rename cannot land either way.
  test.skipIf(process.platform !== 'linux')('paths in /dev and /proc (/dev/stdout, /dev/fd/1, /proc/self/fd/N) are refused before any write', async () => {
    for (const p of ['/dev/stdout', '/dev/stderr', '/dev/fd/1', '/proc/self/fd/1']) {
      const err = await prepareOutputFile(p, '--out').then(() => null, (e: unknown) => e);
      expect(err, p).toMatchObject({ code: 'INVALID_VALUE' });
      // /dev/fd and /proc/self/fd take no new files: their folder's check refuses them first
      if (p === '/dev/stdout' || p === '/dev/stderr') expect(String((err as Error).message), p).toMatch(/a path in \/dev /);
    }
    expect(lstatSync('/dev/stdout').isSymbolicLink()).toBe(true);
    const d = freshDir();
    const fd = openSync(join(d, 'behind-fd.npy'), 'w');
    try {
      const err = await writeNpyFile(`/proc/self/fd/${fd}`, randomTensor()).then(() => null, (e: unknown) => e);
      expect(err).toMatchObject({ code: 'INVALID_VALUE' });
    } finally {
      closeSync(fd);
    }
    expect(readFileSync(join(d, 'behind-fd.npy')).length).toBe(0);
  });

  test("what the writers still replace (the rename's purpose): a regular file and a symlink at the target, each read back as written, the symlink's target untouched", async () => {
    const d = freshDir();
    const outside = join(d, 'outside.txt');
    writeFileSync(outside, 'outside');
    writeFileSync(join(d, 'a.npy'), 'an older file');
    symlinkSync(outside, join(d, 'b.npy'));
    for (const name of ['a.npy', 'b.npy']) {
      const t = randomTensor();
      await writeNpyFile(join(d, name), t);
      expect(kindAt(join(d, name))).toBe('file');
      const back = await readNpyFile(join(d, name));
      expect(Array.from(back.data as Float32Array)).toEqual(Array.from(t.data));
    }
    expect(readFileSync(outside, 'utf8')).toBe('outside');
    const t = randomTensor();
    await writeSafetensorsFile(join(d, 'c.safetensors'), { t });
    expect(Array.from((await readSafetensorsFile(join(d, 'c.safetensors'))).tensors.get('t')!.data as Float32Array)).toEqual(Array.from(t.data));
  });
});
