/**
 * Builds of one commit's addon are byte-identical wherever the tree is: the sources the addon is
 * built from, copied to two paths of different lengths, each built as the install script builds
 * it (native/build_tools.mjs buildAddon: -march=native, not stripped, the build tree scrubbed),
 * must give the same file. The cpu backend only by default; SPARSE_MLA_TEST_NVCC_BUILDS=1 builds the
 * CUDA kernels too, where nvcc is (several times longer).
 * .ci/package_check.sh rebuilds the packed x86-64-v2 addon, kernels included, from the unpacked
 * tarball and requires the packed bytes.
 */
import { cpSync, mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';
import { tempDirs } from './helpers/temp_dirs.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface BuildTools {
  findBuildTools(root: string): { ok: true; cmakeJs: string; compilers: { cc: string; cxx: string } | null } | { ok: false; why: string };
  runs(cmd: string, args?: string[]): boolean;
  buildAddon(options: Record<string, unknown>): Promise<{ ok: boolean; problem: string | null; addon: string; scrub: { ok: boolean; why?: string; left: string[] } | null }>;
}
const tools = (await import('../native/build_tools.mjs')) as unknown as BuildTools;
const found = tools.findBuildTools(ROOT);
const withCuda = process.env.SPARSE_MLA_TEST_NVCC_BUILDS === '1' && tools.runs('nvcc') ? 'ON' : 'OFF';
const copies = tempDirs('sparse-mla-repro-');

/** What the addon's build reads, copied to `<parent>/sparse-mla`: the CMake files, cpp/, native/, package.json, and node-addon-api, which cmake-js looks for from the tree it builds. */
function copySources(parent: string): string {
  const root = join(parent, 'sparse-mla');
  for (const f of ['CMakeLists.txt', 'package.json', 'cpp', 'native']) cpSync(join(ROOT, f), join(root, f), { recursive: true });
  const addonApi = dirname(createRequire(join(ROOT, 'package.json')).resolve('node-addon-api/package.json'));
  mkdirSync(join(root, 'node_modules'), { recursive: true });
  cpSync(addonApi, join(root, 'node_modules', 'node-addon-api'), { recursive: true });
  return root;
}

const SHT_NOBITS = 8; // .bss, .tbss: no bytes in the file

/** An ELF64 file's sections: name, type, offset and size (the parts of a file a difference can be named by). */
function sections(bytes: Buffer): { name: string; type: number; offset: number; size: number }[] {
  const shoff = Number(bytes.readBigUInt64LE(0x28));
  const [entsize, count, names] = [bytes.readUInt16LE(0x3a), bytes.readUInt16LE(0x3c), bytes.readUInt16LE(0x3e)];
  const header = (i: number) => ({ name: bytes.readUInt32LE(shoff + i * entsize), type: bytes.readUInt32LE(shoff + i * entsize + 4), offset: Number(bytes.readBigUInt64LE(shoff + i * entsize + 24)), size: Number(bytes.readBigUInt64LE(shoff + i * entsize + 32)) });
  const strings = header(names).offset;
  return Array.from({ length: count }, (_, i) => header(i)).map((h) => ({ ...h, name: bytes.toString('latin1', strings + h.name, bytes.indexOf(0, strings + h.name)) }));
}

/** Where two builds differ: each section whose placement or bytes differ, with how many bytes; the file's length. */
function differences(a: Buffer, b: Buffer): string[] {
  const out: string[] = [];
  if (a.length !== b.length) out.push(`length ${a.length} vs ${b.length}`);
  const [sa, sb] = [sections(a), sections(b)];
  if (sa.length !== sb.length) return [...out, `${sa.length} vs ${sb.length} sections`];
  sa.forEach((s, i) => {
    const t = sb[i]!;
    if (s.name !== t.name || s.offset !== t.offset || s.size !== t.size) out.push(`${s.name}: at 0x${s.offset.toString(16)}+0x${s.size.toString(16)} vs ${t.name} at 0x${t.offset.toString(16)}+0x${t.size.toString(16)}`);
    else if (s.type !== SHT_NOBITS && !a.subarray(s.offset, s.offset + s.size).equals(b.subarray(t.offset, t.offset + t.size))) {
      let n = 0;
      for (let k = 0; k < s.size; k++) if (a[s.offset + k] !== b[t.offset + k]) n++;
      out.push(`${s.name}: ${n} of ${s.size} bytes`);
    }
  });
  return out;
}

describe.skipIf(!found.ok || process.platform !== 'linux')(`the addon built at two paths (CUDA ${withCuda})`, () => {
  test('is byte-identical', async () => {
    if (!found.ok) return;
    const top = copies();
    // two trees whose paths differ in length: a rewrite in place of their paths would keep that
    const roots = [copySources(join(top, 'a')), copySources(join(top, 'a-longer-parent-folder', 'and-one-more'))];
    const built: Buffer[] = [];
    for (const root of roots) {
      const outDir = join(root, 'build', 'addon');
      const r = await tools.buildAddon({ root, cmakeJs: found.cmakeJs, compilers: found.compilers, outDir, cpuArch: 'native', withCuda, logPath: join(outDir, 'build.log'), timeoutS: 1500 });
      expect(r.problem, `build at ${root} (log: ${join(outDir, 'build.log')})`).toBeNull();
      expect(r.scrub).toMatchObject({ ok: true, left: [] });
      built.push(readFileSync(r.addon));
    }
    expect(differences(built[0]!, built[1]!)).toEqual([]);
    expect(built[0]!.equals(built[1]!)).toBe(true);
  }, 1_800_000);
});
