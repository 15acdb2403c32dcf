/**
 * The documentation runs. Every ```js block of README.md and every examples/*.mjs is run in a child
 * process of a consumer project whose node_modules/sparse-mla links to this checkout (so
 * `sparse-mla` and `sparse-mla/reference` resolve through the package's exports, as installed), on
 * the `wasm` backend and, when the native addon is built, on `cpu` (SPARSE_MLA_BACKEND). Each must
 * exit 0 with nothing on stderr and print what its text says it prints; a GPU block takes its own
 * guard path on a host without CUDA. A new block or example runs by default (with the generic
 * checks); a README block that is not runnable alone must be marked, on the line before its fence,
 * `<!-- docs-test: skip (fragment: why) -->`. Every CLI command line and flag README shows is
 * checked against the CLI's own usage texts.
 * (.ci/package_check.sh runs the same files against the packed tarball, checking their exit only.)
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { SPARSE_PREFILL_THRESHOLDS } from '../dist/index.js';
import { outBound } from '../dist/reference/index.js';
import { nativeAddonBuilt } from './helpers/backends.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const README = readFileSync(join(ROOT, 'README.md'), 'utf8');
const EXAMPLES_DIR = join(ROOT, 'examples');
const MAIN = join(ROOT, 'dist', 'cli', 'main.js');
const SKIP_MARK = /^<!-- docs-test: skip \((.+)\) -->$/;

type DocBackend = 'wasm' | 'cpu';
const BACKENDS: DocBackend[] = nativeAddonBuilt() ? ['wasm', 'cpu'] : ['wasm'];

interface ReadmeBlock {
  /** `<section heading> #<n-th js block of that section>`, e.g. `API #2` */
  name: string;
  line: number;
  code: string;
  /** the reason of a skip mark, or null: the block runs */
  skip: string | null;
}

/** The ```js blocks of a markdown text, named by section; any other fence holding JS is an error. */
function readmeBlocks(text: string): { blocks: ReadmeBlock[]; otherJsFences: string[] } {
  const lines = text.split('\n');
  const blocks: ReadmeBlock[] = [];
  const otherJsFences: string[] = [];
  const perSection = new Map<string, number>();
  let section = '(top)';
  for (let i = 0; i < lines.length; i++) {
    const heading = /^#{1,6} (.+)$/.exec(lines[i]!);
    if (heading) section = heading[1]!.replace(/\s*\(.*\)$/, '');
    const fence = /^```(\S*)/.exec(lines[i]!);
    if (!fence) continue;
    const end = lines.findIndex((l, j) => j > i && l === '```');
    if (end < 0) throw new Error(`README.md:${i + 1}: a fence that is never closed`);
    if (fence[1] === 'js') {
      const n = (perSection.get(section) ?? 0) + 1;
      perSection.set(section, n);
      let before = i - 1;
      while (before >= 0 && lines[before]!.trim() === '') before--;
      const mark = before >= 0 ? SKIP_MARK.exec(lines[before]!) : null;
      blocks.push({ name: `${section} #${n}`, line: i + 1, code: lines.slice(i + 1, end).join('\n') + '\n', skip: mark ? mark[1]! : null });
    } else if (/^(javascript|mjs|cjs|jsx|ts|typescript|node)$/i.test(fence[1]!)) {
      otherJsFences.push(`README.md:${i + 1}: \`\`\`${fence[1]}`);
    }
    i = end;
  }
  return { blocks, otherJsFences };
}

const { blocks: BLOCKS, otherJsFences: OTHER_JS_FENCES } = readmeBlocks(README);
const RUN_BLOCKS = BLOCKS.filter((b) => b.skip === null);
const EXAMPLES = readdirSync(EXAMPLES_DIR).filter((f) => f.endsWith('.mjs')).sort();

// ---- reading a doc's own source, so the checks follow what the docs say

/** `name = <integer>` in a snippet (its own sizes). */
function constant(code: string, name: string): number {
  const m = new RegExp(`\\b${name} = (\\d+)\\b`).exec(code);
  if (!m) throw new Error(`no \`${name} = <integer>\` in the snippet`);
  return Number(m[1]);
}

/** The trailing `// ...` comment of the console.log line that starts with `console.log(<args>`: what the docs say it prints. */
function documentedOutput(code: string, args: string): string {
  const line = code.split('\n').find((l) => l.trimStart().startsWith(`console.log(${args}`));
  const m = line ? /\);\s*\/\/ (.+)$/.exec(line) : null;
  if (!m) throw new Error(`no \`console.log(${args}...);   // <what it prints>\` line in the snippet`);
  return m[1]!.trim();
}

/** The number array literal after `marker` in a snippet, e.g. the layers' compress ratios. */
function arrayAfter(code: string, marker: string): number[] {
  const at = code.indexOf(marker);
  if (at < 0) throw new Error(`no \`${marker}\` in the snippet`);
  return JSON.parse(/\[[\d, ]*\]/.exec(code.slice(at))![0]) as number[];
}

/** The router's rule as README states it: the workspace path when the chunk's queries exceed the backend's threshold. */
function routedPath(backend: DocBackend, ratio: number, queries: number): 'sparse' | 'paged' {
  return queries > SPARSE_PREFILL_THRESHOLDS[backend][ratio as 0 | 4 | 128] ? 'sparse' : 'paged';
}

/** Counters of a `console.log(plan.stats)` (util.inspect form). */
function planStats(text: string): Record<string, number> {
  return Object.fromEntries([...text.matchAll(/\b(\w+): (\d+)/g)].map((m) => [m[1]!, Number(m[2])]));
}

// ---- running a doc in the consumer project

interface CudaInfo {
  available: boolean;
  reason?: string;
  details?: { devices?: number };
}

interface DocRun {
  backend: DocBackend;
  code: string;
  stdout: string;
  lines: string[];
  cuda: CudaInfo;
  /** what the run was given as its first argument, if anything */
  arg?: string;
}

type DocCheck = (run: DocRun) => void;

let app = '';
let cuda: CudaInfo = { available: false };

function childEnv(backend?: DocBackend): NodeJS.ProcessEnv {
  // the test runner's own SPARSE_MLA_* settings stay out; an explicit addon file stays in
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SPARSE_MLA_') || k === 'SPARSE_MLA_NATIVE_ADDON'));
  return backend ? { ...env, SPARSE_MLA_BACKEND: backend } : env;
}

function runNode(args: string[], backend?: DocBackend): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, args, { cwd: app, env: childEnv(backend), encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(() => {
  app = mkdtempSync(join(tmpdir(), 'sparse-mla-docs-'));
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'docs-consumer', private: true, type: 'module' }));
  mkdirSync(join(app, 'node_modules'));
  symlinkSync(ROOT, join(app, 'node_modules', 'sparse-mla'), 'dir');
  const r = runNode(['--input-type=module', '-e', "import { listBackends } from 'sparse-mla'; console.log(JSON.stringify((await listBackends()).find((b) => b.name === 'cuda')))"]);
  expect(r.stderr).toBe('');
  cuda = JSON.parse(r.stdout) as CudaInfo;
});

afterAll(() => {
  if (app) rmSync(app, { recursive: true, force: true });
});

// ---- what each README block prints, as its text says

const README_CHECKS: Record<string, DocCheck> = {
  'API #1': ({ backend, code, lines }) => {
    // `console.log(engine.backend)`: the backend SPARSE_MLA_BACKEND asked for
    expect(lines[0]).toBe(backend);
    // the documented output line agrees with the block's own sizes and with what it prints
    const sQ = constant(code, 'sQ'), hQ = constant(code, 'hQ');
    const documented = documentedOutput(code, 'out.dtype');
    expect(documented).toBe(`bf16 [ ${sQ}, ${hQ}, 512 ] float32 [ ${sQ}, ${hQ} ]`);
    expect(lines.slice(1)).toEqual([documented]);
  },
  'API #2': ({ code, lines, cuda: gpu }) => {
    if (!gpu.available) {
      expect(lines).toEqual([`no cuda backend here: ${gpu.reason}`]);
      return;
    }
    expect(lines).toEqual([documentedOutput(code, 'out.shape')]);
  },
  'Planner, layer API and router #1': ({ backend, code, lines }) => {
    const ratios = arrayAfter(code, 'for (const ratio of');
    const extendLen = constant(code, 'extendLen'), hQ = constant(code, 'hQ');
    let c4Dropped = 0;
    ratios.forEach((ratio, i) => {
      const m = /^c(\d+): (sparse|paged) path \((.+)\), out \[([\d,]+)\], (\d+) top-k entries dropped$/.exec(lines[i] ?? '');
      expect(m, lines[i]).not.toBeNull();
      const [, r, path, , shape, dropped] = m!;
      expect(Number(r)).toBe(ratio);
      expect(path).toBe(routedPath(backend, ratio, extendLen));
      expect(shape).toBe(`${extendLen},${hQ},512`);
      // only c4 layers have a top-k that can reach past what a query sees
      if (ratio === 4) expect(Number(dropped)).toBeGreaterThan(0);
      else expect(Number(dropped)).toBe(0);
      c4Dropped += Number(dropped);
    });
    const stats = planStats(lines.slice(ratios.length).join('\n'));
    // "c0Builds / c128Builds stay 1 across layers"; the plan counts every layer's dropped entries
    expect(stats).toMatchObject({ c0Builds: 1, c128Builds: 1, c4Combines: ratios.filter((r) => r === 4).length, c4Dropped });
  },
  'Several GPUs #1': ({ code, lines, cuda: gpu }) => {
    const extendLen = constant(code, 'extendLen'), hQ = constant(code, 'hQ');
    const gpus = gpu.available ? Number(gpu.details?.devices ?? 1) : 0;
    expect(lines).toHaveLength(1);
    const m = /^\[ (\d+), (\d+), 512 \] (\d+) \[ (.*) \]$/.exec(lines[0]!);
    expect(m, lines[0]).not.toBeNull();
    expect([Number(m![1]), Number(m![2])]).toEqual([extendLen, hQ]);
    // split: 'queries': contiguous slices that cover the chunk, one per engine
    const slices = [...m![4]!.matchAll(/'queries (\d+)\.\.(\d+)'/g)].map((s) => [Number(s[1]), Number(s[2])] as const);
    expect(slices).toHaveLength(gpus >= 2 ? gpus : 2);
    let next = 0;
    for (const [first, last] of slices) {
      expect(first).toBe(next);
      expect(last).toBeGreaterThanOrEqual(first);
      next = last + 1;
    }
    expect(next).toBe(extendLen);
  },
};

// ---- what each example prints, as its comments say

/** Examples that take an output directory (given one inside the test's temp project, so nothing is left behind). */
const TAKES_OUTPUT_DIR = new Set(['verify_dump.mjs']);

const EXAMPLE_CHECKS: Record<string, DocCheck> = {
  'quick_start.mjs': ({ backend, code, lines }) => {
    const sQ = constant(code, 'sQ'), hQ = constant(code, 'hQ');
    expect(lines[0]).toBe(`backend: ${backend}`);
    expect(lines[1]).toBe(`out bf16 [${sQ},${hQ},512], lse float32 [${sQ},${hQ}], maxLogits float32 [${sQ},${hQ}]`);
    const ratios = /^worst error\/bound: out (\S+), lse (\S+), maxLogits (\S+)$/.exec(lines[2] ?? '');
    expect(ratios, lines[2]).not.toBeNull();
    for (const r of ratios!.slice(1)) expect(Number(r)).toBeLessThanOrEqual(1);
    expect(lines.slice(3)).toEqual(['PASS: within the SPEC §4 bounds']);
  },
  'device_tensors.mjs': ({ code, lines, cuda: gpu }) => {
    if (!gpu.available) {
      expect(lines).toEqual([`skipped: the cuda backend is not available here (${gpu.reason})`]);
      return;
    }
    expect(lines).toEqual([`device outputs: out [${constant(code, 'sQ')},${constant(code, 'hQ')},512] on cuda`, 'device path equals host path bit for bit: true']);
  },
  'layer_loop.mjs': ({ backend, code, lines }) => {
    const hQ = constant(code, 'hQ');
    const numQueries = [...code.matchAll(/\bextendLen: (\d+)/g)].reduce((a, m) => a + Number(m[1]), 0);
    const ratios = arrayAfter(code, 'for (const [layer, ratio] of');
    const layerLines = lines.filter((l) => l.startsWith('layer '));
    expect(layerLines).toHaveLength(ratios.length);
    const paths = ratios.map((ratio, i) => {
      const m = /^layer (\d+) \(c(\d+)\): (sparse|paged) path, because (.+); workspace (\d+) bytes, out \[([\d,]+)\]$/.exec(layerLines[i]!);
      expect(m, layerLines[i]).not.toBeNull();
      expect([Number(m![1]), Number(m![2])]).toEqual([i, ratio]);
      expect(m![3]).toBe(routedPath(backend, ratio, numQueries));
      expect(m![6]).toBe(`${numQueries},${hQ},512`);
      return m![3]!;
    });
    // layer 1, again down the other path: the two agree within twice SPEC §4's out bound at mag 0.5
    const other = lines.find((l) => l.startsWith('  the same layer down the '));
    const m = /^ {2}the same layer down the (sparse|paged) path: max \|difference\| (\S+), allowed (\S+) /.exec(other ?? '');
    expect(m, other).not.toBeNull();
    expect(m![1]).not.toBe(paths[1]);
    expect(m![3]).toBe((2 * outBound(0.5)).toExponential(2));
    expect(Number(m![2])).toBeLessThanOrEqual(2 * outBound(0.5));
    // the c0 / c128 rows built once; its indexer picks only visible positions, so none dropped
    const stats = planStats(lines.slice(lines.findIndex((l) => l.startsWith('plan.stats'))).join('\n'));
    expect(stats).toMatchObject({ c0Builds: 1, c128Builds: 1, c4Dropped: 0 });
  },
  'verify_dump.mjs': ({ backend, stdout, lines, arg }) => {
    expect(lines[0]).toBe(`wrote a dump of the ${backend} backend's sparsePrefill to ${arg}`);
    // verify passes the engine's outputs (exit 0), then fails the corrupted out (exit 1)
    const [good, bad] = stdout.split(/^\$ sparse-mla verify /m).slice(1);
    expect(good).toMatch(new RegExp(`^${arg!.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} +\\(exit 0\\)\\n`));
    expect(good).toMatch(/^PASS\b/m);
    expect(bad).toContain('(one element of out corrupted; exit 1)');
    expect(bad).toMatch(/^out .* FAIL$/m);
    expect(bad).toMatch(/^FAIL: out\b/m);
  },
};

describe('README.md code blocks', () => {
  test(`every js block is run or marked as a fragment (${RUN_BLOCKS.length} run, ${BLOCKS.length - RUN_BLOCKS.length} marked)`, () => {
    expect(BLOCKS.length).toBeGreaterThan(0);
    expect(OTHER_JS_FENCES, 'JavaScript fenced as something other than ```js is not run').toEqual([]);
    // a check for a block that is gone (renamed section, removed block) must not pass silently
    expect(Object.keys(README_CHECKS).filter((name) => !RUN_BLOCKS.some((b) => b.name === name))).toEqual([]);
  });

  describe.each(BACKENDS)('on %s', (backend) => {
    test.each(RUN_BLOCKS.map((b) => [`${b.name} (README.md:${b.line})`, b] as const))('%s', (_, block) => {
      const file = join(app, `readme_${block.line}.mjs`);
      writeFileSync(file, block.code);
      const r = runNode([file], backend);
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const lines = r.stdout.trimEnd().split('\n');
      README_CHECKS[block.name]?.({ backend, code: block.code, stdout: r.stdout, lines, cuda });
    });
  });
});

describe('examples/', () => {
  test('every example is checked for what it prints; each names itself in its usage line', () => {
    expect(Object.keys(EXAMPLE_CHECKS).filter((f) => !EXAMPLES.includes(f))).toEqual([]);
    for (const f of EXAMPLES) expect(readFileSync(join(EXAMPLES_DIR, f), 'utf8'), f).toContain(`//   node examples/${f}`);
    // README's way to run one from an installed package names a file that exists
    for (const m of README.matchAll(/`node (?:node_modules\/sparse-mla\/)?examples\/([\w.]+)`/g)) expect(EXAMPLES).toContain(m[1]);
  });

  describe.each(BACKENDS)('on %s', (backend) => {
    test.each(EXAMPLES)('%s', (name) => {
      const check = EXAMPLE_CHECKS[name];
      const arg = TAKES_OUTPUT_DIR.has(name) ? join(app, `${name}-${backend}-out`) : undefined;
      // as README runs it from an installed package: node node_modules/sparse-mla/examples/<file>
      const r = runNode([join('node_modules', 'sparse-mla', 'examples', name), ...(arg ? [arg] : [])], backend);
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const code = readFileSync(join(EXAMPLES_DIR, name), 'utf8');
      check?.({ backend, code, stdout: r.stdout, lines: r.stdout.trimEnd().split('\n'), cuda, ...(arg ? { arg } : {}) });
    });
  });
});

// ---- the CLI as README shows it

interface Usage {
  /** flag → its value's spec (`N`, `auto|cuda|cpu|wasm`, ...), or null for a switch */
  options: Map<string, string | null>;
}

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', env: childEnv(), timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function usageOf(command: string): Usage {
  const r = cli([command, '--help']);
  expect(r.status, `${command} --help: ${r.stderr}`).toBe(0);
  const options = new Map<string, string | null>();
  for (const m of r.stdout.matchAll(/^ {2}(?:-\w, | {4})(--[a-z][a-z-]*)(?: (\S+))?/gm)) options.set(m[1]!, m[2] ?? null);
  return { options };
}

/** Each use of a command in README: `sparse-mla <cmd> [args]` in inline code and sh blocks, and the flags of the CLI section's `- \`<cmd> ...\`` bullets. */
function readmeCommandUses(commands: readonly string[]): { where: string; command: string; words: string[] }[] {
  const uses: { where: string; command: string; words: string[] }[] = [];
  const code = [
    ...[...README.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].flatMap((m) => m[1]!.split('\n').map((l) => l.replace(/\s+#.*$/, ''))),
    ...[...README.replace(/^```[\s\S]*?^```$/gm, '').matchAll(/`([^`]+)`/g)].map((m) => m[1]!.replace(/\s+/g, ' ')),
  ];
  for (const text of code) {
    for (const m of text.matchAll(/(?:^|\s)sparse-mla ([a-z][a-z-]*)((?: [^ ]+)*)/g)) uses.push({ where: text, command: m[1]!, words: m[2]!.trim().split(' ').filter(Boolean) });
  }
  const cliSection = README.slice(README.indexOf('\n## CLI\n'), README.indexOf('\n## ', README.indexOf('\n## CLI\n') + 1));
  for (const bullet of cliSection.split(/\n(?=- )/)) {
    const head = /^- `([a-z]+)\b/.exec(bullet);
    if (!head || !commands.includes(head[1]!)) continue;
    for (const m of bullet.replace(/\s+/g, ' ').matchAll(/`([^`]+)`/g)) {
      const words = m[1]!.split(' ');
      if (words[0] === head[1]) uses.push({ where: m[1]!, command: head[1]!, words: words.slice(1) });
      else if (words[0]!.startsWith('--')) uses.push({ where: m[1]!, command: head[1]!, words });
    }
  }
  return uses;
}

describe('the CLI lines README shows', () => {
  test('each command and flag is one the CLI accepts, with values its usage lists; every command takes --json', () => {
    const top = cli(['--help']);
    expect(top.status).toBe(0);
    const commandsBlock = /^Commands:\n((?: {2}\S.*\n)+)/m.exec(top.stdout);
    expect(commandsBlock).not.toBeNull();
    const commands = [...commandsBlock![1]!.matchAll(/^ {2}(\S+)/gm)].map((m) => m[1]!);
    const usages = new Map(commands.map((c) => [c, usageOf(c)]));
    // "Every command takes `--json`"
    for (const [c, u] of usages) expect(u.options.has('--json'), c).toBe(true);

    const uses = readmeCommandUses(commands);
    expect(uses.length).toBeGreaterThan(10);
    const problems: string[] = [];
    for (const { where, command, words } of uses) {
      const usage = usages.get(command);
      if (!usage) {
        problems.push(`\`${where}\`: no command '${command}' (the CLI has ${commands.join(', ')})`);
        continue;
      }
      for (let i = 0; i < words.length; i++) {
        if (!words[i]!.startsWith('-')) continue;
        const flag = words[i]!;
        if (flag === '--help') continue;
        if (!usage.options.has(flag)) {
          problems.push(`\`${where}\`: ${command} has no option ${flag}`);
          continue;
        }
        const spec = usage.options.get(flag);
        const value = words[i + 1];
        if (spec === null || spec === undefined || value === undefined || value.startsWith('-')) continue;
        i++;
        if (spec.includes('|')) {
          const allowed = spec.split('|');
          for (const v of value.split('|')) if (!allowed.includes(v)) problems.push(`\`${where}\`: ${command} ${flag} takes ${spec}, not '${v}'`);
        } else if (spec === 'N' && !/^(\d+|N)$/.test(value)) {
          problems.push(`\`${where}\`: ${command} ${flag} takes a number, not '${value}'`);
        }
      }
    }
    expect(problems).toEqual([]);
  });

  test('the npm scripts README names exist and run the commands it says', () => {
    const scripts = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
    const named = [...README.matchAll(/\bnpm (start|test|run ([\w:-]+))\b/g)].map((m) => m[2] ?? m[1]!);
    expect(named.length).toBeGreaterThan(0);
    expect(named.filter((s) => !(s in scripts))).toEqual([]);
    // "`npm start`: `sparse-mla run` from the checkout"; "`npm run bench` runs it" (bench)
    expect(scripts['start']).toBe('node dist/cli/main.js run');
    expect(scripts['bench']).toBe('node dist/cli/main.js bench');
  });
});
