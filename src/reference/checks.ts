/**
 * How the reference reads a caller's arguments: each field once, typed arrays through the
 * intrinsic getters (what an array really is, whatever a subclass or a Proxy claims), every
 * mistake a SparseMlaError naming the argument before any work (SPEC §9). Written here, apart from
 * the library's own validation (src/tensor.ts, src/ops/common.ts), so that the oracle does not
 * share the checks of the code it judges. A getter or Proxy trap that throws throws its own error.
 */
import { SparseMlaError, type ErrorCode } from '../errors.js';

export function refuse(code: ErrorCode, argument: string, expected: string, got: string): never {
  throw new SparseMlaError(code, `${argument}: expected ${expected}, got ${got}`, argument);
}

const TYPED_ARRAY_PROTOTYPE = Object.getPrototypeOf(Uint8Array.prototype) as object;
const intrinsic = (key: PropertyKey): ((this: unknown) => unknown) =>
  Object.getOwnPropertyDescriptor(TYPED_ARRAY_PROTOTYPE, key)!.get as (this: unknown) => unknown;
const KIND = intrinsic(Symbol.toStringTag);
const BUFFER = intrinsic('buffer');
const OFFSET = intrinsic('byteOffset');
const LENGTH = intrinsic('length');

/** A checked view's element count now, by the intrinsic (0 once its buffer was detached, or shrunk below it). */
export function viewLength(view: ArrayBufferView): number {
  return LENGTH.call(view) as number;
}

/** 'Float32Array', ... for a real typed array; undefined for anything else (a Proxy of one included). */
export function typedKind(value: unknown): string | undefined {
  return KIND.call(value) as string | undefined;
}

/** A value as a message shows it, safe on anything (a Symbol, a Proxy whose traps throw, a null-prototype object). */
export function describeValue(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  switch (typeof value) {
    case 'number':
    case 'boolean':
      return `${typeof value} ${String(value)}`;
    case 'bigint':
      return `bigint ${String(value)}n`;
    case 'string':
      return `string ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)}`;
    case 'symbol':
      return 'a Symbol';
    case 'function':
      return 'a function';
  }
  const kind = typedKind(value);
  if (kind !== undefined) return `${kind}(${LENGTH.call(value) as number})`;
  try {
    return Array.isArray(value) ? `an Array of length ${describeValue(value.length)}` : 'an object'; // (a revoked Proxy throws: caught)
  } catch {
    return 'an object';
  }
}

/** A shape as a message shows it. */
export function shapeText(shape: readonly unknown[]): string {
  return `[${shape.map((d) => (typeof d === 'number' ? String(d) : describeValue(d))).join(', ')}]`;
}

/** Array.isArray, where a revoked Proxy (on which it throws a TypeError) is refused naming `argument`. */
export function isArray(value: unknown, argument: string, expected: string): boolean {
  try {
    return Array.isArray(value);
  } catch {
    return refuse('INVALID_VALUE', argument, expected, 'a revoked Proxy');
  }
}

/** An object of named fields (not null, not an array, not a revoked Proxy). */
export function readRecord(value: unknown, argument: string, expected = 'an object of named arguments'): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || isArray(value, argument, expected)) refuse('INVALID_VALUE', argument, expected, describeValue(value));
  return value as Record<string, unknown>;
}

/** An argument's name as a message spells it: a string (undefined: `fallback`). */
export function readName(name: unknown, fallback: string): string {
  if (name === undefined) return fallback;
  if (typeof name !== 'string') refuse('INVALID_VALUE', 'name', 'a string naming the argument', describeValue(name));
  return name;
}

/** A safe integer in [min, max]. */
export function readInteger(value: unknown, argument: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    refuse('INVALID_VALUE', argument, max === Number.MAX_SAFE_INTEGER ? `an integer ≥ ${min}` : `an integer in [${min}, ${max}]`, describeValue(value));
  }
  return value;
}

/** Any number (NaN and ±inf included: they propagate by the math). */
export function readNumber(value: unknown, argument: string): number {
  if (typeof value !== 'number') refuse('INVALID_VALUE', argument, 'a number', describeValue(value));
  return value;
}

/** A finite number. */
export function readFinite(value: unknown, argument: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) refuse('INVALID_VALUE', argument, 'a finite number', describeValue(value));
  return value;
}

type TypedArrayName = 'Uint8Array' | 'Uint16Array' | 'Int32Array' | 'BigInt64Array' | 'Float32Array' | 'Float64Array';
type TypedArrayOf = {
  Uint8Array: Uint8Array;
  Uint16Array: Uint16Array;
  Int32Array: Int32Array;
  BigInt64Array: BigInt64Array;
  Float32Array: Float32Array;
  Float64Array: Float64Array;
};

/** A plain view of a typed array's memory, or null when `value` is none of `kinds`. */
function viewOf<K extends TypedArrayName>(value: unknown, kinds: readonly K[], argument: string): TypedArrayOf[K] | null {
  const kind = typedKind(value) as K | undefined;
  if (kind === undefined || !kinds.includes(kind)) return null;
  const Ctor = globalThis[kind] as unknown as new (b: ArrayBufferLike, o: number, n: number) => TypedArrayOf[K];
  try {
    return new Ctor(BUFFER.call(value) as ArrayBufferLike, OFFSET.call(value) as number, LENGTH.call(value) as number);
  } catch {
    return refuse('INVALID_VALUE', argument, `a ${kind} with attached memory`, 'one whose buffer was detached or transferred');
  }
}

/**
 * The views a call's checks made and the lengths they were checked at: `whole()` after the last
 * read of a caller's field, before any work, refuses a view whose memory a later getter detached
 * or shrank (it would read as 0 elements, or undefined past its end).
 */
export class ArgumentReader {
  private readonly views: { view: ArrayBufferView; length: number; argument: string }[] = [];

  /** `value` as a plain view of one of `kinds` (INVALID_DTYPE otherwise, naming `argument`), of `length` elements when given (INVALID_SHAPE otherwise). */
  array<K extends TypedArrayName>(value: unknown, argument: string, kinds: readonly K[], length?: number): TypedArrayOf[K] {
    const view = viewOf(value, kinds, argument);
    if (view === null) refuse('INVALID_DTYPE', argument, `a ${kinds.join(' or ')}`, describeValue(value));
    if (length !== undefined && view.length !== length) refuse('INVALID_SHAPE', argument, `${length} element${length === 1 ? '' : 's'}`, `${view.length}`);
    this.views.push({ view, length: view.length, argument });
    return view;
  }

  whole(): void {
    for (const { view, length, argument } of this.views) {
      if ((LENGTH.call(view) as number) !== length) {
        refuse('INVALID_VALUE', argument, `memory that stays whole until the checks end (${length} elements)`, 'a buffer detached or shrunk by a getter or Proxy read after it');
      }
    }
  }

  /** A tensor {dtype, shape, data}: dtype one of `dtypes`, a shape of `rank` safe integers ≥ 0, data a plain view of `kind` holding the shape's count. */
  tensor<K extends TypedArrayName>(value: unknown, argument: string, dtypes: readonly string[], kindOf: (dtype: string) => K, rank: number | readonly number[], dims: string): ReadTensor<TypedArrayOf[K]> {
    const t = readRecord(value, argument, `a tensor {dtype, shape, data} of dtype ${dtypes.join(' or ')}`);
    const dtype: unknown = t.dtype;
    const rawShape: unknown = t.shape;
    const rawData: unknown = t.data;
    if (typeof dtype !== 'string' || !dtypes.includes(dtype)) refuse('INVALID_DTYPE', argument, `dtype ${dtypes.join(' or ')}`, describeValue(dtype));
    const shape = readShape(rawShape, argument, rank, dims);
    let count = 1;
    for (const d of shape) count *= d;
    const data = this.array(rawData, `${argument}.data`, [kindOf(dtype)], count);
    return { dtype, shape, data };
  }
}

export interface ReadTensor<A> {
  dtype: string;
  shape: number[];
  data: A;
}

/** The most dims a shape may have (a Proxy can claim any length). */
const MAX_DIMS = 64;
/** Every rank from 1 to MAX_DIMS, for a tensor whose rows are its leading dim. */
export const ANY_RANK: readonly number[] = Array.from({ length: MAX_DIMS }, (_, i) => i + 1);

/** A shape copied by index, its length read once: `rank` (or one of the ranks) safe integers ≥ 0 (`dims` spells it in a message). */
export function readShape(value: unknown, argument: string, rank: number | readonly number[], dims: string): number[] {
  if (!isArray(value, argument, `a shape ${dims}`)) refuse('INVALID_SHAPE', argument, `a shape ${dims}`, describeValue(value));
  const list = value as readonly unknown[];
  const n: unknown = list.length;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0 || n > MAX_DIMS) refuse('INVALID_SHAPE', argument, `a shape ${dims}`, `an array of length ${describeValue(n)}`);
  const shape: unknown[] = [];
  for (let i = 0; i < n; i++) shape.push(list[i]);
  if (!(typeof rank === 'number' ? n === rank : rank.includes(n)) || !shape.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d >= 0)) refuse('INVALID_SHAPE', argument, `a shape ${dims}`, shapeText(shape));
  return shape as number[];
}

/**
 * A caller's list (an Array, a typed array or an object with a count `length`), its length read
 * once; its elements are read once each by whoever uses it. A typed array comes as a plain view.
 */
export function readList(value: unknown, argument: string, expected: string): { values: ArrayLike<unknown>; length: number } {
  const kind = typedKind(value);
  if (kind !== undefined) {
    const view = viewOf(value, [kind as TypedArrayName], argument) ?? (value as ArrayLike<unknown>);
    return { values: view, length: view.length };
  }
  if (typeof value !== 'object' || value === null) refuse('INVALID_VALUE', argument, expected, describeValue(value));
  let length: unknown;
  try {
    length = (value as ArrayLike<unknown>).length;
  } catch (e) {
    // a Proxy of a typed array: the intrinsic length getter refuses the Proxy
    if (e instanceof TypeError) refuse('INVALID_VALUE', argument, expected, 'an object whose length cannot be read');
    throw e;
  }
  if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0) refuse('INVALID_VALUE', argument, expected, `an object of length ${describeValue(length)}`);
  return { values: value as ArrayLike<unknown>, length };
}

/** A Float64Array of n elements (TOO_LARGE where this process cannot allocate it). */
export function allocFloat64(n: number, argument: string): Float64Array {
  try {
    return new Float64Array(n);
  } catch (e) {
    return refuse('TOO_LARGE', argument, 'outputs this process can allocate', `${n} float64 values (${(e as Error).message})`);
  }
}

/** A scratch array of n elements of `kind` (TOO_LARGE where this process cannot allocate it, as allocFloat64). */
export function allocScratch<T extends Float32Array | Int32Array>(kind: new (n: number) => T, n: number, argument: string): T {
  try {
    return new kind(n);
  } catch (e) {
    return refuse('TOO_LARGE', argument, 'scratch this process can allocate', `${n} ${kind.name} elements (${(e as Error).message})`);
  }
}
