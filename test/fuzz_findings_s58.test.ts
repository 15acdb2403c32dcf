/**
 * What session 58's API fuzzer hunt (helper-82) found in the library, one focused case each. The
 * calls that crashed the process run in a child process, so that a regression fails its test rather
 * than the test file.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, test } from 'vitest';

const addonBuilt = existsSync(process.env.SPARSE_MLA_NATIVE_ADDON || 'build/addon/Release/sparse_mla_native.node');

/** Runs `body` (the text of an async function of `lib`, the package's dist/index.js) in a child node process; its last stdout line parsed. */
function inChild(body: string): { status: number | null; signal: string | null; stderr: string; result: unknown } {
  const lib = pathToFileURL(resolve('dist/index.js')).href;
  const script = `import(${JSON.stringify(lib)}).then(async (lib) => { const result = await (async () => { ${body} })(); console.log(JSON.stringify(result)); }).then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  const lines = (r.stdout ?? '').trim().split('\n');
  let result: unknown;
  try {
    result = JSON.parse(lines[lines.length - 1] ?? '');
  } catch {
    result = undefined;
  }
  return { status: r.status, signal: r.signal, stderr: r.stderr ?? '', result };
}

describe.skipIf(!addonBuilt)('cpu engine: an attention call of no query rows and 16 heads or more (session 58, helper-82, by hand after numericEdges\' wide cases)', () => {
  // 89be223 split a row's heads into groups over the addon's threads; its group count divided by the
  // row count, so sparsePrefill / pagedSparseAttention of q [0, hQ ≥ 16, d] killed the process with
  // SIGFPE (whatever the engine's workers). SPEC §4: sQ = 0 returns empty outputs.
  test('sparsePrefill and pagedSparseAttention resolve with empty outputs of the SPEC shapes, 1 and 2 workers', () => {
    const r = inChild(`
      const { createEngine, createKvCache, tensor } = lib;
      const got = [];
      for (const workers of [1, 2]) {
        const engine = await createEngine({ backend: 'cpu', workers });
        for (const hQ of [16, 17, 24, 64]) {
          for (const dQK of [512, 576]) {
            const s = await engine.sparsePrefill({ q: tensor('bf16', [0, hQ, dQK], new Uint16Array(0)), kv: tensor('bf16', [3, dQK], new Uint16Array(3 * dQK)), indices: tensor('int32', [0, 8], new Int32Array(0)), smScale: 0.04, attnSink: tensor('float32', [hQ], new Float32Array(hQ)) });
            got.push(['sparsePrefill', workers, hQ, dQK, s.out.shape, s.out.data.length, s.lse.shape, s.maxLogits.shape]);
          }
          const kCache = createKvCache('v4', { pageSize: 2, numPages: 2 });
          const extra = hQ % 2 === 0 ? { extraKCache: createKvCache('v4', { pageSize: 4, numPages: 1 }), extraIndices: tensor('int32', [0, 3], new Int32Array(0)) } : {};
          const p = await engine.pagedSparseAttention({ q: tensor('bf16', [0, hQ, 512], new Uint16Array(0)), kCache, indices: tensor('int32', [0, 4], new Int32Array(0)), smScale: 0.04, ...extra });
          got.push(['pagedSparseAttention', workers, hQ, 512, p.out.shape, p.out.data.length, p.lse.shape, p.maxLogits.shape]);
        }
        await engine.dispose();
      }
      return got;
    `);
    expect(r.signal, `the child died: ${r.stderr.slice(0, 300)}`).toBeNull();
    expect(r.status, r.stderr.slice(0, 300)).toBe(0);
    const got = r.result as [string, number, number, number, number[], number, number[], number[]][];
    expect(got).toHaveLength(2 * 4 * 3);
    for (const [op, , hQ, , outShape, outLength, lseShape, maxShape] of got) {
      expect(outShape, op).toEqual([0, hQ, 512]);
      expect(outLength, op).toBe(0);
      expect(lseShape, op).toEqual([0, hQ]);
      expect(maxShape, op).toEqual([0, hQ]);
    }
  });
});
