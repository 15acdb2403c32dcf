// Child process of test/ownership.test.ts (run with --expose-gc): starts each op with its inputs in
// ordinary (detachable) ArrayBuffers, transfers those buffers away while the call runs, collects
// and overwrites the memory, and reports how each call settled, judged against the float64
// reference of the data as it was at the call. A crash (the bug this guards against) ends the
// process with a signal instead of a report.
//   node --expose-gc test/children/detach.mjs <backend> <seed>
import { SparseMlaError, createEngine, createKvCache, tensor } from '../../dist/index.js';
import * as R from '../../dist/reference/index.js';
import { makeRng, randomBf16Bits, randomIndices } from '../../dist/check/grid.js';
import { judgeAttention } from './judge.mjs';

const [backend, seedArg] = process.argv.slice(2);
const rng = makeRng(Number(seedArg) >>> 0);
const engine = await createEngine({ backend, workers: 2 });

/** Detaches each array's buffer (the clone that now owns the memory is dropped), then reuses the memory. */
function pullAway(...arrays) {
  for (const a of arrays) structuredClone(a.buffer, { transfer: [a.buffer] });
  for (const a of arrays) if (a.byteLength !== 0) throw new Error('the buffer did not detach');
  globalThis.gc();
  const junk = [];
  for (let i = 0; i < 6; i++) junk.push(new Uint8Array(16 << 20).fill(0xa5));
  return junk.length;
}

async function settle(p) {
  try {
    return { ok: true, value: await p };
  } catch (e) {
    return { ok: false, typed: e instanceof SparseMlaError, code: e?.code ?? null, name: e?.name ?? null, message: String(e?.message ?? e) };
  }
}

const judge = judgeAttention;
const copyArgs = (a) => structuredClone(a);
const report = {};

// sparsePrefill: q, kv, indices, topkLength, attnSink all detached mid-call.
{
  const sQ = 48, hQ = 16, dQK = 512, sKV = 6000, topk = 512;
  const args = {
    q: tensor('bf16', [sQ, hQ, dQK], randomBf16Bits(rng, sQ * hQ * dQK)),
    kv: tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK)),
    indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.1, 0.05, [])),
    topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(0, topk + 1))),
    attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
    smScale: 1 / Math.sqrt(dQK),
  };
  const before = copyArgs(args);
  const p = engine.sparsePrefill(args);
  pullAway(args.q.data, args.kv.data, args.indices.data, args.topkLength.data, args.attnSink.data);
  const r = await settle(p);
  if (r.ok) {
    const ref = R.sparsePrefillReference(before);
    r.value = judge(r.value, ref, hQ);
  }
  report.sparsePrefill = r;
}

// A v4 cache with every token quantized (by the engine: its quantize is checked elsewhere), for
// the dequant and the paged path.
async function filledCache(pageSize, numPages) {
  const cache = createKvCache('v4', { pageSize, numPages });
  const n = pageSize * numPages;
  const ids = tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => i));
  await engine.quantizeKCache({ cache, tokenIds: ids, rows: tensor('bf16', [n, 512], randomBf16Bits(rng, n * 512)) });
  return cache;
}

// pagedSparseAttention: q, both caches, indices detached mid-call.
{
  const n = 16, hQ = 16, topk = 384, extraTopk = 128;
  const kCache = await filledCache(64, 40);
  const extraKCache = await filledCache(2, 600);
  const args = {
    q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)),
    kCache,
    indices: tensor('int32', [n, topk], randomIndices(rng, n, topk, 64 * 40, 0.1, 0.05, [])),
    extraKCache,
    extraIndices: tensor('int32', [n, extraTopk], randomIndices(rng, n, extraTopk, 1200, 0.1, 0, [])),
    smScale: 1 / Math.sqrt(512),
  };
  const before = copyArgs(args);
  const p = engine.pagedSparseAttention(args);
  pullAway(args.q.data, kCache.data, args.indices.data, extraKCache.data, args.extraIndices.data);
  const r = await settle(p);
  if (r.ok) {
    const ref = R.pagedSparseAttentionReference(before);
    r.value = judge(r.value, ref, hQ);
  }
  report.pagedSparseAttention = r;
}

// dequantizeKCachePaged: the cache and the ids detached mid-call.
{
  const tokens = 64 * 40;
  const cache = await filledCache(64, 40);
  const n = 40000;
  const ids = Int32Array.from({ length: n }, () => rng.int(0, tokens));
  const table = R.dequantizeKCacheReference(structuredClone(cache), Array.from({ length: tokens }, (_, i) => i));
  const p = engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [n], ids) });
  const want = Array.from(ids);
  pullAway(cache.data, ids);
  const r = await settle(p);
  if (r.ok) {
    const got = r.value.data;
    let exact = true;
    for (let i = 0; i < n && exact; i++) for (let d = 0; d < 512; d++) if (R.decodeBf16(got[i * 512 + d]) !== table[want[i] * 512 + d]) exact = false;
    r.value = { exact };
  }
  report.dequantizeKCachePaged = r;
}

// quantizeKCache: the cache transferred mid-call. Whatever the call does, it must not write into
// the memory it no longer owns: the transferred copy keeps exactly the bytes it had.
{
  const cache = createKvCache('v4', { pageSize: 64, numPages: 400 });
  cache.data.fill(0x5a);
  const n = 20000;
  const rows = tensor('float32', [n, 512], Float32Array.from({ length: n * 512 }, () => rng.normal()));
  const ids = Int32Array.from({ length: n }, (_, i) => (i * 7) % (64 * 400));
  const p = engine.quantizeKCache({ cache, tokenIds: tensor('int32', [n], ids), rows });
  const moved = new Uint8Array(structuredClone(cache.data.buffer, { transfer: [cache.data.buffer] }));
  const r = await settle(p);
  r.movedUntouched = moved.every((b) => b === 0x5a);
  report.quantizeKCache = r;
}

await engine.dispose();
process.stdout.write(`${JSON.stringify(report)}\n`);
