/**
 * The package as `npm install` puts it in a user's project, with npm itself doing the install:
 * the files `npm pack` lists (dist as built here) and a prebuilt linux-x64 addon (this checkout's
 * build, with a manifest as native/prebuild.mjs writes one) are packed once into a tarball, and each
 * test installs it into a fresh project whose path holds a space and a non-ASCII letter, offline
 * (comlink, the one dependency, from a tarball of this checkout's copy; an empty npm cache). What
 * the end-to-end check of a release tarball with CUDA (.ci/package_check.sh) does not cover: an
 * install that runs no scripts and leaves out optional and peer dependencies, then a tree made
 * read-only and used by another user; the CLI through npm's own bin link and `npx`.
 */
import { createHash } from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { outBound, sparsePrefillReference } from '../dist/reference/index.js';
import { tensor } from '../dist/index.js';
import { NATIVE_ADDON, nativeAddonBuilt } from './helpers/backends.js';
import { randomBf16Bits, randomIndices, testRng } from './helpers/random.js';
import { tempDirs } from './helpers/temp_dirs.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const LEVEL = 'x86-64-v2'; // the prebuilt level every x86-64 CPU of a CI runs
const ADDON_FILE = `sparse_mla_native.${LEVEL}.node`;
const stageDir = tempDirs('sparse-mla-stage-');
const projectDir = tempDirs('sparse-mla consumer ü-');

/** The environment a user's shell has: none of this repository's switches. */
const userEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(SPARSE_MLA_.*|npm_.*|NODE_OPTIONS)$/i.test(k)));

/**
 * A command run to its end without blocking this worker's event loop (npm installs and compilers
 * take many seconds on a busy 2-core machine; a synchronous wait past vitest's 60 s RPC timeout
 * fails the run with "Timeout calling onTaskUpdate").
 */
function run(cmd: string, args: string[], options: { cwd: string; env?: NodeJS.ProcessEnv; input?: string }): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, { cwd: options.cwd, env: options.env ?? userEnv, timeout: 120_000 });
    let stdout = '', stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', fail);
    child.on('close', (code, signal) => done({ code, signal, stdout, stderr }));
    child.stdin.end(options.input ?? '');
  });
}

interface InfoJson {
  backends: { name: string; available: boolean; reason?: string }[];
  addon: { loaded: boolean; origin: string | null; level: string | null; path: string | null; install: { addon: string; path: string | null } | null };
}

const withPrebuilt = process.platform === 'linux' && process.arch === 'x64' && nativeAddonBuilt();

describe.skipIf(!withPrebuilt)('npm install of the packed package, in a consumer project', () => {
  let tarball = '';
  let comlinkTarball = '';
  let npmCache = '';
  const addonBytes = () => readFileSync(process.env.SPARSE_MLA_NATIVE_ADDON || NATIVE_ADDON);

  beforeAll(async () => {
    const listed = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT });
    expect(listed.code, listed.stderr).toBe(0);
    const files = (JSON.parse(listed.stdout) as { files: { path: string }[] }[])[0]!.files.map((f) => f.path);
    const stage = stageDir();
    const pkg = join(stage, 'package');
    for (const f of files) {
      mkdirSync(dirname(join(pkg, f)), { recursive: true });
      copyFileSync(join(ROOT, f), join(pkg, f));
    }
    const bytes = addonBytes();
    const prebuilds = join(pkg, 'prebuilds', 'linux-x64');
    mkdirSync(prebuilds, { recursive: true });
    writeFileSync(join(prebuilds, ADDON_FILE), bytes);
    writeFileSync(join(prebuilds, 'manifest.json'), JSON.stringify({
      package: 'sparse-mla', version: '0.0.0', platform: 'linux-x64', cuda: { built: false, why: 'a test package' },
      addons: [{ file: ADDON_FILE, cpuArch: LEVEL, simd: 'SSE2', bytes: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex') }],
    }));
    const packed = await run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', stage], { cwd: pkg });
    expect(packed.code, packed.stderr).toBe(0);
    tarball = join(stage, (JSON.parse(packed.stdout) as { filename: string }[])[0]!.filename);
    const comlink = await run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', stage, join(ROOT, 'node_modules', 'comlink')], { cwd: stage });
    expect(comlink.code, comlink.stderr).toBe(0);
    comlinkTarball = join(stage, (JSON.parse(comlink.stdout) as { filename: string }[])[0]!.filename);
    npmCache = join(stage, 'npm-cache');
  }, 180_000);

  /** A fresh project with the package installed by npm (flags added to `npm install`). */
  async function installedProject(flags: string[]): Promise<{ app: string; pkg: string; stdout: string }> {
    const app = join(projectDir(), 'my app');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'my-app', private: true, type: 'module' }));
    const r = await run('npm', ['install', '--offline', '--no-audit', '--no-fund', '--no-package-lock', '--foreground-scripts', '--cache', npmCache, ...flags, tarball, comlinkTarball], { cwd: app });
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
    return { app, pkg: join(app, 'node_modules', 'sparse-mla'), stdout: r.stdout };
  }

  /** Fresh random inputs, written for the fixture, and the float64 reference's out and its bounds. */
  function prefillCase(dir: string, label: string): { inputs: string; ref: Float64Array; bound: Float64Array } {
    const rng = testRng(label);
    const [sQ, hQ, dQK, sKV, topk] = [3, 16, 576, 40, 24];
    const q = randomBf16Bits(rng, sQ * hQ * dQK);
    const kv = randomBf16Bits(rng, sKV * dQK);
    const indices = randomIndices(rng, sQ, topk, sKV, { invalidFraction: 0.1, duplicateFraction: 0.1 });
    const smScale = 1 / Math.sqrt(dQK);
    const reference = sparsePrefillReference({ q: tensor('bf16', [sQ, hQ, dQK], q), kv: tensor('bf16', [sKV, dQK], kv), indices: tensor('int32', [sQ, topk], indices), smScale });
    const b64 = (a: Uint16Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');
    const inputs = join(dir, 'inputs.json');
    writeFileSync(inputs, JSON.stringify({ qShape: [sQ, hQ, dQK], kvShape: [sKV, dQK], indicesShape: [sQ, topk], q: b64(q), kv: b64(kv), indices: [...indices], smScale }));
    return { inputs, ref: reference.out, bound: reference.mag.map(outBound) };
  }

  /** The fixture's out per backend, each element judged against the reference's bound. */
  function expectPrefill(stdout: string, backends: string[], expected: { ref: Float64Array; bound: Float64Array }): void {
    const got = JSON.parse(stdout) as { sameModule: boolean; results: Record<string, { backend: string; out: string }> };
    expect(got.sameModule).toBe(true);
    for (const name of backends) {
      const r = got.results[name]!;
      expect(r.backend).toBe(name);
      const bits = new Uint16Array(new Uint8Array(Buffer.from(r.out, 'base64')).buffer);
      expect(bits.length).toBe(expected.ref.length);
      const f32 = new Float32Array(new Uint32Array(Array.from(bits, (b) => b << 16)).buffer);
      const over = [...f32.keys()].filter((i) => !(Math.abs(f32[i]! - expected.ref[i]!) <= expected.bound[i]!));
      expect(over.slice(0, 5).map((i) => `${name} out[${i}] ${f32[i]} ref ${expected.ref[i]} bound ${expected.bound[i]}`)).toEqual([]);
    }
  }

  test('a default install in a path with a space: the install script picks the prebuilt addon; the CLI runs through npm\'s bin link and npx from any cwd; import and require give the same module', async () => {
    const { app, pkg, stdout } = await installedProject([]);
    const addon = join(pkg, 'prebuilds', 'linux-x64', ADDON_FILE);
    // (the parenthesis names the addon's own build: this checkout's addon, built for x86-64-v2 or for the machine)
    expect(stdout).toMatch(new RegExp(`using the prebuilt linux-x64 addon \\([^)]*\\): ${addon.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\n`));
    expect(JSON.parse(readFileSync(join(pkg, 'build', 'install-status.json'), 'utf8'))).toMatchObject({ addon: 'prebuilt', path: addon, root: pkg });

    // the bin link npm made points at an executable file
    const link = join(app, 'node_modules', '.bin', 'sparse-mla');
    expect(lstatSync(link).isSymbolicLink()).toBe(true);
    const target = resolve(dirname(link), readlinkSync(link));
    expect(target).toBe(join(pkg, 'dist', 'cli', 'main.js'));
    expect(statSync(target).mode & 0o111).toBe(0o111);

    const outside = os.tmpdir();
    const info = await run(link, ['info', '--json'], { cwd: outside });
    expect(info.code, info.stderr).toBe(0);
    const parsed = JSON.parse(info.stdout) as InfoJson;
    expect(parsed.addon).toMatchObject({ loaded: true, origin: 'prebuilt', level: LEVEL, path: addon, install: { addon: 'prebuilt' } });
    expect(parsed.backends.filter((b) => b.available).map((b) => b.name)).toEqual(expect.arrayContaining(['cpu', 'wasm']));
    const npx = await run('npx', ['--offline', '--no', '--', 'sparse-mla', 'info', '--json'], { cwd: app, env: { ...userEnv, npm_config_cache: npmCache } });
    expect(npx.code, npx.stderr).toBe(0);
    expect((JSON.parse(npx.stdout) as InfoJson).addon).toEqual(parsed.addon);

    copyFileSync(join(ROOT, 'test', 'consumer', 'prefill_from_package.mjs'), join(app, 'prefill.mjs'));
    const expected = prefillCase(app, 'consumer install');
    const prefill = await run(process.execPath, [join(app, 'prefill.mjs'), expected.inputs, 'cpu', 'wasm'], { cwd: outside });
    expect(prefill.stderr).toBe('');
    expect(prefill.code).toBe(0);
    expectPrefill(prefill.stdout, ['cpu', 'wasm'], expected);
  }, 120_000);

  test('a prebuilt addon cut short (an interrupted copy) is refused before it is mapped, saying so; the process lives on and auto falls back to wasm', async () => {
    const { app, pkg } = await installedProject(['--ignore-scripts']);
    const addon = join(pkg, 'prebuilds', 'linux-x64', ADDON_FILE);
    const full = statSync(addon).size;
    const cut = Math.floor(full / 2);
    truncateSync(addon, cut);
    const info = await run(join(app, 'node_modules', '.bin', 'sparse-mla'), ['info', '--json'], { cwd: app });
    expect({ code: info.code, signal: info.signal }).toEqual({ code: 0, signal: null });
    const parsed = JSON.parse(info.stdout) as InfoJson;
    expect(parsed.addon).toMatchObject({ loaded: false, origin: null });
    expect(parsed.backends.find((b) => b.name === 'cpu')!.reason).toContain(`${addon} is ${cut} bytes where the package's manifest says ${full}: a damaged copy of the package; reinstall it`);
    copyFileSync(join(ROOT, 'test', 'consumer', 'prefill_from_package.mjs'), join(app, 'prefill.mjs'));
    const expected = prefillCase(app, 'consumer damaged addon');
    const prefill = await run(process.execPath, [join(app, 'prefill.mjs'), expected.inputs, 'auto'], { cwd: app });
    expect(prefill.stderr).toBe('');
    expect((JSON.parse(prefill.stdout) as { results: { auto: { backend: string } } }).results.auto.backend).toBe('wasm');
  }, 120_000);

  test('under `node --input-type=module` (-e, either spelling, or a module on stdin), beside a per-process flag, the wasm workers start and compute', async () => {
    const { app } = await installedProject(['--ignore-scripts']);
    copyFileSync(join(ROOT, 'test', 'consumer', 'prefill_from_package.mjs'), join(app, 'prefill.mjs'));
    const expected = prefillCase(app, 'consumer --input-type');
    const script = readFileSync(join(app, 'prefill.mjs'), 'utf8');
    const runs = {
      'eval': await run(process.execPath, ['--input-type=module', '-e', "await import('./prefill.mjs')", 'argv1', expected.inputs, 'wasm'], { cwd: app }),
      'eval, two words': await run(process.execPath, ['--max-old-space-size=2048', '--input-type', 'module', '-e', "await import('./prefill.mjs')", 'argv1', expected.inputs, 'wasm'], { cwd: app }),
      'stdin': await run(process.execPath, ['--input-type=module', '-', expected.inputs, 'wasm'], { cwd: app, input: script }),
    };
    for (const [how, r] of Object.entries(runs)) {
      expect({ how, code: r.code, stderr: r.stderr }).toEqual({ how, code: 0, stderr: '' });
      expectPrefill(r.stdout, ['wasm'], expected);
    }
  }, 120_000);

  // TypeScript before 5.8 (and 5.8+ under node16) refuses a CommonJS file's import of the ES
  // module's .d.ts (TS1479); the "require" condition gives it CommonJS typings (dist/cjs/*.d.cts).
  // Older compilers come from this machine's npm cache, offline: those it lacks are not tried.
  test('a CommonJS TypeScript project compiles import and import-require of the package under node16 and nodenext, on each TypeScript 5.x at hand, and its output runs', async () => {
    const { app } = await installedProject(['--ignore-scripts']);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'my-app', private: true })); // a CommonJS project
    writeFileSync(join(app, 'main.ts'), `import { createEngine, tensor, toBf16, SparseMlaError } from 'sparse-mla';
import type { Engine, SparsePrefillResult } from 'sparse-mla';
import { sparsePrefillReference } from 'sparse-mla/reference';
import sparseMla = require('sparse-mla');
declare const console: { log(...values: unknown[]): void };
async function main(): Promise<void> {
  const engine: Engine = await createEngine({ backend: 'wasm', workers: 1 });
  const q = toBf16({ shape: [1, 16, 576], data: new Float32Array(16 * 576).fill(0.25) });
  const kv = toBf16({ shape: [4, 576], data: new Float32Array(4 * 576).fill(0.5) });
  const indices = tensor('int32', [1, 4], Int32Array.from([0, 1, 2, 3]));
  const res: SparsePrefillResult = await engine.sparsePrefill({ q, kv, indices, smScale: 0.04 });
  const ref: sparseMla.Tensor<'bf16'> = res.out;
  console.log(engine.backend, ref.shape.join('x'), sparseMla.createEngine === createEngine, new SparseMlaError('INVALID_SHAPE', 'x') instanceof Error,
    sparsePrefillReference({ q, kv, indices, smScale: 0.04 }).out.length);
  await engine.dispose();
}
void main();
`);
    const compilers: Record<string, string> = { [JSON.parse(readFileSync(join(ROOT, 'node_modules', 'typescript', 'package.json'), 'utf8')).version as string]: join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc') };
    const userCache = spawnSync('npm', ['config', 'get', 'cache'], { encoding: 'utf8', env: userEnv }).stdout.trim();
    const tsDir = join(stageDir(), 'typescript');
    for (const version of ['5.0.4', '5.4.5', '5.7.3']) {
      const dir = join(tsDir, version);
      mkdirSync(dir, { recursive: true });
      const r = await run('npm', ['install', '--offline', '--no-audit', '--no-fund', '--no-package-lock', '--cache', userCache, '--prefix', dir, `typescript@${version}`], { cwd: dir });
      if (r.code === 0) compilers[version] = join(dir, 'node_modules', 'typescript', 'bin', 'tsc');
    }
    console.log(`[consumer cjs] TypeScript ${Object.keys(compilers).join(', ')}`);
    const failures: string[] = [];
    for (const [version, tsc] of Object.entries(compilers)) {
      for (const mode of ['node16', 'nodenext']) {
        const config = `tsconfig.${version}.${mode}.json`;
        writeFileSync(join(app, config), JSON.stringify({ compilerOptions: { module: mode, moduleResolution: mode, target: 'es2022', lib: ['es2022'], types: [], strict: true,
          skipLibCheck: false, outDir: `out-${version}-${mode}` }, files: ['main.ts'] }));
        const r = await run(process.execPath, [tsc, '-p', config], { cwd: app });
        if (r.code !== 0) failures.push(`TypeScript ${version}, module ${mode}:\n${r.stdout}${r.stderr}`);
      }
    }
    expect(failures.join('\n')).toBe('');
    const ran = await run(process.execPath, [join(app, `out-${Object.keys(compilers)[0]}-node16`, 'main.js')], { cwd: app });
    expect(ran.stderr).toBe('');
    expect(ran.stdout.trim()).toBe(`wasm 1x16x512 true true ${16 * 512}`);
  }, 240_000);

  test.skipIf(spawnSync('git', ['--version']).status !== 0)("bench in a project that is a git checkout does not report the project's commit as the package's", async () => {
    const { app } = await installedProject(['--ignore-scripts']);
    const git = (args: string[]) => run('git', ['-c', 'user.name=consumer', '-c', 'user.email=consumer@example.com', ...args], { cwd: app });
    expect((await git(['init', '-q'])).code).toBe(0);
    expect((await git(['commit', '-q', '--allow-empty', '-m', 'the consumer project'])).code).toBe(0);
    const bench = await run(join(app, 'node_modules', '.bin', 'sparse-mla'), ['bench', '--backend', 'wasm', '--workers', '1', '-n', '4', '--heads', '16', '--topk', '16', '--window', '8',
      '--context', '64', '--dequant-tokens', '64', '--repeat', '1', '--warmup', '0', '--json', '--quiet'], { cwd: app });
    expect(bench.code, bench.stderr).toBe(0);
    expect((JSON.parse(bench.stdout) as { machine: { commit: string | null } }).machine.commit).toBeNull();
  }, 120_000);

  describe('no scripts, no optional or peer dependencies, then the tree read-only to the user running it', () => {
    let app = '';
    afterAll(() => {
      if (app) spawnSync('chmod', ['-R', 'u+w', app]); // so that the temp folder can be removed
    });

    test('the prebuilt addon still loads, info says the install script did not run, cpu and wasm compute, nothing is written', async () => {
      const installed = await installedProject(['--ignore-scripts', '--omit=optional', '--omit=peer']);
      app = installed.app;
      const { pkg } = installed;
      expect(existsSync(join(pkg, 'build'))).toBe(false);
      expect(readdirSync(join(app, 'node_modules')).filter((d) => !d.startsWith('.')).sort()).toEqual(['comlink', 'sparse-mla']);
      copyFileSync(join(ROOT, 'test', 'consumer', 'prefill_from_package.mjs'), join(app, 'prefill.mjs'));
      const expected = prefillCase(app, 'consumer read-only');

      // read-only for everyone; root ignores modes, so as root the commands run as nobody (setpriv)
      const root = process.getuid?.() === 0;
      expect(!root || spawnSync('setpriv', ['--version']).status === 0, 'running as root: setpriv (util-linux) is needed to drop to nobody').toBe(true);
      for (let dir = app; dir !== dirname(dir) && dir.startsWith(os.tmpdir()) && dir !== os.tmpdir(); dir = dirname(dir)) chmodSync(dir, 0o755);
      const tree = () => readdirSync(app, { recursive: true }).map(String).sort();
      const before = tree();
      expect(spawnSync('chmod', ['-R', 'a-w', app]).status).toBe(0);
      const asUser = (args: string[]) => {
        const argv = root ? ['setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', ...args]] as const : [args[0]!, args.slice(1)] as const;
        return run(argv[0], [...argv[1]], { cwd: os.tmpdir(), env: { ...userEnv, HOME: os.tmpdir() } });
      };

      const info = await asUser([join(app, 'node_modules', '.bin', 'sparse-mla'), 'info', '--json']);
      expect(info.code, info.stderr).toBe(0);
      const parsed = JSON.parse(info.stdout) as InfoJson;
      expect(parsed.addon).toMatchObject({ loaded: true, origin: 'prebuilt', level: LEVEL, install: null });
      const text = await asUser([join(app, 'node_modules', '.bin', 'sparse-mla'), 'info']);
      expect(text.stdout).toContain('install  the install script did not run (no ');

      const prefill = await asUser([process.execPath, join(app, 'prefill.mjs'), expected.inputs, 'cpu', 'wasm']);
      expect(prefill.stderr).toBe('');
      expect(prefill.code).toBe(0);
      expectPrefill(prefill.stdout, ['cpu', 'wasm'], expected);
      expect(tree()).toEqual(before);
    }, 120_000);
  });
});
