/**
 * A device layer call checks each operand live, of its bytes and the engine's own in one call
 * (DeviceOps.ownsLive: CudaDeviceBuffer.ownedLive), and a queued layer turns its buffers into the
 * addon's without a getter (CudaDeviceBuffer.nativeOn). Held here on stand-in cuda engines (no GPU, no
 * addon) against what the full checks decide (prefill_layer_checks.ts, prepareLayer: isLiveDeviceBuffer,
 * then DeviceOps.owns) for each operand given as something that is not this engine's live buffer
 * of its size: a buffer of another device, of another engine on this device, one whose brand,
 * size or device was rewritten, a Proxy of one, an object made from the class's prototype, a
 * freed one. The fast checks pass only what the full checks pass, as the very same LayerCall, and
 * a refused call reaches no op; queueLayer refuses a freed or unmade buffer naming its argument
 * and leaves another engine's to the stepwise ops.
 */
import { describe, expect, test } from 'vitest';
import { outcomeOf } from './helpers/errors.js';
import { SparseMlaError, createPlan, prefillLayer } from '../dist/index.js';
import { CudaDeviceBuffer } from '../dist/backends/native/cuda_device_buffer.js';
import { v4PageBytes } from '../dist/kv_cache_layout.js';
import { layerChecks } from '../dist/planner/prefill_layer_checks.js';
import type { DeviceBuffer, Engine } from '../dist/types.js';
import { standInDevice } from './helpers/stand_in_device.js';

const N = 256, HQ = 4, TOPK = 64, PAGE = 64;
const BRAND = Symbol.for('sparse-mla.DeviceBuffer');
const device = standInDevice();
const { engine, backend } = device.engine(0);
// another engine on the same device (its own stream), and one on device 1
const { backend: sameDevice } = device.engine(0);
const { backend: otherDevice } = device.engine(1);

const plan = createPlan({
  requests: [{ seqLen: N, extendLen: N, swaTokenIds: Int32Array.from({ length: N }, (_, i) => i), c4PageTable: [0], c128PageTable: [0, 1] }],
  c4PageSize: PAGE,
  c128PageSize: 1,
});

type Operand = 'q' | 'attnSink' | 'topkIndices' | 'caches.swa' | 'caches.c4';
const OPERANDS: Operand[] = ['q', 'attnSink', 'topkIndices', 'caches.swa', 'caches.c4'];
const BYTES: Record<Operand, number> = { q: N * HQ * 1024, attnSink: HQ * 4, topkIndices: N * TOPK * 4, 'caches.swa': v4PageBytes(PAGE) * (N / PAGE), 'caches.c4': v4PageBytes(PAGE) };

function validArgs(): Record<string, unknown> {
  const t = (dtype: string, shape: number[], bytes: number) => ({ dtype, shape, data: backend.alloc(bytes) });
  return {
    plan,
    compressRatio: 4,
    q: t('bf16', [N, HQ, 512], BYTES.q),
    caches: { swa: { format: 'v4', pageSize: PAGE, numPages: N / PAGE, data: backend.alloc(BYTES['caches.swa']) }, c4: { format: 'v4', pageSize: PAGE, numPages: 1, data: backend.alloc(BYTES['caches.c4']) } },
    topkIndices: t('int32', [N, TOPK], BYTES.topkIndices),
    attnSink: t('float32', [HQ], BYTES.attnSink),
    smScale: 1 / Math.sqrt(512),
    path: 'sparse',
  };
}

/** The args with `operand`'s data replaced by what `make` makes of a fresh buffer of its size on this engine. */
function withData(args: Record<string, unknown>, operand: Operand, data: unknown): Record<string, unknown> {
  if (operand.startsWith('caches.')) {
    const key = operand.slice(7);
    const caches = args.caches as Record<string, object>;
    return { ...args, caches: { ...caches, [key]: { ...caches[key], data } } };
  }
  return { ...args, [operand]: { ...(args[operand] as object), data } };
}

const own = (bytes: number) => backend.alloc(bytes) as CudaDeviceBuffer;
/** [name, a buffer of `bytes` standing for the operand's data, whether the full checks accept it] */
const VARIANTS: [string, (bytes: number) => unknown, boolean][] = [
  ["this engine's", own, true],
  ['another engine on this device', (b) => sameDevice.alloc(b), true],
  ['a buffer of device 1', (b) => otherDevice.alloc(b), false],
  ['freed', (b) => {
    const x = own(b);
    x.free();
    return x;
  }, false],
  ['its brand rewritten', (b) => Object.defineProperty(own(b), BRAND, { value: false }), false],
  ['its size rewritten', (b) => Object.defineProperty(own(b), 'byteLength', { value: b + 4 }), false],
  ['its device rewritten', (b) => Object.defineProperty(own(b), 'deviceIndex', { value: 1 }), false],
  ['a Proxy of one', (b) => new Proxy(own(b), {}), false],
  ["made from the class's prototype", (b) => {
    const x = own(b);
    return Object.assign(Object.create(CudaDeviceBuffer.prototype) as object, { byteLength: b, deviceIndex: 0, device: 'cuda', native: x.native, stream: x.stream, [BRAND]: true });
  }, false],
];


describe('a device layer call: the fast checks of its operands against the full checks', () => {
  test.each(OPERANDS)('%s: each variant passes the fast checks only where the full checks pass it, as the same LayerCall', (operand) => {
    for (const [name, make, accepted] of VARIANTS) {
      const label = `${operand}: ${name}`;
      const args = withData(validArgs(), operand, make(BYTES[operand]));
      const full = outcomeOf(() => layerChecks.prepareLayer(engine, args as never, { output: 'device' }));
      const fast = outcomeOf(() => layerChecks.prepareDeviceLayer(engine, args as never, { output: 'device' }));
      expect(full.error === undefined, `${label}: the full checks`).toBe(accepted);
      expect(fast.error, `${label}: the fast checks throw nothing`).toBeUndefined();
      if (accepted) {
        // an engine's own buffers, and another engine's of this device (queueLayer leaves those to the stepwise ops), take the fast checks
        expect(fast.call, label).toBeDefined();
        expect(fast.call, label).toEqual(full.call);
      } else {
        expect(fast.call, label).toBeUndefined();
      }
    }
  });

  test.each(OPERANDS)('%s: a refused variant is a typed error before any op, as the full checks give it', async (operand) => {
    for (const [name, make, accepted] of VARIANTS) {
      if (accepted) continue;
      const label = `${operand}: ${name}`;
      const args = withData(validArgs(), operand, make(BYTES[operand]));
      const full = outcomeOf(() => layerChecks.prepareLayer(engine, args as never, { output: 'device' }));
      device.reset();
      await expect(prefillLayer(engine as unknown as Engine, args as never, { output: 'device' }), label).rejects.toMatchObject(full.error!);
      expect(device.ops, label).toEqual([]);
    }
  });
});

describe("queueLayer: the run arguments, each the addon's buffer of a live buffer of this engine's stream", () => {
  // one owner: after the first run its program is kept, and a run's buffers meet no other check
  const owner = {};
  /** A one-dequant job (as test/cuda_backend_host.test.ts queues) over this engine's buffers, `q` standing for the prefill's q. */
  const job = (q: unknown) => {
    const ws = backend.alloc(4 * 1024);
    return {
      owner,
      planRows: null,
      dequants: [{ cache: { format: 'v4' as const, pageSize: 64, numPages: 1, numTokens: 64, bytes: v4PageBytes(64), data: backend.alloc(v4PageBytes(64)) }, tokenIds: backend.alloc(16), n: 2, workspace: ws, rowOffset: 0 }],
      prefill: { q: q as DeviceBuffer, workspace: ws, rows: 2, indices: backend.alloc(2 * 8 * 4), lengths: backend.alloc(2 * 4), attnSink: null, numQueries: 2, hQ: 4, width: 8, smScale: 0.1 },
    };
  };
  const Q_BYTES = 2 * 4 * 1024;

  test("this engine's buffers are run in slot order; another engine's (of this device) go to the stepwise ops; a freed or unmade one is INVALID_VALUE naming q, before the run (the program kept)", async () => {
    device.reset();
    const r = await backend.queueLayer(job(own(Q_BYTES)));
    expect(r).toBeDefined();
    expect(device.ops).toEqual(['layerProgram.run']);
    expect(device.faults).toEqual([]);
    for (const t of [r!.out, r!.lse, r!.maxLogits]) t.free();

    device.reset();
    expect(await backend.queueLayer(job(sameDevice.alloc(Q_BYTES)))).toBeUndefined();
    expect(device.ops).toEqual([]);

    const freed = own(Q_BYTES);
    freed.free();
    const x = own(Q_BYTES);
    const unmade = Object.assign(Object.create(CudaDeviceBuffer.prototype) as object, { byteLength: Q_BYTES, deviceIndex: 0, native: x.native, stream: x.stream, [BRAND]: true });
    for (const [name, q] of [['freed', freed], ['unmade', unmade]] as const) {
      device.reset();
      const err = await backend.queueLayer(job(q)).catch((e: unknown) => e);
      expect(err, name).toBeInstanceOf(SparseMlaError);
      expect((err as SparseMlaError).code, name).toBe('INVALID_VALUE');
      expect((err as SparseMlaError).argument, name).toBe('q');
      expect(device.ops, name).toEqual([]);
    }
  });
});
