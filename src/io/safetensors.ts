/**
 * `.safetensors` files: an 8-byte little-endian header length, a JSON header
 * ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {string: string}}), then the
 * data. Read and written here: BF16, F32, I32, I64 (and U8).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { SparseMlaError } from '../errors.js';
import { numel, tensor } from '../tensor.js';
import type { DType, DTypeArrays, Tensor } from '../types.js';

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

/** Parse the bytes of a .safetensors file; `name` (the file) appears in every error. */
export function parseSafetensors(bytes: Uint8Array, name = 'tensors.safetensors'): SafetensorsFile {
  if (bytes.length < 8) garbled(name, 'shorter than its 8-byte header length');
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = dv.getBigUint64(0, true);
  if (headerLen > BigInt(bytes.length - 8)) garbled(name, `header length ${headerLen} exceeds the file`);
  const dataStart = 8 + Number(headerLen);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, dataStart)));
  } catch (e) {
    garbled(name, `header is not JSON: ${(e as Error).message}`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) garbled(name, 'header is not a JSON object');
  const dataLen = bytes.length - dataStart;
  const tensors = new Map<string, Tensor>();
  let metadata: Record<string, string> = {};
  for (const [key, entry] of Object.entries(header as Record<string, unknown>)) {
    if (key === '__metadata__') {
      if (typeof entry !== 'object' || entry === null) garbled(name, '__metadata__ is not an object');
      metadata = Object.fromEntries(Object.entries(entry as Record<string, unknown>).map(([k, v]) => [k, String(v)]));
      continue;
    }
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e !== 'object' || e === null) garbled(name, `entry '${key}' is not an object`);
    if (typeof e.dtype !== 'string' || !(e.dtype in TO_DTYPE)) {
      throw new SparseMlaError('INVALID_DTYPE', `${name}: tensor '${key}': expected dtype BF16, F32, I32, I64 or U8, got ${JSON.stringify(e.dtype)}`, name);
    }
    const shape = e.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SparseMlaError('INVALID_SHAPE', `${name}: tensor '${key}': shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`, name);
    }
    const offs = e.data_offsets;
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((o) => Number.isSafeInteger(o) && o >= 0) || offs[0] > offs[1] || offs[1] > dataLen) {
      garbled(name, `tensor '${key}': data_offsets ${JSON.stringify(offs)} outside the ${dataLen} data bytes`);
    }
    const dtype = TO_DTYPE[e.dtype as SafetensorsDtype];
    const need = numel(shape as number[]) * ITEM_BYTES[dtype];
    if (offs[1] - offs[0] !== need) {
      throw new SparseMlaError('INVALID_SHAPE', `${name}: tensor '${key}': shape [${shape.join(', ')}] of ${e.dtype} needs ${need} bytes, data_offsets span ${offs[1] - offs[0]}`, name);
    }
    // a copy, aligned for the typed array (not .slice(): a Buffer's slice is a view)
    const copy = new Uint8Array(need);
    copy.set(bytes.subarray(dataStart + offs[0], dataStart + offs[1]));
    tensors.set(key, tensor(dtype, shape as number[], new CTORS[dtype](copy.buffer) as DTypeArrays[typeof dtype]));
  }
  return { tensors, metadata };
}

/** Encode tensors (in the given order, each 8-byte aligned) and optional string metadata. */
export function encodeSafetensors(tensors: Record<string, Tensor>, metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  const parts: [number, Tensor][] = [];
  for (const [key, t] of Object.entries(tensors)) {
    offset = Math.ceil(offset / 8) * 8;
    const n = t.data.length * ITEM_BYTES[t.dtype];
    header[key] = { dtype: FROM_DTYPE[t.dtype], shape: [...t.shape], data_offsets: [offset, offset + n] };
    parts.push([offset, t]);
    offset += n;
  }
  let jsonBytes = new TextEncoder().encode(JSON.stringify(header));
  // pad with spaces so the data starts 8-byte aligned
  jsonBytes = new TextEncoder().encode(JSON.stringify(header) + ' '.repeat((8 - (jsonBytes.length % 8)) % 8));
  const out = new Uint8Array(8 + jsonBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(jsonBytes.length), true);
  out.set(jsonBytes, 8);
  const base = 8 + jsonBytes.length;
  for (const [off, t] of parts) out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), base + off);
  return out;
}

export async function readSafetensorsFile(path: string, name = path): Promise<SafetensorsFile> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new SparseMlaError('INVALID_VALUE', `${name}: cannot read (${(e as Error).message})`, name);
  }
  return parseSafetensors(bytes, name);
}

export async function writeSafetensorsFile(path: string, tensors: Record<string, Tensor>, metadata?: Record<string, string>): Promise<void> {
  await writeFile(path, encodeSafetensors(tensors, metadata));
}
