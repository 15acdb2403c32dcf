// GPU-resident tensors on a cuda engine: upload a cache and the queries once, dequantize into a
// device workspace and run the sparse prefill with device outputs, then download the result and
// compare it with the same call on host tensors (bit for bit). Without a usable GPU it says why
// and exits 0.
//   node examples/device_tensors.mjs
import { createEngine, createKvCache, listBackends, tensor, toBf16 } from 'sparse-mla';

const cuda = (await listBackends()).find((b) => b.name === 'cuda');
if (!cuda.available) {
  console.log(`skipped: the cuda backend is not available here (${cuda.reason})`);
} else {
  const gpu = await createEngine({ backend: 'cuda' });
  const random = (n) => Float32Array.from({ length: n }, () => Math.random() - 0.5);

  const cache = createKvCache('v4', { pageSize: 64, numPages: 8 });
  const ids = Int32Array.from({ length: 512 }, (_, i) => i);
  await gpu.quantizeKCache({ cache, tokenIds: tensor('int32', [512], ids), rows: toBf16({ shape: [512, 512], data: random(512 * 512) }) });

  const sQ = 64, hQ = 64, topk = 128, n = 400;
  const gather = tensor('int32', [n], Int32Array.from({ length: n }, () => Math.floor(Math.random() * 512)));
  const q = toBf16({ shape: [sQ, hQ, 512], data: random(sQ * hQ * 512) });
  const indices = tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => Math.floor(Math.random() * n)));
  const smScale = 1 / Math.sqrt(512);

  // Device path: copies only where asked for (upload / download).
  const dCache = await gpu.uploadKvCache(cache);
  const dKv = await gpu.dequantizeKCachePaged({ cache: dCache, tokenIds: gather }, { output: 'device' });
  const dQ = await gpu.upload(q);
  const dev = await gpu.sparsePrefill({ q: dQ, kv: dKv, indices, smScale }, { output: 'device' });
  console.log(`device outputs: out [${dev.out.shape}] on ${dev.out.data.device}`);
  const out = await gpu.download(dev.out);

  // Host path, same inputs.
  const kv = await gpu.dequantizeKCachePaged({ cache, tokenIds: gather });
  const host = await gpu.sparsePrefill({ q, kv, indices, smScale });
  const same = out.data.every((b, i) => b === host.out.data[i]);
  console.log(`device path equals host path bit for bit: ${same}`);

  for (const t of [dKv, dQ, dev.out, dev.lse, dev.maxLogits]) t.data.free(); // or leave it to the GC
  dCache.data.free();
  await gpu.dispose();
  if (!same) process.exitCode = 1;
}
