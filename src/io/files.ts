/**
 * Files the CLI reads and writes, treated as hostile (SPEC §9):
 * - reads open the path without blocking (a FIFO cannot hang the open) and go on only when fstat
 *   says it is a regular file (not a FIFO, a device such as /dev/zero, a directory); the caller
 *   checks the size against the file's own header before reading its data, and reads exactly that;
 * - writes go to a fresh file created beside the target (O_CREAT | O_EXCL | O_NOFOLLOW) that is
 *   then renamed over it: a symlink already at the target is replaced, never written through, and
 *   no reader sees a half-written file; a target that is a device or a socket, or any path in /dev or /proc (`/dev/stdout`), is refused, not
 *   replaced (the rename would unlink `/dev/null` or a server's socket where the user may);
 * - an output directory is created component by component and checked (a directory we can create
 *   files in) before any work;
 * - every failure is a SparseMlaError (INVALID_VALUE) naming the path, with the system's reason.
 * Text from a file that goes into a message is clipped (clip()).
 */
import { constants } from 'node:fs';
import { type FileHandle, lstat, mkdir, open, realpath, rename, stat, unlink } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { SparseMlaError } from '../errors.js';
import { HOST_ARRAY_TYPES, ownView, tensor, typedArrayKind } from '../tensor.js';
import type { DTypeArrays, Tensor } from '../types.js';

/** At most `max` characters of `text`, saying how much was cut. */
export function clip(text: string, max = 120): string {
  return text.length <= max ? text : `${text.slice(0, max)}… (${text.length - max} more characters)`;
}

function reason(e: unknown): string {
  const x = e as { code?: unknown; message?: unknown };
  return clip(typeof x?.message === 'string' ? x.message : String(e), 300);
}

function fsError(name: string, what: string, e: unknown): SparseMlaError {
  return new SparseMlaError('INVALID_VALUE', `${name}: cannot ${what} (${reason(e)})`, name);
}

function kindOf(s: { isFile(): boolean; isDirectory(): boolean; isFIFO(): boolean; isCharacterDevice(): boolean; isBlockDevice(): boolean; isSocket(): boolean; isSymbolicLink(): boolean }): string {
  if (s.isDirectory()) return 'a directory';
  if (s.isFIFO()) return 'a FIFO';
  if (s.isCharacterDevice()) return 'a character device';
  if (s.isBlockDevice()) return 'a block device';
  if (s.isSocket()) return 'a socket';
  if (s.isSymbolicLink()) return 'a symbolic link';
  return 'a regular file';
}

export interface OpenedFile {
  handle: FileHandle;
  /** bytes, from fstat */
  size: number;
  /** the file's device and inode, from fstat: which file this is, to tell a later open of the path whether it is still the same */
  dev: number;
  ino: number;
}

/**
 * `path` (the argument `argument`, a `what`) and the `name` messages give it: strings (a path is
 * never coerced: a Symbol's or an object's text is no path, and node's fs would throw a TypeError),
 * the path not empty (it names nothing: fs refuses it, but path.resolve makes it the working directory,
 * where a writer would have written).
 */
export function checkPathArgs(path: unknown, name: unknown, argument = 'path', what = 'a file path'): asserts path is string {
  if (typeof path !== 'string') throw new SparseMlaError('INVALID_VALUE', `${argument}: expected ${what} string, got ${typeof path === 'object' ? (path === null ? 'null' : 'an object') : typeof path}`, argument);
  checkNameArg(name, path);
  if (path === '') throw new SparseMlaError('INVALID_VALUE', `${name || argument}: expected ${what}, got an empty string`, name || argument);
}

/** The `name` messages give a path: a string. */
function checkNameArg(name: unknown, path: string): asserts name is string {
  if (typeof name !== 'string') throw new SparseMlaError('INVALID_VALUE', `name: expected a string naming ${clip(path, 80)} in messages, got ${typeof name}`, 'name');
}

/**
 * The bytes of a file to parse (parseNpy, parseSafetensors) as a plain Uint8Array over the same
 * memory, read through the typed-array intrinsics (a Proxy, a subclass with its own length, a
 * DataView or a detached buffer is refused, not half-read); `name` must be a string.
 */
export function fileBytes(bytes: unknown, name: unknown): Uint8Array {
  checkNameArg(name, '');
  const view = ownView(bytes, Uint8Array, name as string);
  if (view === null) {
    const got = typedArrayKind(bytes) ?? (bytes instanceof DataView ? 'DataView' : bytes === null ? 'null' : typeof bytes === 'object' ? 'an object that is not a Uint8Array' : typeof bytes);
    throw new SparseMlaError('INVALID_VALUE', `${name as string}: expected the file's bytes as a Uint8Array, got ${got}`, name as string);
  }
  return view;
}

/** Opens `path` for reading if it is a regular file (symlinks to one are followed). */
export async function openRegularFile(path: string, name = path): Promise<OpenedFile> {
  checkPathArgs(path, name);
  let handle: FileHandle;
  try {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
  } catch (e) {
    throw fsError(name, 'open it', e);
  }
  try {
    const s = await handle.stat();
    if (!s.isFile()) throw new SparseMlaError('INVALID_VALUE', `${name}: expected a regular file, got ${kindOf(s)}`, name);
    return { handle, size: s.size, dev: s.dev, ino: s.ino };
  } catch (e) {
    await handle.close().catch(() => {});
    throw e instanceof SparseMlaError ? e : fsError(name, 'stat it', e);
  }
}

/** Reads exactly `length` bytes at `position` into a fresh (aligned) buffer; a short file is an error. */
export async function readExactly(file: OpenedFile, position: number, length: number, name: string): Promise<Uint8Array> {
  let out: Uint8Array;
  try {
    out = new Uint8Array(length);
  } catch (e) {
    throw new SparseMlaError('TOO_LARGE', `${name}: cannot allocate ${length} bytes to read it (${reason(e)})`, name);
  }
  let done = 0;
  while (done < length) {
    let n: number;
    try {
      ({ bytesRead: n } = await file.handle.read(out, done, Math.min(length - done, 2 ** 30), position + done));
    } catch (e) {
      throw fsError(name, 'read it', e);
    }
    if (n === 0) throw new SparseMlaError('INVALID_VALUE', `${name}: the file ended after ${position + done} bytes, expected ${position + length}`, name);
    done += n;
  }
  return out;
}

/** A whole regular file of at most `maxBytes` bytes (small files: meta.json). */
export async function readSmallFile(path: string, name: string, maxBytes: number): Promise<Uint8Array> {
  const f = await openRegularFile(path, name);
  try {
    if (f.size > maxBytes) throw new SparseMlaError('INVALID_VALUE', `${name}: expected at most ${maxBytes} bytes, the file has ${f.size}`, name);
    return await readExactly(f, 0, f.size, name);
  } finally {
    await f.handle.close().catch(() => {});
  }
}

/**
 * Creates `dir` and its missing parents one component at a time (each one must end up a
 * directory; `create` false: must already be one), then checks that a file can be created in it.
 * Throws INVALID_VALUE naming what failed. (Not mkdir's recursive mode: on a path under /proc it
 * never returns.)
 */
export async function prepareOutputDir(dir: string, name = dir, create = true): Promise<void> {
  checkPathArgs(dir, name, 'dir', 'a directory path');
  const full = resolve(dir);
  const parts = full.split(sep).filter((p) => p !== '');
  let at: string = sep;
  for (const part of parts) {
    at = join(at, part);
    if (create) {
      try {
        await mkdir(at);
      } catch (e) {
        if ((e as { code?: string }).code !== 'EEXIST') throw fsError(name, `create the directory ${at}`, e);
      }
    }
    let s;
    try {
      s = await stat(at);
    } catch (e) {
      throw fsError(name, `use ${at}`, e);
    }
    if (!s.isDirectory()) throw new SparseMlaError('INVALID_VALUE', `${name}: expected a directory, but ${at} is ${kindOf(s)}`, name);
  }
  const probe = join(full, `.sparse-mla-probe-${process.pid}-${randomBytes(6).toString('hex')}`);
  try {
    const h = await open(probe, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    await h.close();
  } catch (e) {
    throw fsError(name, 'create files in it', e);
  }
  await unlink(probe).catch(() => {});
}

/**
 * An output file's path (checkPathArgs's checks) that does not name a directory by its spelling: a
 * trailing separator or a last component '.' or '..' (path.resolve drops them, so a writer would
 * write a file the same path cannot open, where the system refuses to create one: EISDIR).
 */
export function checkFilePath(path: unknown, name: unknown): asserts path is string {
  checkPathArgs(path, name);
  const last = path.slice(path.lastIndexOf(sep) + 1);
  if (last === '' || last === '.' || last === '..') {
    throw new SparseMlaError('INVALID_VALUE', `${name as string}: expected a file path, got a path that names a directory ('${clip(path, 120)}')`, name as string);
  }
}

/** For an output file given by path: its directory must exist and take new files, and the path must not be a directory, a device or a socket. */
export async function prepareOutputFile(path: string, name = path): Promise<void> {
  checkFilePath(path, name);
  await prepareOutputDir(dirname(resolve(path)), name, false);
  await refuseUnwritable(path, name);
}

/**
 * An output path that is now a directory (the rename over it would fail), a device or a socket (the
 * rename would unlink it: `/dev/null` as a user who may write /dev, a server's socket) is refused,
 * naming it. A regular file, a FIFO and a symlink (to anything) are replaced by the write.
 */
async function refuseUnwritable(path: string, name: string): Promise<void> {
  // /dev/stdout, /dev/fd/1 and /proc/self/fd/1 are symlinks the write would replace (as root: the
  // system's own /dev/stdout gone), not the stream a caller means: every path in /dev or /proc is refused
  const dir = await realpath(dirname(resolve(path))).catch(() => null);
  if (dir !== null && /^\/(dev|proc)(\/|$)/.test(dir)) {
    throw new SparseMlaError('INVALID_VALUE', `${name}: expected a file path to write, got a path in ${dir.startsWith('/dev') ? '/dev' : '/proc'} (${clip(path, 120)}), whose entry a write would replace; write to a regular file (or redirect the command's output)`, name);
  }
  const s = await lstat(path).catch(() => null);
  if (s === null) return;
  if (s.isDirectory()) throw new SparseMlaError('INVALID_VALUE', `${name}: expected a file path, got a directory`, name);
  if (s.isCharacterDevice() || s.isBlockDevice() || s.isSocket()) {
    throw new SparseMlaError('INVALID_VALUE', `${name}: expected a file path to write, got ${kindOf(s)} (${clip(path, 120)}), which a write would replace`, name);
  }
}

/**
 * Before the first of several files is written into `dir` (a prefill directory's): none of their
 * names is a directory there, so the writes are not refused midway with the files before it written
 * over an older dump's (a folder of new and old files).
 */
export async function prepareOutputFiles(dir: string, files: readonly string[]): Promise<void> {
  for (const f of files) await refuseUnwritable(join(dir, f), join(dir, f));
}

/**
 * Writes `data` to `path` through a fresh file in the same directory renamed over the target: a
 * pre-existing symlink at `path` is replaced, never followed; a device or a socket there is refused.
 */
export async function writeFileNoFollow(path: string, data: Uint8Array | string, name = path): Promise<void> {
  checkFilePath(path, name);
  const target = resolve(path);
  await refuseUnwritable(target, name);
  const tmp = join(dirname(target), `.${basename(target)}.${process.pid}-${randomBytes(6).toString('hex')}.tmp`);
  let h: FileHandle;
  try {
    h = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o644);
  } catch (e) {
    throw fsError(name, 'create it', e);
  }
  try {
    try {
      await h.writeFile(data);
    } finally {
      await h.close();
    }
    await rename(tmp, target);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw fsError(name, 'write it', e);
  }
}

/**
 * A caller's tensor to write into a file or convert (encodeNpy, tensorToNpy, npyToTensor,
 * encodeSafetensors: its fields read once by the caller of this), checked as tensor() checks one: a dtype of this library, a
 * shape of safe integers ≥ 0, data of the dtype's array kind as long as the shape says (its kind
 * and length read through the typed-array intrinsics, not instanceof or a subclass's getters).
 * Its data comes back as a plain view of that memory: the bytes written are the array's own, never
 * its buffer's past its view. A refusal names `argument`'s field (`tensors["q"].data`).
 */
export function checkedTensor(fn: string, argument: string, dtype: unknown, shape: unknown, data: unknown): Tensor {
  if (data === undefined) {
    // tensor() would make zeros of the shape
    throw new SparseMlaError('INVALID_DTYPE', `${fn}: ${argument}.data: expected a typed array of the tensor's dtype, got undefined`, `${argument}.data`);
  }
  let t: Tensor;
  try {
    t = tensor(dtype as Tensor['dtype'], shape as number[], data as DTypeArrays[Tensor['dtype']]);
  } catch (e) {
    if (!(e instanceof SparseMlaError)) throw e;
    const field = e.argument === 'dtype' || e.argument === 'shape' ? e.argument : 'data';
    throw new SparseMlaError(e.code, `${fn}: ${argument}.${field}: ${e.message.replace(/^tensor: /, '')}`, `${argument}.${field}`);
  }
  const view = ownView(t.data, HOST_ARRAY_TYPES[t.dtype] as unknown as abstract new () => DTypeArrays[Tensor['dtype']], `${argument}.data`)!;
  return { dtype: t.dtype, shape: t.shape, data: view } as Tensor;
}

/** A checked tensor's bytes (its data is a plain view: checkedTensor). */
export function tensorBytes(t: Tensor): Uint8Array {
  const d = t.data as ArrayBufferView;
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
}
