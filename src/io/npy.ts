/**
 * NumPy `.npy` files (format version 1.0 written; 1.0–3.0 read), C order, little-endian.
 * bf16 tensors travel as their raw bits in `<u2` arrays (NumPy has no bf16).
 *
 * Reading a file (readNpyFile) treats it as hostile: only a regular file is opened (files.ts), the
 * header is capped as NumPy caps it (10000 bytes) and parsed in one linear pass, and the file's
 * size must equal what the header declares before any data is read.
 */
import { SparseMlaError } from '../errors.js';
import { MAX_TENSOR_DIMS, allocHostArray, describe, numel } from '../tensor.js';
import type { DType, Tensor } from '../types.js';
import { checkFilePath, clip, fileBytes, openRegularFile, readExactly, tensorBytes, checkedTensor, writeFileNoFollow } from './files.js';

/** NumPy's own cap on a header (numpy.lib.format, max_header_size): a longer one is refused unread. */
export const NPY_MAX_HEADER_BYTES = 10000;

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

interface NpyHeader {
  descr: NpyDescr;
  shape: number[];
  /** bytes before the data */
  dataStart: number;
  /** bytes of data the header declares */
  dataBytes: number;
}

/**
 * Parses the header dict NumPy writes, e.g. {'descr': '<u2', 'fortran_order': False, 'shape': (3, 4), }:
 * string keys; string, True/False or int-tuple values. One pass over the text (no backtracking).
 */
function parseHeaderDict(text: string, name: string): Map<string, string | boolean | number[]> {
  let i = 0;
  const bad = (what: string): never => garbled(name, `header ${JSON.stringify(clip(text.trim(), 80))}: ${what}`);
  const ws = (): void => {
    while (i < text.length && /\s/.test(text[i]!)) i++;
  };
  const expect = (c: string): void => {
    ws();
    if (text[i] !== c) bad(`expected '${c}' at position ${i}`);
    i++;
  };
  const str = (): string => {
    ws();
    const q = text[i];
    if (q !== "'" && q !== '"') bad(`expected a quoted string at position ${i}`);
    const end = text.indexOf(q!, i + 1);
    if (end < 0) bad('unterminated string');
    const v = text.slice(i + 1, end);
    i = end + 1;
    return v;
  };
  const value = (): string | boolean | number[] => {
    ws();
    const c = text[i];
    if (c === "'" || c === '"') return str();
    if (text.startsWith('True', i)) return (i += 4), true;
    if (text.startsWith('False', i)) return (i += 5), false;
    if (c === '(') {
      i++;
      const dims: number[] = [];
      for (;;) {
        ws();
        if (text[i] === ')') {
          i++;
          return dims;
        }
        const m = /^\d+/.exec(text.slice(i, i + 32));
        if (!m) bad(`bad shape entry at position ${i}`);
        i += m![0].length;
        if (text[i] === 'L') i++;
        const d = Number(m![0]);
        if (!Number.isSafeInteger(d)) bad(`shape entry ${clip(m![0], 24)} is too large`);
        dims.push(d);
        ws();
        if (text[i] === ',') i++;
        else if (text[i] !== ')') bad(`expected ',' or ')' in the shape at position ${i}`);
      }
    }
    if (c === '[') throw new SparseMlaError('INVALID_DTYPE', `${name}: expected dtype <u2 (bf16 bits), <f4, <i4, <i8 or |u1, got a structured dtype`, name);
    return bad(`unexpected value at position ${i}`);
  };
  const out = new Map<string, string | boolean | number[]>();
  expect('{');
  for (;;) {
    ws();
    if (text[i] === '}') break;
    const key = str();
    if (out.has(key)) bad(`key '${clip(key, 24)}' given twice`);
    expect(':');
    out.set(key, value());
    ws();
    if (text[i] === ',') i++;
    else if (text[i] !== '}') bad(`expected ',' or '}' at position ${i}`);
  }
  // after the dict only NumPy's padding (spaces, the closing newline): NumPy's own reader refuses anything else
  i++;
  ws();
  if (i < text.length) bad(`unexpected text after the dict at position ${i}`);
  return out;
}

/** Where the header ends (= the data starts), from the magic, the version and the length field, all checked. */
function npyHeaderExtent(bytes: Uint8Array, name: string): { headerStart: number; headerLen: number; major: number } {
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
  if (headerLen > NPY_MAX_HEADER_BYTES) garbled(name, `a header of ${headerLen} bytes, over NumPy's cap of ${NPY_MAX_HEADER_BYTES}`);
  return { headerStart, headerLen, major };
}

/** Magic, version, header: everything before the data, checked against its own limits. */
function parseNpyHeader(bytes: Uint8Array, name: string): NpyHeader {
  const { headerStart, headerLen, major } = npyHeaderExtent(bytes, name);
  if (headerStart + headerLen > bytes.length) garbled(name, 'truncated header');
  const header = new TextDecoder(major === 3 ? 'utf-8' : 'latin1').decode(bytes.subarray(headerStart, headerStart + headerLen));
  const dict = parseHeaderDict(header, name);
  const descr = dict.get('descr');
  const fortran = dict.get('fortran_order');
  const shape = dict.get('shape');
  if (typeof descr !== 'string' || typeof fortran !== 'boolean' || !Array.isArray(shape)) {
    garbled(name, `header ${JSON.stringify(clip(header.trim(), 80))} lacks descr, fortran_order or shape`);
  }
  if (!Object.hasOwn(DESCRS, descr)) {
    throw new SparseMlaError('INVALID_DTYPE', `${name}: expected dtype <u2 (bf16 bits), <f4, <i4, <i8 or |u1, got '${clip(descr, 24)}'`, name);
  }
  if (fortran) throw new SparseMlaError('INVALID_VALUE', `${name}: expected C order (fortran_order False), got fortran_order True`, name);
  if (shape.length > MAX_TENSOR_DIMS) throw new SparseMlaError('INVALID_SHAPE', `${name}: a shape of ${shape.length} dims, over the ${MAX_TENSOR_DIMS} a tensor may have`, name);
  const count = numel(shape);
  const dataBytes = count * DESCRS[descr as NpyDescr].bytes;
  if (!Number.isSafeInteger(dataBytes)) {
    throw new SparseMlaError('INVALID_SHAPE', `${name}: shape (${clip(shape.join(', '), 80)}) is too large to hold`, name);
  }
  return { descr: descr as NpyDescr, shape, dataStart: headerStart + headerLen, dataBytes };
}

function sizeMismatch(name: string, h: NpyHeader, have: number): never {
  throw new SparseMlaError('INVALID_SHAPE', `${name}: shape (${clip(h.shape.join(', '), 80)}) of ${h.descr} needs ${h.dataBytes} data bytes, file has ${have}`, name);
}

/** Parse the bytes of a .npy file. `name` (the file) appears in every error. */
export function parseNpy(given: Uint8Array, name = 'array.npy'): NpyArray {
  const bytes = fileBytes(given, name);
  const h = parseNpyHeader(bytes, name);
  const have = bytes.length - h.dataStart;
  if (have !== h.dataBytes) sizeMismatch(name, h, have);
  // copy (the data offset need not be aligned for the typed array); not .slice(): a Buffer's slice is a view
  const copy = new Uint8Array(h.dataBytes);
  copy.set(bytes.subarray(h.dataStart, h.dataStart + h.dataBytes));
  return { descr: h.descr, shape: h.shape, data: DESCRS[h.descr].make(copy.buffer) };
}

function headerText(descr: NpyDescr, shape: readonly number[]): string {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  return `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
}

/** The tensor dtype each descr holds (NPY_DESCR_OF's inverse). */
const DTYPE_OF_DESCR: Record<NpyDescr, DType> = { '<u2': 'bf16', '<f4': 'float32', '<i4': 'int32', '<i8': 'int64', '|u1': 'uint8' };

/** A caller's npy array (its fields read once): descr one of this library's, shape and data as tensor() checks a tensor of descr's dtype. */
function npyArrayOnce(fn: string, arr: unknown): Tensor {
  if (typeof arr !== 'object' || arr === null) throw new SparseMlaError('INVALID_VALUE', `${fn}: arr must be an npy array {descr, shape, data}, got ${describe(arr)}`, 'arr');
  const { descr, shape, data } = arr as { descr: unknown; shape: unknown; data: unknown };
  if (typeof descr !== 'string' || !Object.hasOwn(DTYPE_OF_DESCR, descr)) {
    throw new SparseMlaError('INVALID_DTYPE', `${fn}: arr.descr must be one of ${Object.keys(DTYPE_OF_DESCR).join(', ')}, got ${describe(descr)}`, 'arr.descr');
  }
  return checkedTensor(fn, 'arr', DTYPE_OF_DESCR[descr as NpyDescr], shape, data);
}

/**
 * Encode a version 1.0 .npy file; the header is padded so the data starts at a multiple of 64.
 * `arr` is checked first (its fields read once): descr one of this library's, and shape and data as
 * tensor() checks a tensor of descr's dtype; the bytes written are the data's own (files.ts checkedTensor).
 */
export function encodeNpy(arr: NpyArray): Uint8Array {
  const t = npyArrayOnce('encodeNpy', arr);
  const bytes = tensorBytes(t);
  let header = headerText(NPY_DESCR_OF[t.dtype], t.shape);
  const unpadded = 10 + header.length + 1;
  header += ' '.repeat((64 - (unpadded % 64)) % 64) + '\n';
  if (header.length > 0xffff) throw new SparseMlaError('TOO_LARGE', 'encodeNpy: header longer than 65535 bytes', 'arr.shape');
  const out = allocHostArray(Uint8Array, 10 + header.length + bytes.length, 'arr.data');
  out.set(MAGIC, 0);
  out[6] = 1;
  out[7] = 0;
  new DataView(out.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(bytes, 10 + header.length);
  return out;
}

/** A tensor as an npy array (bf16 as `<u2` bits), checked as encodeNpy checks one. The data is shared (a plain view of its memory), not copied. */
export function tensorToNpy(t: Tensor): NpyArray {
  if (typeof t !== 'object' || t === null) throw new SparseMlaError('INVALID_VALUE', `tensorToNpy: t must be a tensor {dtype, shape, data}, got ${describe(t)}`, 't');
  const { dtype, shape, data } = t as { dtype: unknown; shape: unknown; data: unknown };
  const checked = checkedTensor('tensorToNpy', 't', dtype, shape, data);
  return { descr: NPY_DESCR_OF[checked.dtype], shape: checked.shape, data: checked.data } as NpyArray;
}

/** An npy array as a tensor, checked as encodeNpy checks one; `<u2` is read as bf16 bits. The data is shared (a plain view of its memory). */
export function npyToTensor(arr: NpyArray): Tensor {
  return npyArrayOnce('npyToTensor', arr);
}

/**
 * Reads a .npy file: a regular file only, its header first (capped, parsed), then — when the
 * file's size is exactly what the header declares — its data.
 */
export async function readNpyFile(path: string, name = path): Promise<NpyArray> {
  const file = await openRegularFile(path, name);
  try {
    const { headerStart, headerLen } = npyHeaderExtent(await readExactly(file, 0, Math.min(file.size, 12), name), name);
    const head = await readExactly(file, 0, Math.min(file.size, headerStart + headerLen), name);
    const h = parseNpyHeader(head, name);
    const have = file.size - h.dataStart;
    if (have !== h.dataBytes) sizeMismatch(name, h, have);
    const data = await readExactly(file, h.dataStart, h.dataBytes, name);
    return { descr: h.descr, shape: h.shape, data: DESCRS[h.descr].make(data.buffer as ArrayBuffer) };
  } finally {
    await file.handle.close().catch(() => {});
  }
}

/** Writes `t` as a .npy file at `path` (files.ts writeFileNoFollow); the path is checked before the tensor is encoded. */
export async function writeNpyFile(path: string, t: Tensor): Promise<void> {
  checkFilePath(path, path);
  await writeFileNoFollow(path, encodeNpy(tensorToNpy(t)));
}
