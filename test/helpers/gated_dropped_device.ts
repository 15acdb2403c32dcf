/**
 * A stand-in cuda engine (stand_in_device.ts) whose c4 dropped reads are gated by the test, so that
 * "not yet landed" is a state a test holds: the 8-byte downloads (a stepwise c4 layer's dropped read)
 * and layer-program runs with a dropped read (a queued c4 layer) settle only when the test opens their
 * gate, writing the total it gives (standing for the device's sum). Shared by the { dropped: 'later' }
 * tests (prefill_layer_dropped_later, hostile_dropped_later).
 */
import { createPlan, tensor } from '../../dist/index.js';
import type { Engine } from '../../dist/index.js';
import { randomBf16Bits, type Rng } from './random.js';
import { randomCache, randomScenario, randomTopk } from './chunks.js';
import { standInDevice } from './stand_in_device.js';

/** A promise and its settle functions, opened by the test. */
export function gate<T>() {
  let resolve!: (v: T) => void, reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => ((resolve = res), (reject = rej)));
  return { promise, resolve, reject };
}

/** Whether `p` has settled after the queued callbacks ran. */
export async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  return done;
}

/** The gated stand-in engine, its device, and its gates in the order the reads were made. */
export function gatedEngine() {
  const dev = standInDevice();
  const Base = (dev.engine(9).backend as unknown as { ops: { layerProgramClass(): new (...a: unknown[]) => { run(d: BigInt64Array | null, s: number, ...b: unknown[]): { done: Promise<void> } } } }).ops.layerProgramClass();
  const gates: { open(total: number): void; fail(e: unknown): void }[] = [];
  const gated = <T>(write: (total: number) => void, then: Promise<T>) => {
    const g = gate<number>();
    gates.push({ open: (total) => g.resolve(total), fail: (e) => g.reject(e) });
    return g.promise.then((total) => {
      write(total);
      return then;
    });
  };
  class GatedProgram extends Base {
    override run(droppedInto: BigInt64Array | null, smScale: number, ...buffers: unknown[]) {
      const r = super.run(droppedInto, smScale, ...buffers);
      if (droppedInto === null) return r;
      return { ...r, done: gated((t) => (droppedInto[0] = BigInt(t)), r.done) };
    }
  }
  const { engine } = dev.engine(0, {
    layerProgramClass: () => GatedProgram,
    download(_b: unknown, data: ArrayBufferView) {
      if (data instanceof BigInt64Array && data.length === 1) return gated((t) => (data[0] = BigInt(t)), Promise.resolve());
      return Promise.resolve();
    },
  });
  return { dev, engine, gates };
}

/** A c4 chunk with every operand on `engine`'s device (a device sink with `sink`). */
export async function c4Layer(engine: Engine, rng: Rng, { sink = true }: { sink?: boolean } = {}) {
  const sc = randomScenario(rng, [300, 90], [40, 90]);
  const plan = createPlan(sc.chunk, { window: 128 });
  const hQ = 2;
  const q = await engine.upload(tensor('bf16', [sc.numQueries, hQ, 512], randomBf16Bits(rng, sc.numQueries * hQ * 512)));
  const caches = { swa: await engine.uploadKvCache(randomCache(rng, sc.swaPageSize, sc.swaPages)), c4: await engine.uploadKvCache(randomCache(rng, sc.c4PageSize, sc.c4Pages)) };
  const topkIndices = await engine.upload(randomTopk(rng, sc, 64));
  const attnSink = sink ? await engine.upload(tensor('float32', [hQ], new Float32Array(hQ))) : undefined;
  return { plan, layer: { plan, compressRatio: 4 as const, q, caches, topkIndices, ...(attnSink ? { attnSink } : {}), smScale: 0.1, path: 'sparse' as const } };
}
