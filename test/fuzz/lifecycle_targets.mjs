/**
 * planLifecycle (session 56, from seed LIFECYCLE_FROM_SEED, host engines): one plan through a sequence
 * of 2-5 steps: a layer on the case's engine or on a second host engine of the other kind (made for the
 * case, disposed after it), both at once, `plan.release()` before a layer, while one runs (at once,
 * after a microtask or a timer) or twice, the plan's rows asked again after a release
 * (`combinedRows` / `combineC4`), `plan.settleDropped()`. A plan is its engines' to share and is
 * usable after a release (Plan's doc: release drops what it kept, a later layer builds it again), so
 * every step is valid: every layer is judged against the float64 layer reference (judgeLayer), every
 * other step must resolve, and the rows asked again must equal the first ones.
 */
import { createEngine, createPlan, prefillLayer } from '../../dist/index.js';
import { judgeLayer, layerScenario } from './targets.mjs';

/** The first seed that draws planLifecycle. */
export const LIFECYCLE_FROM_SEED = 175;

const settle = async (f) => {
  try {
    return { value: await f() };
  } catch (error) {
    return { error };
  }
};

const errText = (e) => (e instanceof Error ? `${e.name}${e.code ? ` ${e.code}` : ''}: ${String(e.message).slice(0, 200)}` : `a thrown ${typeof e}`);

/** A plan's rows of `ratio` as plain numbers (to compare two askings). */
function rowsOf(plan, ratio, topk) {
  const r = ratio === 4 ? plan.combineC4(topk) : plan.combinedRows(ratio);
  return JSON.stringify([Array.from(r.indices.data), Array.from(r.lengths.data), r.indices.shape]);
}

const planLifecycle = {
  name: 'planLifecycle',
  fromSeed: LIFECYCLE_FROM_SEED,
  engine: true,
  hostEngineOnly: true,
  build(rng, env, hooks) {
    const ratio = rng.pick([0, 4, 128]);
    const { sc, layer, window } = layerScenario(rng, hooks, ratio);
    const withCaches = rng.uniform() < 0.3;
    const STEPS = ['layer', 'layer', 'otherLayer', 'release', 'releaseDuring', 'releaseAfterMicrotask', 'releaseAfterTimer', 'both', 'releaseTwice', 'rowsAgain', 'settleDropped'];
    const steps = Array.from({ length: rng.int(2, 6) }, () => ({ kind: rng.pick(STEPS), path: rng.pick([undefined, 'sparse', 'paged']), dropped: rng.pick([undefined, 'await']), ms: rng.int(0, 4) }));
    // the other engine: the other host kind (a wasm engine of 1-2 workers for a cpu case; a cpu one, else wasm, for a wasm case)
    const otherBackend = env.backend === 'cpu' ? 'wasm' : rng.pick(['cpu', 'wasm']);
    const otherWorkers = rng.int(1, 3);
    let plan;
    return {
      args: [],
      describe: `c${ratio} plan${withCaches ? ' (with caches)' : ''}, ${sc.numQueries} queries; other engine ${otherBackend}; ${steps.map((s) => `${s.kind}${s.path ? `(${s.path})` : ''}${s.dropped ? `[dropped ${s.dropped}]` : ''}`).join(', ')}`,
      prepare: () => {
        plan = createPlan(sc.chunk, { window, ...(withCaches ? { caches: layer.caches } : {}) });
        hooks.plans.push(plan);
      },
      call: async () => {
        let other = await settle(() => createEngine({ backend: otherBackend, workers: otherWorkers }));
        // (no cpu addon here: the other engine is a wasm one)
        if (other.error) other = await settle(() => createEngine({ backend: 'wasm', workers: otherWorkers }));
        if (other.error) throw other.error;
        const engines = { own: env.engine, other: other.value };
        const out = [];
        const layerOn = (which, s) => prefillLayer(engines[which], { ...layer, plan, ...(s.path ? { path: s.path } : {}) }, s.dropped ? { dropped: s.dropped } : undefined);
        let firstRows = null;
        try {
          for (const [i, s] of steps.entries()) {
            const label = `step ${i + 1} ${s.kind}`;
            if (s.kind === 'layer') out.push({ label, layer: await settle(() => layerOn('own', s)) });
            else if (s.kind === 'otherLayer') out.push({ label, layer: await settle(() => layerOn('other', s)) });
            else if (s.kind === 'both') {
              const [a, b] = await Promise.all([settle(() => layerOn('own', s)), settle(() => layerOn('other', s))]);
              out.push({ label: `${label} (own)`, layer: a }, { label: `${label} (other)`, layer: b });
            } else if (s.kind === 'release') out.push({ label, other: await settle(() => plan.release()) });
            else if (s.kind === 'releaseTwice') out.push({ label, other: await settle(() => (plan.release(), plan.release())) });
            else if (s.kind.startsWith('release')) {
              const p = settle(() => layerOn(rng.uniform() < 0.5 ? 'own' : 'other', s));
              if (s.kind === 'releaseDuring') plan.release();
              else if (s.kind === 'releaseAfterMicrotask') queueMicrotask(() => plan.release());
              else setTimeout(() => plan.release(), s.ms);
              out.push({ label, layer: await p });
            } else if (s.kind === 'rowsAgain') {
              const r = await settle(() => rowsOf(plan, ratio, layer.topkIndices));
              if (r.value !== undefined && firstRows === null) firstRows = r.value;
              out.push({ label, rows: r, first: firstRows });
            } else out.push({ label, other: await settle(() => plan.settleDropped()) });
          }
        } finally {
          await engines.other.dispose();
        }
        return out;
      },
      judge: (out) => {
        for (const r of out) {
          if (r.layer) {
            if (r.layer.error) return `${r.label}: the layer rejected: ${errText(r.layer.error)}`;
            const p = judgeLayer(r.layer.value, sc, layer);
            if (p) return `${r.label}: ${p}`;
          } else if (r.rows) {
            if (r.rows.error) return `${r.label}: the rows asked again threw ${errText(r.rows.error)}`;
            if (r.first !== null && r.rows.value !== r.first) return `${r.label}: the rows asked again differ from the first ones`;
          } else if (r.other?.error) return `${r.label}: ${errText(r.other.error)}`;
        }
        return null;
      },
    };
  },
};

/** The targets of this file, with their weights (fuzz.mjs draws them with the session-53 ones). */
export const LIFECYCLE_TARGETS = [[planLifecycle, 1]];
