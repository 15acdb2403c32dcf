/**
 * A sparse-prefill directory, as written by GPU engines for CPU-side verification:
 *   inputs   q.npy (bf16 bits, <u2) [sQ, hQ, dQK], kv.npy (<u2) [sKV, dQK], indices.npy (<i4|<i8)
 *            [sQ, topk] or [sQ, 1, topk], optional topk_length.npy (<i4|<i8) [sQ],
 *            optional attn_sink.npy (<f4) [hQ], meta.json {"sm_scale": …, "d_v": 512}
 *   outputs  out.npy (<u2 bf16 bits, or <f4) [sQ, hQ, dV], lse.npy (<f4) [sQ, hQ],
 *            max_logits.npy (<f4) [sQ, hQ]
 * Instead of .npy files the directory may hold one .safetensors file with the same names (real BF16
 * there), and beside it the outputs.safetensors writePrefillOutputs writes, each name in at most one of
 * the files (a name.npy too); sm_scale / d_v may then sit in the __metadata__ of one of them when there
 * is no meta.json.
 * Every problem is a SparseMlaError (INVALID_VALUE / INVALID_SHAPE / INVALID_DTYPE) naming the file.
 * Files are read and written through files.ts (regular files only, sizes checked before reading,
 * outputs never written through a symlink).
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { SparseMlaError } from '../errors.js';
import { tensor } from '../tensor.js';
import type { DType, SparsePrefillArgs, SparsePrefillResult, Tensor } from '../types.js';
import { checkPathArgs, checkedTensor, clip, prepareOutputDir, prepareOutputFiles, readSmallFile, writeFileNoFollow } from './files.js';
import { checkViewsIntact, describe } from '../tensor.js';
import { npyToTensor, readNpyFile, writeNpyFile } from './npy.js';
import { readSafetensorsHeader, readSafetensorsTensor, writeSafetensorsFile, type SafetensorsHeader } from './safetensors.js';

/** meta.json holds two numbers; anything near this size is not one. */
const META_MAX_BYTES = 1 << 20;

/** Where a tensor came from, for messages: `q.npy` or `dump.safetensors:q`. */
export interface Located<T> {
  value: T;
  file: string;
}

/** A decimal number as Python's str() and JS's String() write one ('0.0625', '-1e-05', '512'). */
const DECIMAL = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

/**
 * A __metadata__ value as a number when it is written as a decimal one; otherwise the text itself, which
 * meta()'s checks refuse by name (Number() would take '' and '  ' as 0, '0x10' as 16, '0b1' as 1).
 */
function metadataNumber(text: string): number | string {
  return DECIMAL.test(text) ? Number(text) : text;
}

/** A tensor's name in a directory (`q`, `kv`, ...): a string, never coerced (a Symbol's or an object's text is no name). */
function tensorName(name: unknown): void {
  if (typeof name !== 'string') throw new SparseMlaError('INVALID_VALUE', `name: expected a tensor name string, got ${describe(name)}`, 'name');
}

/** The file writePrefillOutputs writes in the safetensors format: a folder may hold it beside its inputs' .safetensors. */
const OUTPUTS_SAFETENSORS = 'outputs.safetensors';

/** One .safetensors file of a directory: its header (the tensors' bytes are read when asked for). */
interface SafetensorsEntry {
  file: string;
  header: SafetensorsHeader;
}

/**
 * A directory's tensors: its .npy files, its .safetensors file and outputs.safetensors (each name in
 * at most one of them). Opening it reads the names of the directory and the headers of its
 * .safetensors files, no tensor's data: get() reads one tensor when asked.
 */
export class PrefillDir {
  private constructor(
    readonly dir: string,
    private readonly entries: Set<string>,
    private readonly st: readonly SafetensorsEntry[],
  ) {}

  static async open(dir: string): Promise<PrefillDir> {
    checkPathArgs(dir, dir, 'dir', 'a directory path');
    let names: string[];
    try {
      names = await readdir(dir);
    } catch (e) {
      throw new SparseMlaError('INVALID_VALUE', `${dir}: cannot read the directory (${clip((e as Error).message, 300)})`, dir);
    }
    const stFiles = names.filter((n) => n.endsWith('.safetensors')).sort();
    const others = stFiles.filter((n) => n !== OUTPUTS_SAFETENSORS);
    if (others.length > 1) {
      throw new SparseMlaError('INVALID_VALUE', `${dir}: expected at most one .safetensors file besides ${OUTPUTS_SAFETENSORS}, found ${clip(others.join(', '), 200)}`, dir);
    }
    const st: SafetensorsEntry[] = [];
    // a name in both files is refused: which one a reader took would depend on the files' names
    const holder = new Map<string, string>();
    for (const file of stFiles) {
      const read = { file, header: await readSafetensorsHeader(join(dir, file), file) };
      for (const name of read.header.tensors.keys()) {
        const other = holder.get(name);
        if (other !== undefined) throw new SparseMlaError('INVALID_VALUE', `${dir}: tensor '${clip(name, 60)}' is in both ${other} and ${file}`, dir);
        holder.set(name, file);
      }
      st.push(read);
    }
    // a name that is also a .npy file likewise (the .npy was taken silently: after `prefill D --out D` then
    // `--format safetensors`, verify judged the older out.npy, not the outputs just written)
    for (const [name, file] of holder) {
      if (names.includes(`${name}.npy`)) throw new SparseMlaError('INVALID_VALUE', `${dir}: tensor '${clip(name, 60)}' is in both ${clip(name, 60)}.npy and ${file}`, dir);
    }
    return new PrefillDir(dir, new Set(names), st);
  }

  /** The .safetensors file holding tensor `name`, if any. */
  private holderOf(name: string): SafetensorsEntry | undefined {
    return this.st.find((f) => f.header.tensors.has(name));
  }

  has(name: string): boolean {
    tensorName(name);
    return this.entries.has(`${name}.npy`) || this.holderOf(name) !== undefined;
  }

  /** The tensor `name` (from name.npy, else from the .safetensors file holding it), or undefined. */
  async get(name: string): Promise<Located<Tensor> | undefined> {
    tensorName(name);
    const npy = `${name}.npy`;
    if (this.entries.has(npy)) return { value: npyToTensor(await readNpyFile(join(this.dir, npy), npy)), file: npy };
    const f = this.holderOf(name);
    return f ? { value: await readSafetensorsTensor(f.header, name), file: `${f.file}:${name}` } : undefined;
  }

  async require(name: string): Promise<Located<Tensor>> {
    tensorName(name);
    const got = await this.get(name);
    if (!got) {
      const where = this.st.length > 0 ? `${name}.npy or '${name}' in ${clip(this.st.map((f) => f.file).join(' or '), 200)}` : `${name}.npy`;
      throw new SparseMlaError('INVALID_VALUE', `${this.dir}: missing ${where}`, `${name}.npy`);
    }
    return got;
  }

  /** meta.json, else the __metadata__ of the one .safetensors file that has sm_scale there. */
  async meta(): Promise<Located<{ smScale: number; dV: number }>> {
    let raw: Record<string, unknown>;
    let file: string;
    const scaled = this.st.filter((f) => Object.hasOwn(f.header.metadata, 'sm_scale'));
    if (this.entries.has('meta.json')) {
      file = 'meta.json';
      const bytes = await readSmallFile(join(this.dir, file), file, META_MAX_BYTES);
      let parsed: unknown;
      try {
        parsed = JSON.parse(new TextDecoder().decode(bytes));
      } catch (e) {
        throw new SparseMlaError('INVALID_VALUE', `meta.json: not valid JSON (${clip((e as Error).message, 120)})`, file);
      }
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        throw new SparseMlaError('INVALID_VALUE', 'meta.json: expected a JSON object {"sm_scale": …, "d_v": 512}', file);
      }
      raw = parsed as Record<string, unknown>;
    } else if (scaled.length > 1) {
      throw new SparseMlaError('INVALID_VALUE', `${this.dir}: sm_scale in the __metadata__ of ${clip(scaled.map((f) => f.file).join(' and '), 200)}, and no meta.json to say which`, 'meta.json');
    } else if (scaled.length === 1) {
      file = `${scaled[0]!.file}:__metadata__`;
      raw = Object.fromEntries(Object.entries(scaled[0]!.header.metadata).map(([k, v]) => [k, metadataNumber(v)]));
    } else {
      throw new SparseMlaError('INVALID_VALUE', `${this.dir}: missing meta.json ({"sm_scale": …, "d_v": 512})`, 'meta.json');
    }
    const smScale = raw.sm_scale;
    if (typeof smScale !== 'number' || !Number.isFinite(smScale)) {
      throw new SparseMlaError('INVALID_VALUE', `${file}: sm_scale: expected a finite number, got ${clip(JSON.stringify(raw.sm_scale) ?? String(raw.sm_scale), 60)}`, file);
    }
    const dV = raw.d_v ?? 512;
    if (typeof dV !== 'number' || !Number.isSafeInteger(dV) || dV < 1) {
      throw new SparseMlaError('INVALID_VALUE', `${file}: d_v: expected a positive integer, got ${clip(JSON.stringify(raw.d_v) ?? String(raw.d_v), 60)}`, file);
    }
    return { value: { smScale, dV }, file };
  }
}

const shapeStr = (s: readonly number[]): string => `[${s.join(', ')}]`;

/** Tensor<'a'> | Tensor<'b'> for D = 'a' | 'b'. */
type TensorOf<D extends DType> = D extends DType ? Tensor<D> : never;

/** A tensor and how messages name it: the file it came from (a reader), or a writer's argument (`writePrefillDir: args.q`, argument `args.q`). */
interface Named<T = Tensor> extends Located<T> {
  argument?: string;
}

function expectDtype<D extends DType>(t: Named, allowed: readonly D[], storedAs: string): TensorOf<D> {
  if (!(allowed as readonly DType[]).includes(t.value.dtype)) {
    throw new SparseMlaError('INVALID_DTYPE', `${t.file}: expected ${storedAs}, got ${t.value.dtype}`, t.argument ?? t.file);
  }
  return t.value as TensorOf<D>;
}

function expectShape(t: Named, ok: boolean, expected: string): void {
  if (!ok) throw new SparseMlaError('INVALID_SHAPE', `${t.file}: expected shape ${expected}, got ${shapeStr(t.value.shape)}`, t.argument ?? t.file);
}

const BF16_STORED = 'bf16 (bits as <u2, or BF16 in safetensors)';
const INDEX_STORED = 'int32 or int64 (<i4 / <i8)';
const F32_STORED = 'float32 (<f4 / F32)';

/*
 * The directory format's dtype and shape of each tensor, given the dims the tensors before it fixed:
 * loadPrefillInputs / loadPrefillOutputs read a directory by them, and writePrefillDir /
 * writePrefillOutputs write none that breaks them (a directory its own reader refuses is bad input).
 */
function checkQ(t: Named): Tensor<'bf16'> {
  const q = expectDtype(t, ['bf16'], BF16_STORED);
  expectShape(t, q.shape.length === 3 && q.shape[1]! >= 1 && q.shape[2]! >= 1, '[sQ, hQ, dQK]');
  return q;
}

function checkKv(t: Named, dQK: number): Tensor<'bf16'> {
  const kv = expectDtype(t, ['bf16'], BF16_STORED);
  expectShape(t, kv.shape.length === 2 && kv.shape[1] === dQK, `[sKV, ${dQK}]`);
  return kv;
}

function checkIndices(t: Named, sQ: number): Tensor<'int32'> | Tensor<'int64'> {
  const indices = expectDtype(t, ['int32', 'int64'], INDEX_STORED);
  const s = indices.shape;
  expectShape(t, (s.length === 2 && s[0] === sQ) || (s.length === 3 && s[0] === sQ && s[1] === 1), `[${sQ}, topk] or [${sQ}, 1, topk]`);
  return indices;
}

function checkTopkLength(t: Named, sQ: number): Tensor<'int32'> | Tensor<'int64'> {
  const len = expectDtype(t, ['int32', 'int64'], INDEX_STORED);
  expectShape(t, len.shape.length === 1 && len.shape[0] === sQ, `[${sQ}]`);
  return len;
}

function checkSink(t: Named, hQ: number): Tensor<'float32'> {
  const sink = expectDtype(t, ['float32'], F32_STORED);
  expectShape(t, sink.shape.length === 1 && sink.shape[0] === hQ, `[${hQ}]`);
  return sink;
}

/** `what` names d_v in the message (`meta.json: d_v`, `writePrefillDir: args.dV`). */
function checkDv(dV: number, dQK: number, what: string, argument: string): void {
  if (dV > dQK) throw new SparseMlaError('INVALID_VALUE', `${what}: expected at most dQK = ${dQK}, got ${dV}`, argument);
}

const OUT_STORED = 'bf16 (bits as <u2, or BF16) or float32';

function checkOut(t: Named, sQ: number, hQ: number, dV: number): Tensor<'bf16'> | Tensor<'float32'> {
  const out = expectDtype(t, ['bf16', 'float32'], OUT_STORED);
  expectShape(t, out.shape.length === 3 && out.shape[0] === sQ && out.shape[1] === hQ && out.shape[2] === dV, `[${sQ}, ${hQ}, ${dV}]`);
  return out;
}

function checkStat(t: Named, sQ: number, hQ: number): Tensor<'float32'> {
  const v = expectDtype(t, ['float32'], F32_STORED);
  expectShape(t, v.shape.length === 2 && v.shape[0] === sQ && v.shape[1] === hQ, `[${sQ}, ${hQ}]`);
  return v;
}

/** int64 → int32 for topk_length; values beyond int32 saturate (same meaning: k < len). */
function toInt32(t: Tensor<'int32'> | Tensor<'int64'>): Tensor<'int32'> {
  if (t.dtype === 'int32') return t as Tensor<'int32'>;
  const src = t.data as BigInt64Array;
  const out = new Int32Array(src.length);
  for (let i = 0; i < src.length; i++) {
    const v = src[i]!;
    out[i] = v > 2147483647n ? 2147483647 : v < -2147483648n ? -2147483648 : Number(v);
  }
  return tensor('int32', t.shape, out);
}

/** A directory given by path or as an opened PrefillDir (`fn`'s argument `dir`); anything else is refused before anything is read. */
function dirArg(fn: string, dirOrHandle: unknown): string | PrefillDir {
  if (dirOrHandle instanceof PrefillDir || typeof dirOrHandle === 'string') return dirOrHandle;
  throw new SparseMlaError('INVALID_VALUE', `${fn}: dir: expected a directory path string or a PrefillDir, got ${describe(dirOrHandle)}`, 'dir');
}

const openDir = async (d: string | PrefillDir): Promise<PrefillDir> => (typeof d === 'string' ? PrefillDir.open(d) : d);

export interface LoadedPrefillInputs {
  args: SparsePrefillArgs & { dV: number };
  /** file each input came from */
  files: Record<string, string>;
  shapes: { sQ: number; hQ: number; dQK: number; sKV: number; topk: number; dV: number };
}

/** Load and check the inputs of a prefill directory. */
export async function loadPrefillInputs(dirOrHandle: string | PrefillDir): Promise<LoadedPrefillInputs> {
  const dir = await openDir(dirArg('loadPrefillInputs', dirOrHandle));
  const qL = await dir.require('q');
  const q = checkQ(qL);
  const [sQ, hQ, dQK] = q.shape as [number, number, number];

  const kvL = await dir.require('kv');
  const kv = checkKv(kvL, dQK);
  const sKV = kv.shape[0]!;

  const idxL = await dir.require('indices');
  const indices = checkIndices(idxL, sQ);
  const topk = indices.shape[indices.shape.length - 1]!;

  const files: Record<string, string> = { q: qL.file, kv: kvL.file, indices: idxL.file };
  const args: LoadedPrefillInputs['args'] = { q, kv, indices, smScale: 0, dV: 512 };

  const lenL = await dir.get('topk_length');
  if (lenL) {
    args.topkLength = toInt32(checkTopkLength(lenL, sQ));
    files.topk_length = lenL.file;
  }
  const sinkL = await dir.get('attn_sink');
  if (sinkL) {
    args.attnSink = checkSink(sinkL, hQ);
    files.attn_sink = sinkL.file;
  }
  const meta = await dir.meta();
  checkDv(meta.value.dV, dQK, `${meta.file}: d_v`, meta.file);
  args.smScale = meta.value.smScale;
  args.dV = meta.value.dV;
  files.meta = meta.file;
  return { args, files, shapes: { sQ, hQ, dQK, sKV, topk, dV: meta.value.dV } };
}

export interface LoadedPrefillOutputs {
  out: Tensor<'bf16'> | Tensor<'float32'>;
  lse: Tensor<'float32'>;
  maxLogits: Tensor<'float32'>;
  files: Record<string, string>;
}

/** The dims loadPrefillOutputs checks a directory's outputs against, read once: counts (safe integers >= 0), refused before the directory is read. */
function outputShapesOnce(shapes: unknown): { sQ: number; hQ: number; dV: number } {
  if (typeof shapes !== 'object' || shapes === null) throw new SparseMlaError('INVALID_VALUE', `loadPrefillOutputs: shapes must be an object {sQ, hQ, dV}, got ${describe(shapes)}`, 'shapes');
  const { sQ, hQ, dV } = shapes as Record<string, unknown>;
  for (const [k, v] of [['sQ', sQ], ['hQ', hQ], ['dV', dV]] as const) {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new SparseMlaError('INVALID_VALUE', `loadPrefillOutputs: shapes.${k}: expected a count (an integer >= 0), got ${describe(v)}`, `shapes.${k}`);
  }
  return { sQ: sQ as number, hQ: hQ as number, dV: dV as number };
}

/** Load and check the outputs of a prefill directory against the input shapes. */
export async function loadPrefillOutputs(
  dirOrHandle: string | PrefillDir,
  shapes: { sQ: number; hQ: number; dV: number },
): Promise<LoadedPrefillOutputs> {
  const given = dirArg('loadPrefillOutputs', dirOrHandle);
  const { sQ, hQ, dV } = outputShapesOnce(shapes);
  const dir = await openDir(given);
  const outL = await dir.require('out');
  const out = checkOut(outL, sQ, hQ, dV);
  const stat = async (name: string): Promise<Located<Tensor<'float32'>>> => {
    const l = await dir.require(name);
    return { value: checkStat(l, sQ, hQ), file: l.file };
  };
  const lse = await stat('lse');
  const ml = await stat('max_logits');
  return { out, lse: lse.value, maxLogits: ml.value, files: { out: outL.file, lse: lse.file, max_logits: ml.file } };
}

export type DirFormat = 'npy' | 'safetensors';

/** `fn`'s `argument` naming a DirFormat: 'npy', 'safetensors' or undefined ('npy'); anything else (another case, a String object) is refused, not written as npy. */
function formatArg(fn: string, argument: string, format: unknown): DirFormat {
  if (format === undefined) return 'npy';
  if (format === 'npy' || format === 'safetensors') return format;
  throw new SparseMlaError('INVALID_VALUE', `${fn}: ${argument}: expected 'npy' or 'safetensors', got ${describe(format)}`, argument);
}

/**
 * The tensors of `given` (a prefill's args or result, `argument` in messages) by file name, each
 * field read once and each tensor checked (files.ts checkedTensor) before any file is written: a bad
 * one is refused with the directory as it was, not after the files before it.
 */
function tensorsToWrite(fn: string, argument: string, given: unknown, fields: readonly (readonly [string, string, boolean])[]): Record<string, Named> {
  if (typeof given !== 'object' || given === null) throw new SparseMlaError('INVALID_VALUE', `${fn}: ${argument} must be an object, got ${describe(given)}`, argument);
  const named: Record<string, Named> = {};
  for (const [field, file, optional] of fields) {
    const t: unknown = (given as Record<string, unknown>)[field];
    if (optional && (t === undefined || t === null)) continue;
    if (typeof t !== 'object' || t === null) throw new SparseMlaError('INVALID_VALUE', `${fn}: ${argument}.${field} must be a tensor {dtype, shape, data}, got ${describe(t)}`, `${argument}.${field}`);
    const { dtype, shape, data } = t as { dtype: unknown; shape: unknown; data: unknown };
    named[file] = { value: checkedTensor(fn, `${argument}.${field}`, dtype, shape, data), file: `${fn}: ${argument}.${field}`, argument: `${argument}.${field}` };
  }
  return named;
}

const OUTPUT_FIELDS = [['out', 'out', false], ['lse', 'lse', false], ['maxLogits', 'max_logits', false]] as const;

/** Outputs as loadPrefillOutputs reads them back: out [sQ, hQ, dV] (bf16 or float32), lse and max_logits float32 [sQ, hQ]; dims from out's shape where not given. */
function checkOutputs(named: Record<string, Named>, dims?: { sQ: number; hQ: number; dV: number }): void {
  const out = named.out!;
  const s = out.value.shape;
  if (dims === undefined) {
    expectDtype(out, ['bf16', 'float32'], OUT_STORED);
    expectShape(out, s.length === 3, '[sQ, hQ, dV]');
  }
  const { sQ, hQ, dV } = dims ?? { sQ: s[0]!, hQ: s[1]!, dV: s[2]! };
  checkOut(out, sQ, hQ, dV);
  checkStat(named.lse!, sQ, hQ);
  checkStat(named.max_logits!, sQ, hQ);
}

/**
 * After every read of the caller's arguments (getters may have run), before the first file: each
 * checked tensor's memory is still whole (a getter of a later field may have detached or shrunk an
 * earlier tensor's buffer), so a refusal leaves the directory as it was.
 */
function checkNamedIntact(named: Record<string, Named>): Record<string, Tensor> {
  const tensors: Record<string, Tensor> = {};
  for (const [k, t] of Object.entries(named)) tensors[k] = t.value;
  checkViewsIntact(Object.values(tensors).map((t) => t.data));
  return tensors;
}

/** A file a writer puts in a folder: its name and the tensors it holds (a .npy file: its own name). */
interface PlannedFile {
  file: string;
  names: readonly string[];
  /** sm_scale / d_v in its __metadata__ (writePrefillDir's prefill.safetensors) */
  scale?: boolean;
}

const PREFILL_SAFETENSORS = 'prefill.safetensors';

const npyPlan = (names: readonly string[]): PlannedFile[] => names.map((n) => ({ file: `${n}.npy`, names: [n] }));

/** What writePrefillOutputs writes in `format`: out / lse / max_logits as .npy files or in outputs.safetensors. */
function outputsPlan(format: DirFormat): PlannedFile[] {
  const names = OUTPUT_FIELDS.map(([, file]) => file);
  return format === 'safetensors' ? [{ file: OUTPUTS_SAFETENSORS, names }] : npyPlan(names);
}

/**
 * Before a writer's first file, the folder as the write would leave it is one PrefillDir reads: no
 * tensor both in a file written and in a file already there that the write does not replace (a
 * name.npy, or a .safetensors file holding the name: read by its header only), no second .safetensors
 * file beside prefill.safetensors other than outputs.safetensors, and no meta.json or other file's
 * sm_scale that a reader would take (or weigh) instead of prefill.safetensors' own. Otherwise the
 * write is refused, INVALID_VALUE naming the folder and the files, with nothing written: the older
 * files are the user's to remove (a writer that deleted files it was not asked to write would be a
 * surprise; one that wrote beside them left a folder verify refuses, or once judged the older ones).
 * A file there that cannot be read as .safetensors is left to the reader: the write adds nothing to it.
 */
async function refuseMixedFolder(fn: string, dir: string, plan: readonly PlannedFile[]): Promise<void> {
  let names: string[];
  try {
    names = (await readdir(dir)).sort();
  } catch (e) {
    throw new SparseMlaError('INVALID_VALUE', `${fn}: ${dir}: cannot read the directory (${clip((e as Error).message, 300)})`, dir);
  }
  const planned = new Set(plan.map((f) => f.file));
  const holder = new Map<string, string>();
  for (const f of plan) for (const n of f.names) holder.set(n, f.file);
  const writesScale = plan.some((f) => f.scale);
  const writesMetaJson = planned.has('meta.json');
  const writesInputsFile = plan.some((f) => f.file.endsWith('.safetensors') && f.file !== OUTPUTS_SAFETENSORS);
  const clashes: string[] = [];
  const clash = (name: string, there: string): void => {
    clashes.push(`'${clip(name, 60)}' is in ${clip(there, 80)} and would be in ${holder.get(name)!}`);
  };
  for (const entry of names) {
    if (planned.has(entry)) continue;
    if (entry.endsWith('.npy')) {
      const name = entry.slice(0, -'.npy'.length);
      if (holder.has(name)) clash(name, entry);
    } else if (entry === 'meta.json') {
      if (writesScale && !writesMetaJson) clashes.push(`meta.json would be read instead of the sm_scale and d_v in ${PREFILL_SAFETENSORS}`);
    } else if (entry.endsWith('.safetensors')) {
      if (writesInputsFile && entry !== OUTPUTS_SAFETENSORS) clashes.push(`${clip(entry, 80)} would be a second .safetensors file beside ${PREFILL_SAFETENSORS} (besides ${OUTPUTS_SAFETENSORS}, a folder holds at most one)`);
      let header: SafetensorsHeader;
      try {
        header = await readSafetensorsHeader(join(dir, entry), entry);
      } catch (e) {
        if (e instanceof SparseMlaError) continue;
        throw e;
      }
      for (const name of header.tensors.keys()) if (holder.has(name)) clash(name, entry);
      if (writesScale && !writesMetaJson && Object.hasOwn(header.metadata, 'sm_scale')) clashes.push(`${clip(entry, 80)} has an sm_scale in its __metadata__ too`);
    }
  }
  if (clashes.length > 0) {
    const shown = clashes.slice(0, 4).join('; ') + (clashes.length > 4 ? `; and ${clashes.length - 4} more` : '');
    throw new SparseMlaError('INVALID_VALUE', `${fn}: ${dir}: files already there would clash with the ones written (${shown}), a folder a reader refuses or misreads: remove the older files first, or write the format they are in`, dir);
  }
}

/**
 * Before a prefill's outputs are written into `dir` in `format` (the CLI's prefill, before its engine
 * starts; writePrefillOutputs itself): the folder must not hold those tensors in other files.
 */
export async function checkOutputsFolder(dir: string, format: DirFormat, fn = 'writePrefillOutputs'): Promise<void> {
  await refuseMixedFolder(fn, dir, outputsPlan(format));
}

/** The files writePrefillOutputs writes in `format`. */
export function prefillOutputFiles(format: DirFormat): string[] {
  return format === 'safetensors' ? [OUTPUTS_SAFETENSORS] : OUTPUT_FIELDS.map(([, file]) => `${file}.npy`);
}

/**
 * Write a prefill's outputs: out.npy / lse.npy / max_logits.npy, or outputs.safetensors (all checked
 * first; refused when the folder already holds them in other files: refuseMixedFolder).
 */
export async function writePrefillOutputs(dir: string, res: SparsePrefillResult, format: DirFormat = 'npy'): Promise<string[]> {
  const fn = 'writePrefillOutputs';
  checkPathArgs(dir, dir, 'dir', 'a directory path');
  const named = tensorsToWrite(fn, 'res', res, OUTPUT_FIELDS);
  checkOutputs(named);
  const as = formatArg(fn, 'format', format);
  const tensors = checkNamedIntact(named);
  await prepareOutputDir(dir);
  const files = prefillOutputFiles(as);
  await prepareOutputFiles(dir, files);
  await refuseMixedFolder(fn, dir, outputsPlan(as));
  if (as === 'safetensors') {
    await writeSafetensorsFile(join(dir, OUTPUTS_SAFETENSORS), tensors);
    return files;
  }
  for (const [k, t] of Object.entries(tensors)) await writeNpyFile(join(dir, `${k}.npy`), t);
  return files;
}

/**
 * Write a prefill's inputs (and, optionally, its outputs) in the directory format: .npy files plus
 * meta.json, or one prefill.safetensors with sm_scale / d_v in its __metadata__. Everything is
 * checked before the first file is written, as loadPrefillInputs / loadPrefillOutputs read it back:
 * each tensor (files.ts checkedTensor), the tensors' dtypes and shapes against each other, sm_scale
 * (a finite number) and d_v (a positive integer, at most dQK); the format 'npy' or 'safetensors'; a
 * folder that already holds these tensors (or a meta.json, for safetensors) in other files is refused
 * (refuseMixedFolder).
 */
export async function writePrefillDir(
  dir: string,
  args: SparsePrefillArgs,
  opts: { format?: DirFormat; outputs?: SparsePrefillResult } = {},
): Promise<void> {
  const fn = 'writePrefillDir';
  checkPathArgs(dir, dir, 'dir', 'a directory path');
  const named = tensorsToWrite(fn, 'args', args, [['q', 'q', false], ['kv', 'kv', false], ['indices', 'indices', false], ['topkLength', 'topk_length', true], ['attnSink', 'attn_sink', true]]);
  const { smScale, dV: givenDV } = args as { smScale: unknown; dV: unknown };
  if (typeof smScale !== 'number' || !Number.isFinite(smScale)) throw new SparseMlaError('INVALID_VALUE', `${fn}: args.smScale: expected a finite number, got ${describe(smScale)}`, 'args.smScale');
  const dV = givenDV ?? 512;
  if (typeof dV !== 'number' || !Number.isSafeInteger(dV) || dV < 1) throw new SparseMlaError('INVALID_VALUE', `${fn}: args.dV: expected a positive integer, got ${describe(dV)}`, 'args.dV');
  const q = checkQ(named.q!);
  const [sQ, hQ, dQK] = q.shape as [number, number, number];
  checkKv(named.kv!, dQK);
  checkIndices(named.indices!, sQ);
  if (named.topk_length) checkTopkLength(named.topk_length, sQ);
  if (named.attn_sink) checkSink(named.attn_sink, hQ);
  checkDv(dV, dQK, `${fn}: args.dV`, 'args.dV');
  if (typeof opts !== 'object' || opts === null) throw new SparseMlaError('INVALID_VALUE', `${fn}: opts must be an object, got ${describe(opts)}`, 'opts');
  const { format, outputs } = opts;
  const as = formatArg(fn, 'opts.format', format);
  if (outputs !== undefined) {
    const outs = tensorsToWrite(fn, 'opts.outputs', outputs, OUTPUT_FIELDS);
    checkOutputs(outs, { sQ, hQ, dV });
    Object.assign(named, outs);
  }
  const tensors = checkNamedIntact(named);
  await prepareOutputDir(dir);
  const plan: PlannedFile[] = as === 'safetensors' ? [{ file: PREFILL_SAFETENSORS, names: Object.keys(tensors), scale: true }] : [...npyPlan(Object.keys(tensors)), { file: 'meta.json', names: [] }];
  await prepareOutputFiles(dir, plan.map((f) => f.file));
  await refuseMixedFolder(fn, dir, plan);
  const meta = { sm_scale: smScale, d_v: dV };
  if (as === 'safetensors') {
    await writeSafetensorsFile(join(dir, PREFILL_SAFETENSORS), tensors, { sm_scale: String(meta.sm_scale), d_v: String(meta.d_v) });
    return;
  }
  for (const [k, t] of Object.entries(tensors)) await writeNpyFile(join(dir, `${k}.npy`), t);
  await writeFileNoFollow(join(dir, 'meta.json'), JSON.stringify(meta) + '\n');
}
