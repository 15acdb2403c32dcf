/**
 * What the regression tests of the API fuzzer's findings (test/*_findings.test.ts) share: the
 * engines they run their calls on, a typed refusal's check, a fuzzer case replayed by its
 * reproducer, a folder's files as an older library wrote them, and hostile values several of them use.
 */
import { copyFileSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import { createEngine } from '../../dist/index.js';
import type { Engine } from '../../dist/index.js';
import { nativeAddonBuilt } from './backends.js';
import { refusal } from './errors.js';

export const addonBuilt = nativeAddonBuilt();

/**
 * A wasm engine (2 workers) and, where the addon is built, a cpu engine, created before the tests of
 * the file that asks (call it at a file's top level) and disposed after them.
 */
export function hostEngines(): Engine[] {
  const engines: Engine[] = [];
  beforeAll(async () => {
    engines.push(await createEngine({ backend: 'wasm', workers: 2 }));
    if (addonBuilt) engines.push(await createEngine({ backend: 'cpu' }));
  });
  afterAll(async () => {
    for (const e of engines) await e.dispose();
  });
  return engines;
}

/** A fuzzer case replayed by its reproducer (`node test/fuzz/run.mjs … --case N`): its verdict as the runner prints it. */
export async function replayFuzzCase(backendArgs: readonly string[], seed: number, index: number): Promise<{ target: string; muts: { desc: string }[]; verdict: string; finding?: unknown }> {
  const { execFile } = await import('node:child_process');
  const { promisify } = await import('node:util');
  const { stdout } = await promisify(execFile)(process.execPath, ['test/fuzz/run.mjs', ...backendArgs, '--seed', String(seed), '--case', String(index)], { maxBuffer: 16 << 20 });
  // the case's JSON starts a line of its own (a cuda replay prints its device line first)
  const at = stdout.indexOf('\n{');
  return JSON.parse(at === -1 ? stdout.slice(stdout.indexOf('{')) : stdout.slice(at + 1));
}

/**
 * A folder's files as an older library wrote them, beside those already there (the writers refuse a
 * folder mixing formats of one tensor since 93b65ad): `write` into a folder of its own, its files copied into `dir`.
 */
export async function writtenBeside(dir: string, write: (d: string) => Promise<unknown>): Promise<void> {
  const own = mkdtempSync(join(tmpdir(), 'sparse-mla-findings-beside-'));
  try {
    await write(own);
    for (const f of readdirSync(own)) copyFileSync(join(own, f), join(dir, f));
  } finally {
    rmSync(own, { recursive: true, force: true });
  }
}

/** The call refuses with a SparseMlaError of `code` (and naming `argument`, where given). */
export async function expectTyped(call: () => unknown, code: string, argument?: string): Promise<void> {
  const e = await refusal(call);
  expect(e.code).toBe(code);
  if (argument !== undefined) expect(e.argument).toBe(argument);
}

/** Dims String() cannot print: a null-prototype object (TypeError) and one whose toString / valueOf throw (the caller's error). */
export const unprintable = (): unknown[] => [
  Object.create(null),
  {
    toString(): string {
      throw new Error('toString ran');
    },
    valueOf(): number {
      throw new Error('valueOf ran');
    },
  },
];

/** A Proxy of a copy of `list` whose length answers one less from its second read on (the fuzzer's lengthChangingProxy). */
export function shrinkingAfterFirstRead<T>(list: readonly T[]): T[] {
  let reads = 0;
  return new Proxy(list.slice(), {
    get(t, k, r) {
      if (k === 'length' && reads++ > 0) return t.length - 1;
      return Reflect.get(t, k, r);
    },
  });
}
