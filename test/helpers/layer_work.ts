/**
 * What the layer budget tests read to prove a refusal came before any work: the backend ops a layer
 * reached, the plan work it did, and caches padded with pages no chunk reads (so a paged op reads
 * them compact).
 */
import { expect } from 'vitest';
import { createKvCache } from '../../dist/index.js';
import type { KvCache, PlanStats } from '../../dist/index.js';

/** `c` in a cache of `factor` times its pages (the pages past its own zero, never read by its chunk's ids). */
export function paddedCache(c: KvCache, factor: number): KvCache {
  const big = createKvCache('v4', { pageSize: c.pageSize, numPages: c.numPages * factor });
  big.data.set(c.data);
  return big;
}

/** The ops reached on `backend` (an engine's backend object), counted by wrapping its own methods (the layer steps look them up at each call). */
export function spyOps(backend: unknown): { calls: string[] } {
  const methods = backend as Record<string, (...a: unknown[]) => unknown>;
  expect(methods, 'a backend to spy on').toBeDefined();
  const seen = { calls: [] as string[] };
  for (const op of ['dequantizeKCache', 'sparsePrefill', 'pagedSparseAttention']) {
    const own = methods[op]!;
    methods[op] = function (this: unknown, ...a: unknown[]) {
      seen.calls.push(op);
      return own.apply(this, a);
    };
  }
  return seen;
}

/** A host plan's work so far: its combines, row and paged-form builds, and workspace allocations. */
export const planWork = (s: PlanStats) => [s.c4Combines, s.c0Builds, s.c128Builds, s.pagedMainBuilds, s.pagedExtraBuilds, s.workspaceAllocations];
