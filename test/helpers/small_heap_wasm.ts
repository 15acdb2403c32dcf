/**
 * wasm engines whose ops size their tasks by a small heap (WasmBackend.create's maxMemoryBytes), for
 * the tests of heap refusals. Call at a test file's top level: it compiles the module once before
 * the file's tests and disposes every engine it made after them.
 */
import { afterAll, beforeAll } from 'vitest';
import type { Engine } from '../../dist/index.js';
import { SparseMlaEngine } from '../../dist/engine.js';
import { WasmBackend } from '../../dist/backends/wasm/wasm_backend.js';
import { compileCoreModule } from '../../dist/backends/wasm/ops.js';

export type SmallHeapWasm = (heapBytes: number, memoryBudgetBytes?: number) => Promise<{ engine: Engine; backend: WasmBackend }>;

/** A maker of two-worker wasm engines over `heapBytes` (and a memory budget, when given). */
export function smallHeapWasmEngines(): SmallHeapWasm {
  let compiled: Awaited<ReturnType<typeof compileCoreModule>>;
  const engines: Engine[] = [];
  beforeAll(async () => {
    compiled = await compileCoreModule();
  });
  afterAll(async () => {
    for (const e of engines) await e.dispose();
  });
  return async (heapBytes, memoryBudgetBytes) => {
    const backend = await WasmBackend.create(2, { module: compiled.module, maxMemoryBytes: heapBytes }, memoryBudgetBytes);
    const engine = new SparseMlaEngine(backend);
    engines.push(engine);
    return { engine, backend };
  };
}
