/**
 * Backend registry and selection (SPEC §8): priorities as data, `auto`, the option, the
 * SPARSE_MLA_BACKEND variable, clear BACKEND_UNAVAILABLE errors for what is missing, and an import
 * that never throws because a backend is missing.
 */
import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, test } from 'vitest';
import { SparseMlaError, createEngine, listBackends } from '../dist/index.js';
import { engineBackend } from '../dist/engine.js';
import type { WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { tempDirs } from './helpers/temp_dirs.js';

const ENV = 'SPARSE_MLA_BACKEND';
const savedEnv = process.env[ENV];
afterEach(() => {
  if (savedEnv === undefined) delete process.env[ENV];
  else process.env[ENV] = savedEnv;
});

async function expectError(p: Promise<unknown>, code: string): Promise<SparseMlaError> {
  const e = await p.then(
    (engine) => {
      void (engine as { dispose?: () => Promise<void> })?.dispose?.();
      return undefined;
    },
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(SparseMlaError);
  expect((e as SparseMlaError).code).toBe(code);
  return e as SparseMlaError;
}

describe('listBackends', () => {
  test('lists cuda, cpu, wasm in priority order with availability and reasons', async () => {
    const list = await listBackends();
    expect(list.map((b) => b.name)).toEqual(['cuda', 'cpu', 'wasm']);
    expect(list.map((b) => b.priority)).toEqual([...list.map((b) => b.priority)].sort((a, b) => a - b));
    const [cuda, cpu] = list;
    // No GPU here: cuda says which part is missing (the addon, CUDA in it, a device, ...).
    expect(cuda!.available).toBe(false);
    expect(cuda!.reason).toMatch(nativeAddonBuilt() ? /^(the addon has no CUDA kernels: .+|no CUDA device: .+)/ : /^addon not (available|built) .*npm run build:native/);
    if (nativeAddonBuilt()) {
      expect(cpu!.available).toBe(true);
      expect(cpu!.details?.simd).toMatch(/^(AVX-512(\+BF16)?|AVX2\+FMA|SSE2|NEON|scalar)$/);
    } else {
      expect(cpu!.available).toBe(false);
      expect(cpu!.reason).toMatch(/^addon not (available|built) .*`npm run build:native` \(CMake and a C\+\+ compiler/);
    }
    const wasm = list[2]!;
    expect(wasm.available).toBe(true);
    expect(wasm.details?.module).toMatch(/wasm\/sparse_mla\.wasm$/);
    expect(wasm.details?.maxHeapMiB).toBe(4096);
  });
});

describe('selection', () => {
  // (cpu without the addon is covered by test/native_backend.test.ts in a process without it.)
  test.each(nativeAddonBuilt() ? (['cuda'] as const) : (['cuda', 'cpu'] as const))('asking for %s gives BACKEND_UNAVAILABLE naming what is missing and how to get it', async (name) => {
    delete process.env[ENV];
    const e = await expectError(createEngine({ backend: name }), 'BACKEND_UNAVAILABLE');
    expect(e.message).toContain(`backend "${name}" is unavailable — `);
    expect(e.message).toMatch(/addon not (available|built) .*npm run build:native|the addon has no CUDA kernels: |no CUDA device: /);
  });

  test('auto (default, option or env) picks cpu when the addon is built, else wasm (no GPU here)', async () => {
    delete process.env[ENV];
    const expected = nativeAddonBuilt() ? 'cpu' : 'wasm';
    for (const options of [{}, { backend: 'auto' as const }]) {
      const e = await createEngine({ ...options, workers: 1 });
      expect(e.backend).toBe(expected);
      await e.dispose();
    }
    process.env[ENV] = 'auto';
    const e = await createEngine({ workers: 1 });
    expect(e.backend).toBe(expected);
    await e.dispose();
  });

  test('SPARSE_MLA_BACKEND applies when the option is absent, case-insensitively', async () => {
    process.env[ENV] = 'cuda';
    await expectError(createEngine({ workers: 1 }), 'BACKEND_UNAVAILABLE');
    process.env[ENV] = 'CPU';
    if (nativeAddonBuilt()) {
      const c = await createEngine({ workers: 1 });
      expect(c.backend).toBe('cpu');
      await c.dispose();
    } else await expectError(createEngine({ workers: 1 }), 'BACKEND_UNAVAILABLE');
    process.env[ENV] = ' Wasm ';
    const e = await createEngine({ workers: 1 });
    expect(e.backend).toBe('wasm');
    await e.dispose();
  });

  test('the option overrides SPARSE_MLA_BACKEND', async () => {
    process.env[ENV] = 'cuda';
    const e = await createEngine({ backend: 'wasm', workers: 1 });
    expect(e.backend).toBe('wasm');
    await e.dispose();
    process.env[ENV] = 'wasm';
    await expectError(createEngine({ backend: 'cuda' }), 'BACKEND_UNAVAILABLE');
  });

  test('an unknown SPARSE_MLA_BACKEND is INVALID_VALUE naming the variable', async () => {
    process.env[ENV] = 'tpu';
    const e = await expectError(createEngine({}), 'INVALID_VALUE');
    expect(e.message).toMatch(/^SPARSE_MLA_BACKEND: expected auto \| cuda \| cpu \| wasm, got "tpu"/);
  });

  test('workers: default is the machine’s cores; the option sizes the pool', async () => {
    delete process.env[ENV];
    const d = await createEngine({ backend: 'wasm' });
    expect(d.workers).toBe(os.availableParallelism());
    await d.dispose();
    const e = await createEngine({ backend: 'wasm', workers: 3 });
    expect(e.workers).toBe(3);
    const threads = (engineBackend(e) as WasmBackend).pool.testing.threadIds();
    expect(threads).toHaveLength(3);
    expect(new Set(threads).size).toBe(3);
    await e.dispose();
  });
});

describe('a package whose WASM module is missing or broken', () => {
  const root = fileURLToPath(new URL('..', import.meta.url));

  /** A copy of the built package (dist, the addon locator, package.json) in a temp dir, with the given wasm/ contents. */
  const packageDir = tempDirs('sparse-mla-pkg-');
  function packageCopy(wasm: Buffer | null): string {
    const dir = packageDir();
    cpSync(join(root, 'dist'), join(dir, 'dist'), { recursive: true });
    mkdirSync(join(dir, 'native'));
    cpSync(join(root, 'native', 'addon_locate.mjs'), join(dir, 'native', 'addon_locate.mjs'));
    cpSync(join(root, 'package.json'), join(dir, 'package.json'));
    symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
    if (wasm) {
      mkdirSync(join(dir, 'wasm'));
      writeFileSync(join(dir, 'wasm', 'sparse_mla.wasm'), wasm);
    }
    return dir;
  }

  function probe(dir: string): { status: number | null; out: Record<string, unknown>; stderr: string } {
    const script = join(dir, 'probe.mjs');
    writeFileSync(
      script,
      `import { createEngine, listBackends } from './dist/index.js';\n` +
        `const out = { imported: true, backends: await listBackends() };\n` +
        `for (const backend of ['auto', 'wasm']) {\n` +
        `  try { const e = await createEngine({ backend }); out[backend] = 'created ' + e.backend; await e.dispose(); }\n` +
        `  catch (err) { out[backend] = { code: err.code, message: err.message }; }\n` +
        `}\n` +
        `console.log(JSON.stringify(out));\n`,
    );
    const p = spawnSync(process.execPath, [script], { cwd: dir, encoding: 'utf8', timeout: 60_000, env: { ...process.env, [ENV]: '' } });
    return { status: p.status, out: p.status === 0 ? (JSON.parse(p.stdout) as Record<string, unknown>) : {}, stderr: p.stderr };
  }

  test.each([
    ['missing', null, /cannot read .*sparse_mla\.wasm.*npm run build:wasm/],
    ['not WebAssembly', Buffer.from('not a wasm module'), /does not compile/],
  ] as const)('%s: import works, info says why, createEngine gives BACKEND_UNAVAILABLE', (_kind, wasm, reason) => {
    const r = probe(packageCopy(wasm));
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.out.imported).toBe(true);
    const backends = r.out.backends as Array<{ name: string; available: boolean; reason?: string }>;
    expect(backends.every((b) => !b.available)).toBe(true);
    expect(backends.find((b) => b.name === 'wasm')!.reason).toMatch(reason);
    const auto = r.out.auto as { code: string; message: string };
    expect(auto.code).toBe('BACKEND_UNAVAILABLE');
    expect(auto.message).toMatch(/no backend is available — cuda: .*; cpu: .*; wasm: /);
    const wasmErr = r.out.wasm as { code: string; message: string };
    expect(wasmErr.code).toBe('BACKEND_UNAVAILABLE');
    expect(wasmErr.message).toMatch(reason);
  });
});
