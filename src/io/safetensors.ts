/**
 * `.safetensors` files: an 8-byte little-endian header length, a JSON header
 * ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {string: string}}), then the
 * data. Read and written here: BF16, F32, I32, I64 (and U8).
 *
 * Reading checks what the format requires before any tensor is read: a header no longer than the
 * format's own cap, offsets inside the data that do not overlap, each span the size its shape
 * needs, and a file exactly as long as the header says. readSafetensorsFile opens only a regular
 * file (files.ts) and reads the header, then each tensor, never the whole file at once;
 * readSafetensorsHeader reads the header alone and readSafetensorsTensor one tensor when asked.
 */
import { SparseMlaError } from '../errors.js';
import { MAX_TENSOR_DIMS, allocHostArray, checkViewsIntact, describe, numel, tensor } from '../tensor.js';
import type { DType, DTypeArrays, Tensor } from '../types.js';
import { type OpenedFile, checkFilePath, clip, fileBytes, openRegularFile, readExactly, tensorBytes, checkedTensor, writeFileNoFollow } from './files.js';

/** The format's cap on the JSON header (the reference implementation's MAX_HEADER_SIZE). */
export const SAFETENSORS_MAX_HEADER_BYTES = 100_000_000;

export type SafetensorsDtype = 'BF16' | 'F32' | 'I32' | 'I64' | 'U8';

const TO_DTYPE: Record<SafetensorsDtype, DType> = { BF16: 'bf16', F32: 'float32', I32: 'int32', I64: 'int64', U8: 'uint8' };
const FROM_DTYPE: Record<DType, SafetensorsDtype> = { bf16: 'BF16', float32: 'F32', int32: 'I32', int64: 'I64', uint8: 'U8' };
const ITEM_BYTES: Record<DType, number> = { bf16: 2, float32: 4, int32: 4, int64: 8, uint8: 1 };
const CTORS = { bf16: Uint16Array, float32: Float32Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array } as const;

export interface SafetensorsFile {
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

function garbled(name: string, what: string): never {
  throw new SparseMlaError('INVALID_VALUE', `${name}: not a valid .safetensors file (${what})`, name);
}

interface Entry {
  key: string;
  dtype: DType;
  shape: number[];
  begin: number;
  end: number;
}

interface Header {
  dataStart: number;
  /** the data section's length the header implies (the largest end offset) */
  dataBytes: number;
  entries: Entry[];
  metadata: Record<string, string>;
}

/** The 8-byte length field, checked against the cap and the file size. */
function headerLength(first8: Uint8Array, fileSize: number, name: string): number {
  if (fileSize < 8 || first8.length < 8) garbled(name, 'shorter than its 8-byte header length');
  const len = new DataView(first8.buffer, first8.byteOffset, 8).getBigUint64(0, true);
  if (len > BigInt(SAFETENSORS_MAX_HEADER_BYTES)) garbled(name, `a header of ${len} bytes, over the format's cap of ${SAFETENSORS_MAX_HEADER_BYTES}`);
  if (len > BigInt(fileSize - 8)) garbled(name, `header length ${len} exceeds the file`);
  return Number(len);
}

/** Parses and checks the JSON header; every entry's span, no overlaps. */
function parseHeader(json: Uint8Array, name: string, dataStart: number, dataLen: number): Header {
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(json));
  } catch (e) {
    garbled(name, `header is not JSON: ${clip((e as Error).message, 120)}`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) garbled(name, 'header is not a JSON object');
  const entries: Entry[] = [];
  let metadata: Record<string, string> = {};
  for (const [key, entry] of Object.entries(header as Record<string, unknown>)) {
    const k = clip(key, 60);
    if (key === '__metadata__') {
      if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) garbled(name, '__metadata__ is not an object');
      // a map of strings (numbers and booleans are taken as their text); a nested value is not
      // metadata, and turning one into text could recurse as deep as the JSON nests
      const pairs: Array<[string, string]> = [];
      for (const [mk, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== 'string' && typeof v !== 'number' && typeof v !== 'boolean') garbled(name, `__metadata__ '${clip(mk, 40)}' is not a string`);
        pairs.push([mk, String(v)]);
      }
      metadata = Object.fromEntries(pairs);
      continue;
    }
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e !== 'object' || e === null) garbled(name, `entry '${k}' is not an object`);
    if (typeof e.dtype !== 'string' || !Object.hasOwn(TO_DTYPE, e.dtype)) {
      throw new SparseMlaError('INVALID_DTYPE', `${name}: tensor '${k}': expected dtype BF16, F32, I32, I64 or U8, got ${clip(JSON.stringify(e.dtype) ?? String(e.dtype), 40)}`, name);
    }
    const shape = e.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SparseMlaError('INVALID_SHAPE', `${name}: tensor '${k}': shape must be a list of non-negative integers, got ${clip(JSON.stringify(shape) ?? String(shape), 80)}`, name);
    }
    if (shape.length > MAX_TENSOR_DIMS) throw new SparseMlaError('INVALID_SHAPE', `${name}: tensor '${k}': a shape of ${shape.length} dims, over the ${MAX_TENSOR_DIMS} a tensor may have`, name);
    const offs = e.data_offsets;
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((o) => Number.isSafeInteger(o) && o >= 0) || offs[0] > offs[1] || offs[1] > dataLen) {
      garbled(name, `tensor '${k}': data_offsets ${clip(JSON.stringify(offs) ?? String(offs), 60)} outside the ${dataLen} data bytes`);
    }
    const dtype = TO_DTYPE[e.dtype as SafetensorsDtype];
    const need = numel(shape as number[]) * ITEM_BYTES[dtype];
    if (offs[1] - offs[0] !== need) {
      throw new SparseMlaError('INVALID_SHAPE', `${name}: tensor '${k}': shape [${clip((shape as number[]).join(', '), 80)}] of ${e.dtype} needs ${need} bytes, data_offsets span ${offs[1] - offs[0]}`, name);
    }
    entries.push({ key, dtype, shape: shape as number[], begin: offs[0], end: offs[1] });
  }
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  for (let i = 1; i < sorted.length; i++) {
    const p = sorted[i - 1]!, c = sorted[i]!;
    if (c.begin < p.end) garbled(name, `tensors '${clip(p.key, 40)}' [${p.begin}, ${p.end}) and '${clip(c.key, 40)}' [${c.begin}, ${c.end}) overlap`);
  }
  const dataBytes = sorted.reduce((m, x) => Math.max(m, x.end), 0);
  return { dataStart, dataBytes, entries, metadata };
}

/** The file must end where the last tensor's data ends (offsets beyond it were refused already). */
function checkDataLength(h: Header, have: number, name: string): void {
  if (have > h.dataBytes) garbled(name, `${have - h.dataBytes} bytes after the last tensor's data`);
}

function tensorOf(e: Entry, bytes: Uint8Array): Tensor {
  // the bytes are a fresh, aligned copy the tensor owns
  return tensor(e.dtype, e.shape, new CTORS[e.dtype](bytes.buffer as ArrayBuffer, bytes.byteOffset, bytes.byteLength / ITEM_BYTES[e.dtype]) as DTypeArrays[typeof e.dtype]);
}

/** Parse the bytes of a .safetensors file; `name` (the file) appears in every error. */
export function parseSafetensors(given: Uint8Array, name = 'tensors.safetensors'): SafetensorsFile {
  const bytes = fileBytes(given, name);
  const len = headerLength(bytes.subarray(0, 8), bytes.length, name);
  const h = parseHeader(bytes.subarray(8, 8 + len), name, 8 + len, bytes.length - 8 - len);
  checkDataLength(h, bytes.length - h.dataStart, name);
  const tensors = new Map<string, Tensor>();
  for (const e of h.entries) {
    // a copy, aligned for the typed array (not .slice(): a Buffer's slice is a view)
    const copy = new Uint8Array(e.end - e.begin);
    copy.set(bytes.subarray(h.dataStart + e.begin, h.dataStart + e.end));
    tensors.set(e.key, tensorOf(e, copy));
  }
  return { tensors, metadata: h.metadata };
}

/**
 * Encode tensors (in the given order, their data back to back) and optional string metadata.
 * Everything is checked before a byte is written, each field read once: each tensor as tensor()
 * checks one (files.ts checkedTensor: the bytes written are its data's own), no tensor named
 * `__metadata__` (the header's own key), metadata strings only; then every tensor's memory is
 * still there (a getter of a later tensor may have detached an earlier one's).
 */
export function encodeSafetensors(tensors: Record<string, Tensor>, metadata?: Record<string, string>): Uint8Array {
  if (typeof tensors !== 'object' || tensors === null || Array.isArray(tensors)) {
    throw new SparseMlaError('INVALID_VALUE', `encodeSafetensors: tensors must be an object of tensors by name, got ${describe(tensors)}`, 'tensors');
  }
  const checked: [string, Tensor][] = [];
  for (const [key, value] of Object.entries(tensors)) {
    const argument = `tensors[${clip(JSON.stringify(key), 80)}]`;
    if (key === '__metadata__') throw new SparseMlaError('INVALID_VALUE', `encodeSafetensors: ${argument}: __metadata__ is the header's metadata, not a tensor name`, argument);
    if (typeof value !== 'object' || value === null) throw new SparseMlaError('INVALID_VALUE', `encodeSafetensors: ${argument} must be a tensor {dtype, shape, data}, got ${describe(value)}`, argument);
    const { dtype, shape, data } = value as { dtype: unknown; shape: unknown; data: unknown };
    checked.push([key, checkedTensor('encodeSafetensors', argument, dtype, shape, data)]);
  }
  const meta = metadataOnce(metadata);
  checkViewsIntact(checked.map(([, t]) => t.data));
  // no prototype: a tensor named __proto__ is a key of the header like any other
  const header: Record<string, unknown> = Object.create(null);
  if (meta) header.__metadata__ = meta;
  let offset = 0;
  const parts: [number, Uint8Array][] = [];
  // back to back: the format allows no gaps between tensors' data
  for (const [key, t] of checked) {
    const bytes = tensorBytes(t);
    header[key] = { dtype: FROM_DTYPE[t.dtype], shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    parts.push([offset, bytes]);
    offset += bytes.length;
  }
  const json = JSON.stringify(header);
  const unpadded = new TextEncoder().encode(json).length;
  // pad with spaces so the data starts 8-byte aligned
  const jsonBytes = new TextEncoder().encode(json + ' '.repeat((8 - (unpadded % 8)) % 8));
  const out = allocHostArray(Uint8Array, 8 + jsonBytes.length + offset, 'tensors');
  new DataView(out.buffer).setBigUint64(0, BigInt(jsonBytes.length), true);
  out.set(jsonBytes, 8);
  const base = 8 + jsonBytes.length;
  for (const [off, bytes] of parts) out.set(bytes, base + off);
  return out;
}

/** The metadata's entries read once into an object of the library's own (strings only); undefined or null: none. */
function metadataOnce(metadata: unknown): Record<string, string> | undefined {
  if (metadata === undefined || metadata === null) return undefined;
  if (typeof metadata !== 'object' || Array.isArray(metadata)) {
    throw new SparseMlaError('INVALID_VALUE', `encodeSafetensors: metadata must be an object of strings by name, got ${describe(metadata)}`, 'metadata');
  }
  const out: Record<string, string> = Object.create(null);
  for (const [key, value] of Object.entries(metadata)) {
    const argument = `metadata[${clip(JSON.stringify(key), 80)}]`;
    if (typeof value !== 'string') throw new SparseMlaError('INVALID_VALUE', `encodeSafetensors: ${argument} must be a string (the format's metadata holds strings only), got ${describe(value)}`, argument);
    out[key] = value;
  }
  return out;
}

/** Reads and checks the header of an opened file: the 8-byte length (capped), then the JSON, then the file's size against it. */
async function readHeaderOf(file: OpenedFile, name: string): Promise<Header> {
  const len = headerLength(await readExactly(file, 0, Math.min(file.size, 8), name), file.size, name);
  const h = parseHeader(await readExactly(file, 8, len, name), name, 8 + len, file.size - 8 - len);
  checkDataLength(h, file.size - h.dataStart, name);
  return h;
}

/** Reads a .safetensors file: a regular file, its header first, then each tensor once the file's size is what the header says. */
export async function readSafetensorsFile(path: string, name = path): Promise<SafetensorsFile> {
  const file = await openRegularFile(path, name);
  try {
    const h = await readHeaderOf(file, name);
    const tensors = new Map<string, Tensor>();
    for (const e of h.entries) tensors.set(e.key, tensorOf(e, await readExactly(file, h.dataStart + e.begin, e.end - e.begin, name)));
    return { tensors, metadata: h.metadata };
  } finally {
    await file.handle.close().catch(() => {});
  }
}

/** A .safetensors file's header, read and checked by readSafetensorsHeader; readSafetensorsTensor reads a tensor of it. */
export interface SafetensorsHeader {
  /** the file's path */
  path: string;
  /** how messages name the file */
  name: string;
  /** each tensor's dtype and shape, in the header's order */
  tensors: ReadonlyMap<string, { dtype: DType; shape: readonly number[] }>;
  metadata: Record<string, string>;
}

/** What a header's reader checked, kept where its caller cannot change it: the spans, and which file (and size) they are of. */
interface CheckedSpans {
  path: string;
  name: string;
  entries: Map<string, Entry>;
  dataStart: number;
  size: number;
  dev: number;
  ino: number;
}

const spansOf = new WeakMap<SafetensorsHeader, CheckedSpans>();

/**
 * Reads only the header of a .safetensors file (a regular file: the 8-byte length, capped at the
 * format's SAFETENSORS_MAX_HEADER_BYTES, then the JSON), with every check readSafetensorsFile makes
 * before it reads data: offsets inside the file, spans the size their shapes need, no overlaps, no
 * bytes after the last tensor. No tensor's bytes are read: readSafetensorsTensor reads one when asked.
 */
export async function readSafetensorsHeader(path: string, name = path): Promise<SafetensorsHeader> {
  const file = await openRegularFile(path, name);
  try {
    const h = await readHeaderOf(file, name);
    const entries = new Map(h.entries.map((e) => [e.key, e]));
    const header: SafetensorsHeader = {
      path,
      name,
      tensors: new Map(h.entries.map((e) => [e.key, { dtype: e.dtype, shape: [...e.shape] }])),
      metadata: h.metadata,
    };
    spansOf.set(header, { path, name, entries, dataStart: h.dataStart, size: file.size, dev: file.dev, ino: file.ino });
    return header;
  } finally {
    await file.handle.close().catch(() => {});
  }
}

/**
 * The tensor `key` of a file whose header readSafetensorsHeader read: its bytes only, read from the
 * file at the checked offsets once the path is still that file, of that size (a file replaced or
 * resized since would be read at offsets that are not its own).
 */
export async function readSafetensorsTensor(header: SafetensorsHeader, key: string): Promise<Tensor> {
  const spans = spansOf.get(header);
  if (spans === undefined) throw new SparseMlaError('INVALID_VALUE', `readSafetensorsTensor: header: expected a header readSafetensorsHeader read, got ${describe(header)}`, 'header');
  const { name, path } = spans;
  const e = typeof key === 'string' ? spans.entries.get(key) : undefined;
  if (e === undefined) throw new SparseMlaError('INVALID_VALUE', `${name}: no tensor ${typeof key === 'string' ? `'${clip(key, 60)}'` : describe(key)} in its header`, name);
  const file = await openRegularFile(path, name);
  try {
    if (file.dev !== spans.dev || file.ino !== spans.ino || file.size !== spans.size) {
      const what = file.dev !== spans.dev || file.ino !== spans.ino ? 'replaced by another file' : `resized from ${spans.size} to ${file.size} bytes`;
      throw new SparseMlaError('INVALID_VALUE', `${name}: the file was ${what} since its header was read`, name);
    }
    // checked when the header was read, and again against this file
    if (spans.dataStart + e.end > file.size) garbled(name, `tensor '${clip(key, 40)}' ends at ${spans.dataStart + e.end}, past the file's ${file.size} bytes`);
    return tensorOf(e, await readExactly(file, spans.dataStart + e.begin, e.end - e.begin, name));
  } finally {
    await file.handle.close().catch(() => {});
  }
}

/** Writes the tensors as a .safetensors file at `path` (files.ts writeFileNoFollow); the path is checked before they are encoded. */
export async function writeSafetensorsFile(path: string, tensors: Record<string, Tensor>, metadata?: Record<string, string>): Promise<void> {
  checkFilePath(path, path);
  await writeFileNoFollow(path, encodeSafetensors(tensors, metadata));
}
