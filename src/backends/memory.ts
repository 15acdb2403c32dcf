/**
 * The host-memory budget of one call (SPEC §9): what a backend allocates for a call beyond the
 * caller's own arrays — copies or staging of its inputs, and its outputs — is summed before any
 * work and a call over the engine's budget is refused with TOO_LARGE, so an oversized call fails
 * in milliseconds instead of being killed by the kernel's OOM killer halfway through.
 */
import os from 'node:os';
import { SparseMlaError } from '../errors.js';
import { formatBytes } from '../tensor.js';

/** The default budget: half the machine's memory. */
export function defaultMemoryBudgetBytes(): number {
  return Math.floor(os.totalmem() / 2);
}

/** Bytes it takes to own a copy of `a`: 0 for an array in a SharedArrayBuffer (read in place). */
export function copyBytes(a: ArrayBufferView | null | undefined): number {
  if (!a || a.buffer instanceof SharedArrayBuffer) return 0;
  return a.byteLength;
}

/**
 * The slabs that hold the copies a call took of its operands when it was made (prefillLayer's q,
 * sink and top-k; see staging.ts, copyAtCall), while the call holds them: shared memory that only
 * the library references, read-only for the call's life. The call's ops read those copies in place
 * (they are shared) and count them in their budget as memory the call holds. Marked by buffer, not
 * by view: an op's checks take their own view of an array (ops/common.ts, ownView).
 */
const callCopySlabs = new WeakSet<SharedArrayBuffer>();

/** Marks `slab` as holding a call's copies (copyAtCall), until unmarkCallCopies. */
export function markCallCopies(slab: SharedArrayBuffer): void {
  callCopySlabs.add(slab);
}

/** The call that held `slab` is done with it (internal: before the slab is reused). */
export function unmarkCallCopies(slab: SharedArrayBuffer): void {
  callCopySlabs.delete(slab);
}

/** Bytes of the arrays among `arrays` that are copies a call took at the call (in a slab markCallCopies marked). */
export function callCopyBytes(arrays: readonly (ArrayBufferView | object | null | undefined)[]): number {
  let bytes = 0;
  for (const a of arrays) if (a && ArrayBuffer.isView(a) && a.buffer instanceof SharedArrayBuffer && callCopySlabs.has(a.buffer)) bytes += a.byteLength;
  return bytes;
}

export interface MemoryPart {
  /** what the bytes are for, e.g. "output out" or "staging of the inputs" */
  what: string;
  bytes: number;
}

/** Throws TOO_LARGE when the parts add up to more than the budget. */
export function checkCallMemory(op: string, argument: string, parts: readonly MemoryPart[], budgetBytes: number): void {
  const total = parts.reduce((a, p) => a + p.bytes, 0);
  if (total <= budgetBytes) return;
  const detail = parts.filter((p) => p.bytes > 0).map((p) => `${p.what} ${formatBytes(p.bytes)}`).join(', ');
  throw new SparseMlaError(
    'TOO_LARGE',
    `${op}: this call needs ${total} bytes (${formatBytes(total)}) of host memory (${detail}), over the engine's memory budget of ${budgetBytes} bytes (${formatBytes(budgetBytes)}); split the call, pass inputs in SharedArrayBuffers (they are read in place), or raise createEngine({ memoryBudgetBytes })`,
    argument,
  );
}
