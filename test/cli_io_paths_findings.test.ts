/**
 * What the API fuzzer's cliCommand target found in the CLI and the io functions under hostile paths
 * and folders (an empty path, a file path naming a directory, sizes past one tensor, a tensor in two
 * files of one folder), one focused case each: every one wrote where it should not, or failed with an
 * internal error, before its fix. Moved from test/fuzz_findings.test.ts.
 */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { SparseMlaError, tensor } from '../dist/index.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { errorOf } from './helpers/errors.js';
import { expectTyped, writtenBeside } from './helpers/findings.js';

const rng = testRng('cli_io_paths_findings');

describe('the CLI and the io writers under hostile paths and folders, the fuzzer\'s cliCommand target (session 56, helper-72)', () => {
  const MAIN = join(process.cwd(), 'dist/cli/main.js');
  const folders: string[] = [];
  afterAll(() => {
    for (const d of folders) rmSync(d, { recursive: true, force: true });
  });
  const folder = (): string => {
    const d = mkdtempSync(join(tmpdir(), 'sparse-mla-findings-56-'));
    folders.push(d);
    return d;
  };
  /** A valid prefill's inputs (dQK 64, dV 64) as writePrefillDir takes them, and outputs of their shapes. */
  const prefill = () => {
    const sQ = rng.int(1, 4), hQ = rng.int(1, 4), sKV = rng.int(1, 9), topk = rng.int(1, 5);
    const args = { ...randomPrefillArgs(rng, { sQ, hQ, dQK: 64, sKV, topk }), dV: 64 };
    const outputs = { out: tensor('bf16', [sQ, hQ, 64], randomBf16Bits(rng, sQ * hQ * 64)), lse: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())), maxLogits: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())) };
    return { args, outputs };
  };
  /** `call` run with `cwd` as the working directory (this file's fork may change it). */
  async function inDir<T>(cwd: string, call: () => Promise<T>): Promise<T> {
    const back = process.cwd();
    process.chdir(cwd);
    try {
      return await call();
    } finally {
      process.chdir(back);
    }
  }
  const cli = async (cwd: string, args: string[]) => {
    const { spawnSync } = await import('node:child_process');
    const r = spawnSync(process.execPath, [MAIN, ...args], { cwd, encoding: 'utf8', timeout: 60_000, env: { ...process.env, SPARSE_MLA_BACKEND: 'wasm' } });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  test("an empty path names no file or folder: writePrefillDir / writePrefillOutputs / writeNpyFile / writeSafetensorsFile('') are INVALID_VALUE with the working directory as it was (path.resolve('') is the working directory: they wrote their files there); the readers' refusal says so too", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs } = prefill();
    const cwd = folder();
    const writers: [string, () => Promise<unknown>][] = [
      ['dir', () => io.writePrefillDir('', args)],
      ['dir', () => io.writePrefillDir('', args, { format: 'safetensors', outputs })],
      ['dir', () => io.writePrefillOutputs('', outputs)],
      ['dir', () => io.writePrefillOutputs('', outputs, 'safetensors')],
      ['path', () => io.writeNpyFile('', args.q)],
      ['path', () => io.writeSafetensorsFile('', { q: args.q })],
    ];
    for (const [argument, write] of writers) {
      const e = await inDir(cwd, () => errorOf(write));
      expect(e, String(write)).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument, (e as SparseMlaError).message]).toEqual(['INVALID_VALUE', argument, `${argument}: expected ${argument === 'dir' ? 'a directory path' : 'a file path'}, got an empty string`]);
      expect(readdirSync(cwd), String(write)).toEqual([]);
    }
    for (const [argument, read] of [['dir', () => io.loadPrefillInputs('')], ['dir', () => io.PrefillDir.open('')], ['path', () => io.readNpyFile('')], ['path', () => io.readSafetensorsFile('')]] as const) {
      const e = await inDir(cwd, () => errorOf(read));
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument]).toEqual(['INVALID_VALUE', argument]);
      expect((e as SparseMlaError).message).toContain('got an empty string');
    }
  });

  test("`sparse-mla prefill D --out ''` is exit 2 naming --out before its engine starts (it wrote out.npy, lse.npy and max_logits.npy into the working directory and said 'wrote … to '); `sparse-mla bench --out ''` is exit 2 before its measurements (it skipped the file and said nothing)", async () => {
    const io = await import('../dist/io/index.js');
    const { args } = prefill();
    const input = join(folder(), 'in');
    await io.writePrefillDir(input, args);
    const cwd = folder();
    const r = await cli(cwd, ['prefill', input, '--out', '', '--workers', '1']);
    expect([r.code, r.stderr.trim()]).toEqual([2, "sparse-mla prefill: --out: expected a directory path, got an empty string [INVALID_VALUE]"]);
    expect(readdirSync(cwd)).toEqual([]);
    const b = await cli(cwd, ['bench', '--out', '', '--queries', '1', '--heads', '1', '--topk', '1', '--context', '0', '--dequant-tokens', '1', '--repeat', '1', '--warmup', '0', '--workers', '1', '-q']);
    expect([b.code, b.stderr.trim(), b.stdout]).toEqual([2, 'sparse-mla bench: --out: expected a file path, got an empty string [INVALID_VALUE]', '']);
    expect(readdirSync(cwd)).toEqual([]);
  });

  test("a file path that names a directory ('x.npy/', 'x.npy/.', 'x/..') is INVALID_VALUE for writeNpyFile / writeSafetensorsFile and `bench --out`, nothing written (path.resolve drops the trailing part: they wrote a file 'x.npy' that readNpyFile('x.npy/') refuses with ENOTDIR, where the system refuses to create one: EISDIR)", async () => {
    const io = await import('../dist/io/index.js');
    const { args } = prefill();
    const cwd = folder();
    const { mkdirSync } = await import('node:fs');
    mkdirSync(join(cwd, 'sub'));
    for (const given of ['x.npy/', 'x.npy/.', 'x.npy/./', 'sub/..', 'sub/x.npy/']) {
      // (not path.join: it would normalize 'x.npy/.' away)
      const path = `${cwd}/${given}`;
      for (const write of [() => io.writeNpyFile(path, args.q), () => io.writeSafetensorsFile(path, { q: args.q })]) {
        const e = await errorOf(write);
        expect(e, given).toBeInstanceOf(SparseMlaError);
        expect([(e as SparseMlaError).code, (e as SparseMlaError).argument]).toEqual(['INVALID_VALUE', path]);
        expect((e as SparseMlaError).message).toContain('expected a file path, got a path that names a directory');
      }
    }
    expect(readdirSync(cwd)).toEqual(['sub']);
    expect(readdirSync(join(cwd, 'sub'))).toEqual([]);
    const b = await cli(cwd, ['bench', '--out', 'report.json/', '--queries', '1', '--heads', '1', '--topk', '1', '--context', '0', '--dequant-tokens', '1', '--repeat', '1', '--warmup', '0', '--workers', '1', '-q']);
    expect([b.code, b.stderr.trim()]).toEqual([2, "sparse-mla bench: --out: expected a file path, got a path that names a directory ('report.json/') [INVALID_VALUE]"]);
    expect(readdirSync(cwd)).toEqual(['sub']);
  });

  test('`sparse-mla run` / `bench` sizes past one tensor (--context, --topk, --max-context, --dequant-tokens) are exit 2 TOO_LARGE naming the option before any engine starts (they were an internal error with a RangeError stack from the chunk generator, exit 1; sizes just under 2^32 elements filled gigabytes for minutes)', async () => {
    const cwd = folder();
    const small = ['--heads', '1', '--workers', '1', '--backend', 'wasm'];
    const cases: [string[], string][] = [
      [['run', '--section', 'prefill', '--queries', '1', '--topk', '1', '--context', '1000000000000', ...small], 'context'],
      [['run', '--section', 'prefill', '--queries', '1', '--topk', '1', '--context', '100000000', ...small], 'context'],
      [['run', '--section', 'prefill', '--queries', '3', '--topk', '2147483648', '--context', '0', ...small], 'topk'],
      [['run', '--layers', '4', '--requests', '1', '--chunk-tokens', '1', '--max-context', '1000000000000', ...small], 'max-context'],
      [['run', '--section', 'layers', '--layers', '4,0', '--requests', '2', '--chunk-tokens', '3', '--topk', '2147483648', ...small], 'topk'],
      [['bench', '--queries', '1', '--topk', '1', '--context', '0', '--dequant-tokens', '10000000000000', '--repeat', '1', '--warmup', '0', ...small], 'dequant-tokens'],
    ];
    for (const [args, option] of cases) {
      const r = await cli(cwd, args);
      expect([r.code, r.stderr.split('\n').filter((l) => l !== '').length], args.join(' ')).toEqual([2, 1]);
      expect(r.stderr, args.join(' ')).toMatch(new RegExp(`^sparse-mla (run|bench): .*--${option}.* \\[TOO_LARGE\\]\\n$`));
      expect(r.stderr).not.toContain('engine');
    }
  });

  test("a tensor both a .npy file and in a .safetensors file of one folder is INVALID_VALUE naming the folder and both files (the reader took the .npy silently: after `prefill D --out D` then `prefill D --out D --format safetensors`, `verify D` judged the older out.npy, not the outputs just written)", async () => {
    const io = await import('../dist/io/index.js');
    const { args, outputs } = prefill();
    const other = { out: tensor('bf16', outputs.out.shape, randomBf16Bits(rng, outputs.out.data.length)), lse: outputs.lse, maxLogits: outputs.maxLogits };
    const dir = folder();
    await io.writePrefillDir(dir, args);
    await io.writePrefillOutputs(dir, outputs, 'npy');
    // (the writers refuse to make such a folder since 93b65ad: the second run's file copied in, as an older library wrote it)
    await expectTyped(() => io.writePrefillOutputs(dir, other, 'safetensors'), 'INVALID_VALUE', dir);
    await writtenBeside(dir, (d) => io.writePrefillOutputs(d, other, 'safetensors'));
    const shapes = { sQ: args.q.shape[0]!, hQ: args.q.shape[1]!, dV: 64 };
    for (const call of [() => io.loadPrefillOutputs(dir, shapes), () => io.loadPrefillInputs(dir), () => io.PrefillDir.open(dir)]) {
      const e = await errorOf(call);
      expect(e).toBeInstanceOf(SparseMlaError);
      expect([(e as SparseMlaError).code, (e as SparseMlaError).argument]).toEqual(['INVALID_VALUE', dir]);
      expect((e as SparseMlaError).message).toMatch(/tensor '(out|lse|max_logits)' is in both \1\.npy and outputs\.safetensors/);
    }
    const r = await cli(dir, ['verify', dir, '-q']);
    expect([r.code, r.stderr]).toEqual([2, expect.stringMatching(/^sparse-mla verify: .*tensor '(out|lse|max_logits)' is in both \1\.npy and outputs\.safetensors \[INVALID_VALUE\]\n$/)]);
    // the inputs likewise: q.npy beside a prefill.safetensors holding q
    const inputs = folder();
    await io.writePrefillDir(inputs, args);
    await expectTyped(() => io.writePrefillDir(inputs, args, { format: 'safetensors' }), 'INVALID_VALUE', inputs);
    await writtenBeside(inputs, (d) => io.writePrefillDir(d, args, { format: 'safetensors' }));
    const e = await errorOf(() => io.loadPrefillInputs(inputs));
    expect([(e as SparseMlaError).code, (e as SparseMlaError).argument]).toEqual(['INVALID_VALUE', inputs]);
    expect((e as SparseMlaError).message).toMatch(/tensor '(q|kv|indices|attn_sink)' is in both \1\.npy and prefill\.safetensors/);
  });
});
