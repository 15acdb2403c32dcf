/**
 * A small flag parser for the CLI (no dependency). Each command declares its options once; the
 * same table parses argv, checks values and prints the options part of the usage text.
 * Bad flags throw SparseMlaError('INVALID_VALUE'), which main.ts turns into a message and exit 2.
 */
import { SparseMlaError } from '../errors.js';
import { REPORT_WIDTH, wrapText } from './table.js';

export type OptionSpec =
  | { type: 'boolean'; help: string; short?: string }
  | { type: 'string'; help: string; default?: string; choices?: readonly string[]; metavar?: string; short?: string }
  | { type: 'int'; help: string; default?: number; min?: number; max?: number; metavar?: string; short?: string }
  | { type: 'number'; help: string; default?: number; min?: number; max?: number; metavar?: string; short?: string };

export type OptionTable = Record<string, OptionSpec>;

type ValueOf<S extends OptionSpec> = S extends { type: 'boolean' }
  ? boolean
  : S extends { type: 'string' }
    ? S extends { default: string }
      ? string
      : string | undefined
    : S extends { default: number }
      ? number
      : number | undefined;

export type ParsedOptions<T extends OptionTable> = { [K in keyof T]: ValueOf<T[K]> };

export interface ParseResult<T extends OptionTable> {
  options: ParsedOptions<T>;
  positionals: string[];
}

function bad(message: string, argument = 'argv'): never {
  throw new SparseMlaError('INVALID_VALUE', message, argument);
}

/**
 * The only spellings a number option takes: decimal digits, no leading zero (is 010 ten or eight?),
 * a fraction only for a float ('0.25', not '.25' or '1.'), a '-' only where the option may be
 * negative. Number() would also take '', ' 3 ', '+3', '0x2', '0o7', '0b1', '1e3' and 'Infinity'.
 */
const PLAIN_INTEGER = /^-?(?:0|[1-9][0-9]*)$/;
const PLAIN_FLOAT = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$/;

/** The text a user gave, quoted so that spaces, an empty value and control characters show. */
function quoted(raw: string): string {
  const head = raw.slice(0, 40);
  const more = raw.length > head.length ? '…' : '';
  return /^[\x20-\x7e]*$/.test(head) && !head.includes("'") ? `'${head}${more}'` : JSON.stringify(head + more);
}

type NumberSpec = { type: 'int' | 'number'; min?: number; max?: number };

/** What a number option takes, as its error says it: 'a decimal integer from 1 to 256'. */
export function numberRange(spec: NumberSpec): string {
  const what = spec.type === 'int' ? 'a decimal integer' : 'a decimal number';
  const { min, max } = spec;
  if (min !== undefined && max !== undefined) return `${what} from ${min} to ${max}`;
  if (min !== undefined) return `${what} ≥ ${min}`;
  if (max !== undefined) return `${what} ≤ ${max}`;
  return what;
}

/**
 * The value of number option `--name` from the text given, or INVALID_VALUE naming the option, what
 * it takes and the text: the one place the CLI reads a number from its arguments.
 */
export function parseNumberOption(name: string, spec: NumberSpec, raw: string): number {
  const refuse = (): never => bad(`--${name}: expected ${numberRange(spec)}, got ${quoted(raw)}`, `--${name}`);
  const mayBeNegative = spec.min === undefined || spec.min < 0;
  if (!(spec.type === 'int' ? PLAIN_INTEGER : PLAIN_FLOAT).test(raw)) refuse();
  if (raw.startsWith('-') && !mayBeNegative) refuse();
  // + 0: '-0' is 0
  const value = Number(raw) + 0;
  if (spec.type === 'int' ? !Number.isSafeInteger(value) : !Number.isFinite(value)) refuse();
  if (spec.min !== undefined && value < spec.min) refuse();
  if (spec.max !== undefined && value > spec.max) refuse();
  return value;
}

function convert(name: string, spec: OptionSpec, raw: string): string | number {
  if (spec.type === 'string') {
    if (spec.choices && !spec.choices.includes(raw)) {
      bad(`--${name}: expected one of ${spec.choices.join('|')}, got ${quoted(raw)}`, `--${name}`);
    }
    return raw;
  }
  if (spec.type === 'boolean') bad(`--${name} takes no value`, `--${name}`);
  return parseNumberOption(name, spec, raw);
}

/** Parse `--name value`, `--name=value`, `--flag`, `-x value` and `--` (rest is positional). */
export function parseArgs<T extends OptionTable>(argv: readonly string[], table: T): ParseResult<T> {
  const values: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(table)) {
    values[name] = spec.type === 'boolean' ? false : spec.default;
  }
  const byShort = new Map<string, string>();
  for (const [name, spec] of Object.entries(table)) if (spec.short) byShort.set(spec.short, name);

  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    let name: string | undefined;
    let inline: string | undefined;
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      name = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      inline = eq < 0 ? undefined : arg.slice(eq + 1);
    } else if (arg.length > 1 && arg.startsWith('-') && !/^-\d/.test(arg)) {
      name = byShort.get(arg.slice(1));
      if (name === undefined) bad(`unknown option '${arg}'`);
    } else {
      positionals.push(arg);
      continue;
    }
    const spec = Object.prototype.hasOwnProperty.call(table, name) ? table[name] : undefined;
    if (!spec) bad(`unknown option '--${name}'`);
    if (spec.type === 'boolean') {
      if (inline !== undefined) bad(`--${name} takes no value`);
      values[name] = true;
      continue;
    }
    let raw = inline;
    if (raw === undefined) {
      if (i + 1 >= argv.length) bad(`--${name} needs a value`);
      raw = argv[++i]!;
    }
    values[name] = convert(name, spec, raw);
  }
  return { options: values as ParsedOptions<T>, positionals };
}

/** Refuses positional arguments, for a command that takes none. */
export function expectNoPositionals(command: string, positionals: readonly string[]): void {
  if (positionals.length > 0) bad(`${command}: unexpected argument '${positionals[0]}'`);
}

/** The one positional argument a command takes; `what` names it in the error ('directory', ...). */
export function onePositional(positionals: readonly string[], what: string): string {
  if (positionals.length !== 1) bad(`expected one ${what}, got ${positionals.length ? positionals.join(' ') : 'none'}`);
  return positionals[0]!;
}

/** The options block of a usage text, one line per option with its default. */
export function formatOptions(table: OptionTable): string {
  const rows: [string, string, string][] = [];
  for (const [name, spec] of Object.entries(table)) {
    let left = (spec.short ? `-${spec.short}, ` : '    ') + `--${name}`;
    if (spec.type !== 'boolean') {
      const metavar = spec.type === 'string' && spec.choices ? spec.choices.join('|') : (spec.metavar ?? (spec.type === 'string' ? 'STR' : 'N'));
      left += ` ${metavar}`;
    }
    rows.push([left, spec.help, spec.type !== 'boolean' && spec.default !== undefined ? `(default ${spec.default})` : '']);
  }
  const width = Math.max(0, ...rows.map(([l]) => l.length));
  // Help always fits REPORT_WIDTH: a long description continues under itself, and "(default X)"
  // is never split.
  return rows
    .flatMap(([l, help, dflt]) => {
      const lines = wrapText(`  ${l.padEnd(width)}  ${help}`, REPORT_WIDTH, width + 4);
      if (!dflt) return lines;
      const last = lines.length - 1;
      if (lines[last]!.length + 1 + dflt.length <= REPORT_WIDTH) lines[last] += ` ${dflt}`;
      else lines.push(`${' '.repeat(width + 4)}${dflt}`);
      return lines;
    })
    .join('\n');
}
