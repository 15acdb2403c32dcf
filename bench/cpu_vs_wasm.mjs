#!/usr/bin/env node
// cpu (native addon) vs wasm backends on the same thread count, at the run shape
// (hQ=64, dQK=512, dV=512, 640 entries per query), runs interleaved so machine noise hits both.
// Usage: node bench/cpu_vs_wasm.mjs [threads=cores] [queries=256] [rounds=7]
import os from 'node:os';
import { createEngine, tensor } from '../dist/index.js';
import { median } from './lib.mjs';

const threads = Number(process.argv[2] ?? os.availableParallelism());
const sQ = Number(process.argv[3] ?? 256);
const rounds = Number(process.argv[4] ?? 7);
const hQ = 64, dQK = 512, dV = 512, topk = 640, sKV = 16384;

let seed = 12345;
const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
const bf16 = (n) => Uint16Array.from({ length: n }, () => { const f = new Float32Array([rand() * 2 - 1]); return new Uint32Array(f.buffer)[0] >>> 16; });
const args = {
  q: tensor('bf16', [sQ, hQ, dQK], bf16(sQ * hQ * dQK)),
  kv: tensor('bf16', [sKV, dQK], bf16(sKV * dQK)),
  indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => Math.floor(rand() * sKV))),
  smScale: 1 / Math.sqrt(dQK),
  attnSink: tensor('float32', [hQ], new Float32Array(hQ)),
};
const flop = 2 * sQ * topk * hQ * (dQK + dV);
const engines = { cpu: await createEngine({ backend: 'cpu', workers: threads }), wasm: await createEngine({ backend: 'wasm', workers: threads }) };
const times = { cpu: [], wasm: [] };
for (const e of Object.values(engines)) await e.sparsePrefill(args); // warm-up
for (let r = 0; r < rounds; r++) {
  for (const [name, e] of Object.entries(engines)) {
    const t0 = performance.now();
    await e.sparsePrefill(args);
    times[name].push((performance.now() - t0) / 1000);
  }
}
const m = { cpu: median(times.cpu), wasm: median(times.wasm) };
console.log(`sparsePrefill sQ=${sQ} hQ=${hQ} dQK=${dQK} topk=${topk}, ${threads} thread(s) each, median of ${rounds} interleaved runs, load ${os.loadavg()[0].toFixed(2)}`);
for (const k of ['cpu', 'wasm']) console.log(`  ${k.padEnd(4)} ${(m[k] * 1000).toFixed(0).padStart(6)} ms  ${(flop / m[k] / 1e9).toFixed(1).padStart(6)} GFLOP/s  (runs: ${times[k].map((t) => (t * 1000).toFixed(0)).join(' ')})`);
console.log(`  cpu / wasm speed: ${(m.wasm / m.cpu).toFixed(2)}x`);
await Promise.all(Object.values(engines).map((e) => e.dispose()));
