#!/usr/bin/env node
// The CommonJS typings of the package (package.json exports, condition "require" > "types"):
// TypeScript before 5.8, and 5.8+ under module node16, refuses to let a CommonJS file import the
// ES module's declarations (TS1479, and TS1541 for `import type`), although require('sparse-mla')
// works (cjs/index.cjs). The declarations the two entry points reach are copied from dist/ into
// dist/cjs/ as .d.cts, their relative specifiers ending in .cjs, so that TypeScript reads them as
// CommonJS. Run after tsc (npm run build, prepare): `node cjs/make_types.mjs [distDir]`.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, posix, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = process.argv[2] ?? fileURLToPath(new URL('../dist', import.meta.url));
const out = join(dist, 'cjs');
const ENTRIES = ['index.d.ts', 'reference/index.d.ts'];
// `from './x.js'`, `import('./x.js')`, `import './x.js'`
const RELATIVE = /(\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)(['"])(\.\.?\/[^'"]*)\2/g;

rmSync(out, { recursive: true, force: true });
const queue = [...ENTRIES];
const done = new Set();
while (queue.length) {
  const file = queue.pop();
  if (done.has(file)) continue;
  done.add(file);
  let text;
  try {
    text = readFileSync(join(dist, file), 'utf8');
  } catch (e) {
    throw new Error(`cjs/make_types.mjs: cannot read ${join(dist, file)} (build dist/ with tsc first): ${e.message}`);
  }
  const cjs = text.replace(RELATIVE, (_, lead, quote, specifier) => {
    if (!specifier.endsWith('.js')) throw new Error(`cjs/make_types.mjs: ${file} imports ${specifier}, which has no CommonJS typings`);
    queue.push(posix.join(posix.dirname(file), specifier.replace(/\.js$/, '.d.ts')));
    return `${lead}${quote}${specifier.replace(/\.js$/, '.cjs')}${quote}`;
  });
  const target = join(out, file.replace(/\.d\.ts$/, '.d.cts'));
  mkdirSync(dirname(target), { recursive: true });
  writeFileSync(target, cjs);
}
console.error(`cjs/make_types.mjs: ${done.size} declaration files -> ${relative(process.cwd(), out) || out}/*.d.cts`);
