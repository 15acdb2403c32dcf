/**
 * The planner's index math behind one interface, with two implementations: the C++ core
 * (cpp/src/planner.cpp through the WASM module's smla_plan_* exports, see wasm_core.ts) and this
 * file's TypeScript port of the same per-row functions (cpp/include/sparse_mla/planner.h). Both
 * take inputs the plan has already validated; both are tested against the same hand-worked rows.
 */

/** Totals of a chunk's layout for one compress ratio. */
export interface CoreLayout {
  /** prefix sums, numRequests + 1 entries each */
  queryOffsets: Float64Array;
  swaOffsets: Float64Array;
  compOffsets: Float64Array;
  numQueries: number;
  swaRows: number;
  compRows: number;
  /** largest floor(seqLen / ratio) of any request with queries */
  maxVisible: number;
}

export interface CoreRows {
  rows: Int32Array;
  lens: Int32Array;
}

export interface CoreTopkRows extends CoreRows {
  dropped: Int32Array;
  droppedTotal: number;
}

export interface CorePagedForm {
  main?: CoreRows;
  extra?: CoreRows;
}

export interface PlannerCore {
  readonly name: 'wasm' | 'js';
  layout(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number): CoreLayout;
  compressedTokenIds(
    seqLens: Int32Array,
    extendLens: Int32Array,
    ratio: number,
    pageTables: Int32Array,
    pageTableOffsets: Float64Array,
    pageSize: number,
  ): BigInt64Array;
  denseRows(seqLens: Int32Array, extendLens: Int32Array, window: number, ratio: number, width: number): CoreRows;
  combineTopk(
    seqLens: Int32Array,
    extendLens: Int32Array,
    window: number,
    ratio: number,
    topkIndices: Int32Array,
    topk: number,
    width: number,
  ): CoreTopkRows;
  /** mainWidth / extraWidth 0 leaves that set out. */
  pagedForm(
    rows: Int32Array,
    lens: Int32Array,
    width: number,
    compRows: number,
    swaRows: number,
    compTokenIds: BigInt64Array,
    swaTokenIds: BigInt64Array,
    mainWidth: number,
    extraWidth: number,
  ): CorePagedForm;
}

// ---- the per-request / per-row rules (mirrors planner.h) ----------------------------------------

/** SWA positions the queries of a request need: g = min(seqLen, extendLen + W − 1); 0 without queries. */
export function swaGatherLength(seqLen: number, extendLen: number, window: number): number {
  return extendLen > 0 ? Math.min(seqLen, extendLen + window - 1) : 0;
}

/** Compressed entries the request's last query can see: floor(seqLen / r); 0 for r = 0 or no queries. */
export function requestVisible(seqLen: number, extendLen: number, ratio: number): number {
  return ratio > 0 && extendLen > 0 ? Math.floor(seqLen / ratio) : 0;
}

export function roundUp(x: number, m: number): number {
  return m > 0 ? Math.ceil(x / m) * m : x;
}

/** Width of a ratio's combined rows (SPEC §6): roundUp((0 | topk | maxVisible) + W, align). */
export function combinedWidth(ratio: number, topk: number, maxVisible: number, window: number, align: number): number {
  const compressed = ratio === 0 ? 0 : ratio === 4 ? topk : maxVisible;
  return roundUp(compressed + window, align);
}

interface QueryContext {
  pos: number;
  compBase: number;
  swaBase: number;
  swaStartPos: number;
}

function forEachQuery(
  seqLens: Int32Array,
  extendLens: Int32Array,
  window: number,
  ratio: number,
  f: (q: number, c: QueryContext) => void,
): void {
  let compTotal = 0;
  for (let r = 0; r < seqLens.length; r++) compTotal += requestVisible(seqLens[r]!, extendLens[r]!, ratio);
  let q = 0, swa = 0, comp = 0;
  const c: QueryContext = { pos: 0, compBase: 0, swaBase: 0, swaStartPos: 0 };
  for (let r = 0; r < seqLens.length; r++) {
    const s = seqLens[r]!, e = extendLens[r]!;
    const g = swaGatherLength(s, e, window);
    c.compBase = comp;
    c.swaBase = compTotal + swa;
    c.swaStartPos = s - g;
    for (let i = 0; i < e; i++, q++) {
      c.pos = s - e + i;
      f(q, c);
    }
    swa += g;
    comp += requestVisible(s, e, ratio);
  }
}

/** The TypeScript port of the core (same rules, same outputs). */
export const jsPlannerCore: PlannerCore = {
  name: 'js',

  layout(seqLens, extendLens, window, ratio) {
    const n = seqLens.length;
    const queryOffsets = new Float64Array(n + 1), swaOffsets = new Float64Array(n + 1), compOffsets = new Float64Array(n + 1);
    let nq = 0, ns = 0, nc = 0, maxVisible = 0;
    for (let r = 0; r < n; r++) {
      queryOffsets[r] = nq;
      swaOffsets[r] = ns;
      compOffsets[r] = nc;
      const s = seqLens[r]!, e = extendLens[r]!;
      nq += e;
      ns += swaGatherLength(s, e, window);
      const v = requestVisible(s, e, ratio);
      nc += v;
      maxVisible = Math.max(maxVisible, v);
    }
    queryOffsets[n] = nq;
    swaOffsets[n] = ns;
    compOffsets[n] = nc;
    return { queryOffsets, swaOffsets, compOffsets, numQueries: nq, swaRows: ns, compRows: nc, maxVisible };
  },

  compressedTokenIds(seqLens, extendLens, ratio, pageTables, pageTableOffsets, pageSize) {
    let total = 0;
    for (let r = 0; r < seqLens.length; r++) total += requestVisible(seqLens[r]!, extendLens[r]!, ratio);
    const out = new BigInt64Array(total);
    let k = 0;
    for (let r = 0; r < seqLens.length; r++) {
      const v = requestVisible(seqLens[r]!, extendLens[r]!, ratio);
      const base = pageTableOffsets[r]!;
      for (let j = 0; j < v; j++) {
        const page = pageTables[base + Math.floor(j / pageSize)]!;
        out[k++] = BigInt(page * pageSize + (j % pageSize));
      }
    }
    return out;
  },

  denseRows(seqLens, extendLens, window, ratio, width) {
    const nq = extendLens.reduce((a, b) => a + b, 0);
    const rows = new Int32Array(nq * width).fill(-1);
    const lens = new Int32Array(nq);
    forEachQuery(seqLens, extendLens, window, ratio, (q, c) => {
      const nc = ratio > 0 ? Math.floor((c.pos + 1) / ratio) : 0;
      const wl = Math.min(c.pos + 1, window);
      const base = q * width;
      for (let k = 0; k < nc; k++) rows[base + k] = c.compBase + k;
      const first = c.swaBase + (c.pos - wl + 1 - c.swaStartPos);
      for (let w = 0; w < wl; w++) rows[base + nc + w] = first + w;
      lens[q] = nc + wl;
    });
    return { rows, lens };
  },

  combineTopk(seqLens, extendLens, window, ratio, topkIndices, topk, width) {
    const nq = extendLens.reduce((a, b) => a + b, 0);
    const rows = new Int32Array(nq * width).fill(-1);
    const lens = new Int32Array(nq);
    const dropped = new Int32Array(nq);
    let droppedTotal = 0;
    forEachQuery(seqLens, extendLens, window, ratio, (q, c) => {
      const nc = Math.floor((c.pos + 1) / ratio);
      const base = q * width;
      let n = 0, bad = 0;
      for (let k = 0; k < topk; k++) {
        const j = topkIndices[q * topk + k]!;
        if (j < 0) continue;
        if (j >= nc) {
          bad++;
          continue;
        }
        rows[base + n++] = c.compBase + j;
      }
      const wl = Math.min(c.pos + 1, window);
      const first = c.swaBase + (c.pos - wl + 1 - c.swaStartPos);
      for (let w = 0; w < wl; w++) rows[base + n++] = first + w;
      lens[q] = n;
      dropped[q] = bad;
      droppedTotal += bad;
    });
    return { rows, lens, dropped, droppedTotal };
  },

  pagedForm(rows, lens, width, compRows, _swaRows, compTokenIds, swaTokenIds, mainWidth, extraWidth) {
    const nq = lens.length;
    // ids converted once (the plan has checked they fit int32), not once per entry
    const comp = Int32Array.from(compTokenIds, Number);
    const swa = Int32Array.from(swaTokenIds, Number);
    const main = mainWidth > 0 ? { rows: new Int32Array(nq * mainWidth).fill(-1), lens: new Int32Array(nq) } : undefined;
    const extra = extraWidth > 0 ? { rows: new Int32Array(nq * extraWidth).fill(-1), lens: new Int32Array(nq) } : undefined;
    for (let q = 0; q < nq; q++) {
      let nm = 0, ne = 0;
      for (let k = 0; k < lens[q]!; k++) {
        const r = rows[q * width + k]!;
        if (r < 0) continue;
        if (r < compRows) {
          if (extra) extra.rows[q * extraWidth + ne] = comp[r]!;
          ne++;
        } else {
          if (main) main.rows[q * mainWidth + nm] = swa[r - compRows]!;
          nm++;
        }
      }
      if (main) main.lens[q] = nm;
      if (extra) extra.lens[q] = ne;
    }
    return { main, extra };
  },
};
