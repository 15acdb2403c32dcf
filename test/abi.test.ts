/**
 * The TS description of the C ABI's params structs (src/backends/abi.ts) against the header
 * (cpp/include/sparse_mla/sparse_mla.h): the same ops, the same fields in the same order, each of
 * a C type that fits its kind, and every field 4 bytes in wasm32 (a pointer, an int32_t or a
 * float), as the WASM ops' struct writer assumes.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, test } from 'vitest';
import { OP_PARAMS, cFunctionName, fieldsOf, snakeCase, type OpName } from '../dist/backends/abi.js';

const header = readFileSync(new URL('../cpp/include/sparse_mla/sparse_mla.h', import.meta.url), 'utf8');

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
