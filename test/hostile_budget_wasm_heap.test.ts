/**
 * A wasm engine's layer over a worker's heap: every task of a wasm op runs in a worker whose heap
 * holds what the task reads (a paged op's caches as it reads them, whole or compact; a
 * sparsePrefill's whole kv, the layer's workspace), and an op refuses (TOO_LARGE) a call whose task
 * of one row cannot fit. A layer checks each op it will run against the heap at the call, with the
 * op's own arithmetic (HostOpMemory.workerHeap), before any op or plan work (the ops refused after
 * the combine, the paged form, the workspace and the dequants). The engines here are made with a
 * small heap (WasmBackend.create's maxMemoryBytes: the heap the backend sizes its tasks by); each
 * edge is found from the library's own refusals ("got N bytes for the shared inputs and one row"):
 * refused at the heap that is one byte short, run at the edge within SPEC §4's bounds of the
 * float64 reference, and the op alone (the public op over the same operands) has the same edge.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createPlan, prefillLayer, tensor } from '../dist/index.js';
import type { Engine, Plan, PrefillLayerArgs } from '../dist/index.js';
import { HEAP_RESERVE_BYTES, WasmBackend } from '../dist/backends/wasm/wasm_backend.js';
import { pagedReadForTests } from '../dist/backends/paged_gather.js';
import { prefillLayerReference } from '../dist/reference/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { errorOf } from './helpers/errors.js';
import { plannerCalls } from './helpers/planner_calls.js';
import { expectWithinBounds } from './helpers/judge.js';
import { paddedCache, planWork, spyOps } from './helpers/layer_work.js';
import { smallHeapWasmEngines } from './helpers/small_heap_wasm.js';

const rng = testRng('hostile_budget_wasm_heap');
const D = 512;

const wasmEngine = smallHeapWasmEngines();
/** each engine's backend (engineBackend knows only createEngine's) */
const backendOf = new Map<Engine, WasmBackend>();

/** A wasm engine of two workers whose heap is `heapBytes` (what its ops size their tasks by). */
async function engineWithHeap(heapBytes: number): Promise<Engine> {
  const { engine, backend } = await wasmEngine(heapBytes);
  backendOf.set(engine, backend);
  return engine;
}

/** The bytes a heap refusal says one task needs ("got N bytes for the shared inputs and one row"). */
function heapNeed(e: unknown): number {
  expect(e instanceof SparseMlaError && e.code, String(e)).toBe('TOO_LARGE');
  const m = /got (\d+) bytes for the shared inputs and one row/.exec((e as Error).message);
  expect(m, (e as Error).message).not.toBeNull();
  return Number(m![1]);
}

/** The layer on an engine of heap `heapBytes`: refused before any op and any plan work; gives the refusal. */
async function refusedFirst(heapBytes: number, plan: Plan, args: PrefillLayerArgs): Promise<SparseMlaError> {
  const engine = await engineWithHeap(heapBytes);
  const spy = spyOps(backendOf.get(engine));
  const before = planWork(plan.stats);
  const e = await errorOf(() => prefillLayer(engine, args));
  expect(e instanceof SparseMlaError && e.code, `at a heap of ${heapBytes}: ${String(e)}`).toBe('TOO_LARGE');
  expect(spy.calls, `refused at a heap of ${heapBytes} after ops ran: ${(e as Error).message}`).toEqual([]);
  expect(planWork(plan.stats), `refused at a heap of ${heapBytes} after the plan's work: ${(e as Error).message}`).toEqual(before);
  await engine.dispose();
  return e as SparseMlaError;
}

/**
 * Raises the heap from the reserve + 1 byte to what each refusal says a task needs until the layer
 * runs (each refusal before any work: refusedFirst). Returns the edge and the refusals in order.
 */
async function heapEdge(makePlan: () => Plan, args: (plan: Plan) => PrefillLayerArgs): Promise<{ heap: number; refusals: SparseMlaError[] }> {
  let heap = HEAP_RESERVE_BYTES + 1;
  const refusals: SparseMlaError[] = [];
  for (let attempt = 0; attempt < 8; attempt++) {
    const engine = await engineWithHeap(heap);
    const ran = (await errorOf(() => prefillLayer(engine, args(makePlan())))) === undefined;
    await engine.dispose();
    if (ran) return { heap, refusals };
    const plan = makePlan();
    const e = await refusedFirst(heap, plan, args(plan));
    const need = HEAP_RESERVE_BYTES + heapNeed(e);
    expect(need).toBeGreaterThan(heap);
    refusals.push(e);
    heap = need;
  }
  throw new Error(`no heap up to ${heap} ran the layer`);
}

/** The op alone (the public op over the layer's operands) is refused one byte under `heap` and runs at it. */
async function expectOpEdge(heap: number, op: (engine: Engine) => Promise<unknown>): Promise<void> {
  for (const [h, fits] of [[heap - 1, false], [heap, true]] as const) {
    const engine = await engineWithHeap(h);
    const e = await errorOf(() => op(engine));
    await engine.dispose();
    if (fits) expect(e, `the op alone at the layer's edge ${h}`).toBeUndefined();
    else expect(heapNeed(e) + HEAP_RESERVE_BYTES, `the op alone at ${h}`).toBe(heap);
  }
}

describe('wasm: a layer over a worker heap is TOO_LARGE at the call, before any work', () => {
  test('workspace path, c4 layer: its dequants and then its sparsePrefill over the workspace need more heap than there is (the sparsePrefill refused after the combine, the workspace and the dequants)', async () => {
    const sc = randomScenario(rng, [rng.int(1500, 3000), rng.int(200, 600)], [rng.int(2, 6), rng.int(1, 4)]);
    const hQ = rng.int(2, 8), nq = sc.numQueries, smScale = 0.05;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const topk = randomTopk(rng, sc, rng.int(32, 96));
    const args = (plan: Plan): PrefillLayerArgs => ({ plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, smScale, path: 'sparse' });
    const { heap, refusals } = await heapEdge(() => createPlan(sc.chunk), args);
    // the dequants first (a token's row), then the sparsePrefill (the workspace in every task), each named as the layer's op
    expect(refusals.map((e) => e.argument)).toEqual(refusals.map(() => 'plan'));
    expect(refusals[0]!.message).toMatch(/prefillLayer \(a c4 layer, sparse path\): its dequantizeKCachePaged of caches\.c4/);
    expect(refusals.at(-1)!.message).toMatch(/prefillLayer \(a c4 layer, sparse path\): its sparsePrefill/);
    // one byte short: refused with nothing run; at the edge it runs, within the reference's bounds
    await refusedFirst(heap - 1, createPlan(sc.chunk), args(createPlan(sc.chunk)));
    const engine = await engineWithHeap(heap);
    const r = await prefillLayer(engine, args(createPlan(sc.chunk)));
    await engine.dispose();
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: 4, q, caches: { swa, c4 }, topkIndices: topk, smScale });
    expectWithinBounds(`c4 workspace at a heap of ${heap}`, r, ref, Array.from({ length: nq }, (_, i) => i));
    expect(r.dropped).toBe(ref.dropped);
    // the layer's edge is its sparsePrefill's own: the op alone over a kv of the workspace's rows and the layer's rows
    const plan = createPlan(sc.chunk);
    const rows = plan.combineC4(topk);
    const kv = tensor('bf16', [plan.layout(4).rows, D]);
    await expectOpEdge(heap, (e) => e.sparsePrefill({ q, kv, indices: rows.indices, topkLength: rows.lengths, smScale }));
  }, 60_000);

  test.each([4, 0, 128] as const)('paged path, c%i layer over caches far larger than what it reads: its op reads compact caches of the tokens its ids name, and their heap need is counted exactly at the call (the op refused after the combine and the paged form)', async (ratio) => {
    const sc = randomScenario(rng, [rng.int(2000, 3000)], [rng.int(4, 10)]);
    const hQ = rng.int(2, 8), nq = sc.numQueries, smScale = 0.05;
    const swa = paddedCache(randomCache(rng, sc.swaPageSize, sc.swaPages), rng.int(48, 64));
    const compressed = ratio === 4 ? paddedCache(randomCache(rng, sc.c4PageSize, sc.c4Pages), rng.int(24, 32)) : ratio === 128 ? paddedCache(randomCache(rng, sc.c128PageSize, sc.c128Pages), rng.int(24, 32)) : undefined;
    const caches = ratio === 4 ? { swa, c4: compressed } : ratio === 128 ? { swa, c128: compressed } : { swa };
    const q = tensor('bf16', [nq, hQ, D], randomBf16Bits(rng, nq * hQ * D, 1));
    const topk = ratio === 4 ? randomTopk(rng, sc, rng.int(32, 96)) : undefined;
    const args = (plan: Plan): PrefillLayerArgs => ({ plan, compressRatio: ratio, q, caches, ...(topk ? { topkIndices: topk } : {}), smScale, path: 'paged' });
    const { heap, refusals } = await heapEdge(() => createPlan(sc.chunk), args);
    expect(refusals.length).toBeGreaterThan(0);
    for (const e of refusals) expect(e.message).toMatch(new RegExp(`prefillLayer \\(a c${ratio} layer, paged path\\): its pagedSparseAttention`));
    // the whole caches could not fit a task at the edge: the op reads compact ones
    expect(heap - HEAP_RESERVE_BYTES).toBeLessThan(swa.data.byteLength);
    await refusedFirst(heap - 1, createPlan(sc.chunk), args(createPlan(sc.chunk)));
    const engine = await engineWithHeap(heap);
    const compactBefore = pagedReadForTests.compactSets;
    const fresh = createPlan(sc.chunk);
    let r!: Awaited<ReturnType<typeof prefillLayer>>;
    const built = await plannerCalls(async () => (r = await prefillLayer(engine, args(fresh))));
    expect(pagedReadForTests.compactSets - compactBefore).toBe(ratio === 0 ? 1 : 2);
    await engine.dispose();
    // the check peeked the paged form (the ids decide the compact caches), and the layer ran with it: each built once, counted once
    expect(built).toEqual({ combineTopk: ratio === 4 ? 1 : 0, denseRows: ratio === 4 ? 0 : 1, compressedTokenIds: ratio === 0 ? 0 : 1, pagedForm: 1 });
    expect(planWork(fresh.stats)).toEqual([ratio === 4 ? 1 : 0, ratio === 0 ? 1 : 0, ratio === 128 ? 1 : 0, 1, ratio === 0 ? 0 : 1, 0]);
    const ref = prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, ...(topk ? { topkIndices: topk } : {}), smScale });
    expectWithinBounds(`c${ratio} paged compact at a heap of ${heap}`, r, ref, Array.from({ length: nq }, (_, i) => i));
    expect(r.dropped).toBe(ref.dropped);
    // the layer's edge is its op's own (the op alone over the same form, caches and q)
    const plan = createPlan(sc.chunk);
    const form = plan.pagedForm(ratio === 4 ? plan.combineC4(topk!) : plan.combinedRows(ratio));
    const extra = compressed !== undefined ? { extraKCache: compressed, extraIndices: form.extra!, extraTopkLength: form.extraLengths! } : {};
    await expectOpEdge(heap, (e) => e.pagedSparseAttention({ q, kCache: swa, indices: form.main, topkLength: form.mainLengths, ...extra, smScale }));
  }, 120_000);
});
