/**
 * What session 59's API fuzzer hunt (helper-86) found in the library, one focused case each.
 *
 * The writers of files (the io module's writeNpyFile, writeSafetensorsFile, writePrefillDir,
 * writePrefillOutputs, and the CLI's `--out`) write a fresh file beside the target and rename it over
 * the target, so that a symlink there is replaced, never written through. A target that was a device
 * node or a socket was replaced as well: `sparse-mla bench --out /dev/null` run as root unlinked the
 * system's /dev/null (a regular file of JSON in its place), and a server's socket path given as an
 * output was gone. SPEC §9: a bad path is refused with a message; nothing a caller passes may break
 * what it did not ask to write.
 *
 * createPlan instantiates the package's WebAssembly core for its host planner on first use; where the
 * process may not reserve that module's memory (an address-space limit, `ulimit -v`, as batch systems
 * set), it threw the engine's RangeError ("WebAssembly.Instance(): Out of memory"), untyped, where
 * createEngine({ backend: 'wasm' }) under the same limit rejects with BACKEND_FAILURE.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, lstatSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { tensor } from '../dist/index.js';
import type { SparsePrefillArgs, Tensor } from '../dist/index.js';
import { prepareOutputFile, readNpyFile, readSafetensorsFile, writeNpyFile, writePrefillDir, writePrefillOutputs, writeSafetensorsFile } from '../dist/io/index.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';

const rng = testRng('fuzz_findings_s59');
const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));

let root: string;
const servers: Server[] = [];
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'smla-fuzz-s59-'));
});
afterAll(async () => {
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  rmSync(root, { recursive: true, force: true });
});

let n = 0;
const freshDir = (): string => {
  const d = join(root, `case-${n++}`);
  spawnSync('mkdir', ['-p', d]);
  return d;
};

/** A listening Unix socket at `path` (closed after the file's tests). */
async function socketAt(path: string): Promise<void> {
  const server = createServer();
  servers.push(server);
  await new Promise<void>((r) => server.listen(path, r));
}

/** A character device node at `path` (/dev/null's numbers), where this process may make one (root); false where not. */
function deviceAt(path: string): boolean {
  return spawnSync('mknod', ['-m', '666', path, 'c', '1', '3']).status === 0 && lstatSync(path).isCharacterDevice();
}
const canMakeDevices = (() => {
  const d = mkdtempSync(join(tmpdir(), 'smla-mknod-'));
  try {
    return deviceAt(join(d, 'probe'));
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
})();

/** A float32 tensor of fresh random values. */
function randomTensor(): Tensor<'float32'> {
  const shape = [rng.int(1, 5), rng.int(1, 9)];
  return tensor('float32', shape, Float32Array.from({ length: shape[0]! * shape[1]! }, () => rng.normal()));
}

/** What a path is now: its kind and, for a device, its device numbers. */
function kindAt(path: string): string {
  const s = lstatSync(path);
  if (s.isSocket()) return 'socket';
  if (s.isCharacterDevice()) return `char ${s.rdev}`;
  if (s.isFile()) return 'file';
  if (s.isSymbolicLink()) return 'symlink';
  return 'other';
}

const invalidNaming = (what: RegExp) => expect.objectContaining({ code: 'INVALID_VALUE', message: expect.stringMatching(what) });

describe('writers: an output path that is a socket or a device is refused, not replaced (session 59, helper-86, by hand while writing the shardedDevice target)', () => {
  test('writeNpyFile and writeSafetensorsFile onto a listening socket: INVALID_VALUE naming it, the socket still there', async () => {
    const d = freshDir();
    for (const [name, write] of [
      ['t.npy', (p: string, t: Tensor) => writeNpyFile(p, t)],
      ['t.safetensors', (p: string, t: Tensor) => writeSafetensorsFile(p, { t })],
    ] as const) {
      const p = join(d, name);
      await socketAt(p);
      await expect(write(p, randomTensor())).rejects.toEqual(invalidNaming(/got a socket/));
      expect(kindAt(p)).toBe('socket');
    }
    expect(readdirSync(d).sort()).toEqual(['t.npy', 't.safetensors']); // no temporary file left
  });

  test.skipIf(!canMakeDevices)('writeNpyFile onto a character device (/dev/null\'s numbers, made with mknod): INVALID_VALUE, the device node still there', async () => {
    const d = freshDir();
    const p = join(d, 'null');
    expect(deviceAt(p)).toBe(true);
    const before = kindAt(p);
    await expect(writeNpyFile(p, randomTensor())).rejects.toEqual(invalidNaming(/got a character device/));
    expect(kindAt(p)).toBe(before);
  });

  test('writePrefillDir and writePrefillOutputs into a folder where one output name is a socket: refused before any file is written', async () => {
    const [sQ, hQ] = [rng.int(1, 4), rng.int(1, 3)];
    const args: SparsePrefillArgs = randomPrefillArgs(rng, { sQ, hQ, dQK: 576, topk: 8, sKV: 16 });
    const outputs = {
      out: tensor('bf16', [sQ, hQ, 512], new Uint16Array(sQ * hQ * 512).map(() => rng.u32() & 0x7f7f)),
      lse: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())),
      maxLogits: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())),
    };
    for (const [format, taken] of [
      ['npy', 'kv.npy'],
      ['safetensors', 'prefill.safetensors'],
    ] as const) {
      const d = freshDir();
      await socketAt(join(d, taken));
      await expect(writePrefillDir(d, args, { format })).rejects.toEqual(invalidNaming(/got a socket/));
      expect(readdirSync(d)).toEqual([taken]);
      expect(kindAt(join(d, taken))).toBe('socket');
    }
    const d = freshDir();
    await socketAt(join(d, 'lse.npy'));
    await expect(writePrefillOutputs(d, outputs)).rejects.toEqual(invalidNaming(/lse\.npy.*got a socket/));
    expect(readdirSync(d)).toEqual(['lse.npy']);
  });

  test('`sparse-mla bench --out <socket>`: exit 2 with a message before any work, the socket still there', async () => {
    const d = freshDir();
    const p = join(d, 'bench.json');
    await socketAt(p);
    // the child runs while this process's server listens: asynchronously, so the server is served
    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [MAIN, 'bench', '--backend', 'wasm', '--workers', '1', '--queries', '1', '--out', p, '-q'], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (b: Buffer) => (stderr += b));
      child.on('close', (code: number | null) => resolve({ code, stderr }));
    });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/sparse-mla bench: --out: expected a file path to write, got a socket/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(kindAt(p)).toBe('socket');
  });

  // helper-86's design question, settled by the lead: /dev/stdout is a symlink, so the rename would
  // replace it (as root, the system's own). Checked with prepareOutputFile, which writes nothing, so a
  // regression fails here without touching /dev; the write itself through /proc/self/fd/N, where a
  // rename cannot land either way.
  test.skipIf(process.platform !== 'linux')('paths in /dev and /proc (/dev/stdout, /dev/fd/1, /proc/self/fd/N) are refused before any write', async () => {
    for (const p of ['/dev/stdout', '/dev/stderr', '/dev/fd/1', '/proc/self/fd/1']) {
      const err = await prepareOutputFile(p, '--out').then(() => null, (e: unknown) => e);
      expect(err, p).toMatchObject({ code: 'INVALID_VALUE' });
      // /dev/fd and /proc/self/fd take no new files: their folder's check refuses them first
      if (p === '/dev/stdout' || p === '/dev/stderr') expect(String((err as Error).message), p).toMatch(/a path in \/dev /);
    }
    expect(lstatSync('/dev/stdout').isSymbolicLink()).toBe(true);
    const d = freshDir();
    const fd = openSync(join(d, 'behind-fd.npy'), 'w');
    try {
      const err = await writeNpyFile(`/proc/self/fd/${fd}`, randomTensor()).then(() => null, (e: unknown) => e);
      expect(err).toMatchObject({ code: 'INVALID_VALUE' });
    } finally {
      closeSync(fd);
    }
    expect(readFileSync(join(d, 'behind-fd.npy')).length).toBe(0);
  });

  test("what the writers still replace (the rename's purpose): a regular file and a symlink at the target, each read back as written, the symlink's target untouched", async () => {
    const d = freshDir();
    const outside = join(d, 'outside.txt');
    writeFileSync(outside, 'outside');
    writeFileSync(join(d, 'a.npy'), 'an older file');
    symlinkSync(outside, join(d, 'b.npy'));
    for (const name of ['a.npy', 'b.npy']) {
      const t = randomTensor();
      await writeNpyFile(join(d, name), t);
      expect(kindAt(join(d, name))).toBe('file');
      const back = await readNpyFile(join(d, name));
      expect(Array.from(back.data as Float32Array)).toEqual(Array.from(t.data));
    }
    expect(readFileSync(outside, 'utf8')).toBe('outside');
    const t = randomTensor();
    await writeSafetensorsFile(join(d, 'c.safetensors'), { t });
    expect(Array.from((await readSafetensorsFile(join(d, 'c.safetensors'))).tensors.get('t')!.data as Float32Array)).toEqual(Array.from(t.data));
  });
});

/**
 * `body` (the text of an async function of `lib`, the package's dist/index.js) in a child node process
 * under `ulimit -v <kib>`; its last stdout line parsed.
 */
function underAddressLimit(kib: number, body: string): { status: number | null; stderr: string; result: unknown } {
  const lib = pathToFileURL(fileURLToPath(new URL('../dist/index.js', import.meta.url))).href;
  const script = `import(${JSON.stringify(lib)}).then(async (lib) => { const result = await (async () => { ${body} })(); console.log(JSON.stringify(result)); }).then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });`;
  const r = spawnSync('bash', ['-c', `ulimit -v ${kib} && exec "$0" --input-type=module -e "$1"`, process.execPath, script], { encoding: 'utf8', timeout: 60_000 });
  const lines = (r.stdout ?? '').trim().split('\n');
  let result: unknown;
  try {
    result = JSON.parse(lines[lines.length - 1] ?? '');
  } catch {
    result = undefined;
  }
  return { status: r.status, stderr: r.stderr ?? '', result };
}

/** Whether a 6 GiB address-space limit keeps this machine's node from reserving a wasm32 memory of 4 GiB maximum (V8 reserves its guard region): where it does not, the limit cannot reach the planner. */
const LIMIT_KIB = 6_000_000;
const limitBites = (() => {
  const r = underAddressLimit(LIMIT_KIB, `try { new WebAssembly.Memory({ initial: 1, maximum: 65536 }); return 'reserved'; } catch (e) { return e instanceof RangeError ? 'refused' : String(e); }`);
  return r.result === 'refused';
})();

describe.skipIf(process.platform !== 'linux' || !limitBites)('createPlan where the WebAssembly core cannot be instantiated (session 59, helper-86, by hand: `ulimit -v` while probing the CLI)', () => {
  test('createPlan throws BACKEND_FAILURE naming the host planner, as createEngine({ backend: "wasm" }) rejects, not a RangeError', () => {
    const seqLen = rng.int(2, 40);
    const extendLen = rng.int(1, seqLen + 1);
    const swa = Array.from({ length: Math.min(seqLen, extendLen + 127) }, (_, i) => i);
    const r = underAddressLimit(LIMIT_KIB, `
      const out = {};
      try { lib.createPlan({ requests: [{ seqLen: ${seqLen}, extendLen: ${extendLen}, swaTokenIds: new Int32Array(${JSON.stringify(swa)}) }] }); out.plan = 'made'; }
      catch (e) { out.plan = { name: e.constructor.name, code: e.code ?? null, message: String(e.message) }; }
      try { const e = await lib.createEngine({ backend: 'wasm', workers: 1 }); await e.dispose(); out.wasm = 'made'; }
      catch (e) { out.wasm = { name: e.constructor.name, code: e.code ?? null }; }
      return out;
    `);
    expect(r.status, r.stderr).toBe(0);
    const got = r.result as { plan: { name: string; code: string | null; message: string }; wasm: { name: string; code: string | null } };
    expect(got.wasm).toEqual({ name: 'SparseMlaError', code: 'BACKEND_FAILURE' });
    expect(got.plan).toEqual({ name: 'SparseMlaError', code: 'BACKEND_FAILURE', message: expect.stringMatching(/createPlan: .*host planner.*Out of memory/) });
  });
});
