// Standalone check + benchmark of the CUDA kernels (native/cuda) against a float64 reference
// written here, independently of the kernels (SPEC §2–§5).
//
//   smla_cuda_check                 correctness grid: per case PASS/FAIL, then "N passed, N failed"
//   smla_cuda_check fuzz            adversarial indices, small shapes (run under compute-sanitizer)
//   smla_cuda_check bench [--json F] [--reps N]   TFLOPS / GB/s medians (CUDA events, L2 flushed)
#include <cuda_runtime.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <string>
#include <vector>

#include "smla_cuda.h"
#include "sparse_mla/formats.h"
#include "sparse_mla/kv_cache_layout.h"

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, \
              cudaGetErrorString(e_));                                                          \
      exit(3);                                                                                  \
    }                                                                                           \
  } while (0)

static void check_status(int32_t st, const char* what) {
  if (st != 0) {
    fprintf(stderr, "%s returned %d%s%s\n", what, st, st < 0 ? ": " : "",
            st < 0 ? cudaGetErrorString(cudaError_t(-st)) : "");
    exit(3);
  }
}

// ---------------------------------------------------------------- random numbers
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  int64_t range(int64_t lo, int64_t hi) { return lo + int64_t(next() % uint64_t(hi - lo)); }  // [lo, hi)
  double normal() {
    const double u = uniform() + 1e-300, v = uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
  }
};

// ---------------------------------------------------------------- reference number formats
// Written from SPEC §2 in float64, independently of the core's formats.h.
static double ref_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static double ref_e4m3(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const double mag = e == 0 ? m * ldexp(1.0, -9) : (1.0 + m / 8.0) * ldexp(1.0, e - 7);
  return s ? -mag : mag;
}
static double ref_ue8m0(uint8_t b) { return b == 0xff ? NAN : ldexp(1.0, int(b) - 127); }
// float32 value -> bf16 by round-to-nearest-even, decided on the exact value in float64.
static bool ref_round_bf16_is(double x, uint16_t got) {
  if (isnan(x)) return ((got & 0x7f80) == 0x7f80) && (got & 0x7f);
  const double g = ref_bf16(got);
  if (isinf(x) || isinf(g)) return x == g;
  // the bf16 neighbours of x: g must be the nearest, ties to an even mantissa.
  const uint16_t up = uint16_t(got + 1), dn = uint16_t(got - 1);
  const double dg = fabs(g - x);
  for (uint16_t nb : {up, dn}) {
    const double v = ref_bf16(nb);
    if (isnan(v)) continue;
    const double dv = fabs(v - x);
    if (dv < dg) return false;
    if (dv == dg && (got & 1)) return false;
  }
  if (x == 0.0) return g == 0.0 && (signbit(x) == signbit(g));
  return true;
}

// ---------------------------------------------------------------- comparison (SPEC §4 bounds)
// out: |got - ref| <= 2^-7 * mag + 1e-6 (mag = sum_k w_k |v_k|), 1 - cos <= 7e-6;
// lse: 1e-6 + 2^-15 * max(|lse|, |maxLogits|); maxLogits: 1e-6 + 2^-15 * |ref|.
struct Cmp {
  double cos_tol;  // < 0: not checked
  int64_t count = 0, failures = 0, infnan = 0;
  double worst = 0, dot = 0, ng = 0, nr = 0;
  explicit Cmp(double c) : cos_tol(c) {}
  void add(double got, double ref, double bound) {
    ++count;
    if (isnan(got) || isnan(ref) || isinf(got) || isinf(ref)) {
      const bool same = (isnan(got) && isnan(ref)) || (got == ref);
      if (!same) ++infnan, ++failures, worst = INFINITY;
      return;
    }
    const double ratio = fabs(got - ref) / bound;
    if (ratio > worst) worst = ratio;
    if (ratio > 1) ++failures;
    dot += got * ref, ng += got * got, nr += ref * ref;
  }
  double cos_gap() const {
    if (ng == 0 && nr == 0) return 0;
    if (ng == 0 || nr == 0) return 1;
    return 1.0 - 2 * dot / (ng + nr);
  }
  bool pass() const { return failures == 0 && (cos_tol < 0 || cos_gap() <= cos_tol); }
};
static double out_bound(double mag) { return ldexp(mag, -7) + 1e-6; }
static double lse_bound(double lse, double maxl) {
  const double a = std::max(isfinite(lse) ? fabs(lse) : 0.0, isfinite(maxl) ? fabs(maxl) : 0.0);
  return 1e-6 + ldexp(a, -15);
}
static double max_bound(double maxl) { return 1e-6 + ldexp(isfinite(maxl) ? fabs(maxl) : 0.0, -15); }

static int g_passed = 0, g_failed = 0;
static void report(const std::string& name, const std::vector<std::pair<const char*, Cmp*>>& parts,
                   const std::string& extra_fail = "") {
  bool ok = extra_fail.empty();
  for (auto& p : parts) ok = ok && p.second->pass();
  printf("%s %-52s", ok ? "PASS" : "FAIL", name.c_str());
  for (auto& p : parts)
    printf(" | %s worst %.3f 1-cos %.1e over %lld/%lld", p.first, p.second->worst, p.second->cos_gap(),
           (long long)p.second->failures, (long long)p.second->count);
  if (!extra_fail.empty()) printf(" | %s", extra_fail.c_str());
  printf("\n");
  fflush(stdout);
  (ok ? g_passed : g_failed)++;
}

// ---------------------------------------------------------------- float64 attention reference
// One query: rows[j] = pointer to the j-th valid kv row (decoded values), in entry order.
static void ref_attend(const double* q /*[hQ, dQK]*/, int hQ, int dQK, int dV, const std::vector<const double*>& rows,
                       double sm_scale, const float* sink, double* out /*[hQ, dV]*/, double* lse, double* maxl,
                       double* mag /*[hQ, dV]*/) {
  const size_t n = rows.size();
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < hQ; ++h) {
    std::vector<double> P(n);
    double m = -INFINITY;
    for (size_t k = 0; k < n; ++k) {
      double acc = 0;
      for (int d = 0; d < dQK; ++d) acc += q[size_t(h) * dQK + d] * rows[k][d];
      P[k] = acc * sm_scale;
      m = std::max(m, P[k]);
    }
    double* o = out + size_t(h) * dV;
    double* mg = mag + size_t(h) * dV;
    for (int d = 0; d < dV; ++d) o[d] = 0, mg[d] = 0;
    if (n == 0) {
      lse[h] = INFINITY;
      maxl[h] = -INFINITY;
      continue;
    }
    maxl[h] = m;
    if (m == -INFINITY) {
      lse[h] = -INFINITY;  // valid entries whose logits are all −inf: ln 0
    } else {
      double l = 0;
      for (size_t k = 0; k < n; ++k) l += exp(P[k] - m);
      lse[h] = m + log(l);
    }
    double denom_log = lse[h];
    if (sink) {
      const double s = sink[h];
      if (s == INFINITY) denom_log = INFINITY;
      else if (s != -INFINITY) denom_log = std::max(lse[h], s) + log1p(exp(-fabs(lse[h] - s)));
    }
    if (denom_log == INFINITY) continue;  // out = 0
    for (size_t k = 0; k < n; ++k) {
      const double w = exp(P[k] - denom_log);
      for (int d = 0; d < dV; ++d) o[d] += w * rows[k][d], mg[d] += w * fabs(rows[k][d]);
    }
  }
}

// ---------------------------------------------------------------- device buffers
template <class T>
struct DBuf {
  T* p = nullptr;
  size_t n = 0;
  DBuf() = default;
  explicit DBuf(size_t count) : n(count) { CK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
  DBuf(const DBuf&) = delete;
  ~DBuf() {
    if (p) cudaFree(p);
  }
  void up(const std::vector<T>& h) { CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> down() const {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

static uint16_t to_bf16(double x) { return smla::float_to_bf16(float(x)); }

// ---------------------------------------------------------------- index generation
enum IndexMode { kAllValid, kMixed, kAdversarial };
static int32_t invalid_index(Rng& r, int64_t s_kv) {
  switch (r.next() % 6) {
    case 0: return -1;
    case 1: return INT32_MIN;
    case 2: return int32_t(std::min<int64_t>(s_kv, INT32_MAX));
    case 3: return INT32_MAX;
    case 4: return -int32_t(r.range(2, 1 << 30));
    default: return int32_t(std::min<int64_t>(s_kv + r.range(0, 1 << 20), INT32_MAX));
  }
}
static std::vector<int32_t> make_indices(Rng& r, int64_t s_q, int topk, int64_t s_kv, IndexMode mode) {
  std::vector<int32_t> idx(size_t(s_q) * topk);
  for (auto& v : idx) {
    const double u = r.uniform();
    if (s_kv == 0 || (mode == kMixed && u < 0.25) || (mode == kAdversarial && u < 0.6)) v = invalid_index(r, s_kv);
    else v = int32_t(r.range(0, s_kv));
  }
  // duplicates: copy some entries onto others within a row
  if (mode != kAllValid && topk > 1)
    for (int64_t i = 0; i < s_q; ++i)
      for (int t = 0; t < topk / 8; ++t) idx[i * topk + r.range(0, topk)] = idx[i * topk + r.range(0, topk)];
  return idx;
}

// ---------------------------------------------------------------- sparse prefill checks
struct PrefillCase {
  std::string name;
  int64_t s_q;
  int h_q, d_qk, d_v;
  int64_t s_kv;
  int topk;
  IndexMode mode;
  bool lengths, sink, special_sinks;
  int samples;  // sampled queries (all if >= s_q)
  double q_scale;
  int empty_rows;  // leading queries whose entries are all invalid
  bool misaligned = false;  // q and kv 2 bytes off 16-byte alignment (takes the fallback kernel)
  int inf_rows = 0;  // kv rows [0, inf_rows) get dim 0 = −inf, q >= 0, query 0 attends only those
  double scale_mult = 1.0;  // times 1/sqrt(dQK): negative and zero scales are valid input
  double q_offset = 0.0;    // FlashMLA's test data: randn/10 + a small common offset
};

static void run_prefill_case(const PrefillCase& c, uint64_t seed) {
  Rng r(seed);
  const size_t nq = size_t(c.s_q) * c.h_q * c.d_qk, nkv = size_t(c.s_kv) * c.d_qk;
  std::vector<uint16_t> hq(nq), hkv(nkv);
  for (auto& v : hq) v = to_bf16(r.normal() * c.q_scale + c.q_offset);
  for (auto& v : hkv) v = to_bf16(r.normal() * (c.q_offset != 0 ? 0.1 : 1.0) + c.q_offset);
  std::vector<int32_t> idx = make_indices(r, c.s_q, c.topk, c.s_kv, c.mode);
  for (int64_t i = 0; i < std::min<int64_t>(c.empty_rows, c.s_q); ++i)
    for (int t = 0; t < c.topk; ++t) idx[i * c.topk + t] = (t & 1) ? -1 : int32_t(c.s_kv);
  if (c.inf_rows > 0) {
    for (auto& v : hq) v &= 0x7fff;  // q >= 0: dim 0 of an inf row gives a −inf logit
    for (int64_t r0 = 0; r0 < c.inf_rows; ++r0) hkv[size_t(r0) * c.d_qk] = 0xff80;
    for (int t = 0; t < c.topk; ++t) idx[t] = int32_t(r.range(0, c.inf_rows));
  }
  std::vector<int32_t> len;
  if (c.lengths) {
    len.resize(c.s_q);
    for (auto& v : len) v = int32_t(r.range(-3, c.topk + 4));
    if (c.s_q > 1) len[1] = 0;
  }
  std::vector<float> sink;
  if (c.sink) {
    sink.resize(c.h_q);
    for (auto& v : sink) v = float(r.normal() * 2);
    if (c.special_sinks && c.h_q >= 3) sink[0] = INFINITY, sink[1] = -INFINITY, sink[2] = 30.0f;
  }
  const double sm_scale = double(float(c.scale_mult / sqrt(double(c.d_qk))));

  const size_t shift = c.misaligned ? 1 : 0;
  DBuf<uint16_t> dq(nq + 8), dkv(nkv + 8), dout(size_t(c.s_q) * c.h_q * c.d_v);
  DBuf<int32_t> didx(idx.size()), dlen(len.size());
  DBuf<float> dsink(sink.size()), dlse(size_t(c.s_q) * c.h_q), dmax(size_t(c.s_q) * c.h_q);
  CK(cudaMemcpy(dq.p + shift, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkv.p + shift, hkv.data(), nkv * 2, cudaMemcpyHostToDevice));
  didx.up(idx);
  if (c.lengths) dlen.up(len);
  if (c.sink) dsink.up(sink);
  CK(cudaMemset(dout.p, 0xff, dout.n * 2));  // poison: every element must be written
  CK(cudaMemset(dlse.p, 0xff, dlse.n * 4));
  CK(cudaMemset(dmax.p, 0xff, dmax.n * 4));
  check_status(smla_cuda_sparse_prefill(dq.p + shift, dkv.p + shift, didx.p, c.lengths ? dlen.p : nullptr, c.sink ? dsink.p : nullptr,
                                        int32_t(c.s_q), c.h_q, c.d_qk, c.d_v, int32_t(c.s_kv), c.topk, float(sm_scale),
                                        dout.p, dmax.p, dlse.p, 0),
               "smla_cuda_sparse_prefill");
  CK(cudaDeviceSynchronize());
  const auto out = dout.down();
  const auto lse = dlse.down();
  const auto mx = dmax.down();
  int64_t unwritten = 0;
  for (auto v : out) unwritten += v == 0xffff;
  for (size_t i = 0; i < lse.size(); ++i) unwritten += isnan(lse[i]) || isnan(mx[i]);

  // sampled queries: first, last, a few random
  std::vector<int64_t> qs;
  if (c.samples >= c.s_q) {
    for (int64_t i = 0; i < c.s_q; ++i) qs.push_back(i);
  } else {
    qs.push_back(0);
    qs.push_back(c.s_q - 1);
    while (int(qs.size()) < c.samples) qs.push_back(r.range(0, c.s_q));
  }
  Cmp co(7e-6), cl(-1), cm(-1);
  std::vector<double> qd(size_t(c.h_q) * c.d_qk), ro(size_t(c.h_q) * c.d_v), rg(ro.size()), rl(c.h_q), rm(c.h_q);
  std::vector<std::vector<double>> rowbuf;
  for (int64_t i : qs) {
    for (size_t j = 0; j < qd.size(); ++j) qd[j] = ref_bf16(hq[size_t(i) * c.h_q * c.d_qk + j]);
    const int lim = c.lengths ? std::max(0, std::min(c.topk, len[i])) : c.topk;
    rowbuf.clear();
    for (int k = 0; k < lim; ++k) {
      const int32_t v = idx[size_t(i) * c.topk + k];
      if (v < 0 || v >= c.s_kv) continue;
      std::vector<double> row(c.d_qk);
      for (int d = 0; d < c.d_qk; ++d) row[d] = ref_bf16(hkv[size_t(v) * c.d_qk + d]);
      rowbuf.push_back(std::move(row));
    }
    std::vector<const double*> rows;
    for (auto& rw : rowbuf) rows.push_back(rw.data());
    ref_attend(qd.data(), c.h_q, c.d_qk, c.d_v, rows, sm_scale, c.sink ? sink.data() : nullptr, ro.data(), rl.data(),
               rm.data(), rg.data());
    for (int h = 0; h < c.h_q; ++h) {
      const size_t o = size_t(i) * c.h_q + h;
      for (int d = 0; d < c.d_v; ++d)
        co.add(ref_bf16(out[o * c.d_v + d]), ro[size_t(h) * c.d_v + d], out_bound(rg[size_t(h) * c.d_v + d]));
      cl.add(lse[o], rl[h], lse_bound(rl[h], rm[h]));
      cm.add(mx[o], rm[h], max_bound(rm[h]));
    }
  }
  report("prefill " + c.name, {{"out", &co}, {"lse", &cl}, {"max", &cm}},
         unwritten ? "unwritten " + std::to_string(unwritten) : "");
}

// ---------------------------------------------------------------- v4 / v32 caches
struct V4Host {
  int page_size, num_pages;
  std::vector<uint8_t> bytes;
  int64_t tokens() const { return int64_t(page_size) * num_pages; }
};
// Quantize random rows with the core's quantizer (the cache writer under test elsewhere).
static V4Host make_v4_cache(Rng& r, int page_size, int num_pages) {
  V4Host c{page_size, num_pages, {}};
  c.bytes.assign(size_t(smla::v4::page_bytes(page_size)) * num_pages, 0);
  const int64_t n = c.tokens();
  std::vector<uint64_t> seeds(n);
  for (auto& s : seeds) s = r.next();
#pragma omp parallel for
  for (int64_t t = 0; t < n; ++t) {
    Rng rr(seeds[t]);
    float x[512];
    const double tile_scale = exp(rr.normal());
    for (int d = 0; d < 512; ++d) x[d] = float(rr.normal() * tile_scale);
    smla::v4::quantize_token(x, c.bytes.data() + smla::v4::data_offset(t, page_size),
                             c.bytes.data() + smla::v4::scale_offset(t, page_size));
  }
  return c;
}
// Dequantized value of dim d of token t, independently from the bytes (SPEC §3.1):
// e4m3 * 2^(byte-127) rounded to float32, then to bf16 (nearest even); rope copied.
static double ref_v4_value(const V4Host& c, int64_t t, int d) {
  const int64_t P = c.page_size;
  const int64_t page_bytes = (P * 584 + 575) / 576 * 576;
  const uint8_t* data = c.bytes.data() + (t / P) * page_bytes + (t % P) * 576;
  if (d >= 448) return ref_bf16(uint16_t(data[448 + 2 * (d - 448)] | (data[449 + 2 * (d - 448)] << 8)));
  const uint8_t sb = c.bytes[size_t((t / P) * page_bytes + P * 576 + (t % P) * 8 + d / 64)];
  const float f = float(ref_e4m3(data[d]) * ref_ue8m0(sb));
  // round float -> bf16 nearest even (the float is exact in double)
  if (isnan(f) || isinf(f)) return f;
  const double x = f;
  const int e = x == 0 ? 0 : ilogb(x);
  const double ulp = ldexp(1.0, std::max(e, -126) - 7);
  double q = x / ulp, fl = floor(q);
  double rem = q - fl;
  if (rem > 0.5 || (rem == 0.5 && fmod(fl, 2.0) != 0)) fl += 1;
  const double v = fl * ulp;
  return fabs(v) >= ldexp(1.0, 128) ? copysign(INFINITY, v) : v;
}

// ---------------------------------------------------------------- paged attention checks
struct PagedCase {
  std::string name;
  int n, h_q;
  int page_size, num_pages, topk;
  bool extra;
  int extra_page_size, extra_num_pages, extra_topk;
  IndexMode mode;
  bool lengths, sink;
  int samples;
};

static void run_paged_case(const PagedCase& c, uint64_t seed) {
  Rng r(seed);
  V4Host main = make_v4_cache(r, c.page_size, c.num_pages);
  V4Host extra = c.extra ? make_v4_cache(r, c.extra_page_size, c.extra_num_pages) : V4Host{1, 0, {}};
  std::vector<uint16_t> hq(size_t(c.n) * c.h_q * 512);
  for (auto& v : hq) v = to_bf16(r.normal());
  auto idx = make_indices(r, c.n, c.topk, main.tokens(), c.mode);
  auto eidx = c.extra ? make_indices(r, c.n, c.extra_topk, extra.tokens(), c.mode) : std::vector<int32_t>();
  std::vector<int32_t> len, elen;
  if (c.lengths) {
    len.resize(c.n);
    for (auto& v : len) v = int32_t(r.range(-2, c.topk + 3));
    if (c.extra) {
      elen.resize(c.n);
      for (auto& v : elen) v = int32_t(r.range(-2, c.extra_topk + 3));
    }
  }
  std::vector<float> sink;
  if (c.sink) {
    sink.resize(c.h_q);
    for (auto& v : sink) v = float(r.normal() * 2);
  }
  const double sm_scale = 1.0 / sqrt(512.0);
  DBuf<uint16_t> dq(hq.size()), dout(hq.size());
  DBuf<uint8_t> dmain(main.bytes.size()), dextra(extra.bytes.size());
  DBuf<int32_t> didx(idx.size()), deidx(eidx.size()), dlen(len.size()), delen(elen.size());
  DBuf<float> dsink(sink.size()), dlse(size_t(c.n) * c.h_q), dmax(size_t(c.n) * c.h_q);
  dq.up(hq);
  dmain.up(main.bytes);
  didx.up(idx);
  if (c.extra) dextra.up(extra.bytes), deidx.up(eidx);
  if (c.lengths) {
    dlen.up(len);
    if (c.extra) delen.up(elen);
  }
  if (c.sink) dsink.up(sink);
  CK(cudaMemset(dout.p, 0xff, dout.n * 2));
  CK(cudaMemset(dlse.p, 0xff, dlse.n * 4));
  CK(cudaMemset(dmax.p, 0xff, dmax.n * 4));
  check_status(smla_cuda_paged_sparse_attention(
                   dq.p, c.n, c.h_q, dmain.p, c.page_size, c.num_pages, didx.p, c.topk, c.lengths ? dlen.p : nullptr,
                   c.extra ? dextra.p : nullptr, c.extra_page_size, c.extra_num_pages, c.extra ? deidx.p : nullptr,
                   c.extra_topk, (c.extra && c.lengths) ? delen.p : nullptr, c.sink ? dsink.p : nullptr,
                   float(sm_scale), dout.p, dlse.p, dmax.p, 0),
               "smla_cuda_paged_sparse_attention");
  CK(cudaDeviceSynchronize());
  const auto out = dout.down();
  const auto lse = dlse.down();
  const auto mx = dmax.down();
  int64_t unwritten = 0;
  for (auto v : out) unwritten += v == 0xffff;
  for (size_t i = 0; i < lse.size(); ++i) unwritten += isnan(lse[i]) || isnan(mx[i]);
  std::vector<int> qs;
  if (c.samples >= c.n) {
    for (int i = 0; i < c.n; ++i) qs.push_back(i);
  } else {
    qs.push_back(0);
    qs.push_back(c.n - 1);
    while (int(qs.size()) < c.samples) qs.push_back(int(r.range(0, c.n)));
  }
  Cmp co(7e-6), cl(-1), cm(-1);
  std::vector<double> qd(size_t(c.h_q) * 512), ro(size_t(c.h_q) * 512), rg(ro.size()), rl(c.h_q), rm(c.h_q);
  for (int i : qs) {
    for (size_t j = 0; j < qd.size(); ++j) qd[j] = ref_bf16(hq[size_t(i) * c.h_q * 512 + j]);
    std::vector<std::vector<double>> rowbuf;
    auto add_set = [&](const V4Host& cache, const std::vector<int32_t>& ix, int topk, const std::vector<int32_t>& ln) {
      const int lim = ln.empty() ? topk : std::max(0, std::min(topk, ln[i]));
      for (int k = 0; k < lim; ++k) {
        const int64_t t = ix[size_t(i) * topk + k];
        if (t < 0 || t >= cache.tokens()) continue;
        std::vector<double> row(512);
        for (int d = 0; d < 512; ++d) row[d] = ref_v4_value(cache, t, d);
        rowbuf.push_back(std::move(row));
      }
    };
    add_set(main, idx, c.topk, len);
    if (c.extra) add_set(extra, eidx, c.extra_topk, elen);
    std::vector<const double*> rows;
    for (auto& rw : rowbuf) rows.push_back(rw.data());
    ref_attend(qd.data(), c.h_q, 512, 512, rows, sm_scale, c.sink ? sink.data() : nullptr, ro.data(), rl.data(),
               rm.data(), rg.data());
    for (int h = 0; h < c.h_q; ++h) {
      const size_t o = size_t(i) * c.h_q + h;
      for (int d = 0; d < 512; ++d)
        co.add(ref_bf16(out[o * 512 + d]), ro[size_t(h) * 512 + d], out_bound(rg[size_t(h) * 512 + d]));
      cl.add(lse[o], rl[h], lse_bound(rl[h], rm[h]));
      cm.add(mx[o], rm[h], max_bound(rm[h]));
    }
  }
  report("paged " + c.name, {{"out", &co}, {"lse", &cl}, {"max", &cm}},
         unwritten ? "unwritten " + std::to_string(unwritten) : "");
}

// ---------------------------------------------------------------- dequant checks (bit-exact)
static void run_dequant_case(const char* name, int format, int page_size, int num_pages, int64_t n, bool bad_ids,
                             uint64_t seed) {
  Rng r(seed);
  const bool v4 = format == SMLA_CACHE_V4;
  const int64_t tokens = int64_t(page_size) * num_pages;
  const size_t bytes = v4 ? size_t(smla::v4::page_bytes(page_size)) * num_pages : size_t(tokens) * 656;
  std::vector<uint8_t> cache(bytes);
  for (auto& b : cache) b = uint8_t(r.next());  // every byte pattern, NaNs included
  if (!v4) {
    // v32 scales are float32 powers of two (random bit patterns would be any float)
    for (int64_t t = 0; t < tokens; ++t)
      for (int s = 0; s < 4; ++s) {
        const float f = ldexpf(1.0f, int(r.range(-20, 20)));
        memcpy(&cache[size_t(t) * 656 + 512 + 4 * s], &f, 4);
      }
  }
  std::vector<int64_t> ids(n);
  for (auto& v : ids) v = r.range(0, tokens);
  if (bad_ids)
    for (int64_t i = 0; i < n; i += 7) ids[i] = (i % 3 == 0) ? -1 : (i % 3 == 1 ? tokens : INT64_MAX);
  const int dim = v4 ? 512 : 576;
  DBuf<uint8_t> dc(bytes);
  DBuf<int64_t> di(n);
  DBuf<uint16_t> dout(size_t(n) * dim);
  DBuf<int32_t> dbad(1);
  dc.up(cache);
  di.up(ids);
  CK(cudaMemset(dout.p, 0xff, dout.n * 2));
  CK(cudaMemset(dbad.p, 0, 4));
  check_status(smla_cuda_dequantize_kv_cache(format, dc.p, page_size, num_pages, di.p, n, dout.p, dbad.p, 0),
               "smla_cuda_dequantize_kv_cache");
  CK(cudaDeviceSynchronize());
  const auto out = dout.down();
  const int32_t bad = dbad.down()[0];
  int64_t mismatches = 0, checked = 0;
  V4Host wrap{page_size, num_pages, {}};
  if (v4) wrap.bytes = cache;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = ids[i];
    const bool ok_id = t >= 0 && t < tokens;
    for (int d = 0; d < dim; ++d) {
      const uint16_t got = out[size_t(i) * dim + d];
      ++checked;
      if (!ok_id) {
        mismatches += got != 0;
        continue;
      }
      if (v4) {
        const double ref = ref_v4_value(wrap, t, d);
        const double g = ref_bf16(got);
        if (!((isnan(ref) && isnan(g)) || ref == g)) ++mismatches;
      } else {
        const uint8_t* tok = cache.data() + size_t(t) * 656;
        if (d >= 512) {
          mismatches += got != uint16_t(tok[528 + 2 * (d - 512)] | (tok[529 + 2 * (d - 512)] << 8));
        } else {
          float sc;
          memcpy(&sc, tok + 512 + 4 * (d / 128), 4);
          const float f = float(ref_e4m3(tok[d]) * double(sc));  // exact product, rounded to float32
          mismatches += !ref_round_bf16_is(f, got);
        }
      }
    }
  }
  char buf[160];
  snprintf(buf, sizeof buf, "dequant %s", name);
  const bool ok = mismatches == 0 && bad == (bad_ids ? 1 : 0);
  printf("%s %-52s | %lld/%lld values bit-exact, bad_id flag %d (expected %d)\n", ok ? "PASS" : "FAIL", buf,
         (long long)(checked - mismatches), (long long)checked, bad, bad_ids ? 1 : 0);
  (ok ? g_passed : g_failed)++;
}

static void run_checks() {
  uint64_t seed = uint64_t(time(nullptr));
  if (const char* s = getenv("SMLA_SEED")) seed = strtoull(s, nullptr, 10);
  printf("seed %llu\n", (unsigned long long)seed);
  int k = 0;
  // dequant
  run_dequant_case("v4 P=64", SMLA_CACHE_V4, 64, 40, 3000, false, seed + k++);
  run_dequant_case("v4 P=256 bad ids", SMLA_CACHE_V4, 256, 9, 2001, true, seed + k++);
  run_dequant_case("v4 P=2", SMLA_CACHE_V4, 2, 777, 999, false, seed + k++);
  run_dequant_case("v32", SMLA_CACHE_V32, 1, 5000, 3000, false, seed + k++);
  run_dequant_case("v32 bad ids", SMLA_CACHE_V32, 1, 100, 500, true, seed + k++);
  // sparse prefill: {name, sQ, hQ, dQK, dV, sKV, topk, mode, lengths, sink, special, samples, qscale, empty}
  const std::vector<PrefillCase> pcs = {
      {"h64 d576 topk128 valid", 4, 64, 576, 512, 1000, 128, kAllValid, false, false, false, 4, 1.0, 0},
      {"h128 d512 topk256 mixed+len+sink", 6, 128, 512, 512, 3000, 256, kMixed, true, true, true, 6, 1.0, 1},
      {"h128 d576 topk200 mixed+sink peaked", 5, 128, 576, 512, 2000, 200, kMixed, false, true, false, 5, 4.0, 0},
      {"h64 d512 topk1 / topk65", 7, 64, 512, 512, 50, 65, kMixed, true, false, false, 7, 1.0, 0},
      {"h16 d576 (pad heads) topk100", 5, 16, 576, 512, 500, 100, kMixed, false, true, true, 5, 1.0, 0},
      {"h1 d512 topk64", 4, 1, 512, 512, 300, 64, kAllValid, false, false, false, 4, 1.0, 0},
      {"h100 d576 (2 head blocks) topk300", 3, 100, 576, 512, 4000, 300, kMixed, true, true, false, 3, 1.0, 0},
      {"h64 d512 topk0", 3, 64, 512, 512, 100, 0, kMixed, false, true, false, 3, 1.0, 0},
      {"h64 d576 all invalid", 4, 64, 576, 512, 100, 128, kMixed, false, true, false, 4, 1.0, 4},
      {"h64 d512 sKV=0", 2, 64, 512, 512, 0, 64, kMixed, false, false, false, 2, 1.0, 0},
      {"h64 d576 adversarial", 6, 64, 576, 512, 700, 192, kAdversarial, true, true, true, 6, 1.0, 0},
      {"sQ=70000 h1 d512 topk8 (grid x > 65535)", 70000, 1, 512, 512, 5000, 8, kMixed, true, false, false, 8, 1.0, 0},
      {"h128 d576 topk2048 valid", 3, 128, 576, 512, 32768, 2048, kAllValid, false, false, false, 3, 1.0, 0},
      {"fallback h8 d128 dV64", 5, 8, 128, 64, 300, 100, kMixed, true, true, true, 5, 1.0, 0},
      {"fallback h3 d576 dV576", 3, 3, 576, 576, 300, 70, kMixed, false, true, false, 3, 1.0, 0},
      {"misaligned q/kv -> fallback h64 d576", 3, 64, 576, 512, 300, 100, kMixed, true, true, false, 3, 1.0, 0, true},
      {"-inf logits (lse -inf, NaN by the math) h64 d576", 3, 64, 576, 512, 200, 70, kMixed, false, false, false, 3, 1.0, 0, false, 20},
      {"-inf logits + sink h128 d512", 3, 128, 512, 512, 200, 70, kMixed, false, true, false, 3, 1.0, 0, false, 20},
      {"-inf logits fallback h4 d128 dV64", 3, 4, 128, 64, 200, 70, kMixed, false, true, false, 3, 1.0, 0, false, 20},
      {"h64 d512 topk640 (10 blocks) valid", 4, 64, 512, 512, 9000, 640, kAllValid, false, false, false, 4, 1.0, 0},
      {"h64 d512 topk576 (9 blocks: odd) mixed+len+sink", 5, 64, 512, 512, 9000, 576, kMixed, true, true, true, 5, 1.0, 0},
      {"h128 d512 topk1024 flashmla-regime", 3, 128, 512, 512, 4000, 1024, kAllValid, false, true, false, 3, 0.1, 0, false, 0, 1.0, 0.05},
      {"h128 d576 topk2048 flashmla-regime mixed", 3, 128, 576, 512, 32768, 2048, kMixed, true, true, false, 3, 0.1, 0, false, 0, 1.0, 0.05},
      {"h64 d512 topk192 negative scale", 4, 64, 512, 512, 1000, 192, kMixed, true, true, false, 4, 1.0, 0, false, 0, -1.0},
      {"h64 d576 topk130 zero scale", 3, 64, 576, 512, 1000, 130, kMixed, true, true, false, 3, 1.0, 0, false, 0, 0.0},
      {"h192 d576 topk333 peaked", 3, 192, 576, 512, 3000, 333, kMixed, true, true, true, 3, 6.0, 0},
  };
  for (const auto& c : pcs) run_prefill_case(c, seed + k++);
  {  // sQ = 0: a no-op that must not launch or fail
    const int32_t st = smla_cuda_sparse_prefill(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 64, 576, 512, 10, 64,
                                                0.1f, nullptr, nullptr, nullptr, 0);
    const cudaError_t e = cudaDeviceSynchronize();
    const bool ok = st == 0 && e == cudaSuccess;
    printf("%s %-52s | status %d\n", ok ? "PASS" : "FAIL", "prefill sQ=0 no-op", st);
    (ok ? g_passed : g_failed)++;
  }
  // paged: {name, n, hQ, P, pages, topk, extra, eP, epages, etopk, mode, lengths, sink, samples}
  const std::vector<PagedCase> gcs = {
      {"h64 P64 topk128", 4, 64, 64, 20, 128, false, 1, 0, 0, kAllValid, false, false, 4},
      {"h128 P256 topk200 + extra P64 topk100 mixed", 5, 128, 256, 4, 200, true, 64, 10, 100, kMixed, true, true, 5},
      {"h16 P2 topk64 + extra P256 adversarial", 5, 16, 2, 300, 64, true, 256, 2, 70, kAdversarial, true, true, 5},
      {"h64 P64 topk0 + extra topk40", 3, 64, 64, 3, 0, true, 64, 3, 40, kMixed, false, true, 3},
  };
  for (const auto& c : gcs) run_paged_case(c, seed + k++);
}

// ---------------------------------------------------------------- fuzz (for compute-sanitizer)
static void run_fuzz() {
  Rng r(12345);
  int launches = 0;
  for (int it = 0; it < 6; ++it) {
    const int h_q = (int[]){64, 128, 7, 65, 1, 128}[it];
    const int d_qk = it % 2 ? 512 : 576;
    const int64_t s_q = 3, s_kv = (int64_t[]){50, 1, 0, 200, 64, 70}[it];
    const int topk = (int[]){70, 64, 3, 129, 1, 200}[it];
    std::vector<uint16_t> hq(size_t(s_q) * h_q * d_qk), hkv(std::max<size_t>(size_t(s_kv) * d_qk, 1));
    for (auto& v : hq) v = to_bf16(r.normal());
    for (auto& v : hkv) v = to_bf16(r.normal());
    auto idx = make_indices(r, s_q, topk, s_kv, kAdversarial);
    std::vector<int32_t> len = {INT32_MIN, topk + 1000, INT32_MAX};
    DBuf<uint16_t> dq(hq.size()), dkv(size_t(s_kv) * d_qk), dout(size_t(s_q) * h_q * 512);
    DBuf<int32_t> didx(idx.size()), dlen(3);
    DBuf<float> dl(s_q * h_q), dm(s_q * h_q);
    dq.up(hq);
    if (s_kv) CK(cudaMemcpy(dkv.p, hkv.data(), size_t(s_kv) * d_qk * 2, cudaMemcpyHostToDevice));
    didx.up(idx);
    dlen.up(len);
    for (int use_len = 0; use_len < 2; ++use_len) {
      check_status(smla_cuda_sparse_prefill(dq.p, dkv.p, didx.p, use_len ? dlen.p : nullptr, nullptr, int32_t(s_q), h_q,
                                            d_qk, 512, int32_t(s_kv), topk, 0.05f, dout.p, dm.p, dl.p, 0),
                   "prefill");
      ++launches;
    }
    CK(cudaDeviceSynchronize());
  }
  for (int it = 0; it < 4; ++it) {
    const int P = (int[]){64, 2, 256, 1}[it], pages = (int[]){3, 5, 1, 7}[it], h_q = (int[]){64, 128, 9, 64}[it];
    V4Host c = make_v4_cache(r, P, pages);
    std::vector<int32_t> idx = make_indices(r, 3, 90, c.tokens(), kAdversarial);
    idx[0] = INT32_MAX;
    idx[1] = INT32_MIN;
    idx[2] = int32_t(c.tokens());
    std::vector<uint16_t> hq(size_t(3) * h_q * 512);
    for (auto& v : hq) v = to_bf16(r.normal());
    DBuf<uint8_t> dc(c.bytes.size());
    DBuf<int32_t> di(idx.size());
    DBuf<uint16_t> dq(hq.size()), dout(hq.size());
    DBuf<float> dl(3 * h_q), dm(3 * h_q);
    dc.up(c.bytes);
    di.up(idx);
    dq.up(hq);
    check_status(smla_cuda_paged_sparse_attention(dq.p, 3, h_q, dc.p, P, pages, di.p, 90, nullptr, dc.p, P, pages, di.p,
                                                  90, nullptr, nullptr, 0.04f, dout.p, dl.p, dm.p, 0),
                 "paged");
    ++launches;
    std::vector<int64_t> ids = {0, -1, INT64_MIN, c.tokens(), INT64_MAX, c.tokens() - 1, (int64_t)1 << 40};
    DBuf<int64_t> dids(ids.size());
    DBuf<uint16_t> ddq(ids.size() * 576);
    DBuf<int32_t> bad(1);
    dids.up(ids);
    check_status(smla_cuda_dequantize_kv_cache(SMLA_CACHE_V4, dc.p, P, pages, dids.p, int64_t(ids.size()), ddq.p,
                                               bad.p, 0),
                 "dequant v4");
    check_status(smla_cuda_dequantize_kv_cache(SMLA_CACHE_V32, dc.p, 1, int32_t(c.bytes.size() / 656), dids.p,
                                               int64_t(ids.size()), ddq.p, bad.p, 0),
                 "dequant v32");
    launches += 3;
    CK(cudaDeviceSynchronize());
  }
  printf("fuzz: %d launches completed\n", launches);
}

// ---------------------------------------------------------------- benchmarks
struct Timer {
  cudaEvent_t a, b;
  DBuf<uint8_t> flush{size_t(256) << 20};
  Timer() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
  template <class F>
  double median_ms(F f, int reps) {
    for (int i = 0; i < 3; ++i) f();  // warm-up
    CK(cudaDeviceSynchronize());
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
      CK(cudaMemsetAsync(flush.p, i & 0xff, flush.n));  // evict L2 between runs
      CK(cudaEventRecord(a));
      f();
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

// Random bf16 normal(0, 1) values made on the device (hash of the element index, Box-Muller), so
// the multi-GB benchmark inputs cost no host time.
__global__ void fill_normal_bf16(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float(uint32_t(z)) + 1.0f) * 2.3283064e-10f, v = float(uint32_t(z >> 32)) * 2.3283064e-10f;
    p[i] = smla::float_to_bf16(sqrtf(-2.0f * logf(u)) * cospif(2.0f * v));
  }
}
static void device_normal(DBuf<uint16_t>& b, uint64_t seed) {
  fill_normal_bf16<<<1024, 256>>>(b.p, b.n, seed);
  CK(cudaGetLastError());
}

static bool bench_selected(const char* name) {
  const char* f = getenv("SMLA_BENCH_FILTER");
  return !f || strstr(name, f) != nullptr || !strcmp(name, "d2d copy 1 GiB");
}

struct BenchRow {
  std::string name, unit;
  double ms, value, extra;
};

// One prefill configuration, run `runs` times (for ncu / quick timing).
static void run_profile(int which, int runs) {
  const int cfg[3][5] = {{4096, 128, 576, 2048, 32768}, {4096, 64, 512, 512, 32768}, {4096, 128, 512, 1024, 32768}};
  const int* c = cfg[which];
  Rng r(99);
  std::vector<uint16_t> hq(size_t(c[0]) * c[1] * c[2]), hkv(size_t(c[4]) * c[2]);
  for (auto& v : hq) v = to_bf16(r.normal());
  for (auto& v : hkv) v = to_bf16(r.normal());
  auto idx = make_indices(r, c[0], c[3], c[4], kAllValid);
  DBuf<uint16_t> dq(hq.size()), dkv(hkv.size()), dout(size_t(c[0]) * c[1] * 512);
  DBuf<int32_t> didx(idx.size());
  DBuf<float> dl(size_t(c[0]) * c[1]), dm(size_t(c[0]) * c[1]);
  dq.up(hq);
  dkv.up(hkv);
  didx.up(idx);
  for (int i = 0; i < runs; ++i)
    check_status(smla_cuda_sparse_prefill(dq.p, dkv.p, didx.p, nullptr, nullptr, c[0], c[1], c[2], 512, c[4], c[3],
                                          0.04f, dout.p, dm.p, dl.p, 0),
                 "prefill");
  CK(cudaDeviceSynchronize());
  printf("profile config %d: %d runs done\n", which, runs);
}

static void run_bench(const char* json_path, int reps) {
  Timer timer;
  std::vector<BenchRow> rows;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  // device-to-device copy
  double copy_gbs;
  {
    const size_t bytes = size_t(1) << 30;
    DBuf<uint8_t> a(bytes), b(bytes);
    CK(cudaMemset(a.p, 1, bytes));
    const double ms = timer.median_ms([&] { CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); }, reps);
    copy_gbs = 2.0 * bytes / ms / 1e6;
    rows.push_back({"d2d copy 1 GiB", "GB/s", ms, copy_gbs, 1.0});
  }
  // dequant gathers: 256K random tokens (the headline), and 4K-64K where launch latency counts
  for (int f = 0; f < 2; ++f) {
    if (!bench_selected(f == 0 ? "dequant v4" : "dequant v32")) continue;
    Rng r(7 + f);
    const bool v4 = f == 0;
    const int P = v4 ? 64 : 1;
    const int64_t tokens = 1 << 19;
    const int pages = int(v4 ? tokens / P : tokens);
    const size_t bytes = v4 ? size_t(smla::v4::page_bytes(P)) * pages : size_t(tokens) * 656;
    std::vector<uint8_t> cache(bytes);
    for (size_t i = 0; i < bytes; i += 8) {
      const uint64_t v = r.next() & 0x3f3f3f3f3f3f3f3full;  // finite e4m3 / small scales
      memcpy(&cache[i], &v, std::min<size_t>(8, bytes - i));
    }
    DBuf<uint8_t> dc(bytes);
    dc.up(cache);
    for (int64_t n : {int64_t(1) << 18, int64_t(1) << 16, int64_t(1) << 14, int64_t(1) << 12}) {
      std::vector<int64_t> ids(n);
      for (auto& v : ids) v = r.range(0, tokens);
      DBuf<int64_t> di(n);
      DBuf<uint16_t> dout(size_t(n) * (v4 ? 512 : 576));
      di.up(ids);
      const double ms = timer.median_ms(
          [&] {
            check_status(smla_cuda_dequantize_kv_cache(v4 ? SMLA_CACHE_V4 : SMLA_CACHE_V32, dc.p, P, pages, di.p, n,
                                                       dout.p, nullptr, 0),
                         "dequant");
          },
          reps);
      const double moved = double(n) * (v4 ? (584 + 8 + 1024) : (656 + 8 + 1152));
      const double gbs = moved / ms / 1e6;
      rows.push_back({std::string("dequant ") + (v4 ? "v4 " : "v32 ") + std::to_string(n >> 10) + "K random tokens",
                      "GB/s", ms, gbs, gbs / copy_gbs});
    }
  }
  // sparse prefill: FlashMLA's benchmark configurations (sKV 32768; 65536 for sQ 32768)
  struct Cfg {
    const char* name;
    int s_q, h_q, d_qk, topk, s_kv;
  };
  const Cfg cfgs[] = {{"prefill V3.2 sQ4096 h128 d576 topk2048", 4096, 128, 576, 2048, 32768},
                      {"prefill V4 sQ4096 h64 d512 topk512", 4096, 64, 512, 512, 32768},
                      {"prefill V4 sQ4096 h64 d512 topk640", 4096, 64, 512, 640, 32768},
                      {"prefill V4 sQ4096 h128 d512 topk1024", 4096, 128, 512, 1024, 32768},
                      {"prefill V4 sQ32768 h64 d512 topk512", 32768, 64, 512, 512, 65536},
                      {"prefill V4 sQ32768 h64 d512 topk640", 32768, 64, 512, 640, 65536}};
  for (const Cfg& c : cfgs) {
    if (!bench_selected(c.name)) continue;
    Rng r(99);
    DBuf<uint16_t> dq(size_t(c.s_q) * c.h_q * c.d_qk), dkv(size_t(c.s_kv) * c.d_qk), dout(size_t(c.s_q) * c.h_q * 512);
    device_normal(dq, 1);
    device_normal(dkv, 2);
    std::vector<int32_t> idx(size_t(c.s_q) * c.topk);
    for (auto& v : idx) v = int32_t(r.range(0, c.s_kv));
    DBuf<int32_t> didx(idx.size());
    DBuf<float> dl(size_t(c.s_q) * c.h_q), dm(size_t(c.s_q) * c.h_q);
    didx.up(idx);
    const float sm = float(1.0 / sqrt(double(c.d_qk)));
    const double ms = timer.median_ms(
        [&] {
          check_status(smla_cuda_sparse_prefill(dq.p, dkv.p, didx.p, nullptr, nullptr, c.s_q, c.h_q, c.d_qk, 512,
                                                c.s_kv, c.topk, sm, dout.p, dm.p, dl.p, 0),
                       "prefill");
        },
        reps);
    const double flops = 2.0 * c.s_q * double(c.topk) * c.h_q * (c.d_qk + 512);
    rows.push_back({c.name, "TFLOPS", ms, flops / ms / 1e9, 0});
  }
  // paged FP8 attention at V4-like shapes: SWA window 128 (main) + compressed topk (extra)
  struct PCfg {
    const char* name;
    int n, h_q, topk, extra_topk;
  };
  const PCfg pcfgs[] = {{"paged V4 n4096 h64 swa128+c512", 4096, 64, 128, 512},
                        {"paged V4 n4096 h128 swa128+c1024", 4096, 128, 128, 1024}};
  for (const PCfg& c : pcfgs) {
    if (!bench_selected(c.name)) continue;
    Rng r(5);
    V4Host main = make_v4_cache(r, 64, 32768 / 64);
    V4Host extra = make_v4_cache(r, 64, 8192 / 64);
    std::vector<uint16_t> hq(size_t(c.n) * c.h_q * 512);
    for (auto& v : hq) v = to_bf16(r.normal());
    auto idx = make_indices(r, c.n, c.topk, main.tokens(), kAllValid);
    auto eidx = make_indices(r, c.n, c.extra_topk, extra.tokens(), kAllValid);
    DBuf<uint16_t> dq(hq.size()), dout(hq.size());
    DBuf<uint8_t> dmain(main.bytes.size()), dextra(extra.bytes.size());
    DBuf<int32_t> di(idx.size()), dei(eidx.size());
    DBuf<float> dl(size_t(c.n) * c.h_q), dm(size_t(c.n) * c.h_q);
    dq.up(hq);
    dmain.up(main.bytes);
    dextra.up(extra.bytes);
    di.up(idx);
    dei.up(eidx);
    const double ms = timer.median_ms(
        [&] {
          check_status(smla_cuda_paged_sparse_attention(dq.p, c.n, c.h_q, dmain.p, 64, main.num_pages, di.p, c.topk,
                                                        nullptr, dextra.p, 64, extra.num_pages, dei.p, c.extra_topk,
                                                        nullptr, nullptr, 0.044f, dout.p, dl.p, dm.p, 0),
                       "paged");
        },
        reps);
    const double flops = 2.0 * c.n * double(c.topk + c.extra_topk) * c.h_q * 1024;
    rows.push_back({c.name, "TFLOPS", ms, flops / ms / 1e9, 0});
  }
  printf("\n%-48s %10s %12s %s\n", "benchmark", "median ms", "value", "");
  for (auto& b : rows)
    printf("%-48s %10.4f %9.1f %-6s%s\n", b.name.c_str(), b.ms, b.value, b.unit.c_str(),
           b.unit == "GB/s" && b.extra != 1.0 ? (" (" + std::to_string(int(b.extra * 100 + 0.5)) + "% of copy)").c_str()
                                              : "");
  if (json_path) {
    FILE* f = fopen(json_path, "w");
    if (!f) return;
    time_t now = time(nullptr);
    char date[64];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    const char* commit = getenv("SMLA_COMMIT");
    const char* cmd = getenv("SMLA_COMMAND");
    fprintf(f, "{\n  \"device\": \"%s\",\n  \"sms\": %d,\n  \"date\": \"%s\",\n  \"commit\": \"%s\",\n  \"command\": \"%s\",\n",
            prop.name, prop.multiProcessorCount, date, commit ? commit : "", cmd ? cmd : "");
    fprintf(f, "  \"reps\": %d,\n  \"timing\": \"median of reps, CUDA events, 3 warm-up runs, L2 flushed by a 256 MiB memset before each run\",\n  \"results\": [\n", reps);
    for (size_t i = 0; i < rows.size(); ++i)
      fprintf(f, "    {\"name\": \"%s\", \"median_ms\": %.5f, \"%s\": %.2f%s}%s\n", rows[i].name.c_str(), rows[i].ms,
              rows[i].unit == "GB/s" ? "GBps" : "TFLOPS", rows[i].value,
              rows[i].unit == "GB/s" && rows[i].extra != 1.0
                  ? (", \"fraction_of_copy\": " + std::to_string(rows[i].extra)).c_str()
                  : "",
              i + 1 < rows.size() ? "," : "");
    fprintf(f, "  ]\n}\n");
    fclose(f);
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);
  if (mode == "fuzz") {
    run_fuzz();
    return 0;
  }
  if (mode == "profile") {
    run_profile(argc > 2 ? atoi(argv[2]) : 0, argc > 3 ? atoi(argv[3]) : 2);
    return 0;
  }
  if (mode == "bench") {
    const char* json = nullptr;
    int reps = 10;
    for (int i = 2; i < argc; ++i) {
      if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
      else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    }
    run_bench(json, reps);
    return 0;
  }
  run_checks();
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
