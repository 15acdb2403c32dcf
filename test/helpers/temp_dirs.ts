/**
 * Temporary directories for a test file: each made fresh under the system's temp folder and
 * removed once the tests of the file (or describe block) that asked for them are done, so a run
 * leaves nothing behind.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';

/**
 * A maker of fresh directories named `prefix` and a random suffix. Call it where afterAll may be
 * (a file's top level or a describe block, not inside a test): the directories it made are removed
 * in that scope's afterAll.
 */
export function tempDirs(prefix: string): () => string {
  const made: string[] = [];
  afterAll(() => {
    for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
  });
  return () => {
    const dir = mkdtempSync(join(tmpdir(), prefix));
    made.push(dir);
    return dir;
  };
}
