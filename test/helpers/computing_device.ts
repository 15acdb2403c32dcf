/**
 * A stand-in CUDA device that computes (no GPU): device buffers are host memory behind the addon
 * buffer's surface, and the kernel ops the layer flow uses run the real addon's CPU core
 * (dequant, sparsePrefill, the paged op) and the host planner (rows, compressed ids) on them, so a
 * cuda engine over it gives the cpu backend's bits. Each op call is noted (OpCall): its name and
 * which of its array operands were host memory. For the tests that run a cuda engine's layer flow,
 * and judge its results, without a GPU.
 */
import { expect } from 'vitest';
import type { NativeAddon, NativeCudaOps } from '../../dist/backends/native/binding.js';
import { CUDA_OP_PARAMS, type CudaOpName } from '../../dist/backends/abi.js';
import { loadHostPlanner } from '../../dist/backends/wasm/planner.js';
import { StandInStream } from './stand_in_device.js';

/** A stand-in device buffer: host memory behind the addon buffer's surface. */
class StandInBuffer {
  readonly mem: ArrayBuffer;
  readonly device: number;
  readonly byteLength: number;
  freed = false;
  constructor(bytes: number, stream: { device: number }) {
    this.mem = new ArrayBuffer(bytes);
    this.byteLength = bytes;
    this.device = stream.device;
  }
  free(): void {
    this.freed = true;
  }
}

type Ctor<T> = new (buffer: ArrayBuffer) => T;
/** An operand's elements: a stand-in buffer's memory, or the host array itself. */
function view<T extends ArrayBufferView>(x: unknown, ctor: Ctor<T>): T {
  return x instanceof StandInBuffer ? new ctor(x.mem) : (x as T);
}
function write(dst: unknown, src: ArrayBufferView, byteOffset = 0): void {
  const to = dst instanceof StandInBuffer ? new Uint8Array(dst.mem, byteOffset) : new Uint8Array((dst as ArrayBufferView).buffer, (dst as ArrayBufferView).byteOffset + byteOffset);
  to.set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
}

/** One op call as the stand-in saw it: its name, which of its array operands were host memory, the bytes a download read. */
export interface OpCall {
  op: string;
  hostOperands: string[];
  bytes?: number;
}

/**
 * The device ops the layer flow uses, each over one params object named as the binding's
 * arguments: the CPU core (dequant, sparsePrefill) and the host planner (rows, compressed ids) on
 * host memory. `held` delays a download until the layer's sparsePrefill has been queued.
 */
function standInOps(addon: NativeAddon, calls: OpCall[], held: { downloadsWaitForPrefill: boolean }) {
  const planner = loadHostPlanner();
  let prefillQueued: () => void = () => undefined;
  let prefillSeen = Promise.resolve();
  const note = (op: string, p: Record<string, unknown>, arrays: string[]): void => {
    calls.push({ op, hostOperands: arrays.filter((k) => p[k] !== null && p[k] !== undefined && !(p[k] instanceof StandInBuffer)) });
  };
  return {
    upload(p: { buffer: StandInBuffer; data: ArrayBufferView }) {
      note('upload', p, ['buffer']);
      write(p.buffer, p.data);
      return Promise.resolve();
    },
    async download(p: { buffer: StandInBuffer; data: ArrayBufferView }) {
      note('download', p, ['buffer']);
      calls.at(-1)!.bytes = p.buffer.byteLength;
      if (held.downloadsWaitForPrefill) await prefillSeen;
      write(p.data, new Uint8Array(p.buffer.mem));
    },
    async dequantizeKvCache(p: { format: 0 | 1; cache: unknown; pageSize: number; numPages: number; tokenIds: unknown; numTokens: number; out: unknown; outRowOffset: number | null }) {
      note('dequantizeKvCache', p, ['cache', 'tokenIds', 'out']);
      const ids = p.tokenIds instanceof StandInBuffer ? Int32Array.from(new BigInt64Array(p.tokenIds.mem), Number) : (p.tokenIds as Int32Array);
      const rowDim = p.format === 0 ? 512 : 576;
      const out = new Uint16Array(p.numTokens * rowDim);
      await addon.cpu.dequantizeKvCache(1, { format: p.format, cache: view(p.cache, Uint8Array), pageSize: p.pageSize, numPages: p.numPages, tokenIds: ids, numTokens: p.numTokens, out });
      write(p.out, out, (p.outRowOffset ?? 0) * rowDim * 2);
    },
    planRows(p: { seqLens: Int32Array; extendLens: Int32Array; window: number; ratio: number; topkIndices: unknown; topk: number; width: number; rows: unknown; lens: unknown; dropped: unknown; droppedTotal: unknown }) {
      note('planRows', p, ['topkIndices', 'rows', 'lens', 'dropped', 'droppedTotal']);
      const r =
        p.topkIndices === null
          ? { ...planner.denseRows(p.seqLens, p.extendLens, p.window, p.ratio, p.width), dropped: new Int32Array(p.extendLens.reduce((a, b) => a + b, 0)), droppedTotal: 0 }
          : planner.combineTopk(p.seqLens, p.extendLens, p.window, p.ratio, view(p.topkIndices, Int32Array), p.topk, p.width);
      write(p.rows, r.rows);
      write(p.lens, r.lens);
      if (p.dropped !== null) write(p.dropped, r.dropped);
      if (p.droppedTotal !== null) write(p.droppedTotal, BigInt64Array.of(BigInt(r.droppedTotal)));
      return Promise.resolve();
    },
    planCompressedTokenIds(p: { seqLens: Int32Array; extendLens: Int32Array; ratio: number; pageTables: unknown; pageTableOffsets: BigInt64Array; pageSize: number; total: number; tokenIds: unknown }) {
      note('planCompressedTokenIds', p, ['pageTables', 'tokenIds']);
      const ids = planner.compressedTokenIds(p.seqLens, p.extendLens, p.ratio, view(p.pageTables, Int32Array), Float64Array.from(p.pageTableOffsets, Number), p.pageSize, p.total);
      write(p.tokenIds, ids);
      return Promise.resolve();
    },
    async sparsePrefill(p: { q: unknown; kv: unknown; indices: unknown; topkLength: unknown; attnSink: unknown; sQ: number; hQ: number; dQK: number; dV: number; sKV: number; topk: number; smScale: number; out: unknown; maxLogits: unknown; lse: unknown }) {
      note('sparsePrefill', p, ['q', 'kv', 'indices', 'topkLength', 'attnSink', 'out', 'maxLogits', 'lse']);
      prefillQueued();
      prefillSeen = new Promise((r) => (prefillQueued = r));
      const out = new Uint16Array(p.sQ * p.hQ * p.dV), maxLogits = new Float32Array(p.sQ * p.hQ), lse = new Float32Array(p.sQ * p.hQ);
      await addon.cpu.sparsePrefill(2, {
        q: view(p.q, Uint16Array), kv: view(p.kv, Uint16Array), indices: view(p.indices, Int32Array),
        topkLength: p.topkLength === null ? null : view(p.topkLength, Int32Array), attnSink: p.attnSink === null ? null : view(p.attnSink, Float32Array),
        sQ: p.sQ, hQ: p.hQ, dQK: p.dQK, dV: p.dV, sKV: p.sKV, topk: p.topk, smScale: p.smScale, out, maxLogits, lse,
      });
      write(p.out, out);
      write(p.maxLogits, maxLogits);
      write(p.lse, lse);
    },
    async pagedSparseAttention(p: Record<string, unknown> & { n: number; hQ: number; out: unknown; lse: unknown; maxLogits: unknown }) {
      const arrays = ['q', 'kCache', 'indices', 'topkLength', 'extraKCache', 'extraIndices', 'extraTopkLength', 'attnSink', 'out', 'lse', 'maxLogits'];
      note('pagedSparseAttention', p, arrays);
      const opt = <T extends ArrayBufferView>(x: unknown, ctor: Ctor<T>): T | null => (x === null ? null : view(x, ctor));
      const out = new Uint16Array(p.n * p.hQ * 512), lse = new Float32Array(p.n * p.hQ), maxLogits = new Float32Array(p.n * p.hQ);
      await addon.cpu.pagedSparseAttention(2, {
        ...p,
        q: view(p.q, Uint16Array), kCache: view(p.kCache, Uint8Array), indices: view(p.indices, Int32Array), topkLength: opt(p.topkLength, Int32Array),
        extraKCache: opt(p.extraKCache, Uint8Array), extraIndices: opt(p.extraIndices, Int32Array), extraTopkLength: opt(p.extraTopkLength, Int32Array),
        attnSink: opt(p.attnSink, Float32Array), out, lse, maxLogits,
      } as never);
      write(p.out, out);
      write(p.lse, lse);
      if (p.maxLogits !== null) write(p.maxLogits, maxLogits);
    },
  };
}

/**
 * The stand-in as the binding's op table: the kernel ops take (params, stream) with the fields of
 * CUDA_OP_PARAMS (src/backends/abi.ts); upload and download take (buffer, data, stream).
 */
export function standInTable(addon: NativeAddon, calls: OpCall[], held: { downloadsWaitForPrefill: boolean }): NativeCudaOps {
  const ops = standInOps(addon, calls, held);
  const named = {
    upload: (buffer: StandInBuffer, data: ArrayBufferView) => ops.upload({ buffer, data }),
    download: (buffer: StandInBuffer, data: ArrayBufferView) => ops.download({ buffer, data }),
    dequantizeKvCache: (p: Parameters<typeof ops.dequantizeKvCache>[0]) => ops.dequantizeKvCache(p),
    planRows: (p: Parameters<typeof ops.planRows>[0]) => ops.planRows(p),
    planCompressedTokenIds: (p: Parameters<typeof ops.planCompressedTokenIds>[0]) => ops.planCompressedTokenIds(p),
    sparsePrefill: (p: Parameters<typeof ops.sparsePrefill>[0]) => ops.sparsePrefill(p),
    pagedSparseAttention: (p: Parameters<typeof ops.pagedSparseAttention>[0]) => ops.pagedSparseAttention(p),
    // a layer program: read once (each part with its own op's fields, every array a device buffer
    // but the attention's outputs, null), then run over buffers of the same sizes in its slots' order
    // (noted as its own call, then its parts: the dequants, the combine, the prefill into outputs
    // it allocates; or a paged layer's one paged op)
    layerProgramClass: () =>
      class {
        readonly slots: string[] = [];
        readonly sizes: number[] = [];
        constructor(
          readonly params: { planRows: Record<string, unknown> | null; dequants: Record<string, unknown>[]; prefill: Record<string, unknown> } | { paged: Record<string, unknown> },
          readonly stream: { device: number },
        ) {
          const paged = 'paged' in params;
          expect(Object.keys(params).sort()).toEqual(paged ? ['paged'] : ['dequants', 'planRows', 'prefill']);
          const parts: [string, Record<string, unknown>, CudaOpName][] = paged
            ? [['paged', params.paged, 'pagedSparseAttention']]
            : [
                ...(params.planRows ? [['planRows', params.planRows, 'planRows'] as [string, Record<string, unknown>, CudaOpName]] : []),
                ...params.dequants.map((d, i) => [`dequants.${i}`, d, 'dequantizeKvCache'] as [string, Record<string, unknown>, CudaOpName]),
                ['prefill', params.prefill, 'sparsePrefill'],
              ];
          for (const [name, part, op] of parts) {
            expect(Object.keys(part).sort(), name).toEqual(Object.keys(CUDA_OP_PARAMS[op]).sort());
            for (const [field, v] of Object.entries(part)) {
              if (v instanceof StandInBuffer) this.slots.push(`${name}.${field}`), this.sizes.push(v.byteLength);
              else if (ArrayBuffer.isView(v) && !['seqLens', 'extendLens'].includes(field)) throw new Error(`${name}.${field}: host memory in a layer program`);
            }
          }
          const attention = paged ? params.paged : params.prefill;
          expect([attention.out, attention.maxLogits, attention.lse]).toEqual([null, null, null]);
        }
        /** a part's params with this layer's buffers */
        #part(bound: Record<string, StandInBuffer>, name: string, part: Record<string, unknown>): Record<string, unknown> {
          const p = { ...part };
          for (const [slot, b] of Object.entries(bound)) if (slot.startsWith(`${name}.`)) p[slot.slice(name.length + 1)] = b;
          return p;
        }
        run(droppedInto: BigInt64Array | null, smScale: number, ...inputs: StandInBuffer[]): { done: Promise<void>; out: StandInBuffer; maxLogits: StandInBuffer; lse: StandInBuffer } {
          expect(inputs.length).toBe(this.slots.length);
          const bound: Record<string, StandInBuffer> = {};
          inputs.forEach((b, k) => {
            expect(b.byteLength, this.slots[k]).toBe(this.sizes[k]);
            bound[this.slots[k]!] = b;
          });
          calls.push({ op: 'layerProgram.run', hostOperands: [] });
          if ('paged' in this.params) {
            expect(droppedInto).toBeNull();
            const { n, hQ } = this.params.paged as { n: number; hQ: number };
            const out = new StandInBuffer(n * hQ * 512 * 2, this.stream), maxLogits = new StandInBuffer(n * hQ * 4, this.stream), lse = new StandInBuffer(n * hQ * 4, this.stream);
            const done = ops.pagedSparseAttention({ ...this.#part(bound, 'paged', this.params.paged), smScale, out, maxLogits, lse } as never);
            return { done, out, maxLogits, lse };
          }
          const dequants = this.params.dequants.map((d, i) => this.#part(bound, `dequants.${i}`, d));
          const rows = this.params.planRows === null ? null : this.#part(bound, 'planRows', this.params.planRows);
          const { sQ, hQ, dV } = this.params.prefill as { sQ: number; hQ: number; dV: number };
          const out = new StandInBuffer(sQ * hQ * dV * 2, this.stream), maxLogits = new StandInBuffer(sQ * hQ * 4, this.stream), lse = new StandInBuffer(sQ * hQ * 4, this.stream);
          const prefill = { ...this.#part(bound, 'prefill', this.params.prefill), smScale, out, maxLogits, lse };
          // in stream order; settled once the prefill has run too (the stand-in's downloads are not ordered behind it)
          const done = (async () => {
            for (const d of dequants) await ops.dequantizeKvCache(d as never);
            if (rows !== null) {
              await ops.planRows(rows as never);
              if (droppedInto !== null) droppedInto.set(new BigInt64Array((rows.droppedTotal as StandInBuffer).mem));
            }
            await ops.sparsePrefill(prefill as never);
          })();
          return { done, out, maxLogits, lse };
        }
      },
  };
  return new Proxy({ deviceBufferClass: () => StandInBuffer, streamClass: () => StandInStream, ...named } as object, {
    get: (target, name) => (target as Record<string | symbol, unknown>)[name] ?? (() => { throw new Error(`unexpected CUDA op ${String(name)}`); }),
  }) as NativeCudaOps;
}
