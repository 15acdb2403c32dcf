// The API fuzzer's case loop (test/fuzz/run.mjs --child) in this one process, for a tool that follows
// only the process it starts: `compute-sanitizer` does not attach to the children the runner forks,
// so a sanitizer wrapped around `run.mjs` checks none of the cases. Messages the child would send its
// parent are printed instead (findings as they come, the counts at the end, as JSON lines); a case
// that kills the process ends the run (the runner would go on in a fresh child).
// Usage: node bench/device/fuzz_in_process.mjs FUZZ_DIR SEED SECONDS [BACKEND]
//   FUZZ_DIR: a test/fuzz folder whose ../../dist is the build to fuzz
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [dir, seed, seconds, backend = 'cuda'] = process.argv.slice(2);
if (!dir || !seed || !seconds) throw new Error('usage: fuzz_in_process.mjs FUZZ_DIR SEED SECONDS [BACKEND]');
const runner = resolve(dir, 'run.mjs');
const deadline = Date.now() + Number(seconds) * 1000;
process.argv = [process.argv[0], runner, '--child', '--backend', backend, '--seed', seed, '--start', '0', '--end', String(2 ** 31), '--deadline', String(deadline), '--progress', resolve(dir, `progress-${seed}.txt`)];
let cases = 0;
process.send = (message, callback) => {
  if (message.type === 'finding') console.log(JSON.stringify(message));
  if (message.type === 'counts') {
    cases = message.next;
    console.log(JSON.stringify({ seed: Number(seed), backend, cases, counts: message.counts, done: message.done ?? false }));
  }
  callback?.();
  return true;
};
process.on('exit', (code) => console.log(JSON.stringify({ exit: code, cases })));
await import(pathToFileURL(runner).href);
