// Child process of test/memory.test.ts: one large dequantizeKCachePaged on a fresh engine, and how
// far the process's peak resident set rose during it, as a multiple of the output's size.
//   node test/children/peak.mjs <backend> <outputMiB>
import { createEngine, createKvCache, tensor } from '../../dist/index.js';

const [backend, outArg] = process.argv.slice(2);
const engine = await createEngine({ backend, workers: 2 });
const tokens = 64 * 64;
const cache = createKvCache('v4', { pageSize: 64, numPages: 64 });
const all = tensor('int32', [tokens], Int32Array.from({ length: tokens }, (_, i) => i));
await engine.quantizeKCache({ cache, tokenIds: all, rows: tensor('float32', [tokens, 512], Float32Array.from({ length: tokens * 512 }, (_, i) => Math.sin(i))) });
const n = Math.round((Number(outArg) * 2 ** 20) / 1024);
const ids = tensor('int32', [n], Int32Array.from({ length: n }, (_, i) => (i * 2654435761) % tokens));
await engine.dequantizeKCachePaged({ cache, tokenIds: all }); // warm the workers
const before = process.resourceUsage().maxRSS * 1024;
const out = await engine.dequantizeKCachePaged({ cache, tokenIds: ids });
const peak = process.resourceUsage().maxRSS * 1024;
const ref = await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [1], new Int32Array([ids.data[n - 1]])) });
const lastRowMatches = ref.data.every((v, d) => v === out.data[(n - 1) * 512 + d]);
await engine.dispose();
process.stdout.write(`${JSON.stringify({ outputBytes: out.data.byteLength, peakGrowth: (peak - before) / out.data.byteLength, lastRowMatches })}\n`);
