// Child process of test/alloc_failure.test.ts, run under the fault-injection shim: the cuda
// classes' constructors (Stream, DeviceBuffer, LayerProgram, reachable without a GPU up to their
// first CUDA call or argument check), then the device query, while allocations of the addon fail.
// Prints what each threw (its code) with the switch off, on, and off again.
//   node alloc_failure_classes.mjs <switch file>
import { unlinkSync, writeFileSync } from 'node:fs';
import { loadNativeAddon } from '../../dist/backends/native/binding.js';

const [switchFile] = process.argv.slice(2);
const load = loadNativeAddon();
if (!load.ok) throw new Error(load.reason);
const ops = load.addon.cuda.ops;
if (!ops) {
  console.log(JSON.stringify({ skipped: 'the addon was built without the cuda ops' }));
} else {
  const Stream = ops.streamClass(), DeviceBuffer = ops.deviceBufferClass(), LayerProgram = ops.layerProgramClass();
  const attempts = {
    'new Stream(0)': () => new Stream(0),
    'new Stream()': () => new Stream(),
    'new DeviceBuffer(8, {})': () => new DeviceBuffer(8, {}),
    'new LayerProgram({}, {})': () => new LayerProgram({}, {}),
    'cuda.devices()': () => load.addon.cuda.devices(),
  };
  const outcomes = () =>
    Object.fromEntries(
      Object.entries(attempts).map(([what, make]) => {
        try {
          make();
          return [what, what.startsWith('new') ? 'constructed' : 'returned'];
        } catch (e) {
          return [what, typeof e?.code === 'string' ? e.code : `no code: ${e?.message}`];
        }
      }),
    );
  const off = outcomes();
  writeFileSync(switchFile, '');
  const on = outcomes();
  unlinkSync(switchFile);
  const after = outcomes();
  console.log(JSON.stringify({ off, on, after }));
}
