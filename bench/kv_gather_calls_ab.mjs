// Wall time of host sparsePrefill calls of two builds in one process, alternated call by call (A B,
// then B A, ...), so that the host's drift and its neighbours' load fall on both alike: the sharper
// view where alternated processes (bench/wasm_prefill_kv_rows.mjs) drown a few percent in a loaded
// host's noise. Each build its own engine (cpu: the addon both builds' loaders find, loaded once;
// SPARSE_MLA_NATIVE_ADDON=<file> names it), the same arguments: an unshared bf16 kv, each row's ids
// distinct random rows of it, attnSink. Per shape, the median of each build's calls and the median of
// the per-pair ratios new / base, with the ratios' quartiles.
//   node bench/kv_gather_calls_ab.mjs --new DIST --base DIST [--backend cpu|wasm] [--pairs 15]
//     [--workers 2] [--kv 131072:576] [--rows 1,2,16] [--heads 64,128] [--topk 512,2048]
//     [--base-force whole|compact]
// --base-force: the base build's calls with its gather forced (prefillGatherForTests.force, set
// around each of its calls): --new D --base D --base-force whole times a build's own choice
// against its whole kv, the cost of a plan that ends in a whole read.
import { pathToFileURL } from 'node:url';
import { loadavg } from 'node:os';
import { median, takeOption } from './lib.mjs';

const args = process.argv.slice(2);
const dists = { new: takeOption(args, '--new'), base: takeOption(args, '--base') };
if (!dists.new || !dists.base) throw new Error('give --new DIST and --base DIST');
const list = (name, fallback) => (takeOption(args, name) ?? fallback).split(',');
const [sKV, dQK] = (takeOption(args, '--kv') ?? '131072:576').split(':').map(Number);
const rowsList = list('--rows', '1,2,16').map(Number);
const heads = list('--heads', '64,128').map(Number);
const topks = list('--topk', '512,2048').map(Number);
const pairs = Number(takeOption(args, '--pairs') ?? 15);
const workers = Number(takeOption(args, '--workers') ?? 2);
const backend = takeOption(args, '--backend') ?? 'cpu';
const baseForce = takeOption(args, '--base-force') ?? null;

const lib = {};
for (const b of ['new', 'base']) lib[b] = await import(pathToFileURL(`${dists[b]}/index.js`).href);
const { makeRng, randomBf16Bits } = await import(pathToFileURL(`${dists.base}/check/grid.js`).href);
const baseGather = (await import(pathToFileURL(`${dists.base}/backends/prefill_gather.js`).href)).prefillGatherForTests;
/** A call of build `b`: the base's with its gather forced where asked. */
async function callOf(b, args) {
  if (b === 'new' || !baseForce) return engines[b].sparsePrefill(args);
  baseGather.force = baseForce;
  try {
    return await engines[b].sparsePrefill(args);
  } finally {
    baseGather.force = null;
  }
}
const engines = { new: await lib.new.createEngine({ backend, workers }), base: await lib.base.createEngine({ backend, workers }) };
const rng = makeRng(60);
const kvBits = randomBf16Bits(rng, sKV * dQK);
const quartiles = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return [s[Math.floor((s.length - 1) / 4)], s[Math.ceil(((s.length - 1) * 3) / 4)]];
};
console.log(`# ${backend} sparsePrefill, kv ${sKV} x ${dQK}, ${workers} workers${baseForce ? `, base forced ${baseForce}` : ''}, ${pairs} alternated pairs per shape after 1 warm-up each; load ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
console.log('shape                      new ms   base ms   new/base: median [quartiles]');
for (const rows of rowsList) {
  for (const hQ of heads) {
    for (const topk of topks) {
      const q = randomBf16Bits(rng, rows * hQ * dQK);
      const ids = new Int32Array(rows * topk);
      for (let i = 0; i < rows; i++) {
        const row = new Set();
        while (row.size < topk) row.add(Math.floor(rng.uniform() * sKV));
        ids.set([...row], i * topk);
      }
      const sink = Float32Array.from({ length: hQ }, () => rng.normal());
      // each build's own tensors over the same bits (an unshared kv: staged or gathered per call)
      const call = {};
      for (const b of ['new', 'base']) {
        const { tensor } = lib[b];
        call[b] = { q: tensor('bf16', [rows, hQ, dQK], q), kv: tensor('bf16', [sKV, dQK], kvBits), indices: tensor('int32', [rows, topk], ids), attnSink: tensor('float32', [hQ], sink), smScale: 1 / Math.sqrt(dQK) };
      }
      for (const b of ['new', 'base']) await callOf(b, call[b]);
      const t = { new: [], base: [] };
      for (let i = 0; i < pairs; i++) {
        for (const b of i % 2 ? ['base', 'new'] : ['new', 'base']) {
          const t0 = performance.now();
          await callOf(b, call[b]);
          t[b].push(performance.now() - t0);
        }
      }
      const ratios = t.new.map((x, i) => x / t.base[i]);
      const [lo, hi] = quartiles(ratios);
      console.log(`${`rows${rows}_hQ${hQ}_topk${topk}`.padEnd(24)} ${median(t.new).toFixed(1).padStart(8)} ${median(t.base).toFixed(1).padStart(9)}   ${median(ratios).toFixed(3)} [${lo.toFixed(3)} - ${hi.toFixed(3)}]`);
    }
  }
}
await Promise.all([engines.new.dispose(), engines.base.dispose()]);
