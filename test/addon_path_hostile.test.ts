/**
 * SPARSE_MLA_NATIVE_ADDON naming something that is not a regular file (a FIFO, a device): the
 * loader says so and the library goes on without the addon. Loading it hung the process forever
 * (the dynamic loader's read of a FIFO with no writer, or of /dev/zero, never ends).
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';
import { tempDirs } from './helpers/temp_dirs.js';

const DIST = fileURLToPath(new URL('../dist/index.js', import.meta.url));
const tempDir = tempDirs('sparse-mla-addon-path-');

function backendsWith(addon: string): { status: number | null; signal: NodeJS.Signals | null; backends: [string, boolean, string | null][] } {
  const script = `import(${JSON.stringify(DIST)}).then(async (m) => { const b = await m.listBackends(); console.log(JSON.stringify(b.map((x) => [x.name, x.available, x.reason ?? null]))); })`;
  const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, SPARSE_MLA_NATIVE_ADDON: addon }, encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, signal: r.signal, backends: r.status === 0 ? JSON.parse(r.stdout.trim().split('\n').pop()!) : [] };
}

describe('SPARSE_MLA_NATIVE_ADDON that is not a regular file', () => {
  const fifo = join(tempDir(), 'addon.node');
  const made = spawnSync('mkfifo', [fifo]).status === 0;
  const cases: [string, string, boolean][] = [
    ['a FIFO with no writer', fifo, made],
    ['a device (/dev/zero)', '/dev/zero', existsSync('/dev/zero')],
  ];
  for (const [what, path, present] of cases) {
    test.skipIf(!present)(`${what}: the native backends are unavailable saying so, wasm runs, nothing hangs`, () => {
      const r = backendsWith(path);
      expect({ status: r.status, signal: r.signal }).toEqual({ status: 0, signal: null });
      const byName = new Map(r.backends.map(([name, available, reason]) => [name, { available, reason }]));
      for (const name of ['cpu', 'cuda']) {
        expect(byName.get(name)!.available).toBe(false);
        expect(byName.get(name)!.reason).toContain(`${path} is not a regular file`);
      }
      expect(byName.get('wasm')!.available).toBe(true);
    }, 30_000);
  }
});
