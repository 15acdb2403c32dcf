/**
 * The `sparse-mla` CLI, run as a user runs it: `node dist/cli/main.js ...` (built by `npm test`).
 * Sizes are tiny so the whole file takes a few seconds; the full-size `run` and `bench` are
 * measured by hand (README), never timed here.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';
import { formatOptions, parseArgs } from '../dist/cli/args.js';
import { tensor } from '../dist/index.js';
import { SPARSE_PREFILL_THRESHOLDS } from '../dist/planner/index.js';
import { writePrefillDir } from '../dist/io/index.js';
import { Progress } from '../dist/cli/progress.js';
import { fitLines, formatTable, runSpreadNote, wrapText } from '../dist/cli/table.js';

const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));

function cli(args: string[], env: Record<string, string> = {}): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [MAIN, ...args], {
    encoding: 'utf8',
    env: { ...process.env, SPARSE_MLA_BACKEND: 'auto', ...env },
    timeout: 60_000,
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A small chunk: 24 queries x 4 heads, 16 compressed picks + a window of 8, context 96. */
const TINY = ['--queries', '24', '--heads', '4', '--topk', '16', '--window', '8', '--context', '96', '--page-size', '16', '--workers', '2'];
/** The layer section, tiny: 4 requests (mid-sequence long, fresh, mid-sequence, shorter than the window), 40 queries, layers 0/4/128/4. */
const TINY_LAYERS = ['--layers', '0,4,128,4', '--requests', '4', '--chunk-tokens', '40', '--max-context', '300', '--layer-check', '5'];

describe('dispatch', () => {
  test('--help lists every command and exits 0', () => {
    const r = cli(['--help']);
    expect(r.code).toBe(0);
    for (const name of ['info', 'run', 'prefill', 'verify', 'bench']) expect(r.stdout).toMatch(new RegExp(`^  ${name} `, 'm'));
    expect(r.stdout).toContain('Usage: sparse-mla <command>');
  });

  test('no command prints the usage on stderr and exits 2', () => {
    const r = cli([]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('Usage: sparse-mla <command>');
  });

  test('an unknown command prints the usage and exits 2', () => {
    const r = cli(['frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown command 'frobnicate'");
    expect(r.stderr).toContain('Commands:');
  });

  test('<command> --help prints that command\'s options and exits 0', () => {
    const r = cli(['run', '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('Usage: sparse-mla run');
    expect(r.stdout).toMatch(/--queries N\s+.*\(default 4096\)/);
    expect(r.stdout).toMatch(/--path auto\|sparse\|paged\s/);
    expect(r.stdout).toMatch(/--layers R,R,\.\.\s+[^]*?\(default 0,0,4,128,4,128\)/);
    for (const line of r.stdout.split('\n')) expect([...line].length, line).toBeLessThanOrEqual(100);
  });

  test('bad flags are usage errors: message naming the flag, exit 2', () => {
    let r = cli(['run', '--queries', 'many']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--queries: expected a decimal integer ≥ 1, got 'many'");
    r = cli(['run', '--no-such-flag']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown option '--no-such-flag'");
    r = cli(['run', '--layers', '0,5']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--layers: expected a comma-separated list of compress ratios 0, 4, 128, got '0,5'");
    r = cli(['run', '--path', 'fastest']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--path: expected one of auto|sparse|paged');
    r = cli(['bench', '--backend', 'tpu']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--backend: expected one of auto|cuda|cpu|wasm');
  });

  // the test needs a backend this machine lacks (cuda on a CPU-only machine)
  const missing = (JSON.parse(cli(['info', '--json']).stdout) as { backends: { name: string; available: boolean }[] }).backends.find((b) => !b.available)?.name;
  test.skipIf(missing === undefined)('a missing backend is refused before any work: its reason, exit 2', () => {
    const r = cli(['run', '--backend', missing!]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(new RegExp(`backend "${missing}" is unavailable .*\\[BACKEND_UNAVAILABLE\\]`));
    expect(r.stderr).not.toContain('generating inputs');
  });

  test('sizes too large for one q tensor are refused up front with TOO_LARGE', () => {
    const r = cli(['run', '--queries', '100000', '--heads', '128']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('[TOO_LARGE]');
  });
});

describe('output contract: --json everywhere (errors too), 100 columns, did you mean', () => {
  const widest = (text: string): number => Math.max(...text.split('\n').map((l) => [...l].length));

  test('a mistyped command gets a suggestion; with --json the error is JSON on stdout', () => {
    for (const [typed, meant] of [['verfy', 'verify'], ['chek', 'check'], ['inf', 'info'], ['bnech', 'bench'], ['prefil', 'prefill']]) {
      const r = cli([typed!]);
      expect(r.code).toBe(2);
      expect(r.stderr).toContain(`unknown command '${typed}' (did you mean '${meant}'?)`);
    }
    expect(cli(['xyzzy']).stderr).toContain("unknown command 'xyzzy'\n");
    const j = cli(['verfy', '--json']);
    expect(j.code).toBe(2);
    expect(JSON.parse(j.stdout)).toEqual({ command: 'verfy', ok: false, exitCode: 2, error: { code: 'UNKNOWN_COMMAND', message: "unknown command 'verfy' (did you mean 'verify'?)", suggestion: 'verify' } });
  });

  test.each([
    ['run', ['--queries', 'many']],
    ['bench', ['--backend', 'tpu']],
    ['check', ['--seed', '-1']],
    ['prefill', []],
    ['verify', ['/no/such/dir']],
    ['info', ['extra']],
  ])('%s: a usage or input error with --json is a JSON error object (exit 2)', (name, args) => {
    const r = cli([name, ...args, '--json']);
    expect(r.code).toBe(2);
    const out = JSON.parse(r.stdout) as { command: string; ok: boolean; exitCode: number; error: { code: string; message: string } };
    expect(out).toMatchObject({ command: name, ok: false, exitCode: 2 });
    expect(out.error.code).toMatch(/^INVALID_/);
    expect(r.stderr).toContain(out.error.message);
  });

  test('check defaults to auto (its help states the default once) and answers --json', () => {
    const help = cli(['check', '--help']).stdout;
    expect(help.match(/default auto/g)).toHaveLength(1);
    expect(help).toMatch(/--backend auto\|cuda\|cpu\|wasm\s/);
    const r = cli(['check', '--only', 'dequant v32', '--seed', '7', '--json']);
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { command: string; ok: boolean; backend: string; seed: number; passed: number; failed: number; cases: { name: string; pass: boolean }[] };
    const auto = (JSON.parse(cli(['info', '--json']).stdout) as { auto: string }).auto;
    expect(out).toMatchObject({ command: 'check', ok: true, backend: auto, seed: 7, passed: 1, failed: 0 });
    expect(out.cases.map((c) => c.name)).toEqual(['dequant v32 {"numTokens":700} bit-exact (duplicates, n=1000)']);
  });

  test('prefill --json: what ran and the files it wrote', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'smla-cli-prefill-'));
    try {
      const sQ = 3, hQ = 2, dQK = 512, sKV = 10, topk = 4;
      const bits = (n: number) => Uint16Array.from({ length: n }, (_, i) => 0x3c00 + (i % 97)); // bf16 values in [0.0078, 0.015)
      await writePrefillDir(join(dir, 'in'), {
        q: tensor('bf16', [sQ, hQ, dQK], bits(sQ * hQ * dQK)),
        kv: tensor('bf16', [sKV, dQK], bits(sKV * dQK)),
        indices: tensor('int32', [sQ, topk], Int32Array.from({ length: sQ * topk }, (_, i) => i % sKV)),
        smScale: 0.05,
      });
      const r = cli(['prefill', join(dir, 'in'), '--out', join(dir, 'out'), '--backend', 'wasm', '--workers', '1', '--json', '-q']);
      expect(r.code).toBe(0);
      const out = JSON.parse(r.stdout) as { command: string; ok: boolean; backend: string; shapes: Record<string, number>; written: string[]; outDir: string };
      expect(out).toMatchObject({ command: 'prefill', ok: true, backend: 'wasm', shapes: { sQ, hQ, dQK, sKV, topk, dV: 512 }, outDir: join(dir, 'out') });
      expect(out.written).toEqual(['out.npy', 'lse.npy', 'max_logits.npy']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('help, info and the check grid fit 100 columns; --wide lifts the limit', () => {
    for (const args of [['--help'], ['run', '--help'], ['bench', '--help'], ['check', '--help'], ['verify', '--help'], ['prefill', '--help'], ['info']]) {
      expect(widest(cli(args).stdout), args.join(' ')).toBeLessThanOrEqual(100);
    }
    const grid = cli(['check', '--only', 'prefill empty rows', '--backend', 'wasm', '--seed', '1']).stdout;
    expect(widest(grid)).toBeLessThanOrEqual(100);
    const wide = cli(['check', '--only', 'prefill empty rows', '--backend', 'wasm', '--seed', '1', '--wide']).stdout;
    expect(widest(wide)).toBeGreaterThan(100);
    expect(wide.split('\n').length).toBeLessThan(grid.split('\n').length);
  });
});

describe('info', () => {
  test('reports the wasm backend, why the others are missing, and the machine', () => {
    const r = cli(['info']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^wasm\s+available\s/m);
    expect(r.stdout).toContain('auto picks:');
    expect(r.stdout).toMatch(/WebAssembly SIMD128: yes/);
    expect(r.stdout).toContain(`Node ${process.version}`);
  });

  test('--json: every backend has a status, a missing one has a reason', () => {
    const r = cli(['info', '--json']);
    expect(r.code).toBe(0);
    const info = JSON.parse(r.stdout) as {
      backends: { name: string; available: boolean; reason?: string }[];
      auto: string | null;
      machine: { cores: number; node: string; wasmSimd128: boolean };
    };
    const wasm = info.backends.find((b) => b.name === 'wasm');
    expect(wasm?.available).toBe(true);
    for (const b of info.backends) if (!b.available) expect(b.reason, b.name).toMatch(/\S/);
    expect(info.auto).not.toBeNull();
    expect(info.machine.cores).toBeGreaterThanOrEqual(1);
    expect(info.machine.node).toBe(process.version);
  });
});

interface LayerJson {
  layer: number;
  ratio: number;
  path: string;
  reason: string;
  workspaceBytes: number;
  seconds: number;
  dropped: number;
  expectedDropped: number;
  check: { pass: boolean; sampledQueries: number[]; out: { pass: boolean; count: number }; lse: { pass: boolean }; maxLogits: { pass: boolean }; droppedPass: boolean };
}
interface LayerChunkJson {
  numQueries: number;
  requests: { seqLen: number; extendLen: number }[];
  routes: { ratio: number; path: string; reason: string }[];
  plan: { workspaceBytes: number; stats: Record<string, number> };
  layers: LayerJson[];
  planChecks: { name: string; pass: boolean; got: number; want: number }[];
  pass: boolean;
}

describe('run', () => {
  test('a tiny run on wasm: both sections, every check and every layer PASS, exit 0', () => {
    const r = cli(['run', ...TINY, ...TINY_LAYERS, '--backend', 'wasm', '--check', '24']);
    expect(r.stderr).not.toContain('internal error');
    expect(r.code).toBe(0);
    // section 1: the big prefill chunk
    expect(r.stdout).toMatch(/^sparsePrefill\s/m);
    expect(r.stdout).toMatch(/^prefill out\s.*PASS$/m);
    expect(r.stdout).toMatch(/^dequantize values\s.*PASS$/m);
    // section 2: one row per layer, each naming its ratio, the path taken and why, and PASS: a
    // table row, or (when the layers' reasons differ and the table would pass 100 columns) a record
    // "layer i: ratio cR, path P, why (router) …, result PASS" over several lines
    expect(r.stdout).toContain('2. Model chunk through the planner and the router: 4 requests, 40 queries');
    const tableRows = r.stdout.split('\n').filter((l) => /^\s+\d+\s+c(0|4|128)\s/.test(l));
    const records = r.stdout.split(/\n(?=\S)/).filter((rec) => /^layer \d+: ratio c/.test(rec)).map((rec) => rec.replace(/\n\s+/g, ' '));
    const layers = tableRows.length > 0
      ? tableRows.map((l) => ({ ratio: l.trim().split(/\s+/)[1], path: l.trim().split(/\s+/)[2], pass: /PASS$/.test(l) }))
      : records.map((rec) => ({ ratio: /ratio (c\d+)/.exec(rec)?.[1], path: /path (\w+)/.exec(rec)?.[1], pass: /, result PASS\b/.test(rec) }));
    expect(layers.map((l) => l.ratio)).toEqual(['c0', 'c4', 'c128', 'c4']);
    // each layer's path: 40 queries against the wasm default of its ratio (SPARSE_PREFILL_THRESHOLDS)
    for (const l of layers) {
      expect(l.path).toBe(40 > SPARSE_PREFILL_THRESHOLDS.wasm[Number(l.ratio!.slice(1)) as 0 | 4 | 128] ? 'sparse' : 'paged');
      expect(l.pass).toBe(true);
    }
    // the chunk's router lines: the decision of each ratio, in the layers' first order (one line when all agree)
    const decision = (ratio: 0 | 4 | 128) => {
      const t = SPARSE_PREFILL_THRESHOLDS.wasm[ratio];
      return `${40 > t ? 'sparse' : 'paged'} — 40 queries ${40 > t ? '>' : '≤'} threshold ${t} (wasm default)`;
    };
    const decisions = ([0, 4, 128] as const).map(decision);
    expect(r.stdout).toContain(
      new Set(decisions).size === 1
        ? `  router (--path auto, wasm default threshold): ${decisions[0]}\n`
        : `  router (--path auto, wasm default threshold), by compress ratio:\n    c0: ${decisions[0]}\n    c4: ${decisions[1]}\n    c128: ${decisions[2]}\n`,
    );
    for (const line of r.stdout.split('\n')) expect([...line].length, line).toBeLessThanOrEqual(100);
    expect(r.stdout).toMatch(/^c0 rows built\s+1\s+1\s.*PASS$/m);
    expect(r.stdout).toMatch(/^c128 rows built\s+1\s+1\s.*PASS$/m);
    expect(r.stdout).toMatch(/^c4 combines\s+2\s+2\s.*PASS$/m);
    expect(r.stdout.trimEnd().split('\n').at(-1)).toBe('PASS');
    // progress goes to stderr (plain lines, not a TTY here), never into the table
    expect(r.stderr).toContain('sparsePrefill:');
    expect(r.stderr).toContain('layer 3 (c4) prefillLayer:');
    expect(r.stdout).not.toContain('\r');
  });

  test('--json: checks over the sampled queries, with the shape that ran, and the layer chunk', () => {
    const r = cli(['run', ...TINY, ...TINY_LAYERS, '--block', '5', '--check', '6', '--seed', '7', '--json', '--quiet']);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout) as {
      pass: boolean;
      shape: { queries: number; heads: number };
      sampledQueries: number;
      steps: { step: string; calls: number; seconds: number }[];
      checks: { name: string; pass: boolean; count: number }[];
      layerChunk: LayerChunkJson;
    };
    expect(out.pass).toBe(true);
    expect(out.shape).toMatchObject({ queries: 24, heads: 4 });
    expect(out.sampledQueries).toBe(6);
    const prefill = out.steps.find((s) => s.step === 'sparsePrefill');
    expect(prefill?.calls).toBe(5); // 24 queries in blocks of 5
    const names = out.checks.map((c) => c.name);
    expect(names).toEqual(expect.arrayContaining(['quantize bytes', 'dequantize values', 'prefill out', 'prefill lse', 'prefill maxLogits']));
    const checkedOut = out.checks.find((c) => c.name === 'prefill out');
    expect(checkedOut?.count).toBe(6 * 4 * 512);
    // the bounded checks carry SPEC §4's figures: worst error/bound ratio and where, 1 − cos
    const outVerdict = (checkedOut as unknown as { comparison: { worstRatio: number; overBound: number; worst: { at: { query: number; head: number; col: number } }; cosineGap: number } }).comparison;
    expect(outVerdict.worstRatio).toBeGreaterThan(0);
    expect(outVerdict.worstRatio).toBeLessThanOrEqual(1);
    expect(outVerdict.overBound).toBe(0);
    expect(outVerdict.worst.at.head).toBeLessThan(4);
    expect(outVerdict.cosineGap).toBeGreaterThan(0);

    const lc = out.layerChunk;
    expect(lc.pass).toBe(true);
    expect(lc.numQueries).toBe(40);
    expect(lc.requests).toHaveLength(4);
    expect(lc.requests[0]!.seqLen).toBe(300 + lc.requests[0]!.extendLen); // mid-sequence, --max-context before it
    expect(lc.requests[1]!.seqLen).toBe(lc.requests[1]!.extendLen); // a fresh prompt
    expect(lc.requests[3]!.seqLen).toBeLessThan(8); // shorter than the window
    expect(lc.requests.reduce((a, q) => a + q.extendLen, 0)).toBe(40);
    expect(lc.requests.some((q) => q.seqLen > q.extendLen)).toBe(true); // some start mid-sequence
    expect(lc.layers.map((l) => l.ratio)).toEqual([0, 4, 128, 4]);
    const defaults = SPARSE_PREFILL_THRESHOLDS[(out as unknown as { backend: 'cpu' | 'wasm' }).backend];
    for (const l of lc.layers) {
      // each layer routed by its ratio's default threshold (SPARSE_PREFILL_THRESHOLDS)
      const t = defaults[l.ratio as 0 | 4 | 128];
      expect(l.path).toBe(40 > t ? 'sparse' : 'paged');
      expect(l.reason).toBe(`40 queries ${40 > t ? '>' : '≤'} threshold ${t} (${(out as unknown as { backend: string }).backend} default)`);
      if (l.path === 'sparse') expect(l.workspaceBytes).toBeGreaterThan(0);
      else expect(l.workspaceBytes).toBe(0);
      expect(l.check.pass).toBe(true);
      expect(l.check.sampledQueries).toHaveLength(5);
      expect(l.check.out.count).toBe(5 * 4 * 512);
      expect((l.check.out as unknown as { worstRatio: number }).worstRatio).toBeLessThanOrEqual(1);
      expect(l.dropped).toBe(l.expectedDropped);
    }
    // the generator plants not-yet-visible entries in the c4 top-k; the planner drops all of them
    expect(lc.layers.filter((l) => l.ratio === 4).every((l) => l.expectedDropped > 0)).toBe(true);
    expect(lc.layers.filter((l) => l.ratio !== 4).every((l) => l.dropped === 0)).toBe(true);
    expect(lc.plan.stats).toMatchObject({ c0Builds: 1, c128Builds: 1, c4Combines: 2 });
    expect(lc.planChecks.every((c) => c.pass && c.got === c.want)).toBe(true);
  });

  test.each(['sparse', 'paged'] as const)('--path %s: every layer takes that path, forced, and passes', (path) => {
    const r = cli(['run', ...TINY, ...TINY_LAYERS, '--section', 'layers', '--path', path, '--json', '--quiet']);
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { pass: boolean; checks?: unknown; layerChunk: LayerChunkJson };
    expect(out.pass).toBe(true);
    expect(out.checks).toBeUndefined(); // the prefill section did not run
    const lc = out.layerChunk;
    for (const l of lc.layers) {
      expect(l.path).toBe(path);
      expect(l.reason).toBe(`forced by option path='${path}'`);
      expect(l.check.pass).toBe(true);
      if (path === 'sparse') expect(l.workspaceBytes).toBeGreaterThan(l.ratio === 4 ? lc.layers[0]!.workspaceBytes : 0);
      else expect(l.workspaceBytes).toBe(0);
    }
    // workspace path: one buffer for every layer; paged path: one main set, c128 extra once + one per c4 layer
    if (path === 'sparse') expect(lc.plan.stats).toMatchObject({ workspaceAllocations: 1, pagedMainBuilds: 0 });
    else expect(lc.plan.stats).toMatchObject({ workspaceAllocations: 0, pagedMainBuilds: 1, pagedExtraBuilds: 3 });
  });

  test('--threshold steers the router: below it paged, above it sparse, with the reason', () => {
    for (const [threshold, path, reason] of [
      [39, 'sparse', '40 queries > threshold 39'],
      [40, 'paged', '40 queries ≤ threshold 40'],
    ] as const) {
      const r = cli(['run', ...TINY, ...TINY_LAYERS, '--section', 'layers', '--threshold', String(threshold), '--json', '--quiet'], { SPARSE_MLA_PREFILL: '' });
      expect(r.code).toBe(0);
      const lc = (JSON.parse(r.stdout) as { layerChunk: LayerChunkJson }).layerChunk;
      expect(lc.layers.map((l) => [l.path, l.reason])).toEqual(lc.layers.map(() => [path, reason]));
    }
  });
});

describe('check', () => {
  test('--json: every attention case carries its worst error/bound ratios and where; families per data regime', () => {
    // the hQ=1 cases: prefill over every (sKV, topk) pair and dQK (the regimes rotate), one paged
    const r = cli(['check', '--backend', 'wasm', '--seed', '11', '--only', 'hQ=1 ', '--json']);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout) as {
      ok: boolean;
      passed: number;
      failed: number;
      cases: { name: string; family: string; pass: boolean; verdict?: Record<'out' | 'lse' | 'maxLogits', { worstRatio: number; overBound: number; worst: { at: { query: number; head: number } } | null; cosineGap?: number }> }[];
      families: { family: string; cases: number; out: number; lse: number; maxLogits: number }[];
    };
    expect(report.ok).toBe(true);
    expect(report.failed).toBe(0);
    expect(report.passed).toBe(report.cases.length);
    const judged = report.cases.filter((c) => c.verdict);
    expect(judged.length).toBe(13);
    for (const c of judged) {
      for (const t of ['out', 'lse', 'maxLogits'] as const) {
        expect(c.verdict![t].worstRatio, `${c.name} ${t}`).toBeLessThanOrEqual(1);
        expect(c.verdict![t].overBound).toBe(0);
      }
    }
    const families = report.families.map((f) => f.family);
    expect(families.sort()).toEqual(['paged unit', 'prefill cancel', 'prefill flashmla', 'prefill unit']);
    expect(r.stderr).toBe('');
  }, 120_000);

  test('the paged case with NaN and large-scale cache bytes passes on wasm for several seeds (its builder throws unless the reference has NaN rows, finite rows and large outputs)', () => {
    for (const seed of [1, 2, 3]) {
      const r = cli(['check', '--backend', 'wasm', '--seed', String(seed), '--only', 'NaN/large-scale', '--json']);
      expect(r.code, r.stdout).toBe(0);
      const report = JSON.parse(r.stdout) as { passed: number; failed: number; cases: { name: string; pass: boolean; verdict?: Record<'out' | 'lse' | 'maxLogits', { worstRatio: number; infNanMismatch: number }> }[] };
      expect(report.cases.map((c) => c.name)).toEqual(['paged unit NaN/large-scale cache bytes main+extra hQ=64 P=64/2 topk=128+64 lengths']);
      expect(report.passed).toBe(1);
      for (const t of ['out', 'lse', 'maxLogits'] as const) {
        expect(report.cases[0]!.verdict![t].worstRatio).toBeLessThanOrEqual(1);
        expect(report.cases[0]!.verdict![t].infNanMismatch).toBe(0);
      }
    }
  }, 60_000);
});

describe('bench', () => {
  test('--json with tiny sizes: machine, command, medians for 1 and 2 workers, speedup', () => {
    const dir = mkdtempSync(join(tmpdir(), 'smla-bench-'));
    try {
      const file = join(dir, 'bench.json');
      const args = ['bench', ...TINY, '--backend', 'wasm', '--repeat', '3', '--warmup', '1', '--dequant-tokens', '256', '--json', '--quiet', '--out', file];
      const r = cli(args);
      expect(r.code).toBe(0);
      const report = JSON.parse(r.stdout) as {
        command: string;
        machine: { cpu: string; cores: number; node: string; date: string; commit: string | null };
        backend: string;
        workers: number[];
        results: { op: string; workers: number; runs_s: number[]; median_s: number; rate: number; unit: string }[];
        speedup: Record<string, number>;
      };
      expect(JSON.parse(readFileSync(file, 'utf8'))).toEqual(report);
      expect(report.command).toBe(['sparse-mla', ...args].join(' '));
      expect(report.machine.cpu).toMatch(/\S/);
      expect(report.machine.node).toBe(process.version);
      expect(Number.isNaN(Date.parse(report.machine.date))).toBe(false);
      expect(report.machine).toHaveProperty('commit');
      expect(report.machine).toHaveProperty('loadAverage1m');
      expect(report.backend).toBe('wasm');
      expect(report.workers).toEqual([1, 2]);
      for (const op of ['sparsePrefill', 'dequantizeKCachePaged', 'quantizeKCache']) {
        for (const workers of [1, 2]) {
          const m = report.results.find((x) => x.op === op && x.workers === workers);
          expect(m, `${op} x${workers}`).toBeDefined();
          expect(m!.runs_s).toHaveLength(3);
          expect(m!.median_s).toBeGreaterThan(0);
          expect(Number.isFinite(m!.rate) && m!.rate > 0).toBe(true);
        }
        expect(report.speedup[op]).toBeGreaterThan(0);
      }
      expect(report.results.find((x) => x.op === 'sparsePrefill')!.unit).toBe('GFLOP/s');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('report layout (src/cli/table.ts)', () => {
  const words = (n: number) => Array.from({ length: n }, (_, i) => `word${i}`).join(' ');

  test('runSpreadNote: a measurement whose runs changed speed says how far apart they lie, a steady one nothing', () => {
    expect(runSpreadNote([5.37, 5.36, 5.37, 6.06, 6.18, 6.19])).toBe('runs 5.360-6.190 ms, 15.5% apart');
    expect(runSpreadNote([3.684, 3.681, 3.691, 3.678])).toBeUndefined();
    expect(runSpreadNote([1.0, 1.0, 1.031])).toBe('runs 1.000-1.031 ms, 3.1% apart');
    expect(runSpreadNote([1.0, 1.0, 1.029])).toBeUndefined();
    expect(runSpreadNote([1.0, 2.0])).toBeUndefined(); // too few runs to call
    expect(runSpreadNote([1.0, 1.0, 1.2], 0.25)).toBeUndefined();
  });

  test('wrapText: lines within the width, words in order, a hanging indent; a path too long for any line stays whole', () => {
    const lines = wrapText(`  label  ${words(60)}`, 40, 9);
    for (const l of lines) expect(l.length).toBeLessThanOrEqual(40);
    expect(lines.slice(1).every((l) => l.startsWith(' '.repeat(9)) && l[9] !== ' ')).toBe(true);
    expect(lines.join(' ').split(/ +/).filter(Boolean)).toEqual(['label', ...words(60).split(' ')]);
    const path = `/${'x'.repeat(80)}/addon.node`;
    expect(wrapText(`  file     ${path}`, 40, 11)).toEqual([`  file     ${path}`]);
    expect(wrapText('short', 40)).toEqual(['short']);
    expect(fitLines([`  file     ${words(30)}`]).every((l, i) => i === 0 || l.startsWith(' '.repeat(11)))).toBe(true);
  });

  test('formatTable: a text column wraps to fit 100 columns; a table that cannot fit becomes one record per row', () => {
    const rows = [['name', 'n', 'what'], ['a', '1', words(40)], ['b', '22', 'short']];
    const t = formatTable(rows, ['left', 'right', 'left']);
    const lines = t.split('\n');
    for (const l of lines) expect(l.length).toBeLessThanOrEqual(100);
    expect(lines[0]).toMatch(/^name\s+n\s+what$/);
    expect(lines.filter((l) => l.startsWith('a '))).toHaveLength(1);
    expect(t.replace(/\s+/g, ' ')).toContain(words(40));
    // 12 numeric columns of 10 characters: 142 wide with nothing to wrap
    const header = Array.from({ length: 12 }, (_, c) => `column ${c}`.padStart(10));
    const wide = [header, header.map((_, c) => String(c * 1e9).padStart(10))];
    const rec = formatTable(wide, header.map(() => 'right' as const));
    expect(rec.split('\n')[0]).toBe(`column 0 0: column 1 1000000000, column 2 2000000000, column 3 3000000000, column 4 4000000000,`);
    for (const l of rec.split('\n')) expect(l.length).toBeLessThanOrEqual(100);
  });
});

describe('args and progress', () => {
  const table = {
    n: { type: 'int', default: 3, min: 1, help: 'count', short: 'n' },
    scale: { type: 'number', help: 'a scale' },
    mode: { type: 'string', default: 'a', choices: ['a', 'b'], help: 'mode' },
    json: { type: 'boolean', help: 'json' },
  } as const;

  test('parseArgs: forms, defaults, positionals, --', () => {
    const r = parseArgs(['x', '--n=5', '--scale', '-0.5', '--json', '--mode', 'b', '--', '--n'], table);
    expect(r.options).toEqual({ n: 5, scale: -0.5, mode: 'b', json: true });
    expect(r.positionals).toEqual(['x', '--n']);
    expect(parseArgs(['-n', '7'], table).options).toEqual({ n: 7, scale: undefined, mode: 'a', json: false });
  });

  test('parseArgs: errors name the flag and what came', () => {
    expect(() => parseArgs(['--n', '0'], table)).toThrow("--n: expected a decimal integer ≥ 1, got '0'");
    expect(() => parseArgs(['--n', '1.5'], table)).toThrow("--n: expected a decimal integer ≥ 1, got '1.5'");
    expect(() => parseArgs(['--n'], table)).toThrow('--n needs a value');
    expect(() => parseArgs(['--mode', 'c'], table)).toThrow("--mode: expected one of a|b, got 'c'");
    expect(() => parseArgs(['--json=1'], table)).toThrow('--json takes no value');
    expect(() => parseArgs(['--scale', 'NaN'], table)).toThrow("--scale: expected a decimal number, got 'NaN'");
    expect(() => parseArgs(['-z'], table)).toThrow("unknown option '-z'");
    expect(formatOptions(table)).toMatch(/--mode a\|b\s+mode \(default a\)/);
  });

  test('Progress: plain lines off a TTY, in-place redraws on one', () => {
    const plain: string[] = [];
    const p = new Progress({ stream: { write: (s: string) => (plain.push(s), true) }, tty: false });
    p.start('work', 100);
    for (let i = 1; i <= 100; i++) p.update(i);
    p.finish('ok');
    expect(plain.join('')).not.toContain('\r');
    expect(plain.length).toBeLessThanOrEqual(12); // one line per tenth, not per update
    expect(plain[0]).toBe('work: 0/100 (0%)\n');
    expect(plain.at(-1)).toMatch(/^work: done, ok \(\d/);

    const tty: string[] = [];
    const t = new Progress({ stream: { write: (s: string) => (tty.push(s), true), columns: 80 }, tty: true });
    t.start('work', 4);
    t.finish();
    expect(tty[0]).toMatch(/^\r\x1b\[2Kwork \[-+\] 0\/4/);
    expect(tty.at(-1)).toMatch(/^\r\x1b\[2Kwork: done/);
  });
});
