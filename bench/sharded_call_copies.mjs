// The host copies of one prefillLayerSharded split by heads (two engines) with a host q, two builds
// side by side in one process, their layers alternated (A B, then B A): the bf16 bytes copied
// through Uint16Array.prototype.set during the layer (a counting hook: cutting each shard's heads,
// copying into staging, placing outputs; slice() copies are not seen by it), the ArrayBuffer bytes
// the layer leaves allocated (process.memoryUsage().arrayBuffers after against before, after gc():
// copies still referenced at the end, plus outputs) and its wall time. One fresh request of nq
// tokens, ratio 0, window 8 (a small attention beside the copies). Run with --expose-gc.
//   node --expose-gc bench/sharded_call_copies.mjs <distA> <distB> <backend> <nq> <hQ> <rounds>
import { median } from './lib.mjs';

const [distA, distB, backend, nqArg, hQArg, roundsArg] = process.argv.slice(2);
const nq = Number(nqArg), hQ = Number(hQArg), rounds = Number(roundsArg);
async function build(dist) {
  const lib = await import(`${dist}/index.js`);
  const engines = [await lib.createEngine({ backend, workers: 1 }), await lib.createEngine({ backend, workers: 1 })];
  const chunk = { requests: [{ seqLen: nq, extendLen: nq, swaTokenIds: Int32Array.from({ length: nq }, (_, i) => i) }] };
  const caches = { swa: lib.createKvCache('v4', { pageSize: 64, numPages: Math.ceil(nq / 64) }) };
  const plan = lib.createShardedPlan(chunk, { shards: 2, split: 'heads', window: 8 });
  const q = lib.tensor('bf16', [nq, hQ, 512], new Uint16Array(nq * hQ * 512).fill(0x3c00));
  return { engines, layer: () => lib.prefillLayerSharded(engines, { plan, compressRatio: 0, q, caches, smScale: 0.05, path: 'sparse' }) };
}
const builds = [await build(distA), await build(distB)];
// a counting hook: bf16 bytes copied through Uint16Array.prototype.set (cutting heads, copying q into a slab, placing outputs)
let setBytes = 0;
const set = Uint16Array.prototype.set;
Uint16Array.prototype.set = function (src, offset) { setBytes += (src?.length ?? 0) * 2; return set.call(this, src, offset); };
for (const b of builds) for (let i = 0; i < 3; i++) await b.layer();
const bytes = [[], []], ms = [[], []], copied = [[], []];
for (let r = 0; r < rounds; r++) for (const k of r % 2 ? [1, 0] : [0, 1]) {
  globalThis.gc();
  const before = process.memoryUsage().arrayBuffers, t0 = performance.now();
  setBytes = 0;
  await builds[k].layer();
  ms[k].push(performance.now() - t0);
  copied[k].push(setBytes);
  bytes[k].push(process.memoryUsage().arrayBuffers - before);
}
for (const b of builds) for (const e of b.engines) await e.dispose();
console.log(JSON.stringify({ backend, nq, hQ, qBytes: nq * hQ * 1024, rounds, A: { medianU16SetBytes: median(copied[0]), medianBytes: median(bytes[0]), medianMs: +median(ms[0]).toFixed(2) }, B: { medianU16SetBytes: median(copied[1]), medianBytes: median(bytes[1]), medianMs: +median(ms[1]).toFixed(2) }, u16SetBytesSaved: median(copied[0]) - median(copied[1]), msRatio: +(median(ms[1]) / median(ms[0])).toFixed(3) }));
