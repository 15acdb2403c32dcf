// Native check of the C++ core (every op of the C ABI), independently of the core: formats are
// decoded from their bit definitions and rounding is done on the real line in double, so the cache
// ops are checked bit for bit against a reference written here. Attention is checked for what has
// an exact answer: ±inf / NaN placement against a textbook float64 loop, and the core's own
// consistency bit for bit (invalid entries skipped, sinks, a single entry, paged = prefill over the
// dequantized rows). The accuracy of attention values is judged by the one definition of SPEC §4's
// bounds (src/reference/compare.ts), which the `cpu` test project runs on this same core.
// Random inputs plus SPEC's edge cases. Exit status 0 = all checks pass.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "core_calls.h"
#include "sparse_mla/sparse_mla.h"
// the scalar per-element dequant (SMLA_HD: the CUDA check's reference too) is checked directly
#include "sparse_mla/kv_cache_layout.h"
// the float32 row dequant of paged attention has no op of its own: called directly
#include "../../cpp/src/kv_cache_rows.h"
// the softmax's vector exp (where the target has one) is checked directly
#include "../../cpp/src/simd.h"
// ... and against its per-ISA forms as written before it became one generic body
#include "exp_frozen.h"
// the SIMD path the core's calls take (the addon's build.simd)
#include "../../cpp/src/isa_dispatch.h"

namespace {

int g_failures = 0;
int g_checks = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// ---------------------------------------------------------------- formats, from SPEC §2
double bf16_value(uint16_t h) {
  const int e = (h >> 7) & 0xff, m = h & 0x7f;
  const double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0xff) return m ? NAN : s * INFINITY;
  if (e == 0) return s * ldexp(m, -133);
  return s * ldexp(1.0 + m / 128.0, e - 127);
}

double e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 0xf, m = b & 7;
  const double s = (b & 0x80) ? -1.0 : 1.0;
  if (e == 15 && m == 7) return NAN;
  if (e == 0) return s * ldexp(m, -9);
  return s * ldexp(1.0 + m / 8.0, e - 7);
}

double ue8m0_value(uint8_t b) { return b == 0xff ? NAN : ldexp(1.0, int(b) - 127); }

// Round x to a binary format with `mant` fraction bits and minimum normal exponent emin, ties to
// even; no overflow handling (callers handle range).
double round_to_grid(double x, int mant, int emin) {
  if (x == 0 || !isfinite(x)) return x;
  int ex;
  frexp(x, &ex);  // |x| in [2^(ex-1), 2^ex)
  int e = ex - 1;
  if (e < emin) e = emin;
  const double quantum = ldexp(1.0, e - mant);
  return nearbyint(x / quantum) * quantum;  // default rounding mode: ties to even
}

double to_float32(double x) {
  if (isnan(x)) return x;
  const double r = round_to_grid(x, 23, -126);
  return fabs(r) >= ldexp(1.0, 128) ? copysign(INFINITY, x) : r;
}

double to_bf16_value(double x) {  // x already a float32 value
  if (isnan(x)) return x;
  const double r = round_to_grid(x, 7, -126);
  return fabs(r) >= ldexp(1.0, 128) ? copysign(INFINITY, x) : r;
}

uint16_t bf16_bits_of(double v) {  // v exactly on the bf16 grid (or inf / NaN)
  if (isnan(v)) return 0x7fc0;
  const uint16_t sign = signbit(v) ? 0x8000 : 0;
  if (isinf(v)) return sign | 0x7f80;
  const double a = fabs(v);
  if (a == 0) return sign;
  int ex;
  frexp(a, &ex);
  int e = ex - 1;
  if (e < -126) return sign | uint16_t(a / ldexp(1.0, -133));  // subnormal
  const int m = int((a / ldexp(1.0, e) - 1.0) * 128.0);
  return sign | uint16_t((e + 127) << 7) | uint16_t(m);
}

uint8_t e4m3_encode(double x) {
  const uint8_t sign = signbit(x) ? 0x80 : 0;
  if (isnan(x)) return sign | 0x7f;
  double a = fabs(x);
  if (a > 448) a = 448;
  const double r = round_to_grid(a, 3, -6);
  for (int c = 0; c <= 0x7e; ++c)
    if (e4m3_value(uint8_t(c)) == r) return sign | uint8_t(c);
  fprintf(stderr, "e4m3_encode: no code for %g\n", r);
  abort();
}


// ---------------------------------------------------------------- cache reference (SPEC §3)
int tile_exponent(const double* x, int n) {
  double amax = 0;
  for (int i = 0; i < n; ++i)
    if (!isnan(x[i]) && fabs(x[i]) > amax) amax = fabs(x[i]);
  if (isinf(amax)) return 127;
  const double m = amax > 1e-4 ? amax : 1e-4;
  int e = -127;
  while (e < 127 && 448.0 * ldexp(1.0, e) < m) ++e;
  return e;
}

int64_t v4_page_bytes(int64_t P) { return (P * 584 + 575) / 576 * 576; }

void ref_quantize_v4(uint8_t* cache, int64_t P, int64_t id, const double* x) {
  uint8_t* data = cache + (id / P) * v4_page_bytes(P) + (id % P) * 576;
  uint8_t* sc = cache + (id / P) * v4_page_bytes(P) + P * 576 + (id % P) * 8;
  for (int t = 0; t < 7; ++t) {
    const int e = tile_exponent(x + 64 * t, 64);
    sc[t] = uint8_t(e + 127);
    for (int i = 0; i < 64; ++i) data[64 * t + i] = e4m3_encode(x[64 * t + i] / ldexp(1.0, e));
  }
  sc[7] = 0;
  for (int i = 0; i < 64; ++i) {
    const uint16_t b = bf16_bits_of(to_bf16_value(x[448 + i]));
    data[448 + 2 * i] = uint8_t(b & 0xff);
    data[448 + 2 * i + 1] = uint8_t(b >> 8);
  }
}

void ref_quantize_v32(uint8_t* cache, int64_t id, const double* x) {
  uint8_t* tok = cache + id * 656;
  for (int t = 0; t < 4; ++t) {
    const int e = tile_exponent(x + 128 * t, 128);
    const float scale = float(ldexp(1.0, e));
    memcpy(tok + 512 + 4 * t, &scale, 4);
    for (int i = 0; i < 128; ++i) tok[128 * t + i] = e4m3_encode(x[128 * t + i] / ldexp(1.0, e));
  }
  for (int i = 0; i < 64; ++i) {
    const uint16_t b = bf16_bits_of(to_bf16_value(x[512 + i]));
    tok[528 + 2 * i] = uint8_t(b & 0xff);
    tok[528 + 2 * i + 1] = uint8_t(b >> 8);
  }
}

// Dequantized values (bf16-rounded, as doubles) of one token.
void ref_dequant_v4(const uint8_t* cache, int64_t P, int64_t id, double* out) {
  const uint8_t* data = cache + (id / P) * v4_page_bytes(P) + (id % P) * 576;
  const uint8_t* sc = cache + (id / P) * v4_page_bytes(P) + P * 576 + (id % P) * 8;
  for (int i = 0; i < 448; ++i)
    out[i] = to_bf16_value(to_float32(e4m3_value(data[i]) * ue8m0_value(sc[i / 64])));
  for (int i = 0; i < 64; ++i) out[448 + i] = bf16_value(uint16_t(data[448 + 2 * i] | data[449 + 2 * i] << 8));
}

void ref_dequant_v32(const uint8_t* cache, int64_t id, double* out) {
  const uint8_t* tok = cache + id * 656;
  for (int i = 0; i < 512; ++i) {
    float scale;
    memcpy(&scale, tok + 512 + 4 * (i / 128), 4);
    out[i] = to_bf16_value(to_float32(e4m3_value(tok[i]) * double(scale)));
  }
  for (int i = 0; i < 64; ++i) out[512 + i] = bf16_value(uint16_t(tok[528 + 2 * i] | tok[529 + 2 * i] << 8));
}

// ---------------------------------------------------------------- attention reference (SPEC §4)
struct RefOut {
  std::vector<double> out, max_logits, lse;
  std::vector<double> mag;  // SPEC §4's Σ_k w_k · |kv[idx_k, c]|, the scale of out's bound
};

// rows_of(i) returns the list of valid KV rows (as pointers to double vectors of length d_qk).
template <class RowsOf>
RefOut ref_attention(const std::vector<double>& q, int64_t s_q, int h_q, int d_qk, int d_v,
                     RowsOf rows_of, double scale, const float* sink) {
  RefOut r;
  r.out.assign(size_t(s_q * h_q * d_v), 0.0);
  r.mag.assign(size_t(s_q * h_q * d_v), 0.0);
  r.max_logits.assign(size_t(s_q * h_q), 0.0);
  r.lse.assign(size_t(s_q * h_q), 0.0);
  for (int64_t i = 0; i < s_q; ++i) {
    const std::vector<const double*> rows = rows_of(i);
    for (int h = 0; h < h_q; ++h) {
      const double* qv = &q[size_t((i * h_q + h) * d_qk)];
      const size_t o = size_t(i * h_q + h);
      if (rows.empty()) {
        r.max_logits[o] = -INFINITY;
        r.lse[o] = INFINITY;
        continue;  // out stays 0
      }
      std::vector<double> p(rows.size());
      double mx = -INFINITY;
      bool nan = false;
      for (size_t k = 0; k < rows.size(); ++k) {
        double dot = 0;
        for (int d = 0; d < d_qk; ++d) dot += qv[d] * rows[k][d];
        p[k] = scale * dot;
        if (isnan(p[k])) nan = true;
        if (p[k] > mx) mx = p[k];
      }
      if (nan) mx = NAN;
      double sum = 0;
      for (double pk : p) sum += exp(pk - mx);
      const double lse = mx + log(sum);
      double lse_all = lse;
      if (sink) {
        const double s = sink[h];
        if (isinf(s) && s > 0) lse_all = INFINITY;
        else if (!(isinf(s) && s < 0)) lse_all = fmax(lse, s) + log1p(exp(-fabs(lse - s)));
        if (isnan(s)) lse_all = NAN;
      }
      r.max_logits[o] = mx;
      r.lse[o] = lse;
      for (int d = 0; d < d_v; ++d) {
        double acc = 0, mag = 0;
        for (size_t k = 0; k < rows.size(); ++k) {
          acc += exp(p[k] - lse_all) * rows[k][d];
          mag += exp(p[k] - lse_all) * fabs(rows[k][d]);
        }
        r.out[o * d_v + d] = acc;
        r.mag[o * d_v + d] = mag;
      }
    }
  }
  return r;
}

// ---------------------------------------------------------------- exact attention checks
// ±inf and NaN where the reference has them (same sign for inf), finite where it is finite.
template <class Get>
void expect_placement(const char* name, const std::string& ctx, size_t n, Get got, const std::vector<double>& ref) {
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const double g = got(i), r = ref[i];
    const bool ok = isnan(r) ? bool(isnan(g)) : isinf(r) ? g == r : bool(isfinite(g));
    if (!ok) {
      if (bad < 3) fprintf(stderr, "  %s %s [%zu]: got %.9g, reference %.9g\n", ctx.c_str(), name, i, g, r);
      ++bad;
    }
  }
  expect(bad == 0, ctx + " " + name + ": " + std::to_string(bad) + " elements with ±inf/NaN misplaced");
}

template <class T>
void expect_same_bits(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
  expect(a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0, what + ": differs");
}

// ---------------------------------------------------------------- inputs
std::mt19937_64 rng(20261124);

double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }
double normal(double sd) { return std::normal_distribution<double>(0, sd)(rng); }
int64_t randint(int64_t lo, int64_t hi) {  // [lo, hi]
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

std::vector<uint16_t> random_bf16(size_t n, double sd) {
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = bf16_bits_of(to_bf16_value(to_float32(normal(sd))));
  return v;
}

std::vector<double> values_of(const std::vector<uint16_t>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16_value(v[i]);
  return r;
}

const int32_t kFillers[] = {INT32_MIN, -123456, -1, 0 /* = s_kv, set at use */, INT32_MAX};

struct IndexOpts {
  double invalid_frac = 0.1;
  double dup_frac = 0.05;
  double all_invalid_row_frac = 0.1;
};

std::vector<int32_t> random_indices(int64_t s_q, int topk, int32_t n_rows, const IndexOpts& o) {
  std::vector<int32_t> idx(static_cast<size_t>(s_q * topk));
  for (int64_t i = 0; i < s_q; ++i) {
    const bool all_invalid = uniform(0, 1) < o.all_invalid_row_frac;
    for (int k = 0; k < topk; ++k) {
      int32_t v;
      if (all_invalid || uniform(0, 1) < o.invalid_frac || n_rows == 0) {
        v = kFillers[randint(0, 4)];
        if (v == 0) v = n_rows;
      } else if (k > 0 && uniform(0, 1) < o.dup_frac) {
        v = idx[size_t(i * topk + randint(0, k - 1))];
      } else {
        v = int32_t(randint(0, n_rows - 1));
      }
      idx[size_t(i * topk + k)] = v;
    }
  }
  return idx;
}

std::vector<int32_t> random_lengths(int64_t s_q, int topk) {
  std::vector<int32_t> len(static_cast<size_t>(s_q));
  for (auto& l : len) {
    const double u = uniform(0, 1);
    l = u < 0.15 ? 0 : u < 0.4 ? topk : int32_t(randint(0, topk));
  }
  return len;
}

std::vector<float> random_sink(int h_q, bool with_inf) {
  std::vector<float> s(static_cast<size_t>(h_q));
  for (auto& x : s) x = float(normal(1.5));
  if (with_inf && h_q >= 3) {
    s[0] = INFINITY;
    s[1] = -INFINITY;
  }
  return s;
}

// ---------------------------------------------------------------- sparse prefill checks
struct PrefillCase {
  int64_t s_q;
  int h_q, d_qk, d_v;
  int32_t s_kv;
  int topk;
  bool lengths, sink, sink_inf;
  double q_sd, kv_sd;
  IndexOpts idx;
};

void check_prefill(const PrefillCase& c) {
  const std::string ctx = "prefill sQ=" + std::to_string(c.s_q) + " hQ=" + std::to_string(c.h_q) +
                          " dQK=" + std::to_string(c.d_qk) + " dV=" + std::to_string(c.d_v) +
                          " sKV=" + std::to_string(c.s_kv) + " topk=" + std::to_string(c.topk) +
                          (c.lengths ? " len" : "") + (c.sink ? (c.sink_inf ? " sink±inf" : " sink") : "");
  const auto q = random_bf16(size_t(c.s_q * c.h_q * c.d_qk), c.q_sd);
  const auto kv = random_bf16(size_t(int64_t(c.s_kv) * c.d_qk), c.kv_sd);
  const auto idx = random_indices(c.s_q, c.topk, c.s_kv, c.idx);
  const auto len = random_lengths(c.s_q, c.topk);
  const auto sink = random_sink(c.h_q, c.sink_inf);
  const double scale = 1.0 / sqrt(double(c.d_qk));
  const float scale_f = float(scale);

  std::vector<uint16_t> out(static_cast<size_t>(c.s_q * c.h_q * c.d_v), 0xdead);
  std::vector<float> ml(static_cast<size_t>(c.s_q * c.h_q), 123.f), lse(size_t(c.s_q * c.h_q), 123.f);
  const int32_t st = core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(),
                                                     .topk_length = c.lengths ? len.data() : nullptr,
                                                     .attn_sink = c.sink ? sink.data() : nullptr,
                                                     .s_q = int32_t(c.s_q), .h_q = c.h_q, .d_qk = c.d_qk,
                                                     .d_v = c.d_v, .s_kv = c.s_kv, .topk = c.topk,
                                                     .sm_scale = scale_f, .out = out.data(),
                                                     .max_logits = ml.data(), .lse = lse.data()});
  expect(st == SMLA_OK, ctx + ": status " + std::to_string(st));

  const auto qd = values_of(q), kvd = values_of(kv);
  auto rows_of = [&](int64_t i) {
    std::vector<const double*> rows;
    const int lim = c.lengths ? std::min(std::max(len[size_t(i)], 0), c.topk) : c.topk;
    for (int k = 0; k < lim; ++k) {
      const int32_t j = idx[size_t(i * c.topk + k)];
      if (j >= 0 && j < c.s_kv) rows.push_back(&kvd[size_t(int64_t(j) * c.d_qk)]);
    }
    return rows;
  };
  const RefOut ref = ref_attention(qd, c.s_q, c.h_q, c.d_qk, c.d_v, rows_of, double(scale_f),
                                   c.sink ? sink.data() : nullptr);
  expect_placement("out", ctx, out.size(), [&](size_t i) { return bf16_value(out[i]); }, ref.out);
  expect_placement("maxLogits", ctx, ml.size(), [&](size_t i) { return double(ml[i]); }, ref.max_logits);
  expect_placement("lse", ctx, lse.size(), [&](size_t i) { return double(lse[i]); }, ref.lse);

  auto call = [&](const std::vector<int32_t>& ix, int tk, const int32_t* lens, const float* sk,
                  std::vector<uint16_t>& o, std::vector<float>& m, std::vector<float>& l) {
    o.assign(out.size(), 0xdead);
    m.assign(ml.size(), 123.f);
    l.assign(lse.size(), 123.f);
    expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = ix.data(),
                                           .topk_length = lens, .attn_sink = sk, .s_q = int32_t(c.s_q),
                                           .h_q = c.h_q, .d_qk = c.d_qk, .d_v = c.d_v, .s_kv = c.s_kv,
                                           .topk = tk, .sm_scale = scale_f, .out = o.data(),
                                           .max_logits = m.data(), .lse = l.data()}) == SMLA_OK,
           ctx + ": status (consistency call)");
  };
  std::vector<uint16_t> out2;
  std::vector<float> ml2, lse2;

  // The same valid entries, compacted to the front of each row (−1 after, topk_length = count):
  // invalid entries are skipped, never read, so the outputs are the same bit for bit.
  std::vector<int32_t> packed(idx.size(), -1), count(size_t(c.s_q), 0);
  for (int64_t i = 0; i < c.s_q; ++i) {
    const int lim = c.lengths ? std::min(std::max(len[size_t(i)], 0), c.topk) : c.topk;
    for (int k = 0; k < lim; ++k) {
      const int32_t j = idx[size_t(i * c.topk + k)];
      if (j >= 0 && j < c.s_kv) packed[size_t(i * c.topk + count[size_t(i)]++)] = j;
    }
  }
  call(packed, c.topk, count.data(), c.sink ? sink.data() : nullptr, out2, ml2, lse2);
  expect_same_bits(ctx + " compacted entries: out", out2, out);
  expect_same_bits(ctx + " compacted entries: maxLogits", ml2, ml);
  expect_same_bits(ctx + " compacted entries: lse", lse2, lse);

  // Sinks never change lse or maxLogits; a sink of −inf changes nothing at all.
  const std::vector<float> neg_inf(size_t(c.h_q), -INFINITY);
  call(idx, c.topk, c.lengths ? len.data() : nullptr, neg_inf.data(), out2, ml2, lse2);
  expect_same_bits(ctx + " sink -inf: maxLogits", ml2, ml);
  expect_same_bits(ctx + " sink -inf: lse", lse2, lse);
  if (!c.sink) expect_same_bits(ctx + " sink -inf: out", out2, out);
  if (c.sink) {
    std::vector<uint16_t> out3;
    std::vector<float> ml3, lse3;
    call(idx, c.topk, c.lengths ? len.data() : nullptr, nullptr, out3, ml3, lse3);
    expect_same_bits(ctx + " sink -inf vs no sink: out", out2, out3);
  }
}

// SPEC §4's elementwise bounds (out: 2^-7 · mag + 1e-6; lse: 1e-6 + 2^-15 · max(|lse|, |maxLogits|);
// maxLogits: 1e-6 + 2^-15 · |maxLogits|) against the float64 reference, where it is finite;
// prints the worst ratio error / bound of each tensor.
void expect_within_bounds(const std::string& ctx, const std::vector<uint16_t>& out, const std::vector<float>& ml,
                          const std::vector<float>& lse, const RefOut& ref) {
  double worst_out = 0, worst_lse = 0, worst_ml = 0;
  for (size_t i = 0; i < out.size(); ++i)
    if (isfinite(ref.out[i]))
      worst_out = std::max(worst_out, fabs(bf16_value(out[i]) - ref.out[i]) / (ldexp(ref.mag[i], -7) + 1e-6));
  for (size_t i = 0; i < lse.size(); ++i) {
    if (isfinite(ref.lse[i]))
      worst_lse = std::max(worst_lse, fabs(double(lse[i]) - ref.lse[i]) /
                                          (1e-6 + ldexp(std::max(fabs(ref.lse[i]), fabs(ref.max_logits[i])), -15)));
    if (isfinite(ref.max_logits[i]))
      worst_ml = std::max(worst_ml, fabs(double(ml[i]) - ref.max_logits[i]) / (1e-6 + ldexp(fabs(ref.max_logits[i]), -15)));
  }
  // NaN ratios (a NaN where the reference is finite) fail too
  expect(worst_out <= 1 && worst_lse <= 1 && worst_ml <= 1,
         ctx + ": worst error / bound: out " + std::to_string(worst_out) + ", lse " + std::to_string(worst_lse) +
             ", maxLogits " + std::to_string(worst_ml));
  printf("  %s: worst error / bound: out %.3g, lse %.3g, maxLogits %.3g\n", ctx.c_str(), worst_out, worst_lse, worst_ml);
}

// bf16 bits: sign, exponent field e (0: subnormal) and a random nonzero fraction.
uint16_t random_bf16_with_exponent(int e) {
  return uint16_t((randint(0, 1) << 15) | (e << 7) | randint(1, 127));
}

// Data and scales at float32's edges, judged by SPEC §4's bounds: where a kernel that reads bf16
// subnormals as 0, or flushes subnormal partial sums of Q·Kᵀ to 0 (AVX512_BF16's vdpbf16ps does
// both), gets logits wrong by their whole size. Each case against the float64 reference:
// - kv subnormal, q huge (2^120 .. 2^121): every product q·k a normal float, logits of order 1;
// - q subnormal, kv huge: the same the other way round;
// - q and kv about 2^-64, smScale 2^124: every product a float32 subnormal, logits of order 1;
// - the same data with smScale 2^71 (|smScale| · dQK = 2^80): a large scale where flushing changes
//   a logit by far less than the bounds.
// (Normal data at such scales is no test of any float32 kernel: logits of 2^70 that nearly tie
// differ by more than float32's rounding of them.)
void check_prefill_extreme_values() {
  const int h_q = 16, d_qk = 512, d_v = 512, s_kv = 80, topk = 72, s_q = 3;
  struct Case {
    const char* name;
    int q_exp, kv_exp;  // bf16 exponent fields (0: subnormal)
    float scale;
  };
  const Case cases[] = {
      {"kv subnormal, q huge", 127 + 120, 0, 0.0625f},
      {"q subnormal, kv huge", 0, 127 + 120, 0.0625f},
      {"products subnormal, smScale 2^124", 127 - 64, 127 - 64, 0x1p124f},
      {"products subnormal, smScale 2^71", 127 - 64, 127 - 64, 0x1p71f},
  };
  for (const Case& c : cases) {
    std::vector<uint16_t> q(size_t(s_q * h_q * d_qk)), kv(size_t(s_kv * d_qk));
    for (auto& x : q) x = random_bf16_with_exponent(c.q_exp);
    for (auto& x : kv) x = random_bf16_with_exponent(c.kv_exp);
    // two and a quarter blocks of rows a query, some twice
    std::vector<int32_t> idx(size_t(s_q * topk));
    for (auto& x : idx) x = int32_t(randint(0, s_kv - 1));
    std::vector<uint16_t> out(size_t(s_q * h_q * d_v));
    std::vector<float> ml(size_t(s_q * h_q)), lse(size_t(s_q * h_q));
    const std::string ctx = std::string("extreme values: ") + c.name;
    expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(), .s_q = s_q,
                                           .h_q = h_q, .d_qk = d_qk, .d_v = d_v, .s_kv = s_kv, .topk = topk,
                                           .sm_scale = c.scale, .out = out.data(), .max_logits = ml.data(),
                                           .lse = lse.data()}) == SMLA_OK,
           ctx + ": status");
    const auto qd = values_of(q), kvd = values_of(kv);
    const RefOut ref = ref_attention(qd, s_q, h_q, d_qk, d_v,
                                     [&](int64_t i) {
                                       std::vector<const double*> rows;
                                       for (int k = 0; k < topk; ++k)
                                         rows.push_back(&kvd[size_t(idx[size_t(i * topk + k)]) * d_qk]);
                                       return rows;
                                     },
                                     double(c.scale), nullptr);
    expect_placement("out", ctx, out.size(), [&](size_t i) { return bf16_value(out[i]); }, ref.out);
    expect_placement("maxLogits", ctx, ml.size(), [&](size_t i) { return double(ml[i]); }, ref.max_logits);
    expect_placement("lse", ctx, lse.size(), [&](size_t i) { return double(lse[i]); }, ref.lse);
    expect_within_bounds(ctx, out, ml, lse, ref);
  }
}

// One valid entry per row, no sink: its weight is exactly 1, so out is that kv row's first dV
// values bit for bit and lse = maxLogits.
void check_prefill_single_entry() {
  const int h_q = 5, d_qk = 128, d_v = 64, s_kv = 20, topk = 6, s_q = 9;
  const auto q = random_bf16(size_t(s_q * h_q * d_qk), 2.0);
  const auto kv = random_bf16(size_t(s_kv * d_qk), 1.0);
  std::vector<int32_t> idx(static_cast<size_t>(s_q * topk)), len(static_cast<size_t>(s_q)), pick(static_cast<size_t>(s_q));
  for (int i = 0; i < s_q; ++i) {
    const int at = int(randint(0, topk - 1));
    pick[size_t(i)] = int32_t(randint(0, s_kv - 1));
    for (int k = 0; k < topk; ++k) {
      int32_t filler = kFillers[randint(0, 4)];
      if (filler == 0) filler = s_kv;
      idx[size_t(i * topk + k)] = k == at ? pick[size_t(i)] : filler;
    }
    len[size_t(i)] = i % 2 ? topk : at + 1;
  }
  std::vector<uint16_t> out(size_t(s_q * h_q * d_v));
  std::vector<float> ml(size_t(s_q * h_q)), lse(size_t(s_q * h_q));
  expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(),
                                         .topk_length = len.data(), .s_q = s_q, .h_q = h_q, .d_qk = d_qk,
                                         .d_v = d_v, .s_kv = s_kv, .topk = topk, .sm_scale = 0.09f,
                                         .out = out.data(), .max_logits = ml.data(),
                                         .lse = lse.data()}) == SMLA_OK,
         "single entry: status");
  size_t bad_out = 0, bad_stat = 0;
  for (int i = 0; i < s_q; ++i)
    for (int h = 0; h < h_q; ++h) {
      const size_t o = size_t(i * h_q + h);
      bad_stat += !(isfinite(lse[o]) && lse[o] == ml[o]);
      bad_out += memcmp(&out[o * d_v], &kv[size_t(pick[size_t(i)]) * d_qk], d_v * sizeof(uint16_t)) != 0;
    }
  expect(bad_out == 0, "single entry: " + std::to_string(bad_out) + " out rows differ from their kv row");
  expect(bad_stat == 0, "single entry: " + std::to_string(bad_stat) + " rows with lse != maxLogits");
}

// A NaN in q makes that (query, head) NaN and leaves the others alone; an empty call is fine.
void check_prefill_special() {
  const int h_q = 4, d = 64, s_kv = 8, topk = 4;
  auto q = random_bf16(size_t(2 * h_q * d), 1.0);
  const auto kv = random_bf16(size_t(s_kv * d), 1.0);
  std::vector<int32_t> idx = {0, 1, 2, 3, 4, 5, 6, 7};
  q[size_t((0 * h_q + 1) * d + 5)] = 0x7fc0;  // NaN
  std::vector<uint16_t> out(static_cast<size_t>(2 * h_q * d));
  std::vector<float> ml(2 * h_q), lse(2 * h_q);
  expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(), .s_q = 2,
                                         .h_q = h_q, .d_qk = d, .d_v = d, .s_kv = s_kv, .topk = topk,
                                         .sm_scale = 0.125f, .out = out.data(), .max_logits = ml.data(),
                                         .lse = lse.data()}) == SMLA_OK,
         "nan q: status");
  expect(isnan(ml[1]) && isnan(lse[1]) && isnan(bf16_value(out[size_t(1 * d)])), "nan q: head 1 is NaN");
  expect(!isnan(ml[0]) && !isnan(lse[2]) && !isnan(bf16_value(out[size_t(4 * d)])), "nan q: others finite");

  // sQ = 0 and topk = 0 (all rows empty).
  expect(core(smla_sparse_prefill_params{.s_q = 0, .h_q = h_q, .d_qk = d, .d_v = d, .s_kv = 0, .topk = 0,
                                         .sm_scale = 1.f}) == SMLA_OK,
         "sQ=0: status");
  expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .s_q = 2, .h_q = h_q, .d_qk = d,
                                         .d_v = d, .s_kv = s_kv, .topk = 0, .sm_scale = 1.f,
                                         .out = out.data(), .max_logits = ml.data(),
                                         .lse = lse.data()}) == SMLA_OK,
         "topk=0: status");
  bool empty_ok = true;
  for (int i = 0; i < 2 * h_q; ++i) empty_ok &= isinf(lse[i]) && lse[i] > 0 && isinf(ml[i]) && ml[i] < 0;
  for (auto o : out) empty_ok &= o == 0;
  expect(empty_ok, "topk=0: lse=+inf, maxLogits=-inf, out=0");

  // Arguments that would read or write out of bounds.
  auto call = [&](int32_t s_q, int32_t hq, int32_t dqk, int32_t dv, int32_t skv, int32_t tk) {
    return core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(), .s_q = s_q,
                                           .h_q = hq, .d_qk = dqk, .d_v = dv, .s_kv = skv, .topk = tk,
                                           .sm_scale = 1.f, .out = out.data(), .max_logits = ml.data(),
                                           .lse = lse.data()});
  };
  expect(call(-1, h_q, d, d, s_kv, topk) == SMLA_ERR_INVALID_ARGUMENT, "bad sQ");
  expect(call(1, -1, d, d, s_kv, topk) == SMLA_ERR_INVALID_ARGUMENT, "bad hQ");
  expect(call(1, h_q, 96, 64, s_kv, topk) == SMLA_ERR_INVALID_ARGUMENT, "dQK not a multiple of 64");
  expect(call(1, h_q, 64, 128, s_kv, topk) == SMLA_ERR_INVALID_ARGUMENT, "dV > dQK");
  expect(call(1, h_q, 64, 0, s_kv, topk) == SMLA_ERR_INVALID_ARGUMENT, "dV = 0");
  expect(call(1, h_q, d, d, -5, topk) == SMLA_ERR_INVALID_ARGUMENT, "bad sKV");
  expect(call(1, h_q, d, d, s_kv, -1) == SMLA_ERR_INVALID_ARGUMENT, "bad topk");
  expect(core(smla_sparse_prefill_params{.q = q.data(), .indices = idx.data(), .s_q = 1, .h_q = h_q,
                                         .d_qk = d, .d_v = d, .s_kv = s_kv, .topk = topk, .sm_scale = 1.f,
                                         .out = out.data(), .max_logits = ml.data(),
                                         .lse = lse.data()}) == SMLA_ERR_INVALID_ARGUMENT,
         "null kv");
  expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(), .s_q = 1,
                                         .h_q = h_q, .d_qk = d, .d_v = d, .s_kv = s_kv, .topk = topk,
                                         .sm_scale = 1.f, .out = out.data(),
                                         .lse = lse.data()}) == SMLA_ERR_INVALID_ARGUMENT,
         "null maxLogits");
#if defined(__EMSCRIPTEN__)
  // Scratch of h_q * d_qk floats beyond the 32-bit address space: refused before any read.
  expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(), .s_q = 1,
                                         .h_q = 1 << 30, .d_qk = 1024, .d_v = 64, .s_kv = s_kv, .topk = topk,
                                         .sm_scale = 1.f, .out = out.data(), .max_logits = ml.data(),
                                         .lse = lse.data()}) == SMLA_ERR_OUT_OF_MEMORY,
         "scratch beyond 4 GiB -> out of memory");
#endif
}

#if defined(SMLA_SIMD_HAS_EXP)
// The vector exp of the softmax (WASM, AVX-512): every lane within 1 ulp of e^x rounded to float32 (the
// reference in double), on a sweep of the whole range in random lane order, and exactly at the
// special points: e^±0 = 1, NaN stays NaN, −inf and far below the subnormals give 0, overflow +inf.
void check_vector_exp() {
  auto ulps = [](float a, float b) {  // distance on the float grid (same-sign finite values)
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    return ia > ib ? int64_t(ia) - ib : int64_t(ib) - ia;
  };
  std::vector<float> xs;
  for (double x = -110.0; x < 90.0; x += 1.0 / 4096) xs.push_back(float(x + uniform(0, 1.0 / 4096)));
  for (int i = 0; i < 200000; ++i) xs.push_back(float(uniform(-1e-3, 1e-3)));
  std::shuffle(xs.begin(), xs.end(), rng);
  int64_t worst = 0;
  float worst_x = 0;
  size_t bad = 0;
  for (size_t i = 0; i + smla::simd::W <= xs.size(); i += smla::simd::W) {
    float got[smla::simd::W];
    smla::simd::store(got, smla::simd::exp(smla::simd::load(&xs[i])));
    for (int l = 0; l < smla::simd::W; ++l) {
      const float want = float(to_float32(exp(double(xs[i + l]))));
      const int64_t u = isinf(want) || isinf(got[l]) ? (want == got[l] ? 0 : 1 << 30) : ulps(got[l], want);
      if (u > worst) worst = u, worst_x = xs[i + l];
      bad += u > 1;
    }
  }
  expect(bad == 0, "vector exp: " + std::to_string(bad) + " of " + std::to_string(xs.size()) +
                       " values off by more than 1 ulp (worst " + std::to_string(worst) + " at x = " +
                       std::to_string(worst_x) + ")");
  // padded with zeros to a whole vector of the widest target (16 lanes)
  const float special[16] = {0.0f, -0.0f, NAN, -INFINITY, INFINITY, -200.0f, 89.0f, -103.2789f};
  float got[16];
  static_assert(16 % smla::simd::W == 0, "whole vectors");
  for (int i = 0; i < 16; i += smla::simd::W) smla::simd::store(got + i, smla::simd::exp(smla::simd::load(special + i)));
  expect(got[0] == 1.0f && got[1] == 1.0f, "vector exp: e^0 = e^-0 = 1 exactly");
  expect(isnan(got[2]), "vector exp: NaN -> NaN");
  expect(got[3] == 0.0f && got[5] == 0.0f, "vector exp: -inf and -200 -> 0");
  expect(isinf(got[4]) && got[4] > 0 && isinf(got[6]) && got[6] > 0, "vector exp: +inf and 89 -> +inf");
  expect(got[7] == float(to_float32(exp(-103.2789))) && got[7] > 0, "vector exp: a subnormal result");
}

// The generic vector exp (simd.h: one body over per-ISA primitives) against the per-ISA exp it
// replaced (exp_frozen.h): the same bits, NaN payloads included. Every float32 bit pattern with
// SMLA_CHECK_EXP_ALL=1 in the environment (or -DSMLA_CHECK_EXP_ALL: a WASM build's getenv does not
// see node's); else every 31st from a fresh start (printed; SMLA_CHECK_EXP_START=k repeats it), and
// every pattern within 2^16 of ±0, ±inf, a NaN, ±1, the clamps, the subnormal and overflow edges.
void check_vector_exp_frozen() {
#if defined(SMLA_CHECK_EXP_ALL)
  const bool all = true;
#else
  const bool all = getenv("SMLA_CHECK_EXP_ALL") != nullptr;
#endif
  const char* env = getenv("SMLA_CHECK_EXP_START");
  const uint64_t stride = all ? 1 : 31;
  const uint64_t start = all ? 0 : (env ? strtoull(env, nullptr, 10) : std::random_device{}()) % stride;
  if (!all)
    printf("core_check: exp bits on one pattern in %llu, from %llu (SMLA_CHECK_EXP_START=%llu repeats it)\n",
           (unsigned long long)stride, (unsigned long long)start, (unsigned long long)start);
  constexpr int kChunk = 4096;
  static_assert(kChunk % smla::simd::W == 0, "whole vectors");
  std::vector<uint32_t> bits, got(kChunk), want(kChunk);
  bits.reserve(kChunk);
  uint64_t checked = 0, bad = 0;
  uint32_t first_bad = 0;
  auto flush = [&]() {
    while (bits.size() % smla::simd::W) bits.push_back(0);
    for (size_t i = 0; i < bits.size(); i += smla::simd::W) {
      const smla::simd::vf x = smla::simd::load(reinterpret_cast<const float*>(&bits[i]));
      smla::simd::store(reinterpret_cast<float*>(&got[i]), smla::simd::exp(x));
      exp_frozen::vf fx;
      memcpy(&fx, &bits[i], sizeof fx);
      const exp_frozen::vf fy = exp_frozen::exp(fx);
      memcpy(&want[i], &fy, sizeof fy);
    }
    for (size_t i = 0; i < bits.size(); ++i)
      if (got[i] != want[i] && bad++ == 0) first_bad = bits[i];
    checked += bits.size();
    bits.clear();
  };
  for (uint64_t b = start; b <= 0xffffffffull; b += stride) {
    bits.push_back(uint32_t(b));
    if (bits.size() == kChunk) flush();
  }
  const float edges[] = {0.0f, INFINITY, NAN, 1.0f, 104.0f, 88.8f, 88.72283f, 87.33655f, 103.97208f};
  for (float e : edges)
    for (uint32_t sign : {0u, 0x80000000u}) {
      uint32_t u;
      memcpy(&u, &e, 4);
      u = (u & 0x7fffffffu) | sign;
      for (int64_t d = -65536; d <= 65536; ++d) {
        bits.push_back(uint32_t(int64_t(u) + d));
        if (bits.size() == kChunk) flush();
      }
    }
  flush();
  printf("core_check: vector exp (%d lanes) vs the frozen exp: %llu bit patterns%s, %llu differ\n", smla::simd::W,
         (unsigned long long)checked, all ? " (all)" : "", (unsigned long long)bad);
  char first[16];
  snprintf(first, sizeof first, "%08x", unsigned(first_bad));
  expect(bad == 0, "vector exp vs the frozen per-ISA exp: " + std::to_string(bad) + " of " + std::to_string(checked) +
                       " bit patterns differ (first 0x" + first + ")");
}
#endif

#if !defined(__wasm__)
// The path the core's calls take under SPARSE_MLA_CPU_ISA (cpp/src/isa_dispatch.h), against this
// CPU's flags as Linux lists them (/proc/cpuinfo) and the path this file's own -march compiles
// (core_check gets the core's). The checks of attention values that follow run on that path.
void check_isa_path() {
  const char* env = getenv("SPARSE_MLA_CPU_ISA");
  const std::string forced = env ? env : "", taken = smla_isa_simd_path();
#if defined(SMLA_SIMD_AVX512) && defined(__AVX512BF16__)
  const std::string compiled = "AVX-512+BF16";
#elif defined(SMLA_SIMD_AVX512)
  const std::string compiled = "AVX-512";
#elif defined(SMLA_SIMD_AVX2)
  const std::string compiled = "AVX2+FMA";
#elif defined(SMLA_SIMD_NEON)
  const std::string compiled = "NEON";
#elif defined(SMLA_SIMD_SSE2)
  const std::string compiled = "SSE2";
#else
  const std::string compiled = "scalar";
#endif
  std::string flags;
  if (FILE* f = fopen("/proc/cpuinfo", "r")) {
    char line[8192];
    while (fgets(line, sizeof line, f))
      if (strncmp(line, "flags", 5) == 0) {
        flags = std::string(" ") + line + " ";
        for (char& c : flags)
          if (c == '\t' || c == '\n' || c == ':') c = ' ';
        break;
      }
    fclose(f);
  }
  const auto has = [&](const char* flag) { return flags.find(std::string(" ") + flag + " ") != std::string::npos; };
  const bool avx512 = has("avx512f") && has("avx512cd") && has("avx512bw") && has("avx512dq") && has("avx512vl");
  const bool bf16 = avx512 && has("avx512_bf16");
#if defined(SMLA_ISA_DISPATCH_AVX512)
  const bool carries_avx512 = true;
#else
  const bool carries_avx512 = compiled.rfind("AVX-512", 0) == 0;
#endif
  printf("core_check: SIMD path %s (SPARSE_MLA_CPU_ISA=%s; compiled for %s%s)\n", taken.c_str(), forced.c_str(),
         compiled.c_str(), carries_avx512 && compiled.rfind("AVX-512", 0) != 0 ? " + the AVX-512 copy" : "");
  const std::string ctx = "SIMD path with SPARSE_MLA_CPU_ISA='" + forced + "'";
  if (forced == "baseline") {
    // no AVX-512 copy, and the BF16 dot only where -march has AVX512_BF16
    expect(taken == compiled, ctx + ": " + taken + ", not the build's own " + compiled);
  } else if (flags.empty()) {
    printf("  (no /proc/cpuinfo: the path is not judged)\n");
  } else if (carries_avx512 && avx512) {
    const std::string want = forced == "avx512" || !bf16 ? "AVX-512" : "AVX-512+BF16";
    expect(taken == want, ctx + ": " + taken + ", not " + want + " (avx512_bf16 " + (bf16 ? "listed" : "not listed") + ")");
  } else {
    expect(taken == compiled, ctx + ": " + taken + " on a CPU without AVX-512 F/CD/BW/DQ/VL, not " + compiled);
  }
}
#endif

// ---------------------------------------------------------------- cache checks
std::vector<double> random_row(int dim, int kind) {
  std::vector<double> x(static_cast<size_t>(dim));
  const double sd = kind == 0 ? 1.0 : kind == 1 ? 1e-3 : kind == 2 ? 3000.0 : 1e-7;
  for (auto& v : x) v = to_float32(normal(sd));
  if (kind == 4) {  // special values in the nope part
    x[3] = NAN;
    x[70] = INFINITY;
    x[200] = -0.0;
    x[300] = 448.0;
    x[301] = -464.0;  // ties/saturation
  }
  return x;
}

void check_cache(int format, int32_t page_size, int32_t num_pages, bool bf16_rows) {
  const bool v4 = format == SMLA_CACHE_V4;
  const int dim = v4 ? 512 : 576;
  const int64_t bytes = v4 ? v4_page_bytes(page_size) * num_pages : int64_t(num_pages) * 656;
  const int64_t cap = int64_t(page_size) * num_pages;
  const std::string ctx = std::string(v4 ? "v4" : "v32") + " P=" + std::to_string(page_size) +
                          (bf16_rows ? " bf16" : " f32");

  std::vector<uint8_t> cache(static_cast<size_t>(bytes), 0x5a), ref_cache(size_t(bytes), 0x5a);
  const int n = int(std::min<int64_t>(cap, 37));
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) ids[size_t(i)] = randint(0, cap - 1);
  if (n > 2) ids[1] = ids[0];  // duplicate id: the later row wins
  std::vector<double> rows_d(static_cast<size_t>(n) * dim);
  std::vector<float> rows_f(static_cast<size_t>(n) * dim);
  std::vector<uint16_t> rows_b(static_cast<size_t>(n) * dim);
  for (int i = 0; i < n; ++i) {
    auto x = random_row(dim, i % 5);
    for (int d = 0; d < dim; ++d) {
      double v = x[size_t(d)];
      if (bf16_rows) {
        rows_b[size_t(i) * dim + d] = bf16_bits_of(to_bf16_value(v));
        v = to_bf16_value(v);
      }
      rows_f[size_t(i) * dim + d] = float(v);
      rows_d[size_t(i) * dim + d] = v;
    }
  }
  const void* rows = bf16_rows ? static_cast<const void*>(rows_b.data()) : rows_f.data();
  const int32_t dt = bf16_rows ? SMLA_ROWS_BF16 : SMLA_ROWS_F32;
  expect(core(smla_quantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                            .num_pages = num_pages, .token_ids = ids.data(), .num_tokens = n,
                                            .rows = rows, .rows_dtype = dt}) == SMLA_OK,
         ctx + " quantize status");
  for (int i = 0; i < n; ++i) {
    if (v4) ref_quantize_v4(ref_cache.data(), page_size, ids[size_t(i)], &rows_d[size_t(i) * dim]);
    else ref_quantize_v32(ref_cache.data(), ids[size_t(i)], &rows_d[size_t(i) * dim]);
  }
  size_t diff = 0;
  for (size_t b = 0; b < cache.size(); ++b) diff += cache[b] != ref_cache[b];
  expect(diff == 0, ctx + " quantize bytes: " + std::to_string(diff) + " differ");

  // Dequantize a gather (with repeats) and compare values bit for bit.
  std::vector<int64_t> gather(50);
  for (auto& g : gather) g = randint(0, cap - 1);
  std::vector<uint16_t> out(gather.size() * dim, 0xdead);
  expect(core(smla_dequantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                              .num_pages = num_pages, .token_ids = gather.data(),
                                              .num_tokens = int32_t(gather.size()),
                                              .out = out.data()}) == SMLA_OK,
         ctx + " dequant status");
  std::vector<double> ref(static_cast<size_t>(dim));
  size_t mism = 0;
  for (size_t g = 0; g < gather.size(); ++g) {
    if (v4) ref_dequant_v4(ref_cache.data(), page_size, gather[g], ref.data());
    else ref_dequant_v32(ref_cache.data(), gather[g], ref.data());
    for (int d = 0; d < dim; ++d) {
      const double got = bf16_value(out[g * dim + d]), want = ref[size_t(d)];
      if (!(got == want || (isnan(got) && isnan(want))) || (got == 0 && signbit(got) != signbit(want))) ++mism;
    }
  }
  expect(mism == 0, ctx + " dequant values: " + std::to_string(mism) + " differ");

  // Out-of-range ids: error before any write.
  const std::vector<uint8_t> before = cache;
  std::vector<int64_t> bad = {0, cap, 1};
  std::vector<uint16_t> out3(3 * size_t(dim), 0x1234);
  expect(core(smla_quantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                            .num_pages = num_pages, .token_ids = bad.data(), .num_tokens = 3,
                                            .rows = rows, .rows_dtype = dt}) ==
             SMLA_ERR_OUT_OF_RANGE,
         ctx + " quantize id=cap rejected");
  bad[1] = -1;
  expect(core(smla_quantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                            .num_pages = num_pages, .token_ids = bad.data(), .num_tokens = 3,
                                            .rows = rows, .rows_dtype = dt}) ==
             SMLA_ERR_OUT_OF_RANGE,
         ctx + " quantize id=-1 rejected");
  bad[1] = int64_t(1) << 40;
  expect(core(smla_dequantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                              .num_pages = num_pages, .token_ids = bad.data(),
                                              .num_tokens = 3, .out = out3.data()}) ==
             SMLA_ERR_OUT_OF_RANGE,
         ctx + " dequant id=2^40 rejected");
  expect(cache == before, ctx + " cache untouched by rejected calls");
  bool out_untouched = true;
  for (auto v : out3) out_untouched &= v == 0x1234;
  expect(out_untouched, ctx + " dequant output untouched by rejected call");
}

// Dequantize caches of raw random bytes: every e4m3 code and every scale byte, including 0
// (2^-127, float32 subnormal products), 255 (NaN) and 254 (products that overflow to inf).
void check_dequant_raw_bytes(int format, int32_t page_size, int32_t num_pages) {
  const bool v4 = format == SMLA_CACHE_V4;
  const int dim = v4 ? 512 : 576;
  const int64_t cap = int64_t(page_size) * num_pages;
  const int64_t bytes = v4 ? v4_page_bytes(page_size) * num_pages : cap * 656;
  std::vector<uint8_t> cache(static_cast<size_t>(bytes));
  for (auto& b : cache) b = uint8_t(randint(0, 255));
  if (!v4) {  // v32 scales are float32: use powers of two over the whole range, plus NaN and inf
    for (int64_t t = 0; t < cap; ++t)
      for (int i = 0; i < 4; ++i) {
        const int64_t k = randint(0, 20);
        const float sc = k == 0 ? NAN : k == 1 ? INFINITY : k == 2 ? 0.0f : float(ldexp(1.0, int(randint(-149, 127))));
        memcpy(&cache[size_t(t * 656 + 512 + 4 * i)], &sc, 4);
      }
  }
  std::vector<int64_t> ids(static_cast<size_t>(cap));
  for (int64_t t = 0; t < cap; ++t) ids[size_t(t)] = t;
  std::vector<uint16_t> out(size_t(cap) * dim);
  expect(core(smla_dequantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                              .num_pages = num_pages, .token_ids = ids.data(),
                                              .num_tokens = int32_t(cap), .out = out.data()}) == SMLA_OK,
         "raw dequant status");
  std::vector<double> ref(static_cast<size_t>(dim));
  size_t mism = 0;
  for (int64_t t = 0; t < cap; ++t) {
    if (v4) ref_dequant_v4(cache.data(), page_size, t, ref.data());
    else ref_dequant_v32(cache.data(), t, ref.data());
    for (int d = 0; d < dim; ++d) {
      const double got = bf16_value(out[size_t(t * dim + d)]), want = ref[size_t(d)];
      const bool same = (isnan(got) && isnan(want)) || (got == want && signbit(got) == signbit(want));
      if (!same && mism++ < 3)
        fprintf(stderr, "  raw dequant token %lld dim %d: got %g want %g\n", (long long)t, d, got, want);
    }
  }
  expect(mism == 0, std::string(v4 ? "v4" : "v32") + " raw-byte dequant: " + std::to_string(mism) + " differ");
}

// Compares dequantized rows (bf16 bits, or the float32 rows paged attention reads) with the
// float64 reference: same value and sign, or both NaN. Prints the first few differences.
size_t count_dequant_mismatches(const std::string& ctx, const double* want, const uint16_t* got_bf16,
                                const float* got_f32, int n) {
  size_t mism = 0;
  for (int d = 0; d < n; ++d) {
    const double got = got_bf16 ? bf16_value(got_bf16[d]) : double(got_f32[d]);
    const bool same = (isnan(got) && isnan(want[d])) || (got == want[d] && signbit(got) == signbit(want[d]));
    if (!same && mism++ < 3) fprintf(stderr, "  %s dim %d: got %g want %g\n", ctx.c_str(), d, got, want[d]);
  }
  return mism;
}

// The bf16 bits of one e4m3 code times one float32 scale (given as its bits): SPEC §3's value (the
// product rounded to float32, then to bf16) from the formats' definitions in double, and for NaN
// results, whose bits SPEC leaves open (it asks only for a NaN), the one rule every path and build
// is held to: a NaN scale gives its own NaN quieted, top half ((bits >> 16) | 0x40, float_to_bf16's
// rule), for every code, NaN codes included; a NaN code (0x7f / 0xff) times any other scale gives
// 0x7fc0 | the code's sign; a ±0 code times a ±inf scale (the one NaN from two numbers) 0x7fc0.
// None of these is left to the multiplication: NaN x NaN keeps the operand the instruction has
// first (the compiler's choice), 0 x inf gives the ISA's default NaN (x86-64 0xffc0, AArch64 0x7fc0).
uint16_t expected_dequant_bits(uint8_t code, uint32_t scale_bits) {
  if ((scale_bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((scale_bits >> 16) | 0x40);
  if ((code & 0x7f) == 0x7f) return uint16_t(0x7fc0 | (code & 0x80) << 8);
  float scale;
  memcpy(&scale, &scale_bits, 4);
  const double product = e4m3_value(code) * double(scale);  // exact: 4 significant bits times 24
  if (isnan(product)) return 0x7fc0;  // ±0 x ±inf
  return bf16_bits_of(to_bf16_value(to_float32(product)));
}

uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// v4's scale byte as the float32 bits it stands for: 2^(byte - 127) (byte 0 the subnormal 2^-127),
// and for the NaN byte 0xFF the quiet NaN 0x7fc00000, so that its results are 0x7fc0.
uint32_t v4_scale_bits(uint8_t byte) { return byte == 0xff ? 0x7fc00000u : bits_of(float(ldexp(1.0, int(byte) - 127))); }

// Results that are NaN (expected_dequant_bits) whose bits are not the rule's; counts them.
size_t count_nan_bit_mismatches(const uint8_t* nope, int nope_dims, int tile, const float* tile_scales,
                                const uint16_t* got_bf16, const float* got_f32) {
  size_t mism = 0;
  for (int d = 0; d < nope_dims; ++d) {
    const uint16_t want = expected_dequant_bits(nope[d], bits_of(tile_scales[d / tile]));
    if ((want & 0x7fff) <= 0x7f80) continue;  // not a NaN: its value is checked against the reference
    uint32_t got;
    if (got_bf16) got = got_bf16[d];
    else {
      memcpy(&got, &got_f32[d], 4);
      if (got & 0xffff) ++mism;
      got >>= 16;
    }
    mism += got != want;
  }
  return mism;
}

// v4's tile scales as float32, a NaN byte (0xFF) as the core decodes it (formats.h: 0x7fc00000).
void v4_tile_scales(const uint8_t* scale_record, float* tile_scales) {
  for (int i = 0; i < 7; ++i) tile_scales[i] = scale_record[i] == 0xff ? __builtin_nanf("") : float(ue8m0_value(scale_record[i]));
}

// Every e4m3 code times every ue8m0 scale byte, deterministically (random bytes only make it
// likely): 0 (2^-127: subnormal products, rounded), 1..9 (some products subnormal), 10..246 (the
// exact range), 247..254 (products that overflow to inf), 255 (NaN scale). Tile g of the cache
// (token g / 7, tile g % 7) has scale byte g % 256 and the g / 256-th quarter of the codes, rotated
// so a code meets several vector lanes. Both outputs: the dequant op's bf16 and the float32 rows.
void check_dequant_every_code_v4() {
  constexpr int32_t P = 64, pages = 4;
  constexpr int64_t cap = int64_t(P) * pages;  // 256 tokens, 1792 tiles: each scale byte 7 times
  std::mt19937_64 gen(4242);
  std::vector<uint8_t> cache(static_cast<size_t>(v4_page_bytes(P) * pages));
  std::vector<uint8_t> seen(256 * 256, 0);  // [scale byte][code]
  for (int64_t t = 0; t < cap; ++t) {
    uint8_t* data = cache.data() + (t / P) * v4_page_bytes(P) + (t % P) * 576;
    uint8_t* sc = cache.data() + (t / P) * v4_page_bytes(P) + int64_t(P) * 576 + (t % P) * 8;
    for (int i = 0; i < 7; ++i) {
      const int64_t g = t * 7 + i, occ = g / 256;
      sc[i] = uint8_t(g % 256);
      for (int j = 0; j < 64; ++j) {
        const uint8_t code = uint8_t(64 * (occ % 4) + (j + 21 * (occ / 4)) % 64);
        data[64 * i + j] = code;
        seen[size_t(sc[i]) * 256 + code] = 1;
      }
    }
    sc[7] = 0;
    for (int b = 448; b < 576; ++b) data[b] = uint8_t(gen());  // rope: any bf16 bits, copied
  }
  size_t combos = 0;
  for (auto s : seen) combos += s;
  expect(combos == 256 * 256, "every-code v4: " + std::to_string(combos) + " of 65536 (code, scale byte) pairs");
  std::vector<int64_t> ids(static_cast<size_t>(cap));
  for (int64_t t = 0; t < cap; ++t) ids[size_t(t)] = t;
  std::vector<uint16_t> out(size_t(cap) * 512);
  expect(core(smla_dequantize_kv_cache_params{.format = SMLA_CACHE_V4, .cache = cache.data(), .page_size = P,
                                              .num_pages = pages, .token_ids = ids.data(),
                                              .num_tokens = int32_t(cap), .out = out.data()}) == SMLA_OK,
         "every-code v4 dequant status");
  std::vector<double> ref(512);
  std::vector<float> row_f32(512);
  size_t mism_bf16 = 0, mism_f32 = 0, rope_bits = 0, nan_bits = 0, scalar_bits = 0;
  for (int64_t t = 0; t < cap; ++t) {
    ref_dequant_v4(cache.data(), P, t, ref.data());
    const std::string ctx = "every-code v4 token " + std::to_string(t);
    mism_bf16 += count_dequant_mismatches(ctx + " bf16", ref.data(), &out[size_t(t) * 512], nullptr, 512);
    const uint8_t* data = cache.data() + (t / P) * v4_page_bytes(P) + (t % P) * 576;
    smla::cpu::dequant_v4_token_f32(data, cache.data() + (t / P) * v4_page_bytes(P) + int64_t(P) * 576 + (t % P) * 8,
                                    row_f32.data());
    mism_f32 += count_dequant_mismatches(ctx + " f32", ref.data(), nullptr, row_f32.data(), 512);
    float tile_scales[7];
    v4_tile_scales(cache.data() + (t / P) * v4_page_bytes(P) + int64_t(P) * 576 + (t % P) * 8, tile_scales);
    nan_bits += count_nan_bit_mismatches(data, 448, 64, tile_scales, &out[size_t(t) * 512], nullptr);
    nan_bits += count_nan_bit_mismatches(data, 448, 64, tile_scales, nullptr, row_f32.data());
    // the vector paths and the scalar dequantize_nope: the same bits, both outputs
    const uint8_t* sc = cache.data() + (t / P) * v4_page_bytes(P) + int64_t(P) * 576 + (t % P) * 8;
    for (int d = 0; d < 448; ++d) {
      const uint16_t scalar = smla::v4::dequantize_nope(data[d], sc[d / 64]);
      scalar_bits += out[size_t(t) * 512 + d] != scalar;
      scalar_bits += bits_of(row_f32[size_t(d)]) != uint32_t(scalar) << 16;
    }
    // the rope dims are copies: their bits, NaN payloads included
    rope_bits += memcmp(&out[size_t(t) * 512 + 448], data + 448, 128) != 0;
  }
  expect(mism_bf16 == 0, "every-code v4 dequant op (bf16): " + std::to_string(mism_bf16) + " differ");
  expect(mism_f32 == 0, "every-code v4 float32 rows: " + std::to_string(mism_f32) + " differ");
  expect(rope_bits == 0, "every-code v4: rope bits of " + std::to_string(rope_bits) + " tokens differ");
  expect(nan_bits == 0, "every-code v4: " + std::to_string(nan_bits) + " NaN results (NaN codes or scale byte 0xFF) not the rule's bits");
  expect(scalar_bits == 0, "every-code v4: " + std::to_string(scalar_bits) + " values (bf16 or float32) not dequantize_nope's bits");
}

// v32 scale edge cases: SPEC's and float32's (±0, ±inf, NaNs, subnormals, the bounds of the exact
// range 2^-117 .. 2^119 and one step past them, FLT_MAX, negative powers of two, scales whose
// products tie at bf16 rounding).
const uint32_t kV32EdgeScaleBits[] = {
    0x00000000u, 0x80000000u, 0x7fc00000u, 0xffc00000u, 0x7f800001u /* signaling */, 0x7fffffffu,
    0x7f800000u, 0xff800000u, 0x00000001u /* 2^-149 */, 0x00400000u /* 2^-127 */, 0x007fffffu,
    0x00800000u /* 2^-126 */, 0x00800001u, 0x05000000u /* 2^-117 */, 0x04800000u /* 2^-118 */,
    0x7b000000u /* 2^119 */, 0x7b800000u /* 2^120 */, 0x7f000000u /* 2^127 */, 0x7f7fffffu /* FLT_MAX */,
    0xbf800000u /* -1 */, 0xbb000000u /* -2^-9 */, 0x3f800000u /* 1 */, 0x3f808000u /* 1 + 2^-8: ties */,
    0x3f818000u /* 1 + 3·2^-8 */, 0x3f800001u, 0x3fffffffu, 0x3fc00000u /* 1.5 */, 0x40400000u /* 3 */,
    0x3eaaaaabu /* 1/3 */, 0xbdcccccdu /* -0.1 */, 0x00012345u /* subnormal, not a power of two */};

// v32's float32 scales are any float: every e4m3 code times SPEC's and float32's edge cases (±0,
// ±inf, NaNs, subnormals, the bounds of the exact range 2^-117 .. 2^119 and one step past them,
// FLT_MAX, negative powers of two, scales whose products tie at bf16 rounding) and random bit
// patterns. Tiles 2k and 2k + 1 share scale k and hold the two halves of the code space.
void check_dequant_every_code_v32() {
  std::mt19937_64 gen(777);
  std::vector<uint32_t> scales(std::begin(kV32EdgeScaleBits), std::end(kV32EdgeScaleBits));
  for (int k = 0; k < 100; ++k) scales.push_back(uint32_t(gen()));
  if (scales.size() % 2) scales.push_back(0x3f800000u);
  const int64_t cap = int64_t(scales.size()) / 2;  // 4 tiles a token, 2 tiles a scale
  std::vector<uint8_t> cache(static_cast<size_t>(cap * 656));
  for (int64_t t = 0; t < cap; ++t) {
    uint8_t* tok = cache.data() + t * 656;
    for (int i = 0; i < 4; ++i) {
      const int64_t g = t * 4 + i;
      memcpy(tok + 512 + 4 * i, &scales[size_t(g / 2)], 4);
      for (int j = 0; j < 128; ++j) tok[128 * i + j] = uint8_t(128 * (g % 2) + (j + 5 * t) % 128);
    }
    for (int b = 528; b < 656; ++b) tok[b] = uint8_t(gen());
  }
  std::vector<int64_t> ids(static_cast<size_t>(cap));
  for (int64_t t = 0; t < cap; ++t) ids[size_t(t)] = cap - 1 - t;  // a gather, not the identity
  std::vector<uint16_t> out(size_t(cap) * 576);
  expect(core(smla_dequantize_kv_cache_params{.format = SMLA_CACHE_V32, .cache = cache.data(), .page_size = 1,
                                              .num_pages = int32_t(cap), .token_ids = ids.data(),
                                              .num_tokens = int32_t(cap), .out = out.data()}) == SMLA_OK,
         "every-code v32 dequant status");
  std::vector<double> ref(576);
  size_t mism = 0, rope_bits = 0, nan_bits = 0, scalar_bits = 0;
  for (int64_t k = 0; k < cap; ++k) {
    const int64_t t = ids[size_t(k)];
    ref_dequant_v32(cache.data(), t, ref.data());
    float tile_scales[4];
    memcpy(tile_scales, cache.data() + t * 656 + 512, sizeof tile_scales);
    for (int d = 0; d < 512; ++d)  // the vector paths and the scalar dequantize_nope: the same bits
      scalar_bits += out[size_t(k) * 576 + d] != smla::v32::dequantize_nope(cache[size_t(t * 656 + d)], tile_scales[d / 128]);
    nan_bits += count_nan_bit_mismatches(cache.data() + t * 656, 512, 128, tile_scales, &out[size_t(k) * 576], nullptr);
    mism += count_dequant_mismatches("every-code v32 token " + std::to_string(t), ref.data(),
                                     &out[size_t(k) * 576], nullptr, 576);
    rope_bits += memcmp(&out[size_t(k) * 576 + 512], cache.data() + t * 656 + 528, 128) != 0;
  }
  expect(mism == 0, "every-code v32 dequant op: " + std::to_string(mism) + " differ (" +
                        std::to_string(scales.size()) + " scales x 256 codes)");
  expect(rope_bits == 0, "every-code v32: rope bits of " + std::to_string(rope_bits) + " tokens differ");
  expect(nan_bits == 0, "every-code v32: " + std::to_string(nan_bits) + " NaN results (NaN codes or scales: quiet, signaling, both signs, payloads; zero codes x infinite scales) not the rule's bits");
  expect(scalar_bits == 0, "every-code v32: " + std::to_string(scalar_bits) + " values not dequantize_nope's bits");
}

// The scalar per-element dequant of kv_cache_layout.h (v4 / v32 dequantize_nope: the CUDA check's
// reference, and through dequantize_e4m3 the SIMD paths' rule for NaN and infinite scales) against
// expected_dequant_bits, bit for bit: every code times every v4 scale byte, and every code times
// the v32 edge scales, NaNs of both signs (quiet, signaling, payloads), random bit patterns and
// random NaNs (fresh: `seed`). Its NaN x NaN and 0 x inf are no longer the multiplication's.
void check_dequantize_nope(uint64_t seed) {
  size_t v4_mism = 0, v4_nan_nan = 0;
  for (int b = 0; b < 256; ++b)
    for (int c = 0; c < 256; ++c) {
      const uint16_t got = smla::v4::dequantize_nope(uint8_t(c), uint8_t(b)), want = expected_dequant_bits(uint8_t(c), v4_scale_bits(uint8_t(b)));
      if (got != want && v4_mism++ < 3) fprintf(stderr, "  v4 dequantize_nope(0x%02x, 0x%02x) = 0x%04x, want 0x%04x\n", c, b, got, want);
      v4_nan_nan += b == 0xff && (c & 0x7f) == 0x7f;
    }
  expect(v4_nan_nan == 2, "dequantize_nope v4: both NaN codes met the NaN scale byte");
  expect(v4_mism == 0, "dequantize_nope v4, every code x every scale byte: " + std::to_string(v4_mism) + " of 65536 bits differ");

  std::mt19937_64 gen(seed);
  std::vector<uint32_t> scales(std::begin(kV32EdgeScaleBits), std::end(kV32EdgeScaleBits));
  for (uint32_t sign : {0u, 0x80000000u})
    for (uint32_t nan : {0x7fc00000u, 0x7fc00001u, 0x7f800001u, 0x7fbfffffu, 0x7fffffffu, 0x7fa12345u, 0x7fd5aa55u})
      scales.push_back(sign | nan);
  for (int k = 0; k < 256; ++k) scales.push_back(uint32_t(gen()));
  for (int k = 0; k < 64; ++k) {
    const uint32_t mantissa = uint32_t(gen()) & 0x7fffffu;
    scales.push_back((uint32_t(gen()) & 0x80000000u) | 0x7f800000u | (mantissa ? mantissa : 1u));
  }
  size_t v32_mism = 0, nan_nan = 0, zero_inf = 0;
  for (const uint32_t sb : scales) {
    float scale;
    memcpy(&scale, &sb, 4);
    const bool scale_nan = (sb & 0x7fffffffu) > 0x7f800000u, scale_inf = (sb & 0x7fffffffu) == 0x7f800000u;
    for (int c = 0; c < 256; ++c) {
      const uint16_t got = smla::v32::dequantize_nope(uint8_t(c), scale), want = expected_dequant_bits(uint8_t(c), sb);
      if (got != want && v32_mism++ < 3)
        fprintf(stderr, "  v32 dequantize_nope(0x%02x, scale bits 0x%08x) = 0x%04x, want 0x%04x\n", c, sb, got, want);
      nan_nan += scale_nan && (c & 0x7f) == 0x7f;
      zero_inf += scale_inf && (c & 0x7f) == 0;
    }
  }
  expect(nan_nan >= 2 * 14 && zero_inf >= 4, "dequantize_nope v32: NaN codes met NaN scales (" + std::to_string(nan_nan) +
                                                 "), zero codes infinite ones (" + std::to_string(zero_inf) + ")");
  expect(v32_mism == 0, "dequantize_nope v32, every code x " + std::to_string(scales.size()) + " scales (seed " +
                            std::to_string(seed) + "): " + std::to_string(v32_mism) + " bits differ");
}

// Fresh random caches on every run (seed printed; SMLA_CHECK_SEED=N repeats one): random bytes,
// a shuffled copy of all 256 e4m3 codes in some tiles, v4 scale bytes 0..255, v32 scales mixing
// random float32 bit patterns, signed powers of two over the whole float32 range and the edge
// cases above. The cache, the bf16 output and the float32 rows sit at random misalignments, and
// tokens are gathered in random order with repeats. Against the float64 reference.
void check_dequant_fresh(uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); };
  const std::string tag = " (seed " + std::to_string(seed) + ")";
  for (const bool v4 : {true, false}) {
    const int32_t P = v4 ? int32_t(std::array<int32_t, 3>{2, 64, 256}[size_t(pick(0, 2))]) : 1;
    const int32_t pages = v4 ? int32_t((300 + P - 1) / P) : 300;
    const int64_t cap = int64_t(P) * pages;
    const int dim = v4 ? 512 : 576, nope = v4 ? 448 : 512;
    const int64_t bytes = v4 ? v4_page_bytes(P) * pages : cap * 656;
    const size_t cache_off = size_t(pick(0, 63)), out_off = size_t(pick(0, 31)), f32_off = size_t(pick(0, 15));
    std::vector<uint8_t> buf(size_t(bytes) + 64);
    for (auto& b : buf) b = uint8_t(gen());
    uint8_t* const cache = buf.data() + cache_off;
    auto nope_of = [&](int64_t t) {
      return v4 ? cache + (t / P) * v4_page_bytes(P) + (t % P) * 576 : cache + t * 656;
    };
    std::array<uint8_t, 256> codes;
    for (int c = 0; c < 256; ++c) codes[size_t(c)] = uint8_t(c);
    for (int64_t t = 0; t < cap; t += 16) {  // every code, in a fresh order, at a fresh place
      std::shuffle(codes.begin(), codes.end(), gen);
      memcpy(nope_of(t) + pick(0, nope - 256), codes.data(), 256);
    }
    if (!v4)
      for (int64_t t = 0; t < cap; ++t)
        for (int i = 0; i < 4; ++i) {
          const int64_t kind = pick(0, 9);
          uint32_t bits = uint32_t(gen());
          if (kind < 4) {
            const float power = float(ldexp(pick(0, 1) ? -1.0 : 1.0, int(pick(-149, 127))));
            memcpy(&bits, &power, 4);
          }
          else if (kind < 6) bits = kV32EdgeScaleBits[size_t(pick(0, std::size(kV32EdgeScaleBits) - 1))];
          memcpy(cache + t * 656 + 512 + 4 * i, &bits, 4);
        }
    const int64_t n = 2 * cap;
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (auto& id : ids) id = pick(0, cap - 1);
    std::vector<uint16_t> out(size_t(n) * dim + 32, 0x1234);
    const std::string ctx = std::string(v4 ? "fresh v4 P=" + std::to_string(P) : "fresh v32") + tag;
    expect(core(smla_dequantize_kv_cache_params{.format = v4 ? SMLA_CACHE_V4 : SMLA_CACHE_V32, .cache = cache,
                                                .page_size = P, .num_pages = pages, .token_ids = ids.data(),
                                                .num_tokens = int32_t(n), .out = out.data() + out_off}) == SMLA_OK,
           ctx + " dequant status");
    std::vector<double> ref(static_cast<size_t>(dim));
    std::vector<float> row_f32(512 + 16);
    std::array<bool, 256> seen{};
    size_t mism_bf16 = 0, mism_f32 = 0, nan_bits = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t t = ids[size_t(k)];
      for (int i = 0; i < nope; ++i) seen[nope_of(t)[i]] = true;
      if (v4) ref_dequant_v4(cache, P, t, ref.data());
      else ref_dequant_v32(cache, t, ref.data());
      const std::string row = ctx + " token " + std::to_string(t);
      const uint16_t* got = &out[out_off + size_t(k) * dim];
      mism_bf16 += count_dequant_mismatches(row + " bf16", ref.data(), got, nullptr, dim);
      float tile_scales[7];
      const uint8_t* scale_record = v4 ? cache + (t / P) * v4_page_bytes(P) + int64_t(P) * 576 + (t % P) * 8
                                       : cache + t * 656 + 512;
      if (v4) v4_tile_scales(scale_record, tile_scales);
      else memcpy(tile_scales, scale_record, 16);
      nan_bits += count_nan_bit_mismatches(nope_of(t), nope, v4 ? 64 : 128, tile_scales, got, nullptr);
      if (v4) {
        smla::cpu::dequant_v4_token_f32(nope_of(t), scale_record, row_f32.data() + f32_off);
        mism_f32 += count_dequant_mismatches(row + " f32", ref.data(), nullptr, row_f32.data() + f32_off, 512);
        nan_bits += count_nan_bit_mismatches(nope_of(t), nope, 64, tile_scales, nullptr, row_f32.data() + f32_off);
      }
    }
    bool guard = true;  // nothing written outside the output rows
    for (size_t i = 0; i < out.size(); ++i)
      if (i < out_off || i >= out_off + size_t(n) * dim) guard &= out[i] == 0x1234;
    expect(std::count(seen.begin(), seen.end(), true) == 256, ctx + ": not every e4m3 code was gathered");
    expect(mism_bf16 == 0, ctx + " dequant op (bf16): " + std::to_string(mism_bf16) + " differ");
    if (v4) expect(mism_f32 == 0, ctx + " float32 rows: " + std::to_string(mism_f32) + " differ");
    expect(nan_bits == 0, ctx + ": " + std::to_string(nan_bits) + " NaN results (NaN codes or scales) not the rule's bits");
    expect(guard, ctx + ": written outside the output rows");
  }
}

void check_cache_args() {
  std::vector<uint8_t> cache(static_cast<size_t>(v4_page_bytes(2) * 2));
  int64_t id = 0;
  float row[576] = {};
  uint16_t out[576];
  expect(core(smla_quantize_kv_cache_params{.format = 7, .cache = cache.data(), .page_size = 2,
                                            .num_pages = 2, .token_ids = &id, .num_tokens = 1, .rows = row,
                                            .rows_dtype = 0}) == SMLA_ERR_INVALID_ARGUMENT, "bad format");
  expect(core(smla_quantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 0,
                                            .num_pages = 2, .token_ids = &id, .num_tokens = 1, .rows = row,
                                            .rows_dtype = 0}) == SMLA_ERR_INVALID_ARGUMENT, "page 0");
  expect(core(smla_quantize_kv_cache_params{.format = 1, .cache = cache.data(), .page_size = 2,
                                            .num_pages = 2, .token_ids = &id, .num_tokens = 1, .rows = row,
                                            .rows_dtype = 0}) == SMLA_ERR_INVALID_ARGUMENT, "v32 P=2");
  expect(core(smla_quantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 2,
                                            .num_pages = 2, .token_ids = &id, .num_tokens = 1, .rows = row,
                                            .rows_dtype = 9}) == SMLA_ERR_INVALID_ARGUMENT, "bad dtype");
  expect(core(smla_quantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 2,
                                            .num_pages = 2, .num_tokens = 1, .rows = row,
                                            .rows_dtype = 0}) == SMLA_ERR_INVALID_ARGUMENT, "null ids");
  expect(core(smla_quantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 2,
                                            .num_pages = 2, .token_ids = &id, .num_tokens = 1,
                                            .rows_dtype = 0}) == SMLA_ERR_INVALID_ARGUMENT, "null rows");
  expect(core(smla_dequantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 2,
                                              .num_pages = 2, .token_ids = &id,
                                              .num_tokens = 1}) == SMLA_ERR_INVALID_ARGUMENT, "null out");
  expect(core(smla_dequantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 2,
                                              .num_pages = 2, .token_ids = &id, .num_tokens = -1,
                                              .out = out}) == SMLA_ERR_INVALID_ARGUMENT, "n < 0");
  expect(core(smla_dequantize_kv_cache_params{.format = 0, .cache = cache.data(), .page_size = 2,
                                              .num_pages = 2, .token_ids = &id, .num_tokens = 0,
                                              .out = out}) == SMLA_OK, "n = 0");
}

// ---------------------------------------------------------------- paged attention checks
struct PagedCase {
  int n, h_q;
  int32_t P, pages, topk;
  bool extra;
  int32_t eP, epages, etopk;
  bool lengths, sink;
};

std::vector<uint8_t> random_v4_cache(int32_t P, int32_t pages) {
  const int64_t cap = int64_t(P) * pages;
  std::vector<uint8_t> cache(static_cast<size_t>(v4_page_bytes(P) * pages), 0);
  std::vector<float> rows(static_cast<size_t>(cap) * 512);
  for (auto& v : rows) v = float(normal(1.0));
  std::vector<int64_t> ids(static_cast<size_t>(cap));
  for (int64_t i = 0; i < cap; ++i) ids[size_t(i)] = i;
  if (core(smla_quantize_kv_cache_params{.format = SMLA_CACHE_V4, .cache = cache.data(), .page_size = P,
                                         .num_pages = pages, .token_ids = ids.data(),
                                         .num_tokens = int32_t(cap), .rows = rows.data(),
                                         .rows_dtype = SMLA_ROWS_F32}) != SMLA_OK)
    expect(false, "paged: cache setup");
  return cache;
}

void check_paged(const PagedCase& c) {
  const std::string ctx = "paged n=" + std::to_string(c.n) + " hQ=" + std::to_string(c.h_q) + " P=" +
                          std::to_string(c.P) + " topk=" + std::to_string(c.topk) +
                          (c.extra ? " extra P=" + std::to_string(c.eP) + " topk=" + std::to_string(c.etopk) : "") +
                          (c.lengths ? " len" : "") + (c.sink ? " sink" : "");
  const int D = 512;
  const auto cache = random_v4_cache(c.P, c.pages);
  const auto ecache = c.extra ? random_v4_cache(c.eP, c.epages) : std::vector<uint8_t>();
  const auto q = random_bf16(size_t(c.n) * c.h_q * D, 1.0);
  IndexOpts io;
  const auto idx = random_indices(c.n, c.topk, c.P * c.pages, io);
  const auto eidx = random_indices(c.n, c.etopk, c.eP * c.epages, io);
  const auto len = random_lengths(c.n, c.topk), elen = random_lengths(c.n, c.etopk);
  const auto sink = random_sink(c.h_q, true);
  const float scale = float(1.0 / sqrt(576.0));

  std::vector<uint16_t> out(static_cast<size_t>(c.n) * c.h_q * D);
  std::vector<float> lse(static_cast<size_t>(c.n) * c.h_q), ml(size_t(c.n) * c.h_q);
  const int32_t st = core(smla_paged_sparse_attention_params{.q = q.data(), .n = c.n, .h_q = c.h_q,
                                                             .k_cache = cache.data(), .page_size = c.P,
                                                             .num_pages = c.pages, .indices = idx.data(),
                                                             .topk = c.topk,
                                                             .topk_length = c.lengths ? len.data() : nullptr,
                                                             .extra_k_cache = c.extra ? ecache.data() : nullptr,
                                                             .extra_page_size = c.eP,
                                                             .extra_num_pages = c.epages,
                                                             .extra_indices = c.extra ? eidx.data() : nullptr,
                                                             .extra_topk = c.etopk,
                                                             .extra_topk_length = c.lengths ? elen.data() : nullptr,
                                                             .attn_sink = c.sink ? sink.data() : nullptr,
                                                             .sm_scale = scale, .out = out.data(),
                                                             .lse = lse.data(), .max_logits = ml.data()});
  expect(st == SMLA_OK, ctx + ": status " + std::to_string(st));

  // Reference: dequantize every token of both caches, then the §4 loop over the union.
  std::vector<double> main_rows(static_cast<size_t>(c.P) * c.pages * D), extra_rows(size_t(c.eP) * c.epages * D);
  for (int64_t t = 0; t < int64_t(c.P) * c.pages; ++t) ref_dequant_v4(cache.data(), c.P, t, &main_rows[size_t(t * D)]);
  if (c.extra)
    for (int64_t t = 0; t < int64_t(c.eP) * c.epages; ++t)
      ref_dequant_v4(ecache.data(), c.eP, t, &extra_rows[size_t(t * D)]);
  auto rows_of = [&](int64_t i) {
    std::vector<const double*> rows;
    const int lim = c.lengths ? std::min(std::max(len[size_t(i)], 0), c.topk) : c.topk;
    for (int k = 0; k < lim; ++k) {
      const int64_t id = idx[size_t(i * c.topk + k)];
      if (id >= 0 && id < int64_t(c.P) * c.pages) rows.push_back(&main_rows[size_t(id * D)]);
    }
    if (c.extra) {
      const int elim = c.lengths ? std::min(std::max(elen[size_t(i)], 0), c.etopk) : c.etopk;
      for (int k = 0; k < elim; ++k) {
        const int64_t id = eidx[size_t(i * c.etopk + k)];
        if (id >= 0 && id < int64_t(c.eP) * c.epages) rows.push_back(&extra_rows[size_t(id * D)]);
      }
    }
    return rows;
  };
  const auto qd = values_of(q);
  const RefOut ref = ref_attention(qd, c.n, c.h_q, D, D, rows_of, double(scale), c.sink ? sink.data() : nullptr);
  expect_placement("out", ctx, out.size(), [&](size_t i) { return bf16_value(out[i]); }, ref.out);
  expect_placement("lse", ctx, lse.size(), [&](size_t i) { return double(lse[i]); }, ref.lse);
  expect_placement("maxLogits", ctx, ml.size(), [&](size_t i) { return double(ml[i]); }, ref.max_logits);

  // The same attention as a sparse prefill over a workspace: every valid entry (main, then extra,
  // in order) dequantized by the dequant op and indexed from −1-padded rows. The paged path
  // dequantizes to the same bf16 values and attends them in the same order: equal bit for bit.
  std::vector<int64_t> main_ids, extra_ids;
  std::vector<std::vector<int32_t>> rows_ws(size_t(c.n));
  auto gather = [&](const std::vector<int32_t>& ix, const std::vector<int32_t>& ln, int tk, int64_t cap,
                    std::vector<int64_t>& ids, int64_t base_index, int64_t i) {
    const int lim = c.lengths ? std::min(std::max(ln[size_t(i)], 0), tk) : tk;
    for (int k = 0; k < lim; ++k) {
      const int64_t id = ix[size_t(i * tk + k)];
      if (id < 0 || id >= cap) continue;
      rows_ws[size_t(i)].push_back(int32_t(base_index + int64_t(ids.size())));
      ids.push_back(id);
    }
  };
  for (int64_t i = 0; i < c.n; ++i) gather(idx, len, c.topk, int64_t(c.P) * c.pages, main_ids, 0, i);
  // extra rows sit after every main row: count the main rows first, then index the extra ones
  const int64_t n_main = int64_t(main_ids.size());
  if (c.extra)
    for (int64_t i = 0; i < c.n; ++i) gather(eidx, elen, c.etopk, int64_t(c.eP) * c.epages, extra_ids, n_main, i);
  std::vector<uint16_t> ws((main_ids.size() + extra_ids.size()) * D + 1);
  if (!main_ids.empty())
    expect(core(smla_dequantize_kv_cache_params{.format = SMLA_CACHE_V4, .cache = cache.data(),
                                                .page_size = c.P, .num_pages = c.pages,
                                                .token_ids = main_ids.data(),
                                                .num_tokens = int32_t(main_ids.size()),
                                                .out = ws.data()}) == SMLA_OK,
           ctx + ": workspace dequant (main)");
  if (!extra_ids.empty())
    expect(core(smla_dequantize_kv_cache_params{.format = SMLA_CACHE_V4, .cache = ecache.data(),
                                                .page_size = c.eP, .num_pages = c.epages,
                                                .token_ids = extra_ids.data(),
                                                .num_tokens = int32_t(extra_ids.size()),
                                                .out = ws.data() + size_t(n_main) * D}) == SMLA_OK,
           ctx + ": workspace dequant (extra)");
  const int width = std::max(1, c.topk + (c.extra ? c.etopk : 0));
  std::vector<int32_t> ws_idx(size_t(c.n) * width, -1);
  for (int64_t i = 0; i < c.n; ++i)
    std::copy(rows_ws[size_t(i)].begin(), rows_ws[size_t(i)].end(), ws_idx.begin() + i * width);
  std::vector<uint16_t> out2(out.size());
  std::vector<float> ml2(ml.size()), lse2(lse.size());
  expect(core(smla_sparse_prefill_params{.q = q.data(), .kv = ws.data(), .indices = ws_idx.data(),
                                         .attn_sink = c.sink ? sink.data() : nullptr, .s_q = c.n,
                                         .h_q = c.h_q, .d_qk = D, .d_v = D,
                                         .s_kv = int32_t(main_ids.size() + extra_ids.size()), .topk = width,
                                         .sm_scale = scale, .out = out2.data(), .max_logits = ml2.data(),
                                         .lse = lse2.data()}) == SMLA_OK,
         ctx + ": workspace prefill status");
  expect_same_bits(ctx + " paged vs workspace prefill: out", out2, out);
  expect_same_bits(ctx + " paged vs workspace prefill: lse", lse2, lse);
  expect_same_bits(ctx + " paged vs workspace prefill: maxLogits", ml2, ml);
}

void check_paged_args() {
  std::vector<uint16_t> q(512), out(512);
  std::vector<uint8_t> cache(static_cast<size_t>(v4_page_bytes(2)));
  int32_t idx = 0;
  float lse;
  expect(core(smla_paged_sparse_attention_params{.q = q.data(), .n = 1, .h_q = 1, .k_cache = cache.data(),
                                                 .page_size = 0, .num_pages = 1, .indices = &idx, .topk = 1,
                                                 .extra_page_size = 0, .extra_num_pages = 0, .extra_topk = 0,
                                                 .sm_scale = 1.f, .out = out.data(),
                                                 .lse = &lse}) == SMLA_ERR_INVALID_ARGUMENT,
         "paged: page_size 0");
  expect(core(smla_paged_sparse_attention_params{.q = q.data(), .n = 1, .h_q = 1, .k_cache = cache.data(),
                                                 .page_size = 2, .num_pages = 1, .indices = &idx, .topk = 1,
                                                 .extra_k_cache = cache.data(), .extra_page_size = 0,
                                                 .extra_num_pages = 1, .extra_indices = &idx, .extra_topk = 1,
                                                 .sm_scale = 1.f, .out = out.data(), .lse = &lse}) ==
             SMLA_ERR_INVALID_ARGUMENT,
         "paged: extra page_size 0");
  expect(core(smla_paged_sparse_attention_params{.q = q.data(), .n = 1, .h_q = 1, .k_cache = cache.data(),
                                                 .page_size = 2, .num_pages = 1, .topk = 1,
                                                 .extra_page_size = 0, .extra_num_pages = 0, .extra_topk = 0,
                                                 .sm_scale = 1.f, .out = out.data(), .lse = &lse}) ==
             SMLA_ERR_INVALID_ARGUMENT,
         "paged: null indices");
  expect(core(smla_paged_sparse_attention_params{.q = q.data(), .n = 1, .h_q = 1, .k_cache = cache.data(),
                                                 .page_size = 2, .num_pages = 1, .indices = &idx, .topk = 1,
                                                 .extra_page_size = 0, .extra_num_pages = 0, .extra_topk = 0,
                                                 .sm_scale = 1.f, .out = out.data(), .lse = &lse}) == SMLA_OK,
         "paged: max_logits NULL allowed");
}

}  // namespace

int main() {
#if !defined(__wasm__)
  check_isa_path();
#endif
  check_cache_args();
  for (int32_t P : {2, 64, 256}) {
    check_cache(SMLA_CACHE_V4, P, P == 256 ? 2 : 5, false);
    check_cache(SMLA_CACHE_V4, P, P == 256 ? 2 : 5, true);
  }
  check_dequant_raw_bytes(SMLA_CACHE_V4, 64, 40);
  check_dequant_raw_bytes(SMLA_CACHE_V4, 2, 7);
  check_dequant_raw_bytes(SMLA_CACHE_V32, 1, 2000);
  check_dequant_every_code_v4();
  check_dequant_every_code_v32();
  {
    const char* env = getenv("SMLA_CHECK_SEED");
    const uint64_t seed = env ? strtoull(env, nullptr, 10) : (uint64_t(std::random_device{}()) << 32) | std::random_device{}();
    printf("core_check: fresh dequant inputs, seed %llu (SMLA_CHECK_SEED=%llu repeats them)\n",
           (unsigned long long)seed, (unsigned long long)seed);
    check_dequant_fresh(seed);
    check_dequantize_nope(seed);
  }
  check_cache(SMLA_CACHE_V32, 1, 300, false);
  check_cache(SMLA_CACHE_V32, 1, 300, true);

#if defined(SMLA_SIMD_HAS_EXP)
  check_vector_exp();
  check_vector_exp_frozen();
#endif
  check_prefill_special();
  check_prefill_single_entry();
  check_prefill_extreme_values();
  IndexOpts plain{0.1, 0.05, 0.1};
  IndexOpts heavy{0.5, 0.3, 0.25};
  const PrefillCase cases[] = {
      // s_q, h_q, d_qk, d_v, s_kv, topk, lengths, sink, sink_inf, q_sd, kv_sd, idx
      {1, 1, 512, 512, 128, 128, false, false, false, 1.0, 1.0, plain},
      {62, 16, 576, 512, 592, 128, true, true, true, 1.0, 1.0, plain},
      {13, 64, 512, 512, 1840, 256, true, true, false, 2.0, 1.0, plain},
      {5, 128, 576, 512, 1521, 512, false, true, true, 1.0, 2.0, heavy},
      {21, 16, 512, 512, 95, 128, true, false, false, 1.0, 1.0, heavy},
      {9, 3, 576, 512, 114, 384, true, true, true, 3.0, 3.0, plain},
      {7, 5, 128, 64, 40, 37, true, true, false, 1.0, 1.0, heavy},
      {4, 64, 512, 512, 4096, 640, false, true, false, 1.0, 1.0, IndexOpts{0.0, 0.0, 0.0}},
      {3, 2, 64, 64, 0, 16, false, true, true, 1.0, 1.0, plain},  // s_kv = 0: nothing valid
      {6, 7, 192, 128, 300, 200, true, true, true, 8.0, 4.0, plain},  // sharp softmax
  };
  for (const auto& c : cases) check_prefill(c);

  check_paged_args();
  const PagedCase pcases[] = {
      {5, 16, 64, 4, 128, false, 0, 0, 0, true, true},
      {3, 64, 2, 100, 100, true, 256, 1, 50, true, true},
      {4, 3, 256, 2, 70, true, 64, 3, 33, false, false},
      {2, 8, 64, 2, 0, true, 2, 20, 19, true, true},
  };
  for (const auto& c : pcases) check_paged(c);

  printf("core_check: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
