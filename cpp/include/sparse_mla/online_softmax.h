// Per-row online softmax of SPEC §4 (one query, one head), shared by the CPU core and the CUDA
// kernels. A row keeps a running max m and a running sum l = Σ exp(P_k − m) over the entries seen
// so far, plus an output accumulator acc = Σ exp(P_k − m) · v_k that the caller owns. Each new
// block of logits moves m up, rescales l and acc by exp(m_old − m_new), and adds its own terms.
//
// Non-finite values follow the math: a NaN logit makes the row NaN; all-(−inf) logits give
// lse = −inf; a +inf logit gives lse = maxLogits = +inf and a NaN output.
#pragma once
#include <math.h>
#include <stdint.h>

#include "config.h"

namespace smla {

// max that propagates NaN from either side (fmaxf would drop it).
SMLA_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Exponent base used for the terms of a row whose running max is m. When every logit so far is
// −inf, subtracting m would give exp(−inf − (−inf)) = NaN; base 0 makes those terms exactly 0.
SMLA_HD float softmax_exp_base(float m) { return m == -INFINITY ? 0.0f : m; }

// Factor that moves l and acc from running max m_old to m_new (m_new = nan_max(m_old, ...)).
// Before any entry m_old = −inf and this is 0 (or exp(−inf − 0) = 0 with the −inf guard).
SMLA_HD float softmax_rescale(float m_old, float m_new) {
  return expf(m_old - softmax_exp_base(m_new));
}

// Running state of one (query, head) row.
struct SoftmaxRow {
  float m;  // running max of the logits (natural units), −inf before the first entry
  float l;  // Σ exp(P_k − softmax_exp_base(m))
};

SMLA_HD SoftmaxRow softmax_row_init() { return SoftmaxRow{-INFINITY, 0.0f}; }

// The row after one more logit (no output accumulator: the CUDA kernels' exact max / lse redo).
SMLA_HD void softmax_row_add(SoftmaxRow& row, float logit) {
  const float m_new = nan_max(row.m, logit);
  row.l = row.l * softmax_rescale(row.m, m_new) + expf(logit - softmax_exp_base(m_new));
  row.m = m_new;
}

// Final values of a row: out = acc · out_scale, plus lse and maxLogits.
struct SoftmaxResult {
  float out_scale;
  float lse;
  float max_logit;
};

// any_valid: whether the row had at least one valid entry. has_sink/sink: the head's attention
// sink (same units as the logits). lse' = ln(exp(lse) + exp(sink)) enters only out_scale:
// out_scale = exp(base − lse') = 1 / (l + exp(sink − base)).
SMLA_HD SoftmaxResult softmax_finalize(SoftmaxRow row, bool any_valid, bool has_sink, float sink) {
  SoftmaxResult r;
  if (!any_valid) {
    r.out_scale = 0.0f;
    r.lse = INFINITY;
    r.max_logit = -INFINITY;
    return r;
  }
  const float base = softmax_exp_base(row.m);
  r.max_logit = row.m;
  // m = +inf: l is NaN (exp(inf − inf)) but ln Σ exp(P) is +inf by the math.
  r.lse = row.m == INFINITY ? INFINITY : base + logf(row.l);
  const float denom = has_sink ? row.l + expf(sink - base) : row.l;
  r.out_scale = 1.0f / denom;
  return r;
}

}  // namespace smla
