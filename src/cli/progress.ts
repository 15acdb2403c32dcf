/**
 * A progress bar on stderr. On a TTY it redraws one line in place; anywhere else (a pipe, a CI
 * log) it degrades to plain lines, one per tenth of the work, so logs stay readable.
 * stdout is left alone, so tables and JSON stay clean.
 */

export interface ProgressStream {
  write(chunk: string): boolean;
  isTTY?: boolean;
  columns?: number;
}

export interface ProgressOptions {
  stream?: ProgressStream;
  /** false: print nothing at all (e.g. --quiet). */
  enabled?: boolean;
  /** Force the TTY or plain mode (tests). Default: stream.isTTY. */
  tty?: boolean;
}

/** Elapsed time and eta on the progress line: `12.3s`, `4m05s`; `?` when not known. */
function formatElapsed(s: number): string {
  if (!Number.isFinite(s)) return '?';
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  return `${m}m${Math.round(s - 60 * m).toString().padStart(2, '0')}s`;
}

export class Progress {
  private readonly stream: ProgressStream;
  private readonly enabled: boolean;
  private readonly tty: boolean;
  private label = '';
  private total = 0;
  private done = 0;
  private startedAt = 0;
  private lastDraw = 0;
  private lastPlainTenth = -1;
  private active = false;

  constructor(options: ProgressOptions = {}) {
    this.stream = options.stream ?? process.stderr;
    this.enabled = options.enabled ?? true;
    this.tty = options.tty ?? Boolean(this.stream.isTTY);
  }

  /** Begin a step of `total` units (total 0: a step with no measurable parts). */
  start(label: string, total: number): void {
    if (this.active) this.finish();
    this.label = label;
    this.total = Math.max(0, total);
    this.done = 0;
    this.startedAt = performance.now();
    this.lastDraw = 0;
    this.lastPlainTenth = -1;
    this.active = true;
    this.render(true);
  }

  /** Set the number of units done so far. */
  update(done: number): void {
    if (!this.active) return;
    this.done = Math.min(done, this.total);
    this.render(false);
  }

  /** Add `n` units done. */
  tick(n = 1): void {
    this.update(this.done + n);
  }

  /** End the step; `note` (e.g. a time) is printed after the label. */
  finish(note?: string): void {
    if (!this.active) return;
    this.active = false;
    if (!this.enabled) return;
    const elapsed = (performance.now() - this.startedAt) / 1000;
    const text = `${this.label}: done${note ? `, ${note}` : ''} (${formatElapsed(elapsed)})`;
    if (this.tty) this.stream.write(`\r\x1b[2K${text}\n`);
    else this.stream.write(`${text}\n`);
  }

  /** A one-off line that does not disturb the bar. */
  log(line: string): void {
    if (!this.enabled) return;
    if (this.tty && this.active) {
      this.stream.write(`\r\x1b[2K${line}\n`);
      this.render(true);
    } else {
      this.stream.write(`${line}\n`);
    }
  }

  private render(force: boolean): void {
    if (!this.enabled) return;
    const now = performance.now();
    const elapsed = (now - this.startedAt) / 1000;
    const fraction = this.total > 0 ? this.done / this.total : 0;
    if (!this.tty) {
      const tenth = Math.floor(fraction * 10);
      if (!force && tenth === this.lastPlainTenth) return;
      if (!force && this.done >= this.total) return; // finish() prints the last line
      this.lastPlainTenth = tenth;
      if (this.total > 0) this.stream.write(`${this.label}: ${this.done}/${this.total} (${Math.round(fraction * 100)}%)\n`);
      else this.stream.write(`${this.label}...\n`);
      return;
    }
    if (!force && now - this.lastDraw < 100) return; // ~10 redraws a second is plenty
    this.lastDraw = now;
    const eta = fraction > 0 ? (elapsed * (1 - fraction)) / fraction : NaN;
    const counts = this.total > 0 ? ` ${this.done}/${this.total} ${String(Math.round(fraction * 100)).padStart(3)}%` : '';
    const times = ` ${formatElapsed(elapsed)}` + (fraction > 0 && fraction < 1 ? ` eta ${formatElapsed(eta)}` : '');
    const columns = this.stream.columns ?? 80;
    const barWidth = Math.max(10, Math.min(40, columns - this.label.length - counts.length - times.length - 6));
    const filled = Math.round(fraction * barWidth);
    const bar = this.total > 0 ? ` [${'#'.repeat(filled)}${'-'.repeat(barWidth - filled)}]` : ' ...';
    this.stream.write(`\r\x1b[2K${this.label}${bar}${counts}${times}`);
  }
}

/** fn's value and the seconds it took: a report's timing of one step. */
export async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const value = await fn();
  return [value, (performance.now() - t0) / 1000];
}
