/**
 * The TS description of the C ABI's params structs (src/backends/abi.ts) against the header
 * (cpp/include/sparse_mla/sparse_mla.h): the same ops, the same fields in the same order, each of
 * a C type that fits its kind, and every field 4 bytes in wasm32 (a pointer, an int32_t or a
 * float), as the WASM ops' struct writer assumes. The cuda ops' table against the launchers
 * (native/cuda/smla_cuda.h) and the structs they take; and the field names the addon's binding
 * files read against both tables.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, test } from 'vitest';
import { CUDA_OP_PARAMS, CUDA_OP_STRUCT, OP_PARAMS, cFunctionName, fieldsOf, snakeCase, type CudaOpName, type OpName } from '../dist/backends/abi.js';

const source = (path: string): string => readFileSync(new URL(`../${path}`, import.meta.url), 'utf8');
const header = source('cpp/include/sparse_mla/sparse_mla.h');

/** typedef struct smla_X_params { ... } → [field name, C type] in order, comments dropped. */
function headerStructs(): Map<string, [string, string][]> {
  const structs = new Map<string, [string, string][]>();
  for (const m of header.matchAll(/typedef struct (smla_(\w+)_params) \{([^}]*)\} \1;/g)) {
    const fields: [string, string][] = [];
    for (const line of m[3]!.replace(/\/\*[^]*?\*\//g, '').split('\n')) {
      const f = /^\s*(.+?)\s*\b(\w+);\s*$/.exec(line);
      if (f) fields.push([f[2]!, f[1]!.replace(/\s+\*/, '*')]);
    }
    structs.set(m[2]!, fields);
  }
  return structs;
}

const C_ELEMENT = { u8: 'uint8_t', u16: 'uint16_t', i32: 'int32_t', f32: 'float', i64: 'int64_t' } as const;

/** The C types a field of this kind may have. */
function cTypesOf(kind: string): string[] {
  if (kind === 'i32') return ['int32_t'];
  if (kind === 'f32') return ['float'];
  if (kind === 'ids') return ['const int64_t*'];
  if (kind === 'rows') return ['const void*'];
  const [use, element] = kind.split(' ') as [string, keyof typeof C_ELEMENT];
  const c = C_ELEMENT[element];
  return use.startsWith('in') && use !== 'inout' ? [`const ${c}*`] : [`${c}*`];
}

describe('the params structs of the C ABI', () => {
  const structs = headerStructs();

  test('the header and the TS table name the same ops, each a function taking its struct', () => {
    expect([...structs.keys()].sort()).toEqual(Object.keys(OP_PARAMS).map(snakeCase).sort());
    for (const op of Object.keys(OP_PARAMS) as OpName[]) {
      expect(header, op).toContain(`SMLA_API int32_t ${cFunctionName(op)}(const smla_${snakeCase(op)}_params* p);`);
    }
    // every other exported function is one of the three that belong to no op
    const exported = [...header.matchAll(/SMLA_API[^(]*\b(smla_\w+)\(/g)].map((m) => m[1]);
    const ops = new Set((Object.keys(OP_PARAMS) as OpName[]).map(cFunctionName));
    expect(exported.filter((f) => !ops.has(f!)).sort()).toEqual(['smla_abi_version', 'smla_free', 'smla_malloc']);
  });

  test.each(Object.keys(OP_PARAMS) as OpName[])('%s: the same fields in the same order, of C types that fit their kinds and take 4 bytes in wasm32', (op) => {
    const c = structs.get(snakeCase(op))!;
    const ts = fieldsOf(op);
    expect(ts.map(([name]) => snakeCase(name))).toEqual(c.map(([name]) => name));
    ts.forEach(([name, kind], i) => {
      const cType = c[i]![1];
      expect(cTypesOf(kind), `${op}.${name}: ${cType}`).toContain(cType);
      expect(cType.endsWith('*') || cType === 'int32_t' || cType === 'float', `${op}.${name}: ${cType}`).toBe(true);
    });
  });

  test('snake case keeps acronyms whole', () => {
    expect(['dQK', 'sKV', 'extraKCache', 'topkLength', 'quantizeKvCache', 'planCombineTopk'].map(snakeCase)).toEqual([
      'd_qk',
      's_kv',
      'extra_k_cache',
      'topk_length',
      'quantize_kv_cache',
      'plan_combine_topk',
    ]);
  });
});

describe('the cuda ops: launchers taking the C ABI structs', () => {
  const launchers = source('native/cuda/smla_cuda.h');
  const cudaOps = Object.keys(CUDA_OP_PARAMS) as CudaOpName[];

  test.each(cudaOps)('%s: its launcher takes its struct first and the stream last', (op) => {
    const m = new RegExp(`int32_t smla_cuda_${snakeCase(op)}\\(([^)]*)\\);`).exec(launchers);
    expect(m, `smla_cuda_${snakeCase(op)} in smla_cuda.h`).not.toBeNull();
    const args = m![1]!.split(',').map((a) => a.trim().replace(/\s+/g, ' '));
    expect(args[0]).toBe(`const smla_${snakeCase(CUDA_OP_STRUCT[op])}_params* p`);
    expect(args.at(-1)).toBe('cudaStream_t stream');
  });

  test.each(cudaOps)("%s: the struct's fields in its order and of its element types, and scalars beside them", (op) => {
    const struct = OP_PARAMS[CUDA_OP_STRUCT[op]] as Record<string, string>;
    const fields = Object.entries(CUDA_OP_PARAMS[op]) as [string, string][];
    const inStruct = fields.filter(([name]) => name in struct);
    expect(inStruct.map(([name]) => name)).toEqual(Object.keys(struct).filter((name) => inStruct.some(([n]) => n === name)));
    // on the device an array may be read on the host (`host`) or be absent (`?`); its element type stays
    const element = (kind: string) => kind.split(' ').at(-1);
    for (const [name, kind] of inStruct) expect(element(kind), `${op}.${name}`).toBe(element(struct[name]!));
    const left = Object.keys(struct).filter((name) => !(name in CUDA_OP_PARAMS[op]));
    expect(left).toEqual([]);
    for (const [name, kind] of fields.filter(([n]) => !(n in struct))) expect(['i32', 'i32?'], `${op}.${name}`).toContain(kind);
  });
});

describe("the addon's binding files read the tables' fields", () => {
  // the binding files, and the cuda ops' shared dequant reader (cuda_ops.h, read by the layer program too)
  const files = ['native/addon/sparse_prefill.h', 'native/addon/paged_sparse_attention.h', 'native/addon/kv_cache.h', 'native/addon/planner.h', 'native/addon/cuda_ops.h'].map(source);

  /** The body of the function `name` (its definition's braces) in `text`, or undefined. */
  function body(text: string, name: string): string | undefined {
    const at = new RegExp(`\\b${name}\\([^;{]*\\)\\s*\\{`).exec(text);
    if (!at) return undefined;
    let depth = 0;
    for (let i = at.index + at[0].length - 1; i < text.length; i++) {
      if (text[i] === '{') depth++;
      else if (text[i] === '}' && --depth === 0) return text.slice(at.index + at[0].length, i);
    }
    return undefined;
  }

  /** The field names a function reads through its fields reader (`f` or `k.fields`), and through the readers it calls with it. */
  function namesRead(code: string): Set<string> {
    const names = new Set([...code.matchAll(/\b(?:k\.fields|f)\.\w+(?:<[^>]*>)?\((?:[^"();]*,\s*)?"(\w+)"/g)].map((m) => m[1]!));
    for (const [, reader] of code.matchAll(/\b(Read\w+)\((?:k\.fields|f)\b/g)) {
      const b = files.map((f) => body(f, reader!)).find((x) => x !== undefined);
      expect(b, reader).toBeDefined();
      for (const n of namesRead(b!)) names.add(n);
    }
    return names;
  }

  const opFunction = (op: string) => op[0]!.toUpperCase() + op.slice(1);

  test.each([
    ['cpu', 'native/addon/cpu_ops.cpp', ['sparsePrefill', 'pagedSparseAttention', 'dequantizeKvCache', 'quantizeKvCache'] as const],
    ['cuda', 'native/addon/cuda_ops.cpp', Object.keys(CUDA_OP_PARAMS) as CudaOpName[]],
  ] as const)('%s ops', (table, path, ops) => {
    const text = source(path);
    for (const op of ops) {
      const code = body(text, `Napi::Value ${opFunction(op)}`);
      expect(code, `${path}: ${op}`).toBeDefined();
      const fields = table === 'cpu' ? OP_PARAMS[op as OpName] : CUDA_OP_PARAMS[op as CudaOpName];
      expect([...namesRead(code!)].sort(), `${table} ${op}`).toEqual(Object.keys(fields).sort());
    }
  });
});
