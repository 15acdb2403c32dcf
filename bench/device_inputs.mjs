// Device-resident inputs of the layer scripts (bench/layer_probe.mjs, bench/experiments/
// layer_wall_trace.mjs, layer_cold_runs.mjs), the GPU bench's own (src/cli/gpu_bench.ts): random bf16
// tensors, v4 caches of one quantized random page tiled, a c4 layer's indexer top-k and the whole
// layer (GPU only); and per-row random v4 caches on any engine (randomV4Cache). `npm run build` first.
import { createKvCache, createPlan, tensor, toBf16 } from '../dist/index.js';
import { randomC4Topk, randomDeviceBf16, tiledDeviceCache } from '../dist/cli/gpu_bench.js';
import { freshC4Chunk } from './lib.mjs';

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
 * The GPU bench's c4 layer of n queries (one fresh request, freshC4Chunk), hQ heads and top-k
 * `topk`, every operand on the device: `args` are prefillLayer's (path 'sparse'); `topkIdx` the
 * top-k's host copy; `free()` frees the operands.
 */
export async function c4DeviceLayer(engine, rng, n, hQ, topk) {
  const { randomDevice, deviceCache, c4TopkIndices } = deviceInputs(engine, rng);
  const plan = createPlan(freshC4Chunk(n));
  const swa = await deviceCache(n / 64), c4 = await deviceCache(n / 4 / 64);
  const q = await randomDevice([n, hQ, 512]);
  const attnSink = await engine.upload(tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal())));
  const topkIdx = c4TopkIndices(n, topk);
  const topkIndices = await engine.upload(tensor('int32', [n, topk], topkIdx));
  return {
    args: { plan, compressRatio: 4, q, caches: { swa, c4 }, topkIndices, attnSink, smScale: 1 / Math.sqrt(512), path: 'sparse' },
    topkIdx,
    free: () => {
      for (const x of [q, topkIndices, attnSink, swa, c4]) x.data.free();
    },
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
