/**
 * The prefill folder writers (writePrefillDir, writePrefillOutputs) never leave a folder that mixes
 * formats of one tensor: a tensor written as out.npy while outputs.safetensors (or prefill.safetensors)
 * already holds 'out', or the reverse, or a second .safetensors file beside prefill.safetensors, or a
 * meta.json that a reader would take instead of prefill.safetensors' sm_scale. PrefillDir refuses
 * such a folder (or, for meta.json, reads the older scale), so the writer refuses the write before
 * its first file, INVALID_VALUE naming the folder, the folder left as it was; the older files are the
 * user's to remove. A write in the format already there replaces the files as before.
 *
 * The judge is the reader: each write is also made by hand (the file writers, no folder checks) in
 * a copy of the folder, and the write must be taken exactly when PrefillDir reads that copy with every
 * written tensor (and, for inputs, sm_scale) coming from the files written.
 */
import { cpSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { SparseMlaError, tensor } from '../dist/index.js';
import type { SparsePrefillArgs, SparsePrefillResult, Tensor } from '../dist/index.js';
import { PrefillDir, encodeSafetensors, writeNpyFile, writePrefillDir, writePrefillOutputs, writeSafetensorsFile } from '../dist/io/index.js';
import { randomBf16Bits, randomPrefillArgs, testRng } from './helpers/random.js';
import { errorOf } from './helpers/errors.js';
import { tempDirs } from './helpers/temp_dirs.js';

const rng = testRng('io_mixed_folder');
const tempDir = tempDirs('smla-io-mixed-');

function prefill(): { args: SparsePrefillArgs & { dV: number }; outputs: SparsePrefillResult } {
  const sQ = rng.int(1, 4), hQ = rng.int(1, 3), dQK = 16, sKV = rng.int(4, 12), topk = rng.int(1, 4), dV = 8;
  const args = {
    ...randomPrefillArgs(rng, { sQ, hQ, dQK, sKV, topk }),
    attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
    smScale: rng.uniform(),
    dV,
  };
  const outputs = {
    out: tensor('bf16', [sQ, hQ, dV], randomBf16Bits(rng, sQ * hQ * dV)),
    lse: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())),
    maxLogits: tensor('float32', [sQ, hQ], Float32Array.from({ length: sQ * hQ }, () => rng.normal())),
  };
  return { args, outputs };
}

/** Every entry of a folder and its bytes. */
function contents(dir: string): Record<string, string> {
  return Object.fromEntries(readdirSync(dir).sort().map((f) => [f, readFileSync(join(dir, f)).toString('base64')]));
}

/** The tensors a writer writes by the names the folder gives them, and the meta it writes (inputs only). */
function inputTensors(a: SparsePrefillArgs): Record<string, Tensor> {
  return { q: a.q, kv: a.kv, indices: a.indices, ...(a.topkLength ? { topk_length: a.topkLength } : {}), ...(a.attnSink ? { attn_sink: a.attnSink } : {}) };
}
const outputTensors = (o: SparsePrefillResult): Record<string, Tensor> => ({ out: o.out, lse: o.lse, max_logits: o.maxLogits });

interface Writer {
  label: string;
  /** the library's write */
  write: (dir: string, p: ReturnType<typeof prefill>) => Promise<unknown>;
  /** the same files written by hand, with no folder checks; each tensor's name and the file it is read from */
  byHand: (dir: string, p: ReturnType<typeof prefill>) => Promise<{ from: Record<string, string>; meta?: string }>;
}

async function npyByHand(dir: string, tensors: Record<string, Tensor>): Promise<Record<string, string>> {
  for (const [k, t] of Object.entries(tensors)) await writeNpyFile(join(dir, `${k}.npy`), t);
  return Object.fromEntries(Object.keys(tensors).map((k) => [k, `${k}.npy`]));
}

async function stByHand(dir: string, file: string, tensors: Record<string, Tensor>, metadata?: Record<string, string>): Promise<Record<string, string>> {
  await writeSafetensorsFile(join(dir, file), tensors, metadata);
  return Object.fromEntries(Object.keys(tensors).map((k) => [k, `${file}:${k}`]));
}

const metaJson = (a: SparsePrefillArgs & { dV: number }): string => JSON.stringify({ sm_scale: a.smScale, d_v: a.dV }) + '\n';
const stMeta = (a: SparsePrefillArgs & { dV: number }): Record<string, string> => ({ sm_scale: String(a.smScale), d_v: String(a.dV) });

const WRITERS: Writer[] = [
  { label: 'writePrefillOutputs npy', write: (d, p) => writePrefillOutputs(d, p.outputs, 'npy'), byHand: async (d, p) => ({ from: await npyByHand(d, outputTensors(p.outputs)) }) },
  { label: 'writePrefillOutputs safetensors', write: (d, p) => writePrefillOutputs(d, p.outputs, 'safetensors'), byHand: async (d, p) => ({ from: await stByHand(d, 'outputs.safetensors', outputTensors(p.outputs)) }) },
  {
    label: 'writePrefillDir npy',
    write: (d, p) => writePrefillDir(d, p.args),
    byHand: async (d, p) => {
      const from = await npyByHand(d, inputTensors(p.args));
      writeFileSync(join(d, 'meta.json'), metaJson(p.args));
      return { from, meta: 'meta.json' };
    },
  },
  {
    label: 'writePrefillDir npy with outputs',
    write: (d, p) => writePrefillDir(d, p.args, { outputs: p.outputs }),
    byHand: async (d, p) => {
      const from = await npyByHand(d, { ...inputTensors(p.args), ...outputTensors(p.outputs) });
      writeFileSync(join(d, 'meta.json'), metaJson(p.args));
      return { from, meta: 'meta.json' };
    },
  },
  {
    label: 'writePrefillDir safetensors',
    write: (d, p) => writePrefillDir(d, p.args, { format: 'safetensors' }),
    byHand: async (d, p) => ({ from: await stByHand(d, 'prefill.safetensors', inputTensors(p.args), stMeta(p.args)), meta: 'prefill.safetensors:__metadata__' }),
  },
  {
    label: 'writePrefillDir safetensors with outputs',
    write: (d, p) => writePrefillDir(d, p.args, { format: 'safetensors', outputs: p.outputs }),
    byHand: async (d, p) => ({ from: await stByHand(d, 'prefill.safetensors', { ...inputTensors(p.args), ...outputTensors(p.outputs) }, stMeta(p.args)), meta: 'prefill.safetensors:__metadata__' }),
  },
];

/** Folders as earlier writes (or a user) left them, each one PrefillDir opens. */
const OLDER: [string, (dir: string) => Promise<void>][] = [
  ['empty', async () => {}],
  ['npy inputs', async (d) => void (await writePrefillDir(d, prefill().args))],
  ['npy inputs and outputs', async (d) => { const p = prefill(); await writePrefillDir(d, p.args, { outputs: p.outputs }); }],
  ['npy outputs only', async (d) => void (await writePrefillOutputs(d, prefill().outputs))],
  ['only lse.npy', async (d) => void (await writeNpyFile(join(d, 'lse.npy'), prefill().outputs.lse))],
  ['prefill.safetensors', async (d) => void (await writePrefillDir(d, prefill().args, { format: 'safetensors' }))],
  ['prefill.safetensors with outputs', async (d) => { const p = prefill(); await writePrefillDir(d, p.args, { format: 'safetensors', outputs: p.outputs }); }],
  ['npy inputs and outputs.safetensors', async (d) => { const p = prefill(); await writePrefillDir(d, p.args); await writePrefillOutputs(d, p.outputs, 'safetensors'); }],
  ['prefill.safetensors and outputs.safetensors', async (d) => { const p = prefill(); await writePrefillDir(d, p.args, { format: 'safetensors' }); await writePrefillOutputs(d, p.outputs, 'safetensors'); }],
  ['meta.json alone (another sm_scale)', async (d) => writeFileSync(join(d, 'meta.json'), JSON.stringify({ sm_scale: 2, d_v: 8 }))],
  ['model.safetensors holding other names', async (d) => writeFileSync(join(d, 'model.safetensors'), encodeSafetensors({ w: tensor('float32', [3], Float32Array.from([1, 2, 3])) }))],
  ['dump.safetensors holding out', async (d) => writeFileSync(join(d, 'dump.safetensors'), encodeSafetensors(outputTensors(prefill().outputs)))],
  ['outputs.safetensors with an sm_scale', async (d) => writeFileSync(join(d, 'outputs.safetensors'), encodeSafetensors({ extra: tensor('int32', [1], Int32Array.from([7])) }, { sm_scale: '1' }))],
];

/** Whether the reader reads `dir` with every written tensor (and the meta) from the files written. */
async function readsAsWritten(dir: string, written: { from: Record<string, string>; meta?: string }): Promise<boolean> {
  try {
    const d = await PrefillDir.open(dir);
    for (const [name, file] of Object.entries(written.from)) if ((await d.get(name))?.file !== file) return false;
    if (written.meta !== undefined && (await d.meta()).file !== written.meta) return false;
    return true;
  } catch (e) {
    if (e instanceof SparseMlaError) return false;
    throw e;
  }
}

describe('the writers leave no folder that mixes formats of a tensor', () => {
  test('every writer over every older folder: taken exactly when the folder reads back as written, refused otherwise with the folder as it was', async () => {
    const verdicts: string[] = [];
    for (const [olderLabel, makeOlder] of OLDER) {
      for (const w of WRITERS) {
        const label = `${w.label} over ${olderLabel}`;
        const dir = join(tempDir(), 'd');
        mkdirSync(dir);
        await makeOlder(dir);
        expect(await errorOf(() => PrefillDir.open(dir)), `${label}: the older folder opens`).toBeUndefined();
        const p = prefill();
        const copy = join(tempDir(), 'copy');
        cpSync(dir, copy, { recursive: true });
        const written = await w.byHand(copy, p);
        const ok = await readsAsWritten(copy, written);
        const before = contents(dir);
        const e = await errorOf(() => w.write(dir, p));
        if (ok) {
          expect(e, `${label}: ${(e as Error | undefined)?.message}`).toBeUndefined();
          expect(contents(dir), label).toEqual(contents(copy));
        } else {
          expect(e, label).toBeInstanceOf(SparseMlaError);
          expect([(e as SparseMlaError).code, (e as SparseMlaError).argument], label).toEqual(['INVALID_VALUE', dir]);
          expect((e as SparseMlaError).message, label).toContain(`${dir}: files already there would clash with the ones written (`);
          expect(contents(dir), label).toEqual(before);
        }
        verdicts.push(`${label}: ${ok ? 'written' : 'refused'}`);
      }
    }
    // both kinds occur, and the cases the brief names are refused
    expect(verdicts).toContain('writePrefillOutputs safetensors over npy inputs and outputs: refused');
    expect(verdicts).toContain('writePrefillOutputs npy over npy inputs and outputs.safetensors: refused');
    expect(verdicts).toContain('writePrefillOutputs npy over npy inputs and outputs: written');
    expect(verdicts).toContain('writePrefillOutputs safetensors over prefill.safetensors with outputs: refused');
    expect(verdicts).toContain('writePrefillDir safetensors over meta.json alone (another sm_scale): refused');
    expect(verdicts).toContain('writePrefillDir npy over prefill.safetensors: refused');
    expect(verdicts).toContain('writePrefillDir safetensors with outputs over prefill.safetensors with outputs: written');
  });

  test('the message names each clash: the older file, and the one that would be written', async () => {
    const dir = tempDir();
    const p = prefill();
    await writePrefillDir(dir, p.args, { outputs: p.outputs });
    const e = (await errorOf(() => writePrefillOutputs(dir, prefill().outputs, 'safetensors'))) as SparseMlaError;
    expect(e.message).toBe(
      `writePrefillOutputs: ${dir}: files already there would clash with the ones written ('lse' is in lse.npy and would be in outputs.safetensors; ` +
        `'max_logits' is in max_logits.npy and would be in outputs.safetensors; 'out' is in out.npy and would be in outputs.safetensors), ` +
        'a folder a reader refuses or misreads: remove the older files first, or write the format they are in',
    );
    const e2 = (await errorOf(() => writePrefillDir(dir, p.args, { format: 'safetensors' }))) as SparseMlaError;
    expect(e2.message).toContain("'attn_sink' is in attn_sink.npy and would be in prefill.safetensors");
    expect(e2.message).toContain('; and 1 more), ');
  });

  test('a neighbour that cannot be read as .safetensors (garbled, a directory) is left to the reader: the write goes ahead and leaves it as it was', async () => {
    const dir = tempDir();
    writeFileSync(join(dir, 'junk.safetensors'), 'not a safetensors file');
    mkdirSync(join(dir, 'sub.safetensors'));
    const p = prefill();
    await writePrefillOutputs(dir, p.outputs, 'npy');
    expect(readdirSync(dir).sort()).toEqual(['junk.safetensors', 'lse.npy', 'max_logits.npy', 'out.npy', 'sub.safetensors']);
    expect(readFileSync(join(dir, 'junk.safetensors'), 'utf8')).toBe('not a safetensors file');
  });
});
