/**
 * `sparse-mla verify` and `sparse-mla prefill`: verify passes on outputs the engine produced, fails
 * (exit 1) on outputs perturbed beyond the §4 bounds (elementwise, inf placement, cosine), and
 * exits 2 on bad input; .npy and .safetensors directories. Also the reference worker pool.
 */
import { spawnSync } from 'node:child_process';
import { rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { createEngine, tensor } from '../dist/index.js';
import type { Engine, SparsePrefillArgs, SparsePrefillResult } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { createReferencePool } from '../dist/reference/parallel.js';
import { writeNpyFile, writePrefillDir, writePrefillOutputs } from '../dist/io/index.js';
import { command as verify, verifyDirectory } from '../dist/cli/commands/verify.js';
import { runCliCommand } from '../dist/cli/command.js';
import { command as prefill } from '../dist/cli/commands/prefill.js';
import { refusal } from './helpers/errors.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';
import { tempDirs } from './helpers/temp_dirs.js';

const rng = testRng('verify.test');
const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));
const tempDir = tempDirs('smla-verify-');

let engine: Engine;
const sQ = 24, hQ = 16, dQK = 576, sKV = 400, topk = 128;
let args: SparsePrefillArgs;
let result: SparsePrefillResult;
let ref: ReturnType<typeof R.sparsePrefillReference>;

beforeAll(async () => {
  engine = await createEngine();
  const lengths = Int32Array.from({ length: sQ }, () => rng.int(1, topk + 1));
  lengths[3] = 0; // an empty row: lse +inf, maxLogits -inf
  args = {
    ...randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }, { invalidFraction: 0.1 }),
    topkLength: tensor('int32', [sQ], lengths),
    attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
    dV: 512,
  };
  result = await engine.sparsePrefill(args);
  ref = R.sparsePrefillReference(args);
}, 60_000);
afterAll(async () => {
  await engine?.dispose();
});

/** Run a CLI command in-process as main.ts runs it (errors become exit codes), capturing stdout and stderr. */
async function runCommand(cmd: typeof verify, argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '', stderr = '';
  const o = vi.spyOn(process.stdout, 'write').mockImplementation((s: string | Uint8Array) => ((stdout += String(s)), true));
  const e = vi.spyOn(process.stderr, 'write').mockImplementation((s: string | Uint8Array) => ((stderr += String(s)), true));
  try {
    return { code: await runCliCommand(cmd.name, cmd, argv), stdout, stderr };
  } finally {
    o.mockRestore();
    e.mockRestore();
  }
}

async function goodDir(format: 'npy' | 'safetensors' = 'npy'): Promise<string> {
  const dir = await tempDir();
  await writePrefillDir(dir, args, { format, outputs: format === 'safetensors' ? result : undefined });
  if (format === 'npy') await writePrefillOutputs(dir, result);
  return dir;
}

/** A .npy file with a hand-written header (to make the ones this library refuses to write). */
function rawNpy(header: string, dataBytes: number): Uint8Array {
  const text = header.padEnd(117) + '\n';
  const out = new Uint8Array(10 + text.length + dataBytes);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, text.length & 0xff, text.length >> 8]);
  for (let i = 0; i < text.length; i++) out[10 + i] = text.charCodeAt(i);
  return out;
}

/** out with element `at` replaced by a bf16 value. */
function outWith(changes: [number, number][]): SparsePrefillResult {
  const data = result.out.data.slice();
  for (const [at, v] of changes) data[at] = R.encodeBf16(v);
  return { ...result, out: tensor('bf16', result.out.shape, data) };
}

describe('verify', () => {
  test('passes on the engine outputs (npy), with a per-tensor report', async () => {
    const dir = await goodDir();
    const r = await runCommand(verify, [dir, '-q']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^out\s.*\s0\/196608\s/m);
    expect(r.stdout).toMatch(/^lse\s.*\s0\/384\s/m);
    expect(r.stdout).toMatch(/^max_logits\s.*\s0\/384\s/m);
    expect(r.stdout).toMatch(/PASS/);
  });

  test('passes on one .safetensors file with inputs and outputs (real BF16)', async () => {
    const dir = await goodDir('safetensors');
    const r = await runCommand(verify, [dir, '-q', '--json']);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.pass).toBe(true);
    expect(report.tensors.map((t: { file: string }) => t.file)).toEqual(['prefill.safetensors:out', 'prefill.safetensors:lse', 'prefill.safetensors:max_logits']);
  });

  test('--sample judges only the sampled queries', async () => {
    const dir = await goodDir();
    const r = await runCommand(verify, [dir, '-q', '--json', '--sample', '3']);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.queriesChecked).toBe(3);
    expect(report.tensors[0].comparison.count).toBe(3 * hQ * 512);
  });

  test('verifyDirectory queries: each row judged once; anything but an integer in [0, sQ) is INVALID_VALUE naming queries', async () => {
    const dir = await goodDir();
    const report = await verifyDirectory(dir, { queries: [7, 3, 7, 0] });
    expect(report.queriesChecked).toBe(3);
    expect(report.tensors[0]!.comparison.count).toBe(3 * hQ * 512);
    const bad: [unknown, string][] = [
      [Symbol('q'), 'Symbol(q)'],
      [sQ, String(sQ)],
      [-1, '-1'],
      [1.5, '1.5'],
      [NaN, 'NaN'],
      ['3', '3'],
    ];
    for (const [q, shown] of bad) {
      const e = await refusal(() => verifyDirectory(dir, { queries: [0, q as number] }));
      expect([e.code, e.argument, e.message]).toEqual(['INVALID_VALUE', 'queries', `queries: expected integers in [0, ${sQ}), got ${shown}`]);
    }
  });

  test('fails (exit 1) on one out element beyond its bound, and names where', async () => {
    const i = 5, h = 7, d = 300;
    const at = (i * hQ + h) * 512 + d;
    const want = ref.out[at]!;
    const dir = await tempDir();
    await writePrefillDir(dir, args, { outputs: outWith([[at, want + 0.01 + 0.05 * Math.abs(want)]]) });
    const r = await runCommand(verify, [dir, '-q']);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^out\s.*\s1\/196608\s.*\[q 5, h 7, c 300\].*FAIL$/m);
    expect(r.stdout).toMatch(/^lse\s.*pass$/m);
  });

  test('fails on lse off by 1e-3, on a finite lse where +inf belongs, and on maxLogits sign of an inf', async () => {
    const cases: [string, (o: SparsePrefillResult) => void][] = [
      ['lse', (o) => { o.lse.data[2 * hQ + 1]! += 1e-3; }],
      ['lse', (o) => { o.lse.data[3 * hQ] = 5; }],
      ['max_logits', (o) => { o.maxLogits.data[3 * hQ + 2] = Infinity; }],
    ];
    for (const [name, mutate] of cases) {
      const o: SparsePrefillResult = { out: result.out, lse: tensor('float32', result.lse.shape, result.lse.data.slice()), maxLogits: tensor('float32', result.maxLogits.shape, result.maxLogits.data.slice()) };
      mutate(o);
      const dir = await tempDir();
      await writePrefillDir(dir, args, { outputs: o });
      const r = await runCommand(verify, [dir, '-q']);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(new RegExp(`^${name}\\s.*FAIL$`, 'm'));
    }
  });

  test('fails on cosine alone: every element off by ±0.9 of its bound (float32 out.npy) passes elementwise but not 1 - cos ≤ 7e-6', async () => {
    const noisy = Float32Array.from(ref.out, (v, k) => v + (k % 2 ? 0.9 : -0.9) * R.outBound(ref.mag[k]!));
    const dir = await tempDir();
    await writePrefillDir(dir, args);
    await writePrefillOutputs(dir, result);
    await writeNpyFile(join(dir, 'out.npy'), tensor('float32', result.out.shape, noisy));
    const r = await runCommand(verify, [dir, '-q', '--json']);
    expect(r.code).toBe(1);
    const out = JSON.parse(r.stdout).tensors[0].comparison;
    expect(out.overBound).toBe(0);
    expect(out.worstRatio).toBeLessThan(1);
    expect(out.worstRatio).toBeGreaterThan(0.85);
    expect(out.cosineGap).toBeGreaterThan(R.OUT_COSINE_GAP_BOUND);
  });

  test('exit 2 on bad input, with the file named', async () => {
    const cases: [string, (dir: string) => Promise<unknown>, RegExp][] = [
      ['missing kv', (d) => rm(join(d, 'kv.npy')), /kv\.npy/],
      ['missing out', (d) => rm(join(d, 'out.npy')), /out\.npy/],
      ['garbled meta', (d) => writeFile(join(d, 'meta.json'), '{sm_scale'), /meta\.json/],
      ['wrong out shape', (d) => writeNpyFile(join(d, 'out.npy'), tensor('bf16', [sQ, hQ, 448])), /out\.npy/],
      ['float64 lse', (d) => writeFile(join(d, 'lse.npy'), rawNpy("{'descr': '<f8', 'fortran_order': False, 'shape': (24, 16), }", 24 * 16 * 8)), /lse\.npy/],
      ['fortran q', (d) => writeFile(join(d, 'q.npy'), rawNpy(`{'descr': '<u2', 'fortran_order': True, 'shape': (${sQ}, ${hQ}, ${dQK}), }`, sQ * hQ * dQK * 2)), /q\.npy/],
      ['truncated kv', (d) => writeFile(join(d, 'kv.npy'), rawNpy(`{'descr': '<u2', 'fortran_order': False, 'shape': (${sKV}, ${dQK}), }`, 100)), /kv\.npy/],
    ];
    for (const [label, mutate, file] of cases) {
      const dir = await goodDir();
      await mutate(dir);
      const r = await runCommand(verify, [dir, '-q']);
      expect({ label, code: r.code }).toEqual({ label, code: 2 });
      expect(r.stderr).toMatch(file);
    }
    expect((await runCommand(verify, ['-q'])).code).toBe(2);
    expect((await runCommand(verify, [join(tmpdir(), 'no-such-dir-smla')])).code).toBe(2);
    expect((await runCommand(verify, ['a', 'b'])).code).toBe(2);
  });

  test('through the real CLI (node dist/cli/main.js): exit codes 0, 1, 2', async () => {
    const good = await goodDir();
    const bad = await tempDir();
    const at = 100;
    await writePrefillDir(bad, args, { outputs: outWith([[at, ref.out[at]! + 1]]) });
    const missing = await goodDir();
    await rm(join(missing, 'indices.npy'));
    const run = (dir: string) => spawnSync(process.execPath, [MAIN, 'verify', dir, '--quiet'], { encoding: 'utf8' });
    expect(run(good).status).toBe(0);
    expect(run(bad).status).toBe(1);
    const m = run(missing);
    expect(m.status).toBe(2);
    expect(m.stderr).toMatch(/indices\.npy/);
  }, 60_000);

  test('the reference worker pool gives exactly the single-thread reference; verify on 2 threads passes', async () => {
    const pool = await createReferencePool(args, 2);
    try {
      const [a, b] = await Promise.all([pool.run([0, 3, 7]), pool.run([23, 1])]);
      const single = R.sparsePrefillReference(args, { queries: [0, 3, 7, 23, 1] });
      expect(Array.from(a.out)).toEqual(Array.from(single.out.subarray(0, 3 * hQ * 512)));
      expect(Array.from(b.lse)).toEqual(Array.from(single.lse.subarray(3 * hQ)));
    } finally {
      await pool.close();
    }
    const report = await verifyDirectory(await goodDir(), { workers: 2 });
    expect(report.pass).toBe(true);
    expect(report.tensors[0]!.comparison.count).toBe(sQ * hQ * 512);
  }, 60_000);
});

describe('prefill command', () => {
  test('runs the engine on a directory (npy and safetensors inputs) and its outputs verify', async () => {
    for (const format of ['npy', 'safetensors'] as const) {
      const dir = await tempDir();
      await writePrefillDir(dir, args, { format });
      const r = await runCommand(prefill, [dir, '--out', dir, '-q']);
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/wrote out\.npy, lse\.npy, max_logits\.npy/);
      expect((await runCommand(verify, [dir, '-q'])).code).toBe(0);
    }
    const dir = await tempDir();
    await writePrefillDir(dir, args);
    const outDir = join(dir, 'outputs');
    const r = await runCommand(prefill, [dir, '--out', outDir, '--format', 'safetensors', '-q']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/outputs\.safetensors/);
  }, 60_000);

  test('bad input is a typed error before the engine starts', async () => {
    const dir = await tempDir();
    await writePrefillDir(dir, args);
    await rm(join(dir, 'q.npy'));
    await expect(prefill.run([dir, '--out', dir, '-q'])).rejects.toThrow(expect.objectContaining({ code: 'INVALID_VALUE' }));
    await expect(prefill.run([dir, '-q'])).rejects.toThrow(/--out/);
    const r = spawnSync(process.execPath, [MAIN, 'prefill', dir, '--out', dir, '--quiet'], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/q\.npy/);
  }, 60_000);
});
