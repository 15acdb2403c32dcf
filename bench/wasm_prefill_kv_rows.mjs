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
import { execFileSync } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { median, takeOption } from './lib.mjs';

const args = process.argv.slice(2);
const child = args.includes('--child');
const list = (name, fallback) => (takeOption(args, name) ?? fallback).split(',');
const kvSizes = list('--kv', '32768:512,131072:576');
const rowsList = list('--rows', '1,2,16').map(Number);
const heads = list('--heads', '64,128').map(Number);
const topks = list('--topk', '512,1024,2048').map(Number);
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
        await engine.sparsePrefill(call); // warm-up: the heaps grow (wasm), the staging slab is made
        const t = [];
        for (let i = 0; i < calls; i++) {
          const t0 = performance.now();
          await engine.sparsePrefill(call);
          t.push(performance.now() - t0);
        }
        out.ms[`rows${rows}_hQ${hQ}_topk${topk}`] = +median(t).toFixed(2);
      }
    }
  }
  await engine.dispose();
  console.log(JSON.stringify(out));
} else {
  const builds = { new: takeOption(args, '--new'), base: takeOption(args, '--base') };
  if (!builds.new || !builds.base) throw new Error('give --new DIST and --base DIST');
  const pairs = Number(takeOption(args, '--pairs') ?? 5);
  const script = fileURLToPath(import.meta.url);
  const shared = ['--backend', backend, '--rows', rowsList.join(','), '--heads', heads.join(','), '--topk', topks.join(','), '--calls', String(calls), '--workers', String(workers)];
  const run = (build, kvSize) => JSON.parse(execFileSync(process.execPath, [script, '--child', '--dist', builds[build], '--kv', kvSize, ...shared], { encoding: 'utf8', maxBuffer: 1 << 24 }).trim().split('\n').at(-1));
  for (const kvSize of kvSizes) {
    const got = { new: [], base: [] };
    for (let p = 0; p < pairs; p++) {
      for (const build of p % 2 ? ['base', 'new'] : ['new', 'base']) got[build].push(run(build, kvSize).ms);
    }
    console.log(`# ${backend}, kv ${kvSize.replace(':', ' rows x dQK ')}, ${workers} workers, ${pairs} pairs, per process the median of ${calls} calls after 1 warm-up`);
    console.log('shape                      new ms   base ms   new/base per pair: median [min - max]');
    for (const shape of Object.keys(got.new[0])) {
      const ratios = got.new.map((n, i) => n[shape] / got.base[i][shape]);
      const f = (x) => x.toFixed(3);
      console.log(`${shape.padEnd(24)} ${median(got.new.map((x) => x[shape])).toFixed(1).padStart(8)} ${median(got.base.map((x) => x[shape])).toFixed(1).padStart(9)}   ${f(median(ratios))} [${f(Math.min(...ratios))} - ${f(Math.max(...ratios))}]`);
    }
  }
}
