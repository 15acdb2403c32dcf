/**
 * Counting the host planner's builds (a plan's c4 combine, c0 / c128 rows, compressed ids and paged
 * form: the work a Plan does on the calling thread, in dist/backends/wasm/planner.js), for tests
 * that hold a layer to building each once.
 */
import { hostPlanner } from '../../dist/backends/wasm/planner.js';

export const PLANNER_BUILDS = ['combineTopk', 'denseRows', 'compressedTokenIds', 'pagedForm'] as const;

/** The host planner's builds while `f` runs, by kind (the planner's own methods, wrapped for the call). */
export async function plannerCalls(f: () => Promise<unknown>): Promise<Record<(typeof PLANNER_BUILDS)[number], number>> {
  const calls = { combineTopk: 0, denseRows: 0, compressedTokenIds: 0, pagedForm: 0 };
  const planner = hostPlanner as unknown as Record<string, (...a: unknown[]) => unknown>;
  const own = PLANNER_BUILDS.map((m) => planner[m]!);
  PLANNER_BUILDS.forEach((m, i) => {
    planner[m] = (...a: unknown[]) => {
      calls[m]++;
      return own[i]!.apply(hostPlanner, a);
    };
  });
  try {
    await f();
  } finally {
    PLANNER_BUILDS.forEach((m, i) => (planner[m] = own[i]!));
  }
  return calls;
}
