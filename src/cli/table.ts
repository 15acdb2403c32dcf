/** Plain-text tables, prose wrapping and number formatting for the CLI's reports. */

export type Align = 'left' | 'right';

/** The width reports fit in unless `--wide` is given. */
export const REPORT_WIDTH = 100;

let width = REPORT_WIDTH;

/** The report width of this process: REPORT_WIDTH, or Infinity for `--wide`. */
export function setReportWidth(columns: number): void {
  width = columns;
}

/**
 * `text` broken at spaces into lines of at most `columns` (spacing inside a line is kept); later
 * lines start with `indent` spaces. A word too long for any line (a path) stays whole on the line
 * it starts, past the width, so it can still be copied; with `cut` it is cut instead (table cells).
 */
export function wrapText(text: string, columns = width, indent = 0, cut = false): string[] {
  if (text.length <= columns) return [text];
  const lead = /^ */.exec(text)![0];
  const tokens = text.slice(lead.length).split(/( +)/); // words at even positions, gaps at odd
  const pad = ' '.repeat(Math.min(indent, Math.max(0, columns - 1)));
  const lines: string[] = [];
  let line = lead;
  let fresh = true; // nothing but indentation on the line yet
  for (let i = 0; i < tokens.length; i += 2) {
    let word = tokens[i]!;
    const gap = i > 0 ? tokens[i - 1]! : '';
    if (word === '') continue;
    if (!fresh && (line.length + gap.length + word.length <= columns || (!cut && pad.length + word.length > columns))) {
      line += gap + word;
      continue;
    }
    if (!fresh) {
      lines.push(line);
      line = pad;
    }
    while (cut && line.length + word.length > columns) {
      const cut = Math.max(1, columns - line.length);
      lines.push(line + word.slice(0, cut));
      line = pad;
      word = word.slice(cut);
    }
    line += word;
    fresh = word === '';
  }
  if (!fresh) lines.push(line);
  return lines;
}

/**
 * Prose lines fitted to the report width. A wrapped line continues under its value column when
 * it is a "label  value" line (two or more spaces after the first word), else two spaces in.
 */
export function fitLines(lines: readonly string[]): string[] {
  return lines.flatMap((l) => {
    const label = /^( *\S+(?: \S+)? {2,})\S/.exec(l);
    const indent = label ? label[1]!.length : /^ */.exec(l)![0].length + 2;
    return wrapText(l, width, indent);
  });
}

/** Writes a report's lines to stdout, each (and each of its embedded lines) wrapped by fitLines. */
export function writeFittedLines(lines: readonly string[]): void {
  process.stdout.write(`${fitLines(lines.flatMap((l) => l.split('\n'))).join('\n')}\n`);
}

export interface TableOptions {
  /** columns whose cells may wrap onto several lines (default: the left-aligned ones after the first) */
  wrap?: readonly number[];
}

/**
 * Columns padded to their widest cell; the first row is the header, underlined. Fitted to the
 * report width: text columns wrap, and a table that cannot fit even so is printed as one
 * wrapped "header value" record per row.
 */
export function formatTable(rows: readonly (readonly string[])[], align: readonly Align[] = [], options: TableOptions = {}): string {
  if (rows.length === 0) return '';
  const columns = Math.max(...rows.map((r) => r.length));
  const cell = (r: readonly string[], c: number): string => r[c] ?? '';
  const widths: number[] = [];
  for (let c = 0; c < columns; c++) widths.push(Math.max(...rows.map((r) => cell(r, c).length)));
  const total = (): number => widths.reduce((a, b) => a + b, 0) + 2 * (columns - 1);
  const wrappable = options.wrap ?? widths.map((_, c) => c).filter((c) => c > 0 && (align[c] ?? 'left') === 'left');
  const minWidth = new Map(
    wrappable.map((c) => [c, Math.max(8, ...rows.map((r) => Math.min(20, Math.max(...cell(r, c).split(' ').map((w) => w.length)))))]),
  );
  while (total() > width) {
    let pick = -1;
    for (const c of wrappable) if (widths[c]! > minWidth.get(c)! && (pick < 0 || widths[c]! > widths[pick]!)) pick = c;
    if (pick < 0) return formatRecords(rows);
    widths[pick]!--;
  }
  const line = (r: readonly string[]): string[] => {
    const cells = widths.map((w, c) => (wrappable.includes(c) ? wrapText(cell(r, c), w, 0, true) : [cell(r, c)]));
    const height = Math.max(...cells.map((x) => x.length));
    const out: string[] = [];
    for (let k = 0; k < height; k++) {
      out.push(
        widths
          .map((w, c) => {
            const text = cells[c]![k] ?? '';
            return (align[c] ?? 'left') === 'right' ? text.padStart(w) : text.padEnd(w);
          })
          .join('  ')
          .trimEnd(),
      );
    }
    return out;
  };
  const [header, ...body] = rows;
  return [...line(header!), widths.map((w) => '-'.repeat(w)).join('  '), ...body.flatMap(line)].join('\n');
}

/** A table too wide for the report width, as one wrapped record per row. */
function formatRecords(rows: readonly (readonly string[])[]): string {
  const [header, ...body] = rows;
  return body
    .map((r) => {
      const [first, ...rest] = r.map((v, c) => `${(header![c] ?? '').trim()} ${v.trim()}`.trim());
      return wrapText(`${first}: ${rest.join(', ')}`, width, 4).join('\n');
    })
    .join('\n');
}

export function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '-';
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(1)} ms`;
  return `${s.toFixed(2)} s`;
}

export { formatBytes } from '../tensor.js';

export function formatRate(value: number, unit: string): string {
  if (!Number.isFinite(value)) return '-';
  return `${value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2)} ${unit}`;
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/**
 * "runs LO-HI ms, P% apart" when a measurement's slowest run is more than `limit` (a fraction) above
 * its fastest, else undefined: a row whose runs changed speed mid-measurement (a GPU's power cap
 * stepping its clock down, docs/perf-history.md) says so beside its median.
 */
export function runSpreadNote(runsMs: readonly number[], limit = 0.03): string | undefined {
  if (runsMs.length < 3) return undefined;
  const lo = Math.min(...runsMs), hi = Math.max(...runsMs);
  return hi > lo * (1 + limit) ? `runs ${lo.toFixed(3)}-${hi.toFixed(3)} ms, ${((hi / lo - 1) * 100).toFixed(1)}% apart` : undefined;
}
