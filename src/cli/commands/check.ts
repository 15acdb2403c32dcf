/**
 * `sparse-mla check [--backend cuda]`: the correctness grid (src/check/grid.ts, the CPU test suites'
 * shapes and edge cases) run on one backend, each result compared with the float64 reference AND
 * with the WASM backend's result on the same inputs; prints one line per case and
 * `N passed, N failed`. Needs only Node and the built package (dist/, the addon, comlink), so it
 * runs on a GPU host where the test runner is not installed. Exit 0 all passed, 1 any failed.
 */
import { randomInt } from 'node:crypto';
import { SparseMlaError } from '../../errors.js';
import { createEngine, createKvCache } from '../../index.js';
import { engineBackend, SparseMlaEngine } from '../../engine.js';
import { tensor } from '../../tensor.js';
import { loadHostPlanner } from '../../backends/wasm/planner.js';
import { CudaBackend } from '../../backends/native/cuda_backend.js';
import type { CudaDeviceBuffer } from '../../backends/native/cuda_device_buffer.js';
import type { BackendChoice, DeviceTensor, Engine, KvCache, PagedSparseAttentionArgs, SparsePrefillArgs, Tensor } from '../../types.js';
import * as R from '../../reference/index.js';
import { combinedWidth, createPlan, prefillLayer, requestVisible, type CompressRatio, type Plan } from '../../planner/index.js';
import { rowDimOf } from '../../kv_cache_layout.js';
import { buildPrefillCase, expectNonFinitePlan, invalidFillers, makeRng, pagedCases, pokeNonFiniteTokens, prefillCases, randomBf16, randomIndices, regimeValues, sampleRows, type Rng } from '../../check/grid.js';
import { chunkScenario, indexerTopk, type ChunkScenario } from '../../check/chunks.js';
import { expectNoPositionals, formatOptions, parseArgs, type OptionTable } from '../args.js';
import { BACKEND_CHOICES, type CliCommand } from '../command.js';
import { fitLines, formatTable, setReportWidth } from '../table.js';

const OPTIONS = {
  backend: { type: 'string', default: 'auto', choices: BACKEND_CHOICES, help: "the backend to check ('auto': the one createEngine picks)" },
  device: { type: 'int', min: 0, max: 1023, help: 'the CUDA device of a cuda engine (default SPARSE_MLA_DEVICE, else 0)' },
  seed: { type: 'int', min: 0, max: 2 ** 32 - 1, help: 'random seed (default: a fresh one, printed)' },
  only: { type: 'string', metavar: 'TEXT', help: 'run only the cases whose name contains TEXT' },
  quiet: { type: 'boolean', short: 'q', help: 'print failures and the summary only' },
  json: { type: 'boolean', help: 'print the results as JSON on stdout (per case its worst error/bound ratios; per family the worst)' },
  wide: { type: 'boolean', help: 'do not fit the report to 100 columns' },
} as const satisfies OptionTable;

const USAGE = `Usage: sparse-mla check [options]

Run the correctness grid (sparse prefill over FlashMLA's shapes with sinks, topkLength, invalid
and duplicate indices; paged main + extra sets; dequant v4/v32 bit-exact; device tensors on cuda)
on one backend, comparing every result with the float64 reference and with the WASM backend,
with the SPEC §4 accuracy bounds (docs/SPEC.md):
${R.describeBounds().map((l) => `  ${l}`).join('\n')}
Prefill and paged cases run in three data regimes (unit, flashmla, cancel). Each attention case
prints its worst error/bound ratio per tensor (pass <= 1) and where; a table gives the worst per
case family. Prints \`N passed, N failed\`; exit 0 when all passed, 1 otherwise. On a GPU host:
\`sparse-mla check --backend cuda\`.

Options:
${formatOptions(OPTIONS)}
`;

function sameBits(label: string, a: ArrayLike<number>, b: ArrayLike<number>): void {
  if (a.length !== b.length) throw new Error(`${label}: lengths ${a.length} vs ${b.length}`);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) throw new Error(`${label}: element ${i} differs (${a[i]} vs ${b[i]})`);
}

/** max |v| over the first dV dims of bf16 rows [n, dim]: ≥ every mag of an attention over them. */
function maxAbsV(bits: Uint16Array, dim: number, dV = 512): number {
  let m = 0;
  for (let i = 0; i < bits.length; i++) if (i % dim < dV) m = Math.max(m, Math.abs(R.decodeBf16(bits[i]!)));
  return m;
}

/** max |v| over every token of v4 caches (dequantized by the reference). */
function cachesMaxAbsV(caches: readonly KvCache[]): number {
  let m = 0;
  for (const c of caches) {
    const rows = R.dequantizeKCacheReference(c, Array.from({ length: c.pageSize * c.numPages }, (_, i) => i));
    for (let i = 0; i < rows.length; i++) if (Number.isFinite(rows[i]!)) m = Math.max(m, Math.abs(rows[i]!));
  }
  return m;
}

/**
 * Engine result vs the float64 reference on `queries` (SPEC §4's bounds), and vs the WASM result
 * on every row: there the reference's weights are unknown, so an out element's bound uses
 * `magCeiling` (max |V| the queries can attend, ≥ every mag) — looser elementwise, the same cosine
 * and lse/maxLogits bounds. Returns the verdict against the reference; throws on any failure.
 */
function judgeAttention(got: R.AttentionTensors, wasm: R.AttentionTensors, ref: R.ReferenceAttentionResult, queries: number[], magCeiling: number): R.AttentionComparison {
  const shape = { heads: got.lse.shape[1]!, dV: got.out.shape[2]! };
  const vsRef = R.compareAttention(R.attentionValues(got, queries), ref, { ...shape, queries });
  if (!vsRef.pass) throw new BoundsFailure(`vs reference: ${R.formatAttentionComparison(vsRef)}`, vsRef);
  const vsWasm = R.compareAttention(R.attentionValues(got), { ...R.attentionValues(wasm), mag: magCeiling }, shape);
  if (!vsWasm.pass) throw new Error(`vs wasm (every row; out bound with mag <= max|V| = ${magCeiling.toPrecision(3)}): ${R.formatAttentionComparison(vsWasm)}`);
  return vsRef;
}

/** The cuda backend behind an engine, for the checks of its device-only steps. */
function cudaBackendOf(engine: Engine): CudaBackend {
  const be = engineBackend(engine, CudaBackend);
  if (!be) throw new Error(`the ${engine.backend} backend has no device steps to check`);
  return be;
}

/**
 * The addon's LayerProgram (kept by the cuda backend for a plan that has queued a layer) against
 * arguments the TS side never passes: too few buffers, a buffer of another size, a freed one, no
 * smScale. Each throws SMLA_ADDON_ARGUMENT before any launch or allocation.
 */
function layerProgramRefusals(engine: Engine, plan: ReturnType<typeof createPlan>): void {
  const be = cudaBackendOf(engine);
  const programs = be.layerProgramsOf(plan.resources((engine as SparseMlaEngine).layerSteps()));
  if (programs.length === 0) throw new Error('no layer program kept for the plan');
  const program = programs[0]!;
  const inputs = program.slots.length;
  const tiny = be.alloc(16) as CudaDeviceBuffer;
  const freed = be.alloc(16) as CudaDeviceBuffer;
  freed.free();
  const refused = (what: string, call: () => unknown): void => {
    try {
      call();
    } catch (e) {
      if ((e as { code?: string }).code === 'SMLA_ADDON_ARGUMENT') return;
      throw new Error(`layer program, ${what}: expected SMLA_ADDON_ARGUMENT, got ${(e as Error).message}`);
    }
    throw new Error(`layer program, ${what}: not refused`);
  };
  refused('too few buffers', () => program.run(null, 0.1, tiny.native));
  refused('a buffer of another size', () => program.run(null, 0.1, ...Array.from({ length: inputs }, () => tiny.native)));
  refused('a freed buffer', () => program.run(null, 0.1, ...Array.from({ length: inputs }, () => freed.native)));
  refused('no smScale', () => (program.run as (...a: unknown[]) => unknown)(null, tiny.native, ...Array.from({ length: inputs - 1 }, () => tiny.native)));
  tiny.free();
}

function expectEmptyRows(r: R.AttentionTensors, label: string): void {
  if (!Array.from(r.lse.data).every((v) => v === Infinity)) throw new Error(`${label}: lse not all +inf`);
  if (!Array.from(r.maxLogits.data).every((v) => v === -Infinity)) throw new Error(`${label}: maxLogits not all -inf`);
  if (!Array.from(r.out.data).every((b) => (b & 0x7fff) === 0)) throw new Error(`${label}: out not all 0`);
}

async function filledCache(wasm: Engine, rng: Rng, format: 'v4' | 'v32', geometry: { pageSize: number; numPages: number } | { numTokens: number }, spread = false, values: { std: number; mean: number } = { std: 1, mean: 0 }): Promise<KvCache> {
  const cache = createKvCache(format, geometry);
  const n = cache.pageSize * cache.numPages;
  const dim = rowDimOf(format);
  const rows = randomBf16(rng, [n, dim], values.std, values.mean);
  // spread: every 7th token scaled by 2^±16 so the scales span many exponents (cache-op checks)
  if (spread) for (let t = 0; t < n; t += 7) for (let e = 0; e < dim; e++) rows.data[t * dim + e] = (rows.data[t * dim + e]! + (t % 3 === 0 ? 0x0800 : -0x0800)) & 0xffff;
  await wasm.quantizeKCache({ cache, tokenIds: Array.from({ length: n }, (_, i) => i), rows });
  return cache;
}

/** A judged attention case that failed; carries the verdict for the report. */
class BoundsFailure extends Error {
  constructor(message: string, readonly verdict: R.AttentionComparison) {
    super(message);
  }
}

/** What each section of the grid runs with: the engine checked, the WASM engine beside it, the seeded draws (sections run in a fixed order, so a seed replays), the case runner, and one sparsePrefill judged on both. */
interface CheckSession {
  engine: Engine;
  wasm: Engine;
  rng: Rng;
  run(name: string, fn: () => Promise<void | R.AttentionComparison | R.AttentionComparison[]>, family?: string): Promise<void>;
  judgePrefill(args: SparsePrefillArgs, queries: number[]): Promise<R.AttentionComparison>;
}

/** Per tensor, the verdict with the worst ratio over a case's attention calls (against the reference). */
type CaseVerdict = Record<(typeof R.ATTENTION_TENSORS)[number], R.TensorComparison>;

interface CaseReport {
  name: string;
  family: string;
  pass: boolean;
  seconds: number;
  /** attention cases: per tensor the worst ratio, where, elements over, 1 − cos (out) */
  verdict?: CaseVerdict;
  error?: string;
}

function worstVerdict(list: readonly R.AttentionComparison[]): CaseVerdict {
  const pick = (t: (typeof R.ATTENTION_TENSORS)[number]): R.TensorComparison =>
    list.map((c) => c[t]).reduce((a, b) => (b.worstRatio > a.worstRatio ? b : a));
  return { out: pick('out'), lse: pick('lse'), maxLogits: pick('maxLogits') };
}

function formatVerdict(v: CaseVerdict): string {
  return `out ${R.formatFigure(v.out.worstRatio)} at ${R.formatPosition(v.out.worst?.at)}, lse ${R.formatFigure(v.lse.worstRatio)}, maxLogits ${R.formatFigure(v.maxLogits.worstRatio)}, 1-cos ${R.formatFigure(v.out.cosineGap ?? 0)}`;
}

interface FamilyWorst {
  family: string;
  cases: number;
  out: number;
  outCase: string;
  lse: number;
  maxLogits: number;
  cosineGap: number;
}

/** Per family of attention cases, the worst ratio of each tensor over its cases. */
function familyWorst(cases: readonly CaseReport[]): FamilyWorst[] {
  const byFamily = new Map<string, FamilyWorst>();
  for (const c of cases) {
    const v = c.verdict;
    if (!v) continue;
    const f = byFamily.get(c.family) ?? { family: c.family, cases: 0, out: 0, outCase: '-', lse: 0, maxLogits: 0, cosineGap: 0 };
    f.cases++;
    if (v.out.worstRatio >= f.out) {
      f.out = v.out.worstRatio;
      f.outCase = `${R.formatPosition(v.out.worst?.at)} (${c.name.split(' ').slice(0, 6).join(' ')})`;
    }
    f.lse = Math.max(f.lse, v.lse.worstRatio);
    f.maxLogits = Math.max(f.maxLogits, v.maxLogits.worstRatio);
    f.cosineGap = Math.max(f.cosineGap, v.out.cosineGap ?? 0);
    byFamily.set(c.family, f);
  }
  return [...byFamily.values()];
}

export async function checkCommand(argv: string[]): Promise<number> {
  const { options: o, positionals } = parseArgs(argv, OPTIONS);
  expectNoPositionals('check', positionals);
  const seed = o.seed ?? randomInt(0, 2 ** 32 - 1);
  const rng = makeRng(seed);
  if (o.wide) setReportWidth(Infinity);
  const engine = await createEngine({ backend: o.backend as BackendChoice, ...(o.device !== undefined ? { device: o.device } : {}) });
  let wasm: Engine | undefined;
  try {
    wasm = await createEngine({ backend: 'wasm' });
    // The device cases plan on the host as well: where the host planner cannot be instantiated
    // (an address-space limit such as `ulimit -v`), that is one typed error before the grid, not
    // a failed case per plan.
    if (engine.hasDevice) loadHostPlanner('the device checks');
  } catch (e) {
    await wasm?.dispose();
    await engine.dispose();
    throw e;
  }
  const say = (line: string): void => {
    if (!o.json) console.log(fitLines([line]).join('\n'));
  };
  say(`sparse-mla check: backend ${engine.backend}, seed ${seed} (replay with --seed ${seed})`);
  let passed = 0, failed = 0;
  const cases: CaseReport[] = [];
  const run = async (name: string, fn: () => Promise<void | R.AttentionComparison | R.AttentionComparison[]>, family = 'other'): Promise<void> => {
    if (o.only && !name.includes(o.only)) return;
    const t0 = performance.now();
    try {
      const result = await fn();
      const verdict = result ? worstVerdict(Array.isArray(result) ? result : [result]) : undefined;
      passed++;
      const seconds = (performance.now() - t0) / 1000;
      cases.push({ name, family, pass: true, seconds, ...(verdict ? { verdict } : {}) });
      if (!o.quiet) say(`ok    ${name} (${seconds.toFixed(2)}\u00a0s)${verdict ? ` ${formatVerdict(verdict)}` : ''}`);
    } catch (e) {
      failed++;
      const error = e instanceof Error ? e.message : String(e);
      const verdict = e instanceof BoundsFailure ? worstVerdict([e.verdict]) : undefined;
      cases.push({ name, family, pass: false, seconds: (performance.now() - t0) / 1000, ...(verdict ? { verdict } : {}), error });
      say(`FAIL  ${name}: ${error}`);
    }
  };

  // One sparsePrefill call on the engine and on WASM, judged on `queries` (judgeAttention).
  const judgePrefill = async (args: SparsePrefillArgs, queries: number[]): Promise<R.AttentionComparison> => {
    const [got, w] = [await engine.sparsePrefill(args), await wasm.sparsePrefill(args)];
    return judgeAttention(got, w, R.sparsePrefillReference(args, { queries }), queries, maxAbsV(args.kv.data, args.kv.shape[args.kv.shape.length - 1]!));
  };

  const session: CheckSession = { engine, wasm, rng, run, judgePrefill };
  try {
    await checkPrefillGrid(session);
    await checkPrefillEdges(session);
    await checkPagedGrid(session);
    await checkDequant(session);
    if (engine.hasDevice) await checkDeviceTensors(session);
  } finally {
    await engine.dispose();
    await wasm.dispose();
  }
  const families = familyWorst(cases);
  if (o.json) {
    const report = { command: 'check', ok: failed === 0, backend: engine.backend, seed, passed, failed, bounds: R.describeBounds(), families, cases };
    process.stdout.write(`${JSON.stringify(report, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v), 2)}\n`);
    return failed === 0 ? 0 : 1;
  }
  if (families.length > 0) {
    console.log('');
    console.log('Worst error/bound ratio per case family against the float64 reference (pass <= 1):');
    console.log(
      formatTable(
        [['family', 'cases', 'out', 'at (case)', 'lse', 'maxLogits', 'out 1-cos'], ...families.map((f) => [f.family, String(f.cases), R.formatFigure(f.out), f.outCase, R.formatFigure(f.lse), R.formatFigure(f.maxLogits), R.formatFigure(f.cosineGap)])],
        ['left', 'right', 'right', 'left', 'right', 'right', 'right'],
      ),
    );
    console.log('');
  }
  console.log(`${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

/** The sparse prefill grid (grid.ts, prefillCases), each case judged on its sampled queries. */
async function checkPrefillGrid({ rng, run, judgePrefill }: CheckSession): Promise<void> {
  for (const g of prefillCases()) {
    await run(g.name, async () => {
      const { args, queries } = buildPrefillCase(g, rng);
      return judgePrefill(args, queries);
    }, `prefill ${g.regime}`);
  }
}

/** The sparse prefill edge cases: sQ 0, empty rows, ±inf sinks, rows beyond 65535, logits near 0. */
async function checkPrefillEdges({ engine, rng, run, judgePrefill }: CheckSession): Promise<void> {
  const hQ = 8, dQK = 576, sKV = 300;
  await run('prefill sQ=0 gives empty outputs', async () => {
    const r = await engine.sparsePrefill({ q: randomBf16(rng, [0, hQ, dQK]), kv: randomBf16(rng, [sKV, dQK]), indices: tensor('int32', [0, 64]), smScale: 0.05 });
    if (r.out.data.length !== 0 || r.out.shape.join() !== `0,${hQ},512` || r.lse.shape.join() !== `0,${hQ}`) throw new Error(`shapes ${r.out.shape} / ${r.lse.shape}`);
  });
  await run('prefill empty rows (topk=0, every filler, int64 wide fillers, topkLength 0, sKV=0): lse +inf, maxLogits -inf, out 0 whatever the sink', async () => {
    const sQ = 7;
    const fillers = invalidFillers(sKV);
    const rows = Int32Array.from({ length: sQ * fillers.length }, (_, i) => fillers[i % fillers.length]!);
    const sink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, (_, h) => [0, 3, Infinity, -Infinity][h % 4]!));
    const q = (): Tensor<'bf16'> => randomBf16(rng, [sQ, hQ, dQK]);
    const variants: SparsePrefillArgs[] = [
      { q: q(), kv: randomBf16(rng, [sKV, dQK]), indices: tensor('int32', [sQ, 0]), smScale: 0.05 },
      { q: q(), kv: randomBf16(rng, [sKV, dQK]), indices: tensor('int32', [sQ, fillers.length], rows), smScale: 0.05, attnSink: sink },
      { q: q(), kv: randomBf16(rng, [sKV, dQK]), indices: tensor('int64', [sQ, 4], BigInt64Array.from({ length: sQ * 4 }, (_, i) => [2n ** 32n, 2n ** 32n + 1n, -(2n ** 63n), BigInt(sKV)][i % 4]!)), smScale: 0.05, attnSink: sink },
      { q: q(), kv: randomBf16(rng, [sKV, dQK]), indices: tensor('int32', [sQ, 64], randomIndices(rng, sQ, 64, sKV)), smScale: 0.05, topkLength: tensor('int32', [sQ]), attnSink: sink },
      { q: q(), kv: randomBf16(rng, [0, dQK]), indices: tensor('int32', [sQ, 3], new Int32Array(sQ * 3)), smScale: 0.05 },
    ];
    for (const [i, args] of variants.entries()) expectEmptyRows(await engine.sparsePrefill(args), `variant ${i}`);
  });
  await run('prefill sink -inf changes nothing, +inf gives out 0, sinks never change lse/maxLogits', async () => {
    const sQ = 9, topk = 64;
    const base: SparsePrefillArgs = { q: randomBf16(rng, [sQ, hQ, dQK]), kv: randomBf16(rng, [sKV, dQK]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.2)), smScale: 0.05 };
    const plain = await engine.sparsePrefill(base);
    const neg = await engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(-Infinity)) });
    const pos = await engine.sparsePrefill({ ...base, attnSink: tensor('float32', [hQ], new Float32Array(hQ).fill(Infinity)) });
    sameBits('sink -inf out', neg.out.data, plain.out.data);
    if (!Array.from(pos.out.data).every((b) => (b & 0x7fff) === 0)) throw new Error('sink +inf: out not 0');
    for (const r of [neg, pos]) {
      sameBits('lse', r.lse.data, plain.lse.data);
      sameBits('maxLogits', r.maxLogits.data, plain.maxLogits.data);
    }
  });
  await run('prefill sQ=70000 rows beyond 65535 (hQ=1, topk=16)', async () => {
    const sQ = 70000, topk = 16, d = 512, n = 64;
    const args: SparsePrefillArgs = { q: randomBf16(rng, [sQ, 1, d]), kv: randomBf16(rng, [n, d]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, n, 0.1)), smScale: 0.04 };
    return judgePrefill(args, [0, 1, 65534, 65535, 65536, 69999]);
  }, 'prefill unit');
  for (const d of [576, 512]) {
    // Short rows of unit data: many rows' largest logit (and, with one entry, their lse) lies near
    // 0, where §4's bounds (1e-6 + 2^-15·|ref|) come close to the float32 error of a tensor-core
    // product of d terms (seed 331931022 once failed a row like these).
    await run(`prefill maxLogits and lse near 0: short rows of unit data (dQK=${d}, topkLength 1..4, hQ=64)`, async () => {
      const sQ = 512, hQ = 64, topk = 4, sKV = 300;
      const args: SparsePrefillArgs = {
        q: randomBf16(rng, [sQ, hQ, d]), kv: randomBf16(rng, [sKV, d]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV)),
        smScale: 1 / Math.sqrt(d), topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(1, topk + 1))),
      };
      return judgePrefill(args, Array.from({ length: sQ }, (_, i) => i));
    }, 'prefill unit');
    // Rows of up to 64 entries whose logits are all small (|logit| ~ 0.3): most heads of a query
    // are near 0 together, so the CUDA kernel redoes many rows of one query at once.
    await run(`prefill maxLogits and lse near 0: short rows of small logits (dQK=${d}, topkLength 1..64, hQ=128)`, async () => {
      const sQ = 96, hQ = 128, topk = 64, sKV = 400;
      const args: SparsePrefillArgs = {
        q: randomBf16(rng, [sQ, hQ, d], 0.3), kv: randomBf16(rng, [sKV, d]), indices: tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, sKV, 0.1)),
        smScale: 1 / Math.sqrt(d), topkLength: tensor('int32', [sQ], Int32Array.from({ length: sQ }, () => rng.int(1, topk + 1))),
      };
      return judgePrefill(args, Array.from({ length: sQ }, (_, i) => i));
    }, 'prefill unit');
  }
}

/** The paged FP8 attention grid (grid.ts, pagedCases): main and extra caches, lengths, sinks, non-finite tokens. */
async function checkPagedGrid({ engine, wasm, rng, run }: CheckSession): Promise<void> {
  for (const pc of pagedCases()) {
    await run(pc.name, async () => {
      const v = regimeValues(rng, pc.regime, 512, pc.topk + (pc.extra?.topk ?? 0));
      const kvValues = { std: v.std, mean: v.kvMean };
      const kCache = await filledCache(wasm, rng, 'v4', { pageSize: pc.pageSize, numPages: pc.numPages }, false, kvValues);
      const mainTokens = pc.pageSize * pc.numPages;
      const args: PagedSparseAttentionArgs = {
        q: randomBf16(rng, [pc.n, pc.hQ, 512], v.std, v.qMean),
        kCache,
        indices: tensor('int32', [pc.n, pc.topk], randomIndices(rng, pc.n, pc.topk, mainTokens, 0.1, 0.05, pc.n > 2 ? [1] : [])),
        smScale: v.smScale,
      };
      if (pc.extra) {
        const e = pc.extra;
        args.extraKCache = await filledCache(wasm, rng, 'v4', { pageSize: e.pageSize, numPages: e.numPages }, false, kvValues);
        args.extraIndices = tensor('int32', [pc.n, e.topk], randomIndices(rng, pc.n, e.topk, e.pageSize * e.numPages, 0.1, 0.05));
        if (pc.lengths) args.extraTopkLength = tensor('int32', [pc.n], Int32Array.from({ length: pc.n }, (_, i) => (i === 0 ? 0 : rng.int(0, e.topk + 1))));
      }
      if (pc.lengths) args.topkLength = tensor('int32', [pc.n], Int32Array.from({ length: pc.n }, (_, i) => (i === pc.n - 1 ? pc.topk + 7 : rng.int(0, pc.topk + 1))));
      if (pc.sink) {
        const s = Float32Array.from({ length: pc.hQ }, () => rng.normal() * 2);
        // ±inf sinks on the first and last head (not on a lone head: its out would be all 0)
        if (pc.hQ > 1) {
          s[0] = Infinity;
          s[pc.hQ - 1] = -Infinity;
        }
        args.attnSink = tensor('float32', [pc.hQ], s);
      }
      // the non-finite case: NaN and large-scale bytes poked into the built caches, every row judged
      const plan = pc.nonFinite ? pokeNonFiniteTokens(args, rng) : null;
      const queries = plan ? Array.from({ length: pc.n }, (_, i) => i) : sampleRows(rng, pc.n, Math.min(pc.n, 8));
      const ref = R.pagedSparseAttentionReference(args, { queries });
      if (plan) expectNonFinitePlan(plan, ref, queries, pc.hQ, 512);
      const [got, w] = [await engine.pagedSparseAttention(args), await wasm.pagedSparseAttention(args)];
      const caches = args.extraKCache ? [kCache, args.extraKCache] : [kCache];
      return judgeAttention(got, w, ref, queries, cachesMaxAbsV(caches));
    }, `paged ${pc.regime}`);
  }
}

/** Dequant, bit-exact against WASM and the reference; an id outside the cache refused. */
async function checkDequant({ engine, wasm, rng, run }: CheckSession): Promise<void> {
  for (const [format, geometry] of [['v4', { pageSize: 64, numPages: 9 }], ['v4', { pageSize: 2, numPages: 300 }], ['v32', { numTokens: 700 }]] as const) {
    await run(`dequant ${format} ${JSON.stringify(geometry)} bit-exact (duplicates, n=1000)`, async () => {
      const cache = await filledCache(wasm, rng, format, geometry, true);
      const tokens = cache.pageSize * cache.numPages;
      const ids = tensor('int32', [1000], Int32Array.from({ length: 1000 }, (_, i) => (i % 10 === 9 ? 0 : rng.int(0, tokens))));
      const got = await engine.dequantizeKCachePaged({ cache, tokenIds: ids });
      const w = await wasm.dequantizeKCachePaged({ cache, tokenIds: ids });
      sameBits('vs wasm', got.data, w.data);
      const ref = R.dequantizeKCacheReference(cache, ids);
      for (let i = 0; i < ref.length; i++) {
        const v = R.decodeBf16(got.data[i]!);
        if (!(v === ref[i] || (Number.isNaN(v) && Number.isNaN(ref[i]!)))) throw new Error(`vs reference: element ${i}: ${v} vs ${ref[i]}`);
      }
    });
  }
  await run('dequant: an id outside the cache is refused before any work', async () => {
    const cache = createKvCache('v4', { pageSize: 4, numPages: 2 });
    try {
      await engine.dequantizeKCachePaged({ cache, tokenIds: [0, 8] });
    } catch (e) {
      if (e instanceof SparseMlaError && e.code === 'OUT_OF_RANGE') return;
      throw e;
    }
    throw new Error('no error');
  });
}

/** The cuda engine's device tensors: device inputs and outputs, the planner's kernels, device token ids, layers on the device. */
async function checkDeviceTensors({ engine, wasm, rng, run, judgePrefill }: CheckSession): Promise<void> {
  await run('device: upload → prefill (device in, device out) → download equals the host path bit for bit, each output whole while another is freed; dequant workspace stays on the device', async () => {
    const cache = await filledCache(wasm, rng, 'v4', { pageSize: 64, numPages: 8 });
    const sQ = 100, hQ2 = 64, topk = 128, n = 400;
    const ids = Int32Array.from({ length: n }, () => rng.int(0, 512));
    const dCache = await engine.uploadKvCache(cache);
    const kvDev = await engine.dequantizeKCachePaged({ cache: dCache, tokenIds: tensor('int32', [n], ids) }, { output: 'device' });
    const kvHost = await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [n], ids) });
    sameBits('workspace', (await engine.download(kvDev)).data, kvHost.data);
    const q = randomBf16(rng, [sQ, hQ2, 512]);
    const indices = tensor('int32', [sQ, topk], randomIndices(rng, sQ, topk, n, 0.1, 0.05));
    const sink = tensor('float32', [hQ2], Float32Array.from({ length: hQ2 }, () => rng.normal()));
    const lens = tensor('int32', [sQ], Int32Array.from({ length: sQ }, (_, i) => (i === 0 ? -5 : i === 1 ? topk + 9 : rng.int(0, topk + 1))));
    const hostLens = tensor('int32', [sQ], lens.data.map((v) => Math.min(Math.max(v, 0), topk)));
    const host = await engine.sparsePrefill({ q, kv: kvHost, indices, attnSink: sink, topkLength: hostLens, smScale: 0.05 });
    const [qd, idxd, sinkd, lensd] = await Promise.all([engine.upload(q), engine.upload(indices), engine.upload(sink), engine.upload(lens)]);
    const dev = await engine.sparsePrefill({ q: qd, kv: kvDev, indices: idxd, attnSink: sinkd, topkLength: lensd, smScale: 0.05 }, { output: 'device' });
    if (dev.out.data.device !== 'cuda') throw new Error('output not on the device');
    // the three outputs share one allocation: each stays whole while another is freed, and a
    // later call gets outputs of its own
    sameBits('out', (await engine.download(dev.out)).data, host.out.data);
    dev.out.data.free();
    const again = await engine.sparsePrefill({ q: qd, kv: kvDev, indices: idxd, attnSink: sinkd, topkLength: lensd, smScale: 0.05 }, { output: 'device' });
    sameBits('lse (out freed)', (await engine.download(dev.lse)).data, host.lse.data);
    sameBits('maxLogits (out freed)', (await engine.download(dev.maxLogits)).data, host.maxLogits.data);
    sameBits('out of a second call', (await engine.download(again.out)).data, host.out.data);
    for (const t of [again.out, again.lse, again.maxLogits]) t.data.free();
    const mixed = await engine.sparsePrefill({ q, kv: kvDev, indices, attnSink: sink, topkLength: hostLens, smScale: 0.05 });
    sameBits('mixed host/device inputs, host out', mixed.out.data, host.out.data);
    for (const t of [qd, idxd, sinkd, lensd, kvDev, dev.lse, dev.maxLogits]) t.data.free();
    dCache.data.free();
    try {
      await engine.download(qd);
      throw new Error('download of a freed buffer did not throw');
    } catch (e) {
      if (!(e instanceof SparseMlaError && e.code === 'INVALID_VALUE')) throw e;
    }
  });
  await run('planner rows on the GPU (planner.h per-row functions in a kernel) equal the host planner bit for bit: c4 (drops, padding; the dropped counts per query and their device sum), c0, c128, host and device outputs; compressed flat token ids c4 / c128 (empty requests, seqLen < ratio, host and device page tables); 6 requests (the kernels\' inline request table) and 80 (uploaded), widths 640 and 643', async () => {
    const be = cudaBackendOf(engine);
    const host = loadHostPlanner('check');
    const window = 128, topk = 512;
    const readTotal = async (x: BigInt64Array | import('../../types.js').DeviceBuffer | null): Promise<BigInt64Array> => {
      if (x === null) throw new Error('the dropped total asked for was not built');
      if (x instanceof BigInt64Array) return x;
      const t = new BigInt64Array(1);
      await be.download(x, t);
      x.free();
      return t;
    };
    const dl = async (x: Int32Array | import('../../types.js').DeviceBuffer | null, n: number): Promise<Int32Array> => {
      if (x === null) throw new Error('an output asked for was not built');
      if (x instanceof Int32Array) return x;
      const t = await engine.download({ dtype: 'int32', shape: [n], data: x });
      x.free();
      return t.data;
    };
    const rowsOf = async (label: string, seqLens: Int32Array, extendLens: Int32Array, width: number): Promise<void> => {
      const nq = extendLens.reduce((x, y) => x + y, 0);
      const requests = Array.from(seqLens, (seqLen, r) => ({ seqLen, extendLen: extendLens[r]! }));
      const topkIdx = indexerTopk(rng, requests, topk, { holes: 0.2, late: 1, duplicates: 0.05 }).indices.data;
      const want = host.combineTopk(seqLens, extendLens, window, 4, topkIdx, topk, width);
      for (const placement of ['host', 'device'] as const) {
        const idx = placement === 'device' ? (await engine.upload(tensor('int32', [nq, topk], topkIdx))).data : topkIdx;
        const got = await be.planRows({ seqLens, extendLens, window, ratio: 4, topkIndices: idx, topk, width }, placement, placement, placement);
        sameBits(`${label}: c4 rows (${placement})`, await dl(got.rows, nq * width), want.rows);
        sameBits(`${label}: c4 lens (${placement})`, await dl(got.lens, nq), want.lens);
        sameBits(`${label}: c4 dropped (${placement})`, await dl(got.dropped, nq), want.dropped);
        const total = await readTotal(got.droppedTotal);
        if (want.droppedTotal === 0 || Number(total[0]) !== want.droppedTotal) throw new Error(`${label}: c4 dropped total (${placement}): ${total[0]} vs host ${want.droppedTotal} (the case must drop some)`);
        if (!(idx instanceof Int32Array)) idx.free();
      }
      const longest = Math.max(...Array.from(seqLens, (s, r) => (extendLens[r]! > 0 ? s : 0)));
      for (const [ratio, w] of [[0, combinedWidth(0, 0, 0, window, 128)], [128, combinedWidth(128, 0, Math.floor(longest / 128), window, 128)]] as const) {
        const d = host.denseRows(seqLens, extendLens, window, ratio, w);
        const got = await be.planRows({ seqLens, extendLens, window, ratio, topkIndices: null, topk: 0, width: w }, 'host', 'host', 'device');
        sameBits(`${label}: c${ratio} rows`, got.rows as Int32Array, d.rows);
        sameBits(`${label}: c${ratio} lens`, got.lens as Int32Array, d.lens);
        const total = await readTotal(got.droppedTotal);
        if (total[0] !== 0n || (got.dropped as Int32Array).some((x) => x !== 0)) throw new Error(`${label}: c${ratio}: dense rows dropped something`);
      }
    };
    // Compressed flat token ids (planCompressedTokenIds, compressed_token_id per entry) against
    // the host planner's: page tables host and device, outputs host and device.
    const idsOf = async (label: string, cSeq: Int32Array, cExt: Int32Array): Promise<void> => {
      for (const [ratio, pageSize] of [[4, 64], [128, 2]] as const) {
        const offsets = new Float64Array(cSeq.length + 1);
        const tables: number[] = [];
        let total = 0;
        for (let r = 0; r < cSeq.length; r++) {
          const v = requestVisible(cSeq[r]!, cExt[r]!, ratio);
          total += v;
          const need = Math.ceil(v / pageSize) + (r % 2); // a spare page now and then: only the used ones are read
          for (let p = 0; p < need; p++) tables.push(rng.int(0, 100000));
          offsets[r + 1] = offsets[r]! + need;
        }
        const flat = Int32Array.from(tables);
        const want = host.compressedTokenIds(cSeq, cExt, ratio, flat, offsets, pageSize, total);
        if (want.length !== total) throw new Error(`${label}: c${ratio} host ids: ${want.length} entries, expected ${total}`);
        for (const placement of ['host', 'device'] as const) {
          const pt = placement === 'device' ? (await engine.upload(tensor('int32', [flat.length], flat))).data : flat;
          const got = await be.planCompressedTokenIds({ seqLens: cSeq, extendLens: cExt, ratio, pageTables: pt, pageTableOffsets: offsets, pageSize }, placement);
          let ids: BigInt64Array;
          if (got instanceof BigInt64Array) ids = got;
          else {
            ids = (await engine.download({ dtype: 'int64', shape: [total], data: got })).data as BigInt64Array;
            got.free();
          }
          if (!(pt instanceof Int32Array)) pt.free();
          if (ids.length !== want.length) throw new Error(`${label}: c${ratio} ids (${placement}): lengths ${ids.length} vs ${want.length}`);
          for (let i = 0; i < ids.length; i++) {
            if (ids[i] !== want[i]) throw new Error(`${label}: c${ratio} ids (${placement}): element ${i} differs (${ids[i]} vs ${want[i]})`);
          }
        }
      }
    };
    await rowsOf('6 requests', Int32Array.from([700, 129, 5000, 0, 2000, 77]), Int32Array.from([300, 129, 1, 0, 777, 77]), 640);
    await idsOf('7 requests', Int32Array.from([700, 0, 3, 5000, 77, 2000, 129]), Int32Array.from([300, 0, 3, 1, 77, 777, 0]));
    // more requests than the kernels take in their parameters: the table is uploaded; empty
    // requests, seqLen < ratio and an odd row width among them
    const manySeq = Int32Array.from({ length: 80 }, (_, r) => (r % 13 === 5 ? 0 : r % 7 === 3 ? rng.int(1, 4) : rng.int(1, 3000)));
    const manyExt = Int32Array.from(manySeq, (s, r) => (r % 11 === 2 ? 0 : Math.min(s, rng.int(1, 120))));
    await rowsOf('80 requests', manySeq, manyExt, topk + window + 3);
    await idsOf('80 requests', manySeq, manyExt);
  });
  await run('dequantize with device token ids (int64, uploaded once) into a workspace region equals the host-id path bit for bit; an id outside the cache gives a zero row (never read) and the device stays usable', async () => {
    const be = cudaBackendOf(engine);
    const cache = await filledCache(wasm, rng, 'v4', { pageSize: 64, numPages: 8 });
    const n = 300, off = 7;
    const ids = Int32Array.from({ length: n }, () => rng.int(0, 512));
    const dCache = await engine.uploadKvCache(cache);
    const idsDev = await be.upload(BigInt64Array.from(ids, (v) => BigInt(v)));
    const ws = be.alloc((n + off) * 512 * 2);
    await be.dequantizeKCacheIdsInto(dCache, idsDev, n, ws, off);
    const got = new Uint16Array((n + off) * 512);
    await engine.download({ dtype: 'bf16', shape: [n + off, 512], data: ws }).then((t) => got.set(t.data));
    const want = await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [n], ids) });
    sameBits('device-id rows', got.subarray(off * 512), want.data);
    // device ids are the caller's (a plan checks them once): one outside the cache gives a
    // zero row, never a read, and the others are right
    const bad = await be.upload(BigInt64Array.from([3n, 512n, 1n]));
    await be.dequantizeKCacheIdsInto(dCache, bad, 3, ws, 0);
    const three = (await engine.download({ dtype: 'bf16', shape: [n + off, 512], data: ws })).data.subarray(0, 3 * 512);
    const hostTwo = await engine.dequantizeKCachePaged({ cache, tokenIds: tensor('int32', [2], Int32Array.from([3, 1])) });
    sameBits('row of id 3', three.subarray(0, 512), hostTwo.data.subarray(0, 512));
    sameBits('row of id 512 (outside: zeros)', three.subarray(512, 1024), new Uint16Array(512));
    sameBits('row of id 1', three.subarray(1024), hostTwo.data.subarray(512));
    await be.dequantizeKCacheIdsInto(dCache, idsDev, n, ws, off);
    await engine.download({ dtype: 'bf16', shape: [n + off, 512], data: ws }).then((t) => sameBits('after the error', t.data.subarray(off * 512), want.data));
    for (const b of [idsDev, ws, bad, dCache.data]) b.free();
  });
  /**
   * One layer of a chunk through prefillLayer on the device (device q, caches, top-k; device out)
   * and on WASM from the host, both down `path`; the device result judged against the host's and
   * the float64 reference. `onDevice` looks at the device result before its download.
   */
  const deviceLayer = async (o: { sc: ChunkScenario; planDev: Plan; planHost: Plan; layer: number; ratio: CompressRatio; hQ: number; topk: number; queries: number[]; attnSink: Tensor<'float32'>; sink: Tensor<'float32'> | DeviceTensor<'float32'>; path: 'sparse' | 'paged'; onDevice?: (label: string) => void; droppedLater?: boolean }): Promise<R.AttentionComparison> => {
    const { sc, ratio, path } = o;
    const label = `layer ${o.layer} (c${ratio}${path === 'paged' ? ', paged' : ''})`;
    const smScale = 1 / Math.sqrt(512);
    const swa = await filledCache(wasm, rng, 'v4', { pageSize: sc.swaPageSize, numPages: sc.swaPages });
    const comp = ratio === 0 ? undefined : await filledCache(wasm, rng, 'v4', ratio === 4 ? { pageSize: sc.c4PageSize, numPages: sc.c4Pages } : { pageSize: sc.c128PageSize, numPages: sc.c128Pages });
    const key = ratio === 4 ? 'c4' : 'c128';
    const caches = { swa, ...(comp ? { [key]: comp } : {}) };
    const q = randomBf16(rng, [sc.numQueries, o.hQ, 512]);
    const topkIndices = ratio === 4 ? indexerTopk(rng, sc.requests, o.topk).indices : undefined;
    const [qd, swad, compd, topkd] = await Promise.all([engine.upload(q), engine.uploadKvCache(swa), comp ? engine.uploadKvCache(comp) : undefined, topkIndices ? engine.upload(topkIndices) : undefined]);
    try {
      const dev = await prefillLayer(
        engine,
        { plan: o.planDev, compressRatio: ratio, q: qd, caches: { swa: swad, ...(compd ? { [key]: compd } : {}) }, ...(topkd ? { topkIndices: topkd } : {}), attnSink: o.sink, smScale, path },
        o.droppedLater ? { output: 'device', dropped: 'later' } : { output: 'device' },
      );
      try {
        if (dev.out.data.device !== 'cuda') throw new Error(`${label}: out not on the device`);
        if (o.droppedLater && ratio === 4 && dev.dropped !== null) throw new Error(`${label}: dropped ${dev.dropped} with { dropped: 'later' }, expected null (read later)`);
        o.onDevice?.(label);
        const got = { out: await engine.download(dev.out), lse: await engine.download(dev.lse), maxLogits: await engine.download(dev.maxLogits) };
        const host = await prefillLayer(wasm, { plan: o.planHost, compressRatio: ratio, q, caches, ...(topkIndices ? { topkIndices } : {}), attnSink: o.attnSink, smScale, path });
        const devDropped = dev.dropped ?? host.dropped; // (null: read later, checked through the plan)
        if (devDropped !== host.dropped) throw new Error(`${label}: dropped ${dev.dropped} vs host ${host.dropped}`);
        const ref = R.prefillLayerReference({ chunk: sc.ref, compressRatio: ratio, q, caches, ...(topkIndices ? { topkIndices } : {}), attnSink: o.attnSink, smScale }, { queries: o.queries });
        if (ref.dropped > devDropped) throw new Error(`${label}: dropped ${dev.dropped} < reference ${ref.dropped} on a sample`);
        try {
          return judgeAttention(got, host, ref, o.queries, cachesMaxAbsV(comp ? [swa, comp] : [swa]));
        } catch (e) {
          if (e instanceof BoundsFailure) throw new BoundsFailure(`${label}: ${e.message}`, e.verdict);
          throw new Error(`${label}: ${(e as Error).message}`);
        }
      } finally {
        for (const t of [dev.out, dev.lse, dev.maxLogits]) t.data.free();
      }
    } finally {
      for (const t of [qd, topkd]) t?.data.free();
      swad.data.free();
      compd?.data.free();
    }
  };
  /** The device layer cases' chunk (six requests, one without queries), its two plans, sampled queries and sink (host and device). */
  const layerChunk = async (lastExtend: number, hQ: number) => {
    const sc = chunkScenario(rng, [[700, 300], [129, 129], [1300, 1], [0, 0], [2000, lastExtend], [77, 77]].map(([seqLen, extendLen]) => ({ seqLen: seqLen!, extendLen: extendLen! })));
    const attnSink = tensor('float32', [hQ], Float32Array.from({ length: hQ }, () => rng.normal()));
    return { sc, hQ, planDev: createPlan(sc.chunk), planHost: createPlan(sc.chunk), queries: sampleRows(rng, sc.numQueries, 24), attnSink, sinkDev: await engine.upload(attnSink) };
  };
  await run('prefillLayer on the device: a multi-request chunk through layers c0, c4, c128, c4, c0, c128, c4 (device q, caches, top-k; a host sink in layers 0-2, a device sink after; device out; layers 3-6 queued by a layer program, which refuses bad buffers before any launch) equals the WASM host path and the float64 reference', async () => {
    const { sc, hQ, planDev, planHost, queries, attnSink, sinkDev } = await layerChunk(400, 16);
    const verdicts: R.AttentionComparison[] = [];
    for (const [layer, ratio] of ([0, 4, 128, 4, 0, 128, 4] as const).entries()) {
      verdicts.push(
        await deviceLayer({
          sc, planDev, planHost, layer, ratio, hQ, topk: 256, queries, attnSink, sink: layer < 3 ? attnSink : sinkDev, path: 'sparse',
          onDevice: (label) => {
            if (planDev.deviceStats.deviceQueuedLayers !== Math.max(0, layer - 2)) throw new Error(`${label}: ${planDev.deviceStats.deviceQueuedLayers} layers queued by one call so far, expected ${Math.max(0, layer - 2)}`);
            // the addon's layer program refuses, before any launch, what the TS side never passes; the
            // layers after this one show the engine and the program still work
            if (layer === 3) layerProgramRefusals(engine, planDev);
          },
        }),
      );
    }
    sinkDev.data.free();
    const d = planDev.deviceStats;
    // c0 / c128 rows built on the GPU once each (no host build, no row upload); the compressed
    // ids (c4, c128) built on the GPU once each, the SWA ids uploaded once, across the seven
    // layers; c4 combined per layer into one set of row buffers.
    if (d.deviceUploads !== 1 || d.deviceCompressedIdBuilds !== 2 || d.deviceC0Builds !== 1 || d.deviceC128Builds !== 1 || d.deviceC4Combines !== 3 || d.deviceWorkspaceAllocations !== 1 || d.deviceC4RowAllocations !== 1) {
      throw new Error(`deviceStats ${JSON.stringify(d)}: expected 1 id upload (SWA), 2 GPU compressed id builds (c4, c128), 1 GPU c0 build, 1 GPU c128 build, 3 GPU c4 combines, 1 workspace, 1 set of c4 row buffers`);
    }
    if (planDev.stats.c4Combines !== 3 || planDev.stats.c0Builds !== 0 || planDev.stats.c128Builds !== 0 || planDev.stats.c4Dropped !== planHost.stats.c4Dropped) {
      throw new Error(`stats ${JSON.stringify(planDev.stats)} vs host ${JSON.stringify(planHost.stats)}`);
    }
    return verdicts;
  }, 'layer');
  await run("prefillLayer on the device with { dropped: 'later' }: layers c4, c0, c4, c4, c4 resolve without their dropped counts (null; layers 2-4 queued by a layer program), plan.settleDropped() gives the host path's total, and the outputs equal the WASM host path and the float64 reference", async () => {
    const { sc, hQ, planDev, planHost, queries, attnSink, sinkDev } = await layerChunk(400, 16);
    const verdicts: R.AttentionComparison[] = [];
    for (const [layer, ratio] of ([4, 0, 4, 4, 4] as const).entries()) {
      verdicts.push(await deviceLayer({ sc, planDev, planHost, layer, ratio, hQ, topk: 256, queries, attnSink, sink: sinkDev, path: 'sparse', droppedLater: true }));
    }
    sinkDev.data.free();
    const total = await planDev.settleDropped();
    if (total !== planHost.stats.c4Dropped || planDev.stats.c4Dropped !== total) throw new Error(`settleDropped ${total} (stats ${planDev.stats.c4Dropped}) vs the host path's ${planHost.stats.c4Dropped}`);
    if (planDev.deviceStats.deviceQueuedLayers !== 3) throw new Error(`${planDev.deviceStats.deviceQueuedLayers} layers queued by one call, expected 3`);
    return verdicts;
  }, 'layer');
  await run('prefillLayer on the device down the paged path: layers c0, c128, c4, c0, c128 (device q, caches, top-k, sink; device out; the c0 / c128 paged form placed on the device once per ratio, a c4 layer combining its downloaded top-k on the host) equals the WASM host path and the float64 reference', async () => {
    const { sc, hQ, planDev, planHost, queries, attnSink, sinkDev } = await layerChunk(40, 64);
    const verdicts: R.AttentionComparison[] = [];
    for (const [layer, ratio] of ([0, 128, 4, 0, 128] as const).entries()) {
      verdicts.push(await deviceLayer({ sc, planDev, planHost, layer, ratio, hQ, topk: 256, queries, attnSink, sink: sinkDev, path: 'paged' }));
    }
    sinkDev.data.free();
    // the c0 and c128 forms uploaded once each across their two layers; nothing of the workspace path
    const d = planDev.deviceStats;
    if (d.deviceUploads !== 2 || d.deviceWorkspaceAllocations !== 0 || d.deviceQueuedLayers !== 0 || planDev.stats.pagedMainBuilds !== 1) {
      throw new Error(`deviceStats ${JSON.stringify(d)}, pagedMainBuilds ${planDev.stats.pagedMainBuilds}: expected 2 uploads (the c0 and c128 paged forms), no workspace, one paged main build`);
    }
    return verdicts;
  }, 'layer');
  await run('device: a failed allocation is a typed error and the device stays usable', async () => {
    const dev = cudaBackendOf(engine);
    try {
      dev.alloc(2 ** 52);
      throw new Error('no error for a 4 PiB allocation');
    } catch (e) {
      if (!(e instanceof SparseMlaError)) throw e;
    }
    const args: SparsePrefillArgs = { q: randomBf16(rng, [5, 16, 512]), kv: randomBf16(rng, [50, 512]), indices: tensor('int32', [5, 32], randomIndices(rng, 5, 32, 50)), smScale: 0.05 };
    return judgePrefill(args, [0, 1, 2, 3, 4]);
  }, 'prefill unit');
}

export const command: CliCommand = {
  name: 'check',
  summary: 'run the correctness grid on a backend against the float64 reference and WASM',
  usage: USAGE,
  options: OPTIONS,
  run: checkCommand,
};
