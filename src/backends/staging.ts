/**
 * Staging: the memory through which a call's inputs reach the threads that compute it, reused from
 * call to call (the wasm workers, the cpu addon's threads).
 *
 * What it is for: the library owns what it reads during a call (SPEC §9). An input already in a
 * SharedArrayBuffer cannot be detached or shrunk, so it is read in place; any other input is
 * copied into a staging slab, a SharedArrayBuffer that only the library references, when the call
 * is made — after that the caller may detach, transfer or reuse its arrays.
 *
 * Why reuse: a SharedArrayBuffer posted to a worker stays alive until that worker's garbage
 * collector runs, and an idle worker's collector hardly ever runs — its own heap barely grows, the
 * memory it holds lies outside that heap. One fresh SharedArrayBuffer per call per input therefore
 * grew the process by the size of every call's inputs, call after call.
 * The arena keeps a few slabs and hands them out again, so whatever stale references the workers
 * keep point at memory that is reused, not piled up; and a reused slab costs no page faults.
 *
 * Bounds: the slabs together never exceed `capacityBytes`. A request is served by the smallest
 * free slab that holds it, else by a new slab; when the capacity is taken by other calls' slabs the
 * request waits (first come, first served) until one is released. A free slab is dropped only to
 * make room for a larger one, so the arena settles on the sizes its calls need.
 *
 * Lent slabs: a call that reads some of its operands only after an await (prefillLayer: its q, sink
 * and top-k, read by its ops after the plan's and the dequant's) copies them at the call into a slab
 * lent to it (copyAtCall) and hands that copy to its ops, which read it in place as they read any
 * shared input: one copy, where a private copy staged again by each op was two. A lent slab comes
 * from the same free slabs and goes back to them, so what the wasm workers keep referencing is
 * reused memory, as with staging (a fresh SharedArrayBuffer per call was not: it piled up). It is
 * served at once, never waiting and never making a staging request wait: the call holds it across
 * its ops' staging requests, and a request that waited for a slab its own call holds would wait
 * forever. The caller's budget check counts it (the ops see it as a call copy, memory.ts).
 */
import { SparseMlaError, fail } from '../errors.js';
import { callCopyBytes, copyBytes, markCallCopies, unmarkCallCopies, type MemoryPart } from './memory.js';

/** Slabs are rounded up to 1/8 of the next power of two (at least 64 KiB) so nearby sizes share one. */
function slabSize(bytes: number, capacity: number): number {
  const min = 2 ** 16;
  if (bytes <= min) return Math.min(min, capacity);
  const step = 2 ** Math.max(16, Math.ceil(Math.log2(bytes)) - 3);
  const rounded = Math.ceil(bytes / step) * step;
  return rounded <= capacity ? rounded : bytes;
}

interface Waiter {
  bytes: number;
  resolve(slab: SharedArrayBuffer): void;
  reject(error: Error): void;
}

export class StagingArena {
  private readonly free: SharedArrayBuffer[] = [];
  private busyBytes = 0;
  /** slabs lent for call copies (lend): held by their calls, never waited for */
  private lent = 0;
  private freeBytes = 0;
  private readonly waiting: Waiter[] = [];
  private closedWith: Error | null = null;
  /** slabs allocated so far (a steady workload stops adding to it) */
  allocations = 0;

  constructor(readonly capacityBytes: number) {}

  /** Whether close() ran (the engine was disposed): nothing is served any more. */
  get closed(): boolean {
    return this.closedWith !== null;
  }

  /** Bytes of slabs lent now for calls' copies of their operands (lend). */
  get lentBytes(): number {
    return this.lent;
  }

  /** Bytes of slabs held now, handed out, lent or free. */
  get heldBytes(): number {
    return this.busyBytes + this.lent + this.freeBytes;
  }

  /** A slab of at least `bytes` now, or null when the request has to wait. */
  tryAcquire(bytes: number): SharedArrayBuffer | null {
    if (this.closedWith) throw this.closedWith;
    if (bytes > this.capacityBytes) {
      throw new SparseMlaError('TOO_LARGE', `a call needs ${bytes} bytes of staging, more than the engine's ${this.capacityBytes}`, 'memoryBudgetBytes');
    }
    if (this.waiting.length > 0) return null;
    return this.take(bytes);
  }

  /** A slab of at least `bytes` (≤ capacityBytes, checked by the caller), when one is free. */
  acquire(bytes: number): Promise<SharedArrayBuffer> {
    try {
      const slab = this.tryAcquire(bytes);
      if (slab) return Promise.resolve(slab);
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise((resolve, reject) => this.waiting.push({ bytes, resolve, reject }));
  }

  release(slab: SharedArrayBuffer): void {
    this.busyBytes -= slab.byteLength;
    this.keep(slab);
  }

  /**
   * A slab of at least `bytes` lent to a call for the copies it takes at the call (copyAtCall):
   * the smallest free slab that holds it, else a new one, now — never waiting, whatever the other
   * calls hold (see the file comment); the call's own budget check bounds it. Give it back with
   * giveBack once nothing reads it.
   */
  lend(bytes: number): SharedArrayBuffer {
    if (this.closedWith) throw this.closedWith;
    const best = this.smallestFree(bytes);
    let slab: SharedArrayBuffer;
    if (best >= 0) {
      slab = this.free.splice(best, 1)[0]!;
      this.freeBytes -= slab.byteLength;
    } else {
      slab = this.allocate(slabSize(bytes, this.capacityBytes), "a call's copies of its operands");
    }
    this.lent += slab.byteLength;
    return slab;
  }

  /** A lent slab back (lend): kept as a free slab while the capacity holds it. */
  giveBack(slab: SharedArrayBuffer): void {
    this.lent -= slab.byteLength;
    this.keep(slab);
  }

  /** A slab nobody uses any more: free for the next request, unless the arena is closed or full. */
  private keep(slab: SharedArrayBuffer): void {
    if (this.closedWith) return;
    this.free.push(slab);
    this.freeBytes += slab.byteLength;
    this.dropFree(0);
    this.serve();
  }

  /**
   * Drops free slabs, smallest first, until `bytes` more fit the capacity beside the busy ones (or
   * none is left). Lent slabs are held on top of it (each call's budget check bounds them): what the
   * arena keeps once its calls are done stays within the capacity.
   */
  private dropFree(bytes: number): void {
    if (this.busyBytes + this.freeBytes + bytes <= this.capacityBytes) return;
    this.free.sort((a, b) => a.byteLength - b.byteLength);
    while (this.free.length > 0 && this.busyBytes + this.freeBytes + bytes > this.capacityBytes) this.freeBytes -= this.free.shift()!.byteLength;
  }

  private smallestFree(bytes: number): number {
    let best = -1;
    for (let i = 0; i < this.free.length; i++) {
      const b = this.free[i]!.byteLength;
      if (b >= bytes && (best < 0 || b < this.free[best]!.byteLength)) best = i;
    }
    return best;
  }

  private allocate(size: number, what: string): SharedArrayBuffer {
    let slab: SharedArrayBuffer;
    try {
      slab = new SharedArrayBuffer(size);
    } catch (e) {
      throw new SparseMlaError('TOO_LARGE', `cannot allocate ${size} bytes of shared staging for ${what} (${(e as Error).message})`, 'memoryBudgetBytes');
    }
    this.allocations++;
    return slab;
  }

  /** Drops every free slab and fails the waiting requests; later requests fail with `error`. */
  close(error: Error): void {
    this.closedWith = error;
    this.free.length = 0;
    this.freeBytes = 0;
    for (const w of this.waiting.splice(0)) w.reject(error);
  }

  private serve(): void {
    while (this.waiting.length > 0) {
      const w = this.waiting[0]!;
      let slab: SharedArrayBuffer | null;
      try {
        slab = this.take(w.bytes);
      } catch (e) {
        this.waiting.shift();
        w.reject(e as Error);
        continue;
      }
      if (!slab) return;
      this.waiting.shift();
      w.resolve(slab);
    }
  }

  private take(bytes: number): SharedArrayBuffer | null {
    const best = this.smallestFree(bytes);
    if (best >= 0) {
      const slab = this.free.splice(best, 1)[0]!;
      this.freeBytes -= slab.byteLength;
      this.busyBytes += slab.byteLength;
      return slab;
    }
    const size = slabSize(bytes, this.capacityBytes);
    // lent slabs do not count here: a staging request never waits for them
    if (this.busyBytes + size > this.capacityBytes) return null;
    this.dropFree(size);
    const slab = this.allocate(size, "a call's inputs");
    this.busyBytes += size;
    return slab;
  }
}

/** Offsets of the arrays placed in a staging slab. */
const STAGING_ALIGN = 64;

export type StageableArray = Uint8Array | Uint16Array | Int32Array | Float32Array;

export const alignStaging = (n: number): number => Math.ceil(n / STAGING_ALIGN) * STAGING_ALIGN;

/** Staging bytes of a call's inputs: the ones that are not already shared. */
export function stagingBytes(inputs: readonly (StageableArray | null)[]): number {
  return inputs.reduce((sum, a) => sum + alignStaging(copyBytes(a)), 0);
}

/**
 * An input of a call as its budget check counts it (stagingParts): `unshared`, the bytes copied
 * into the staging (0 for an array already in a SharedArrayBuffer: copyBytes); `callCopy`, the bytes
 * that are a layer's copy taken at its call (callCopyBytes). A layer that checks its ops before
 * any work (prefill_layer_checks.ts) describes inputs that do not exist yet by these sizes.
 */
export interface InputBytes {
  unshared: number;
  callCopy: number;
}

/** The InputBytes of an array (or none). */
export function inputBytes(a: StageableArray | null): InputBytes {
  return { unshared: copyBytes(a), callCopy: a === null ? 0 : callCopyBytes([a]) };
}

/**
 * The host memory a call's staging holds, for its budget check (memory.ts): the slab; the copy of
 * the unshared inputs that a call which has to wait for its slab takes at the call (stageInputs),
 * held beside the slab until it is copied in — counted whether or not the call will wait, so the
 * same call is refused or not whatever else runs; and the copies a layer took at its call and
 * handed to this op (copyAtCall), which the call holds while the op runs. `moreUnshared`: bytes of
 * unshared inputs made after the check (a paged call's compact caches), staged and held likewise
 * (their own bytes are the caller's part).
 */
export function stagingParts(inputs: readonly (StageableArray | null)[], moreUnshared = 0): MemoryPart[] {
  return stagingPartsOf(inputs.map(inputBytes), moreUnshared);
}

/** stagingParts of inputs given by their sizes. */
export function stagingPartsOf(inputs: readonly InputBytes[], moreUnshared = 0): MemoryPart[] {
  let staged = 0, held = moreUnshared, copies = 0;
  for (const a of inputs) {
    staged += alignStaging(a.unshared);
    held += a.unshared;
    copies += a.callCopy;
  }
  return [
    { what: 'staging of the inputs', bytes: staged },
    { what: 'their copy held while the call waits for staging', bytes: held },
    { what: "the layer's copies of its operands", bytes: copies },
  ];
}

/** Output bytes of an attention call (sparsePrefill, pagedSparseAttention): bf16 out [rows, hQ, dV], float32 maxLogits and lse [rows, hQ]. */
export function attentionOutputBytes(rows: number, hQ: number, dV: number): number {
  return rows * hQ * (dV * 2 + 8);
}

/**
 * What a host backend's sparsePrefill counts against the budget (cpu and wasm alike): its inputs'
 * staging (q, kv, indices, topkLength, attnSink) and its outputs.
 */
export function sparsePrefillParts(inputs: readonly InputBytes[], sQ: number, hQ: number, dV: number): MemoryPart[] {
  return [...stagingPartsOf(inputs), { what: 'outputs', bytes: attentionOutputBytes(sQ, hQ, dV) }];
}

/** The error for an input whose buffer went away before the library could read it. */
export function detached(argument: string, when: string): never {
  fail('INVALID_VALUE', argument, 'memory that stays attached while the call runs', `a buffer that was detached, transferred or resized ${when}`);
}

export interface StagedInputs<T> {
  /** the inputs, each shared: as given when it already was, else its copy in the slab */
  views: T;
  /** gives the slab back; call once nothing reads the views any more */
  release(): void;
}

/** Copies the unshared inputs into `slab` (null when none needs it); `sizes` as measured at the call. */
function place<T extends readonly (StageableArray | null)[]>(arena: StagingArena, inputs: T, sizes: readonly number[], names: readonly string[], slab: SharedArrayBuffer | null): StagedInputs<T> {
  const views: (StageableArray | null)[] = [];
  let offset = 0;
  try {
    inputs.forEach((a, i) => {
      if (!a || sizes[i] === 0) {
        views.push(a);
        return;
      }
      if (a.byteLength !== sizes[i]) detached(names[i]!, 'while the call waited for staging');
      const ctor = a.constructor as new (buffer: SharedArrayBuffer, byteOffset: number, length: number) => StageableArray;
      const view = new ctor(slab!, offset, a.length);
      view.set(a as never);
      views.push(view);
      offset += alignStaging(sizes[i]!);
    });
  } catch (e) {
    if (slab) arena.release(slab);
    throw e;
  }
  let released = false;
  return {
    views: views as unknown as T,
    release: () => {
      if (slab && !released) arena.release(slab);
      released = true;
    },
  };
}

/**
 * Places a call's inputs in shared memory: an array already in a SharedArrayBuffer as it is, every
 * other one copied into one staging slab. Synchronous: null when the arena is all in use by other
 * calls (then use stageInputs, which waits). Done at the call, it captures the inputs as they were.
 */
export function tryStageInputs<T extends readonly (StageableArray | null)[]>(arena: StagingArena, inputs: T, names: readonly string[]): StagedInputs<T> | null {
  const bytes = stagingBytes(inputs);
  const slab = bytes > 0 ? arena.tryAcquire(bytes) : null;
  if (bytes > 0 && slab === null) return null;
  return place(arena, inputs, inputs.map(copyBytes), names, slab);
}

/**
 * tryStageInputs, else waits for a slab. The unshared inputs are copied at the call all the same
 * (into memory of this call's own, dropped once they are placed in the slab): the caller may reuse,
 * rewrite or detach them as soon as the call has returned its promise, whether or not other calls
 * hold the staging.
 */
export async function stageInputs<T extends readonly (StageableArray | null)[]>(arena: StagingArena, inputs: T, names: readonly string[]): Promise<StagedInputs<T>> {
  const sizes = inputs.map(copyBytes);
  const now = tryStageInputs(arena, inputs, names);
  if (now) return now;
  const held = inputs.map((a, i) => (a && sizes[i]! > 0 ? a.slice() : a)) as unknown as T;
  return place(arena, held, sizes, names, await arena.acquire(stagingBytes(inputs)));
}

/**
 * Copies a call's operands now, at the call, into one slab lent by `arena` (StagingArena.lend), each
 * copy marked as the call's (memory.ts, markCallCopies) until release; an operand already in a SharedArrayBuffer is
 * taken as it is (read in place, README "Memory a call owns"). The call hands the copies to its
 * ops, which read them in place; release() gives the slab back once nothing reads them (the call
 * has settled). For operands a call reads after an await, which the caller may rewrite or detach
 * once the call has returned its promise.
 */
export function copyAtCall<T extends readonly (StageableArray | null)[]>(arena: StagingArena, inputs: T): StagedInputs<T> {
  let bytes = 0;
  for (const a of inputs) bytes += alignStaging(copyBytes(a));
  const slab = bytes > 0 ? arena.lend(bytes) : null;
  if (slab) markCallCopies(slab);
  const views: (StageableArray | null)[] = [];
  let offset = 0;
  for (const a of inputs) {
    const size = copyBytes(a);
    if (!a || size === 0) {
      views.push(a);
      continue;
    }
    const ctor = a.constructor as new (buffer: SharedArrayBuffer, byteOffset: number, length: number) => StageableArray;
    const view = new ctor(slab!, offset, a.length);
    view.set(a as never);
    views.push(view);
    offset += alignStaging(size);
  }
  let released = false;
  return {
    views: views as unknown as T,
    release: () => {
      if (slab && !released) {
        unmarkCallCopies(slab);
        arena.giveBack(slab);
      }
      released = true;
    },
  };
}

/**
 * One array of `length` elements in a slab lent by `arena`, marked as a call's copy (as copyAtCall's):
 * for a copy the caller fills itself at the call (a shard's heads of q, cut from the caller's q
 * straight into it). release() gives the slab back once nothing reads it.
 */
export function lendCallCopy<T extends StageableArray>(arena: StagingArena, ctor: new (buffer: SharedArrayBuffer, byteOffset: number, length: number) => T, length: number): { view: T; release(): void } {
  const slab = arena.lend(Math.max(1, length * ctor.prototype.BYTES_PER_ELEMENT));
  markCallCopies(slab);
  let released = false;
  return {
    view: new ctor(slab, 0, length),
    release: () => {
      if (released) return;
      released = true;
      unmarkCallCopies(slab);
      arena.giveBack(slab);
    },
  };
}
