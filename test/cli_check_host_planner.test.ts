/**
 * `sparse-mla check` where the host planner (the package's WebAssembly core on the main thread)
 * cannot be instantiated, as under an address-space limit (`ulimit -v`): only the device cases plan
 * on the host, so this is a cuda host's case; here a stand-in CUDA device (no GPU) gives the engine
 * a device, and WebAssembly.Instance refuses as V8 does when it cannot reserve the memory. The check
 * reports one line with the typed code before the grid, exit 1 (it printed a FAIL line per case
 * that plans, with no code). On this host, under a real limit, the wasm engine is what cannot start:
 * also one typed line, exit 1.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, test, vi } from 'vitest';
import { runCliCommand } from '../dist/cli/command.js';
import { command as check } from '../dist/cli/commands/check.js';
import { standInDevice } from './helpers/stand_in_device.js';

const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));
const device = standInDevice();
/** every engine the check made */
const made = vi.hoisted(() => [] as { assertAlive(): void }[]);

// the engine under check: a cuda engine over the stand-in device; the WASM engine beside it is real
vi.mock('../dist/index.js', async (importOriginal) => {
  const lib = await importOriginal<typeof import('../dist/index.js')>();
  return {
    ...lib,
    createEngine: async (options: { backend?: string }) => {
      const engine = options.backend === 'wasm' ? await lib.createEngine(options as never) : device.engine().engine;
      made.push(engine as never);
      return engine;
    },
  };
});

/** Runs the command in-process as main.ts does (errors become exit codes), capturing its output. */
async function runCheck(argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '', stderr = '';
  const o = vi.spyOn(process.stdout, 'write').mockImplementation((s: string | Uint8Array) => ((stdout += String(s)), true));
  const e = vi.spyOn(process.stderr, 'write').mockImplementation((s: string | Uint8Array) => ((stderr += String(s)), true));
  const log = vi.spyOn(console, 'log').mockImplementation((...a: unknown[]) => void (stdout += `${a.join(' ')}\n`));
  try {
    return { code: await runCliCommand(check.name, check, argv), stdout, stderr };
  } finally {
    o.mockRestore();
    e.mockRestore();
    log.mockRestore();
  }
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe('check where the host planner cannot be instantiated', () => {
  test('a device engine: one line with BACKEND_FAILURE naming the host planner and the cause, before any case, exit 1 (it was a FAIL line per case, no code)', async () => {
    const refused = vi.spyOn(WebAssembly, 'Instance').mockImplementation(() => {
      throw new RangeError('WebAssembly.Instance(): Out of memory: Cannot allocate Wasm memory for new instance');
    });
    const seed = String(Math.floor(Math.random() * 2 ** 32));
    const text = await runCheck(['--only', 'prefillLayer on the device', '--seed', seed]);
    const json = await runCheck(['--only', 'prefillLayer on the device', '--seed', seed, '--json']);
    expect(refused).toHaveBeenCalled();

    expect(text.code).toBe(1);
    expect(text.stderr.trimEnd().split('\n')).toEqual([
      expect.stringMatching(/^sparse-mla check: the device checks: the host planner \(the package's WebAssembly core\) could not be instantiated: WebAssembly\.Instance\(\): Out of memory.* \[BACKEND_FAILURE\]$/),
    ]);
    expect(text.stdout).not.toMatch(/FAIL|passed/);

    expect(json.code).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({ command: 'check', ok: false, exitCode: 1, error: { code: 'BACKEND_FAILURE', message: expect.stringMatching(/host planner.*Out of memory/) } });
    // both engines of each run were disposed
    expect(made.length).toBe(4);
    for (const engine of made) expect(() => engine.assertAlive()).toThrow(expect.objectContaining({ code: 'DISPOSED' }));
  }, 60_000);
});

/** An address-space limit that keeps V8 from reserving a wasm32 memory of 4 GiB maximum (its guard region), where it does. */
const LIMIT_KIB = 8_000_000;
const underLimit = (...args: string[]) => spawnSync('bash', ['-c', `ulimit -v ${LIMIT_KIB} && exec "$0" "$@"`, process.execPath, ...args], { encoding: 'utf8', timeout: 60_000 });
const limitBites = process.platform === 'linux' && underLimit('-e', `try { new WebAssembly.Memory({ initial: 1, maximum: 65536 }); console.log('reserved'); } catch { console.log('refused'); }`).stdout.trim() === 'refused';

describe.skipIf(!limitBites)('check under a real address-space limit (`ulimit -v`; the WASM engine, so any host)', () => {
  test('the WASM engine cannot reserve its workers\' memory: one line with BACKEND_FAILURE, exit 1', () => {
    const r = underLimit(MAIN, 'check', '--backend', 'wasm', '--seed', '1', '--quiet');
    expect(r.signal).toBeNull();
    expect(r.status).toBe(1);
    expect(r.stderr.trimEnd().split('\n')).toEqual([expect.stringMatching(/^sparse-mla check: wasm worker #\d+ failed to start .*Out of memory.* \[BACKEND_FAILURE\]$/)]);
    expect(r.stdout).not.toMatch(/FAIL|passed/);
  }, 60_000);
});
