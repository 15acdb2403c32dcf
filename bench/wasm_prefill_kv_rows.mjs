// Wall time of host sparsePrefill calls (wasm, or cpu with --backend cpu) over a few query rows and
// a long kv (a decode step over a 32K- or 128K-row workspace), two builds compared in alternated
// processes: each pair runs one process of each build (A B, then B A, and so on, so a drift of the
// machine's speed falls on both), each process one engine timing every shape (rows x hQ x topk) over
// one kv, and the ratio new / base is taken per pair and shape. The kv is an unshared bf16 array
// (staged by the call), each row's ids distinct random rows of it. The cpu backend loads the addon
// each build's loader finds (SPARSE_MLA_NATIVE_ADDON=<file> gives both the same one).
//   node bench/wasm_prefill_kv_rows.mjs --new DIST --base DIST [--backend wasm|cpu] [--pairs 5]
//     [--calls 5] [--workers 2] [--kv 32768:512,131072:576] [--rows 1,2,16] [--heads 64,128]
//     [--topk 512,1024,2048]
// One process alone (what each pair runs): --child --dist DIST --kv ROWS:DQK and the lists above;
// prints one JSON line of per-shape medians (ms).
import { fileURLToPath, pathToFileURL } from 'node:url';
import { alternatedRuns, medianCallMs, optionArgs, pairTable, takeComparison, takeList, takeOption } from './lib.mjs';

const args = process.argv.slice(2);
const child = args.includes('--child');
const kvSizes = takeList(args, '--kv', '32768:512,131072:576');
const rowsList = takeList(args, '--rows', '1,2,16').map(Number);
const heads = takeList(args, '--heads', '64,128').map(Number);
const topks = takeList(args, '--topk', '512,1024,2048').map(Number);
const calls = Number(takeOption(args, '--calls') ?? 5);
const workers = Number(takeOption(args, '--workers') ?? 2);
const backend = takeOption(args, '--backend') ?? 'wasm';

if (child) {
  const dist = pathToFileURL(`${takeOption(args, '--dist')}/`).href;
  const { createEngine, tensor } = await import(`${dist}index.js`);
  const { makeRng, randomBf16Bits, randomIndices } = await import(`${dist}check/grid.js`);
  const [sKV, dQK] = kvSizes[0].split(':').map(Number);
  const engine = await createEngine({ backend, workers });
  const rng = makeRng(59);
  const kv = tensor('bf16', [sKV, dQK], randomBf16Bits(rng, sKV * dQK));
  const out = { backend, sKV, dQK, workers, calls, ms: {} };
  for (const rows of rowsList) {
    for (const hQ of heads) {
      for (const topk of topks) {
        const call = {
          q: tensor('bf16', [rows, hQ, dQK], randomBf16Bits(rng, rows * hQ * dQK)),
          kv,
          indices: tensor('int32', [rows, topk], randomIndices(rng, rows, topk, sKV, 0, 0, [])),
          attnSink: tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())),
          smScale: 1 / Math.sqrt(dQK),
        };
        // the warm-up call: the heaps grow (wasm), the staging slab is made
        out.ms[`rows${rows}_hQ${hQ}_topk${topk}`] = await medianCallMs(() => engine.sparsePrefill(call), calls, 1, 2);
      }
    }
  }
  await engine.dispose();
  console.log(JSON.stringify(out));
} else {
  const { builds, pairs } = takeComparison(args);
  const shared = optionArgs({ '--backend': backend, '--rows': rowsList, '--heads': heads, '--topk': topks, '--calls': calls, '--workers': workers });
  for (const kvSize of kvSizes) {
    const got = await alternatedRuns(fileURLToPath(import.meta.url), builds, pairs, ['--kv', kvSize, ...shared]);
    console.log(`# ${backend}, kv ${kvSize.replace(':', ' rows x dQK ')}, ${workers} workers, ${pairs} pairs, per process the median of ${calls} calls after 1 warm-up`);
    for (const line of pairTable(got, 24, 1)) console.log(line);
  }
}
