/**
 * The fuzzer's mutator: the slots of an argument list (every field of its plain objects, the
 * elements of its short arrays, its typed arrays) and the hostile or neutral values each kind of
 * slot can be given. A mutation is `neutral` when a correct library must treat the call exactly
 * as the unmutated one (a frozen copy, a forwarding Proxy, the same numbers in shared memory);
 * `dynamic` when what the call sees depends on when it reads (getters that change, buffers
 * detached or shrunk by a getter read later); otherwise a plain hostile value.
 */

/** A getter's own error: a call may let it through (it is the caller's), nothing else. */
export class SentinelError extends Error {
  constructor(where) {
    super(`sentinel thrown by the fuzzer's getter at ${where}`);
    this.name = 'SentinelError';
  }
}

const TYPED_CTORS = [Uint8Array, Int8Array, Uint16Array, Int16Array, Int32Array, Uint32Array, Float32Array, Float64Array, BigInt64Array, BigUint64Array];
const isBig = (a) => a instanceof BigInt64Array || a instanceof BigUint64Array;

/**
 * Whether an ArrayBuffer was detached (transferred). Node 20 has no ArrayBuffer.prototype.detached:
 * there a detached buffer is one of 0 bytes that no view can be made on.
 */
export function isDetachedBuffer(b) {
  if (b instanceof SharedArrayBuffer) return false;
  if (typeof b.detached === 'boolean') return b.detached;
  if (b.byteLength !== 0) return false;
  try {
    new Uint8Array(b);
    return false;
  } catch {
    return true;
  }
}

export function isTyped(v) {
  return ArrayBuffer.isView(v) && !(v instanceof DataView);
}

function isPlainObject(v) {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || ArrayBuffer.isView(v)) return false;
  const p = Object.getPrototypeOf(v);
  return p === Object.prototype || p === null;
}

/**
 * Every mutable slot of `root` (an array of positional arguments): { path, value, kind }.
 * Plain objects are walked field by field, arrays of at most 8 elements element by element.
 */
export function slotsOf(root) {
  const out = [];
  const walk = (value, path, depth) => {
    const kind = kindOf(value);
    if (path.length > 0) out.push({ path, value, kind });
    if (depth > 5) return;
    if (kind === 'object') for (const k of Object.keys(value)) walk(value[k], [...path, k], depth + 1);
    else if (kind === 'array' && value.length <= 8) value.forEach((v, i) => walk(v, [...path, i], depth + 1));
  };
  root.forEach((v, i) => walk(v, [i], 0));
  return out;
}

function kindOf(v) {
  if (isTyped(v)) return 'typed';
  if (Array.isArray(v)) return 'array';
  if (isPlainObject(v)) return 'object';
  if (typeof v === 'object' && v !== null) return 'opaque'; // a Plan, an engine, a class instance
  return typeof v; // number, string, bigint, boolean, undefined, function
}

const HOSTILE_NUMBERS = [NaN, Infinity, -Infinity, -1, 0, 1, 0.5, -0, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 32 + 1, 2 ** 53, 2 ** 53 + 2, -(2 ** 31), Number.MAX_VALUE, Number.MIN_VALUE, 1e-320, 65, 511, 513, 4096];
const HOSTILE_NON_NUMBERS = () => ['3', '', 3n, -1n, null, undefined, true, {}, [], [1], () => 1, Symbol('s'), new Number(3)];
/**
 * Values that String() cannot turn into text: a null-prototype object (TypeError) and one whose
 * toString and valueOf throw. A library that coerces one (a message built with String() or a
 * template, a Number() before its type check) throws an untyped error: a finding.
 */
export const UNPRINTABLE = () => [
  Object.create(null),
  {
    toString() {
      throw new Error("the fuzzer's toString: coerced by the library");
    },
    valueOf() {
      throw new Error("the fuzzer's valueOf: coerced by the library");
    },
  },
];

/**
 * The case's side stream (CaseHooks.side, set by runCase; null elsewhere): the generators added in
 * session 51 are drawn from it after a slot's own mutation was drawn from the case's stream, so a
 * case that takes none of them draws exactly what it drew before and its reproducer still holds.
 */
let side = null;

/** `made(side)` with probability `odds` (from the side stream), else `old`. */
function orSide(odds, old, made) {
  return side !== null && side.uniform() < odds ? made(side) : old;
}

/**
 * The session-52 generators' own stream (CaseHooks.side2, from seed 43: fuzz.mjs SIDE2_FROM_SEED),
 * drawn after the case's and the session-51 side stream's draws, so seeds 21-42 replay as before.
 */
let side2 = null;
/** The hooks of the case being mutated (mutateArgs): what a generator registers (thrown values, stable getters). */
let current = null;

/** `made(side2)` with probability `odds` (from the session-52 stream), else `old`. */
function orSide2(odds, old, made) {
  return side2 !== null && side2.uniform() < odds ? made(side2) : old;
}

/**
 * orSide2 for a generator added after some seeds of the session-52 stream were run: only on seeds
 * from `fromSeed` (fuzz.mjs SIDE2_LATE_FROM_SEED, SIDE2_LATER_FROM_SEED), so those replay as run.
 */
function orSide2From(fromSeed, odds, old, made) {
  return (current?.seed ?? 0) >= fromSeed ? orSide2(odds, old, made) : old;
}
/** Added after seeds 43-46 were run: a second read that throws. */
const orSide2Late = (odds, old, made) => orSide2From(47, odds, old, made);
/** Added after seeds 47-49 were run: Symbol.toPrimitive throwers, thenables, WebAssembly memories. */
const orSide2Later = (odds, old, made) => orSide2From(50, odds, old, made);

/**
 * The session-53 generators' own stream (CaseHooks.side3, from seed 64: fuzz.mjs SIDE3_FROM_SEED),
 * drawn after every older stream's draws of a slot, so seeds 1-63 replay as they were run.
 */
let side3 = null;

/** `made(side3)` with probability `odds` (from the session-53 stream), else `old`. */
function orSide3(odds, old, made) {
  return side3 !== null && side3.uniform() < odds ? made(side3) : old;
}

/** orSide3 for a generator added after seeds 64-75 were run: only on seeds from 76, so those replay as run. */
function orSide3Late(odds, old, made) {
  return (current?.seed ?? 0) >= 76 ? orSide3(odds, old, made) : old;
}

/**
 * Values a caller's getter may throw that are no Error: a library that reads `.message` or `.code`
 * of what it caught, or wraps it, throws its own TypeError. The call must let the value itself
 * through (a sentinel, the caller's) or refuse with a typed error.
 */
const THROWN = () => [null, undefined, Symbol('thrown'), 0, 'a thrown string', Object.freeze(Object.create(null))];

/** A non-Error value to throw, registered with the case (fuzz.mjs takes it back as the caller's own). */
function thrownValue(r) {
  const v = r.pick(THROWN());
  current?.thrown.push(v);
  return v;
}

/**
 * A getter of `first` that throws from its second read on, when its first read was the call's: a
 * library that reads it once never sees the throw (stable; a rejection with it is a read too many).
 * What it throws: a SentinelError or a value that is no Error (both the fuzzer's, not the caller's here).
 */
function throwsAfterFirstRead(first, r, where) {
  const rec = stableRecord();
  const v = r.uniform() < 0.5 ? new SentinelError(`${where}, read a second time`) : r.pick([null, undefined, Symbol('second read'), 'second read']);
  let reads = 0;
  const get = () => {
    rec.read();
    if (reads++ > 0 && !rec.early && !rec.restored && strictCall(rec)) throw v;
    return first;
  };
  // (registered with the case by mutateSlots only when this mutation is the slot's final one: a
  // later generator may replace it, and a discarded thrower's value matched another's throw: cpu seed 76 case 2238)
  return { get, rec, v, desc: `throws ${v instanceof SentinelError ? 'a SentinelError' : describe(v)} from its second read on` };
}

/** Whether the case's call is running and its target reads the arguments once (a getter throws only then). */
function strictCall(rec) {
  return rec.hooks?.inCall === true && rec.hooks.strictReads;
}

/**
 * A record of a getter whose later reads answer otherwise (stable: a library that reads it once sees
 * the first answer, so a call that resolves must give the unmutated call's result). `early` when it
 * was first read before the call (by the fuzzer's own wrapping): then the case is not judged so.
 * restore() makes it answer its first value for good (before the judge reads the arguments).
 */
function stableRecord() {
  const h = current;
  const rec = { hooks: h, early: false, restored: false, read() {
    if (!h?.inCall && !rec.restored) rec.early = true;
  } };
  h?.stable.push(rec);
  return rec;
}

const HOSTILE_STRINGS = ['', 'V4', 'v4 ', 'v32', 'v4', 'bf16', 'float32', 'int32', 'int64', 'uint8', 'float64', 'toString', '__proto__', 'constructor', 'hasOwnProperty', 'sparse', 'paged', 'auto', 'heads', 'queries', 'host', 'device', 'cuda', 'x'.repeat(1000)];
const BIG_INTS = [0n, -1n, 2n ** 31n - 1n, 2n ** 31n, 2n ** 32n, 2n ** 32n + 1n, 2n ** 63n - 1n, -(2n ** 63n), -(2n ** 32n) + 5n];

/** Side effects a late getter can run on the case's arrays (registered by the builder). */
export class CaseHooks {
  /** rng: when given, some arrays the builder tracks come back as length-tracking views of resizable buffers (for the shrinking getters). */
  constructor(rng) {
    this.rng = rng;
    this.arrays = []; // every typed array the builder made
    this.resizable = []; // ArrayBuffers made resizable by a mutation
    this.wasmMemories = []; // WebAssembly.Memory objects whose buffers a mutation put arrays in
    this.plans = []; // plans the builder made (released after the case: a cuda engine keeps device memory for them)
    this.deviceBuffers = []; // device buffers the case made itself (uploads; freed after the case)
    this.device = null; // on a device engine: { alloc(bytes), allocOn(device, bytes) | null } (run.mjs)
    this.reachedAtCall = 0;
    this.side = null; // the side stream of the newer generators (runCase sets it)
    this.side2 = null; // the session-52 generators' stream (runCase sets it from SIDE2_FROM_SEED)
    this.side2Late = false; // the session-52 generators added after seeds 43-46 were run (from SIDE2_LATE_FROM_SEED)
    this.side3 = null; // the session-53 generators' stream (runCase sets it from SIDE3_FROM_SEED)
    this.records = new WeakSet(); // dictionaries (a record of tensors by name): their keys are data, so a hidden, inherited or added key is no neutral change
    this.foreign = []; // records of getters of keys no entry point takes (foreignKey): a call that reads one reads the caller's whole object
    this.seed = 0; // the case's seed (runCase): generators added later draw only on seeds from theirs (orSide2From)
    this.thrown = []; // non-Error values the case's getters throw (the caller's own, like a SentinelError)
    this.secondReads = []; // what the case's getters throw from their second read on (throwsAfterFirstRead)
    this.stable = []; // records of getters that answer otherwise after their first read (stableRecord)
    this.inCall = false; // set by runCase while the call under test runs
    this.strictReads = true; // false where the target itself reads the arguments again (built.rereads): no getter throws on a second read
  }
  /** The stable getters answer their first value from now on (the judge reads the arguments). */
  restoreStable() {
    for (const r of this.stable) r.restored = true;
  }
  /** The stub's op count as the call under test starts (a target that runs warm-up calls first marks it again). */
  markCall(stub) {
    if (stub) this.reachedAtCall = stub.reached;
  }
  /** A device buffer of `bytes` for a mutation (freed after the case); on `device` when given (null where there is none). */
  deviceBuffer(bytes, device) {
    const b = device === undefined ? this.device.alloc(bytes) : this.device.allocOn(device, bytes);
    if (b) this.deviceBuffers.push(b);
    return b;
  }
  freeSome(rng) {
    for (const b of this.deviceBuffers) if (rng.uniform() < 0.5 && !b.freed) b.free();
  }
  track(a) {
    if (!isTyped(a)) return a;
    if (this.rng && this.rng.uniform() < 0.1) {
      const buf = new ArrayBuffer(a.byteLength, { maxByteLength: a.byteLength + 64 });
      const v = new a.constructor(buf);
      v.set(a);
      this.resizable.push(buf);
      a = v;
    }
    this.arrays.push(a);
    return a;
  }
  detachSome(rng) {
    for (const a of this.arrays) {
      if (rng.uniform() < 0.5 && a.buffer instanceof ArrayBuffer && !isDetachedBuffer(a.buffer) && a.buffer.byteLength > 0) {
        try {
          structuredClone(a.buffer, { transfer: [a.buffer] });
        } catch {
          /* a buffer that cannot be transferred (wasm memory, pinned): leave it */
        }
      }
    }
  }
  shrinkAll() {
    for (const b of this.resizable) if (!isDetachedBuffer(b)) b.resize(0);
  }
  /** Grows the resizable buffers to their maximum (a length-tracking view gets longer; a fixed one stays). */
  growAll() {
    for (const b of this.resizable) if (!isDetachedBuffer(b)) b.resize(b.maxByteLength);
  }
  /** Grows each WebAssembly memory by a page: its old buffer detaches (a shared one's does not). */
  growWasmMemories() {
    for (const m of this.wasmMemories) m.grow(1);
  }
  /** Shrinks the resizable buffers by one byte (a view over their end loses its last element, or all of it). */
  shrinkByOne() {
    for (const b of this.resizable) if (!isDetachedBuffer(b) && b.byteLength > 0) b.resize(b.byteLength - 1);
  }
  scribble(rng) {
    for (const a of this.arrays) {
      if (isDetachedBuffer(a.buffer) || a.length === 0) continue;
      const i = rng.int(0, a.length);
      a[i] = isBig(a) ? BigInt.asIntN(64, BigInt(rng.u32()) << 31n) : rng.pick([0x7fffffff, -1, 0xffff, 1e30, NaN]);
    }
  }
}

function copyInto(ctor, src, buffer, byteOffset) {
  const dst = new ctor(buffer, byteOffset, src.length);
  dst.set(src);
  return dst;
}

/** Typed-array mutations: another kind, another length, other memory for the same numbers, no memory. */
function mutateTyped(a, rng, hooks) {
  const ctor = a.constructor;
  const el = ctor.BYTES_PER_ELEMENT;
  const choices = [
    () => {
      const other = rng.pick(TYPED_CTORS.filter((c) => c !== ctor));
      const b = new other(a.length);
      return { value: b, desc: `${other.name}(${a.length}) instead of ${ctor.name}` };
    },
    () => ({ value: new ctor(Math.max(0, a.length + rng.pick([-1, 1, -a.length]))), desc: `${ctor.name} of another length` }),
    () => {
      const sab = new SharedArrayBuffer(a.byteLength + el * 2);
      return { value: copyInto(ctor, a, sab, el), desc: `${ctor.name} in a SharedArrayBuffer at byteOffset ${el}`, neutral: true };
    },
    () => {
      // a view deep in a larger buffer: byteOffset odd for bytes, a whole element otherwise
      const off = el === 1 ? 3 : el * 3;
      return { value: copyInto(ctor, a, new ArrayBuffer(a.byteLength + off + 16), off), desc: `${ctor.name} view at byteOffset ${off}`, neutral: true };
    },
    () => {
      const buf = new ArrayBuffer(a.byteLength, { maxByteLength: a.byteLength + 64 });
      const v = new ctor(buf); // length-tracking
      v.set(a);
      hooks.resizable.push(buf);
      return { value: v, desc: `${ctor.name} length-tracking over a resizable buffer`, neutral: true };
    },
    () => {
      const c = a.slice();
      structuredClone(c.buffer, { transfer: [c.buffer] });
      return { value: c, desc: `${ctor.name} over a detached buffer` };
    },
    () => ({ value: new DataView(a.buffer, a.byteOffset, a.byteLength), desc: 'a DataView of the same bytes' }),
    () => ({ value: Array.from(a), desc: 'a plain Array of the same values' }),
    () => {
      class Lying extends ctor {
        get length() {
          return super.length + 1000;
        }
      }
      const v = new Lying(a.length);
      v.set(a);
      return { value: v, desc: `a ${ctor.name} subclass whose length getter lies (+1000)`, neutral: true };
    },
    () => {
      const p = new Proxy(a, {});
      return { value: p, desc: `a Proxy of a ${ctor.name}` };
    },
    () => ({ value: Object.freeze(new ctor(0)), desc: 'an empty frozen typed array' }),
    () => {
      if (!(a instanceof Uint8Array)) return { value: a.slice(), desc: 'a copy', neutral: true };
      return { value: Buffer.from(a), desc: 'a node Buffer of the same bytes (pool offset)', neutral: true };
    },
  ];
  // int indices/ids: hostile values in place
  if (a instanceof Int32Array && a.length > 0) {
    choices.push(() => {
      const c = a.slice();
      const v = rng.pick([-1, -2, 2 ** 31 - 1, -(2 ** 31), c.length, 1 << 20]);
      c[rng.int(0, c.length)] = v;
      return { value: c, desc: `one element set to ${v}` };
    });
  }
  if (a instanceof BigInt64Array && a.length > 0) {
    choices.push(() => {
      const c = a.slice();
      const v = rng.pick(BIG_INTS);
      c[rng.int(0, c.length)] = v;
      return { value: c, desc: `one element set to ${v}n` };
    });
  }
  if (a instanceof Float32Array && a.length > 0) {
    choices.push(() => {
      const c = a.slice();
      const v = rng.pick([NaN, Infinity, -Infinity, 3e38, -3e38, 1e-45]);
      c[rng.int(0, c.length)] = v;
      return { value: c, desc: `one element set to ${v}` };
    });
  }
  if (a instanceof Uint16Array && a.length > 0) {
    choices.push(() => {
      const c = a.slice();
      // ±inf, NaN, ±128, a subnormal. Not huge finite values: logits of |x| ≳ 2^24 lose in float32 the
      // O(1) differences that set the weights, outside SPEC §4.1's bounds on every CPU backend (reported, not a validation matter)
      const v = rng.pick([0x7f80, 0xff80, 0x7fc0, 0x4300, 0xc300, 0x0001]);
      const n = rng.int(1, Math.min(c.length, 8) + 1);
      for (let i = 0; i < n; i++) c[rng.int(0, c.length)] = v;
      return { value: c, desc: `${n} element(s) set to bf16 bits 0x${v.toString(16)}` };
    });
  }
  const old = rng.pick(choices)();
  const made = orSide(1 / 14, old, () => {
    // its memory's geometry lies (the library reads a typed array through the intrinsics)
    class LyingGeometry extends ctor {
      get buffer() {
        return new ArrayBuffer(8);
      }
      get byteOffset() {
        return super.byteOffset + el;
      }
      get byteLength() {
        return super.byteLength + 64;
      }
    }
    const v = new LyingGeometry(a.length);
    v.set(a);
    return { value: v, desc: `a ${ctor.name} subclass whose buffer, byteOffset and byteLength getters lie`, neutral: true };
  });
  const resized = orSide2(1 / 10, made, (r) => r.pick(resizableViews(a, hooks))());
  const wasmed = orSide2Later(1 / 20, resized, (r) => {
    // a view in a WebAssembly memory's buffer (shared or not): the same numbers, so neutral; a late
    // getter may grow the memory (growWasm), which detaches a non-shared memory's old buffer
    const shared = r.uniform() < 0.3;
    const pages = Math.ceil((a.byteLength + 64) / 65536);
    const memory = new WebAssembly.Memory({ initial: pages, maximum: pages + 4, ...(shared ? { shared: true } : {}) });
    hooks.wasmMemories.push(memory);
    const v = new ctor(memory.buffer, el * 4, a.length);
    v.set(a);
    // (not among hooks.arrays: a replacement the call may write, as a cache it was given; stub seed 52 case 8312)
    return { value: v, desc: `${ctor.name} in a ${shared ? 'shared ' : ''}WebAssembly.Memory's buffer`, neutral: true };
  });
  return orSide3(1 / 12, wasmed, (r) => r.pick(lyingTypedArrays(a, hooks))(r));
}

/**
 * The session-52 typed-array generators: memory that can change size (resizable ArrayBuffers,
 * growable SharedArrayBuffers), as length-tracking views at an offset (neutral), views out of
 * their buffer's bounds, or grown past their shape before the call (hostile: no elements / another
 * length), and a buffer detached through a resize of its view's source.
 */
function resizableViews(a, hooks) {
  const ctor = a.constructor;
  const el = ctor.BYTES_PER_ELEMENT;
  return [
    () => {
      const buf = new ArrayBuffer(a.byteLength + 2 * el, { maxByteLength: a.byteLength + 64 * el });
      const v = new ctor(buf, 2 * el); // length-tracking from its offset
      v.set(a);
      hooks.resizable.push(buf);
      return { value: v, desc: `${ctor.name} length-tracking at byteOffset ${2 * el} of a resizable buffer`, neutral: true };
    },
    () => {
      const sab = new SharedArrayBuffer(a.byteLength, { maxByteLength: a.byteLength + 64 * el });
      const v = new ctor(sab); // length-tracking over growable shared memory
      v.set(a);
      return { value: v, desc: `${ctor.name} length-tracking over a growable SharedArrayBuffer`, neutral: true };
    },
    () => {
      const buf = new ArrayBuffer(a.byteLength + el, { maxByteLength: a.byteLength + 64 * el });
      const v = new ctor(buf, el, a.length); // fixed length
      v.set(a);
      if (a.length === 0) return { value: v, desc: `${ctor.name} of no elements in a resizable buffer`, neutral: true };
      buf.resize(el + a.byteLength - el); // its end is now past the buffer's: out of bounds, no elements
      return { value: v, desc: `${ctor.name} fixed-length view whose resizable buffer shrank below its end before the call` };
    },
    () => {
      const buf = new ArrayBuffer(a.byteLength, { maxByteLength: a.byteLength + 64 * el });
      const v = new ctor(buf);
      v.set(a);
      buf.resize(a.byteLength + el); // one element more than its shape
      hooks.resizable.push(buf);
      return { value: v, desc: `${ctor.name} length-tracking, its buffer grown by one element before the call` };
    },
  ];
}

function mutateNumber(v, rng) {
  return orSide3(0.1, mutateNumberOld(v, rng), (r) => edgeNumber(v, r));
}

function mutateNumberOld(v, rng) {
  const r = rng.uniform();
  if (r < 0.55) {
    const x = rng.pick(HOSTILE_NUMBERS);
    return { value: x, desc: `${Object.is(x, -0) ? '-0' : x}` };
  }
  if (r < 0.8) {
    const x = rng.pick([v + 1, v - 1, v * 2, v + 0.5, -v, v * 2 ** 20]);
    return { value: x, desc: `${x} (from ${v})` };
  }
  const x = rng.pick(HOSTILE_NON_NUMBERS());
  return orSide2Later(0.1, orSide(0.15, { value: x, desc: describe(x) }, unprintable), primitiveThrower);
}

/**
 * An object whose Symbol.toPrimitive throws a value that is no Error (it comes before toString and
 * valueOf in every coercion: Number(), a template, +x, a comparison with <): a library that coerces
 * it before its type check rejects with the fuzzer's value, an untyped error.
 */
function primitiveThrower(r) {
  const v = r.pick([Symbol('coerced'), null, 'coerced']);
  return { value: { [Symbol.toPrimitive]: () => { throw v; } }, desc: `an object whose Symbol.toPrimitive throws ${describe(v)}` };
}

function unprintable(r) {
  const x = r.pick(UNPRINTABLE());
  return { value: x, desc: describe(x) };
}

function mutateString(v, rng) {
  return orSide3(0.08, mutateStringOld(v, rng), (r) => oddString(v, r));
}

function mutateStringOld(v, rng) {
  if (rng.uniform() < 0.8) {
    const s = rng.pick(HOSTILE_STRINGS);
    return { value: s, desc: JSON.stringify(s.length > 20 ? `${s.slice(0, 20)}…` : s) };
  }
  const x = rng.pick(HOSTILE_NON_NUMBERS());
  return orSide2Later(0.1, orSide(0.15, { value: x, desc: describe(x) }, unprintable), primitiveThrower);
}

function mutateArray(a, rng, hooks) {
  const odd = orSide3(0.12, mutateArrayOld(a, rng), (r) => r.pick(oddArrays(a, hooks))(r));
  return orSide3Late(0.04, odd, (r) => {
    // too long for what it is (a shape of 65 dims, 2^20 holes past an id list) and without a
    // prototype: a refusal that formats it through its own methods (slice, map) throws a TypeError
    const c = a.slice();
    c.length = r.uniform() < 0.5 ? Math.max(65, a.length + 1) : a.length + 2 ** 20;
    if (c.length === 65) c.fill(1, a.length);
    Object.setPrototypeOf(c, null);
    return { value: c, desc: `${c.length} elements (${a.length} of its own), its prototype null` };
  });
}

function mutateArrayOld(a, rng) {
  const choices = [
    () => ({ value: a.slice(0, -1), desc: 'last element dropped' }),
    () => ({ value: [...a, rng.pick([1, 0, 2])], desc: 'an element appended' }),
    () => ({ value: [], desc: 'empty' }),
    () => {
      const c = a.slice();
      if (c.length === 0) return { value: [2 ** 31], desc: '[2^31]' };
      const x = rng.pick([NaN, -1, 1.5, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, Infinity, '2', null, 0, 3n]);
      c[rng.int(0, c.length)] = x;
      return { value: c, desc: `one element set to ${describe(x)}` };
    },
    () => ({ value: Int32Array.from(a.filter((x) => typeof x === 'number')), desc: 'an Int32Array of it' }),
    () => ({ value: Object.freeze(a.slice()), desc: 'a frozen copy', neutral: true }),
    () => ({ value: new Proxy(a.slice(), {}), desc: 'a forwarding Proxy of a copy', neutral: true }),
    () => {
      const c = a.slice();
      c.length = c.length + 2; // holes
      return { value: c, desc: 'two holes appended' };
    },
    () => {
      const o = { length: a.length };
      a.forEach((x, i) => (o[i] = x));
      return { value: o, desc: 'an array-like object' };
    },
    () => lengthChangingProxy(a, (n) => n + 5, 'grows'),
  ];
  if (a.length > 8) {
    // a long id list: a bad id somewhere inside
    choices.push(() => {
      const c = a.slice();
      const x = rng.pick([-1, 2 ** 31, 2 ** 53, 1.5, NaN, '3', null, 10n ** 30n]);
      c[rng.int(0, c.length)] = x;
      return { value: c, desc: `element set to ${describe(x)}` };
    });
  }
  const old = rng.pick(choices)();
  const added = [
    (r) => {
      const c = a.slice();
      if (c.length === 0) return { value: UNPRINTABLE(), desc: 'unprintable elements' };
      const x = r.pick(UNPRINTABLE());
      c[r.int(0, c.length)] = x;
      return { value: c, desc: `one element set to ${describe(x)}` };
    },
    (r) => {
      // an element whose second read differs: what was checked must be what is used
      const c = a.slice();
      if (c.length === 0) return { value: c, desc: 'a copy', neutral: true };
      const i = r.int(0, c.length);
      const first = c[i];
      const later = r.pick([null, undefined, flipValue(first, r)]);
      let reads = 0;
      const rec = stableRecord();
      Object.defineProperty(c, i, { enumerable: true, configurable: true, get: () => (rec.read(), reads++ === 0 || rec.restored ? first : later) });
      return { value: c, desc: `element ${i} changes after its first read (to ${describe(later)})`, dynamic: true, stable: true };
    },
    () => lengthChangingProxy(a, (n) => Math.max(0, n - 1), 'shrinks by one'),
    () => ({ value: new Proxy(Int32Array.from(a.filter((x) => typeof x === 'number')), {}), desc: 'a Proxy of an Int32Array of it' }),
  ];
  const made = orSide(0.25, old, (r) => r.pick(added)(r));
  const thrower = orSide2(0.12, made, (r) => {
    const c = a.slice();
    if (c.length === 0) return made;
    // an element whose read throws a value that is no Error (the caller's own)
    const i = r.int(0, c.length);
    const v = thrownValue(r);
    Object.defineProperty(c, i, {
      enumerable: true,
      get() {
        throw v;
      },
    });
    return { value: c, desc: `element ${i}'s read throws ${describe(v)}`, sentinel: true };
  });
  return orSide2Late(0.05, thrower, (r) => {
    // an element that throws from its second read on (a library reading it once never sees that)
    const c = a.slice();
    if (c.length === 0) return thrower;
    const i = r.int(0, c.length);
    const t = throwsAfterFirstRead(c[i], r, `element ${i}`);
    Object.defineProperty(c, i, { enumerable: true, configurable: true, get: t.get });
    return { value: c, desc: `element ${i} ${t.desc}`, dynamic: true, stable: true, secondRead: t.v };
  });
}

// ---- the session-53 generators (from seed 64, CaseHooks.side3) ----

const TYPED_PROTO = Object.getPrototypeOf(Uint8Array.prototype);
const TYPED_SET = TYPED_PROTO.set;
const TYPED_KIND_OF = Object.getOwnPropertyDescriptor(TYPED_PROTO, Symbol.toStringTag).get;
const TYPED_LENGTH_OF = Object.getOwnPropertyDescriptor(TYPED_PROTO, 'length').get;

/** The methods of a typed array a library might call on a caller's array (reading, copying or writing it). */
const TYPED_METHODS = ['slice', 'subarray', 'at', 'map', 'filter', 'forEach', 'reduce', 'reduceRight', 'every', 'some', 'find', 'findIndex', 'findLast', 'findLastIndex', 'includes', 'indexOf', 'lastIndexOf', 'join', 'values', 'keys', 'entries', 'set', 'fill', 'copyWithin', 'reverse', 'sort', 'toString', 'toLocaleString', Symbol.iterator];
/** The same for a plain array. */
const ARRAY_METHODS = ['map', 'slice', 'every', 'some', 'forEach', 'reduce', 'reduceRight', 'includes', 'indexOf', 'lastIndexOf', 'join', 'filter', 'find', 'findIndex', 'findLast', 'findLastIndex', 'at', 'concat', 'flat', 'flatMap', 'keys', 'values', 'entries', 'toString', 'toLocaleString', 'splice', 'fill', 'reverse', 'sort', 'push', 'pop', 'shift', 'unshift', 'copyWithin', 'toSorted', 'toReversed', 'toSpliced', 'with', Symbol.iterator];

/** A typed array of `a`'s kind and length holding other numbers (its elements rotated by one; each + 1 where they are all equal). */
function typedDecoy(a) {
  const ctor = a.constructor;
  const n = a.length;
  const d = new ctor(n);
  for (let i = 0; i < n; i++) d[i] = a[(i + 1) % n];
  if (n > 0 && d.every((x, i) => x === a[i])) for (let i = 0; i < n; i++) d[i] = isBig(a) ? d[i] + 1n : d[i] + 1;
  return d;
}

/** A plain array of `a`'s length holding other values: each number + 1, then rotated by one. */
function arrayDecoy(a) {
  const plus = a.map((x) => (typeof x === 'number' ? x + 1 : x));
  return plus.length > 1 ? [...plus.slice(1), plus[0]] : plus;
}

/** `a`'s numbers in a fresh array of class `cls` (a subclass of its kind), filled through the intrinsic set. */
function typedCopy(cls, a) {
  const v = new cls(a.length);
  TYPED_SET.call(v, a);
  return v;
}

/**
 * Typed arrays whose own methods, species or prototype lie (session 53). The library reads a typed
 * array through the intrinsics (tensor.ts ownView), so a right-kind array whose methods or species
 * answer for other numbers, or whose prototype is another, is neutral: a call that used a method of
 * the caller's array (slice(), subarray(), an iterator) sees the decoy's numbers, or a longer copy.
 * An array of another kind whose prototype is this kind's (instanceof passes) must be refused.
 */
function lyingTypedArrays(a, hooks) {
  const ctor = a.constructor;
  return [
    () => {
      const decoy = typedDecoy(a);
      class LyingMethods extends ctor {}
      for (const m of TYPED_METHODS) {
        const f = ctor.prototype[m];
        if (typeof f !== 'function') continue;
        Object.defineProperty(LyingMethods.prototype, m, { configurable: true, writable: true, value(...args) {
          return f.apply(decoy, args);
        } });
      }
      return { value: typedCopy(LyingMethods, a), desc: `a ${ctor.name} subclass whose methods (slice, subarray, map, set, an iterator, ...) answer for other numbers`, neutral: true };
    },
    () => {
      // its species: the intrinsic slice / map / filter make one element more than asked (the rest
      // of it from the decoy), subarray a view of the decoy's memory
      const v = typedCopy(ctor, a);
      const decoy = typedDecoy(a);
      class Species {
        constructor(first, byteOffset, length) {
          if (typeof first === 'number') {
            const out = new ctor(first + 1);
            TYPED_SET.call(out, decoy.subarray(0, Math.min(first + 1, decoy.length)));
            return out;
          }
          return new ctor(decoy.buffer, byteOffset, length);
        }
      }
      Object.defineProperty(v, 'constructor', { configurable: true, value: { [Symbol.species]: Species } });
      return { value: v, desc: `a ${ctor.name} whose constructor's Symbol.species makes longer copies and views of other memory`, neutral: true };
    },
    (r) => {
      const proto = r.pick([null, Object.prototype, Array.prototype, r.pick(TYPED_CTORS.filter((c) => c !== ctor)).prototype]);
      const v = typedCopy(ctor, a);
      Object.setPrototypeOf(v, proto);
      return { value: v, desc: `a ${ctor.name} whose prototype is ${proto === null ? 'null' : proto === Object.prototype ? 'Object.prototype' : proto === Array.prototype ? 'Array.prototype' : `${proto.constructor.name}.prototype`}`, neutral: true };
    },
    (r) => {
      // another kind dressed as this one: instanceof, .constructor and BYTES_PER_ELEMENT say `ctor`
      const other = r.pick(TYPED_CTORS.filter((c) => c !== ctor));
      const v = new other(a.length);
      const n = Math.min(v.byteLength, a.byteLength);
      new Uint8Array(v.buffer).set(new Uint8Array(a.buffer, a.byteOffset, n));
      Object.setPrototypeOf(v, ctor.prototype);
      return { value: v, desc: `an ${other.name}(${a.length}) whose prototype is ${ctor.name}.prototype (instanceof ${ctor.name})` };
    },
  ];
}

/**
 * Plain arrays that are odd (session 53): own methods, species or prototype that lie (neutral: the
 * library reads an array by its length and indices, once), a hole inside it, a length of 2^20 holes
 * past its elements (hostile, kept modest: a library that counts before it reads refuses at once),
 * and an element whose read detaches, shrinks or rewrites the case's typed arrays (dynamic).
 */
function oddArrays(a, hooks) {
  return [
    () => {
      const c = a.slice();
      const decoy = arrayDecoy(a);
      for (const m of ARRAY_METHODS) {
        const f = Array.prototype[m];
        if (typeof f !== 'function') continue;
        Object.defineProperty(c, m, { configurable: true, writable: true, enumerable: false, value: (...args) => f.apply(decoy, args) });
      }
      return { value: c, desc: 'an array whose own methods (map, slice, every, join, an iterator, ...) answer for other values', neutral: true };
    },
    () => {
      // the intrinsic slice / map / filter / concat make their result through the species: one that keeps the decoy's values
      const c = a.slice();
      const decoy = arrayDecoy(a);
      class Species {
        constructor() {
          return new Proxy(decoy.slice(), { defineProperty: () => true, set: () => true });
        }
      }
      Object.defineProperty(c, 'constructor', { configurable: true, enumerable: false, value: { [Symbol.species]: Species } });
      return { value: c, desc: "an array whose constructor's Symbol.species makes arrays of other values (slice, map, filter, concat)", neutral: true };
    },
    (r) => {
      const proto = r.pick([null, Object.prototype, Int32Array.prototype]);
      const c = a.slice();
      Object.setPrototypeOf(c, proto);
      return { value: c, desc: `an array whose prototype is ${proto === null ? 'null' : proto === Object.prototype ? 'Object.prototype' : 'Int32Array.prototype'} (Array.isArray still true)`, neutral: true };
    },
    (r) => {
      const c = a.slice();
      if (c.length === 0) return { value: [, 1], desc: 'a hole then 1' }; // eslint-disable-line no-sparse-arrays
      const i = r.int(0, c.length);
      delete c[i];
      return { value: c, desc: `a hole at element ${i} (forEach, every and some skip it)` };
    },
    () => {
      const c = a.slice();
      c.length = a.length + 2 ** 20;
      return { value: c, desc: `its ${a.length} element(s) then 2^20 holes` };
    },
    (r) => {
      const c = a.slice();
      if (c.length === 0 || !hooks) return { value: c, desc: 'a copy', neutral: true };
      const i = r.int(0, c.length);
      const v = c[i];
      const act = lateAct(hooks, r);
      let done = false;
      Object.defineProperty(c, i, { enumerable: true, configurable: true, get() {
        if (!done) {
          done = true;
          act.run();
        }
        return v;
      } });
      return { value: c, desc: `reading element ${i} ${act.what} (once)`, dynamic: true };
    },
  ];
}

/** A side effect on the case's arrays, memories or device buffers, drawn from `r`: { run(), what }. */
function lateAct(hooks, r) {
  const act = r.pick(hooks.deviceBuffers.length > 0 ? ['detach', 'shrink', 'scribble', 'grow', 'shrinkByOne', 'growWasm', 'free'] : ['detach', 'shrink', 'scribble', 'grow', 'shrinkByOne', 'growWasm']);
  const run = {
    detach: () => hooks.detachSome(r),
    shrink: () => hooks.shrinkAll(),
    scribble: () => hooks.scribble(r),
    grow: () => hooks.growAll(),
    shrinkByOne: () => hooks.shrinkByOne(),
    growWasm: () => hooks.growWasmMemories(),
    free: () => hooks.freeSome(r),
  }[act];
  const what = { growWasm: "grows the case's WebAssembly memories", detach: "detaches some of the case's buffers", shrink: 'shrinks the resizable buffers to 0', grow: 'grows the resizable buffers to their maximum', shrinkByOne: 'shrinks the resizable buffers by one byte', scribble: 'rewrites an element of every array', free: "frees some of the case's device buffers" }[act];
  return { run, what };
}

/** Numbers at the edges of what an integer or count check lets through (session 53); hostile. */
const EDGE_NUMBERS = [Number.MAX_SAFE_INTEGER, -Number.MAX_SAFE_INTEGER, 2 ** 53 + 1, 1e308, -1e308, 1e21, 1e-7, 2 ** 32 + 3, -(2 ** 32) + 3, 1 + 2 ** -52, 1 - 2 ** -53, 2 ** 31 - 0.5, -0.5, 5e-324, -5e-324, 2 ** 64, 2 ** 1023 * 1.5];

function edgeNumber(v, r) {
  const x = r.uniform() < 0.8 ? r.pick(EDGE_NUMBERS) : r.pick([v + 2 ** -40 * Math.max(1, Math.abs(v)), v + 2 ** 32, v - 2 ** 32]);
  return { value: x, desc: `${x} (an edge number${typeof v === 'number' ? `, from ${v}` : ''})` };
}

/** Strings a check by === refuses and a check by String(), trim() or a prefix lets through (session 53); hostile. */
function oddString(v, r) {
  const s = typeof v === 'string' ? v : String(v);
  const x = r.pick([() => new String(s), () => `${s}\0`, () => `${s}\u200b`, () => ` ${s}`, () => s.toUpperCase(), () => `${s}\ud800`, () => Object.assign(new String(s), { toString: () => 'x' })])();
  return { value: x, desc: typeof x === 'string' ? `${JSON.stringify(x)} (from ${JSON.stringify(s)})` : `a String object of ${JSON.stringify(s)}` };
}

/**
 * Objects that are odd (session 53): a copy with an enumerable getter of a key no entry point takes
 * (neutral; a call that reads it read the caller's whole object: spread, Object.entries, a JSON
 * round trip; fuzz.mjs's soft 'foreign-read'); a Proxy whose ownKeys hides every key while get
 * answers them (neutral: the library reads the fields it takes by name); a copy whose own
 * hasOwnProperty / toString / valueOf / toJSON lie (neutral).
 */
function oddObjects(o, hooks, where) {
  return [
    () => {
      const c = { ...o };
      const rec = { read: false, at: where };
      Object.defineProperty(c, 'fuzzForeignKey', { enumerable: true, configurable: true, get() {
        if (hooks?.inCall) rec.read = true;
        return 1;
      } });
      hooks?.foreign.push(rec);
      return { value: c, desc: 'a copy with an enumerable getter of a key no entry point takes', neutral: true };
    },
    () => {
      const c = { ...o };
      return {
        value: new Proxy(c, { ownKeys: () => [], getOwnPropertyDescriptor: () => undefined }),
        desc: 'a Proxy whose ownKeys hides every key (get answers them)',
        neutral: true,
      };
    },
    () => {
      const c = { ...o };
      for (const [k, f] of [['hasOwnProperty', () => false], ['toString', () => '[object Lie]'], ['valueOf', () => 0], ['toJSON', () => ({})], ['propertyIsEnumerable', () => false]]) {
        Object.defineProperty(c, k, { configurable: true, writable: true, enumerable: false, value: f });
      }
      return { value: c, desc: 'a copy whose own hasOwnProperty, toString, valueOf and toJSON lie', neutral: true };
    },
  ];
}

/** A Proxy of a copy of `a` whose length answers `later(length)` from its second read on. */
function lengthChangingProxy(a, later, how) {
  let reads = 0;
  const rec = stableRecord();
  const value = new Proxy(a.slice(), {
    get(t, k, r) {
      if (k === 'length') {
        rec.read();
        if (reads++ > 0 && !rec.restored) return later(t.length);
      }
      return Reflect.get(t, k, r);
    },
  });
  return { value, desc: `a Proxy whose length ${how} after the first read`, dynamic: true, stable: true };
}

/** Wrappers of an object (a tensor, a cache, an argument object) and replacements for it. */
function mutateObject(o, rng, hooks, where) {
  const keys = Object.keys(o);
  const choices = [
    () => ({ value: Object.freeze({ ...o }), desc: 'a frozen copy', neutral: true }),
    () => ({ value: new Proxy({ ...o }, {}), desc: 'a forwarding Proxy', neutral: true }),
    () => ({ value: Object.assign(Object.create(null), o), desc: 'a null-prototype copy', neutral: true }),
    () => ({ value: Object.create({ ...o }), desc: 'an object inheriting every field', neutral: true }),
    () => {
      const c = { ...o };
      Object.defineProperty(c, '__proto__', { value: { polluted: 1 }, enumerable: true });
      c.constructor = 'not a constructor';
      return { value: c, desc: 'own __proto__ and constructor keys', neutral: true };
    },
    () => ({ value: JSON.parse('{"__proto__": {"dtype": "bf16"}}'), desc: 'only a JSON __proto__ key' }),
    () => {
      if (keys.length === 0) return { value: null, desc: 'null' };
      const c = { ...o };
      const k = rng.pick(keys);
      delete c[k];
      return { value: c, desc: `field ${k} removed` };
    },
    () => {
      const x = rng.pick([null, undefined, 0, 'obj', [], [o], () => o, new Map(Object.entries(o)), Symbol('o')]);
      return { value: x, desc: `replaced by ${describe(x)}` };
    },
    () => {
      const c = { ...o };
      const k = keys.length ? rng.pick(keys) : 'x';
      const thrown = orSide2(0.35, null, (r) => ({ v: thrownValue(r) }));
      Object.defineProperty(c, k, {
        enumerable: true,
        get() {
          throw thrown ? thrown.v : new SentinelError(`${where}.${k}`);
        },
      });
      return { value: c, desc: `getter of ${k} throws${thrown ? ` ${describe(thrown.v)}` : ''}`, sentinel: true };
    },
    () => {
      const c = { ...o };
      const thrown = orSide2(0.35, null, (r) => ({ v: thrownValue(r) }));
      const raise = (trap) => {
        throw thrown ? thrown.v : new SentinelError(`${where} (Proxy ${trap})`);
      };
      return {
        value: new Proxy(c, {
          get: () => raise('get'),
          has: () => raise('has'),
          ownKeys: () => raise('ownKeys'),
        }),
        desc: `a Proxy whose every trap throws${thrown ? ` ${describe(thrown.v)}` : ''}`,
        sentinel: true,
      };
    },
    () => {
      // a field whose second read differs: what was checked must be what is used
      if (keys.length === 0) return { value: o, desc: 'unchanged', neutral: true };
      const c = { ...o };
      const k = rng.pick(keys);
      const first = o[k];
      const later = flipValue(first, rng);
      const throwing = orSide2Late(0.3, null, (r) => throwsAfterFirstRead(first, r, `${where}.${k}`));
      if (throwing) {
        Object.defineProperty(c, k, { enumerable: true, get: throwing.get });
        return { value: c, desc: `${k} ${throwing.desc}`, dynamic: true, stable: true, secondRead: throwing.v };
      }
      let reads = 0;
      const rec = stableRecord();
      Object.defineProperty(c, k, {
        enumerable: true,
        get() {
          rec.read();
          return reads++ === 0 || rec.restored ? first : later;
        },
      });
      return { value: c, desc: `${k} changes after its first read (to ${describe(later)})`, dynamic: true, stable: true };
    },
    () => {
      // a field whose read detaches, shrinks or rewrites the case's arrays (read after others were checked)
      if (keys.length === 0) return { value: o, desc: 'unchanged', neutral: true };
      const c = { ...o };
      const k = rng.pick(keys);
      const v = o[k];
      const oldAct = hooks.deviceBuffers.length > 0 && rng.uniform() < 0.4 ? 'free' : rng.pick(['detach', 'shrink', 'scribble']);
      const act = orSide2Later(0.15, orSide2(0.3, oldAct, (r) => r.pick(['grow', 'shrinkByOne'])), () => 'growWasm');
      Object.defineProperty(c, k, {
        enumerable: true,
        get() {
          if (act === 'detach') hooks.detachSome(rng);
          else if (act === 'shrink') hooks.shrinkAll();
          else if (act === 'grow') hooks.growAll();
          else if (act === 'growWasm') hooks.growWasmMemories();
          else if (act === 'shrinkByOne') hooks.shrinkByOne();
          else if (act === 'free') hooks.freeSome(rng);
          else hooks.scribble(rng);
          return v;
        },
      });
      const what = { growWasm: 'grows the case\'s WebAssembly memories (their old buffers detach)', detach: 'detaches some of the case\'s buffers', shrink: 'shrinks the resizable buffers to 0', grow: 'grows the resizable buffers to their maximum', shrinkByOne: 'shrinks the resizable buffers by one byte', scribble: 'rewrites an element of every array', free: 'frees some of the case\'s device buffers' }[act];
      return { value: c, desc: `reading ${k} ${what}`, dynamic: true };
    },
  ];
  const picked = rng.pick(choices)();
  // a dictionary's keys are its data: an inherited field or an own __proto__ key is another record
  const made = picked.neutral && hooks?.records?.has(o) && /inheriting|__proto__ and constructor/.test(picked.desc) ? { ...picked, neutral: false } : picked;
  const thenable = orSide2Later(0.06, made, () => {
    // a thenable: a library that awaits or resolves a promise with the caller's object waits for ever
    const c = { ...o };
    Object.defineProperty(c, 'then', { enumerable: false, value: () => undefined });
    return { value: c, desc: 'a copy with a then() that never settles', neutral: true };
  });
  const odd = orSide3(0.08, thenable, (r) => r.pick(oddObjects(o, hooks, where))(r));
  if (odd !== thenable && hooks?.records?.has(o) && /no entry point|hides every key/.test(odd.desc)) {
    // a record's foreign key is a tensor of its own (read, refused), its hidden keys no tensors
    hooks.foreign = hooks.foreign.filter((rec) => rec.at !== where);
    return { ...odd, neutral: false };
  }
  return odd;
}

function flipValue(v, rng) {
  if (typeof v === 'number') return rng.pick([v * 4 + 7, -1, 2 ** 31, NaN]);
  if (typeof v === 'string') return rng.pick(['v32', 'int64', 'float32', 'bf16', 'v4']);
  if (Array.isArray(v)) return orSide(0.3, rng.pick([[...v, 1], v.map((d) => (typeof d === 'number' ? d * 2 + 1 : d)), [2 ** 20]]), (r) => r.pick([null, undefined]));
  if (isTyped(v)) return new v.constructor(Math.max(1, (v.length >> 1) || 1));
  return rng.pick([null, {}, 3]);
}

const DEVICE_BUFFER_BRAND = Symbol.for('sparse-mla.DeviceBuffer');

/** Device-buffer abuse (a cuda engine): freed, of another size, of another device or engine. */
function deviceBufferChoices(b, rng, hooks) {
  return [
    () => {
      const c = hooks.deviceBuffer(b.byteLength);
      c.free();
      return { value: c, desc: `a freed device buffer of the same ${b.byteLength} bytes`, mustRefuse: true };
    },
    () => {
      const bytes = Math.max(0, b.byteLength + rng.pick([-2, 2, 256, -b.byteLength, 4096]));
      if (bytes === b.byteLength) return { value: b, desc: 'unchanged', neutral: true };
      return { value: hooks.deviceBuffer(bytes), desc: `a device buffer of ${bytes} bytes instead of ${b.byteLength}`, mustRefuse: true };
    },
    () => {
      const other = hooks.deviceBuffer(b.byteLength, b.deviceIndex + 1);
      if (!other) return { value: b, desc: 'unchanged (no other device)', neutral: true };
      return { value: other, desc: `a buffer of device ${b.deviceIndex + 1} (this engine's is ${b.deviceIndex})`, mustRefuse: 'other-device' };
    },
    () => {
      const peer = hooks.deviceBuffer(b.byteLength, b.deviceIndex);
      return { value: peer, desc: `a buffer of another engine on device ${b.deviceIndex} (other contents)` };
    },
    () => {
      b.free();
      return { value: b, desc: 'this buffer, freed before the call', mustRefuse: true };
    },
  ];
}

function mutateOpaque(o, rng, where, hooks) {
  if (hooks?.device && o[DEVICE_BUFFER_BRAND] === true && rng.uniform() < 0.6) return rng.pick(deviceBufferChoices(o, rng, hooks))();
  const choices = [
    () => ({ value: new Proxy(o, {}), desc: `a forwarding Proxy of the ${o.constructor?.name}` }),
    () => ({ value: Object.create(o), desc: `an object whose prototype is the ${o.constructor?.name}` }),
    () => ({ value: { ...o }, desc: `a plain copy of the ${o.constructor?.name}'s own fields` }),
    () => ({ value: null, desc: 'null' }),
    () => ({ value: Object.freeze(o), desc: `the ${o.constructor?.name} frozen`, neutral: true }),
    () => {
      const thrown = orSide2(0.35, null, (r) => ({ v: thrownValue(r) }));
      return {
        value: new Proxy(o, {
          get() {
            throw thrown ? thrown.v : new SentinelError(`${where} (Proxy get)`);
          },
        }),
        desc: `a Proxy whose get throws${thrown ? ` ${describe(thrown.v)}` : ''}`,
        sentinel: true,
      };
    },
  ];
  return rng.pick(choices)();
}

function mutateScalar(v, kind, rng) {
  if (kind === 'bigint') return { value: rng.pick([...BIG_INTS, 0.5]), desc: 'another bigint' };
  if (kind === 'boolean') return { value: !v, desc: String(!v) };
  const x = rng.pick([0, -1, NaN, 'x', null, 2 ** 31, {}, 'v4', 'paged', 'device']);
  return { value: x, desc: describe(x) };
}

/** One mutation of slot `s`; `where` names it in descriptions. */
export function mutateSlot(s, rng, hooks) {
  const where = pathStr(s.path);
  switch (s.kind) {
    case 'typed':
      return mutateTyped(s.value, rng, hooks);
    case 'array':
      return mutateArray(s.value, rng, hooks);
    case 'object':
      return mutateObject(s.value, rng, hooks, where);
    case 'opaque':
      return mutateOpaque(s.value, rng, where, hooks);
    case 'number':
      return mutateNumber(s.value, rng);
    case 'string':
      return mutateString(s.value, rng);
    default:
      return mutateScalar(s.value, s.kind, rng);
  }
}

export function pathStr(path) {
  return path.map((p, i) => (i === 0 ? `arg${p}` : typeof p === 'number' ? `[${p}]` : `.${p}`)).join('');
}

/** Sets `value` at `path` inside the positional argument list `root` (in place). */
export function setAt(root, path, value) {
  let parent = root;
  for (let i = 0; i < path.length - 1; i++) parent = parent[path[i]];
  parent[path[path.length - 1]] = value;
}

/**
 * Applies `count` mutations to `root` (deepest first, so wrapping an ancestor keeps a mutated
 * child). Returns what was done: { muts: [{ where, desc, neutral, dynamic, sentinel }] }.
 */
export function mutateArgs(root, rng, hooks, count) {
  side = hooks?.side ?? null;
  side2 = hooks?.side2 ?? null;
  side3 = hooks?.side3 ?? null;
  current = hooks ?? null;
  try {
    return mutateSlots(root, rng, hooks, count);
  } finally {
    side = side2 = side3 = current = null;
  }
}

function mutateSlots(root, rng, hooks, count) {
  const slots = slotsOf(root);
  const picked = [];
  for (let i = 0; i < count && slots.length > 0; i++) {
    const s = slots[rng.int(0, slots.length)];
    if (picked.some((p) => pathStr(p.path) === pathStr(s.path))) continue;
    picked.push(s);
  }
  picked.sort((a, b) => b.path.length - a.path.length);
  const muts = [];
  for (const s of picked) {
    // the slot's current value (a deeper mutation may have replaced part of it)
    let cur = root, m;
    try {
      for (const k of s.path) cur = cur?.[k];
      m = mutateSlot({ ...s, value: cur, kind: kindOf(cur) }, rng, hooks);
    } catch {
      // a deeper mutation of this case throws when read (a thrower of the caller's own): the fuzzer's
      // own read of it while mutating its parent is no call of the library's, so the parent stays as is
      continue;
    }
    setAt(root, s.path, m.value);
    if ('secondRead' in m) hooks?.secondReads.push(m.secondRead);
    muts.push({ where: pathStr(s.path), desc: m.desc, neutral: !!m.neutral, dynamic: !!m.dynamic, sentinel: !!m.sentinel, ...(m.stable ? { stable: true } : {}), ...(m.mustRefuse ? { mustRefuse: m.mustRefuse } : {}) });
  }
  return muts;
}

/** A short description of any value (for reports). */
export function describe(v) {
  if (v === null) return 'null';
  if (v === undefined) return 'undefined';
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'symbol') return 'a Symbol';
  if (typeof v === 'function') return 'a function';
  if (typeof v === 'string') return JSON.stringify(v.length > 20 ? `${v.slice(0, 20)}…` : v);
  if (typeof v === 'number') return Object.is(v, -0) ? '-0' : String(v);
  if (isTyped(v)) return `${v.constructor?.name ?? TYPED_KIND_OF.call(v)}(${v.constructor ? v.length : TYPED_LENGTH_OF.call(v)})`;
  // (by index: an array's own methods, species or prototype may lie, or be gone)
  if (Array.isArray(v)) return `[${Array.from({ length: Math.min(6, v.length) }, (_, i) => describe(v[i])).join(', ')}${v.length > 6 ? ', …' : ''}]`;
  if (v instanceof Map) return 'a Map';
  if (v instanceof DataView) return 'a DataView';
  if (Object.getPrototypeOf(v) === null && Object.keys(v).length === 0) return 'an empty null-prototype object';
  return `{${Object.keys(v).slice(0, 5).join(', ')}}`;
}
