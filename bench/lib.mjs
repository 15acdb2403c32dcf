// What the bench scripts share, written once: the median they report, the build they time, an
// option they take out of their arguments, and the c4 chunk their device layers run. Depends on no
// build, so a script comparing two builds can load it beside either.
import { pathToFileURL } from 'node:url';

/** The middle of `xs` once sorted; of an even count, the mean of the two middle values (as `sparse-mla bench` reports, src/cli/table.ts); NaN of none. */
export function median(xs) {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * The dist/ a script times, as a URL ending in '/': the one SPARSE_MLA_DIST names (a path), so that
 * alternated processes can time two builds, else this checkout's.
 */
export function benchDist() {
  const env = process.env.SPARSE_MLA_DIST;
  return env ? pathToFileURL(`${env}/`).href : new URL('../dist/', import.meta.url).href;
}

/** Takes `name VALUE` out of `args` (changing it) and gives VALUE, or undefined where `name` is not there. */
export function takeOption(args, name) {
  const at = args.indexOf(name);
  return at >= 0 ? args.splice(at, 2)[1] : undefined;
}

/**
 * One fresh request of n tokens (n a multiple of 4 · pageSize) with a c4 page table for its n / 4
 * compressed tokens: the chunk of the c4 layers of `sparse-mla bench --backend cuda`.
 */
export function freshC4Chunk(n, pageSize = 64) {
  return {
    requests: [{ seqLen: n, extendLen: n, swaTokenIds: Int32Array.from({ length: n }, (_, i) => i), c4PageTable: Int32Array.from({ length: n / 4 / pageSize }, (_, i) => i) }],
    c4PageSize: pageSize,
  };
}
