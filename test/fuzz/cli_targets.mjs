/**
 * cliCommand (session 56, from seed CLI_FROM_SEED): the `sparse-mla prefill` and `sparse-mla verify`
 * commands, run in this process through runCliCommand (what main.ts runs once it has found the command
 * and no --help), with the case's folder as working directory and their stdout and stderr taken.
 *
 * The folder `in` holds a valid prefill (sparsePrefill's builder, written by writePrefillDir as npy or
 * safetensors); verify's folder also holds outputs: the float64 reference rounded (out as bf16 or
 * float32, beside the inputs or in a file of the other format), sometimes with one value of row 0
 * spoiled (NaN where the reference is a number, a number where it is NaN, lse or max_logits off by more
 * than their bound), which verify must FAIL (exit 1) whatever --sample says (row 0 is always judged).
 * Then, as hostileDir does (dir_targets.mjs changesOf), a file or the folder may be changed; prefill's
 * --out may be the input folder, a fresh or nested one, a folder holding an older dump, or hostile (a
 * file, a FIFO, below a file, an output name taken by a directory, a FIFO or a symlink outside, the
 * folder a symlink to one outside); the argv may be malformed (an unknown option, a value out of range,
 * a missing --out, an empty path, ...) or odd but valid (`--sample=2`, `--` before the folder).
 *
 * Judged: the exit code (0 ok, 1 verify's FAIL only, 2 bad input), never an internal error (a stack
 * on stderr: thrown as an untyped error, so the case is `untyped`); with --json one JSON object on
 * stdout agreeing with the code; a refusal's message on stderr; prefill's outputs read back against
 * the float64 reference; verify's PASS / FAIL; nothing written outside the output folder (the input
 * folder, the folder outside, the case's folder), no output file written by a refused prefill; no
 * handle left open on the case's folder and no thread left running once the command returned.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tensor } from '../../dist/index.js';
import { makeRng } from '../../dist/check/grid.js';
import * as R from '../../dist/reference/index.js';
import { withDotScales } from './regime.mjs';
import { runCliCommand } from '../../dist/cli/command.js';
import { command as prefillCommand } from '../../dist/cli/commands/prefill.js';
import { command as verifyCommand } from '../../dist/cli/commands/verify.js';
import { REPORT_WIDTH, setReportWidth } from '../../dist/cli/table.js';
import { readNpyFile, readSafetensorsFile, writePrefillDir, writePrefillOutputs } from '../../dist/io/index.js';
import { caseScratch } from './side_targets.mjs';
import { fieldsByMemory, judgeAttention, sparsePrefillTarget } from './targets.mjs';
import { FOLDER_CHANGES, SPECIAL_OUTPUTS, SPECIAL_OUTPUT_FROM_SEED, changesOf, folderState, handlesUnder, stateDiff } from './dir_targets.mjs';

/** The first seed that draws cliCommand (seeds 157-159 were run before it). */
export const CLI_FROM_SEED = 160;

/** The first seed whose verify cases may hold two runs' outputs, one in each format. */
const TWICE_FROM_SEED = 185;

/** This process's threads (/proc/self/status; 0 where there is none). */
function threadCount() {
  try {
    return Number(/^Threads:\s+(\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))[1]);
  } catch {
    return 0;
  }
}

/** The command's exit code, stdout and stderr: run in `cwd`, process.stdout / stderr's write taken meanwhile. */
async function runCli(cwd, name, argv) {
  const cmd = name === 'prefill' ? prefillCommand : verifyCommand;
  const taken = { stdout: '', stderr: '' };
  const writes = [process.stdout, process.stderr].map((s) => [s, s.write]);
  const take = (key) =>
    function (chunk, enc, cb) {
      taken[key] += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
      const done = typeof enc === 'function' ? enc : cb;
      if (typeof done === 'function') queueMicrotask(done);
      return true;
    };
  process.stdout.write = take('stdout');
  process.stderr.write = take('stderr');
  const back = process.cwd();
  process.chdir(cwd);
  try {
    taken.code = await runCliCommand(name, cmd, argv);
  } finally {
    process.chdir(back);
    for (const [s, w] of writes) s.write = w;
    setReportWidth(REPORT_WIDTH); // verify --wide sets the module's width for the process
  }
  return taken;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The reference's result as a prefill's outputs (out bf16 or float32, lse and max_logits float32). */
function referenceOutputs(ref, sQ, hQ, dV, outDtype) {
  const out = outDtype === 'bf16' ? tensor('bf16', [sQ, hQ, dV], Uint16Array.from(ref.out, (x) => R.encodeBf16(x))) : tensor('float32', [sQ, hQ, dV], Float32Array.from(ref.out));
  return { out, lse: tensor('float32', [sQ, hQ], Float32Array.from(ref.lse)), maxLogits: tensor('float32', [sQ, hQ], Float32Array.from(ref.maxLogits)) };
}

/** One value of row 0 spoiled past its bound (verify must FAIL): [what, apply(outputs)]. */
function spoil(rng, outputs) {
  const field = rng.pick(['out', 'lse', 'maxLogits']);
  const t = outputs[field];
  const read = field === 'out' && t.dtype === 'bf16' ? R.decodeBf16(t.data[0]) : t.data[0];
  const write = (v) => (t.data[0] = field === 'out' && t.dtype === 'bf16' ? R.encodeBf16(v) : v);
  if (Number.isNaN(read)) return write(0), `${field}[0] 0 where the reference is NaN`;
  if (field !== 'out' && Number.isFinite(read) && rng.uniform() < 0.5) {
    const other = field === 'lse' ? outputs.maxLogits.data[0] : outputs.lse.data[0];
    const by = 1 + Math.abs(read) + (Number.isFinite(other) ? Math.abs(other) : 0);
    return write(read + by), `${field}[0] off by ${by}`;
  }
  return write(NaN), `${field}[0] NaN where the reference is ${read}`;
}

/** argv changes: [label, class, edit(argv, ctx) → argv]; `refuse` must exit 2 before any work, `same` is a valid spelling, `free` unjudged. */
const ARGV_CHANGES = {
  both: [
    ['an unknown option', 'refuse', (a) => [...a, '--bogus']],
    ['an unknown short option', 'refuse', (a) => ['-z', ...a]],
    ['a flag given a value', 'refuse', (a) => [...a, '--json=1']],
    ['a second positional', 'refuse', (a) => [...a, 'extra']],
    ['no positional', 'refuse', (a, c) => a.filter((x, i) => !(x === c.input && a[i - 1] !== '--out'))],
    ['--workers 0', 'refuse', (a) => [...a.filter((x, i) => x !== '--workers' && a[i - 1] !== '--workers'), '--workers', '0']],
    ['--workers 300', 'refuse', (a) => [...a.filter((x, i) => x !== '--workers' && a[i - 1] !== '--workers'), '--workers', '300']],
    ['--workers two', 'refuse', (a) => [...a.filter((x, i) => x !== '--workers' && a[i - 1] !== '--workers'), '--workers', 'two']],
    ['an option missing its value', 'refuse', (a) => [...a, '--workers']],
    ['the folder after --', 'same', (a, c) => [...a.filter((x, i) => !(x === c.input && a[i - 1] !== '--out')), '--', c.input]],
    // (a valid spelling until 89129d7, which reads number options strictly: decimal digits only)
    ['--workers padded', 'refuse', (a) => [...a.filter((x, i) => x !== '--workers' && a[i - 1] !== '--workers'), '--workers', ' 1 ']],
    ['an empty folder path', 'refuse', (a, c) => a.map((x, i) => (x === c.input && a[i - 1] !== '--out' ? '' : x))],
  ],
  prefill: [
    ['no --out', 'refuse', (a) => a.filter((x, i) => x !== '--out' && a[i - 1] !== '--out')],
    ['--out empty', 'refuse', (a) => a.map((x, i) => (a[i - 1] === '--out' ? '' : x))],
    ['--format NPY', 'refuse', (a) => [...a.filter((x, i) => x !== '--format' && a[i - 1] !== '--format'), '--format', 'NPY']],
    ['--backend gpu', 'refuse', (a) => [...a.filter((x, i) => x !== '--backend' && a[i - 1] !== '--backend'), '--backend', 'gpu']],
    ['--out=DIR', 'same', (a) => {
      const i = a.indexOf('--out');
      return [...a.slice(0, i), `--out=${a[i + 1]}`, ...a.slice(i + 2)];
    }],
  ],
  verify: [
    ['--sample 0', 'refuse', (a) => [...a, '--sample', '0']],
    ['--sample -2', 'refuse', (a) => [...a, '--sample', '-2']],
    ['--sample 1.5', 'refuse', (a) => [...a, '--sample', '1.5']],
    ['--sample empty', 'refuse', (a) => [...a, '--sample', '']],
    ['--sample=2', 'same', (a) => [...a, '--sample=2']],
    // (unjudged until 89129d7: Number() took it as 2)
    ['--sample 0x2', 'refuse', (a) => [...a, '--sample', '0x2']],
  ],
};

/** prefill's --out: [label, class, relative path, prepare(scratch, written names)]. */
function outChoices(rng, format, seed) {
  const entry = (label, cls, make) => [label, cls, 'out', (s, names) => {
    mkdirSync(join(s, 'out'));
    make(join(s, 'out', rng.pick(names)));
  }];
  return [
    ['the input folder', 'same', 'in', () => {}],
    ['a fresh folder', 'same', 'out', () => {}],
    ['a fresh nested folder', 'same', 'out/a/b', () => {}],
    // its out.npy and lse.npy hold tensors outputs.safetensors would hold too: refused since 93b65ad (its
    // outputs.safetensors is no readable file, which a write of .npy files leaves to the reader)
    ['a folder holding an older dump', format === 'safetensors' ? 'refuse' : 'same', 'out', (s) => {
      mkdirSync(join(s, 'out'));
      for (const n of ['out.npy', 'lse.npy', 'outputs.safetensors', 'q.npy']) writeFileSync(join(s, 'out', n), 'older');
    }],
    ['a file', 'refuse', 'out', (s) => writeFileSync(join(s, 'out'), 'a file')],
    ['a FIFO', 'refuse', 'out', (s) => execFileSync('mkfifo', [join(s, 'out')])],
    ['below a file', 'refuse', 'outside/file/x', () => {}],
    entry('an output name a directory', 'refuse', (p) => mkdirSync(p)),
    entry('an output name a directory holding a file', 'refuse', (p) => (mkdirSync(p), writeFileSync(join(p, 'x'), 'x'))),
    entry('an output name a FIFO', 'same', (p) => execFileSync('mkfifo', [p])),
    entry('an output name a symlink to a file outside', 'same', (p) => symlinkSync('../outside/file', p)),
    entry('an output name a dangling symlink', 'same', (p) => symlinkSync('../outside/gone', p)),
    ['a symlink to a folder outside', 'same', 'out', (s) => symlinkSync('outside/sub', join(s, 'out'))],
    // from SPECIAL_OUTPUT_FROM_SEED: an output name a socket or a device node, refused since session 59 (the rename unlinked it)
    ...(seed >= SPECIAL_OUTPUT_FROM_SEED ? SPECIAL_OUTPUTS.map(([label, cls, make]) => entry(`an output name ${label.slice(2)}`, cls, make)) : []),
  ];
}

let lastCliSeed = 0;

const cliCommand = {
  name: 'cliCommand',
  fromSeed: CLI_FROM_SEED,
  build(rng, env, hooks) {
    // the case's seed (a rebuild for the judge has fresh hooks: it takes the last case's, as hostileDirWrite does)
    const seed = hooks.rng ? hooks.seed : lastCliSeed;
    if (hooks.rng) lastCliSeed = hooks.seed;
    const scratch = caseScratch(hooks);
    const inDir = join(scratch, 'in');
    const outside = join(scratch, 'outside');
    const op = rng.pick(['prefill', 'verify']);
    const [a] = sparsePrefillTarget.build(rng, env, hooks).args;
    const [sQ, hQ] = a.q.shape;
    const dV = a.dV ?? 512;
    const inFormat = rng.pick(['npy', 'safetensors']);
    // (the stub's cuda engine computes nothing: prefill runs its own host engine)
    const backend = env.backend === 'cpu' ? 'cpu' : 'wasm';
    const refArgs = () => fieldsByMemory(a, ['q', 'kv', 'indices', 'topkLength', 'attnSink']);
    const reference = () => R.sparsePrefillReference(refArgs());

    // verify: the reference's outputs, beside the inputs or in a file of their own, maybe one value spoiled
    const outDtype = rng.pick(['bf16', 'float32']);
    const outputsAt = rng.pick(['withInputs', 'npy', 'safetensors']);
    const spoiling = op === 'verify' && sQ > 0 && rng.uniform() < 0.3;
    let spoiled = null;
    const spoilRng = rng.u32();

    // prefill: its --out and format
    const format = rng.pick([undefined, 'npy', 'safetensors']);
    const writes = format === 'safetensors' ? ['outputs.safetensors'] : ['out.npy', 'lse.npy', 'max_logits.npy'];
    const [outLabel, outCls, outRel, makeOut] = op === 'prefill' ? rng.pick(outChoices(rng, format, seed)) : ['', 'same', '', () => {}];

    // the input folder's files and what a change to each does (hostileDir's changes)
    const inputNames = ['q', 'kv', 'indices', ...(a.topkLength ? ['topk_length'] : []), ...(a.attnSink ? ['attn_sink'] : [])];
    const files = inFormat === 'npy' ? [...inputNames.map((n) => `${n}.npy`), 'meta.json'] : ['prefill.safetensors'];
    if (op === 'verify') {
      if (outputsAt === 'npy' || (outputsAt === 'withInputs' && inFormat === 'npy')) files.push('out.npy', 'lse.npy', 'max_logits.npy');
      else if (outputsAt === 'safetensors') files.push('outputs.safetensors');
    }
    const plan = [];
    if (rng.uniform() < 0.4) {
      for (let n = rng.int(1, 3); n > 0; n--) {
        if (rng.uniform() < 0.15) {
          const [label, cls, apply] = rng.pick(FOLDER_CHANGES);
          if (!plan.some((c) => c.label === `the folder: ${label}`)) plan.push({ label: `the folder: ${label}`, cls: cls('loadPrefillInputs', inFormat), apply: () => void apply(inDir) });
          continue;
        }
        const file = rng.pick(files);
        if (plan.some((c) => c.file === file)) continue;
        const kind = file === 'meta.json' ? 'meta' : file.endsWith('.npy') ? 'npy' : 'st';
        const [label, x, y] = rng.pick(changesOf(kind, 'loadPrefillInputs'));
        plan.push({ label: `${file}: ${label}`, file, cls: y ? x : null, apply: (path) => (y ?? x)(path, rng) });
      }
    }

    // the argv
    const input = 'in';
    let argv = op === 'prefill' ? [input, '--out', outRel, '--backend', backend] : [input];
    if (op === 'prefill' && format) argv.push('--format', format);
    if (backend === 'wasm' || op === 'verify' || rng.uniform() < 0.3) if (rng.uniform() < 0.7) argv.push('--workers', String(rng.pick([1, 1, 2])));
    if (op === 'verify' && rng.uniform() < 0.3) argv.push('--sample', String(rng.pick([1, 2, 3, 1000])));
    if (op === 'verify' && rng.uniform() < 0.2) argv.push('--wide');
    const json = rng.uniform() < 0.4;
    if (json) argv.push('--json');
    if (rng.uniform() < 0.8) argv.push(rng.pick(['-q', '--quiet']));
    if (rng.uniform() < 0.3) argv = [...argv.slice(1), argv[0]]; // the folder after the options
    let argvChange = null;
    if (rng.uniform() < 0.3) {
      const [label, cls, edit] = rng.pick([...ARGV_CHANGES.both, ...ARGV_CHANGES[op]]);
      argv = edit(argv, { input });
      argvChange = { label, cls };
    }
    // from seed TWICE_FROM_SEED (a draw after every other, so earlier seeds build as they were run): verify's
    // outputs written again in the other format beside the first (two runs' outputs): refused (2f7025c)
    const twice = op === 'verify' && hooks.seed >= TWICE_FROM_SEED && rng.uniform() < 0.15 ? (outputsAt === 'safetensors' || (outputsAt === 'withInputs' && inFormat === 'safetensors') ? 'npy' : 'safetensors') : null;

    let changes = [];
    let before = {}, outBefore = {}, outsideBefore = {}, scratchBefore = [], handlesBefore = [], threadsBefore = 0;
    const outDir = op === 'prefill' ? join(scratch, outRel) : null;
    const prepare = async () => {
      mkdirSync(join(outside, 'sub'), { recursive: true });
      writeFileSync(join(outside, 'file'), 'outside');
      let outputs;
      if (op === 'verify') {
        outputs = referenceOutputs(reference(), sQ, hQ, dV, outDtype);
        if (spoiling) spoiled = spoil(makeRng(spoilRng), outputs);
      }
      await writePrefillDir(inDir, a, { format: inFormat, ...(outputs && outputsAt === 'withInputs' ? { outputs } : {}) });
      if (outputs && outputsAt !== 'withInputs') await writePrefillOutputs(inDir, outputs, outputsAt);
      if (outputs && twice) {
        // the second run's files as an older library wrote them (writePrefillOutputs refuses such a
        // folder since 93b65ad): written beside the input folder, then copied in
        const second = join(scratch, 'second');
        await writePrefillOutputs(second, outputs, twice);
        for (const f of readdirSync(second)) copyFileSync(join(second, f), join(inDir, f));
        rmSync(second, { recursive: true, force: true });
      }
      changes = plan.map((c) => {
        const got = c.apply(c.file ? join(inDir, c.file) : undefined);
        return { ...c, cls: c.cls === null ? got ?? 'refuse' : got === 'same' ? 'same' : c.cls };
      });
      if (op === 'prefill') makeOut(scratch, writes);
      before = folderState(inDir);
      outBefore = outDir ? folderState(outDir) : {};
      outsideBefore = folderState(outside);
      scratchBefore = readdirSync(scratch).sort();
      handlesBefore = handlesUnder(scratch);
      threadsBefore = threadCount();
    };
    const expected = () => {
      const all = [...changes.map((c) => c.cls), outCls, argvChange?.cls ?? 'same', twice ? 'refuse' : 'same'];
      if (all.includes('refuse')) return 'refuse';
      if (all.includes('free')) return 'free';
      return spoiled ? 'fail' : 'pass';
    };
    const describe = () =>
      `${op} ${JSON.stringify(argv)} of a ${inFormat} folder${op === 'verify' ? ` (outputs ${outDtype} ${outputsAt}${twice ? ` and again as ${twice}` : ''}${spoiled ? `, ${spoiled}` : ''})` : `, --out ${outLabel} [${outCls}]`}` +
      `${changes.length ? `; ${changes.map((c) => `${c.label} [${c.cls}]`).join('; ')}` : ''}${argvChange ? `; argv: ${argvChange.label} [${argvChange.cls}]` : ''}; expected ${expected()}`;

    return {
      args: [],
      get describe() {
        return describe();
      },
      prepare,
      call: async () => {
        const got = await runCli(scratch, op, argv);
        // a stack on stderr is no typed refusal: the case is untyped
        if (/internal error/.test(got.stderr) || /"INTERNAL_ERROR"/.test(got.stdout)) throw new Error(`exit ${got.code}: ${got.stderr.slice(0, 400)}`);
        return got;
      },
      leftOpen: async () => {
        const now = handlesUnder(scratch).filter((h) => !handlesBefore.includes(h));
        if (now.length > 0) return `${now.length} handle(s) left open: ${now.slice(0, 3).join(', ')}`;
        // threads of the command's engine or reference pool: gone once it returned (allow them a moment to end)
        for (let i = 0; i < 40 && threadCount() > threadsBefore; i++) await sleep(50);
        const threads = threadCount();
        return threads > threadsBefore ? `${threads - threadsBefore} thread(s) still running 2 s after the command returned (${threadsBefore} before)` : null;
      },
      judge: async (got) => {
        const exp = expected();
        const { code, stdout, stderr } = got;
        const tail = () => `(exit ${code}; stderr: ${stderr.trim().slice(-300)}${json ? `; stdout: ${stdout.slice(0, 200)}` : ''})`;
        if (![0, 1, 2].includes(code)) return `exit code ${code} ${tail()}`;
        if (json) {
          let obj;
          try {
            obj = JSON.parse(stdout);
          } catch (e) {
            return `--json: stdout is not one JSON document (${e.message}) ${tail()}`;
          }
          if (typeof obj !== 'object' || obj === null || obj.ok !== (code === 0)) return `--json: ok ${obj?.ok} with exit ${code} ${tail()}`;
          if (obj.error && obj.exitCode !== code) return `--json: exitCode ${obj.exitCode}, exit ${code}`;
          if (code === 2 && typeof obj.error?.code !== 'string') return `--json: exit 2 with no error code ${tail()}`;
        }
        if (code === 2 && !new RegExp(`^sparse-mla ${op}: .+ \\[[A-Z_]+\\]$`).test(stderr.trim().split('\n').pop() ?? '')) return `exit 2 without a one-line message ${tail()}`;
        // nothing written outside the output folder
        const outsideNow = folderState(outside);
        const outsideDiff = stateDiff(outsideBefore, outsideNow).filter((n) => !(n === 'sub' && outLabel === 'a symlink to a folder outside'));
        if (outsideDiff.length > 0) return `written outside the folders it was given: outside/${outsideDiff.join(', outside/')} ${tail()}`;
        const scratchNow = readdirSync(scratch).sort();
        const stray = scratchNow.filter((n) => !scratchBefore.includes(n) && !(op === 'prefill' && outRel.split('/')[0] === n));
        if (stray.length > 0) return `wrote ${stray.join(', ')} into the working directory ${tail()}`;
        const inNow = folderState(inDir);
        const inDiff = stateDiff(before, inNow).filter((n) => !(outRel === 'in' && code === 0 && writes.includes(n)));
        if (inDiff.length > 0) return `changed ${inDiff.join(', ')} in the input folder ${tail()}`;
        if (op === 'prefill' && code !== 0 && outRel !== 'in') {
          const outNow = folderState(outDir);
          const made = stateDiff(outBefore, outNow).filter((n) => !n.startsWith('(') && !String(outNow[n]).startsWith('dir'));
          if (made.length > 0) return `a refused prefill wrote ${made.join(', ')} in --out ${tail()}`;
        }
        if (exp === 'free') return null;
        if (exp === 'refuse') return code === 2 ? null : `expected exit 2 (bad input), got ${code} ${tail()}`;
        if (exp === 'fail') return code === 1 ? null : `verify of outputs with ${spoiled}: exit ${code}, expected 1 (FAIL) ${tail()}`;
        if (code !== 0) return `expected exit 0, got ${code} ${tail()}`;
        if (op === 'verify') return json && JSON.parse(stdout).pass !== true ? `exit 0 but pass ${JSON.parse(stdout).pass}` : null;
        // prefill's outputs, read back, against the reference
        const dir = outLabel === 'a symlink to a folder outside' ? join(outside, 'sub') : outDir;
        let res;
        if (format === 'safetensors') {
          const t = (await readSafetensorsFile(join(dir, 'outputs.safetensors'))).tensors;
          res = { out: t.get('out'), lse: t.get('lse'), maxLogits: t.get('max_logits') };
        } else {
          const read = async (n) => {
            const arr = await readNpyFile(join(dir, `${n}.npy`));
            return { dtype: arr.descr === '<u2' ? 'bf16' : 'float32', shape: arr.shape, data: arr.data };
          };
          res = { out: await read('out'), lse: await read('lse'), maxLogits: await read('max_logits') };
        }
        if (res.out?.dtype !== 'bf16') return `out written as ${res.out?.dtype}`;
        return judgeAttention(res, () => withDotScales('sparsePrefill', R.sparsePrefillReference, refArgs()), sQ, hQ, dV);
      },
    };
  },
};

/** The targets of this file, with their weights (fuzz.mjs draws them with the session-53 ones). */
export const CLI_TARGETS = [[cliCommand, 2]];
