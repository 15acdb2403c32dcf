/**
 * hostileDir (session 55, from seed 118): a prefill directory written by the library (npy or
 * safetensors, inputs and outputs), then given hostile contents before it is read
 * (loadPrefillInputs, loadPrefillOutputs, PrefillDir.open + get, readNpyFile, readSafetensorsFile):
 * a file the call reads replaced by a FIFO, a directory, /dev/zero, a dangling or looping symlink;
 * cut short or grown; its header edited (an npy header's length, version, magic, descr, shape,
 * fortran_order, text after its dict, more dims than a tensor has; a safetensors header's length,
 * offsets, dtypes, shapes, metadata); meta.json rewritten; a second .safetensors; a file cut short
 * while the call runs; or neutral changes (a symlink to a copy, a hard link, an npy header as
 * version 2.0, meta.json padded or with a BOM, sm_scale written another decimal way, unread entries
 * that are FIFOs or loops).
 *
 * The judge knows what each change does to the file it touches (SPEC §9: files are regular files
 * whose size agrees with their header before anything is read): a call that reads a file changed
 * so must refuse with a SparseMlaError naming the file (`refuse`); a neutral change must read the
 * tensors as written (`same`); a change whose file may or may not stay valid (a dtype of the same
 * size, dims swapped) is unjudged when it resolves (`free`); a file cut short during the call gives
 * the tensors as written or a refusal (`sameOrRefuse`). A call may leave no handle open on the
 * case's folder. A refusal is judged by `judgeRefusal` (fuzz.mjs): the refused file's name is in
 * the message, or the code is TOO_LARGE.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, cpSync, linkSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, renameSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { createHash } from 'node:crypto';
import { SparseMlaError } from '../../dist/index.js';
import { PrefillDir, loadPrefillInputs, loadPrefillOutputs, readNpyFile, readSafetensorsFile, writePrefillDir, writePrefillOutputs } from '../../dist/io/index.js';
import { RELATIVE_PATHS_FROM_SEED, caseScratch, judgeFields, judgeTensors, prefillInputs, prefillOutputs } from './side_targets.mjs';

/** The seed of the last hostileDirWrite case built (the judge's rebuild of a neutral case has hooks of no seed). */
let lastWriteSeed = 0;

const DTYPE_OF_DESCR = { '<u2': 'bf16', '<f4': 'float32', '<i4': 'int32', '<i8': 'int64', '|u1': 'uint8' };

/** Handles this process holds open on files under `dir` (/proc/self/fd; none where there is no /proc). */
export function handlesUnder(dir) {
  let fds;
  try {
    fds = readdirSync('/proc/self/fd');
  } catch {
    return [];
  }
  const out = [];
  for (const fd of fds) {
    try {
      const to = readlinkSync(`/proc/self/fd/${fd}`);
      if (to.startsWith(dir)) out.push(to);
    } catch {
      /* closed meanwhile */
    }
  }
  return out;
}

/** An npy file's parts: version, header text, data bytes (the library's writer: version 1.0). */
function npyParts(bytes) {
  const major = bytes[6];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [len, start] = major === 1 ? [dv.getUint16(8, true), 10] : [dv.getUint32(8, true), 12];
  return { major, header: Buffer.from(bytes.subarray(start, start + len)).toString('latin1'), data: bytes.subarray(start + len) };
}

/** An npy file of `header` (latin1) as version `major`, `lenDelta` added to its length field. */
function npyBytes(major, header, data, lenDelta = 0) {
  const h = Buffer.from(header, 'latin1');
  const start = major === 1 || major === 0 || major > 3 ? 10 : 12;
  const out = new Uint8Array(start + h.length + data.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, major, 0]);
  const dv = new DataView(out.buffer);
  if (start === 10) dv.setUint16(8, (h.length + lenDelta) & 0xffff, true);
  else dv.setUint32(8, h.length + lenDelta, true);
  out.set(h, start);
  out.set(data, start + h.length);
  return out;
}

/** A safetensors file's parts: its header object and data bytes. */
function stParts(bytes) {
  const len = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
  return { header: JSON.parse(Buffer.from(bytes.subarray(8, 8 + len)).toString('utf8')), data: bytes.subarray(8 + len) };
}

function stBytes(headerJson, data, lenDelta = 0) {
  const h = Buffer.from(headerJson, 'utf8');
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(h.length + lenDelta), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}

/**
 * The changes a file of `kind` ('npy', 'st', 'meta') can take: [label, class, apply(path, rng)].
 * Where the class depends on the file (a change of two elements), apply returns it.
 */
export function changesOf(kind, op) {
  const replace = [
    ['a FIFO', 'refuse', (p) => (rmSync(p), execFileSync('mkfifo', [p]))],
    ['a directory', 'refuse', (p) => (rmSync(p), mkdirSync(p))],
    ['a symlink to /dev/zero', 'refuse', (p) => (rmSync(p), symlinkSync('/dev/zero', p))],
    ['a dangling symlink', 'refuse', (p) => (rmSync(p), symlinkSync(`${p}.gone`, p))],
    ['a symlink to itself', 'refuse', (p) => (rmSync(p), symlinkSync(p, p))],
    ['a symlink to a copy', 'same', (p) => (copyFileSync(p, `${p}.copy`), rmSync(p), symlinkSync(`${p}.copy`, p))],
    ['a hard link', 'same', (p) => (linkSync(p, `${p}.link`))],
    ['cut short', 'refuse', (p, rng) => {
      const b = readFileSync(p);
      // meta.json less its closing newline (or spaces) is the same JSON
      const keep = rng.int(0, b.length);
      if (kind === 'meta' && /^\s*$/.test(b.subarray(keep).toString('latin1'))) return 'same';
      truncateSync(p, keep);
    }],
    ['grown', 'refuse', (p, rng) => writeFileSync(p, Buffer.concat([readFileSync(p), Buffer.from(Array.from({ length: rng.int(1, 65) }, () => rng.pick([0x78, 0x00, 0xff, 0x7d])))]))],
  ];
  if (kind === 'npy') {
    return [
      ...replace,
      ['its header length field off', 'refuse', (p, rng) => {
        const { major, header, data } = npyParts(readFileSync(p));
        writeFileSync(p, npyBytes(major, header, data, rng.pick([-1, 1, -16, 64, 9000, 60000])));
      }],
      ['as version 2.0', 'same', (p) => {
        const { header, data } = npyParts(readFileSync(p));
        writeFileSync(p, npyBytes(2, header, data));
      }],
      ['as version 3.0', 'same', (p) => {
        const { header, data } = npyParts(readFileSync(p));
        writeFileSync(p, npyBytes(3, header, data));
      }],
      ['of an unknown version', 'refuse', (p, rng) => {
        const { header, data } = npyParts(readFileSync(p));
        writeFileSync(p, npyBytes(rng.pick([0, 4, 255]), header, data));
      }],
      ['its magic flipped', 'refuse', (p, rng) => {
        const b = readFileSync(p);
        b[rng.int(0, 6)] ^= 1 << rng.int(0, 8);
        writeFileSync(p, b);
      }],
      ['another descr', (p, rng) => {
        const { major, header, data } = npyParts(readFileSync(p));
        const from = /'descr': '([^']*)'/.exec(header)[1];
        const to = rng.pick(['>u2', '<i2', '<f2', '<f8', '|b1', '<u4', '<i4', '<f4', '<u2', '|u1', 'O', '<V2']);
        writeFileSync(p, npyBytes(major, header.replace(`'${from}'`, `'${to}'`), data));
        // a descr of another element size leaves the file's size at odds with its header; one of this library's of the same size reads
        const size = (d) => ({ '<u2': 2, '<f4': 4, '<i4': 4, '<i8': 8, '|u1': 1 })[d];
        return to === from ? 'same' : size(to) === undefined ? 'refuse' : 'free';
      }],
      ['fortran order', 'refuse', (p) => {
        const { major, header, data } = npyParts(readFileSync(p));
        writeFileSync(p, npyBytes(major, header.replace('False', 'True'), data));
      }],
      ['a dim grown', (p, rng) => {
        const { major, header, data } = npyParts(readFileSync(p));
        const m = /'shape': \(([^)]*)\)/.exec(header);
        const dims = m[1].split(',').map((s) => s.trim()).filter((s) => s !== '').map(Number);
        if (dims.length === 0) return 'same';
        const i = rng.int(0, dims.length);
        dims[i] += rng.pick([1, 2 ** 20]);
        writeFileSync(p, npyBytes(major, header.replace(m[0], `'shape': (${dims.join(', ')}${dims.length === 1 ? ',' : ''})`), data));
        // another dim 0: still no data, the file agrees with its header
        return dims.some((d, k) => k !== i && d === 0) ? 'free' : 'refuse';
      }],
      ['dims reordered', (p) => {
        const { major, header, data } = npyParts(readFileSync(p));
        const m = /'shape': \(([^)]*)\)/.exec(header);
        const dims = m[1].split(',').map((s) => s.trim()).filter((s) => s !== '');
        writeFileSync(p, npyBytes(major, header.replace(m[0], `'shape': (${[...dims].reverse().join(', ')}${dims.length === 1 ? ',' : ''})`), data));
        return dims.length < 2 || dims.every((d) => d === dims[0]) ? 'same' : 'free';
      }],
      ['more dims than a tensor has', 'refuse', (p, rng) => {
        const { major, header, data } = npyParts(readFileSync(p));
        const m = /'shape': \(([^)]*)\)/.exec(header);
        writeFileSync(p, npyBytes(major, header.replace(m[0], `'shape': (${Array(rng.int(65, 300)).fill('1').join(', ')}, ${m[1]})`), data));
      }],
      ['a huge shape over a sparse file', 'refuse', (p) => {
        const { major, header, data } = npyParts(readFileSync(p));
        const m = /'shape': \(([^)]*)\)/.exec(header);
        const h = header.replace(m[0], `'shape': (${2 ** 37},)`).replace(/'descr': '[^']*'/, "'descr': '|u1'");
        const b = npyBytes(major, h, new Uint8Array(0));
        writeFileSync(p, b);
        truncateSync(p, b.length + 2 ** 37);
      }],
      ['text after its dict', 'refuse', (p, rng) => {
        const { major, header, data } = npyParts(readFileSync(p));
        writeFileSync(p, npyBytes(major, header.trimEnd() + rng.pick([' x', "{'descr': '<u2'}", ')', '}', ', }']) + '\n', data));
      }],
      ['its padding as other whitespace', 'same', (p, rng) => {
        const { major, header, data } = npyParts(readFileSync(p));
        const body = header.trimEnd();
        writeFileSync(p, npyBytes(major, body + rng.pick(['\t', '\r', ' ']).repeat(header.length - body.length - 1) + '\n', data));
      }],
    ];
  }
  if (kind === 'st') {
    const edit = (p, fn, lenDelta = 0) => {
      const { header, data } = stParts(readFileSync(p));
      const json = fn(header);
      writeFileSync(p, stBytes(typeof json === 'string' ? json : JSON.stringify(json), data, lenDelta));
    };
    const someTensor = (header, rng) => rng.pick(Object.keys(header).filter((k) => k !== '__metadata__'));
    return [
      ...replace,
      ['its header length field off', 'refuse', (p, rng) => edit(p, (h) => JSON.stringify(h), rng.pick([-1, 1, -7, 8, 2 ** 20]))],
      ['a span moved', (p, rng) => {
        let cls = 'refuse';
        edit(p, (h) => {
          const k = someTensor(h, rng);
          const [b, e] = h[k].data_offsets;
          h[k].data_offsets = rng.pick([[b + 1, e + 1], [b, e + 1], [b - 1, e], [e, b], [b, -e], [b, 1e300], [b, String(e)], [b], [b, e, e]]);
          // a tensor of no data moved may still lie inside the data and overlap nothing
          if (b === e) cls = 'free';
          return h;
        });
        return cls;
      }],
      ['another dtype', (p, rng) => {
        let cls = 'refuse';
        edit(p, (h) => {
          const k = someTensor(h, rng);
          const to = rng.pick(['F16', 'I16', 'U16', 'F64', 'BOOL', 'I32', 'F32', 'bf16', 'I8', 'U8', 'F8_E4M3', null, 7]);
          const size = { BF16: 2, F32: 4, I32: 4, I64: 8, U8: 1 };
          cls = to === h[k].dtype ? 'same' : size[to] !== undefined && size[to] === size[h[k].dtype] ? 'free' : size[to] !== undefined && h[k].data_offsets[0] === h[k].data_offsets[1] ? 'free' : 'refuse';
          h[k].dtype = to;
          return h;
        });
        return cls;
      }],
      ['a shape of other dims', (p, rng) => {
        let cls = 'refuse';
        edit(p, (h) => {
          const k = someTensor(h, rng);
          const s = h[k].shape;
          const pick = rng.int(0, 5);
          if (pick === 0) h[k].shape = [...s].reverse(), (cls = s.length < 2 || s.every((d) => d === s[0]) ? 'same' : 'free');
          else if (pick === 1) h[k].shape = [...Array(rng.int(65, 300)).fill(1), ...s];
          else if (pick === 2) h[k].shape = [...s, 2], (cls = s.includes(0) ? 'free' : 'refuse');
          else if (pick === 3) h[k].shape = rng.pick([[-1], [1.5], ['1'], null, {}, [2 ** 53]]);
          else h[k].shape = [...s, 1], (cls = 'free');
          return h;
        });
        return cls;
      }],
      ['no JSON object', 'refuse', (p, rng) => edit(p, (h) => rng.pick(['[]', 'null', '"x"', `${JSON.stringify(h)} x`, JSON.stringify(h).slice(0, -1), '{"a":' + '['.repeat(5000)]))],
      ['its metadata odd', (p, rng) => {
        let cls = 'refuse';
        edit(p, (h) => {
          const meta = h.__metadata__ ?? {};
          const key = rng.pick(['sm_scale', 'd_v']);
          if (!(key in meta)) return (cls = 'same'), h;
          const v = meta[key];
          const pick = rng.int(0, 3);
          // (only loadPrefillInputs reads sm_scale and d_v as numbers; a value that is no string, number or boolean is no metadata to any reader)
          if (pick === 0) meta[key] = rng.pick(['', ' ', `${v} `, ` ${v}`, '0x10', '0b1', 'NaN', 'Infinity', '1e999', 'true', `${v}x`, '1_0']), (cls = op === 'loadPrefillInputs' ? 'refuse' : 'same');
          else if (pick === 1) meta[key] = rng.pick([{}, [v], null]);
          else {
            // the same number written another decimal way
            const n = Number(v);
            meta[key] = rng.pick([n.toExponential(), `+${v}`, `${v}`.replace(/^0\./, '.'), n.toPrecision(17)]);
            cls = 'same';
          }
          h.__metadata__ = meta;
          return h;
        });
        return cls;
      }],
      ['an unread tensor added', 'same', (p) => edit(p, (h) => ({ ...h, zz_extra: { dtype: 'U8', shape: [0], data_offsets: [0, 0] } }))],
    ];
  }
  // meta.json
  const rewrite = (fn) => (p) => writeFileSync(p, fn(JSON.parse(readFileSync(p, 'utf8'))));
  return [
    ...replace,
    ['not an object', 'refuse', (p, rng) => writeFileSync(p, rng.pick(['', 'null', '[]', '"x"', '{', '{"sm_scale": 1}}', '['.repeat(100000), '\u0000']))],
    ['sm_scale odd', 'refuse', rewrite((m) => JSON.stringify({ ...m, sm_scale: [String(m.sm_scale), null, [m.sm_scale], {}, true][m.sm_scale > 1 ? 0 : 1] }))],
    // (not null: d_v null is the default 512)
    ['d_v odd', 'refuse', (p, rng) => rewrite((m) => JSON.stringify({ ...m, d_v: rng.pick([String(m.d_v), m.d_v + 0.5, -m.d_v, 0, [m.d_v], true]) }))(p)],
    ['too big', 'refuse', rewrite((m) => ' '.repeat(2 ** 20) + JSON.stringify(m))],
    ['padded', 'same', (p, rng) => rewrite((m) => rng.pick(['\ufeff', ' \n\t', '']) + JSON.stringify(m, null, rng.pick([0, 2])) + rng.pick(['\n', '  ', '']))(p)],
    ['extra keys', 'same', rewrite((m) => JSON.stringify({ note: { deep: [[[1]]] }, ...m, __proto__x: 1 }))],
  ];
}

/** The changes of the folder itself (not of one file): [label, class by op, apply(dir)]. */
export const FOLDER_CHANGES = [
  ['an unread FIFO', () => 'same', (d) => execFileSync('mkfifo', [join(d, 'zz.npy')])],
  ['an unread symlink loop', () => 'same', (d) => symlinkSync(join(d, 'loop.npy'), join(d, 'loop.npy'))],
  ['an unread directory', () => 'same', (d) => mkdirSync(join(d, 'sub.npy'))],
  // PrefillDir.open reads the folder's .safetensors file (and outputs.safetensors beside it; two others are refused)
  ['a FIFO named .safetensors', (op) => (op.startsWith('read') ? 'same' : 'refuse'), (d) => execFileSync('mkfifo', [join(d, 'zz.safetensors')])],
  ['a second .safetensors', (op, format) => (op.startsWith('read') ? 'same' : format === 'safetensors' ? 'refuse' : 'same'), (d) => writeFileSync(join(d, 'zy.safetensors'), stBytes('{}', new Uint8Array(0)))],
];

const OPS = ['loadPrefillInputs', 'loadPrefillInputs', 'loadPrefillOutputs', 'prefillDirGet', 'readFile'];

export const hostileDir = {
  name: 'hostileDir',
  fromSeed: 118, // added after seeds 115-117 were run
  build(rng, env, hooks) {
    const scratch = caseScratch(hooks);
    const dir = join(scratch, 'd');
    const { args, shapes } = prefillInputs(rng, hooks);
    const outputs = prefillOutputs(rng, hooks, shapes.sQ, shapes.hQ, shapes.dV);
    const format = rng.pick(['npy', 'safetensors']);
    const op = rng.pick(OPS);
    // the files of the folder and what the op reads of them
    const inputNames = ['q', 'kv', 'indices', ...(args.topkLength ? ['topk_length'] : []), ...(args.attnSink ? ['attn_sink'] : [])];
    const outputNames = ['out', 'lse', 'max_logits'];
    const tensorOf = { q: args.q, kv: args.kv, indices: args.indices, topk_length: args.topkLength, attn_sink: args.attnSink, out: outputs.out, lse: outputs.lse, max_logits: outputs.maxLogits };
    const getName = rng.pick([...inputNames, ...outputNames]);
    const files = format === 'npy' ? [...inputNames, ...outputNames].map((n) => `${n}.npy`).concat(['meta.json']) : ['prefill.safetensors'];
    const readFile = op === 'readFile' ? rng.pick(files.filter((f) => f !== 'meta.json')) : null;
    const reads = (f) => {
      if (f === 'prefill.safetensors') return op !== 'readFile' || readFile === f;
      if (op === 'readFile') return f === readFile;
      if (op === 'loadPrefillInputs') return f === 'meta.json' || inputNames.includes(f.replace(/\.npy$/, ''));
      if (op === 'loadPrefillOutputs') return outputNames.includes(f.replace(/\.npy$/, ''));
      return f === `${getName}.npy`;
    };
    // 1-2 changes: of a file (the op's own mostly) or of the folder; one of them maybe while the call runs
    const plan = [];
    for (let n = rng.int(1, 3); n > 0; n--) {
      if (rng.uniform() < 0.15) {
        const [label, cls, apply] = rng.pick(FOLDER_CHANGES);
        if (plan.some((c) => c.label === `the folder: ${label}`)) continue;
        plan.push({ label: `the folder: ${label}`, cls: cls(op, format), apply: () => void apply(dir) });
        continue;
      }
      const read = files.filter(reads);
      const file = read.length > 0 && rng.uniform() < 0.8 ? rng.pick(read) : rng.pick(files);
      const kind = file === 'meta.json' ? 'meta' : file.endsWith('.npy') ? 'npy' : 'st';
      if (plan.some((c) => c.file === file)) continue; // one change per file (a FIFO's header cannot be edited)
      // [label, class, apply] or [label, apply returning the class]
      const [label, a, b] = rng.pick(changesOf(kind, op));
      plan.push({ label: `${file}: ${label}`, file, cls: b ? a : null, apply: (path) => (b ?? a)(path, rng) });
    }
    // a file the call reads cut short while the call runs (after its first await)
    const during = rng.uniform() < 0.1 ? files.filter(reads)[0] : undefined;
    let changes = [];
    let handlesBefore = [];
    const prepare = async () => {
      rmSync(dir, { recursive: true, force: true });
      await writePrefillDir(dir, args, { format, outputs });
      changes = plan.map((c) => {
        const got = c.apply(c.file ? join(dir, c.file) : undefined);
        const cls = c.cls === null ? got ?? 'refuse' : got === 'same' ? 'same' : c.cls;
        return { ...c, cls: c.file && !reads(c.file) && cls !== 'same' ? 'same' : cls };
      });
      if (during) changes.push({ label: `${during}: cut short during the call`, file: during, cls: 'sameOrRefuse' });
      handlesBefore = handlesUnder(scratch);
    };
    const callArgs = op === 'loadPrefillOutputs' ? [dir, { ...shapes }] : op === 'prefillDirGet' ? [dir, getName] : op === 'readFile' ? [join(dir, readFile)] : [dir];
    const run = (x) => {
      if (op === 'loadPrefillInputs') return loadPrefillInputs(...x);
      if (op === 'loadPrefillOutputs') return loadPrefillOutputs(...x);
      if (op === 'prefillDirGet') return PrefillDir.open(x[0]).then(async (d) => ({ located: await d.get(x[1]), has: d.has(x[1]) }));
      return readFile.endsWith('.npy') ? readNpyFile(...x) : readSafetensorsFile(...x);
    };
    const leftOpen = () => {
      const now = handlesUnder(scratch).filter((h) => !handlesBefore.includes(h));
      return now.length > 0 ? `${now.length} handle(s) left open: ${now.slice(0, 3).join(', ')}` : null;
    };
    const must = () => changes.filter((c) => c.cls === 'refuse');
    const describe = () => `${op}${op === 'prefillDirGet' ? `(${getName})` : op === 'readFile' ? `(${readFile})` : ''} of a ${format} folder; ${changes.map((c) => `${c.label} [${c.cls}]`).join('; ') || 'unchanged'}`;
    return {
      args: callArgs,
      mostlyValid: true, // the folder is the hostile part: half the cases take the arguments as built
      get describe() {
        return describe();
      },
      prepare,
      call: async (x) => {
        const p = Promise.resolve().then(() => run(x));
        if (during) setImmediate(() => {
          try {
            truncateSync(join(dir, during), 3);
          } catch {
            /* a FIFO or a directory there */
          }
        });
        return p;
      },
      leftOpen,
      // a refusal with the call's arguments as built: of a folder whose every change is neutral, a finding; else it names a changed file (or the folder)
      judgeRefusal: (e, { neutral }) => {
        if (!neutral || !(e instanceof SparseMlaError)) return null;
        const changed = changes.filter((c) => c.cls !== 'same');
        if (changed.length === 0) return ['neutral-refused', `${describe()}: ${e.code} ${e.message.slice(0, 200)}`];
        if (e.code === 'TOO_LARGE') return null;
        const text = `${e.message} ${String(e.argument)}`;
        const names = changed.map((c) => (c.file ? c.file : c.label.includes('.safetensors') ? '.safetensors' : dir));
        // a file still valid but of other dims or dtype ('free') may be refused by another file's check against it (kv's dQK against q's)
        if (changed.some((c) => c.cls === 'free')) names.push(...files);
        return names.some((n) => text.includes(n)) || text.includes(dir) ? null : ['refusal-unnamed', `refused without naming ${names.join(' or ')}: ${e.code} ${e.message.slice(0, 160)}`];
      },
      judge: (got, { refArgs, neutral }) => {
        // (arguments mutated: the call may read other files, or check other dims, than the changes were drawn for)
        if (!neutral) return null;
        if (must().length > 0) return `resolved, but ${must().map((c) => c.label).join('; ')}`;
        if (changes.some((c) => c.cls === 'free')) return null;
        if (op === 'loadPrefillInputs') {
          const p = judgeFields(got.args, args, ['q', 'kv', 'indices', 'topkLength', 'attnSink']);
          if (p) return p;
          if (got.args.smScale !== args.smScale || got.args.dV !== shapes.dV) return `sm_scale ${got.args.smScale}, d_v ${got.args.dV}: written ${args.smScale}, ${shapes.dV}`;
          return null;
        }
        if (op === 'loadPrefillOutputs') return judgeFields(got, outputs, ['out', 'lse', 'maxLogits']);
        if (op === 'prefillDirGet') {
          if (got.located === undefined || !got.has) return `${getName} not found (has: ${got.has})`;
          return judgeTensors(new Map([[getName, got.located.value]]), () => tensorOf[getName]);
        }
        if (readFile.endsWith('.npy')) {
          const name = readFile.replace(/\.npy$/, '');
          return judgeTensors(new Map([[name, { dtype: DTYPE_OF_DESCR[got.descr], shape: got.shape, data: got.data }]]), () => tensorOf[name]);
        }
        const want = { ...tensorOf };
        return judgeTensors(new Map([...got.tensors].filter(([k]) => k !== 'zz_extra')), (k) => want[k]);
      },
    };
  },
};

/**
 * What `dir` holds, by name, opening only small regular files (a change may leave a sparse file of
 * 2^37 bytes): a file's size and content hash (up to 1 MiB; larger ones by size, inode and mtime), a
 * directory's listing, a link's target, a FIFO.
 */
export function folderState(dir) {
  const out = {};
  let names;
  try {
    names = readdirSync(dir).sort();
  } catch (e) {
    return { [`(${e.code})`]: '' };
  }
  for (const n of names) {
    const p = join(dir, n);
    const s = lstatSync(p);
    if (s.isFile()) out[n] = s.size <= 2 ** 20 ? `file ${s.size} ${createHash('sha1').update(readFileSync(p)).digest('hex')}` : `file ${s.size} ${s.ino} ${s.mtimeMs}`;
    else if (s.isDirectory()) out[n] = `dir: ${readdirSync(p).sort().join(', ')}`;
    else if (s.isSymbolicLink()) out[n] = `link: ${readlinkSync(p)}`;
    else out[n] = s.isFIFO() ? 'fifo' : s.isSocket() ? 'socket' : s.isCharacterDevice() ? `char ${s.rdev}` : 'other';
  }
  return out;
}

export function stateDiff(a, b) {
  return [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((k) => a[k] !== b[k]);
}

/**
 * Why a write of `files` ({ file, names: the tensors it holds, scale: sm_scale in its metadata }) into
 * `dir` leaves a folder the readers refuse or misread, as the writers refuse it since 93b65ad (the rule
 * of writePrefillDir's documentation): another entry there, not one the write replaces, holding a tensor
 * written (a name.npy by its name, whatever it is; a .safetensors file by its header, where it reads as
 * one), a second .safetensors beside prefill.safetensors other than outputs.safetensors, or a meta.json or
 * another file's sm_scale beside a prefill.safetensors that carries its own. Null where there is none.
 */
async function mixedFolder(dir, files) {
  const planned = new Set(files.map((f) => f.file));
  const written = new Set(files.flatMap((f) => f.names));
  const scale = files.some((f) => f.scale) && !planned.has('meta.json');
  const inputsFile = files.some((f) => f.file.endsWith('.safetensors') && f.file !== 'outputs.safetensors');
  const why = [];
  for (const entry of readdirSync(dir)) {
    if (planned.has(entry)) continue;
    if (entry.endsWith('.npy') && written.has(entry.slice(0, -4))) why.push(`${entry} beside the write`);
    else if (entry === 'meta.json' && scale) why.push('meta.json beside a prefill.safetensors');
    else if (entry.endsWith('.safetensors')) {
      if (inputsFile && entry !== 'outputs.safetensors') why.push(`${entry}, a second .safetensors`);
      try {
        const { tensors, metadata } = await readSafetensorsFile(join(dir, entry));
        const both = [...tensors.keys()].filter((n) => written.has(n));
        if (both.length > 0) why.push(`${entry} holding ${both.join(', ')}`);
        if (scale && metadata && Object.hasOwn(metadata, 'sm_scale')) why.push(`${entry} with an sm_scale`);
      } catch {
        /* no readable .safetensors file: left to the reader */
      }
    }
  }
  return why.length > 0 ? why.join('; ') : null;
}

/** The first seed whose hostileDirWrite (and cliCommand --out) cases may put a socket or a device node at an output name. */
export const SPECIAL_OUTPUT_FROM_SEED = 257;

/** A socket file at `p` (its server gone: the inode stays, as a server's that crashed). */
export function socketFileAt(p) {
  execFileSync(process.execPath, ['-e', 'require("net").createServer().listen(process.argv[1], () => process.exit(0))', p]);
}

/** Whether this process may make device nodes (root): a device node entry is drawn only then. */
const CAN_MKNOD = (() => {
  const d = mkdtempSync(join(tmpdir(), 'smla-fuzz-mknod-'));
  try {
    execFileSync('mknod', [join(d, 'n'), 'c', '1', '3'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
})();

/** Output names a writer must refuse (an entry of hostileDirWrite's list, the same for cliCommand's --out): a socket, and a character device of /dev/null's numbers where this process may make one (elsewhere a second socket: the list's draws are the same on every host). */
export const SPECIAL_OUTPUTS = [
  ['a socket', 'refuse', (p) => socketFileAt(p)],
  CAN_MKNOD ? ['a character device (1, 3: /dev/null\'s)', 'refuse', (p) => execFileSync('mknod', [p, 'c', '1', '3'])] : ['a socket (no mknod here)', 'refuse', (p) => socketFileAt(p)],
];

/**
 * hostileDirWrite (session 55, from seed 121): writePrefillDir / writePrefillOutputs of fresh tensors
 * into a folder that holds an older dump (either format) with hostile entries at the names the
 * writer writes or beside them: a directory (empty or not: the writer must refuse before its first
 * file), a FIFO, a symlink to a file or a folder outside, a dangling symlink (each replaced, never
 * written through: the outside is as it was), or the folder itself a file or a FIFO. A refusal leaves
 * every entry of the folder (and the outside) as it was; a write that resolves reads back as written,
 * leaves the entries it does not write as they were, and the outside untouched.
 */
export const hostileDirWrite = {
  name: 'hostileDirWrite',
  fromSeed: 121, // added after seeds 115-120 were run
  build(rng, env, hooks) {
    const scratch = caseScratch(hooks);
    const seed = hooks.rng ? hooks.seed : lastWriteSeed;
    if (hooks.rng) lastWriteSeed = hooks.seed;
    const dir = join(scratch, 'd');
    const outside = join(scratch, 'outside');
    const older = prefillInputs(rng, hooks);
    const olderOutputs = prefillOutputs(rng, hooks, older.shapes.sQ, older.shapes.hQ, older.shapes.dV);
    const olderFormat = rng.pick(['npy', 'safetensors']);
    const fresh = prefillInputs(rng, hooks);
    const freshOutputs = prefillOutputs(rng, hooks, fresh.shapes.sQ, fresh.shapes.hQ, fresh.shapes.dV);
    const format = rng.pick(['npy', 'safetensors']);
    const op = rng.pick(['writePrefillDir', 'writePrefillDir', 'writePrefillOutputs']);
    const withOutputs = op === 'writePrefillDir' && rng.uniform() < 0.5;
    const inputFiles = ['q', 'kv', 'indices', ...(fresh.args.topkLength ? ['topk_length'] : []), ...(fresh.args.attnSink ? ['attn_sink'] : [])];
    const writes = format === 'safetensors'
      ? [op === 'writePrefillDir' ? 'prefill.safetensors' : 'outputs.safetensors']
      : [...(op === 'writePrefillDir' ? inputFiles : []), ...(op === 'writePrefillOutputs' || withOutputs ? ['out', 'lse', 'max_logits'] : []), ...(op === 'writePrefillDir' ? ['meta'] : [])].map((n) => (n === 'meta' ? 'meta.json' : `${n}.npy`));
    const ENTRY_CHANGES = [
      ['a directory', 'refuse', (p) => mkdirSync(p)],
      ['a directory holding a file', 'refuse', (p) => (mkdirSync(p), writeFileSync(join(p, 'x'), 'x'))],
      ['a FIFO', 'same', (p) => execFileSync('mkfifo', [p])],
      ['a symlink to a file outside', 'same', (p) => symlinkSync(join(outside, 'file'), p)],
      ['a symlink to a folder outside', 'same', (p) => symlinkSync(outside, p)],
      ['a dangling symlink', 'same', (p) => symlinkSync(join(outside, 'gone'), p)],
      // from SPECIAL_OUTPUT_FROM_SEED: a socket or a device node at a name, refused since session 59 (the rename unlinked it)
      ...(seed >= SPECIAL_OUTPUT_FROM_SEED ? SPECIAL_OUTPUTS : []),
    ];
    const plan = [];
    if (rng.uniform() < 0.1) {
      plan.push(rng.pick([
        { label: 'the folder is a file', cls: 'refuse', apply: () => writeFileSync(dir, 'not a folder') },
        { label: 'the folder is a FIFO', cls: 'refuse', apply: () => execFileSync('mkfifo', [dir]) },
      ]));
    } else {
      for (let n = rng.int(1, 3); n > 0; n--) {
        const name = rng.uniform() < 0.8 ? rng.pick(writes) : rng.pick(['q.npy', 'out.npy', 'meta.json', 'prefill.safetensors', 'outputs.safetensors', 'zz.npy']);
        if (plan.some((c) => c.name === name)) continue;
        const [label, cls, apply] = rng.pick(ENTRY_CHANGES);
        plan.push({ label: `${name}: ${label}`, name, cls: writes.includes(name) ? cls : 'same', apply: () => (rmSync(join(dir, name), { recursive: true, force: true }), apply(join(dir, name))) });
      }
    }
    // what the write puts in the folder: its files and the tensors each holds
    const outputNames = ['out', 'lse', 'max_logits'];
    const heldNames = op === 'writePrefillOutputs' ? outputNames : [...inputFiles, ...(withOutputs ? outputNames : [])];
    const files = format === 'safetensors'
      ? [{ file: writes[0], names: heldNames, scale: op === 'writePrefillDir' }]
      : writes.map((f) => ({ file: f, names: f.endsWith('.npy') ? [f.slice(0, -4)] : [] }));
    // where the folder already holds the write's tensors in other files (an older dump of the other format): refused since 93b65ad
    let mixed = null;
    let before = {};
    let outsideBefore = {};
    let handlesBefore = [];
    const prepare = async () => {
      rmSync(dir, { recursive: true, force: true });
      mkdirSync(join(outside, 'sub'), { recursive: true });
      writeFileSync(join(outside, 'file'), 'outside');
      if (plan.some((c) => c.label.startsWith('the folder is'))) plan[0].apply();
      else {
        await writePrefillDir(dir, older.args, { format: olderFormat, outputs: olderOutputs });
        for (const c of plan) c.apply();
        mixed = await mixedFolder(dir, files);
      }
      before = folderState(dir);
      outsideBefore = folderState(outside);
      handlesBefore = handlesUnder(scratch);
    };
    const describeNow = () => `${op}${op === 'writePrefillDir' && withOutputs ? ' with outputs' : ''} as ${format} over a ${olderFormat} dump; ${plan.map((c) => `${c.label} [${c.cls}]`).join('; ')}${mixed ? `; mixed: ${mixed} [refuse]` : ''}`;
    // the call runs in the case's folder; from RELATIVE_PATHS_FROM_SEED it is given the folder relative to it, so a mutated path stays there
    const given = seed >= RELATIVE_PATHS_FROM_SEED ? 'd' : dir;
    const args = op === 'writePrefillOutputs' ? [given, freshOutputs, format] : [given, fresh.args, { format, ...(withOutputs ? { outputs: freshOutputs } : {}) }];
    const outsideChanged = () => {
      const d = stateDiff(outsideBefore, folderState(outside));
      return d.length > 0 ? `written outside the folder, through a symlink: ${d.join(', ')}` : null;
    };
    return {
      args,
      get describe() {
        return describeNow();
      },
      mostlyValid: true,
      prepare,
      call: async (x) => {
        const back = process.cwd();
        process.chdir(scratch);
        try {
          return await (op === 'writePrefillOutputs' ? writePrefillOutputs(...x) : writePrefillDir(...x));
        } finally {
          process.chdir(back);
        }
      },
      leftOpen: () => {
        const now = handlesUnder(scratch).filter((h) => !handlesBefore.includes(h));
        return now.length > 0 ? `${now.length} handle(s) left open: ${now.slice(0, 3).join(', ')}` : null;
      },
      // a refusal leaves the folder and the outside as they were (a refusal of a folder whose changes are all neutral is a finding)
      afterRefusal: () => {
        const d = stateDiff(before, folderState(dir));
        if (d.length > 0) return `a refused ${op} changed ${d.slice(0, 4).join(', ')} in the folder`;
        return outsideChanged();
      },
      judgeRefusal: (e, { neutral }) => {
        if (!neutral || !(e instanceof SparseMlaError)) return null;
        return plan.some((c) => c.cls === 'refuse') || mixed ? null : ['neutral-refused', `${describeNow()}: ${e.code} ${e.message.slice(0, 200)}`];
      },
      judge: async (got, { neutral }) => {
        const out = outsideChanged();
        if (out) return out;
        if (!neutral) return null;
        const must = plan.filter((c) => c.cls === 'refuse');
        if (must.length > 0) return `resolved, but ${must.map((c) => c.label).join('; ')}`;
        if (mixed) return `resolved over a folder that holds its tensors in other files (${mixed}): a folder the readers refuse or misread`;
        const now = folderState(dir);
        const touched = stateDiff(before, now).filter((n) => !writes.includes(n));
        if (touched.length > 0) return `changed entries it does not write: ${touched.slice(0, 4).join(', ')}`;
        const missing = writes.filter((n) => !now[n] || now[n].startsWith('dir') || now[n].startsWith('link') || now[n] === 'fifo');
        if (missing.length > 0) return `resolved, but ${missing.join(', ')} is no regular file: ${missing.map((n) => String(now[n]).slice(0, 40)).join(', ')}`;
        // read back the files it wrote, each as a file (the folder may hold the older dump's others)
        if (format === 'safetensors') {
          const file = await readSafetensorsFile(join(dir, writes[0]));
          const given = op === 'writePrefillOutputs' ? { out: freshOutputs.out, lse: freshOutputs.lse, max_logits: freshOutputs.maxLogits } : { q: fresh.args.q, kv: fresh.args.kv, indices: fresh.args.indices, topk_length: fresh.args.topkLength, attn_sink: fresh.args.attnSink, out: withOutputs ? freshOutputs.out : undefined, lse: withOutputs ? freshOutputs.lse : undefined, max_logits: withOutputs ? freshOutputs.maxLogits : undefined };
          const names = [...file.tensors.keys()].sort().join(',');
          const want = Object.keys(given).filter((k) => given[k] !== undefined).sort().join(',');
          if (names !== want) return `${writes[0]} holds ${names}, written ${want}`;
          return judgeTensors(file.tensors, (k) => given[k]);
        }
        const byName = { q: fresh.args.q, kv: fresh.args.kv, indices: fresh.args.indices, topk_length: fresh.args.topkLength, attn_sink: fresh.args.attnSink, out: freshOutputs.out, lse: freshOutputs.lse, max_logits: freshOutputs.maxLogits };
        for (const f of writes.filter((n) => n.endsWith('.npy'))) {
          const name = f.replace(/\.npy$/, '');
          const arr = await readNpyFile(join(dir, f));
          const p = judgeTensors(new Map([[name, { dtype: DTYPE_OF_DESCR[arr.descr], shape: arr.shape, data: arr.data }]]), () => byName[name]);
          if (p) return p;
        }
        if (writes.includes('meta.json')) {
          const meta = JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8'));
          if (meta.sm_scale !== fresh.args.smScale || meta.d_v !== fresh.shapes.dV) return `meta.json ${JSON.stringify(meta)}, written sm_scale ${fresh.args.smScale}, d_v ${fresh.shapes.dV}`;
        }
        return null;
      },
    };
  },
};

/** The targets of this file, with their weights (fuzz.mjs draws them with the session-53 ones). */
export const DIR_TARGETS = [[hostileDir, 1], [hostileDirWrite, 1]];

/** The first seed that draws lazyDirRead. */
export const LAZY_FROM_SEED = 196;

/**
 * Changes of one file between PrefillDir.open and get (since f201535, open reads the .safetensors
 * headers only and get reads a tensor's bytes when asked, refusing a file replaced or resized since):
 * [label, class for a .safetensors file, class for a .npy file (which get reads afresh), apply(path, rng)].
 * `same`: the tensors as written; `refuse`: a typed refusal; `free`: either, or other values of the
 * tensor's dtype and shape (bytes rewritten in place, same size: no check can see it).
 */
const LAZY_CHANGES = [
  ['cut short by a byte', 'refuse', 'refuse', (p) => truncateSync(p, Math.max(0, lstatSync(p).size - 1))],
  ['cut to nothing', 'refuse', 'refuse', (p) => truncateSync(p, 0)],
  ['grown by 64 bytes', 'refuse', 'refuse', (p) => writeFileSync(p, new Uint8Array(64), { flag: 'a' })],
  ['a byte rewritten in place', 'free', 'free', (p, rng) => {
    const b = readFileSync(p);
    if (b.length > 0) b[rng.int(0, b.length)] ^= 1 << rng.int(0, 8);
    writeFileSync(p, b, { flag: 'r+' });
  }],
  // (the copy may get the inode just freed: then it is the file opened, by every check there is; its bytes are the same)
  ['replaced by a copy', 'sameOrRefuse', 'same', (p) => {
    const b = readFileSync(p);
    rmSync(p);
    writeFileSync(p, b);
  }],
  ['removed', 'refuse', 'refuse', (p) => rmSync(p)],
  ['replaced by a FIFO', 'refuse', 'refuse', (p) => (rmSync(p), execFileSync('mkfifo', [p]))],
  ['replaced by a directory', 'refuse', 'refuse', (p) => (rmSync(p), mkdirSync(p))],
  ['replaced by a symlink to /dev/zero', 'refuse', 'refuse', (p) => (rmSync(p), symlinkSync('/dev/zero', p))],
  ['replaced by a symlink to a copy', 'refuse', 'same', (p) => {
    const b = readFileSync(p);
    writeFileSync(`${p}.copy`, b);
    rmSync(p);
    symlinkSync(`${p}.copy`, p);
  }],
];

/**
 * lazyDirRead (session 57, from seed LAZY_FROM_SEED, every backend): a prefill folder the library wrote
 * (npy or safetensors, outputs or not) opened with PrefillDir.open, then one or two of its files changed
 * (LAZY_CHANGES), before the gets or while they run (after a microtask or a timer), and 1-4 tensors got
 * (some at once), sometimes meta() too; or the folder itself moved away, or replaced by a copy. Each get
 * gives the tensor as written where its file is unchanged (or changed in a way its class says is
 * `same`), a typed refusal where the class is `refuse` (naming the file or the folder), never an
 * untyped error, a hang, or a handle left open on the folder.
 */
export const lazyDirRead = {
  name: 'lazyDirRead',
  fromSeed: LAZY_FROM_SEED,
  build(rng, env, hooks) {
    const scratch = caseScratch(hooks);
    const dir = join(scratch, 'd');
    const { args, shapes } = prefillInputs(rng, hooks);
    const outputs = rng.uniform() < 0.5 ? prefillOutputs(rng, hooks, shapes.sQ, shapes.hQ, shapes.dV) : undefined;
    const format = rng.pick(['npy', 'safetensors']);
    const outFormat = outputs ? rng.pick(['withInputs', format]) : null;
    const inputNames = ['q', 'kv', 'indices', ...(args.topkLength ? ['topk_length'] : []), ...(args.attnSink ? ['attn_sink'] : [])];
    const names = [...inputNames, ...(outputs ? ['out', 'lse', 'max_logits'] : [])];
    const fileOf = (name) => {
      const isOutput = ['out', 'lse', 'max_logits'].includes(name);
      if (format === 'npy') return `${name}.npy`;
      return isOutput && outFormat !== 'withInputs' ? 'outputs.safetensors' : 'prefill.safetensors';
    };
    const files = [...new Set(names.map(fileOf)), ...(format === 'npy' ? ['meta.json'] : [])];
    const folderMove = rng.uniform() < 0.1 ? rng.pick(['moved away', 'replaced by a copy']) : null;
    const changes = folderMove ? [] : Array.from({ length: rng.int(0, 3) }, () => ({ file: rng.pick(files), change: rng.pick(LAZY_CHANGES) })).filter((c, i, a) => a.findIndex((x) => x.file === c.file) === i);
    const when = rng.pick(['before', 'before', 'microtask', 'timer']);
    const ms = rng.int(0, 3);
    const gets = Array.from({ length: rng.int(1, 5) }, () => rng.pick(names));
    const together = rng.uniform() < 0.4;
    const withMeta = rng.uniform() < 0.3;
    const byName = { q: args.q, kv: args.kv, indices: args.indices, topk_length: args.topkLength, attn_sink: args.attnSink, out: outputs?.out, lse: outputs?.lse, max_logits: outputs?.maxLogits };
    const clsOf = (file) => {
      const c = changes.find((x) => x.file === file);
      const st = file.endsWith('.safetensors');
      // (a folder replaced by a copy: get reads a .npy file afresh, a .safetensors file must be the one opened)
      const cls = folderMove ? (folderMove === 'replaced by a copy' && !st ? 'same' : 'refuse') : !c ? 'same' : st ? c.change[1] : c.change[2];
      // a change while the gets run: the file as it was or as it is after
      // (the folder replaced while the gets run: for a moment there is none)
      if (when === 'before' || cls === 'free') return cls;
      return cls === 'same' && !folderMove ? 'same' : 'sameOrRefuse';
    };
    const describe = `PrefillDir of a ${format} folder${outputs ? ` (outputs ${outFormat})` : ''}: ${folderMove ? `the folder ${folderMove}` : changes.map((c) => `${c.file} ${c.change[0]}`).join('; ') || 'unchanged'} (${when}${when === 'timer' ? ` ${ms} ms` : ''}); get ${gets.join(', ')}${together ? ' at once' : ''}${withMeta ? ', meta()' : ''}`;
    let handlesBefore = [];
    const apply = () => {
      if (folderMove === 'moved away') renameSync(dir, `${dir}.moved`);
      else if (folderMove) {
        cpSync(dir, `${dir}.copy`, { recursive: true });
        rmSync(dir, { recursive: true, force: true });
        renameSync(`${dir}.copy`, dir);
      } else for (const c of changes) c.change[3](join(dir, c.file), rng);
    };
    return {
      args: [],
      describe,
      prepare: async () => {
        rmSync(dir, { recursive: true, force: true });
        rmSync(`${dir}.moved`, { recursive: true, force: true });
        await writePrefillDir(dir, args, { format, ...(outputs && outFormat === 'withInputs' ? { outputs } : {}) });
        if (outputs && outFormat !== 'withInputs') await writePrefillOutputs(dir, outputs, outFormat);
        handlesBefore = handlesUnder(scratch);
      },
      call: async () => {
        const pd = await PrefillDir.open(dir);
        const settleGet = (name) => pd.get(name).then((value) => ({ name, value }), (error) => ({ name, error }));
        if (when === 'before') apply();
        else if (when === 'microtask') queueMicrotask(apply);
        else setTimeout(apply, ms);
        const results = [];
        if (together) results.push(...(await Promise.all(gets.map(settleGet))));
        else for (const name of gets) results.push(await settleGet(name));
        const meta = withMeta ? await pd.meta().then((value) => ({ value }), (error) => ({ error })) : null;
        // (a change on a timer has run before the judge looks)
        await new Promise((r) => setTimeout(r, ms + 1));
        return { results, meta };
      },
      leftOpen: () => {
        const now = handlesUnder(scratch).filter((h) => !handlesBefore.includes(h));
        return now.length > 0 ? `${now.length} handle(s) left open: ${now.slice(0, 3).join(', ')}` : null;
      },
      judge: ({ results, meta }) => {
        for (const r of results) {
          const file = fileOf(r.name);
          const cls = clsOf(file);
          if (r.error) {
            if (!(r.error instanceof SparseMlaError)) return `${describe}: get('${r.name}') threw ${r.error?.name}: ${String(r.error?.message).slice(0, 200)}`;
            if (cls === 'same') return `${describe}: get('${r.name}') of ${file}, unchanged, refused: ${r.error.code} ${r.error.message.slice(0, 200)}`;
            if (!r.error.message.includes(file) && !r.error.message.includes(dir) && r.error.code !== 'TOO_LARGE') return `${describe}: get('${r.name}')'s refusal names neither ${file} nor the folder: ${r.error.message.slice(0, 200)}`;
            continue;
          }
          if (r.value === undefined) return `${describe}: get('${r.name}') gave undefined for a tensor the folder held at open`;
          if (cls === 'refuse') return `${describe}: get('${r.name}') of ${file} resolved, expected a refusal`;
          if (cls === 'free') continue;
          const p = judgeTensors(new Map([[r.name, r.value.value]]), () => byName[r.name]);
          if (p) return `${describe}: get('${r.name}'): ${p}`;
        }
        if (meta?.error && !(meta.error instanceof SparseMlaError)) return `${describe}: meta() threw ${meta.error?.name}: ${String(meta.error?.message).slice(0, 200)}`;
        if (meta?.value) {
          const mfile = format === 'npy' ? 'meta.json' : 'prefill.safetensors';
          // (a .safetensors file's metadata was read at open: meta() gives it whatever the file became)
          if ((format === 'npy' && clsOf(mfile) === 'same') || format === 'safetensors') {
            if (meta.value.value.smScale !== args.smScale || meta.value.value.dV !== shapes.dV) return `${describe}: meta() gave ${JSON.stringify(meta.value.value)}, written sm_scale ${args.smScale}, d_v ${shapes.dV}`;
          }
        }
        return null;
      },
    };
  },
};

/** lazyDirRead, drawn after the session-57 targets (fuzz.mjs). */
export const LAZY_DIR_TARGETS = [[lazyDirRead, 1]];
