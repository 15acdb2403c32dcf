/**
 * The CLI on hostile files and paths (SPEC §9), run as a user runs it (`node dist/cli/main.js`):
 * only regular files are read (a symlink to /dev/zero, a FIFO), a file's size must agree with its
 * header before its data is read, a .npy header is capped as NumPy caps it and parsed in linear
 * time, messages quoting a file are clipped, overlapping safetensors offsets are refused; outputs
 * never go through a pre-existing symlink; --out is made and checked before the work; verify
 * refuses what prefill refuses; every bad file or path is exit 2 with a message, no stack trace.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { SparsePrefillArgs, Tensor } from '../dist/index.js';
import { encodeNpy, encodeSafetensors, parseNpy, writePrefillDir } from '../dist/io/index.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';

const rng = testRng('cli_files');
const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));
const MAXRSS = fileURLToPath(new URL('./children/maxrss.cjs', import.meta.url));

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'smla-cli-files-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

let n = 0;
const fresh = (): string => {
  const d = join(root, `case-${n++}`);
  return d;
};

interface Run {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  maxRssBytes: number;
}

/** Runs the CLI (a hang ends at the timeout, with code null); reports its peak resident set. */
function cli(args: string[], timeout = 60_000): Run {
  const rssFile = join(root, `rss-${n++}`);
  const r = spawnSync(process.execPath, ['--require', MAXRSS, MAIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, SPARSE_MLA_BACKEND: 'wasm', SMLA_MAXRSS_FILE: rssFile },
    timeout,
  });
  const maxRssBytes = existsSync(rssFile) ? Number(readFileSync(rssFile, 'utf8')) * 1024 : Number.NaN;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, maxRssBytes };
}

/** Exit 2, a one-line message naming `what`, no stack trace. */
function expectBadInput(r: Run, what: RegExp): void {
  expect({ code: r.code, signal: r.signal }).toEqual({ code: 2, signal: null });
  expect(r.stderr).toMatch(what);
  expect(r.stderr).not.toMatch(/\n\s+at /);
  expect(r.stderr.length).toBeLessThan(1000);
}

const sQ = 4, hQ = 2, dQK = 512, sKV = 64, topk = 16;
function prefillArgs(): SparsePrefillArgs {
  return { ...randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }), dV: 512 };
}

async function inputDir(): Promise<string> {
  const d = fresh();
  await writePrefillDir(d, prefillArgs());
  return d;
}

/** A version 2.0 .npy whose header is `header` verbatim (no padding rules applied). */
function npyV2(header: string, data = new Uint8Array(0)): Uint8Array {
  const h = new TextEncoder().encode(header);
  const out = new Uint8Array(12 + h.length + data.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 2, 0]);
  new DataView(out.buffer).setUint32(8, h.length, true);
  out.set(h, 12);
  out.set(data, 12 + h.length);
  return out;
}

describe('inputs that are not regular files', () => {
  test('q.npy a symlink to /dev/zero: exit 2 at once, nothing read', async () => {
    const d = await inputDir();
    rmSync(join(d, 'q.npy'));
    symlinkSync('/dev/zero', join(d, 'q.npy'));
    const r = cli(['prefill', d, '--out', fresh(), '-q'], 30_000);
    expectBadInput(r, /q\.npy: expected a regular file, got a character device/);
    expect(r.maxRssBytes).toBeLessThan(512 * 2 ** 20);
  });

  test('kv.npy a FIFO: exit 2, no hang', async () => {
    const d = await inputDir();
    rmSync(join(d, 'kv.npy'));
    expect(spawnSync('mkfifo', [join(d, 'kv.npy')]).status).toBe(0);
    expectBadInput(cli(['verify', d, '-q'], 30_000), /kv\.npy: expected a regular file, got a FIFO/);
  });

  test('meta.json a directory: exit 2', async () => {
    const d = await inputDir();
    rmSync(join(d, 'meta.json'));
    spawnSync('mkdir', [join(d, 'meta.json')]);
    expectBadInput(cli(['prefill', d, '--out', fresh(), '-q']), /meta\.json: expected a regular file, got a directory/);
  });
});

describe('sizes and headers', () => {
  test('a .npy whose header promises less data than the 1.5 GiB (sparse) file holds: exit 2, data never read', async () => {
    const d = await inputDir();
    const q = parseNpy(readFileSync(join(d, 'q.npy')));
    writeFileSync(join(d, 'q.npy'), encodeNpy(q));
    const h = await open(join(d, 'q.npy'), 'r+');
    await h.truncate(1.5 * 2 ** 30);
    await h.close();
    const r = cli(['prefill', d, '--out', fresh(), '-q']);
    expectBadInput(r, /q\.npy: shape \(4, 2, 512\) of <u2 needs 8192 data bytes, file has \d+/);
    expect(r.maxRssBytes).toBeLessThan(512 * 2 ** 20);
  });

  test('a .npy header over NumPy\'s 10000-byte cap (100,000 × "\'shape\': (") is refused unparsed, the message clipped', async () => {
    const d = await inputDir();
    writeFileSync(join(d, 'q.npy'), npyV2(`{'descr': '<u2', 'fortran_order': False, ${"'shape': (".repeat(100_000)}`));
    expectBadInput(cli(['prefill', d, '--out', fresh(), '-q']), /q\.npy: not a valid \.npy file \(a header of \d+ bytes, over NumPy's cap of 10000\)/);
  });

  test('a pathological header under the cap is parsed in one pass; the message quotes it clipped', async () => {
    const d = await inputDir();
    writeFileSync(join(d, 'kv.npy'), npyV2(`{'descr': '<u2', 'fortran_order': False, ${"'shape': (".repeat(990)}`));
    expectBadInput(cli(['verify', d, '-q']), /kv\.npy: not a valid \.npy file \(header .*more characters/);
  });

  test('overlapping safetensors offsets: exit 2 naming both tensors', async () => {
    const d = fresh();
    const a = prefillArgs();
    const named: Record<string, Tensor> = { q: a.q, kv: a.kv, indices: a.indices };
    const bytes = encodeSafetensors(named, { sm_scale: String(a.smScale), d_v: '512' });
    const hlen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + hlen))) as Record<string, { data_offsets: number[] }>;
    // indices re-pointed into the tail of kv, the tensors after it moved back to keep the file whole
    const span = header.indices!.data_offsets[1]! - header.indices!.data_offsets[0]!;
    const kvEnd = header.kv!.data_offsets[1]!;
    header.indices!.data_offsets = [kvEnd - span, kvEnd];
    const json = new TextEncoder().encode(JSON.stringify(header));
    const out = new Uint8Array(8 + json.length + kvEnd);
    new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
    out.set(json, 8);
    out.set(bytes.subarray(8 + hlen, 8 + hlen + kvEnd), 8 + json.length);
    (await import('node:fs')).mkdirSync(d, { recursive: true });
    writeFileSync(join(d, 'prefill.safetensors'), out);
    expectBadInput(cli(['prefill', d, '--out', fresh(), '-q']), /prefill\.safetensors: not a valid \.safetensors file \(tensors 'kv' .* and 'indices' .* overlap\)/);
  });
});

describe('outputs', () => {
  test('an out.npy symlink already in --out is replaced, never written through', async () => {
    const d = await inputDir();
    const out = fresh();
    (await import('node:fs')).mkdirSync(out);
    const victim = join(root, `victim-${n++}.txt`);
    writeFileSync(victim, 'precious');
    symlinkSync(victim, join(out, 'out.npy'));
    const r = cli(['prefill', d, '--out', out, '-q']);
    expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
    expect(readFileSync(victim, 'utf8')).toBe('precious');
    expect(lstatSync(join(out, 'out.npy')).isFile()).toBe(true);
    expect(parseNpy(readFileSync(join(out, 'out.npy'))).shape).toEqual([sQ, hQ, 512]);
  });

  test('--out that is a file: exit 2 before the engine starts, no stack trace', async () => {
    const d = await inputDir();
    const file = join(root, `a-file-${n++}`);
    writeFileSync(file, 'x');
    const r = cli(['prefill', d, '--out', file]);
    expectBadInput(r, /--out: expected a directory, but .* is a regular file/);
    expect(r.stderr).not.toMatch(/start engine|sparse prefill/);
  });

  test.each(['npy', 'safetensors'])('--format %s with an output name taken by a directory in --out: exit 2 before the engine starts, nothing written', async (format) => {
    const d = await inputDir();
    const out = fresh();
    const taken = format === 'npy' ? 'lse.npy' : 'outputs.safetensors';
    mkdirSync(join(out, taken), { recursive: true });
    const r = cli(['prefill', d, '--out', out, '--format', format]);
    expectBadInput(r, new RegExp(`${taken.replace('.', '\\.')}: expected a file path, got a directory`));
    expect(r.stderr).not.toMatch(/start engine|sparse prefill/);
    expect(readdirSync(out)).toEqual([taken]);
  });

  test.each([['npy', 'safetensors'], ['safetensors', 'npy']])('prefill D --out D --format %s, then --format %s: exit 2 before the engine starts, naming the older files; the folder as it was and verify still judges the first outputs', async (first, second) => {
    const d = await inputDir();
    const r1 = cli(['prefill', d, '--out', d, '--format', first, '-q']);
    expect({ code: r1.code, stderr: r1.stderr }).toEqual({ code: 0, stderr: '' });
    const before = Object.fromEntries(readdirSync(d).sort().map((f) => [f, readFileSync(join(d, f)).toString('base64')]));
    const r2 = cli(['prefill', d, '--out', d, '--format', second]);
    const older = first === 'npy' ? /'out' is in out\.npy and would be in outputs\.safetensors/ : /'out' is in outputs\.safetensors and would be in out\.npy/;
    expectBadInput(r2, older);
    expect(r2.stderr).toMatch(/^sparse-mla prefill: --out: .*remove the older files first, or write the format they are in \[INVALID_VALUE\]\n$/);
    expect(r2.stderr).not.toMatch(/start engine|sparse prefill/);
    expect(Object.fromEntries(readdirSync(d).sort().map((f) => [f, readFileSync(join(d, f)).toString('base64')]))).toEqual(before);
    const v = cli(['verify', d, '-q']);
    expect(v.code).toBe(0);
    // the same format again replaces the outputs
    const r3 = cli(['prefill', d, '--out', d, '--format', first, '-q']);
    expect({ code: r3.code, stderr: r3.stderr }).toEqual({ code: 0, stderr: '' });
  });

  test('--out /proc/1/x (cannot be made): exit 2, no hang', async () => {
    const d = await inputDir();
    expectBadInput(cli(['prefill', d, '--out', '/proc/1/x', '-q'], 30_000), /--out: cannot create the directory \/proc\/1\/x/);
  });

  test('bench --out in a directory that does not exist: exit 2 before measuring', () => {
    const r = cli(['bench', '--backend', 'wasm', '--queries', '4', '--heads', '2', '--topk', '16', '--window', '8', '--context', '64', '--page-size', '16', '--repeat', '1', '--warmup', '0', '--dequant-tokens', '16', '--quiet', '--out', join(root, 'no-such-dir', 'b.json')]);
    expectBadInput(r, /--out: cannot use .*no-such-dir/);
    expect(existsSync(join(root, 'no-such-dir'))).toBe(false);
  });
});

describe('verify refuses what prefill refuses (exit 2, the same message)', () => {
  test('a zero-size q with a 2^40 dimension', async () => {
    const d = await inputDir();
    writeFileSync(join(d, 'q.npy'), npyV2(`{'descr': '<u2', 'fortran_order': False, 'shape': (0, ${2 ** 40}, 512), }\n`));
    writeFileSync(join(d, 'indices.npy'), encodeNpy({ descr: '<i4', shape: [0, topk], data: new Int32Array(0) }));
    writeFileSync(join(d, 'out.npy'), npyV2(`{'descr': '<u2', 'fortran_order': False, 'shape': (0, ${2 ** 40}, 512), }\n`));
    for (const f of ['lse', 'max_logits']) writeFileSync(join(d, `${f}.npy`), npyV2(`{'descr': '<f4', 'fortran_order': False, 'shape': (0, ${2 ** 40}), }\n`));
    const p = cli(['prefill', d, '--out', fresh(), '-q']);
    const v = cli(['verify', d, '-q']);
    expectBadInput(p, /q: expected hQ ≤ 2147483647 .*\[TOO_LARGE\]/);
    expectBadInput(v, /q: expected hQ ≤ 2147483647 .*\[TOO_LARGE\]/);
  });

  test('sm_scale 1e6, past the accepted range', async () => {
    const d = await inputDir();
    writeFileSync(join(d, 'meta.json'), JSON.stringify({ sm_scale: 1e6, d_v: 512 }));
    for (const [f, shape] of [['out', [sQ, hQ, 512]], ['lse', [sQ, hQ]], ['max_logits', [sQ, hQ]]] as const) {
      const count = shape.reduce((x, y) => x * y, 1);
      writeFileSync(join(d, `${f}.npy`), encodeNpy(f === 'out' ? { descr: '<u2', shape: [...shape], data: new Uint16Array(count) } : { descr: '<f4', shape: [...shape], data: new Float32Array(count) }));
    }
    const p = cli(['prefill', d, '--out', fresh(), '-q']);
    const v = cli(['verify', d, '-q']);
    expectBadInput(p, /smScale: expected a finite number with \|smScale\| ≤ 65536/);
    expectBadInput(v, /smScale: expected a finite number with \|smScale\| ≤ 65536/);
  });
});
