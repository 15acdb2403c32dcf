// Wall time of host pagedSparseAttention calls (cpu or wasm) that read a few tokens of a long v4
// cache (a decode step's top-k over a 32K- or 128K-token cache), and of the op's plan and gather
// alone (planPagedReads(...).gather(), the part src/backends/paged_gather.ts runs at the call), two
// builds compared in alternated processes: each pair runs one process of each build (A B, then B A,
// and so on, so a drift of the machine's speed falls on both), each process one engine timing every
// shape (n x hQ x topk) over one cache, and the ratio new / base is taken per pair and shape. The
// cache is unshared (allocated by createKvCache), its pages copies of one quantized page of random
// rows; each row's ids are distinct random tokens of it. The cpu backend loads the addon each
// build's loader finds (SPARSE_MLA_NATIVE_ADDON=<file> gives both the same one).
//   node bench/paged_gather_rows.mjs --new DIST --base DIST [--backend cpu|wasm] [--pairs 5]
//     [--calls 7] [--workers 2] [--tokens 32768,131072] [--rows 1,4] [--heads 64] [--topk 512,2048]
// One process alone (what each pair runs): --child --dist DIST --tokens N and the lists above;
// prints one JSON line of per-shape medians (ms).
import { fileURLToPath, pathToFileURL } from 'node:url';
import { alternatedRuns, medianCallMs, optionArgs, pairTable, takeComparison, takeList, takeOption } from './lib.mjs';

const args = process.argv.slice(2);
const child = args.includes('--child');
const tokenList = takeList(args, '--tokens', '32768,131072').map(Number);
const rowsList = takeList(args, '--rows', '1,4').map(Number);
const heads = takeList(args, '--heads', '64').map(Number);
const topks = takeList(args, '--topk', '512,2048').map(Number);
const calls = Number(takeOption(args, '--calls') ?? 7);
const workers = Number(takeOption(args, '--workers') ?? 2);
const backend = takeOption(args, '--backend') ?? 'cpu';
const PAGE = 64;

if (child) {
  const dist = pathToFileURL(`${takeOption(args, '--dist')}/`).href;
  const { createEngine, createKvCache, tensor } = await import(`${dist}index.js`);
  const { makeRng, randomBf16Bits } = await import(`${dist}check/grid.js`);
  const paged = await import(`${dist}backends/paged_gather.js`);
  const { planPagedReads } = paged;
  // the backend's kept scratches where the build has them (an older build ignores the argument)
  const pool = paged.PagedScratchPool ? new paged.PagedScratchPool() : undefined;
  const tokens = tokenList[0];
  const engine = await createEngine({ backend, workers });
  const rng = makeRng(60);
  const kCache = createKvCache('v4', { pageSize: PAGE, numPages: tokens / PAGE });
  const page = kCache.data.length / kCache.numPages;
  await engine.quantizeKCache({ cache: kCache, tokenIds: Array.from({ length: PAGE }, (_, i) => i), rows: tensor('bf16', [PAGE, 512], randomBf16Bits(rng, PAGE * 512)) });
  for (let p = 1; p < kCache.numPages; p++) kCache.data.copyWithin(p * page, 0, page);
  // the backend's copies of a cache (cpu_backend's cpuOpMemory, wasm_backend's opMemory)
  const copies = backend === 'cpu' ? { whole: (u) => (u ? 1 : 0), compact: 1 } : { whole: (u) => (u ? 1 : 0) + 1, compact: 2 };
  const out = { backend, tokens, workers, calls, ms: {} };
  const timed = (f) => medianCallMs(f, calls);
  for (const n of rowsList) {
    for (const hQ of heads) {
      for (const topk of topks) {
        const ids = new Int32Array(n * topk);
        for (let i = 0; i < n; i++) {
          const row = new Set();
          while (row.size < topk) row.add(Math.floor(rng.uniform() * tokens));
          ids.set([...row], i * topk);
        }
        const call = { q: tensor('bf16', [n, hQ, 512], randomBf16Bits(rng, n * hQ * 512)), kCache, indices: tensor('int32', [n, topk], ids), smScale: 0.04 };
        const job = { q: call.q.data, n, hQ, main: { cache: { ...kCache, numTokens: tokens, bytes: kCache.data.length }, indices: ids, topk, topkLength: null }, extra: null, attnSink: null, smScale: 0.04 };
        const shape = `n${n}_hQ${hQ}_topk${topk}`;
        out.ms[`${shape}_call`] = await timed(() => engine.pagedSparseAttention(call));
        out.ms[`${shape}_plan`] = await timed(() => planPagedReads(job, copies, pool).gather());
      }
    }
  }
  await engine.dispose();
  console.log(JSON.stringify(out));
} else {
  const { builds, pairs } = takeComparison(args);
  const shared = optionArgs({ '--backend': backend, '--rows': rowsList, '--heads': heads, '--topk': topks, '--calls': calls, '--workers': workers });
  for (const tokens of tokenList) {
    const got = await alternatedRuns(fileURLToPath(import.meta.url), builds, pairs, ['--tokens', String(tokens), ...shared]);
    console.log(`# ${backend} pagedSparseAttention, v4 cache of ${tokens} tokens (pages of ${PAGE}), ${workers} workers, ${pairs} pairs, per process the median of ${calls} after 1 warm-up; _plan: planPagedReads(...).gather() alone`);
    for (const line of pairTable(got, 29, 3)) console.log(line);
  }
}
