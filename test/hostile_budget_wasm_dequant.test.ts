/**
 * A wasm dequant's heap check lives in one place per path: the op checks that a task of one token
 * fits a worker's heap (TOO_LARGE naming `tokenIds`) before its budget check, and a layer checks its
 * dequants against the heap at the call (naming `plan` and the layer's op) before the budget
 * arithmetic (HostOpMemory.dequantizeKCache), which is arithmetic only: it gives the parts a call
 * counts whatever the heap. The edge is written here from the op's heap layout: a task holds per
 * token its gathered bytes twice (the staging's copy and the heap's), its int64 id and its bf16 row.
 */
import { describe, expect, test } from 'vitest';
import { SparseMlaError, createKvCache, createPlan, prefillLayer, tensor } from '../dist/index.js';
import { HEAP_RESERVE_BYTES } from '../dist/backends/wasm/wasm_backend.js';
import { dequantizeKCacheReference, quantizeKCacheReference } from '../dist/reference/index.js';
import { randomBf16Bits, testRng } from './helpers/random.js';
import { randomCache, randomScenario, randomTopk } from './helpers/chunks.js';
import { errorOf } from './helpers/errors.js';
import { planWork, spyOps } from './helpers/layer_work.js';
import { smallHeapWasmEngines } from './helpers/small_heap_wasm.js';

const rng = testRng('hostile_budget_wasm_dequant');

/** Heap bytes one token of a dequant task needs: its compact token twice, its int64 id, its bf16 row. */
const TOKEN_HEAP = { v4: 2 * (512 + 64 + 8) + 8 + 512 * 2, v32: 2 * 656 + 8 + 576 * 2 } as const;

const wasmEngine = smallHeapWasmEngines();

const heapRefusal = (argument: string, heap: number, need: number, call?: string) =>
  `${argument}: expected a call whose per-worker heap share fits the ${heap / 2 ** 20} MiB WASM heap (wasm32, no MEMORY64)${call ? `: ${call}` : ''}, got ${need} bytes for the shared inputs and one row (0 shared + ${need} per row)`;

describe('wasm dequant: one heap check per path', () => {
  test.each(['v4', 'v32'] as const)('%s: the op alone is refused one byte under a token\'s heap need, naming tokenIds, heap before budget; at the edge it gives the reference\'s rows', async (format) => {
    const need = TOKEN_HEAP[format];
    const tokens = format === 'v4' ? 128 : 100;
    const cache = format === 'v4' ? randomCache(rng, 16, 8) : createKvCache('v32', { pageSize: 1, numPages: tokens });
    if (format === 'v32') quantizeKCacheReference(cache, Array.from({ length: tokens }, (_, i) => i), tensor('bf16', [tokens, 576], randomBf16Bits(rng, tokens * 576)));
    const n = rng.int(20, 60);
    const ids = tensor('int32', [n], Int32Array.from({ length: n }, () => rng.int(0, tokens)));
    const short = HEAP_RESERVE_BYTES + need - 1;
    const { engine: tight } = await wasmEngine(short);
    const e = await errorOf(() => tight.dequantizeKCachePaged({ cache, tokenIds: ids }));
    expect(e).toBeInstanceOf(SparseMlaError);
    expect({ code: (e as SparseMlaError).code, argument: (e as SparseMlaError).argument, message: (e as Error).message })
      .toEqual({ code: 'TOO_LARGE', argument: 'tokenIds', message: heapRefusal('tokenIds', short, need) });
    // over the budget too: the heap is the refusal, as before
    const { engine: both } = await wasmEngine(short, 1024);
    expect((await errorOf(() => both.dequantizeKCachePaged({ cache, tokenIds: ids })) as Error).message).toBe(heapRefusal('tokenIds', short, need));
    // a heap that fits and a budget that does not: the budget's refusal, naming its output and ids
    const { engine: poor } = await wasmEngine(short + 1, n * 1024);
    const b = await errorOf(() => poor.dequantizeKCachePaged({ cache, tokenIds: ids }));
    expect((b as SparseMlaError).code).toBe('TOO_LARGE');
    expect((b as SparseMlaError).argument).toBe('tokenIds');
    const rowBytes = (format === 'v4' ? 512 : 576) * 2;
    // sizes in binary units: the output between a KiB and a MiB, the ids under a KiB
    expect([n * rowBytes >= 1024 && n * rowBytes < 2 ** 20, n * 4 < 1024]).toEqual([true, true]);
    expect((b as Error).message).toContain(`of host memory (output ${((n * rowBytes) / 1024).toFixed(2)} KiB, a copy of the token ids ${n * 4} B, staging of the gathered tokens `);
    expect((b as Error).message).toMatch(/^dequantizeKCachePaged: this call needs \d+ bytes /);
    const { engine: edge } = await wasmEngine(short + 1);
    const rows = await edge.dequantizeKCachePaged({ cache, tokenIds: ids });
    const ref = dequantizeKCacheReference(cache, ids);
    const f32 = new Float32Array(new Uint32Array(Array.from(rows.data as Uint16Array, (b) => b << 16)).buffer);
    expect(Array.from(f32, (x, i) => Object.is(x, ref[i]!) || (Number.isNaN(x) && Number.isNaN(ref[i]!)))).not.toContain(false);
  }, 60_000);

  test("its budget arithmetic is arithmetic only: on a heap too small for one token it still gives the parts a call counts", async () => {
    const n = rng.int(100, 5000);
    const { backend } = await wasmEngine(HEAP_RESERVE_BYTES + TOKEN_HEAP.v4 - 1);
    const none = { unshared: 0, callCopy: 0 };
    const parts = backend.opMemory.dequantizeKCache('v4', n, 512, none, { unshared: n * 4, callCopy: 0 }, 'host');
    expect(parts.slice(0, 2)).toEqual([{ what: 'output', bytes: n * 1024 }, { what: 'a copy of the token ids', bytes: n * 4 }]);
    expect(parts[2]!.what).toBe('staging of the gathered tokens');
    // a region per lane (at most one per worker) of at least one token
    expect(parts[2]!.bytes).toBeGreaterThanOrEqual(584);
  });

  test('a layer whose dequant cannot fit is refused at the call, naming plan and its op, before any op or plan work', async () => {
    const sc = randomScenario(rng, [rng.int(600, 1500)], [rng.int(2, 6)]);
    const hQ = 4, nq = sc.numQueries;
    const swa = randomCache(rng, sc.swaPageSize, sc.swaPages), c4 = randomCache(rng, sc.c4PageSize, sc.c4Pages);
    const q = tensor('bf16', [nq, hQ, 512], randomBf16Bits(rng, nq * hQ * 512, 1));
    const topk = randomTopk(rng, sc, 32);
    const short = HEAP_RESERVE_BYTES + TOKEN_HEAP.v4 - 1;
    for (const ratio of [4, 0] as const) {
      const { engine, backend } = await wasmEngine(short);
      const spy = spyOps(backend);
      const plan = createPlan(sc.chunk);
      const before = planWork(plan.stats);
      const e = await errorOf(() => prefillLayer(engine, { plan, compressRatio: ratio, q, caches: ratio === 4 ? { swa, c4 } : { swa }, ...(ratio === 4 ? { topkIndices: topk } : {}), smScale: 0.05, path: 'sparse' }));
      const call = `prefillLayer (a c${ratio} layer, sparse path): its dequantizeKCachePaged of caches.${ratio === 4 ? 'c4' : 'swa'}`;
      expect({ code: (e as SparseMlaError).code, argument: (e as SparseMlaError).argument, message: (e as Error).message })
        .toEqual({ code: 'TOO_LARGE', argument: 'plan', message: heapRefusal('plan', short, TOKEN_HEAP.v4, call) });
      expect(spy.calls).toEqual([]);
      expect(planWork(plan.stats)).toEqual(before);
    }
  }, 60_000);
});
