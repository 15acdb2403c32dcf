/**
 * The native core's x86-64 SIMD paths and SPARSE_MLA_CPU_ISA (cpp/src/isa_dispatch.h): 'auto' (or
 * unset, or any other value) takes the widest path the CPU has, 'avx512' AVX-512 without the
 * AVX512_BF16 dot (what Skylake-SP, Cascade Lake and Ice Lake run), 'baseline' the addon's own
 * -march kernels. An x86-64-v3 addon (the prebuilt one) carries one AVX-512 copy of its kernels
 * whose BF16 dot is a load-time choice, so each path runs on one BF16 machine. build.simd must name
 * the path a process takes, judged against the CPU's flags in /proc/cpuinfo; each path's results
 * must be within SPEC §4 of the reference. The choice is made once a process: a child a path.
 * Skipped when the addon is not built.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';
import { NATIVE_ADDON, nativeAddonBuilt } from './helpers/backends.js';
import { testRng } from './helpers/random.js';

const built = nativeAddonBuilt();
if (!built) console.log(`[skip] native_isa_paths.test: the addon is not built (${NATIVE_ADDON})`);
const addon = process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON;
const rng = testRng('native_isa_paths.test');

function envWith(isa: string | undefined): NodeJS.ProcessEnv {
  const env = { ...process.env };
  if (isa === undefined) delete env.SPARSE_MLA_CPU_ISA;
  else env.SPARSE_MLA_CPU_ISA = isa;
  return env;
}

/** build.simd and build.cpuArch of the addon in a fresh process with SPARSE_MLA_CPU_ISA = isa. */
function buildIn(isa: string | undefined): { cpuArch: string; simd: string } {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(JSON.stringify(require(process.argv[1]).build))', addon], { env: envWith(isa), encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as { cpuArch: string; simd: string };
}

function cpuFlags(): string | null {
  try {
    return readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)?.[1] ?? null;
  } catch {
    return null;
  }
}

/** What build.simd must say for `isa`, from the addon's own -march path (SPARSE_MLA_CPU_ISA=baseline) and the CPU's flags. */
function expectedPath(isa: string | undefined, own: string, cpuArch: string, flags: string): string {
  const has = (f: string) => new RegExp(`\\b${f}\\b`).test(flags);
  const avx512 = ['avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'].every(has);
  // an x86-64-v3 addon carries the AVX-512 copy; an AVX-512 build is AVX-512 already
  const hasAvx512Kernels = (process.arch === 'x64' && cpuArch === 'x86-64-v3') || own.startsWith('AVX-512');
  if (isa === 'baseline' || !hasAvx512Kernels || !avx512) return own;
  if (isa === 'avx512') return 'AVX-512';
  return has('avx512_bf16') ? 'AVX-512+BF16' : 'AVX-512';
}

describe.skipIf(!built)('SPARSE_MLA_CPU_ISA and the SIMD path the cpu backend takes', () => {
  test('build.simd names the path taken for each value (avx512: AVX-512 without the BF16 dot)', () => {
    const own = buildIn('baseline');
    if (process.arch === 'x64' && own.cpuArch === 'x86-64-v3') expect(own.simd).toBe('AVX2+FMA');
    const flags = cpuFlags();
    const seen: Record<string, string> = {};
    for (const isa of [undefined, 'auto', 'avx512', 'baseline', 'AVX512', '']) {
      const got = buildIn(isa).simd;
      seen[String(isa)] = got;
      expect(got).toMatch(/^(AVX-512(\+BF16)?|AVX2\+FMA|SSE2|NEON|scalar)$/);
      if (isa === 'avx512') expect(got).not.toMatch(/BF16/);
      if (flags !== null) expect(got, `SPARSE_MLA_CPU_ISA=${String(isa)}`).toBe(expectedPath(isa, own.simd, own.cpuArch, flags));
    }
    // values other than the three listed count as 'auto'
    expect(seen.AVX512).toBe(seen.undefined);
    expect(seen['']).toBe(seen.undefined);
    expect(seen.auto).toBe(seen.undefined);
  });

  for (const isa of ['auto', 'avx512', 'baseline']) {
    test(`SPARSE_MLA_CPU_ISA=${isa}: sparsePrefill and pagedSparseAttention within SPEC §4 on the path taken (1, 4, 8 to 128 heads)`, () => {
      const child = fileURLToPath(new URL('./children/isa_path.mjs', import.meta.url));
      const r = spawnSync(process.execPath, [child, String(rng.u32())], { env: envWith(isa), encoding: 'utf8', timeout: 300_000 });
      expect(r.status, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout) as { simd: string; calls: { name: string; pass: boolean; worst: Record<string, number> }[] };
      // the calls ran in the process whose build.simd is this
      expect(report.simd).toBe(buildIn(isa).simd);
      expect(report.calls).toHaveLength(7);
      for (const c of report.calls) expect(c.pass, `${report.simd}, ${c.name}: worst error / bound ${JSON.stringify(c.worst)}`).toBe(true);
    });
  }
});
