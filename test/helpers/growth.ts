/**
 * Leak checks over rounds of the same work: how much a quantity read once a round (a process's
 * memory, a heap's used bytes) grows a round.
 */

/** The middle of `xs` once sorted (of an even count, the upper of the two middle values). */
export function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
}

/**
 * How much `xs` (one value a round) grows a round: the median of the slopes between every two
 * rounds, which rounds where the allocators happened to keep or give back freed memory barely move
 * (one difference between an early and a late round took all of that noise), while a leak moves
 * every slope.
 */
export function growthPerRound(xs: readonly number[]): number {
  const slopes: number[] = [];
  for (let i = 0; i < xs.length; i++) for (let j = i + 1; j < xs.length; j++) slopes.push((xs[j]! - xs[i]!) / (j - i));
  return median(slopes);
}
