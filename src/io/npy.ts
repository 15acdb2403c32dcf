/**
 * NumPy `.npy` files (format version 1.0 written; 1.0–3.0 read), C order, little-endian.
 * bf16 tensors travel as their raw bits in `<u2` arrays (NumPy has no bf16).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { SparseMlaError } from '../errors.js';
import { numel, tensor } from '../tensor.js';
import type { DType, DTypeArrays, Tensor } from '../types.js';

/** The element types this library reads and writes. */
export type NpyDescr = '<u2' | '<f4' | '<i4' | '<i8' | '|u1';

export interface NpyArray {
  descr: NpyDescr;
  shape: number[];
  data: Uint16Array | Float32Array | Int32Array | BigInt64Array | Uint8Array;
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY

const DESCRS: Record<NpyDescr, { bytes: number; make: (buf: ArrayBuffer) => NpyArray['data'] }> = {
  '<u2': { bytes: 2, make: (b) => new Uint16Array(b) },
  '<f4': { bytes: 4, make: (b) => new Float32Array(b) },
  '<i4': { bytes: 4, make: (b) => new Int32Array(b) },
  '<i8': { bytes: 8, make: (b) => new BigInt64Array(b) },
  '|u1': { bytes: 1, make: (b) => new Uint8Array(b) },
};

/** What each tensor dtype is stored as. */
export const NPY_DESCR_OF: Record<DType, NpyDescr> = { bf16: '<u2', float32: '<f4', int32: '<i4', int64: '<i8', uint8: '|u1' };

function garbled(name: string, what: string): never {
  throw new SparseMlaError('INVALID_VALUE', `${name}: not a valid .npy file (${what})`, name);
}

/** Parse the bytes of a .npy file. `name` (the file) appears in every error. */
export function parseNpy(bytes: Uint8Array, name = 'array.npy'): NpyArray {
  if (bytes.length < 10 || MAGIC.some((m, i) => bytes[i] !== m)) garbled(name, 'missing the \\x93NUMPY magic');
  const major = bytes[6]!;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerLen: number, headerStart: number;
  if (major === 1) {
    headerLen = dv.getUint16(8, true);
    headerStart = 10;
  } else if (major === 2 || major === 3) {
    if (bytes.length < 12) garbled(name, 'truncated header');
    headerLen = dv.getUint32(8, true);
    headerStart = 12;
  } else {
    garbled(name, `unknown format version ${major}.${bytes[7]}`);
  }
  if (headerStart + headerLen > bytes.length) garbled(name, 'truncated header');
  const header = new TextDecoder(major === 3 ? 'utf-8' : 'latin1').decode(bytes.subarray(headerStart, headerStart + headerLen));

  const descrM = /['"]descr['"]\s*:\s*['"]([^'"]*)['"]/.exec(header);
  const fortranM = /['"]fortran_order['"]\s*:\s*(True|False)/.exec(header);
  const shapeM = /['"]shape['"]\s*:\s*\(([^)]*)\)/.exec(header);
  if (!descrM || !fortranM || !shapeM) garbled(name, `header ${JSON.stringify(header.trim())} lacks descr, fortran_order or shape`);
  const descr = descrM[1]!;
  if (!(descr in DESCRS)) {
    throw new SparseMlaError('INVALID_DTYPE', `${name}: expected dtype <u2 (bf16 bits), <f4, <i4, <i8 or |u1, got '${descr}'`, name);
  }
  if (fortranM[1] === 'True') {
    throw new SparseMlaError('INVALID_VALUE', `${name}: expected C order (fortran_order False), got fortran_order True`, name);
  }
  const shape = shapeM[1]!
    .split(',')
    .map((s) => s.trim().replace(/L$/, ''))
    .filter((s) => s !== '')
    .map((s) => (/^\d+$/.test(s) ? Number(s) : garbled(name, `bad shape entry '${s}'`)));
  const { bytes: item, make } = DESCRS[descr as NpyDescr];
  const count = numel(shape);
  const dataStart = headerStart + headerLen;
  const have = bytes.length - dataStart;
  if (!Number.isSafeInteger(count * item) || have !== count * item) {
    throw new SparseMlaError('INVALID_SHAPE', `${name}: shape (${shape.join(', ')}) of ${descr} needs ${count * item} data bytes, file has ${have}`, name);
  }
  // copy (the data offset need not be aligned for the typed array); not .slice(): a Buffer's slice is a view
  const copy = new Uint8Array(count * item);
  copy.set(bytes.subarray(dataStart, dataStart + count * item));
  return { descr: descr as NpyDescr, shape, data: make(copy.buffer) };
}

function headerText(descr: NpyDescr, shape: readonly number[]): string {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  return `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
}

/** Encode a version 1.0 .npy file; the header is padded so the data starts at a multiple of 64. */
export function encodeNpy(arr: NpyArray): Uint8Array {
  const { bytes: item } = DESCRS[arr.descr];
  if (arr.data.length !== numel(arr.shape)) {
    throw new SparseMlaError('INVALID_SHAPE', `encodeNpy: shape (${arr.shape.join(', ')}) needs ${numel(arr.shape)} elements, data has ${arr.data.length}`, 'data');
  }
  let header = headerText(arr.descr, arr.shape);
  const unpadded = 10 + header.length + 1;
  header += ' '.repeat((64 - (unpadded % 64)) % 64) + '\n';
  if (header.length > 0xffff) throw new SparseMlaError('TOO_LARGE', 'encodeNpy: header longer than 65535 bytes', 'shape');
  const out = new Uint8Array(10 + header.length + arr.data.length * item);
  out.set(MAGIC, 0);
  out[6] = 1;
  out[7] = 0;
  new DataView(out.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(arr.data.buffer, arr.data.byteOffset, arr.data.length * item), 10 + header.length);
  return out;
}

/** A tensor as an npy array (bf16 as `<u2` bits). The data is shared, not copied. */
export function tensorToNpy(t: Tensor): NpyArray {
  return { descr: NPY_DESCR_OF[t.dtype], shape: [...t.shape], data: t.data };
}

/** An npy array as a tensor; `<u2` is read as bf16 bits. */
export function npyToTensor(arr: NpyArray): Tensor {
  const dtype: DType = ({ '<u2': 'bf16', '<f4': 'float32', '<i4': 'int32', '<i8': 'int64', '|u1': 'uint8' } as const)[arr.descr];
  return tensor(dtype, arr.shape, arr.data as DTypeArrays[typeof dtype]);
}

export async function readNpyFile(path: string, name = path): Promise<NpyArray> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new SparseMlaError('INVALID_VALUE', `${name}: cannot read (${(e as Error).message})`, name);
  }
  return parseNpy(bytes, name);
}

export async function writeNpyFile(path: string, t: Tensor): Promise<void> {
  await writeFile(path, encodeNpy(tensorToNpy(t)));
}
