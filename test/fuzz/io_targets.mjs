/**
 * ioBytes (session 56, from seed IO_BYTES_FROM_SEED): the bytes of a valid .npy or .safetensors file the
 * library wrote (encodeNpy / encodeSafetensors of 1-3 small tensors of every dtype, empty and scalar
 * ones too), edited at the byte level: a bit flipped or a character replaced, inserted or deleted in
 * the header (its length field kept or moved with it), a dim or a number written another way (too
 * large, negative, fractional, hex, `L`), the length field set to an edge value, the file cut short or
 * grown. The same bytes are then parsed twice: from memory (parseNpy / parseSafetensors) and from a
 * file (readNpyFile / readSafetensorsFile, which read the header first and the data only once the
 * size agrees).
 *
 * Judged: both refuse with the same documented code, or both resolve with the same tensors (dtype or
 * descr, shape, bytes; the metadata), each tensor's data of its dtype's kind and as long as its shape
 * says; unedited bytes read back as written (a refusal of them is `neutral-refused`); no handle left
 * open on the file. The structured changes of a prefill folder are hostileDir's (dir_targets.mjs);
 * this one finds what a parser's corners do, and where the two readers of a format part ways.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SparseMlaError, tensor } from '../../dist/index.js';
import { encodeNpy, encodeSafetensors, parseNpy, parseSafetensors, readNpyFile, readSafetensorsFile, tensorToNpy } from '../../dist/io/index.js';
import { caseScratch } from './side_targets.mjs';
import { handlesUnder } from './dir_targets.mjs';

/** The first seed that draws ioBytes. */
export const IO_BYTES_FROM_SEED = 164;

const ARRAYS = { bf16: Uint16Array, float32: Float32Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array };
const KIND_OF_DESCR = { '<u2': 'Uint16Array', '<f4': 'Float32Array', '<i4': 'Int32Array', '<i8': 'BigInt64Array', '|u1': 'Uint8Array' };
const KIND_OF_DTYPE = { bf16: 'Uint16Array', float32: 'Float32Array', int32: 'Int32Array', int64: 'BigInt64Array', uint8: 'Uint8Array' };
const TYPED_KIND = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(Uint8Array.prototype), Symbol.toStringTag).get;

/** A small tensor of `dtype`: empty, scalar, long thin or up to 64 dims of 1. */
function smallTensor(rng, dtype) {
  const shape = rng.pick([
    () => [],
    () => [0],
    () => [rng.int(1, 6)],
    () => [rng.int(0, 4), rng.int(1, 5)],
    () => [rng.int(1, 3), rng.int(1, 3), rng.int(1, 4)],
    () => [1, rng.int(0, 3), 1, 2],
    () => Array(rng.int(60, 65)).fill(1),
    () => [0, 2 ** rng.int(20, 40)],
  ])();
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new ARRAYS[dtype](n);
  const bytes = new Uint8Array(data.buffer);
  for (let i = 0; i < bytes.length; i++) bytes[i] = rng.int(0, 256);
  return tensor(dtype, shape, data);
}

const HEADER_CHARS = [..."'\"(),:{}[] \n\t0123456789LTF<>|-.eE\\", '\u0000', '\u00ff', '\u00e9'];
const NUMBER_TEXT = ['9007199254740993', '1e3', '-1', '0x10', '3L', '1.0', '00', '-0', '1e400', '4294967296', '18446744073709551616', ''];

/** One edit of an npy file's bytes (`s`: the header's start and length as written): [label, apply(bytes) → bytes]. */
function npyEdit(rng, start, len) {
  // (an earlier edit may have cut the file short: a header edit stops at its end, or does nothing)
  const endOf = (b) => Math.min(start + len, b.length);
  const header = (edit) => (b) => (endOf(b) <= start ? b : edit(b, endOf(b)));
  const setLen = (b, v) => {
    const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    if (start === 10) dv.setUint16(8, v & 0xffff, true);
    else dv.setUint32(8, v >>> 0, true);
  };
  const lenOf = (b) => (start === 10 ? new DataView(b.buffer, b.byteOffset).getUint16(8, true) : new DataView(b.buffer, b.byteOffset).getUint32(8, true));
  const edits = [
    ['a header bit flipped', header((b, end) => ((b[rng.int(0, end)] ^= 1 << rng.int(0, 8)), b))],
    ['a header character replaced', header((b, end) => ((b[rng.int(start, end)] = rng.pick(HEADER_CHARS).charCodeAt(0)), b))],
    ['a header character inserted (length moved)', header((b, end) => {
      const at = rng.int(start, end);
      const out = new Uint8Array(b.length + 1);
      out.set(b.subarray(0, at));
      out[at] = rng.pick(HEADER_CHARS).charCodeAt(0);
      out.set(b.subarray(at), at + 1);
      setLen(out, lenOf(b) + 1);
      return out;
    })],
    ['a header character deleted (length kept)', header((b, end) => {
      const at = rng.int(start, end);
      return Uint8Array.from([...b.subarray(0, at), ...b.subarray(at + 1)]);
    })],
    ['a number in the header rewritten', header((b, end) => {
      const text = Buffer.from(b.subarray(start, end)).toString('latin1');
      const nums = [...text.matchAll(/\d+/g)];
      if (nums.length === 0) return b;
      const m = rng.pick(nums);
      const edited = text.slice(0, m.index) + rng.pick(NUMBER_TEXT) + text.slice(m.index + m[0].length);
      const h = Buffer.from(edited, 'latin1');
      const out = new Uint8Array(start + h.length + (b.length - end));
      out.set(b.subarray(0, start));
      out.set(h, start);
      out.set(b.subarray(end), start + h.length);
      setLen(out, h.length);
      return out;
    })],
    ['the length field an edge value', header((b) => (setLen(b, rng.pick([0, 1, len - 1, len + 1, len + 64, 10000, 10001, 0xffff, 2 ** 31, 2 ** 32 - 1])), b))],
    ['the version byte', (b) => ((b[6] = rng.pick([0, 1, 2, 3, 4, 255])), b)],
    ['cut short', (b) => (b.length === 0 ? b : b.subarray(0, rng.int(0, b.length)))],
    ['grown', (b) => Uint8Array.from([...b, ...Array.from({ length: rng.int(1, 9) }, () => rng.int(0, 256))])],
  ];
  return rng.pick(edits);
}

/** One edit of a safetensors file's bytes (its JSON header at [8, 8 + len)). */
function stEdit(rng, len) {
  const endOf = (b) => Math.min(8 + len, b.length);
  const header = (edit) => (b) => (endOf(b) <= 8 ? b : edit(b, endOf(b)));
  const setLen = (b, v) => new DataView(b.buffer, b.byteOffset, b.byteLength).setBigUint64(0, BigInt.asUintN(64, BigInt(v)), true);
  const rewrite = (b, end, text) => {
    const h = Buffer.from(text, 'utf8');
    const out = new Uint8Array(8 + h.length + (b.length - end));
    out.set(h, 8);
    out.set(b.subarray(end), 8 + h.length);
    setLen(out, h.length);
    return out;
  };
  const json = (b, end) => Buffer.from(b.subarray(8, end)).toString('utf8');
  const edits = [
    ['a header bit flipped', header((b, end) => ((b[rng.int(0, end)] ^= 1 << rng.int(0, 8)), b))],
    ['a header character replaced', header((b, end) => ((b[rng.int(8, end)] = rng.pick([...'{}[]":,0123456789.-eE tnf\\u', '\u0000']).charCodeAt(0)), b))],
    ['a header character deleted (length kept)', header((b, end) => {
      const at = rng.int(8, end);
      return Uint8Array.from([...b.subarray(0, at), ...b.subarray(at + 1)]);
    })],
    ['a number in the header rewritten', header((b, end) => {
      const text = json(b, end);
      const nums = [...text.matchAll(/-?\d+/g)];
      if (nums.length === 0) return b;
      const m = rng.pick(nums);
      return rewrite(b, end, text.slice(0, m.index) + rng.pick([...NUMBER_TEXT.filter((t) => t !== '' && !/[xL]/.test(t)), '1.5', '"5"', 'null', '[]', '2e0']) + text.slice(m.index + m[0].length));
    })],
    ['a key renamed to another', header((b, end) => {
      const text = json(b, end);
      const keys = [...text.matchAll(/"([^"\\]*)":\{/g)].map((m) => m[1]);
      if (keys.length < 1) return b;
      return rewrite(b, end, text.replace(`"${rng.pick(keys)}":{`, `"${rng.pick([...keys, '__metadata__', '__proto__', 'constructor', ''])}":{`));
    })],
    ['a field dropped or doubled', header((b, end) => {
      const text = json(b, end);
      const f = rng.pick(['dtype', 'shape', 'data_offsets']);
      return rewrite(b, end, rng.uniform() < 0.5 ? text.replace(new RegExp(`"${f}":("[^"]*"|\\[[^\\]]*\\]),?`), '') : text.replace(`"${f}":`, `"${f}":null,"${f}":`));
    })],
    ['the length field an edge value', (b) => (b.length < 8 ? b : (setLen(b, rng.pick([0, 1, 2, len - 1, len + 1, len + 8, 2 ** 32, 2 ** 53, 100_000_000, 100_000_001, -1])), b))],
    ['cut short', (b) => (b.length === 0 ? b : b.subarray(0, rng.int(0, b.length)))],
    ['grown', (b) => Uint8Array.from([...b, ...Array.from({ length: rng.int(1, 9) }, () => rng.int(0, 256))])],
  ];
  return rng.pick(edits);
}

const settle = async (f) => {
  try {
    return { value: await f() };
  } catch (error) {
    return { error };
  }
};

const bytesOf = (a) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const sameBytes = (x, y) => x.length === y.length && x.every((v, i) => v === y[i]);

/** A parsed tensor's problem: its data not of its dtype's kind, or not as long as its shape says. */
function shapeProblem(name, kind, shape, data) {
  if (TYPED_KIND.call(data) !== kind) return `${name}: data is a ${TYPED_KIND.call(data)}, expected ${kind}`;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) return `${name}: shape ${JSON.stringify(shape)}`;
  const n = shape.reduce((a, b) => a * b, 1);
  return data.length === n ? null : `${name}: ${data.length} elements for shape [${shape.join(', ')}]`;
}

const ioBytes = {
  name: 'ioBytes',
  fromSeed: IO_BYTES_FROM_SEED,
  build(rng, env, hooks) {
    const scratch = caseScratch(hooks);
    const format = rng.pick(['npy', 'st']);
    const dtypes = Object.keys(ARRAYS);
    let original, bytes, headerLen;
    if (format === 'npy') {
      original = smallTensor(rng, rng.pick(dtypes));
      bytes = encodeNpy(tensorToNpy(original));
      headerLen = new DataView(bytes.buffer).getUint16(8, true);
    } else {
      original = {};
      for (let n = rng.int(0, 4); n > 0; n--) original[rng.pick(['q', 'kv', 'indices', 'a', 'b'])] = smallTensor(rng, rng.pick(dtypes));
      const metadata = rng.uniform() < 0.5 ? { sm_scale: String(rng.pick([0.0625, 1, 3])), d_v: '512' } : undefined;
      bytes = encodeSafetensors(original, metadata);
      original = { tensors: original, metadata: metadata ?? {} };
      headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    }
    const labels = [];
    let edited = Uint8Array.from(bytes);
    for (let n = rng.pick([0, 1, 1, 1, 2, 3]); n > 0; n--) {
      const [label, apply] = format === 'npy' ? npyEdit(rng, 10, headerLen) : stEdit(rng, headerLen);
      labels.push(label);
      edited = Uint8Array.from(apply(Uint8Array.from(edited)));
    }
    const unchanged = sameBytes(edited, bytes);
    const name = format === 'npy' ? 'f.npy' : 'f.safetensors';
    const path = join(scratch, name);
    let handlesBefore = [];
    const describe = `${format === 'npy' ? `npy of ${original.dtype} [${original.shape.length > 8 ? `${original.shape.length} dims` : original.shape.join(', ')}]` : `safetensors of ${Object.keys(original.tensors).join(', ') || 'no tensor'}`}, ${bytes.length} bytes: ${labels.join('; ') || 'unedited'}${labels.length > 0 && unchanged ? ' (the bytes as they were)' : ''} -> ${edited.length} bytes`;
    return {
      args: [],
      describe,
      prepare: () => {
        writeFileSync(path, edited);
        handlesBefore = handlesUnder(scratch);
      },
      call: async () => {
        // (a copy each: a parser may not write what it was given, but the judge compares both)
        const mem = await settle(() => (format === 'npy' ? parseNpy(Uint8Array.from(edited), name) : parseSafetensors(Uint8Array.from(edited), name)));
        const file = await settle(() => (format === 'npy' ? readNpyFile(path, name) : readSafetensorsFile(path, name)));
        if (mem.error && file.error) {
          const codes = [mem.error, file.error].map((e) => (e instanceof SparseMlaError ? e.code : `${e?.name}: ${e?.message}`));
          // (an untyped one is the runner's to report)
          if (!(mem.error instanceof SparseMlaError)) throw mem.error;
          if (!(file.error instanceof SparseMlaError)) throw file.error;
          if (codes[0] === codes[1]) throw mem.error;
          return { differ: `parse refused with ${codes[0]} (${mem.error.message.slice(0, 160)}), the file reader with ${codes[1]} (${file.error.message.slice(0, 160)})` };
        }
        if (mem.error || file.error) {
          const [e, which] = mem.error ? [mem.error, 'parse'] : [file.error, 'the file reader'];
          if (!(e instanceof SparseMlaError)) throw e;
          return { differ: `${which} refused (${e.code}: ${e.message.slice(0, 200)}), the other resolved` };
        }
        return { mem: mem.value, file: file.value };
      },
      leftOpen: () => {
        const now = handlesUnder(scratch).filter((h) => !handlesBefore.includes(h));
        return now.length > 0 ? `${now.length} handle(s) left open: ${now.slice(0, 3).join(', ')}` : null;
      },
      judgeRefusal: (e) => (unchanged ? ['neutral-refused', `${describe}: ${e.code} ${e.message.slice(0, 200)}`] : null),
      judge: (got) => {
        if (got.differ) return `the two readers part ways: ${got.differ}`;
        const { mem, file } = got;
        if (format === 'npy') {
          for (const [which, r] of [['parse', mem], ['file', file]]) {
            const p = shapeProblem(which, KIND_OF_DESCR[r.descr], r.shape, r.data);
            if (p) return p;
          }
          if (mem.descr !== file.descr || JSON.stringify(mem.shape) !== JSON.stringify(file.shape) || !sameBytes(bytesOf(mem.data), bytesOf(file.data))) return `parse gave ${mem.descr} [${mem.shape}], the file reader ${file.descr} [${file.shape}]${mem.descr === file.descr ? ' (or other bytes)' : ''}`;
          if (unchanged && (KIND_OF_DESCR[mem.descr] !== KIND_OF_DTYPE[original.dtype] || JSON.stringify(mem.shape) !== JSON.stringify(original.shape) || !sameBytes(bytesOf(mem.data), bytesOf(original.data)))) return `unedited, read back as ${mem.descr} [${mem.shape}], written ${original.dtype} [${original.shape}]`;
          return null;
        }
        for (const [which, r] of [['parse', mem], ['file', file]]) {
          for (const [k, t] of r.tensors) {
            const p = shapeProblem(`${which} ${k}`, KIND_OF_DTYPE[t.dtype], t.shape, t.data);
            if (p) return p;
          }
        }
        const keys = (r) => [...r.tensors.keys()].sort().join(',');
        if (keys(mem) !== keys(file)) return `parse gave ${keys(mem)}, the file reader ${keys(file)}`;
        for (const [k, t] of mem.tensors) {
          const u = file.tensors.get(k);
          if (t.dtype !== u.dtype || JSON.stringify(t.shape) !== JSON.stringify(u.shape) || !sameBytes(bytesOf(t.data), bytesOf(u.data))) return `${k}: parse gave ${t.dtype} [${t.shape}], the file reader ${u.dtype} [${u.shape}]`;
        }
        if (JSON.stringify(mem.metadata) !== JSON.stringify(file.metadata)) return `metadata ${JSON.stringify(mem.metadata)} against ${JSON.stringify(file.metadata)}`;
        if (unchanged) {
          const want = Object.keys(original.tensors).sort().join(',');
          if (keys(mem) !== want) return `unedited, read back ${keys(mem)}, written ${want}`;
          for (const [k, t] of mem.tensors) {
            const o = original.tensors[k];
            if (t.dtype !== o.dtype || JSON.stringify(t.shape) !== JSON.stringify(o.shape) || !sameBytes(bytesOf(t.data), bytesOf(o.data))) return `unedited, ${k} read back as ${t.dtype} [${t.shape}], written ${o.dtype} [${o.shape}]`;
          }
          if (JSON.stringify(mem.metadata) !== JSON.stringify(original.metadata)) return `unedited, metadata ${JSON.stringify(mem.metadata)}, written ${JSON.stringify(original.metadata)}`;
        }
        return null;
      },
    };
  },
};

/** The targets of this file, with their weights (fuzz.mjs draws them with the session-53 ones). */
export const IO_TARGETS = [[ioBytes, 2]];
