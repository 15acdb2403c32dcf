/**
 * A call of the package run in a child node process, for the calls that crash a process or need one
 * of their own (a resource limit): the script it runs and the result it printed.
 */
import { fileURLToPath, pathToFileURL } from 'node:url';

/**
 * A node script that imports the package's dist/index.js as `lib`, runs `body` (the text of an
 * async function of `lib`) and prints its result as JSON on its last stdout line; where it throws,
 * the error goes to stderr and the process exits 1.
 */
export function libScript(body: string): string {
  const lib = pathToFileURL(fileURLToPath(new URL('../../dist/index.js', import.meta.url))).href;
  return `import(${JSON.stringify(lib)}).then(async (lib) => { const result = await (async () => { ${body} })(); console.log(JSON.stringify(result)); }).then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });`;
}

/** What such a script printed: its last stdout line parsed (undefined where that is no JSON). */
export function printedResult(stdout: string | null | undefined): unknown {
  const lines = (stdout ?? '').trim().split('\n');
  try {
    return JSON.parse(lines[lines.length - 1] ?? '');
  } catch {
    return undefined;
  }
}
