/**
 * The host-memory budget of one call (SPEC §9): what a backend allocates for a call beyond the
 * caller's own arrays — copies or staging of its inputs, and its outputs — is summed before any
 * work and a call over the engine's budget is refused with TOO_LARGE, so an oversized call fails
 * in milliseconds instead of being killed by the kernel's OOM killer halfway through.
 */
import os from 'node:os';
import { SparseMlaError } from '../errors.js';

/** The default budget: half the machine's memory. */
export function defaultMemoryBudgetBytes(): number {
  return Math.floor(os.totalmem() / 2);
}

/** Bytes it takes to own a copy of `a`: 0 for an array in a SharedArrayBuffer (read in place). */
export function copyBytes(a: ArrayBufferView | null | undefined): number {
  if (!a || a.buffer instanceof SharedArrayBuffer) return 0;
  return a.byteLength;
}

export interface MemoryPart {
  /** what the bytes are for, e.g. "output out" or "staging of the inputs" */
  what: string;
  bytes: number;
}

function bytesStr(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  return `${n} B`;
}

/** Throws TOO_LARGE when the parts add up to more than the budget. */
export function checkCallMemory(op: string, argument: string, parts: readonly MemoryPart[], budgetBytes: number): void {
  const total = parts.reduce((a, p) => a + p.bytes, 0);
  if (total <= budgetBytes) return;
  const detail = parts.filter((p) => p.bytes > 0).map((p) => `${p.what} ${bytesStr(p.bytes)}`).join(', ');
  throw new SparseMlaError(
    'TOO_LARGE',
    `${op}: this call needs ${total} bytes (${bytesStr(total)}) of host memory (${detail}), over the engine's memory budget of ${budgetBytes} bytes (${bytesStr(budgetBytes)}); split the call, pass inputs in SharedArrayBuffers (they are read in place), or raise createEngine({ memoryBudgetBytes })`,
    argument,
  );
}
