/**
 * Loading wasm/sparse_mla.wasm: read and compile it (asynchronously for the worker pool on the
 * main thread, synchronously for the planner), check that it has the exports asked for, read the
 * most memory it may grow to, and instantiate it with stubs for whatever it imports. It knows no
 * op: the exports and their signatures are ops.ts's.
 */
import { readFileSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { SparseMlaError } from '../../errors.js';

/**
 * The slice of the WebAssembly JS API used here. TypeScript declares WebAssembly only in its DOM
 * lib, which this Node package does not load, so the loader types what it touches itself.
 */
export interface WasmModule {
  readonly [Symbol.toStringTag]: string;
}
export interface WasmMemory {
  readonly buffer: ArrayBuffer;
}
interface WasmDescriptor {
  module: string;
  name: string;
  kind: string;
}
type WasmImports = Record<string, Record<string, unknown>>;
interface WasmInstance {
  exports: Record<string, unknown>;
}
interface WasmApi {
  compile(bytes: Uint8Array): Promise<WasmModule>;
  instantiate(module: WasmModule, imports: WasmImports): Promise<WasmInstance>;
  Module: {
    new (bytes: Uint8Array): WasmModule;
    exports(m: WasmModule): Omit<WasmDescriptor, 'module'>[];
    imports(m: WasmModule): WasmDescriptor[];
  };
  Instance: new (module: WasmModule, imports: WasmImports) => WasmInstance;
}
const WA = (globalThis as unknown as { WebAssembly: WasmApi }).WebAssembly;

/** wasm/sparse_mla.wasm at the package root: ../../../ from dist/backends/wasm/ (and src/…). */
export const WASM_URL = new URL('../../../wasm/sparse_mla.wasm', import.meta.url);
/** The same as a file path, for messages and `info` (URL.pathname would show `%20` for a space). */
export const WASM_PATH = fileURLToPath(WASM_URL);

/** Largest linear memory a wasm32 module can have. */
export const WASM32_MAX_BYTES = 2 ** 32;

/** A compiled module, with its size and the most memory an instance of it can grow to. */
export interface CompiledCore {
  module: WasmModule;
  bytes: number;
  maxMemoryBytes: number;
}

const unavailable = (message: string): SparseMlaError => new SparseMlaError('BACKEND_UNAVAILABLE', `wasm: ${message}`, 'backend');
const unreadable = (e: unknown): SparseMlaError =>
  unavailable(`cannot read ${WASM_PATH} (${(e as Error).message}); reinstall the package or rebuild it with \`npm run build:wasm\``);
const uncompilable = (e: unknown): SparseMlaError =>
  unavailable(`${WASM_PATH} does not compile on this Node (${(e as Error).message}); it needs WebAssembly SIMD128 (Node ≥ 16.4)`);

/** The export check shared by both ways of compiling. */
function compiled(module: WasmModule, bytes: Uint8Array, required: readonly string[]): CompiledCore {
  const names = new Set(WA.Module.exports(module).map((e) => e.name));
  const missing = required.filter((n) => !names.has(n));
  if (missing.length > 0) throw unavailable(`${WASM_PATH} lacks exports ${missing.join(', ')}; rebuild it with \`npm run build:wasm\``);
  return { module, bytes: bytes.length, maxMemoryBytes: declaredMaxMemory(bytes) };
}

/**
 * V8 compiles WebAssembly lazily in its baseline tier and moves a function to the optimizing tier
 * only on a subsequent call, so one long core call on a fresh worker ran entirely in baseline code
 * (several times slower). The core is small (tens of KB), so it is compiled eagerly with the
 * optimizing tier; V8's defaults are restored right after, so the application's other modules are
 * not affected.
 */
function enterEagerOptimizedCompile(): void {
  setFlagsFromString('--no-wasm-lazy-compilation');
  setFlagsFromString('--no-wasm-dynamic-tiering');
}
function leaveEagerOptimizedCompile(): void {
  setFlagsFromString('--wasm-lazy-compilation');
  setFlagsFromString('--wasm-dynamic-tiering');
}

/** Reads and compiles the module (the worker pool's way); throws BACKEND_UNAVAILABLE when it is missing, unusable or lacks an export of `required`. */
export async function compileModule(required: readonly string[]): Promise<CompiledCore> {
  const bytes = await readFile(WASM_URL).catch((e: unknown) => Promise.reject(unreadable(e)));
  enterEagerOptimizedCompile();
  // Node 24's eager compile holds no handle on the event loop: a program awaiting only this would
  // exit mid-compile (top-level await: exit 13; CommonJS: exit 0 with nothing done).
  const keepAlive = setInterval(() => {}, 1 << 30);
  const module = await WA.compile(bytes)
    .catch((e: unknown) => Promise.reject(uncompilable(e)))
    .finally(() => {
      clearInterval(keepAlive);
      leaveEagerOptimizedCompile();
    });
  return compiled(module, bytes, required);
}

/** compileModule, synchronously (the planner's way: it runs on the calling thread, outside any promise). */
export function compileModuleSync(required: readonly string[]): CompiledCore {
  const orThrow = <T>(f: () => T, error: (e: unknown) => SparseMlaError): T => {
    try {
      return f();
    } catch (e) {
      throw error(e);
    }
  };
  const bytes = orThrow(() => readFileSync(WASM_URL), unreadable);
  enterEagerOptimizedCompile();
  let module: WasmModule;
  try {
    module = orThrow(() => new WA.Module(bytes), uncompilable);
  } finally {
    leaveEagerOptimizedCompile();
  }
  return compiled(module, bytes, required);
}

function readLeb(bytes: Uint8Array, at: { pos: number }): number {
  let result = 0;
  let mul = 1;
  for (;;) {
    const b = bytes[at.pos++]!;
    result += (b & 0x7f) * mul;
    if ((b & 0x80) === 0) return result;
    mul *= 128;
  }
}

/** The maximum of the module's own memory (memory section, id 5); wasm32's 4 GiB when unbounded. */
export function declaredMaxMemory(bytes: Uint8Array): number {
  const at = { pos: 8 };
  while (at.pos < bytes.length) {
    const id = bytes[at.pos++]!;
    const size = readLeb(bytes, at);
    const end = at.pos + size;
    if (id === 5) {
      const count = readLeb(bytes, at);
      if (count < 1) break;
      const flags = bytes[at.pos++]!;
      readLeb(bytes, at); // initial pages
      if (flags & 1) return Math.min(readLeb(bytes, at) * 65536, WASM32_MAX_BYTES);
      break;
    }
    at.pos = end;
  }
  return WASM32_MAX_BYTES;
}

/**
 * Host functions for whatever the module imports. The reference build imports nothing; a build
 * with WASI or Emscripten hooks still instantiates, and a call that cannot be honoured fails.
 */
function importStubs(module: WasmModule): WasmImports {
  const imports: WasmImports = {};
  for (const imp of WA.Module.imports(module)) {
    const ns = (imports[imp.module] ??= {});
    if (imp.kind !== 'function') {
      throw new SparseMlaError('BACKEND_FAILURE', `wasm: the module imports ${imp.kind} ${imp.module}.${imp.name}, which this host does not provide`, 'backend');
    }
    if (imp.name === 'emscripten_notify_memory_growth') ns[imp.name] = () => {}; // views are refreshed per call
    else if (imp.name === 'proc_exit') ns[imp.name] = (code: number) => { throw new Error(`wasm: the core called proc_exit(${code})`); };
    else if (imp.module === 'wasi_snapshot_preview1') ns[imp.name] = () => 52; // ENOSYS
    else ns[imp.name] = () => { throw new Error(`wasm: the core called unsupported import ${imp.module}.${imp.name}`); };
  }
  return imports;
}

/** An instance's exports (for a worker of the pool). */
export async function instantiateModule(module: WasmModule): Promise<Record<string, unknown>> {
  return (await WA.instantiate(module, importStubs(module))).exports;
}

/** An instance's exports, created synchronously on the calling thread (the planner's). */
export function instantiateModuleSync(module: WasmModule): Record<string, unknown> {
  return new WA.Instance(module, importStubs(module)).exports;
}
