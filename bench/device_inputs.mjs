// Device-resident inputs of the layer scripts (bench/layer_probe.mjs,
// bench/experiments/layer_wall_trace.mjs), as the GPU bench's layer section builds them
// (src/cli/gpu_bench.ts): random bf16 tensors, v4 caches of one quantized random page tiled, and a
// c4 layer's indexer top-k (GPU only), and per-row random v4 caches on any engine (randomV4Cache). `npm run build` first.
import { createKvCache, toBf16 } from '../dist/index.js';
import { randomBf16 } from '../dist/check/grid.js';

const MiB = 2 ** 20;

/** The helpers over a cuda engine, its backend and a seeded rng (makeRng). */
export function deviceInputs(engine, be, rng) {
  /** A device bf16 tensor of random values (a 16 MiB random block tiled). */
  async function randomDevice(shape) {
    const n = shape.reduce((a, b) => a * b, 1);
    const block = await engine.upload(randomBf16(rng, [Math.min(n, 8 * MiB)]));
    const buf = be.alloc(n * 2);
    await be.fillDevice(buf, block.data);
    block.data.free();
    return { dtype: 'bf16', shape, data: buf };
  }
  /** A device v4 cache of `pages` pages of 64 tokens: one quantized random page tiled. */
  async function deviceCache(pages) {
    const unit = createKvCache('v4', { pageSize: 64, numPages: 1 });
    await engine.quantizeKCache({ cache: unit, tokenIds: Array.from({ length: 64 }, (_, i) => i), rows: randomBf16(rng, [64, 512]) });
    const block = await engine.uploadKvCache(unit);
    const buf = be.alloc(unit.data.byteLength * pages);
    await be.fillDevice(buf, block.data);
    block.data.free();
    return { format: 'v4', pageSize: 64, numPages: pages, data: buf };
  }
  /** A c4 layer's top-k of n queries (int32 [n, topk], −1 padded): random visible positions. */
  function c4TopkIndices(n, topk) {
    const idx = new Int32Array(n * topk).fill(-1);
    for (let i = 0; i < n; i++) {
      const visible = Math.floor((i + 1) / 4);
      for (let k = 0; k < Math.min(topk, visible); k++) idx[i * topk + k] = rng.int(0, visible);
    }
    return idx;
  }
  return { randomDevice, deviceCache, c4TopkIndices };
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
