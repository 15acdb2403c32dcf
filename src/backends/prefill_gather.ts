/**
 * The host backends' sparsePrefill over only the kv rows it reads (SPEC §4), and the row planner
 * that the paged op's gather (paged_gather.ts) shares. A host sparsePrefill copies the kv it is
 * handed whatever rows its ids name: an unshared kv into the staging (cpu, wasm), and every wasm
 * task into its worker's heap. A decode-like call of a few query rows over a long kv copied far
 * more than it read. When the distinct rows its valid entries name cost less, they are gathered at
 * the call into a compact kv (row j: the j-th smallest id read) and the ids rewritten to their
 * compact rows; the paged op does the same with a cache's tokens.
 *
 * Validity is SPEC §4's (cpp/include/sparse_mla/sparse_indices.h): entry k of row i counts when
 * k < topkLength[i] (clamped to [0, topk]) and 0 ≤ id < sKV. Every other entry becomes −1, so it
 * stays skipped and is never read. The valid entries keep their order (duplicates too) and point at
 * the same bits, and the core reads a row's valid entries in order whatever sKV is, so the call's
 * results are the whole kv's bit for bit.
 */
import type { SparsePrefillJob } from './backend.js';
import type { MemoryPart } from './memory.js';
import { alignStaging, attentionOutputBytes, detached, type InputBytes, type StagingArena } from './staging.js';

/** Which rows of its kv a call reads: the distinct valid ids, ascending, and each one's compact row. */
export interface KvRowPlan {
  /** distinct valid row ids, ascending */
  rows: Int32Array;
  /** per kv row: 1 + its compact row, or 0 when no valid entry reads it */
  slotOf: Int32Array;
  /** runs of consecutive ids in `rows` (each copied as one block) */
  runs: number;
}

/** The index rows of a call as the gather reads them. */
export interface KvIndexRows {
  /** int32 [sQ, topk] */
  indices: Int32Array;
  sQ: number;
  topk: number;
  topkLength: Int32Array | null;
  /** the rows the ids may name (a kv's rows; a cache's tokens for the paged op): valid iff 0 ≤ id < sKV */
  sKV: number;
}

/** Entries of row i that may be valid: topk, cut by its length (clamped to [0, topk]) when given. */
function rowLimit(topkLength: Int32Array | null, i: number, topk: number): number {
  if (!topkLength) return topk;
  const n = topkLength[i]!;
  return n < 0 ? 0 : n < topk ? n : topk;
}

/**
 * planKvRows' map of kv rows and list of ids, kept from plan to plan by a backend that plans every
 * call: fresh ones fault in their pages as a plan first touches them, dearer than the plan's own
 * work over a few ids of a long kv. A plan made in it (its rows, its slotOf) is valid until the
 * next one; each plan starts by unsetting the entries the one before set, so the map is all zero.
 */
export class KvRowScratch {
  private map = new Int32Array(0);
  private ids = new Int32Array(0);
  /** entries of `map` the last plan set: ids[0..set) */
  private set = 0;

  /** A zeroed map of `sKV` rows and room for `entries` ids. */
  take(sKV: number, entries: number): { slotOf: Int32Array; seen: Int32Array } {
    for (let k = 0; k < this.set; k++) this.map[this.ids[k]!] = 0;
    this.set = 0;
    if (this.map.length < sKV) this.map = new Int32Array(sKV);
    if (this.ids.length < entries) this.ids = new Int32Array(entries);
    return { slotOf: this.map.subarray(0, sKV), seen: this.ids.subarray(0, entries) };
  }

  /** The plan made in take()'s arrays set the map at ids[0..m). */
  planned(m: number): void {
    this.set = m;
  }
}

/**
 * The rows a call's valid entries read, or null as soon as they are more than `maxRows`, or when
 * `worth` refuses them once every entry is read: given their count and a count of runs, it must
 * never take more runs where it refuses fewer (a cost that grows with the runs). It is asked with
 * the fewest runs the rows can make (one), then the most (one a row), and only where those answers
 * differ with the runs counted; a refusal skips ordering the rows. Reads the ids and lengths once;
 * the kv is not touched. In `scratch` when given (valid until its next plan), else in arrays of its own.
 */
export function planKvRows(s: KvIndexRows, maxRows = Infinity, scratch?: KvRowScratch, worth?: (rows: number, runs: number) => boolean): KvRowPlan | null {
  const { indices, sQ, topk, topkLength, sKV } = s;
  const entries = Math.min(sKV, sQ * topk);
  const { slotOf, seen } = scratch ? scratch.take(sKV, entries) : { slotOf: new Int32Array(sKV), seen: new Int32Array(entries) };
  let m = 0;
  for (let i = 0; i < sQ; i++) {
    const row = i * topk;
    const end = row + rowLimit(topkLength, i, topk);
    for (let e = row; e < end; e++) {
      const id = indices[e]!;
      if (id >= 0 && id < sKV && slotOf[id] === 0) {
        if (m >= maxRows) {
          scratch?.planned(m);
          return null;
        }
        slotOf[id] = 1;
        seen[m++] = id;
      }
    }
  }
  scratch?.planned(m);
  if (worth && !worth(m, Math.min(m, 1))) return null;
  if (worth && !worth(m, m)) {
    // the runs decide: m less the rows whose predecessor is read too (the map holds 0 or 1 here)
    let joined = 0;
    for (let k = 0; k < m; k++) {
      const id = seen[k]!;
      if (id > 0) joined += slotOf[id - 1]!;
    }
    if (!worth(m, m - joined)) return null;
  }
  // ascending: a sort of the few ids, or a walk over the map when they are many
  let rows: Int32Array;
  if (m * 16 < sKV) {
    rows = seen.subarray(0, m).sort();
  } else {
    rows = seen.subarray(0, m);
    for (let id = 0, j = 0; j < m; id++) if (slotOf[id] !== 0) rows[j++] = id;
  }
  let runs = 0;
  for (let j = 0; j < m; j++) {
    const id = rows[j]!;
    slotOf[id] = j + 1;
    if (j === 0 || rows[j - 1] !== id - 1) runs++;
  }
  return { rows, slotOf, runs };
}

/** The call's ids as compact rows, written into `out` (sQ · topk): a valid entry its row's compact position, every other entry −1. */
export function remapKvIndices(s: KvIndexRows, plan: Pick<KvRowPlan, 'slotOf'>, out: Int32Array = new Int32Array(s.sQ * s.topk)): Int32Array {
  const { indices, sQ, topk, topkLength, sKV } = s;
  const { slotOf } = plan;
  out.fill(-1);
  for (let i = 0; i < sQ; i++) {
    const row = i * topk;
    const end = row + rowLimit(topkLength, i, topk);
    // an id not in the plan (shared ids rewritten since it was made) maps to −1: skipped, never read
    for (let e = row; e < end; e++) {
      const id = indices[e]!;
      if (id >= 0 && id < sKV) out[e] = slotOf[id]! - 1;
    }
  }
  return out;
}

/** The plan's rows of `kv` ([sKV, dQK] bf16), in order, written into `out` as a compact kv [rows, dQK]; a run of consecutive ids is copied as one block. */
export function gatherKvRows(kv: Uint16Array, dQK: number, plan: KvRowPlan, out: Uint16Array = new Uint16Array(plan.rows.length * dQK)): Uint16Array {
  const { rows } = plan;
  const m = rows.length;
  let j = 0;
  while (j < m) {
    const id = rows[j]!;
    let len = 1;
    while (j + len < m && rows[j + len] === id + len) len++;
    out.set(kv.subarray(id * dQK, (id + len) * dQK), j * dQK);
    j += len;
  }
  return out;
}

/*
 * The choice between the whole kv (or cache) and a compact one, in estimated main-thread
 * nanoseconds of an unloaded x86 core (bench/paged_gather_costs.mjs; bench/RESULTS.md, "The paged
 * op over compact caches"): copying a byte in bulk, planning and rewriting one index entry, and
 * (each gather its own, by default) gathering one run of rows, a scattered row being a cache miss.
 */
export const COPY_NS_PER_BYTE = 0.12;
export const ENTRY_NS = 10;
const RUN_NS = 300;

/** How a backend's sparsePrefill copies its kv, for the estimate (chooseKvRows). */
export interface KvCopies {
  /** copies of the whole kv (the staging's of an unshared kv, each task's into its heap) */
  wholeCopies: number;
  /** copies of a compact kv after its gather */
  compactCopies: number;
  /** gathering one run of rows, where the backend measured its own (default RUN_NS) */
  runNs?: number;
}

/**
 * The plan of `s`'s rows when reading them compact is estimated to cost less than `wholeNs`, else
 * null: planning and rewriting every entry, `runNs` per run of rows, and `compactNs` of the rows
 * (by default `perRowNs` a row; at least that, which bounds the rows planned before giving up).
 */
export function cheaperKvRows(s: KvIndexRows, wholeNs: number, perRowNs: number, runNs: number, compactNs: (rows: number) => number = (rows) => rows * perRowNs, scratch?: KvRowScratch): KvRowPlan | null {
  const entriesNs = s.sQ * s.topk * ENTRY_NS;
  if (entriesNs >= wholeNs) return null;
  // decided from the count of rows and runs before they are ordered: a whole read costs a pass or two over the ids
  return planKvRows(s, Math.floor((wholeNs - entriesNs) / perRowNs), scratch, (rows, runs) => entriesNs + runs * runNs + compactNs(rows) < wholeNs);
}

/**
 * For tests: `force` overrides the estimate (whole: never gather; compact: gather whenever the
 * budget allows), and `gatheredCalls` counts the calls that read a compact kv, so a test can hold
 * both paths to the same bits and see which one ran. Not part of the package's API.
 */
export const prefillGatherForTests: { force: 'whole' | 'compact' | null; gatheredCalls: number } = { force: null, gatheredCalls: 0 };

/**
 * The plan of a call's rows when reading a compact kv is estimated to cost less than the whole one,
 * else null. The whole kv is copied `wholeCopies` times (the staging's copy of an unshared kv, each
 * task's into its heap), a compact one `compactCopies` times after its gather; a run of rows costs
 * `runNs` to gather.
 */
export function chooseKvRows(s: KvIndexRows, dQK: number, wholeCopies: number, compactCopies: number, runNs = RUN_NS, scratch?: KvRowScratch): KvRowPlan | null {
  const force = prefillGatherForTests.force;
  if (force === 'compact') return planKvRows(s, Infinity, scratch);
  if (force === 'whole') return null;
  const rowBytes = dQK * 2;
  return cheaperKvRows(s, s.sKV * rowBytes * COPY_NS_PER_BYTE * wholeCopies, rowBytes * COPY_NS_PER_BYTE * (1 + compactCopies), runNs, undefined, scratch);
}

/** Host bytes of the gather's plan (planKvRows: the map of kv rows and the ids seen), held while it gathers. */
export function kvRowPlanBytes(sKV: number, entries: number): number {
  return 4 * sKV + 4 * Math.min(sKV, entries);
}

/** The unshared ones of q, topkLength and attnSink (`inputs`: q, kv, indices, topkLength, attnSink as the call has them), which placeGathered copies beside the compact kv. */
function copiedBeside(inputs: readonly InputBytes[]): number[] {
  return [inputs[0]!, inputs[3]!, inputs[4]!].map((a) => alignStaging(a.unshared));
}

/** Bytes of the one slab of a call over a compact kv of `rows` rows (placeGathered): the kv, its ids, and q, topkLength and attnSink where unshared. */
export function gatheredBytes(rows: number, inputs: readonly InputBytes[], job: Pick<SparsePrefillJob, 'sQ' | 'dQK' | 'topk'>): number {
  return alignStaging(rows * job.dQK * 2) + alignStaging(job.sQ * job.topk * 4) + copiedBeside(inputs).reduce((a, b) => a + b, 0);
}

/**
 * What a sparsePrefill over a compact kv of `rows` rows counts against the budget: its one slab
 * (gatheredBytes; filled at the call, it never waits, so no copy is held beside it); the copies a
 * layer took of its operands at its call, still held; the gather's plan; the outputs.
 */
export function gatheredPrefillParts(inputs: readonly InputBytes[], rows: number, job: Pick<SparsePrefillJob, 'sQ' | 'hQ' | 'dQK' | 'dV' | 'topk' | 'sKV'>): MemoryPart[] {
  const { sQ, hQ, dV, topk, sKV } = job;
  return [
    { what: 'staging of the gathered kv rows, the remapped indices and the other inputs', bytes: gatheredBytes(rows, inputs, job) },
    { what: "the layer's copies of its operands", bytes: inputs.reduce((sum, a) => sum + a.callCopy, 0) },
    { what: "the gather's plan of kv rows", bytes: kvRowPlanBytes(sKV, sQ * topk) },
    { what: 'outputs', bytes: attentionOutputBytes(sQ, hQ, dV) },
  ];
}

/**
 * The job over the plan's compact kv and its ids rewritten, placed now (the kv read at the call) in
 * `slab` (gatheredBytes; null when that is 0), with copies of q, topkLength and attnSink where they
 * are not shared already (`inputs`, as gatheredBytes): shared memory the workers read in place, a
 * staging slab reused from call to call, so its pages are already there.
 */
export function placeGathered(job: SparsePrefillJob, plan: KvRowPlan, inputs: readonly InputBytes[], slab: SharedArrayBuffer | null): SparsePrefillJob {
  if (job.kv.byteLength !== job.sKV * job.dQK * 2) detached('kv.data', 'before the call could read it');
  const m = plan.rows.length;
  let at = 0;
  const take = <T>(make: (buffer: SharedArrayBuffer, offset: number) => T, bytes: number): T => {
    const view = make(slab!, at);
    at += alignStaging(bytes);
    return view;
  };
  const kv = m > 0 ? take((b, o) => new Uint16Array(b, o, m * job.dQK), m * job.dQK * 2) : new Uint16Array(0);
  const indices = job.sQ * job.topk > 0 ? take((b, o) => new Int32Array(b, o, job.sQ * job.topk), job.sQ * job.topk * 4) : new Int32Array(0);
  gatherKvRows(job.kv, job.dQK, plan, kv);
  remapKvIndices(job, plan, indices);
  const [qBytes, lengthBytes, sinkBytes] = copiedBeside(inputs);
  const copy = <A extends Uint16Array | Int32Array | Float32Array>(a: A, bytes: number, make: (b: SharedArrayBuffer, o: number, n: number) => A): A => {
    if (bytes === 0) return a;
    const view = take((b, o) => make(b, o, a.length), a.byteLength);
    view.set(a as never);
    return view;
  };
  const q = copy(job.q, qBytes!, (b, o, n) => new Uint16Array(b, o, n));
  const topkLength = job.topkLength && copy(job.topkLength, lengthBytes!, (b, o, n) => new Int32Array(b, o, n));
  const attnSink = job.attnSink && copy(job.attnSink, sinkBytes!, (b, o, n) => new Float32Array(b, o, n));
  return { ...job, q, kv, indices, topkLength, attnSink, sKV: m };
}

/**
 * The rows of `job`'s kv to gather (`sizes`: its inputs' InputBytes, as placeGathered takes them),
 * when a compact kv is estimated to cost less than the whole one (chooseKvRows, by the backend's
 * `copies`) and the gather's host bytes, its plan's included (gatheredPrefillParts), fit
 * `budgetBytes`; else null. Whether the call is refused is the caller's check of the whole kv, made
 * before. Planned in `scratch` when given (the plan valid until its next one).
 */
export function planPrefillGather(job: SparsePrefillJob, sizes: readonly InputBytes[], budgetBytes: number, copies: KvCopies, scratch?: KvRowScratch): KvRowPlan | null {
  const fits = (rows: number) => gatheredPrefillParts(sizes, rows, job).reduce((sum, p) => sum + p.bytes, 0) <= budgetBytes;
  if (!fits(0)) return null;
  if (job.indices.length !== job.sQ * job.topk) detached('indices.data', 'before the call could read it');
  const plan = chooseKvRows(job, job.dQK, copies.wholeCopies, copies.compactCopies, copies.runNs, scratch);
  return plan && fits(plan.rows.length) ? plan : null;
}

/**
 * The job over `plan`'s compact kv, placed now (the kv and ids read at the call: placeGathered) in
 * one slab of `staging`: a free one when there is one, else one lent (StagingArena.lend), which never
 * waits, so nothing of the caller's is read after the call. release() gives the slab back once
 * nothing reads it. Counted in prefillGatherForTests.gatheredCalls.
 */
export function stageGathered(staging: StagingArena, job: SparsePrefillJob, plan: KvRowPlan, sizes: readonly InputBytes[]): { job: SparsePrefillJob; release(): void } {
  const bytes = gatheredBytes(plan.rows.length, sizes, job);
  let slab: SharedArrayBuffer | null = null, lent = false;
  if (bytes > 0) {
    slab = staging.tryAcquire(bytes);
    if (!slab) [slab, lent] = [staging.lend(bytes), true];
  }
  const release = () => {
    if (slab && lent) staging.giveBack(slab);
    else if (slab) staging.release(slab);
    slab = null;
  };
  let placed: SparsePrefillJob;
  try {
    placed = placeGathered(job, plan, sizes, slab);
  } catch (e) {
    release();
    throw e;
  }
  prefillGatherForTests.gatheredCalls++;
  return { job: placed, release };
}
