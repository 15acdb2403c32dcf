// Device-resident inputs of the layer scripts (bench/layer_probe.mjs,
// bench/experiments/layer_wall_trace.mjs), the GPU bench's own (src/cli/gpu_bench.ts): random bf16
// tensors, v4 caches of one quantized random page tiled, and a c4 layer's indexer top-k (GPU only);
// and per-row random v4 caches on any engine (randomV4Cache). `npm run build` first.
import { createKvCache, toBf16 } from '../dist/index.js';
import { randomC4Topk, randomDeviceBf16, tiledDeviceCache } from '../dist/cli/gpu_bench.js';

/** The helpers over a cuda engine and a seeded rng (makeRng). */
export function deviceInputs(engine, rng) {
  return {
    /** A device bf16 tensor of random values (a 16 MiB random block tiled). */
    randomDevice: (shape) => randomDeviceBf16(engine, rng, shape),
    /** A device v4 cache of `pages` pages of 64 tokens: one quantized random page tiled. */
    deviceCache: (pages) => tiledDeviceCache(engine, rng, 'v4', pages),
    /** A c4 layer's top-k of n queries (int32 [n, topk], −1 padded): random visible positions. */
    c4TopkIndices: (n, topk) => randomC4Topk(rng, n, topk),
  };
}

/**
 * A v4 cache (P 64) of at least `tokens` tokens, every row its own: values uniform in [−1, 1) from
 * `rand` (a () => [0, 1) generator), quantized once by the engine; uploaded when `device` (the layer
 * scripts bench/layer_paths_wall.mjs and bench/experiments/layer_path_trace.mjs).
 */
export async function randomV4Cache(engine, tokens, rand, device) {
  const numPages = Math.max(1, Math.ceil(tokens / 64));
  const cache = createKvCache('v4', { pageSize: 64, numPages });
  const n = numPages * 64;
  const rows = toBf16({ shape: [n, 512], data: Float32Array.from({ length: n * 512 }, () => rand() * 2 - 1) });
  await engine.quantizeKCache({ cache, tokenIds: Array.from({ length: n }, (_, i) => i), rows });
  return device ? engine.uploadKvCache(cache) : cache;
}
