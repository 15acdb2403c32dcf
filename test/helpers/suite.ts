/**
 * The preamble of an op suite: a logged, replayable seed (SPARSE_MLA_SEED) and one engine on the
 * backend under test (or as `options` ask), created before the suite's tests and disposed after them.
 */
import { afterAll, beforeAll } from 'vitest';
import { createEngine } from '../../dist/index.js';
import type { Engine, EngineOptions } from '../../dist/index.js';
import { backendUnderTest } from './backends.js';
import { testRng, type Rng } from './random.js';

export interface OpSuite {
  readonly rng: Rng;
  /** the suite's engine (available from beforeAll on) */
  readonly engine: Engine;
}

export function opSuite(label: string, options?: EngineOptions): OpSuite {
  const rng = testRng(label);
  let engine: Engine | undefined;
  beforeAll(async () => {
    engine = await createEngine(options ?? { backend: backendUnderTest() });
  }, 60_000);
  afterAll(async () => {
    await engine?.dispose();
  });
  return {
    rng,
    get engine(): Engine {
      if (engine === undefined) throw new Error(`${label}: the engine is created in beforeAll; use it inside a test`);
      return engine;
    },
  };
}
