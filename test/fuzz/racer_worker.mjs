/**
 * The racer of host_targets.mjs's layerRace and race_targets.mjs's opRace: a Worker that rewrites the
 * shared memory it is sent (a call's operands and caches in SharedArrayBuffers, or given word ranges
 * of them) as fast as it can, from before the call until
 * the parent raises the job's stop flag, then answers 'stopped'. The values are a seeded mix of
 * small ids, −1, extreme int32s and bf16 / float32 bit patterns (NaN, ±inf among them).
 */
import { parentPort } from 'node:worker_threads';

const PATTERNS = [-1, 0, 1, 3, 17, 64, 511, 0x7fffffff, -0x80000000, 0x7fc07fc0, 0x7f807f80, 0x3f803f80, 0xbf80bf80 | 0, 0x00010001];

parentPort.on('message', ({ buffers, stop, seed, ranges }) => {
  // ranges (race_targets.mjs): [buffer index, byte offset, words], only the words a call may not read
  const views = ranges ? ranges.map(([b, at, words]) => new Int32Array(buffers[b], at, words)) : buffers.map((b) => new Int32Array(b, 0, b.byteLength >> 2));
  const flag = new Int32Array(stop);
  let x = seed >>> 0 || 1;
  parentPort.postMessage('started');
  while (Atomics.load(flag, 0) === 0) {
    for (const v of views) {
      if (v.length === 0) continue;
      for (let k = 0; k < 32; k++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        const p = PATTERNS[(x >>> 4) % PATTERNS.length];
        v[(x >>> 0) % v.length] = (x & 1) === 0 ? p : p ^ (x & 0xff);
      }
    }
  }
  parentPort.postMessage('stopped');
});
