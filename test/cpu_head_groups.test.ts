/**
 * The `cpu` backend splits a call with fewer query rows than threads by heads as well (each unit one
 * row's run of consecutive heads, native/addon/cpu_ops.cpp): sparsePrefill and pagedSparseAttention at
 * head counts that split evenly, with a remainder group, and not at all, judged against the float64
 * reference with SPEC §4's bounds, and equal bit for bit to what one thread computes. Each head has
 * its own sink (±inf on a few), so a group reading another's heads shows.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createEngine, createKvCache, tensor } from '../dist/index.js';
import type { Engine, KvCache, PagedSparseAttentionArgs, SparsePrefillArgs, Tensor } from '../dist/index.js';
import * as R from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';
import { expectWithinBounds } from './helpers/judge.js';
import { randomBf16Bits, randomPrefillArgs, testRng, type Rng } from './helpers/random.js';

const rng = testRng('cpu_head_groups');
const WORKERS = [2, 3, 16];

/** A sink per head, N(0, 1) but +inf on head 0 and head 9 (after a group's edge) and −inf on the last. */
function edgeSink(r: Rng, hQ: number): Tensor<'float32'> {
  return tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => (h === 0 || h === 9 ? Infinity : h === hQ - 1 ? -Infinity : r.normal())));
}

/** [n, topk] ids into `tokens`, a fifth of them outside it (skipped, never read). */
function ids(r: Rng, n: number, topk: number, tokens: number): Tensor<'int32'> {
  return tensor('int32', [n, topk], Int32Array.from({ length: n * topk }, () => (r.uniform() < 0.2 ? r.pick([-1, tokens, 2 ** 31 - 1]) : r.int(0, tokens))));
}

function expectSameBits(label: string, got: { out: Tensor; lse: Tensor; maxLogits: Tensor }, one: { out: Tensor; lse: Tensor; maxLogits: Tensor }): void {
  for (const k of ['out', 'lse', 'maxLogits'] as const) {
    const a = new Uint8Array(got[k].data.buffer, got[k].data.byteOffset, got[k].data.byteLength);
    const b = new Uint8Array(one[k].data.buffer, one[k].data.byteOffset, one[k].data.byteLength);
    expect(Buffer.compare(Buffer.from(a), Buffer.from(b)), `${label}: ${k} differs from one thread's`).toBe(0);
  }
}

describe.skipIf(!nativeAddonBuilt())('cpu backend: few query rows split by heads over the threads', () => {
  let one: Engine;
  const engines = new Map<number, Engine>();
  beforeAll(async () => {
    one = await createEngine({ backend: 'cpu', workers: 1 });
    for (const w of WORKERS) engines.set(w, await createEngine({ backend: 'cpu', workers: w }));
  }, 60_000);
  afterAll(async () => {
    await Promise.all([one?.dispose(), ...[...engines.values()].map((e) => e.dispose())]);
  });

  // (each big enough for the work to take more threads than it has rows; hQ 8 is never split)
  const prefillShapes = [
    { sQ: 1, hQ: 128, dQK: 576, sKV: 700, topk: 300 },
    { sQ: 2, hQ: 64, dQK: 512, sKV: 400, topk: 200 },
    { sQ: 1, hQ: 20, dQK: 576, sKV: 500, topk: 300 },
    { sQ: 3, hQ: 24, dQK: 512, sKV: 500, topk: 400 },
    { sQ: 1, hQ: 16, dQK: 512, sKV: 500, topk: 400 },
    { sQ: 1, hQ: 8, dQK: 576, sKV: 200, topk: 70 },
  ];
  for (const s of prefillShapes) {
    test(`sparsePrefill sQ ${s.sQ}, hQ ${s.hQ}, dQK ${s.dQK}, topk ${s.topk}: within bounds and one thread's bits`, async () => {
      const args: SparsePrefillArgs = { ...randomPrefillArgs(rng, s, { invalidFraction: 0.2 }), attnSink: edgeSink(rng, s.hQ) };
      args.topkLength = tensor('int32', [s.sQ], Int32Array.from({ length: s.sQ }, () => rng.int(s.topk >> 1, s.topk + 1)));
      const ref = R.sparsePrefillReference(args);
      const queries = Array.from({ length: s.sQ }, (_, i) => i);
      const single = await one.sparsePrefill(args);
      for (const [w, e] of engines) {
        const got = await e.sparsePrefill(args);
        expectWithinBounds(`${w} threads`, got, ref, queries);
        expectSameBits(`${w} threads`, got, single);
      }
    });
  }

  async function filledCache(r: Rng, pageSize: number, numPages: number): Promise<KvCache> {
    const cache = createKvCache('v4', { pageSize, numPages });
    const n = pageSize * numPages;
    await one.quantizeKCache({ cache, tokenIds: Array.from({ length: n }, (_, i) => i), rows: tensor('bf16', [n, 512], randomBf16Bits(r, n * 512)) });
    return cache;
  }

  const pagedShapes = [
    { n: 1, hQ: 128, topk: 128, extra: 256 },
    { n: 2, hQ: 64, topk: 64, extra: 0 },
    { n: 1, hQ: 40, topk: 96, extra: 64 },
    { n: 1, hQ: 8, topk: 64, extra: 32 },
  ];
  for (const s of pagedShapes) {
    test(`pagedSparseAttention n ${s.n}, hQ ${s.hQ}, topk ${s.topk}${s.extra ? ` + extra ${s.extra}` : ''}: within bounds and one thread's bits`, async () => {
      const kCache = await filledCache(rng, 64, 5);
      const args: PagedSparseAttentionArgs = {
        q: tensor('bf16', [s.n, s.hQ, 512], randomBf16Bits(rng, s.n * s.hQ * 512)),
        kCache,
        indices: ids(rng, s.n, s.topk, 64 * 5),
        smScale: 1 / Math.sqrt(512),
        attnSink: edgeSink(rng, s.hQ),
      };
      if (s.extra) {
        args.extraKCache = await filledCache(rng, 128, 2);
        args.extraIndices = ids(rng, s.n, s.extra, 128 * 2);
        args.extraTopkLength = tensor('int32', [s.n], Int32Array.from({ length: s.n }, () => rng.int(0, s.extra + 1)));
      }
      const ref = R.pagedSparseAttentionReference(args);
      const queries = Array.from({ length: s.n }, (_, i) => i);
      const single = await one.pagedSparseAttention(args);
      for (const [w, e] of engines) {
        const got = await e.pagedSparseAttention(args);
        expectWithinBounds(`${w} threads`, got, ref, queries);
        expectSameBits(`${w} threads`, got, single);
      }
    });
  }
});
