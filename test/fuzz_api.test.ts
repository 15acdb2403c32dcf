/**
 * A short, fixed-seed run of the API fuzzer (test/fuzz/): random valid calls of every public entry
 * point, each mutated in one or two places, on the wasm engine and (when the addon is built) the
 * cpu engine, each backend in its own child process. Every call must resolve within SPEC §4.1's
 * bounds of the float64 reference, or be refused with a SparseMlaError of a documented code,
 * without writing its inputs. Longer runs by hand: `node test/fuzz/run.mjs --seconds 600`.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';

const addonBuilt = existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || 'build/addon/Release/sparse_mla_native.node');
const backends = addonBuilt ? 'cpu,wasm' : 'wasm';
// fixed, so the suite is the same every run (new seeds are the long run's business); the case count
// keeps both backends together near 25 s on 2 cores
const SEED = 20261205;
const CASES = addonBuilt ? 400 : 650;

test(`fuzz: ${CASES} cases per backend (${backends}), seed ${SEED}: no finding`, async () => {
  const { stdout } = await promisify(execFile)(process.execPath, ['test/fuzz/run.mjs', '--seed', String(SEED), '--cases', String(CASES), '--backends', backends, '--json'], { maxBuffer: 64 << 20 }).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }));
  const summary = JSON.parse(stdout.trim().split('\n').pop()!) as { cases: number; counts: Record<string, number>; findings: Array<Record<string, unknown>> };
  const hard = summary.findings.filter((f) => f.severity === 'hard');
  expect(hard, JSON.stringify(hard, null, 1).slice(0, 4000)).toEqual([]);
  expect(summary.cases).toBe(CASES * backends.split(',').length);
  // the mix really ran: valid calls judged against the reference and refusals, on every backend
  for (const b of backends.split(',')) {
    const of = (verdict: string) => Object.entries(summary.counts).filter(([k]) => k.startsWith(`${b} `) && k.endsWith(` ${verdict}`)).reduce((a, [, v]) => a + v, 0);
    expect(of('valid'), `${b} valid`).toBeGreaterThan(CASES / 20);
    expect(of('refused'), `${b} refused`).toBeGreaterThan(CASES / 5);
  }
}, 120_000);
