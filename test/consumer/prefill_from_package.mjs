// Run from inside a consumer project (copied there by test/consumer_install.test.ts): imports the
// package by its name, as a user's code does, runs sparsePrefill on the inputs of a JSON file with
// each backend named on the command line, and prints one JSON line with each backend's out (bf16
// bits, base64) and whether require('sparse-mla') gave the same module as import.
//   node prefill_from_package.mjs <inputs.json> <backend>...
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createEngine, tensor } from 'sparse-mla';

const [inputsFile, ...backends] = process.argv.slice(2);
const inputs = JSON.parse(readFileSync(inputsFile, 'utf8'));
const bits = (b64) => new Uint16Array(new Uint8Array(Buffer.from(b64, 'base64')).buffer);
const args = {
  q: tensor('bf16', inputs.qShape, bits(inputs.q)),
  kv: tensor('bf16', inputs.kvShape, bits(inputs.kv)),
  indices: tensor('int32', inputs.indicesShape, Int32Array.from(inputs.indices)),
  smScale: inputs.smScale,
};
const sameModule = createRequire(import.meta.url)('sparse-mla').createEngine === createEngine;
const results = {};
for (const backend of backends) {
  const engine = await createEngine({ backend, workers: 2 });
  const { out } = await engine.sparsePrefill(args);
  results[backend] = { backend: engine.backend, shape: out.shape, out: Buffer.from(out.data.buffer, out.data.byteOffset, out.data.byteLength).toString('base64') };
  await engine.dispose();
}
console.log(JSON.stringify({ sameModule, results }));
