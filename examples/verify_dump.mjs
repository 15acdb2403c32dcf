// Judge outputs dumped from an engine with `sparse-mla verify`, the CPU-only check for GPU outputs:
// write a sparse-prefill dump as .npy files (the layout `sparse-mla prefill` and `verify` read;
// from Python it is np.save of the same arrays), let verify recompute the float64 reference and
// judge out / lse / max_logits, then corrupt one output element and watch it fail (exit 1).
//   node examples/verify_dump.mjs [dir]     (default: a fresh temp dir)
import { spawnSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bf16BitsToFloat32, createEngine, float32ToBf16Bits, tensor, toBf16 } from 'sparse-mla';

/** A .npy file (format 1.0, little-endian, C order): the 10-byte preamble, a padded header, the data. */
function writeNpy(path, descr, shape, data) {
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`;
  const header = dict.padEnd(Math.ceil((10 + dict.length + 1) / 64) * 64 - 10 - 1) + '\n';
  const preamble = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 0xff, header.length >> 8]);
  writeFileSync(path, Buffer.concat([preamble, Buffer.from(header, 'latin1'), Buffer.from(data.buffer, data.byteOffset, data.byteLength)]));
}

const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'sparse-mla-dump-'));
mkdirSync(dir, { recursive: true });
const random = (n) => Float32Array.from({ length: n }, () => Math.random() - 0.5);
const sQ = 16, hQ = 8, dQK = 576, sKV = 300, topk = 64, smScale = 1 / Math.sqrt(dQK);

// Inputs (bf16 as raw bits in <u2 arrays).
const args = {
  q: toBf16({ shape: [sQ, hQ, dQK], data: random(sQ * hQ * dQK) }),
  kv: toBf16({ shape: [sKV, dQK], data: random(sKV * dQK) }),
  indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, () => Math.floor(Math.random() * sKV))),
  attnSink: tensor('float32', [hQ], random(hQ)),
  smScale,
  dV: 512,
};
writeNpy(join(dir, 'q.npy'), '<u2', args.q.shape, args.q.data);
writeNpy(join(dir, 'kv.npy'), '<u2', args.kv.shape, args.kv.data);
writeNpy(join(dir, 'indices.npy'), '<i4', args.indices.shape, args.indices.data);
writeNpy(join(dir, 'attn_sink.npy'), '<f4', args.attnSink.shape, args.attnSink.data);
writeFileSync(join(dir, 'meta.json'), JSON.stringify({ sm_scale: smScale, d_v: 512 }));

// Outputs of the engine under test (here this library's own best backend).
const engine = await createEngine();
const res = await engine.sparsePrefill(args);
await engine.dispose();
writeNpy(join(dir, 'out.npy'), '<u2', res.out.shape, res.out.data);
writeNpy(join(dir, 'lse.npy'), '<f4', res.lse.shape, res.lse.data);
writeNpy(join(dir, 'max_logits.npy'), '<f4', res.maxLogits.shape, res.maxLogits.data);
console.log(`wrote a dump of the ${engine.backend} backend's sparsePrefill to ${dir}`);

// The installed CLI: node_modules/.bin/sparse-mla, i.e. this package's dist/cli/main.js.
const cli = join(dirname(fileURLToPath(import.meta.resolve('sparse-mla/package.json'))), 'dist', 'cli', 'main.js');
const verify = () => spawnSync(process.execPath, [cli, 'verify', dir, '--quiet'], { encoding: 'utf8' });

let r = verify();
console.log(`\n$ sparse-mla verify ${dir}   (exit ${r.status})\n${r.stdout}${r.stderr}`);
const good = r.status === 0;

// One output element moved by 0.05, far outside its bound: verify must fail.
const bad = res.out.data.slice();
bad[1234] = float32ToBf16Bits(bf16BitsToFloat32(bad[1234]) + 0.05);
writeNpy(join(dir, 'out.npy'), '<u2', res.out.shape, bad);
r = verify();
console.log(`$ sparse-mla verify ${dir}   (one element of out corrupted; exit ${r.status})\n${r.stdout}${r.stderr}`);
if (!good || r.status !== 1) process.exitCode = 1;
