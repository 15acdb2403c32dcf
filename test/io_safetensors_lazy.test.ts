/**
 * A prefill folder's .safetensors files are read header first, tensors when asked: PrefillDir.open
 * (and loadPrefillInputs through it) reads the 8-byte length, then the JSON header (capped), and a
 * tensor's bytes only when get() asks for that tensor, at offsets checked against the file's size,
 * from the same file (one replaced or resized since is refused). Opening read every tensor: a folder
 * beside a large model file read all of it, or failed to allocate it.
 *
 * What was read is counted, not timed: every read of a file handle in this process is recorded
 * with the file it read (through /proc/self/fd), so the count is exact whatever the machine.
 */
import { closeSync, openSync, readlinkSync, realpathSync, renameSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SparseMlaError, tensor } from '../dist/index.js';
import type { Tensor } from '../dist/index.js';
import { PrefillDir, encodeSafetensors, loadPrefillInputs, readSafetensorsHeader, readSafetensorsTensor } from '../dist/io/index.js';
import { randomBf16Bits, randomIndices, testRng } from './helpers/random.js';
import { errorOf } from './helpers/errors.js';
import { tempDirs } from './helpers/temp_dirs.js';

const rng = testRng('io_safetensors_lazy');
const tempDir = tempDirs('smla-io-lazy-');

/** Bytes read per file path, and the whole-file reads (readFile, streams) by path. */
const readBytes = new Map<string, number>();
const wholeReads: string[] = [];
const restore: (() => void)[] = [];

function pathOfFd(fd: number): string {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return `fd ${fd}`;
  }
}

beforeAll(async () => {
  // the FileHandle class's prototype, from a handle of this file
  const h = await open(new URL(import.meta.url).pathname, 'r');
  const proto = Object.getPrototypeOf(h) as Record<string, (...a: unknown[]) => unknown>;
  await h.close();
  const read = proto.read!;
  proto.read = async function (this: { fd: number }, ...a: unknown[]) {
    const path = pathOfFd(this.fd);
    const r = (await read.apply(this, a)) as { bytesRead: number };
    readBytes.set(path, (readBytes.get(path) ?? 0) + r.bytesRead);
    return r;
  };
  restore.push(() => (proto.read = read));
  for (const name of ['readFile', 'readv', 'readLines', 'createReadStream', 'readableWebStream']) {
    const f = proto[name];
    if (typeof f !== 'function') continue;
    proto[name] = function (this: { fd: number }, ...a: unknown[]) {
      const path = pathOfFd(this.fd);
      // this file's folders only (the test runner reads its own files in this process too)
      if (path.includes('smla-io-lazy-')) wholeReads.push(`${name} ${path}`);
      return f.apply(this, a);
    };
    restore.push(() => (proto[name] = f));
  }
});
afterAll(() => restore.forEach((r) => r()));

/** What was read from `path` while `fn` ran. */
async function bytesReadDuring<T>(path: string, fn: () => Promise<T>): Promise<{ value: T; bytes: number }> {
  const key = realpathSync(path);
  const before = readBytes.get(key) ?? 0;
  const value = await fn();
  return { value, bytes: (readBytes.get(key) ?? 0) - before };
}

const ITEM = { BF16: 2, F32: 4, I32: 4, U8: 1 } as const;
type St = keyof typeof ITEM;

/** The header block this test writes: its JSON padded with spaces to a fixed length, so spans can be planned before it is written. */
const HEADER_BYTES = 4096;

interface Planned {
  path: string;
  /** the small tensors, written; the last (big) one is left as the file's holes */
  small: Record<string, Tensor>;
  /** bytes of the small tensors' data */
  smallBytes: number;
  fileBytes: number;
}

/**
 * A prefill folder's prefill.safetensors of `fileBytes` bytes (a sparse file): q, kv, indices and
 * attn_sink (small, random), then `big`, a U8 tensor filling the rest, or ending `bigEndsAt` past the
 * data's start (a header that points past the file); sm_scale and d_v in __metadata__.
 */
function plannedFolder(dir: string, fileBytes: number, bigEndsAt?: number): Planned {
  const sQ = 3, hQ = 2, dQK = 64, sKV = 16, topk = 4;
  const small: Record<string, Tensor> = {
    q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
    indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, {})),
    attn_sink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
  };
  const st: Record<string, St> = { q: 'BF16', kv: 'BF16', indices: 'I32', attn_sink: 'F32' };
  const header: Record<string, unknown> = { __metadata__: { sm_scale: '0.125', d_v: String(dQK) } };
  let offset = 0;
  const parts: [number, Uint8Array][] = [];
  for (const [k, t] of Object.entries(small)) {
    const d = t.data as ArrayBufferView;
    const bytes = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
    expect(bytes.length).toBe(t.shape.reduce((a, b) => a * b, 1) * ITEM[st[k]!]);
    header[k] = { dtype: st[k], shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    parts.push([offset, bytes]);
    offset += bytes.length;
  }
  const dataBytes = fileBytes - 8 - HEADER_BYTES;
  const bigEnd = bigEndsAt ?? dataBytes;
  header.big = { dtype: 'U8', shape: [bigEnd - offset], data_offsets: [offset, bigEnd] };
  const json = JSON.stringify(header);
  expect(json.length).toBeLessThan(HEADER_BYTES);
  const head = new Uint8Array(8 + HEADER_BYTES);
  new DataView(head.buffer).setBigUint64(0, BigInt(HEADER_BYTES), true);
  head.set(new TextEncoder().encode(json.padEnd(HEADER_BYTES, ' ')), 8);
  const path = join(dir, 'prefill.safetensors');
  const fd = openSync(path, 'w');
  writeSync(fd, head, 0, head.length, 0);
  for (const [off, bytes] of parts) writeSync(fd, bytes, 0, bytes.length, 8 + HEADER_BYTES + off);
  closeSync(fd);
  truncateSync(path, fileBytes);
  expect(statSync(path).size).toBe(fileBytes);
  return { path, small, smallBytes: offset, fileBytes };
}

const bytesOf = (t: Tensor): Uint8Array => {
  const d = t.data as ArrayBufferView;
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
};

describe('a large .safetensors file is opened by its header alone', () => {
  for (const [label, size] of [['2^27 bytes', 2 ** 27], ['2^33 bytes', 2 ** 33]] as const) {
    test(`${label}, its last tensor filling the file: open reads 8 + the header, get and loadPrefillInputs only the tensors asked for`, async () => {
      const dir = tempDir();
      const p = plannedFolder(dir, size);
      const opened = await bytesReadDuring(p.path, () => PrefillDir.open(dir));
      expect(opened.bytes).toBe(8 + HEADER_BYTES);
      const d = opened.value;
      expect(d.has('big')).toBe(true);
      expect(d.has('q')).toBe(true);

      const q = await bytesReadDuring(p.path, () => d.get('q'));
      expect(q.bytes).toBe(p.small.q!.data.byteLength);
      expect(q.value!.file).toBe('prefill.safetensors:q');
      expect(bytesOf(q.value!.value)).toEqual(bytesOf(p.small.q!));

      // the folder's inputs through the open handle: q, kv, indices and attn_sink, each once, never big
      const loaded = await bytesReadDuring(p.path, () => loadPrefillInputs(d));
      expect(loaded.bytes).toBe(p.smallBytes);
      expect(loaded.value.shapes).toEqual({ sQ: 3, hQ: 2, dQK: 64, sKV: 16, topk: 4, dV: 64 });
      expect(loaded.value.args.smScale).toBe(0.125);
      for (const k of ['q', 'kv', 'indices'] as const) expect(bytesOf(loaded.value.args[k]), k).toEqual(bytesOf(p.small[k]!));
      expect(bytesOf(loaded.value.args.attnSink!)).toEqual(bytesOf(p.small.attn_sink!));

      // by path: opened again, still the header and the inputs only
      const byPath = await bytesReadDuring(p.path, () => loadPrefillInputs(dir));
      expect(byPath.bytes).toBe(8 + HEADER_BYTES + p.smallBytes);

      // the header on its own: every tensor's dtype and shape, no data
      const h = await bytesReadDuring(p.path, () => readSafetensorsHeader(p.path, 'prefill.safetensors'));
      expect(h.bytes).toBe(8 + HEADER_BYTES);
      expect(h.value.tensors.get('big')).toEqual({ dtype: 'uint8', shape: [size - 8 - HEADER_BYTES - p.smallBytes] });
      expect(h.value.metadata).toEqual({ sm_scale: '0.125', d_v: '64' });
      const kv = await bytesReadDuring(p.path, () => readSafetensorsTensor(h.value, 'kv'));
      expect(kv.bytes).toBe(p.small.kv!.data.byteLength);
      expect(bytesOf(kv.value)).toEqual(bytesOf(p.small.kv!));
      expect(wholeReads).toEqual([]);
    });
  }

  test('a header whose last tensor ends past the 2^33-byte file: refused at open naming the file, 8 + the header read', async () => {
    const dir = tempDir();
    const p = plannedFolder(dir, 2 ** 33, 2 ** 40);
    const r = await bytesReadDuring(p.path, () => errorOf(() => PrefillDir.open(dir)));
    expect(r.value).toBeInstanceOf(SparseMlaError);
    expect((r.value as SparseMlaError).code).toBe('INVALID_VALUE');
    expect((r.value as SparseMlaError).message).toMatch(/^prefill\.safetensors: not a valid \.safetensors file \(tensor 'big': data_offsets \[\d+,1099511627776\] outside the \d+ data bytes\)$/);
    expect(r.bytes).toBe(8 + HEADER_BYTES);
  });

  test('a header length over the cap in a 2^33-byte file: refused, 8 bytes read', async () => {
    const dir = tempDir();
    const path = join(dir, 'x.safetensors');
    for (const len of [100_000_001n, 2n ** 32n, 2n ** 63n]) {
      const head = new Uint8Array(8);
      new DataView(head.buffer).setBigUint64(0, len, true);
      writeFileSync(path, head);
      truncateSync(path, 2 ** 33);
      const r = await bytesReadDuring(path, () => errorOf(() => PrefillDir.open(dir)));
      expect(r.value, String(len)).toBeInstanceOf(SparseMlaError);
      expect((r.value as SparseMlaError).message).toBe(`x.safetensors: not a valid .safetensors file (a header of ${len} bytes, over the format's cap of 100000000)`);
      expect(r.bytes).toBe(8);
    }
  });
});

describe('a tensor read when asked is read from the file whose header was read', () => {
  const small = (): Record<string, Tensor> => ({
    q: tensor('bf16', [2, 3], randomBf16Bits(rng, 6)),
    s: tensor('float32', [4], Float32Array.from({ length: 4 }, () => rng.normal())),
  });

  test('the file resized or replaced since open: get is INVALID_VALUE naming it, nothing read at the old offsets', async () => {
    const dir = tempDir();
    const path = join(dir, 'outputs.safetensors');
    const first = small();
    writeFileSync(path, encodeSafetensors(first));
    const d = await PrefillDir.open(dir);
    expect(bytesOf((await d.get('s'))!.value)).toEqual(bytesOf(first.s!));

    // another file of the same size renamed over it
    const other = small();
    writeFileSync(join(dir, 'next'), encodeSafetensors(other));
    expect(statSync(join(dir, 'next')).size).toBe(statSync(path).size);
    renameSync(join(dir, 'next'), path);
    const replaced = await bytesReadDuring(path, () => errorOf(() => d.get('q')));
    expect(replaced.value).toBeInstanceOf(SparseMlaError);
    expect([(replaced.value as SparseMlaError).code, (replaced.value as SparseMlaError).message]).toEqual(['INVALID_VALUE', 'outputs.safetensors: the file was replaced by another file since its header was read']);
    expect(replaced.bytes).toBe(0);

    // the same file grown (2^33, sparse) or cut short
    const d2 = await PrefillDir.open(dir);
    const size = statSync(path).size;
    for (const to of [2 ** 33, size - 1]) {
      truncateSync(path, to);
      const r = await bytesReadDuring(path, () => errorOf(() => d2.get('s')));
      expect([(r.value as SparseMlaError).code, (r.value as SparseMlaError).message]).toEqual(['INVALID_VALUE', `outputs.safetensors: the file was resized from ${size} to ${to} bytes since its header was read`]);
      expect(r.bytes).toBe(0);
    }
    // the same bytes written back into the same file: read again
    writeFileSync(path, encodeSafetensors(other));
    expect(bytesOf((await d2.get('s'))!.value)).toEqual(bytesOf(other.s!));
  });

  test('readSafetensorsTensor: a header it did not read, or a name not in it, is INVALID_VALUE; the checked spans are its own', async () => {
    const dir = tempDir();
    const path = join(dir, 'a.safetensors');
    const t = small();
    writeFileSync(path, encodeSafetensors(t));
    writeFileSync(join(dir, 'b.safetensors'), encodeSafetensors(small()));
    const h = await readSafetensorsHeader(path, 'a.safetensors');
    const forged = { ...h };
    const e1 = await errorOf(() => readSafetensorsTensor(forged, 'q'));
    expect([(e1 as SparseMlaError).code, (e1 as SparseMlaError).argument]).toEqual(['INVALID_VALUE', 'header']);
    const e2 = await errorOf(() => readSafetensorsTensor(h, 'nope'));
    expect([(e2 as SparseMlaError).code, (e2 as SparseMlaError).message]).toEqual(['INVALID_VALUE', "a.safetensors: no tensor 'nope' in its header"]);
    // a caller's edits to the header it was given change nothing read
    (h as { path: string }).path = join(dir, 'b.safetensors');
    (h.tensors.get('q') as { shape: number[] }).shape = [6, 1];
    const q = await readSafetensorsTensor(h, 'q');
    expect(q.shape).toEqual([2, 3]);
    expect(bytesOf(q)).toEqual(bytesOf(t.q!));
  });
});
