/**
 * A wasm workspace layer's sparsePrefill refused at the call because one row's task cannot fit a
 * worker's heap names the argument whose share of that task is the larger: `q` where its heads (a
 * query row, its outputs and the per-head scratch) outweigh the plan's part (the workspace's rows a
 * task holds whole, an index row), `plan` where the workspace does; and its message states both.
 * The cases are far from the boundary, so they hold whatever the op's exact scratch estimate: q's
 * share grows with hQ (two rows of hQ × 512 bf16 and more per head), the plan's with the workspace
 * rows (512 bf16 each).
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createPlan, prefillLayer, tensor } from '../dist/index.js';
import { HEAP_RESERVE_BYTES } from '../dist/backends/wasm/wasm_backend.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { errorOf } from './helpers/errors.js';
import { planWork, spyOps } from './helpers/layer_work.js';
import { smallHeapWasmEngines } from './helpers/small_heap_wasm.js';

const rng = testRng('hostile_budget_wasm_layer_heap_argument');
const D = 512;

const wasmEngine = smallHeapWasmEngines();

describe('wasm workspace layer: the sparsePrefill heap refusal names the larger share', () => {
  test.each([
    // many heads over a small workspace: q's share is more than twice the plan's
    { what: 'q', seqLen: [rng.int(20, 50)], extendLen: [rng.int(2, 8)], hQ: 128, ratio: 0 as const },
    { what: 'q', seqLen: [rng.int(20, 60), rng.int(10, 30)], extendLen: [rng.int(2, 6), rng.int(1, 4)], hQ: 128, ratio: 4 as const },
    // a few heads over a workspace of thousands of rows: the plan's share (1 KiB a row) is the larger
    { what: 'plan', seqLen: [rng.int(2500, 4000)], extendLen: [rng.int(2, 8)], hQ: 2, ratio: 0 as const },
  ])('%o', async ({ what, seqLen, extendLen, hQ, ratio }) => {
    const sc = randomScenario(rng, seqLen, extendLen);
    const nq = sc.numQueries;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const qTensor = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const plan = createPlan(sc.chunk);
    const rows = plan.layout(ratio).rows;
    // q's share of a task is at least a query row and its output row, at most those, the row's
    // maxLogits and lse, the sink and 8 KiB of scratch a head; the plan's at least the workspace's
    // rows, at most those, an index row (4 bytes an entry, at most rows + top-k entries) and 16
    // bytes of scratch an entry, and the row's length. The larger is more than twice the other.
    const width = rows + (ratio === 4 ? 32 : 0);
    const q = { least: hQ * D * 2 * 2, most: hQ * (D * 2 * 2 + 8 + 4 + 8192) };
    const planPart = { least: rows * D * 2, most: rows * D * 2 + width * 20 + 4 };
    expect(what === 'q' ? q.least / planPart.most : planPart.least / q.most).toBeGreaterThan(2);
    // a heap that holds the dequants' tasks (a few KiB a token) but not the sparsePrefill's
    const { engine, backend } = await wasmEngine(HEAP_RESERVE_BYTES + 8192);
    const spy = spyOps(backend);
    const before = planWork(plan.stats);
    const e = await errorOf(() => prefillLayer(engine, { plan, compressRatio: ratio, q: qTensor, caches: ratio === 4 ? { swa, c4 } : { swa }, ...(ratio === 4 ? { topkIndices: randomTopk(rng, sc, 32) } : {}), smScale: 0.05, path: 'sparse' }));
    expect(e).toBeInstanceOf(SparseMlaError);
    expect((e as SparseMlaError).code).toBe('TOO_LARGE');
    expect((e as Error).message).toMatch(new RegExp(`^${what}: expected .*prefillLayer \\(a c${ratio} layer, sparse path\\): its sparsePrefill`));
    expect((e as SparseMlaError).argument).toBe(what);
    // both shares stated: q's heads and the plan's workspace rows
    expect((e as Error).message).toContain(`q's ${hQ} heads`);
    expect((e as Error).message).toContain(`the plan's workspace of ${rows} rows`);
    expect(spy.calls).toEqual([]);
    expect(planWork(plan.stats)).toEqual(before);
  }, 60_000);
});
