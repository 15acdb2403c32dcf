/**
 * The CLI's number options, every one of every command, read strictly (src/cli/args.ts
 * parseNumberOption): an integer option takes decimal digits only (a '-' only where its range goes
 * below 0, no leading zero), within the range its table gives; anything else (hex, octal, binary,
 * an exponent, spaces, '', '+', NaN, Infinity, 2^53 + 1, a fraction, '1_000', other scripts'
 * digits) is INVALID_VALUE naming the option and the text, before the command does anything else.
 * Number() took most of those: `--sample 0x2` was 2, `--workers ' 1 '` 1, `--seed 1e3` 1000.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseArgs, type OptionSpec, type OptionTable } from '../dist/cli/args.js';
import type { CliCommand } from '../dist/cli/command.js';
import { parseLayers } from '../dist/cli/layers.js';
import { SparseMlaError } from '../dist/index.js';
import { writePrefillDir } from '../dist/io/index.js';
import { randomPrefillArgs, testRng } from './helpers/random.js';

const rng = testRng('cli_numbers');
const COMMANDS_DIR = fileURLToPath(new URL('../dist/cli/commands/', import.meta.url));
const MAIN = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));

type NumberSpec = Extract<OptionSpec, { type: 'int' | 'number' }>;

/** Every command the CLI ships (each file of dist/cli/commands), loaded as main.ts loads them. */
async function loadCommands(): Promise<CliCommand[]> {
  const files = readdirSync(COMMANDS_DIR).filter((f) => f.endsWith('.js'));
  const out: CliCommand[] = [];
  for (const f of files) out.push(((await import(join(COMMANDS_DIR, f))) as { command: CliCommand }).command);
  return out;
}

function numberOptions(table: OptionTable): [string, NumberSpec][] {
  return Object.entries(table).filter((e): e is [string, NumberSpec] => e[1].type === 'int' || e[1].type === 'number');
}

/** How an error quotes the text given: '…' when it is printable ASCII without a quote, else as JSON; 40 characters at most. */
function quotedAsGiven(raw: string): string {
  const head = raw.slice(0, 40);
  const more = raw.length > 40 ? '…' : '';
  return /^[ -~]*$/.test(head) && !head.includes("'") ? `'${head}${more}'` : JSON.stringify(head + more);
}

/** A value inside the option's range (2 where it can be), to spell in hostile ways. */
function inRange(spec: NumberSpec): number {
  return Math.min(Math.max(2, spec.min ?? 2), spec.max ?? 2 ** 31);
}

/** Spellings Number() reads as a number (most of them as `v`) that an option must refuse. */
function hostileSpellings(spec: NumberSpec): string[] {
  const v = inRange(spec);
  const s = String(v);
  const list = [
    `0x${v.toString(16)}`, `0X${v.toString(16)}`, `0o${v.toString(8)}`, `0O${v.toString(8)}`, `0b${v.toString(2)}`, `0B${v.toString(2)}`,
    `0${s}`, `00${s}`,
    `${s}e0`, `${s}E0`, `${v / 10}e1`, `${s}e+0`, '1e3', '1e-3',
    ` ${s}`, `${s} `, ` ${s} `, `\t${s}`, `${s}\n`, `\u00a0${s}`, '', ' ',
    `+${s}`, `++${s}`, `--${s}`, `${s}-`, '-',
    'NaN', 'nan', 'Infinity', '-Infinity', '+Infinity', 'infinity', 'inf',
    '9007199254740993', '9007199254740992', `1${'0'.repeat(400)}`,
    `${s}_0`, '1_000', '1,000', `${s}.`, '.5',
    '\uff12', '\u0662', `${s}n`, `0x`, 'two', `${s}abc`,
  ];
  if (spec.type === 'int') list.push(`${s}.0`, `${s}.5`, '0.5', `${s}.00000000000000001`);
  if (spec.min !== undefined && spec.min >= 0) list.push(`-${s}`, '-0', '-1');
  if (spec.min !== undefined && spec.min > 0) list.push(String(spec.min - 1));
  if (spec.max !== undefined) list.push(String(spec.max + 1), String(spec.max * 10));
  return list;
}

/** What a command needs besides the option so that, had the value been taken, it fails at once on its next check (never starts work). */
const TRIPWIRE: Record<string, string[]> = {
  // no --out: refused right after the options
  prefill: ['/nonexistent/smla-cli-numbers'],
  // a folder that is not there: refused at the first read
  verify: ['/nonexistent/smla-cli-numbers'],
  // a positional these take none of
  run: ['unexpected-positional'],
  bench: ['unexpected-positional'],
  check: ['unexpected-positional'],
  info: ['unexpected-positional'],
};

let commands: CliCommand[];
beforeAll(async () => {
  commands = await loadCommands();
});

describe('every number option of every command', () => {
  test('the commands and their number options are found', () => {
    const found = commands.flatMap((c) => numberOptions(c.options).map(([name]) => `${c.name} --${name}`)).sort();
    // the ones there are now; a new one is covered by the tests below without being named here
    for (const known of [
      'bench --dequant-tokens', 'bench --queries', 'bench --repeat', 'bench --warmup', 'bench --workers', 'bench --seed',
      'check --device', 'check --seed',
      'prefill --workers',
      'run --block', 'run --check', 'run --chunk-tokens', 'run --context', 'run --heads', 'run --layer-check', 'run --max-context',
      'run --page-size', 'run --queries', 'run --requests', 'run --seed', 'run --threshold', 'run --topk', 'run --window', 'run --workers',
      'verify --sample', 'verify --workers',
    ]) {
      expect(found).toContain(known);
    }
    expect(commands.map((c) => c.name).sort()).toEqual(Object.keys(TRIPWIRE).sort());
  });

  test('hostile spellings are INVALID_VALUE naming the option and the text, before anything else', async () => {
    let cases = 0;
    for (const c of commands) {
      for (const [name, spec] of numberOptions(c.options)) {
        for (const raw of hostileSpellings(spec)) {
          for (const argv of [[`--${name}`, raw], [`--${name}=${raw}`], ...(spec.short ? [[`-${spec.short}`, raw]] : [])]) {
            const label = `${c.name} ${JSON.stringify(argv)}`;
            let caught: unknown = null;
            try {
              await c.run([...argv, ...TRIPWIRE[c.name]!]);
            } catch (e) {
              caught = e;
            }
            expect(caught, label).toBeInstanceOf(SparseMlaError);
            const err = caught as SparseMlaError;
            expect({ code: err.code, argument: err.argument }, `${label}: ${err.message}`).toEqual({ code: 'INVALID_VALUE', argument: `--${name}` });
            expect(err.message, label).toMatch(new RegExp(`^--${name}: expected a decimal (integer|number)`));
            expect(err.message.endsWith(`, got ${quotedAsGiven(raw)}`), `${label}: ${err.message}`).toBe(true);
            cases++;
          }
        }
      }
    }
    expect(cases).toBeGreaterThan(1000);
  });

  test('the range ends and random values inside, in plain decimal, are taken as they read', () => {
    for (const c of commands) {
      for (const [name, spec] of numberOptions(c.options)) {
        const lo = spec.min ?? -(2 ** 31), hi = spec.max ?? Number.MAX_SAFE_INTEGER;
        const values = [lo, hi, ...Array.from({ length: 8 }, () => lo + Math.floor(rng.uniform() * Math.min(hi - lo + 1, 2 ** 40)))];
        for (const v of values) {
          const got = parseArgs([`--${name}`, String(v)], c.options).options as Record<string, unknown>;
          expect(got[name], `${c.name} --${name} ${v}`).toBe(v);
        }
      }
    }
  });
});

describe('the parser on its own (int and float options, negative ranges)', () => {
  const table = {
    count: { type: 'int', min: 1, max: 100, help: 'count' },
    offset: { type: 'int', min: -5, max: 5, help: 'offset' },
    any: { type: 'int', help: 'any integer' },
    scale: { type: 'number', min: 0, max: 1, help: 'a scale' },
    shift: { type: 'number', help: 'a shift' },
  } as const satisfies OptionTable;

  const refused = (argv: string[], name: string, expected: string, raw: string): void => {
    let caught: unknown = null;
    try {
      parseArgs(argv, table);
    } catch (e) {
      caught = e;
    }
    expect(caught, JSON.stringify(argv)).toBeInstanceOf(SparseMlaError);
    expect((caught as SparseMlaError).code).toBe('INVALID_VALUE');
    expect((caught as SparseMlaError).message).toBe(`--${name}: expected ${expected}, got ${quotedAsGiven(raw)}`);
  };

  test('plain spellings read as the numbers they name', () => {
    expect(parseArgs(['--count', '100', '--offset', '-5', '--any', '-9007199254740991', '--scale', '0.25', '--shift', '-12.5'], table).options).toEqual({
      count: 100, offset: -5, any: -9007199254740991, scale: 0.25, shift: -12.5,
    });
    // '-0' where negatives are allowed is 0, not -0
    expect(Object.is(parseArgs(['--offset', '-0'], table).options.offset, 0)).toBe(true);
    expect(Object.is(parseArgs(['--shift', '-0.0'], table).options.shift, 0)).toBe(true);
    for (let i = 0; i < 50; i++) {
      const x = Math.round((rng.uniform() * 2 - 1) * 1e6) / 1e3;
      expect(parseArgs(['--shift', String(x)], table).options.shift).toBe(x);
      const k = Math.floor((rng.uniform() * 2 - 1) * 2 ** 52);
      expect(parseArgs([`--any=${k}`], table).options.any).toBe(k);
    }
  });

  test('hostile spellings, and values outside the range, are refused with the range and the text', () => {
    for (const raw of ['0x2', '0o2', '0b10', '02', '2e0', ' 2', '2 ', '', '+2', 'NaN', 'Infinity', '2.0', '2.5', '1_0', '-2', '-0', '0', '101']) {
      refused(['--count', raw], 'count', 'a decimal integer from 1 to 100', raw);
    }
    for (const raw of ['-6', '6', '--1', '-', '-01', '- 1', '-0x1', '-1e0']) refused(['--offset', raw], 'offset', 'a decimal integer from -5 to 5', raw);
    for (const raw of ['9007199254740992', '-9007199254740992', '9007199254740993', '1.5', '1e3', ' 1']) refused(['--any', raw], 'any', 'a decimal integer', raw);
    for (const raw of ['1e-1', '.5', '0.', '00.5', '0x0.1', '+0.5', ' 0.5', '0.5 ', 'NaN', 'Infinity', '-0.5', '-0', '1.0000001', '0,5', '0_5', '']) {
      refused(['--scale', raw], 'scale', 'a decimal number from 0 to 1', raw);
    }
    for (const raw of [`1${'0'.repeat(400)}`, `-1${'0'.repeat(400)}`, '-Infinity', '1.5e3', '1.5.5']) refused(['--shift', raw], 'shift', 'a decimal number', raw);
  });

  test('a control character or a quote in the text is shown escaped, a long text clipped', () => {
    refused(['--count', '1\n2'], 'count', 'a decimal integer from 1 to 100', '1\n2');
    expect(() => parseArgs(['--count', "1'"], table)).toThrow(`--count: expected a decimal integer from 1 to 100, got "1'"`);
    expect(() => parseArgs(['--count', '\u001b[31m'], table)).toThrow('got "\\u001b[31m"');
    expect(() => parseArgs(['--count', '7'.repeat(100)], table)).toThrow(`got '${'7'.repeat(40)}…'`);
  });
});

describe('--layers (run): the ratios spelled exactly', () => {
  test('plain lists are taken', () => {
    expect(parseLayers('0,4,128,4')).toEqual([0, 4, 128, 4]);
    expect(parseLayers('128')).toEqual([128]);
  });

  test('spaces, leading zeros, hex, exponents, fractions and empty items are refused naming --layers', () => {
    for (const text of ['0, 4', ' 4', '4 ', '04', '0x4', '4e0', '4.0', '+4', '4,', ',4', '', '0,,4', '1_28', '\uff14']) {
      let caught: unknown = null;
      try {
        parseLayers(text);
      } catch (e) {
        caught = e;
      }
      expect(caught, JSON.stringify(text)).toBeInstanceOf(SparseMlaError);
      expect({ code: (caught as SparseMlaError).code, argument: (caught as SparseMlaError).argument }).toEqual({ code: 'INVALID_VALUE', argument: '--layers' });
      expect((caught as SparseMlaError).message).toMatch(/^--layers: expected a comma-separated list of compress ratios 0, 4, 128/);
    }
  });
});

describe('as a user runs it', () => {
  let root: string;
  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'smla-cli-numbers-'));
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  const cli = (args: string[]) => spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', env: { ...process.env, SPARSE_MLA_BACKEND: 'wasm' }, timeout: 60_000 });

  test('verify --sample 0x2 on a valid folder: exit 2, the option and the text named, as JSON too', async () => {
    const d = join(root, 'dir');
    await writePrefillDir(d, { ...randomPrefillArgs(rng, { sQ: 3, hQ: 2, dQK: 512, sKV: 32, topk: 8 }), dV: 512 });
    const r = cli(['verify', d, '--sample', '0x2', '--json', '-q']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("--sample: expected a decimal integer ≥ 1, got '0x2' [INVALID_VALUE]");
    const json = JSON.parse(r.stdout) as { ok: boolean; error: { code: string; argument: string } };
    expect(json).toMatchObject({ ok: false, exitCode: 2, error: { code: 'INVALID_VALUE', argument: '--sample' } });
  });

  test("prefill --workers ' 1 ' and run --seed 1e3: exit 2 before any work", () => {
    const out = join(root, 'never-made');
    const p = cli(['prefill', join(root, 'dir'), '--out', out, '--workers', ' 1 ']);
    expect(p.status).toBe(2);
    expect(p.stderr).toContain(`--workers: expected a decimal integer from 1 to 256, got ' 1 '`);
    expect(p.stderr).not.toMatch(/load inputs|start engine/);
    expect(readdirSync(root)).not.toContain('never-made');
    // (the positional only makes the run before this fix end at once, not after the whole run)
    const r = cli(['run', '--seed', '1e3', 'extra']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`--seed: expected a decimal integer from 0 to 4294967295, got '1e3'`);
    expect(r.stderr).not.toMatch(/starting engine/);
  });
});
