/**
 * A short, fixed-seed run of the API fuzzer (test/fuzz/) on the `cuda` backend over the stub of the
 * addon's cuda op table (test/fuzz/stub_cuda.mjs; forced with --stub-cuda, so the run is the same on
 * a GPU host): every engine op with host and device operands, prefillLayer's device path (layer
 * programs after warm-up layers), the sharded layer over three stub devices, the memory ops and
 * device-buffer abuse. No value can be judged there; what is: a typed SparseMlaError of a documented
 * code for bad input (none reaching the addon: every params object an op gets is one the addon's
 * binding files accept), shapes and placements, exact bytes through upload / download / copies, no
 * device allocation left behind, no hang. On a GPU: `node test/fuzz/run.mjs --backends cuda`.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';

// fixed, so the suite is the same every run; the count keeps the run near 15 s on 2 cores
const SEED = 20261205;
const CASES = 600;

test(`fuzz: ${CASES} cuda cases on the stub op table, seed ${SEED}: no hard finding`, async () => {
  const { stdout } = await promisify(execFile)(process.execPath, ['test/fuzz/run.mjs', '--seed', String(SEED), '--cases', String(CASES), '--backends', 'cuda', '--stub-cuda', '--json'], { maxBuffer: 64 << 20 }).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }));
  const summary = JSON.parse(stdout.trim().split('\n').pop()!) as { cases: number; cuda: { mode: string }; counts: Record<string, number>; findings: Array<Record<string, unknown>> };
  expect(summary.cuda.mode).toBe('stub');
  const hard = summary.findings.filter((f) => f.severity === 'hard');
  expect(hard, JSON.stringify(hard, null, 1).slice(0, 4000)).toEqual([]);
  expect(summary.cases).toBe(CASES);
  const of = (target: string | null, verdict: string) =>
    Object.entries(summary.counts)
      .filter(([k]) => k.endsWith(` ${verdict}`) && (target === null || k.split(' ')[1] === target))
      .reduce((a, [, v]) => a + v, 0);
  // the mix really ran: judged calls and refusals, the device targets among them
  expect(of(null, 'valid')).toBeGreaterThan(CASES / 20);
  expect(of(null, 'refused')).toBeGreaterThan(CASES / 5);
  for (const target of ['deviceSparsePrefill', 'devicePagedSparseAttention', 'devicePrefillLayer', 'deviceMemory']) {
    expect(of(target, 'valid') + of(target, 'refused'), target).toBeGreaterThan(0);
  }
}, 120_000);
