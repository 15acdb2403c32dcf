/**
 * A stand-in CUDA device for the cuda backend's host logic (no GPU, no addon): an op table whose
 * buffers are sizes only, counted while live (a view holds its base's allocation, as the addon's
 * do), whose allocator can be told to fail (cudaErrorMemoryAllocation) from the n-th allocation on,
 * and whose ops record each call and every operand that a real launch would fault on or refuse (a
 * freed buffer, one of another device) or read unordered (a download on a stream other than the
 * buffer's). Ops do nothing and settle at once, as the addon's do with device operands.
 */
import { CudaBackend } from '../../dist/backends/native/cuda_backend.js';
import type { NativeAddon, NativeCudaOps } from '../../dist/backends/native/binding.js';
import { SparseMlaEngine } from '../../dist/engine.js';

export interface StandInDevice {
  /** allocations not yet given back (a view's base counts until every view is freed) */
  readonly live: Set<object>;
  /** what a real device would fault on, refuse, or read out of order */
  readonly faults: string[];
  /** every op called, in order */
  readonly ops: string[];
  /** allocations so far (views excluded) */
  allocs: number;
  /** allocations after this many fail as out of memory (Infinity: none) */
  failAfter: number;
  /** makes a cuda engine on `device` over this stand-in; `override` replaces ops */
  engine(device?: number, override?: Record<string, unknown>): { engine: SparseMlaEngine; backend: CudaBackend };
  /** clears live, faults and ops, and the failure */
  reset(): void;
}

/** A stand-in CUDA stream: always idle, its work done at once. */
export class StandInStream {
  constructor(readonly device: number) {}
  synchronize(): Promise<void> {
    return Promise.resolve();
  }
  query(): boolean {
    return true;
  }
}

export function standInDevice(): StandInDevice {
  const live = new Set<object>();
  const faults: string[] = [];
  const ops: string[] = [];
  class Allocation {
    refs = 0;
    constructor(readonly bytes: number) {
      live.add(this);
    }
    drop(): void {
      if (--this.refs === 0) live.delete(this);
    }
  }
  const Stream = StandInStream;
  type Stream = StandInStream;
  const dev: StandInDevice = {
    live,
    faults,
    ops,
    allocs: 0,
    failAfter: Infinity,
    engine(device = 0, override = {}) {
      const backend = new CudaBackend({} as NativeAddon, opTable(override), 1, undefined, device);
      return { engine: new SparseMlaEngine(backend), backend };
    },
    reset() {
      live.clear();
      faults.length = 0;
      ops.length = 0;
      dev.allocs = 0;
      dev.failAfter = Infinity;
    },
  };
  class Buffer {
    alloc: Allocation | null;
    readonly device: number;
    constructor(readonly byteLength: number, readonly stream: Stream, base?: Buffer, byteOffset = 0) {
      if (base !== undefined) {
        if (base.alloc === null || byteOffset + byteLength > base.alloc.bytes) throw Object.assign(new Error('alloc: a bad view'), { code: 'SMLA_ADDON_ARGUMENT' });
        this.alloc = base.alloc;
      } else {
        if (++dev.allocs > dev.failAfter) throw Object.assign(new Error('alloc: CUDA failed'), { code: 'SMLA_CUDA_ERROR', status: 'cudaErrorMemoryAllocation: out of memory' });
        this.alloc = new Allocation(byteLength);
      }
      this.alloc.refs++;
      this.device = stream.device;
    }
    get freed(): boolean {
      return this.alloc === null;
    }
    free(): void {
      this.alloc?.drop();
      this.alloc = null;
    }
  }
  const check = (op: string, name: string, v: unknown, stream: Stream): void => {
    if (!(v instanceof Buffer)) return;
    if (v.freed) faults.push(`${op}.${name}: a freed buffer`);
    else if (v.device !== stream.device) faults.push(`${op}.${name}: a buffer of device ${v.device} on device ${stream.device}`);
  };
  const kernel = (op: string) => (params: Record<string, unknown>, stream: Stream): Promise<void> => {
    ops.push(op);
    for (const [k, v] of Object.entries(params)) check(op, k, v, stream);
    return Promise.resolve();
  };
  class Program {
    readonly slots: string[] = [];
    readonly rows: number;
    constructor(params: Record<string, Record<string, unknown> | Record<string, unknown>[] | null>, readonly stream: Stream) {
      const paged = params.paged as Record<string, unknown> | undefined;
      const parts: [string, Record<string, unknown>][] = paged
        ? [['paged', paged]]
        : [...(params.planRows ? [['planRows', params.planRows] as [string, Record<string, unknown>]] : []), ...(params.dequants as Record<string, unknown>[]).map((d, i) => [`dequants.${i}`, d] as [string, Record<string, unknown>]), ['prefill', params.prefill as Record<string, unknown>]];
      for (const [name, part] of parts) {
        for (const [field, v] of Object.entries(part)) {
          if (!(v instanceof Buffer)) continue;
          check('layerProgram', `${name}.${field}`, v, stream);
          this.slots.push(`${name}.${field}`);
        }
      }
      const p = (paged ?? params.prefill) as { n?: number; sQ?: number; hQ: number };
      this.rows = (p.n ?? p.sQ!) * p.hQ;
    }
    run(_dropped: unknown, _smScale: number, ...inputs: Buffer[]) {
      ops.push('layerProgram.run');
      inputs.forEach((b, i) => check('layerProgram.run', this.slots[i]!, b, this.stream));
      const base = new Buffer(this.rows * 1032 + 512, this.stream);
      const out = new Buffer(this.rows * 1024, this.stream, base), maxLogits = new Buffer(this.rows * 4, this.stream, base), lse = new Buffer(this.rows * 4, this.stream, base);
      base.free();
      return { done: Promise.resolve(), out, maxLogits, lse };
    }
  }
  const opTable = (override: Record<string, unknown>): NativeCudaOps => {
    const table: Record<string, unknown> = {
      streamClass: () => Stream,
      deviceBufferClass: () => Buffer,
      layerProgramClass: () => Program,
      setTiming() {},
      upload(b: Buffer, _data: ArrayBufferView, s: Stream) {
        ops.push('upload');
        check('upload', 'buffer', b, s);
        return Promise.resolve();
      },
      download(b: Buffer, _data: ArrayBufferView, s: Stream) {
        ops.push('download');
        check('download', 'buffer', b, s);
        if (b.stream !== s) faults.push('download: on a stream other than the one that writes the buffer (unordered)');
        return Promise.resolve();
      },
      copyPeer(dst: Buffer, ds: Stream, src: Buffer, ss: Stream) {
        ops.push('copyPeer');
        check('copyPeer', 'dst', dst, ds);
        check('copyPeer', 'src', src, ss);
        return Promise.resolve();
      },
      ...override,
    };
    return new Proxy(table, { get: (t, name) => t[name as string] ?? kernel(String(name)) }) as unknown as NativeCudaOps;
  };
  return dev;
}
