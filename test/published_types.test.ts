/**
 * The type declarations the package publishes (package.json `files` ships dist/ whole: tsc's
 * dist/**\/*.d.ts, and the CommonJS copies cjs/make_types.mjs makes in dist/cjs/**\/*.d.cts) declare
 * nothing src/ marks `@internal` (tsconfig.json: stripInternal), and lose nothing public: the entry
 * points export the names the sources export, each class and interface keeps every member the
 * sources do not mark internal, and what README imports and calls on an engine or a plan is
 * declared. The internal names are read from the sources' JSDoc, so a new `@internal` is covered
 * without a list here. Needs the build (npm run build).
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { beforeAll, describe, expect, test } from 'vitest';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const SRC = join(ROOT, 'src');
const DIST = join(ROOT, 'dist');
const ENTRIES = { 'sparse-mla': 'index', 'sparse-mla/reference': 'reference/index' } as const;

const filesUnder = (dir: string, keep: (f: string) => boolean): string[] =>
  readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter(keep).map((f) => join(dir, f)).sort();

const isInternal = (node: ts.Node): boolean => ts.getJSDocTags(node).some((t) => t.tagName.text === 'internal');

const nameOf = (node: ts.Node): string | undefined => {
  const name = (node as { name?: ts.Node }).name;
  return name && (ts.isIdentifier(name) || ts.isStringLiteral(name) || ts.isPrivateIdentifier(name) || ts.isNumericLiteral(name)) ? name.text : undefined;
};

/**
 * Every named declaration a .ts / .d.ts / .d.cts file makes at its top level and in its classes,
 * interfaces, enums and namespaces, as 'Container.member', each with whether its JSDoc says @internal.
 */
function declarations(file: string): { name: string; internal: boolean }[] {
  const source = ts.createSourceFile(file, readFileSync(file, 'utf8'), ts.ScriptTarget.ES2022, true);
  const found: { name: string; internal: boolean }[] = [];
  const visit = (node: ts.Node, within: string): void => {
    if (ts.isVariableStatement(node)) {
      for (const d of node.declarationList.declarations) {
        const name = nameOf(d);
        if (name !== undefined) found.push({ name: within + name, internal: isInternal(d) });
      }
      return;
    }
    const name = nameOf(node);
    if (name !== undefined && (ts.isClassElement(node) || ts.isTypeElement(node) || ts.isEnumMember(node) || ts.isStatement(node))) {
      found.push({ name: within + name, internal: isInternal(node) });
      if (ts.isClassDeclaration(node) || ts.isInterfaceDeclaration(node) || ts.isEnumDeclaration(node)) {
        for (const member of node.members) visit(member, `${within}${name}.`);
      } else if (ts.isModuleDeclaration(node) && node.body && ts.isModuleBlock(node.body)) {
        for (const statement of node.body.statements) visit(statement, `${within}${name}.`);
      }
    }
  };
  for (const statement of source.statements) visit(statement, '');
  return found;
}

/** 'file (from src/, no extension): Container.member' for each declaration src/ marks @internal and declares nowhere else in its container. */
function internalInSources(): Map<string, Set<string>> {
  const byFile = new Map<string, Set<string>>();
  for (const file of filesUnder(SRC, (f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))) {
    const decls = declarations(file);
    const publicNames = new Set(decls.filter((d) => !d.internal).map((d) => d.name));
    const internal = new Set(decls.filter((d) => d.internal && !publicNames.has(d.name)).map((d) => d.name));
    if (internal.size) byFile.set(relative(SRC, file).replace(/\.ts$/, ''), internal);
  }
  return byFile;
}

/** The published declaration files: tsc's dist/**\/*.d.ts beside the sources, and dist/cjs/**\/*.d.cts. */
const publishedDeclarations = (): string[] =>
  filesUnder(DIST, (f) => /\.d\.c?ts$/.test(f));

/** The file under dist/ that publishes src/<stem>.ts: the ESM declaration, or the CommonJS copy. */
const published = (stem: string, flavour: 'esm' | 'cjs'): string => (flavour === 'esm' ? join(DIST, `${stem}.d.ts`) : join(DIST, 'cjs', `${stem}.d.cts`));

interface Surface {
  /** what each entry point exports, by name */
  exports: Record<string, string[]>;
  /** each exported class's, interface's and type's members, by 'entry: Name' (a class's statics as 'entry: Name (static)') */
  members: Record<string, string[]>;
}

/**
 * The public surface a program sees through the entry points `entries` (one file per package
 * entry), with `keep(declaration)` deciding which member declarations count.
 */
function surface(program: ts.Program, entries: Record<string, string>, keep: (d: ts.Declaration) => boolean): Surface {
  const checker = program.getTypeChecker();
  const out: Surface = { exports: {}, members: {} };
  const names = (props: ts.Symbol[]) =>
    // ES private names (#x) are no surface: the declarations show them as one `#private`
    props.filter((p) => (p.declarations ?? []).some(keep)).map((p) => p.name).filter((n) => n !== 'prototype' && !n.startsWith('#') && !n.startsWith('__')).sort();
  for (const [entry, file] of Object.entries(entries)) {
    const source = program.getSourceFile(file);
    if (!source) throw new Error(`${file} is not in the program`);
    const moduleSymbol = checker.getSymbolAtLocation(source);
    if (!moduleSymbol) throw new Error(`${file} has no module symbol`);
    const exported = checker.getExportsOfModule(moduleSymbol);
    const resolve = (s: ts.Symbol) => (s.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(s) : s);
    // a re-export of a name its module no longer declares is still listed, resolving to nothing
    out.exports[entry] = exported.map((s) => (resolve(s).declarations?.length ? s.name : `${s.name} (declared nowhere)`)).sort();
    for (const s of exported) {
      const target = resolve(s);
      const declared = target.flags & (ts.SymbolFlags.Class | ts.SymbolFlags.Interface | ts.SymbolFlags.TypeAlias) ? checker.getDeclaredTypeOfSymbol(target) : undefined;
      // an alias of a union of literals has String's or Number's members, nothing of ours
      if (declared && (declared.flags & (ts.TypeFlags.Object | ts.TypeFlags.Intersection))) {
        out.members[`${entry}: ${s.name}`] = names(checker.getPropertiesOfType(declared));
      }
      if (target.flags & ts.SymbolFlags.Class) {
        out.members[`${entry}: ${s.name} (static)`] = names(checker.getPropertiesOfType(checker.getTypeOfSymbol(target)));
      }
    }
  }
  return out;
}

const OPTIONS: ts.CompilerOptions = {
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  lib: ['lib.es2022.d.ts'],
  types: ['node'],
  typeRoots: [join(ROOT, 'node_modules', '@types')],
  strict: true,
  noEmit: true,
};

describe('the published type declarations', () => {
  let internal = new Map<string, Set<string>>();
  let sources: Surface = { exports: {}, members: {} };
  let esm: Surface = { exports: {}, members: {} };
  let cjs: Surface = { exports: {}, members: {} };

  beforeAll(() => {
    internal = internalInSources();
    const entryFiles = (dir: string, ext: string) => Object.fromEntries(Object.entries(ENTRIES).map(([entry, stem]) => [entry, join(dir, `${stem}${ext}`)]));
    for (const file of Object.values(entryFiles(DIST, '.d.ts'))) if (!existsSync(file)) throw new Error(`${file} is missing: run npm run build first`);
    // the sources as tsconfig.json compiles them; a member counts there unless its JSDoc says @internal
    const config = ts.getParsedCommandLineOfConfigFile(join(ROOT, 'tsconfig.json'), {}, { ...ts.sys, onUnRecoverableConfigFileDiagnostic: (d) => { throw new Error(ts.flattenDiagnosticMessageText(d.messageText, '\n')); } })!;
    const srcEntries = entryFiles(SRC, '.ts');
    sources = surface(ts.createProgram(config.fileNames, { ...config.options, noEmit: true }), srcEntries, (d) => !isInternal(d));
    const esmEntries = entryFiles(DIST, '.d.ts');
    const cjsEntries = entryFiles(join(DIST, 'cjs'), '.d.cts');
    esm = surface(ts.createProgram(Object.values(esmEntries), OPTIONS), esmEntries, () => true);
    cjs = surface(ts.createProgram(Object.values(cjsEntries), OPTIONS), cjsEntries, () => true);
  }, 120_000);

  test('the sources mark internal declarations (so the checks below check something)', () => {
    const count = [...internal.values()].reduce((n, s) => n + s.size, 0);
    expect(count).toBeGreaterThan(0);
    expect([...internal.keys()]).toContain('planner/plan');
  });

  test('no declaration src/ marks @internal is published, in the ESM declarations or their CommonJS copies', () => {
    const leaked: string[] = [];
    for (const [stem, names] of internal) {
      for (const flavour of ['esm', 'cjs'] as const) {
        const file = published(stem, flavour);
        if (!existsSync(file)) continue; // the CommonJS copies cover what the entry points reach
        for (const d of declarations(file)) if (names.has(d.name)) leaked.push(`${relative(ROOT, file)}: ${d.name}`);
      }
    }
    expect(leaked).toEqual([]);
    // nor any other text tagged so (a comment of a declaration kept by mistake)
    const tagged = publishedDeclarations().filter((f) => readFileSync(f, 'utf8').includes('@internal')).map((f) => relative(ROOT, f));
    expect(tagged).toEqual([]);
  });

  // stripInternal drops a declaration but not the types that name it: a kept declaration naming a
  // stripped one is an error in the file, whether or not the entry points reach it
  test('every published declaration file type-checks: none names a stripped declaration', () => {
    const files = publishedDeclarations();
    // as an installed package: no ambient module of the sources (src/backends/wasm/comlink.d.ts) helps
    const program = ts.createProgram(files, OPTIONS);
    const errors = files.flatMap((f) => {
      const source = program.getSourceFile(f)!;
      return [...program.getSyntacticDiagnostics(source), ...program.getSemanticDiagnostics(source)];
    }).map((d) => {
      const at = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start) : undefined;
      return `${d.file ? relative(ROOT, d.file.fileName) : ''}${at ? `:${at.line + 1}` : ''}: TS${d.code} ${ts.flattenDiagnosticMessageText(d.messageText, ' ')}`;
    });
    expect(files.length).toBeGreaterThan(0);
    expect(errors).toEqual([]);
  }, 120_000);

  test('the entry points export every name the sources export, the same in the CommonJS typings', () => {
    expect(Object.values(sources.exports).flat().length).toBeGreaterThan(0);
    expect(esm.exports).toEqual(sources.exports);
    expect(cjs.exports).toEqual(sources.exports);
  });

  test('each exported class, interface and type keeps every member the sources do not mark @internal', () => {
    expect(Object.keys(sources.members)).toContain('sparse-mla: Plan');
    expect(esm.members).toEqual(sources.members);
    expect(cjs.members).toEqual(sources.members);
  });

  test('every run-time export of the entry points is declared', async () => {
    for (const [entry, stem] of Object.entries(ENTRIES)) {
      const runtime = Object.keys(await import(join(DIST, `${stem}.js`))).sort();
      expect(runtime.filter((name) => !esm.exports[entry]!.includes(name)), entry).toEqual([]);
      expect(runtime.filter((name) => !cjs.exports[entry]!.includes(name)), entry).toEqual([]);
    }
  });

  test("README's imports, and what it calls on an engine or a plan, are declared", () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const imported: Record<string, Set<string>> = {};
    for (const m of readme.matchAll(/import\s*\{([^}]*)\}\s*from\s*'(sparse-mla(?:\/reference)?)'/g)) {
      for (const name of m[1]!.split(',').map((n) => n.trim().replace(/^type\s+/, '').split(/\s+as\s+/)[0]!).filter(Boolean)) {
        (imported[m[2]!] ??= new Set()).add(name);
      }
    }
    expect(imported['sparse-mla']?.size ?? 0).toBeGreaterThan(0);
    for (const [entry, names] of Object.entries(imported)) {
      expect([...names].filter((n) => !esm.exports[entry]!.includes(n)), entry).toEqual([]);
      expect([...names].filter((n) => !cjs.exports[entry]!.includes(n)), entry).toEqual([]);
    }
    // `engine.upload(...)`, `gpu.download(...)`, `plan.release()`, `plan.stats`, ...
    const called = (receivers: string) => [...new Set([...readme.matchAll(new RegExp(`(?<![\\w/.])(?:${receivers})\\.(\\w+)`, 'g'))].map((m) => m[1]!))];
    const onEngine = called('engine|gpu'), onPlan = called('plan');
    expect(onEngine).toContain('sparsePrefill');
    expect(onPlan).toContain('release');
    for (const surfaceSeen of [esm, cjs]) {
      expect(onEngine.filter((n) => !surfaceSeen.members['sparse-mla: Engine']!.includes(n))).toEqual([]);
      expect(onPlan.filter((n) => !surfaceSeen.members['sparse-mla: Plan']!.includes(n))).toEqual([]);
    }
  });
});
