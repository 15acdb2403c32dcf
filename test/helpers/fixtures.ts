/**
 * The FlashMLA output dumps in test/fixtures/flashmla-h200/ (its README says what they are): the
 * twelve case directories and a loader for their inputs and outputs.
 */
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { PrefillDir, loadPrefillInputs, loadPrefillOutputs, type LoadedPrefillOutputs } from '../../dist/io/index.js';
import type { SparsePrefillArgs } from '../../dist/index.js';

export const FIXTURE_ROOT = fileURLToPath(new URL('../fixtures/flashmla-h200/', import.meta.url));

/** The case directories' names, sorted (`a0-unit-…`, …, `ac3-cancel-…`). */
export function fixtureNames(): string[] {
  return readdirSync(FIXTURE_ROOT, { withFileTypes: true })
    .filter((e) => e.isDirectory())
    .map((e) => e.name)
    .sort();
}

export interface Fixture {
  name: string;
  dir: string;
  /** `unit`, `flashmla` or `cancel`, from the name */
  regime: string;
  args: SparsePrefillArgs;
  shapes: { sQ: number; hQ: number; dQK: number; sKV: number; topk: number; dV: number };
  outputs: LoadedPrefillOutputs;
}

export async function loadFixture(name: string): Promise<Fixture> {
  const dir = join(FIXTURE_ROOT, name);
  const handle = await PrefillDir.open(dir);
  const inputs = await loadPrefillInputs(handle);
  const outputs = await loadPrefillOutputs(handle, inputs.shapes);
  return { name, dir, regime: name.split('-')[1]!, args: inputs.args, shapes: inputs.shapes, outputs };
}
