// The CUDA kernels (native/cuda) without the addon: smoke tests, the sanitizer fuzz and the
// kernel benchmark. Accuracy is not judged here: `sparse-mla check --backend cuda` runs every
// kernel through the addon against the float64 reference and the bounds of
// src/reference/compare.ts, on the grid the test suites share.
//
//   smla_cuda_check                 smoke tests: every output element written, outputs finite where
//                                   the inputs are, the fast kernels loosely consistent with the plain
//                                   fallback kernel, dequant equal to the host core's per-element
//                                   functions, planner rows well formed; "N passed, N failed"
//   smla_cuda_check fuzz            adversarial indices, small shapes (run under compute-sanitizer)
//   smla_cuda_check bench [--json F] [--reps N]   TFLOPS / GB/s medians (CUDA events, L2 flushed)
//   smla_cuda_check profile [config] [runs]       one prefill configuration (for ncu)
#include <cuda_runtime.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "smla_cuda.h"
#include "sparse_mla/formats.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/planner.h"
#include "e4m3_tensor_dequant.cuh"
#include "kv_cache.cuh"
#include "sparse_prefill.cuh"

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

// ---------------------------------------------------------------- device buffers
template <class T>
struct DBuf {
  T* p = nullptr;
  size_t n = 0;
  DBuf() = default;
  explicit DBuf(size_t count) : n(count) { CK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
  DBuf(const DBuf&) = delete;
  DBuf& operator=(DBuf&& o) noexcept {
    if (this != &o) {
      if (p) cudaFree(p);
      p = o.p;
      n = o.n;
      o.p = nullptr;
      o.n = 0;
    }
    return *this;
  }
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

// ---------------------------------------------------------------- results of one attention launch
static int g_passed = 0, g_failed = 0;
static void report(bool ok, const std::string& name, const std::string& detail) {
  printf("%s %-56s | %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  fflush(stdout);
  (ok ? g_passed : g_failed)++;
}

// Outputs of one attention launch, poisoned before it so an element it did not write shows.
struct Attn {
  DBuf<uint16_t> out;
  DBuf<float> lse, max;
  Attn(size_t rows, int d_v) : out(rows * d_v), lse(rows), max(rows) {
    CK(cudaMemset(out.p, 0xff, out.n * 2));
    CK(cudaMemset(lse.p, 0xff, lse.n * 4));
    CK(cudaMemset(max.p, 0xff, max.n * 4));
  }
};
struct HostAttn {
  std::vector<uint16_t> out;
  std::vector<float> lse, max;
  explicit HostAttn(const Attn& a) : out(a.out.down()), lse(a.lse.down()), max(a.max.down()) {}
};

// The plain fallback kernel of sparse_prefill.cuh (one CTA per query and head, float32
// throughout), launched directly whatever the shape: the yardstick of the fast kernels here.
static void launch_fallback(const uint16_t* q, const uint16_t* kv, const int32_t* idx, const int32_t* len,
                            const float* sink, int64_t s_q, int h_q, int d_qk, int d_v, int64_t s_kv, int topk,
                            float sm_scale, Attn& o) {
  if (s_q == 0) return;
  smla::cuda::sparse_prefill_generic_kernel<8><<<dim3(unsigned(s_q), unsigned(h_q)), 128>>>(
      q, kv, idx, len, sink, h_q, d_qk, d_v, s_kv, topk, sm_scale, o.out.p, o.max.p, o.lse.p);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
}

// How a kernel's outputs stand beside the fallback's on the same inputs. The agreement figures
// are deliberately loose (the fallback is no reference: it rounds in float32 in its own order),
// far above any rounding difference and far below what a wrong entry, row or scale produces.
struct Consistency {
  int64_t unwritten = 0, nonfinite_out = 0, placement = 0;
  double out_cos_gap = 0, stat_worst = 0;
};
static constexpr double kLooseCosGap = 1e-4;  // 1 - cos of the two outs
static constexpr double kLooseStat = 1e-3;    // |a - b| / (1 + |b|) of lse and maxLogits

static bool same_class(double a, double b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  if (isinf(a) || isinf(b)) return a == b;
  return true;
}
static Consistency compare(const HostAttn& got, const HostAttn& fb, bool inputs_finite) {
  Consistency c;
  double dot = 0, ng = 0, nf = 0;
  for (size_t i = 0; i < got.out.size(); ++i) {
    const uint16_t g = got.out[i];
    if (g == 0xffff) ++c.unwritten;
    const double a = smla::bf16_to_float(g), b = smla::bf16_to_float(fb.out[i]);
    if (!isfinite(a)) c.nonfinite_out += inputs_finite;
    if (!same_class(a, b)) ++c.placement;
    if (isfinite(a) && isfinite(b)) dot += a * b, ng += a * a, nf += b * b;
  }
  c.out_cos_gap = (ng == 0 && nf == 0) ? 0 : (ng == 0 || nf == 0) ? 1 : 1.0 - 2 * dot / (ng + nf);
  for (size_t i = 0; i < got.lse.size(); ++i) {
    uint32_t bits;
    memcpy(&bits, &got.lse[i], 4);
    c.unwritten += bits == 0xffffffffu;
    memcpy(&bits, &got.max[i], 4);
    c.unwritten += bits == 0xffffffffu;
    for (const auto& [a, b] : {std::pair<double, double>{got.lse[i], fb.lse[i]}, {got.max[i], fb.max[i]}}) {
      if (!same_class(a, b)) ++c.placement;
      else if (isfinite(a)) c.stat_worst = std::max(c.stat_worst, fabs(a - b) / (1 + fabs(b)));
    }
  }
  return c;
}
static void report_consistency(const std::string& name, const Consistency& c) {
  const bool ok = c.unwritten == 0 && c.nonfinite_out == 0 && c.placement == 0 && c.out_cos_gap <= kLooseCosGap &&
                  c.stat_worst <= kLooseStat;
  char buf[200];
  snprintf(buf, sizeof buf, "unwritten %lld, non-finite out %lld, inf/NaN placement %lld, 1-cos %.1e, lse/max %.1e",
           (long long)c.unwritten, (long long)c.nonfinite_out, (long long)c.placement, c.out_cos_gap, c.stat_worst);
  report(ok, name, buf);
}

// ---------------------------------------------------------------- sparse prefill: fast kernel vs fallback
struct PrefillCase {
  std::string name;
  int64_t s_q;
  int h_q, d_qk, d_v;
  int64_t s_kv;
  int topk;
  IndexMode mode;
  bool lengths, sink, special_sinks;
  double q_scale;
  int empty_rows;  // leading queries whose entries are all invalid
  bool misaligned = false;  // q and kv 2 bytes off 16-byte alignment (takes the fallback kernel)
  int inf_rows = 0;  // kv rows [0, inf_rows) get dim 0 = −inf, q >= 0, query 0 attends only those
  double scale_mult = 1.0;  // times 1/sqrt(dQK): negative and zero scales are valid input
  double q_offset = 0.0;    // FlashMLA's test data: randn/10 + a small common offset
  int entries_every = 0;    // with lengths: only every entries_every-th query keeps its entries, the
                            // rest get topkLength 0 (long runs of tiles without entries)
};

// Random bf16 normal(0, 1) values made on the device (hash of the element index, Box-Muller), so
// the multi-GB inputs (benchmarks, the largest smoke cases) cost no host time.
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
static void device_normal(uint16_t* p, size_t n, uint64_t seed) {
  fill_normal_bf16<<<1024, 256>>>(p, n, seed);
  CK(cudaGetLastError());
}

static void run_prefill_case(const PrefillCase& c, uint64_t seed) {
  Rng r(seed);
  const size_t nq = size_t(c.s_q) * c.h_q * c.d_qk, nkv = size_t(c.s_kv) * c.d_qk;
  // a q of more than 2^26 plain normal values is made on the device (seconds on the host)
  const bool device_q = nq > (size_t(1) << 26) && c.q_scale == 1.0 && c.q_offset == 0.0 && c.inf_rows == 0 && !c.misaligned;
  std::vector<uint16_t> hq(device_q ? 0 : nq), hkv(nkv);
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
    if (c.entries_every > 0)
      for (int64_t i = 0; i < c.s_q; ++i)
        if (i % c.entries_every != c.entries_every - 1) len[size_t(i)] = 0;
  }
  std::vector<float> sink;
  if (c.sink) {
    sink.resize(c.h_q);
    for (auto& v : sink) v = float(r.normal() * 2);
    if (c.special_sinks && c.h_q >= 3) sink[0] = INFINITY, sink[1] = -INFINITY, sink[2] = 30.0f;
  }
  const float sm_scale = float(c.scale_mult / sqrt(double(c.d_qk)));

  const size_t shift = c.misaligned ? 1 : 0;
  const size_t rows = size_t(c.s_q) * c.h_q;
  DBuf<uint16_t> dq(nq + 8), dkv(nkv + 8);
  DBuf<int32_t> didx(idx.size()), dlen(len.size());
  DBuf<float> dsink(sink.size());
  if (device_q) {
    device_normal(dq.p, nq, r.next());
  } else {
    CK(cudaMemcpy(dq.p + shift, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  }
  CK(cudaMemcpy(dkv.p + shift, hkv.data(), nkv * 2, cudaMemcpyHostToDevice));
  didx.up(idx);
  if (c.lengths) dlen.up(len);
  if (c.sink) dsink.up(sink);
  const int32_t* lp = c.lengths ? dlen.p : nullptr;
  const float* sp = c.sink ? dsink.p : nullptr;
  Attn fast(rows, c.d_v), fb(rows, c.d_v);
  const smla_sparse_prefill_params p{.q = dq.p + shift, .kv = dkv.p + shift, .indices = didx.p, .topk_length = lp,
                                     .attn_sink = sp, .s_q = int32_t(c.s_q), .h_q = c.h_q, .d_qk = c.d_qk, .d_v = c.d_v,
                                     .s_kv = int32_t(c.s_kv), .topk = c.topk, .sm_scale = sm_scale, .out = fast.out.p,
                                     .max_logits = fast.max.p, .lse = fast.lse.p};
  check_status(smla_cuda_sparse_prefill(&p, nullptr, 0), "smla_cuda_sparse_prefill");
  CK(cudaDeviceSynchronize());
  launch_fallback(dq.p + shift, dkv.p + shift, didx.p, lp, sp, c.s_q, c.h_q, c.d_qk, c.d_v, c.s_kv, c.topk, sm_scale, fb);
  report_consistency("prefill " + c.name, compare(HostAttn(fast), HostAttn(fb), c.inf_rows == 0));
  // the same launch with a tile counter its caller zeroed (a layer program's): the same bytes, and
  // the counter taken when there are more tiles than SMs
  Attn claimed(rows, c.d_v);
  DBuf<unsigned long long> claims(1);
  CK(cudaMemset(claims.p, 0, 8));
  smla_sparse_prefill_params pc = p;
  pc.out = claimed.out.p;
  pc.max_logits = claimed.max.p;
  pc.lse = claimed.lse.p;
  check_status(smla_cuda_sparse_prefill(&pc, claims.p, 0), "smla_cuda_sparse_prefill, caller's tile counter");
  CK(cudaDeviceSynchronize());
  const HostAttn x(fast), y(claimed);
  const bool same = x.out == y.out && memcmp(x.lse.data(), y.lse.data(), x.lse.size() * 4) == 0 &&
                    memcmp(x.max.data(), y.max.data(), x.max.size() * 4) == 0;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const bool fast_kernel = !c.misaligned && (c.d_qk == 512 || c.d_qk == 576) && c.d_v == 512;
  const bool counted = claims.down()[0] != 0;
  const bool want_counted = fast_kernel && c.s_q * ((c.h_q + 63) / 64) > sms;
  char buf[160];
  snprintf(buf, sizeof buf, "outputs %s; counter %s (expected %s)", same ? "identical" : "DIFFER", counted ? "taken" : "untouched",
           want_counted ? "taken" : "untouched");
  report(same && counted == want_counted, "prefill " + c.name + ", caller's tile counter", buf);
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
// ---------------------------------------------------------------- paged attention vs dequant + fallback
struct PagedCase {
  std::string name;
  int n, h_q;
  int page_size, num_pages, topk;
  bool extra;
  int extra_page_size, extra_num_pages, extra_topk;
  IndexMode mode;
  bool lengths, sink;
  bool special = false;  // NaN bytes and large scale bytes in a few tokens
};

// A few tokens of a v4 cache made special: one nope byte a NaN (0x7F / 0xFF) in nan_tokens tokens,
// one scale byte in 135..255 (255 a NaN scale) in big_scale_tokens others.
static void poke_special(V4Host& c, Rng& r, int nan_tokens, int big_scale_tokens) {
  const int64_t n = c.tokens();
  if (n == 0) return;
  const uint8_t scales[] = {135, 142, 143, 150, 200, 255};
  for (int i = 0; i < nan_tokens + big_scale_tokens; ++i) {
    const int64_t t = r.range(0, n);
    if (i < nan_tokens) {
      c.bytes[smla::v4::data_offset(t, c.page_size) + r.range(0, smla::v4::kNopeDim)] = i % 2 ? 0xff : 0x7f;
    } else {
      c.bytes[smla::v4::scale_offset(t, c.page_size) + r.range(0, smla::v4::kNopeDim / 64)] = scales[i % 6];
    }
  }
}

// Every token of a v4 cache dequantized by the dequant kernel into rows [at, at + tokens) of kv.
static void dequant_all(const DBuf<uint8_t>& cache, const V4Host& c, DBuf<uint16_t>& kv, int64_t at) {
  const int64_t n = c.tokens();
  if (n == 0) return;
  std::vector<int64_t> ids(n);
  for (int64_t t = 0; t < n; ++t) ids[t] = t;
  DBuf<int64_t> dids(n);
  dids.up(ids);
  const smla_dequantize_kv_cache_params p{.format = SMLA_CACHE_V4, .cache = cache.p, .page_size = c.page_size,
                                          .num_pages = c.num_pages, .token_ids = dids.p, .num_tokens = int32_t(n),
                                          .out = kv.p + at * smla::v4::kDim};
  check_status(smla_cuda_dequantize_kv_cache(&p, nullptr, 0), "smla_cuda_dequantize_kv_cache");
  CK(cudaDeviceSynchronize());
}

// The paged kernel against the fallback prefill over the same entries of the dequantized caches:
// main tokens at rows [0, T), extra tokens at [T, T + T'), each query's row = its main entries
// (up to its length, valid ones) then its extra entries, −1 elsewhere.
static void run_paged_case(const PagedCase& c, uint64_t seed) {
  Rng r(seed);
  V4Host main = make_v4_cache(r, c.page_size, c.num_pages);
  V4Host extra = c.extra ? make_v4_cache(r, c.extra_page_size, c.extra_num_pages) : V4Host{1, 0, {}};
  if (c.special) {
    poke_special(main, r, 3, 12);
    poke_special(extra, r, 2, 8);
  }
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
  const float sm_scale = float(1.0 / sqrt(512.0));
  const int etopk = c.extra ? c.extra_topk : 0;
  DBuf<uint16_t> dq(hq.size());
  DBuf<uint8_t> dmain(main.bytes.size()), dextra(extra.bytes.size());
  DBuf<int32_t> didx(idx.size()), deidx(eidx.size()), dlen(len.size()), delen(elen.size());
  DBuf<float> dsink(sink.size());
  dq.up(hq);
  dmain.up(main.bytes);
  didx.up(idx);
  if (c.extra) dextra.up(extra.bytes), deidx.up(eidx);
  if (c.lengths) {
    dlen.up(len);
    if (c.extra) delen.up(elen);
  }
  if (c.sink) dsink.up(sink);
  const size_t rows = size_t(c.n) * c.h_q;
  Attn paged(rows, 512), fb(rows, 512);
  const smla_paged_sparse_attention_params p{.q = dq.p, .n = c.n, .h_q = c.h_q, .k_cache = dmain.p,
                                             .page_size = c.page_size, .num_pages = c.num_pages, .indices = didx.p,
                                             .topk = c.topk, .topk_length = c.lengths ? dlen.p : nullptr,
                                             .extra_k_cache = c.extra ? dextra.p : nullptr,
                                             .extra_page_size = c.extra_page_size, .extra_num_pages = c.extra_num_pages,
                                             .extra_indices = c.extra ? deidx.p : nullptr, .extra_topk = c.extra_topk,
                                             .extra_topk_length = (c.extra && c.lengths) ? delen.p : nullptr,
                                             .attn_sink = c.sink ? dsink.p : nullptr, .sm_scale = sm_scale,
                                             .out = paged.out.p, .lse = paged.lse.p, .max_logits = paged.max.p};
  check_status(smla_cuda_paged_sparse_attention(&p, 0), "smla_cuda_paged_sparse_attention");
  CK(cudaDeviceSynchronize());

  const int64_t tm = main.tokens(), te = extra.tokens();
  DBuf<uint16_t> kv(size_t(tm + te) * 512);
  dequant_all(dmain, main, kv, 0);
  if (c.extra) dequant_all(dextra, extra, kv, tm);
  const int width = c.topk + etopk;
  std::vector<int32_t> comb(size_t(c.n) * width, -1);
  for (int i = 0; i < c.n; ++i) {
    const int lim = len.empty() ? c.topk : std::max(0, std::min(c.topk, len[i]));
    for (int k = 0; k < lim; ++k) {
      const int32_t t = idx[size_t(i) * c.topk + k];
      if (t >= 0 && t < tm) comb[size_t(i) * width + k] = t;
    }
    const int elim = elen.empty() ? etopk : std::max(0, std::min(etopk, elen[i]));
    for (int k = 0; k < elim; ++k) {
      const int32_t t = eidx[size_t(i) * etopk + k];
      if (t >= 0 && t < te) comb[size_t(i) * width + c.topk + k] = int32_t(tm + t);
    }
  }
  DBuf<int32_t> dcomb(comb.size());
  dcomb.up(comb);
  launch_fallback(dq.p, kv.p, dcomb.p, nullptr, c.sink ? dsink.p : nullptr, c.n, c.h_q, 512, 512, tm + te, width,
                  sm_scale, fb);
  report_consistency("paged " + c.name, compare(HostAttn(paged), HostAttn(fb), !c.special));
}

// ---------------------------------------------------------------- dequant: the host core's per-element functions
static void run_dequant_case(const char* name, int format, int page_size, int num_pages, int64_t n, bool bad_ids,
                             uint64_t seed) {
  Rng r(seed);
  const bool v4 = format == SMLA_CACHE_V4;
  const int64_t tokens = int64_t(page_size) * num_pages;
  const size_t bytes = v4 ? size_t(smla::v4::page_bytes(page_size)) * num_pages : size_t(tokens) * smla::v32::kTokenBytes;
  std::vector<uint8_t> cache(bytes);
  for (auto& b : cache) b = uint8_t(r.next());  // every byte pattern, NaNs included
  if (!v4) {
    // v32 scales are float32 powers of two (random bit patterns would be any float)
    for (int64_t t = 0; t < tokens; ++t)
      for (int s = 0; s < smla::v32::kNumTiles; ++s) {
        const float f = ldexpf(1.0f, int(r.range(-20, 20)));
        memcpy(&cache[size_t(smla::v32::token_offset(t)) + smla::v32::kScalesAt + 4 * s], &f, 4);
      }
  }
  std::vector<int64_t> ids(n);
  for (auto& v : ids) v = r.range(0, tokens);
  if (bad_ids)
    for (int64_t i = 0; i < n; i += 7) ids[i] = (i % 3 == 0) ? -1 : (i % 3 == 1 ? tokens : INT64_MAX);
  const int dim = v4 ? smla::v4::kDim : smla::v32::kDim;
  DBuf<uint8_t> dc(bytes);
  DBuf<int64_t> di(n);
  DBuf<uint16_t> dout(size_t(n) * dim);
  DBuf<int32_t> dbad(1);
  dc.up(cache);
  di.up(ids);
  CK(cudaMemset(dout.p, 0xff, dout.n * 2));
  CK(cudaMemset(dbad.p, 0, 4));
  const smla_dequantize_kv_cache_params p{.format = format, .cache = dc.p, .page_size = page_size, .num_pages = num_pages,
                                          .token_ids = di.p, .num_tokens = int32_t(n), .out = dout.p};
  check_status(smla_cuda_dequantize_kv_cache(&p, dbad.p, 0), "smla_cuda_dequantize_kv_cache");
  CK(cudaDeviceSynchronize());
  const auto out = dout.down();
  const int32_t bad = dbad.down()[0];
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = ids[i];
    const bool ok_id = t >= 0 && t < tokens;
    for (int d = 0; d < dim; ++d) {
      const uint16_t got = out[size_t(i) * dim + d];
      uint16_t want = 0;  // an id outside the cache: a zero row
      if (ok_id && v4) {
        const uint8_t* data = cache.data() + smla::v4::data_offset(t, page_size);
        const uint8_t* scales = cache.data() + smla::v4::scale_offset(t, page_size);
        want = d < smla::v4::kNopeDim ? smla::v4::dequantize_nope(data[d], scales[d / smla::v4::kTile])
                                      : uint16_t(data[smla::v4::kNopeDim + 2 * (d - smla::v4::kNopeDim)] |
                                                 (data[smla::v4::kNopeDim + 2 * (d - smla::v4::kNopeDim) + 1] << 8));
      } else if (ok_id) {
        const uint8_t* tok = cache.data() + smla::v32::token_offset(t);
        float sc;
        memcpy(&sc, tok + smla::v32::kScalesAt + 4 * (d / smla::v32::kTile), 4);
        want = d < smla::v32::kNopeDim ? smla::v32::dequantize_nope(tok[d], sc)
                                       : uint16_t(tok[smla::v32::kRopeAt + 2 * (d - smla::v32::kNopeDim)] |
                                                  (tok[smla::v32::kRopeAt + 2 * (d - smla::v32::kNopeDim) + 1] << 8));
      }
      const bool nan_both = isnan(smla::bf16_to_float(got)) && isnan(smla::bf16_to_float(want));  // NaN payloads may differ
      mismatches += !(got == want || nan_both);
    }
  }
  char buf[160];
  snprintf(buf, sizeof buf, "%lld of %lld values differ, bad-id flag %d (expected %d)", (long long)mismatches,
           (long long)(n * dim), bad, bad_ids ? 1 : 0);
  report(mismatches == 0 && bad == (bad_ids ? 1 : 0), std::string("dequant ") + name, buf);
}

// ---------------------------------------------------------------- dequant pair: a layer's two gathers in one launch
// smla_cuda_dequantize_kv_cache_pair against each gather launched alone (checked above against the
// host core): the same bytes, each gather's own bad-id flag, and the words it zeroes zeroed; with
// two formats it falls back to two launches and memsets.
static void run_dequant_pair_case(const char* name, int format_a, int page_a, int pages_a, int64_t n_a, int format_b, int page_b,
                                  int pages_b, int64_t n_b, uint64_t seed) {
  Rng r(seed);
  struct Side {
    DBuf<uint8_t> cache;
    DBuf<int64_t> ids;
    DBuf<uint16_t> alone, paired;
    DBuf<int32_t> bad_alone, bad_paired;
    smla_dequantize_kv_cache_params p{};
  };
  auto make = [&](Side& s, int format, int page_size, int num_pages, int64_t n, bool bad_ids) {
    const bool v4 = format == SMLA_CACHE_V4;
    const int64_t tokens = int64_t(page_size) * num_pages;
    const size_t bytes = v4 ? size_t(smla::v4::page_bytes(page_size)) * num_pages : size_t(tokens) * smla::v32::kTokenBytes;
    std::vector<uint8_t> cache(bytes);
    for (auto& b : cache) b = uint8_t(r.next());
    std::vector<int64_t> ids(size_t(std::max<int64_t>(n, 1)));
    for (auto& v : ids) v = r.range(0, tokens);
    if (bad_ids)
      for (int64_t i = 0; i < n; i += 5) ids[size_t(i)] = -1;
    const int dim = v4 ? smla::v4::kDim : smla::v32::kDim;
    s.cache = DBuf<uint8_t>(bytes);
    s.ids = DBuf<int64_t>(ids.size());
    s.alone = DBuf<uint16_t>(size_t(std::max<int64_t>(n, 1)) * dim);
    s.paired = DBuf<uint16_t>(s.alone.n);
    s.bad_alone = DBuf<int32_t>(1);
    s.bad_paired = DBuf<int32_t>(1);
    s.cache.up(cache);
    s.ids.up(ids);
    CK(cudaMemset(s.alone.p, 0xff, s.alone.n * 2));
    CK(cudaMemset(s.paired.p, 0xee, s.paired.n * 2));
    CK(cudaMemset(s.bad_alone.p, 0, 4));
    CK(cudaMemset(s.bad_paired.p, 0, 4));
    s.p = smla_dequantize_kv_cache_params{.format = format, .cache = s.cache.p, .page_size = page_size, .num_pages = num_pages,
                                          .token_ids = s.ids.p, .num_tokens = int32_t(n), .out = s.paired.p};
  };
  Side a, b;
  make(a, format_a, page_a, pages_a, n_a, false);
  make(b, format_b, page_b, pages_b, n_b, true);
  for (Side* s : {&a, &b}) {
    smla_dequantize_kv_cache_params alone = s->p;
    alone.out = s->alone.p;
    check_status(smla_cuda_dequantize_kv_cache(&alone, s->bad_alone.p, 0), "dequant alone");
  }
  DBuf<unsigned long long> words(3);
  CK(cudaMemset(words.p, 0xab, 3 * 8));
  unsigned long long* zero[2] = {words.p, words.p + 2};
  check_status(smla_cuda_dequantize_kv_cache_pair(&a.p, a.bad_paired.p, &b.p, b.bad_paired.p, zero, 2, 0), "dequant pair");
  CK(cudaDeviceSynchronize());
  int64_t differ = 0;
  for (Side* s : {&a, &b}) {
    const auto x = s->alone.down(), y = s->paired.down();
    for (size_t i = 0; i < x.size(); ++i) differ += s->p.num_tokens > 0 && x[i] != y[i];
  }
  const auto w = words.down();
  const int32_t bads[4] = {a.bad_alone.down()[0], a.bad_paired.down()[0], b.bad_alone.down()[0], b.bad_paired.down()[0]};
  const bool words_ok = w[0] == 0 && w[1] == 0xababababababababull && w[2] == 0;
  char buf[200];
  snprintf(buf, sizeof buf, "%lld values differ from the lone launches; bad-id flags %d/%d and %d/%d; words %s", (long long)differ, bads[0],
           bads[1], bads[2], bads[3], words_ok ? "zeroed (and the one between kept)" : "NOT as asked");
  report(differ == 0 && bads[0] == bads[1] && bads[2] == bads[3] && bads[0] == 0 && bads[3] == (n_b > 0 ? 1 : 0) && words_ok,
         std::string("dequant pair ") + name, buf);
}

// ---------------------------------------------------------------- planner kernels: well-formed rows
// Every row element written, entries inside the workspace, −1 exactly after the row's length, and
// every row, length and dropped count exactly the host planner's; compressed ids inside the pages of
// their table. Up to 64 requests travel in the kernels' parameters, more are uploaded. Top-k entries:
// padding (−1), visible ones, ones beyond visibility (dropped) and the int32 extremes.
static void run_planner_case(uint64_t seed, const std::vector<int32_t>& seq, const std::vector<int32_t>& ext, int width, const std::string& name) {
  Rng r(seed);
  const int nr = int(seq.size()), window = 128, topk = 512;
  int64_t nq = 0, comp4 = 0, comp128 = 0, swa_rows = 0;
  for (int i = 0; i < nr; ++i) {
    nq += ext[i];
    comp4 += smla::plan::request_visible(seq[i], ext[i], 4);
    comp128 += smla::plan::request_visible(seq[i], ext[i], 128);
    swa_rows += smla::plan::swa_gather_len(seq[i], ext[i], window);
  }
  std::vector<int32_t> tk(size_t(nq) * topk);
  for (auto& v : tk) {
    const double u = r.uniform();
    v = u < 0.2 ? -1 : u < 0.21 ? INT32_MAX : u < 0.22 ? INT32_MIN : int32_t(r.range(0, 1300));  // some beyond visibility: dropped
  }
  DBuf<int32_t> dtk(tk.size()), drows(size_t(nq) * width), dlens(nq), ddrop(nq);
  DBuf<int64_t> dtotal(1);
  dtk.up(tk);
  int64_t bad = 0, total_off = 0;
  for (int ratio : {4, 0, 128}) {
    CK(cudaMemset(drows.p, 0x7f, drows.n * 4));
    CK(cudaMemset(dlens.p, 0x7f, dlens.n * 4));
    CK(cudaMemset(dtotal.p, 0x7f, 8));
    const smla_plan_combine_topk_params p{.num_requests = nr, .seq_lens = seq.data(), .extend_lens = ext.data(),
                                          .window = window, .ratio = ratio,
                                          .topk_indices = ratio == 4 ? dtk.p : nullptr, .topk = ratio == 4 ? topk : 0,
                                          .width = width, .rows = drows.p, .lens = dlens.p, .dropped = ddrop.p,
                                          .dropped_total = dtotal.p};
    check_status(smla_cuda_plan_rows(&p, nq, 0, 0), "smla_cuda_plan_rows");
    CK(cudaDeviceSynchronize());
    const auto rows = drows.down();
    const auto lens = dlens.down();
    // the device total is the sum of the per-query counts (dense rows: 0), and this case drops some
    int64_t dropped_sum = 0;
    for (int32_t d : ddrop.down()) dropped_sum += d;
    const int64_t total = dtotal.down()[0];
    total_off += total != dropped_sum || (ratio == 4) != (dropped_sum > 0);
    const int64_t ws = (ratio == 4 ? comp4 : ratio == 128 ? comp128 : 0) + swa_rows;  // workspace rows
    for (int64_t q = 0; q < nq; ++q) {
      bad += lens[q] < 0 || lens[q] > width;
      for (int k = 0; k < width; ++k) {
        const int32_t v = rows[size_t(q) * width + k];
        bad += k < lens[q] ? (v < 0 || v >= ws) : v != -1;
      }
    }
    // every row and count exactly the host planner's (planner.h's per-row functions, the same walk)
    const int64_t comp_total = ratio == 4 ? comp4 : ratio == 128 ? comp128 : 0;
    const auto drops = ddrop.down();
    std::vector<int32_t> host_row(static_cast<size_t>(width));
    int64_t q0 = 0, comp = 0, swa = 0;
    for (int i = 0; i < nr; ++i) {
      const int64_t s = seq[i], e = ext[i], g = smla::plan::swa_gather_len(s, e, window);
      for (int64_t qq = 0; qq < e; ++qq) {
        const int64_t q = q0 + qq;
        const smla::plan::QueryContext c{s - e + qq, comp, comp_total + swa, s - g};
        int32_t hd = 0;
        const int32_t hl = ratio == 4 ? smla::plan::topk_row(c, 4, window, tk.data() + q * topk, topk, host_row.data(), width, &hd)
                                      : smla::plan::dense_row(c, ratio, window, host_row.data(), width);
        bad += lens[q] != hl || drops[q] != hd;
        for (int k = 0; k < width; ++k) bad += rows[size_t(q) * width + k] != host_row[size_t(k)];
      }
      q0 += e;
      swa += g;
      comp += smla::plan::request_visible(s, e, ratio);
    }
  }
  std::vector<int32_t> tables;
  std::vector<int64_t> offsets = {0};
  int64_t total = 0;
  const int page_size = 64, pages = 100000;
  for (int i = 0; i < nr; ++i) {
    const int64_t v = smla::plan::request_visible(seq[i], ext[i], 4);
    total += v;
    for (int64_t p = 0; p < (v + page_size - 1) / page_size; ++p) tables.push_back(int32_t(r.range(0, pages)));
    offsets.push_back(int64_t(tables.size()));
  }
  DBuf<int32_t> dtab(tables.size());
  DBuf<int64_t> dids(total);
  dtab.up(tables);
  CK(cudaMemset(dids.p, 0xff, dids.n * 8));
  const smla_plan_compressed_token_ids_params p{.num_requests = nr, .seq_lens = seq.data(), .extend_lens = ext.data(),
                                                .ratio = 4, .page_tables = dtab.p, .page_table_offsets = offsets.data(),
                                                .page_size = page_size, .token_ids = dids.p};
  check_status(smla_cuda_plan_compressed_token_ids(&p, total, 0), "smla_cuda_plan_compressed_token_ids");
  CK(cudaDeviceSynchronize());
  for (int64_t id : dids.down()) bad += id < 0 || id >= int64_t(pages) * page_size;
  report(bad == 0 && total_off == 0, "planner rows c4/c0/c128 (and their dropped totals) and c4 compressed ids, " + name,
         std::to_string(bad) + " malformed entries, " + std::to_string(total_off) + " dropped totals off");
}

// The paged producer's e4m3 -> bf16 route (e4m3_tensor_dequant.cuh: the identity MMA, a bf16
// multiply by the scale as a bf16, stmatrix) against formats.h's float path, for every scale byte:
// rows 0-3 of the 64-dim tile hold every finite byte, row 4 the NaN bytes, the other rows bytes
// spread over the tile. Expected: a row's 32-dim half with a NaN byte is all NaN (its logit is NaN
// anyway), every other value equal to the float path's (the byte -0 gives +0: the MMA's sum).
static __host__ __device__ uint8_t tensor_check_byte(int r, int d) {
  if (r < 4) {
    const int p = r * 64 + d;  // the 254 finite bytes in order, then two more finite ones
    return p >= 254 ? uint8_t(p - 254) : uint8_t(p < 127 ? p : p + 1);
  }
  if (r == 4) return d == 5 ? 0x7f : d == 40 ? 0xff : uint8_t(d);
  const uint8_t b = uint8_t((r * 64 + d) * 37 + 11);
  return (b & 0x7f) == 0x7f ? uint8_t(b ^ 1) : b;
}
static __global__ void __launch_bounds__(128) tensor_dequant_kernel(uint16_t* out) {
  __shared__ __align__(1024) uint8_t operand[8192];
  __shared__ __align__(1024) uint8_t identity[smla::cuda::kE4m3IdentityBytes];
  __shared__ __align__(1024) uint8_t bf[8192];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  for (int i = tid; i < 64 * 64; i += 128) {
    const int r = i >> 6, d = i & 63;
    operand[smla::cuda::e4m3_operand_offset(r, d >> 4) + (d & 15)] = tensor_check_byte(r, d);
  }
  smla::cuda::write_e4m3_identity(identity, tid, 128);
  smla::cuda::fence_proxy_async();
  __syncthreads();
  float acc[2][16];
  const uint64_t d_ident = smla::cuda::detail::kmajor_desc(smla::cuda::smem_u32(identity));
  smla::cuda::wgmma_fence();
  for (int c = 0; c < 2; ++c) smla::cuda::e4m3_half_mma(acc[c], smla::cuda::smem_u32(operand), 32 * c, d_ident);
  smla::cuda::wgmma_commit();
  smla::cuda::wgmma_wait<0>();
  smla::cuda::fence_regs(acc[0]);
  smla::cuda::fence_regs(acc[1]);
  const uint32_t scale = smla::cuda::ue8m0_to_bf16x2(blockIdx.x);
  for (int c = 0; c < 2; ++c) smla::cuda::store_scaled_half(smla::cuda::smem_u32(bf), 32 * c, acc[c], scale, scale, warp, lane);
  __syncthreads();
  for (int i = tid; i < 64 * 64; i += 128)
    out[size_t(blockIdx.x) * 4096 + i] = *reinterpret_cast<const uint16_t*>(bf + smla::cuda::swz_offset(i >> 6, i & 63));
}
static void run_tensor_dequant_check() {
  DBuf<uint16_t> dout(size_t(256) * 4096);
  tensor_dequant_kernel<<<256, 128>>>(dout.p);
  check_status(cudaDeviceSynchronize() == cudaSuccess ? 0 : -1, "tensor_dequant kernel");
  const std::vector<uint16_t> out = dout.down();
  long long wrong = 0;
  for (uint32_t sb = 0; sb < 256; ++sb)
    for (int r = 0; r < 64; ++r)
      for (int d = 0; d < 64; ++d) {
        bool nan_half = false;
        for (int k = d & ~31; k < (d & ~31) + 32; ++k) nan_half |= (tensor_check_byte(r, k) & 0x7f) == 0x7f;
        const float want = nan_half ? NAN : smla::bf16_to_float(smla::float_to_bf16(smla::e4m3_to_float(tensor_check_byte(r, d)) *
                                                                                   smla::ue8m0_to_float(uint8_t(sb))));
        const uint16_t got_bits = out[size_t(sb) * 4096 + r * 64 + d];
        const float got = smla::bf16_to_float(got_bits);
        const bool same = (isnan(got) && isnan(want)) ||
                          (got == want && (got != 0.0f || got_bits == smla::float_to_bf16(want) || tensor_check_byte(r, d) == 0x80));
        wrong += !same;
      }
  report(wrong == 0, "e4m3 -> bf16 on the tensor cores (every byte, every scale)", "wrong values " + std::to_string(wrong));
}

// The launchers' per-device cache (launch_cache.cuh) against the runtime: every device's SM count
// as cudaDeviceGetAttribute gives it, asked on that device, and again from the cache.
static void run_launch_cache_check() {
  int count = 0;
  CK(cudaGetDeviceCount(&count));
  bool ok = true;
  std::string detail;
  for (int pass = 0; pass < 2; ++pass)
    for (int d = 0; d < count; ++d) {
      CK(cudaSetDevice(d));
      int want = 0, device = -1, sms = -1;
      CK(cudaDeviceGetAttribute(&want, cudaDevAttrMultiProcessorCount, d));
      CK(smla::cuda::current_device_sms(&device, &sms));
      ok = ok && device == d && sms == want;
      if (pass == 0) detail += "device " + std::to_string(d) + ": " + std::to_string(sms) + " SMs (runtime " + std::to_string(want) + ") ";
    }
  CK(cudaSetDevice(0));
  report(ok, "launch cache: SM count per device", detail);
}

static void run_checks() {
  uint64_t seed = uint64_t(time(nullptr));
  if (const char* s = getenv("SMLA_SEED")) seed = strtoull(s, nullptr, 10);
  printf("seed %llu\n", (unsigned long long)seed);
  int k = 0;
  run_launch_cache_check();
  run_tensor_dequant_check();
  // dequant
  run_dequant_case("v4 P=64", SMLA_CACHE_V4, 64, 40, 3000, false, seed + k++);
  run_dequant_case("v4 P=256 bad ids", SMLA_CACHE_V4, 256, 9, 2001, true, seed + k++);
  run_dequant_case("v4 P=2", SMLA_CACHE_V4, 2, 777, 999, false, seed + k++);
  run_dequant_case("v32", SMLA_CACHE_V32, 1, 5000, 3000, false, seed + k++);
  run_dequant_case("v32 bad ids", SMLA_CACHE_V32, 1, 100, 500, true, seed + k++);
  run_dequant_pair_case("v4 + v4", SMLA_CACHE_V4, 64, 20, 1024, SMLA_CACHE_V4, 256, 9, 2001, seed + k++);
  run_dequant_pair_case("v4 + none", SMLA_CACHE_V4, 64, 20, 777, SMLA_CACHE_V4, 64, 4, 0, seed + k++);
  run_dequant_pair_case("v4 + v32 (two launches)", SMLA_CACHE_V4, 2, 300, 500, SMLA_CACHE_V32, 1, 800, 300, seed + k++);
  // sparse prefill: {name, sQ, hQ, dQK, dV, sKV, topk, mode, lengths, sink, special, qscale, empty}
  const std::vector<PrefillCase> pcs = {
      {"h64 d576 topk128 valid", 4, 64, 576, 512, 1000, 128, kAllValid, false, false, false, 1.0, 0},
      {"h128 d512 topk256 mixed+len+sink", 6, 128, 512, 512, 3000, 256, kMixed, true, true, true, 1.0, 1},
      {"h128 d576 topk200 mixed+sink peaked", 5, 128, 576, 512, 2000, 200, kMixed, false, true, false, 4.0, 0},
      {"h64 d512 topk1 / topk65", 7, 64, 512, 512, 50, 65, kMixed, true, false, false, 1.0, 0},
      {"h16 d576 (pad heads) topk100", 5, 16, 576, 512, 500, 100, kMixed, false, true, true, 1.0, 0},
      {"h1 d512 topk64", 4, 1, 512, 512, 300, 64, kAllValid, false, false, false, 1.0, 0},
      {"h100 d576 (2 head blocks) topk300", 3, 100, 576, 512, 4000, 300, kMixed, true, true, false, 1.0, 0},
      {"h64 d512 topk0", 3, 64, 512, 512, 100, 0, kMixed, false, true, false, 1.0, 0},
      {"h64 d576 all invalid", 4, 64, 576, 512, 100, 128, kMixed, false, true, false, 1.0, 4},
      {"h64 d512 sKV=0", 2, 64, 512, 512, 0, 64, kMixed, false, false, false, 1.0, 0},
      {"h64 d576 adversarial", 6, 64, 576, 512, 700, 192, kAdversarial, true, true, true, 1.0, 0},
      {"sQ=70000 h1 d512 topk8 (grid x > 65535)", 70000, 1, 512, 512, 5000, 8, kMixed, true, false, false, 1.0, 0},
      {"h128 d576 topk2048 valid", 3, 128, 576, 512, 32768, 2048, kAllValid, false, false, false, 1.0, 0},
      {"fallback h8 d128 dV64", 5, 8, 128, 64, 300, 100, kMixed, true, true, true, 1.0, 0},
      {"fallback h3 d576 dV576", 3, 3, 576, 576, 300, 70, kMixed, false, true, false, 1.0, 0},
      {"misaligned q/kv -> fallback h64 d576", 3, 64, 576, 512, 300, 100, kMixed, true, true, false, 1.0, 0, true},
      {"-inf logits (lse -inf, NaN by the math) h64 d576", 3, 64, 576, 512, 200, 70, kMixed, false, false, false, 1.0, 0, false, 20},
      {"-inf logits + sink h128 d512", 3, 128, 512, 512, 200, 70, kMixed, false, true, false, 1.0, 0, false, 20},
      {"-inf logits fallback h4 d128 dV64", 3, 4, 128, 64, 200, 70, kMixed, false, true, false, 1.0, 0, false, 20},
      {"h64 d512 topk640 (10 blocks) valid", 4, 64, 512, 512, 9000, 640, kAllValid, false, false, false, 1.0, 0},
      {"h64 d512 topk576 (9 blocks: odd) mixed+len+sink", 5, 64, 512, 512, 9000, 576, kMixed, true, true, true, 1.0, 0},
      {"h128 d512 topk1024 flashmla-regime", 3, 128, 512, 512, 4000, 1024, kAllValid, false, true, false, 0.1, 0, false, 0, 1.0, 0.05},
      {"h128 d576 topk2048 flashmla-regime mixed", 3, 128, 576, 512, 32768, 2048, kMixed, true, true, false, 0.1, 0, false, 0, 1.0, 0.05},
      {"h64 d512 topk192 negative scale", 4, 64, 512, 512, 1000, 192, kMixed, true, true, false, 1.0, 0, false, 0, -1.0},
      {"h64 d576 topk130 zero scale", 3, 64, 576, 512, 1000, 130, kMixed, true, true, false, 1.0, 0, false, 0, 0.0},
      {"h192 d576 topk333 peaked", 3, 192, 576, 512, 3000, 333, kMixed, true, true, true, 6.0, 0},
      // more tiles than SMs (each CTA of the persistent grid runs several), queries without entries
      {"h64 d576 topk300, 300 queries mixed+len+sink", 300, 64, 576, 512, 3000, 300, kMixed, true, true, true, 1.0, 5},
      {"h128 d512 topk200, 150 queries adversarial+len", 150, 128, 512, 512, 2000, 200, kAdversarial, true, true, false, 1.0, 3},
      // 64 or more tiles a CTA: the staggered start, with the TMA-store epilogue
      {"h64 d512 topk40, 9000 queries mixed+len+sink (staggered start)", 9000, 64, 512, 512, 3000, 40, kMixed, true, true, false, 1.0, 7},
      // the last rounds' tiles are claimed at run time: runs of tiles without entries there (the
      // producer finishes them and claims on), and a launch with no tile for the math warpgroups
      {"h64 d512 topk64, 3000 queries, every 97th with entries", 3000, 64, 512, 512, 500, 64, kMixed, true, true, false, 1.0, 0,
       false, 0, 1.0, 0.0, 97},
      // short rows whose logits are all small (|logit| ~ 0.3): many rows of a query get their max
      // and lse redone on the CUDA cores (rows of up to 16 entries with each product split over the warp)
      {"h128 d512 topk64 short rows near zero, 200 queries mixed+len+sink", 200, 128, 512, 512, 3000, 64, kMixed, true, true, false, 0.3, 0},
      {"h64 d576 topk64 short rows near zero mixed+len", 50, 64, 576, 512, 1000, 64, kMixed, true, false, false, 0.3, 0},
      {"h128 d576 topk64, 400 queries, none with entries", 400, 128, 576, 512, 500, 64, kMixed, true, false, false, 1.0, 0, false,
       0, 1.0, 0.0, 401},
  };
  for (const auto& c : pcs) run_prefill_case(c, seed + k++);
  {  // sQ = 0: a no-op that must not launch or fail
    const smla_sparse_prefill_params p{.s_q = 0, .h_q = 64, .d_qk = 576, .d_v = 512, .s_kv = 10, .topk = 64, .sm_scale = 0.1f};
    const int32_t st = smla_cuda_sparse_prefill(&p, nullptr, 0);
    const cudaError_t e = cudaDeviceSynchronize();
    report(st == 0 && e == cudaSuccess, "prefill sQ=0 no-op", "status " + std::to_string(st));
  }
  // paged: {name, n, hQ, P, pages, topk, extra, eP, epages, etopk, mode, lengths, sink}
  const std::vector<PagedCase> gcs = {
      {"h64 P64 topk128", 4, 64, 64, 20, 128, false, 1, 0, 0, kAllValid, false, false},
      {"h128 P256 topk200 + extra P64 topk100 mixed", 5, 128, 256, 4, 200, true, 64, 10, 100, kMixed, true, true},
      {"h16 P2 topk64 + extra P256 adversarial", 5, 16, 2, 300, 64, true, 256, 2, 70, kAdversarial, true, true},
      {"h64 P64 topk0 + extra topk40", 3, 64, 64, 3, 0, true, 64, 3, 40, kMixed, false, true},
      // pairs of head groups of one query (heads 0-63 / 64-127), one of them padded; an odd number of
      // head groups; long lists (many blocks through both stages)
      {"h100 P64 topk300 + extra P32 topk129 adversarial", 6, 100, 64, 40, 300, true, 32, 50, 129, kAdversarial, true, true},
      {"h192 P128 topk130 mixed (three head groups)", 4, 192, 128, 8, 130, false, 1, 0, 0, kMixed, true, false},
      {"h256 P64 topk640 + extra P64 topk1024", 3, 256, 64, 60, 640, true, 64, 40, 1024, kAllValid, false, true},
      // more tiles than SMs: each CTA of the persistent grid runs several, some of them empty
      {"h64 P64 topk200 + extra P64 topk70, 300 queries mixed", 300, 64, 64, 30, 200, true, 64, 20, 70, kMixed, true, true},
      {"h128 P32 topk96 + extra P64 topk160, 170 queries adversarial", 170, 128, 32, 40, 96, true, 64, 20, 160, kAdversarial, true, false},
      // more tiles than SMs with a last round split along the KV (pieces merged by the combine kernel)
      {"h128 P64 topk128 + extra P64 topk1024, 70 queries mixed", 70, 128, 64, 40, 128, true, 64, 60, 1024, kMixed, true, true},
      // NaN bytes and large scale bytes in a few tokens
      {"h64 P64 topk128 special bytes, 40 queries", 40, 64, 64, 40, 128, false, 1, 0, 0, kMixed, false, true, true},
      {"h128 P64 topk128 + extra P64 topk512 special bytes, 20 queries", 20, 128, 64, 30, 128, true, 64, 40, 512, kAllValid, true, true, true},
  };
  for (const auto& c : gcs) run_paged_case(c, seed + k++);
  run_planner_case(seed + k++, {700, 129, 5000, 0, 2000, 77}, {300, 129, 1, 0, 777, 77}, 640, "6 requests");
  {  // 80 requests (an uploaded table), some empty, some shorter than a ratio; an odd width
    Rng lr(seed + k);
    std::vector<int32_t> seq(80), ext(80);
    for (int i = 0; i < 80; ++i) {
      seq[i] = i % 13 == 5 ? 0 : i % 7 == 3 ? int32_t(lr.range(1, 4)) : int32_t(lr.range(1, 3000));
      ext[i] = i % 11 == 2 ? 0 : std::min<int32_t>(seq[i], int32_t(lr.range(1, 120)));
    }
    run_planner_case(seed + k++, seq, ext, 643, "80 requests, width 643");
  }
}

// ---------------------------------------------------------------- fuzz (for compute-sanitizer)
static void run_fuzz() {
  Rng r(12345);
  int launches = 0;
  // The last two: more tiles than SMs and several pairs a tile (each CTA runs several tiles: the
  // next tile's loads behind the last one's O staging, P0 refilled over with dQK 576), lengths from
  // -2 to past topk (queries without entries among them).
  for (int it = 0; it < 8; ++it) {
    const int h_q = (int[]){64, 128, 7, 65, 1, 128, 64, 128}[it];
    const int d_qk = it % 2 ? 512 : 576;
    const int64_t s_q = it < 6 ? 3 : 300, s_kv = (int64_t[]){50, 1, 0, 200, 64, 70, 500, 500}[it];
    const int topk = (int[]){70, 64, 3, 129, 1, 200, 150, 150}[it];
    std::vector<uint16_t> hq(size_t(s_q) * h_q * d_qk), hkv(std::max<size_t>(size_t(s_kv) * d_qk, 1));
    for (auto& v : hq) v = to_bf16(r.normal());
    for (auto& v : hkv) v = to_bf16(r.normal());
    auto idx = make_indices(r, s_q, topk, s_kv, kAdversarial);
    std::vector<int32_t> len = {INT32_MIN, topk + 1000, INT32_MAX};
    if (s_q > 3) {
      len.resize(s_q);
      for (auto& v : len) v = int32_t(r.range(-2, topk + 3));
    }
    DBuf<uint16_t> dq(hq.size()), dkv(size_t(s_kv) * d_qk), dout(size_t(s_q) * h_q * 512);
    DBuf<int32_t> didx(idx.size()), dlen(len.size());
    DBuf<float> dl(s_q * h_q), dm(s_q * h_q);
    dq.up(hq);
    if (s_kv) CK(cudaMemcpy(dkv.p, hkv.data(), size_t(s_kv) * d_qk * 2, cudaMemcpyHostToDevice));
    didx.up(idx);
    dlen.up(len);
    for (int use_len = 0; use_len < 2; ++use_len) {
      const smla_sparse_prefill_params p{.q = dq.p, .kv = dkv.p, .indices = didx.p,
                                         .topk_length = use_len ? dlen.p : nullptr, .s_q = int32_t(s_q), .h_q = h_q,
                                         .d_qk = d_qk, .d_v = 512, .s_kv = int32_t(s_kv), .topk = topk, .sm_scale = 0.05f,
                                         .out = dout.p, .max_logits = dm.p, .lse = dl.p};
      check_status(smla_cuda_sparse_prefill(&p, nullptr, 0), "prefill");
      ++launches;
      if (it >= 6) {  // more tiles than SMs: the tiles claimed from a counter the caller zeroed
        DBuf<unsigned long long> claims(1);
        CK(cudaMemset(claims.p, 0, 8));
        check_status(smla_cuda_sparse_prefill(&p, claims.p, 0), "prefill, caller's tile counter");
        ++launches;
        CK(cudaDeviceSynchronize());
      }
    }
    CK(cudaDeviceSynchronize());
  }
  // the last: more tiles than SMs, so each CTA of the persistent paged grid runs several
  for (int it = 0; it < 5; ++it) {
    const int P = (int[]){64, 2, 256, 1, 16}[it], pages = (int[]){3, 5, 1, 7, 9}[it], h_q = (int[]){64, 128, 9, 100, 128}[it];
    const int n = it == 4 ? 150 : 3;
    V4Host c = make_v4_cache(r, P, pages);
    if (it == 4) poke_special(c, r, 2, 6);
    // 150 + 150 entries: five blocks, so the launches' last rounds are split along the KV
    std::vector<int32_t> idx = make_indices(r, n, 150, c.tokens(), kAdversarial);
    idx[0] = INT32_MAX;
    idx[1] = INT32_MIN;
    idx[2] = int32_t(c.tokens());
    std::vector<uint16_t> hq(size_t(n) * h_q * 512);
    for (auto& v : hq) v = to_bf16(r.normal());
    DBuf<uint8_t> dc(c.bytes.size());
    DBuf<int32_t> di(idx.size());
    DBuf<uint16_t> dq(hq.size()), dout(hq.size());
    DBuf<float> dl(size_t(n) * h_q), dm(size_t(n) * h_q);
    dc.up(c.bytes);
    di.up(idx);
    dq.up(hq);
    const smla_paged_sparse_attention_params pp{.q = dq.p, .n = n, .h_q = h_q, .k_cache = dc.p, .page_size = P,
                                                .num_pages = pages, .indices = di.p, .topk = 150, .extra_k_cache = dc.p,
                                                .extra_page_size = P, .extra_num_pages = pages, .extra_indices = di.p,
                                                .extra_topk = 150, .sm_scale = 0.04f, .out = dout.p, .lse = dl.p,
                                                .max_logits = dm.p};
    check_status(smla_cuda_paged_sparse_attention(&pp, 0), "paged");
    ++launches;
    std::vector<int64_t> ids = {0, -1, INT64_MIN, c.tokens(), INT64_MAX, c.tokens() - 1, (int64_t)1 << 40};
    DBuf<int64_t> dids(ids.size());
    DBuf<uint16_t> ddq(ids.size() * smla::v32::kDim);
    DBuf<int32_t> bad(1);
    dids.up(ids);
    const smla_dequantize_kv_cache_params v4{.format = SMLA_CACHE_V4, .cache = dc.p, .page_size = P, .num_pages = pages,
                                             .token_ids = dids.p, .num_tokens = int32_t(ids.size()), .out = ddq.p};
    check_status(smla_cuda_dequantize_kv_cache(&v4, bad.p, 0), "dequant v4");
    const smla_dequantize_kv_cache_params v32{.format = SMLA_CACHE_V32, .cache = dc.p, .page_size = 1,
                                              .num_pages = int32_t(c.bytes.size() / smla::v32::kTokenBytes),
                                              .token_ids = dids.p, .num_tokens = int32_t(ids.size()), .out = ddq.p};
    check_status(smla_cuda_dequantize_kv_cache(&v32, bad.p, 0), "dequant v32");
    launches += 3;
    // a layer's two gathers in one launch (and, with two formats, its fallback), zeroing two words
    DBuf<uint16_t> ddq2(ids.size() * smla::v32::kDim);
    DBuf<unsigned long long> words(2);
    unsigned long long* zero[2] = {words.p, words.p + 1};
    smla_dequantize_kv_cache_params v4b = v4;
    v4b.out = ddq2.p;
    check_status(smla_cuda_dequantize_kv_cache_pair(&v4, bad.p, &v4b, bad.p, zero, 2, 0), "dequant pair");
    check_status(smla_cuda_dequantize_kv_cache_pair(&v4, bad.p, &v32, nullptr, zero, 2, 0), "dequant pair, two formats");
    launches += 3;
    CK(cudaDeviceSynchronize());
  }
  // the planner kernels (c4 / c0 / c128 rows and the compressed ids, 4 launches a case): requests
  // in the parameters and uploaded, empty requests, the int32 extremes among the top-k entries
  run_planner_case(4242, {300, 5, 0, 1000}, {300, 5, 0, 129}, 640, "fuzz, 4 requests");
  {
    std::vector<int32_t> seq(70), ext(70);
    for (int i = 0; i < 70; ++i) seq[i] = 1 + 37 * i, ext[i] = i % 9 == 4 ? 0 : std::min(seq[i], 1 + i);
    run_planner_case(4243, seq, ext, 641, "fuzz, 70 requests (uploaded table)");
  }
  launches += 8;
  printf("fuzz: %d launches completed\n", launches);
}

// ---------------------------------------------------------------- benchmarks
// SMLA_BENCH_CLOCKS=1: a host thread samples the SM clock, power and clock-event reasons through
// NVML (loaded at run time; nothing links it) every millisecond, and each timed row reports them
// over its timed runs: whether a row's figure moved with the clocks or with something else.
struct ClockSampler {
  struct Sample {
    double t;
    unsigned sm_mhz, mw;
    unsigned long long reasons;
    unsigned mem_c;  // HBM temperature (NVML field 82), 0 when unread
  };
  struct FieldValue {  // nvmlFieldValue_t
    unsigned field_id, scope_id;
    long long timestamp, latency_us;
    int value_type, ret;
    union {
      double d;
      unsigned ui;
      unsigned long long ull;
    } value;
  };
  using FieldsFn = int (*)(void*, int, FieldValue*);
  FieldsFn fields_fn = nullptr;
  using InitFn = int (*)();
  using HandleFn = int (*)(unsigned, void**);
  using ClockFn = int (*)(void*, int, unsigned*);
  using PowerFn = int (*)(void*, unsigned*);
  using ReasonsFn = int (*)(void*, unsigned long long*);
  ClockFn clock_fn = nullptr;
  PowerFn power_fn = nullptr;
  ReasonsFn reasons_fn = nullptr;
  void* dev = nullptr;
  std::vector<Sample> samples;
  std::mutex mu;
  std::atomic<bool> stop{false};
  std::thread th;
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  bool start() {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) return false;
    auto init = reinterpret_cast<InitFn>(dlsym(lib, "nvmlInit_v2"));
    auto handle = reinterpret_cast<HandleFn>(dlsym(lib, "nvmlDeviceGetHandleByIndex_v2"));
    clock_fn = reinterpret_cast<ClockFn>(dlsym(lib, "nvmlDeviceGetClockInfo"));
    power_fn = reinterpret_cast<PowerFn>(dlsym(lib, "nvmlDeviceGetPowerUsage"));
    reasons_fn = reinterpret_cast<ReasonsFn>(dlsym(lib, "nvmlDeviceGetCurrentClocksEventReasons"));
    if (!reasons_fn) reasons_fn = reinterpret_cast<ReasonsFn>(dlsym(lib, "nvmlDeviceGetCurrentClocksThrottleReasons"));
    fields_fn = reinterpret_cast<FieldsFn>(dlsym(lib, "nvmlDeviceGetFieldValues"));
    if (!init || !handle || !clock_fn || init() != 0 || handle(0, &dev) != 0) return false;
    th = std::thread([this] {
      while (!stop.load()) {
        Sample s{now(), 0, 0, 0, 0};
        clock_fn(dev, 1 /* NVML_CLOCK_SM */, &s.sm_mhz);
        if (power_fn) power_fn(dev, &s.mw);
        if (reasons_fn) reasons_fn(dev, &s.reasons);
        if (fields_fn) {
          FieldValue fv{};
          fv.field_id = 82;  // NVML_FI_DEV_MEMORY_TEMP
          if (fields_fn(dev, 1, &fv) == 0 && fv.ret == 0) s.mem_c = fv.value_type == 0 ? unsigned(fv.value.d) : fv.value.ui;
        }
        {
          std::lock_guard<std::mutex> g(mu);
          samples.push_back(s);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
    return true;
  }
  // "sm MHz min/median/max, HBM °C range, W median, reasons OR" over [t0, t1]
  std::string summary(double t0, double t1) {
    std::vector<unsigned> c, w, m;
    unsigned long long r = 0;
    {
      std::lock_guard<std::mutex> g(mu);
      for (const auto& s : samples)
        if (s.t >= t0 && s.t <= t1) c.push_back(s.sm_mhz), w.push_back(s.mw), m.push_back(s.mem_c), r |= s.reasons;
    }
    if (c.empty()) return "no samples";
    std::sort(c.begin(), c.end());
    std::sort(w.begin(), w.end());
    char buf[160];
    std::sort(m.begin(), m.end());
    snprintf(buf, sizeof buf, "sm %u/%u/%u MHz, hbm %u-%u C, %.0f W, reasons 0x%llx, %zu samples", c.front(), c[c.size() / 2],
             c.back(), m.front(), m.back(), w[w.size() / 2] / 1000.0, r, c.size());
    return buf;
  }
  ~ClockSampler() {
    stop = true;
    if (th.joinable()) th.join();
  }
};
static ClockSampler* g_clocks = nullptr;


// Experiment (SMLA_BENCH_FLUSH=read): L2 emptied of the timed kernel's data by reading 256 MiB
// instead of writing it, so the lines left behind are clean (no write-back during the timed run).
__global__ void read_flush_kernel(const uint4* p, size_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

struct Timer {
  cudaEvent_t a, b;
  DBuf<uint8_t> flush{size_t(256) << 20};
  DBuf<uint32_t> sink{1};
  const char* mode = getenv("SMLA_BENCH_FLUSH");  // memset (default) | read | none
  // diagnostics: the device idle this long before each run; each row's runs printed in the order they ran
  const int gap_ms = getenv("SMLA_BENCH_GAP_MS") ? atoi(getenv("SMLA_BENCH_GAP_MS")) : 0;
  const bool print_runs = getenv("SMLA_BENCH_PRINT_RUNS") != nullptr;
  Timer() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaMemset(flush.p, 1, flush.n));
  }
  void evict(int i) {
    if (mode && !strcmp(mode, "none")) return;
    if (mode && !strcmp(mode, "read")) {
      read_flush_kernel<<<1024, 256>>>(reinterpret_cast<const uint4*>(flush.p), flush.n / 16, sink.p);
      CK(cudaGetLastError());
      return;
    }
    CK(cudaMemsetAsync(flush.p, i & 0xff, flush.n));
  }
  template <class F>
  double median_ms(F f, int reps) {
    for (int i = 0; i < 3; ++i) f();  // warm-up
    CK(cudaDeviceSynchronize());
    last_t0 = ClockSampler::now();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
      if (gap_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(gap_ms));
      evict(i);  // evict L2 between runs
      CK(cudaEventRecord(a));
      f();
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    last_t1 = ClockSampler::now();
    if (print_runs) {
      printf("  runs ms:");
      for (double x : t) printf(" %.3f", x);
      printf("\n");
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
  double last_t0 = 0, last_t1 = 0;
  std::string clocks() const { return g_clocks ? g_clocks->summary(last_t0, last_t1) : ""; }
};

static bool bench_selected(const char* name) {
  const char* f = getenv("SMLA_BENCH_FILTER");
  return !f || strstr(name, f) != nullptr || !strcmp(name, "d2d copy 1 GiB");
}

struct BenchRow {
  std::string name, unit;
  double ms, value, extra;
  std::string clocks;  // SMLA_BENCH_CLOCKS
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
  const smla_sparse_prefill_params p{.q = dq.p, .kv = dkv.p, .indices = didx.p, .s_q = c[0], .h_q = c[1], .d_qk = c[2],
                                     .d_v = 512, .s_kv = c[4], .topk = c[3], .sm_scale = 0.04f, .out = dout.p,
                                     .max_logits = dm.p, .lse = dl.p};
  for (int i = 0; i < runs; ++i) check_status(smla_cuda_sparse_prefill(&p, nullptr, 0), "prefill");
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
    const size_t bytes = v4 ? size_t(smla::v4::page_bytes(P)) * pages : size_t(tokens) * smla::v32::kTokenBytes;
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
      DBuf<uint16_t> dout(size_t(n) * (v4 ? smla::v4::kDim : smla::v32::kDim));
      di.up(ids);
      const smla_dequantize_kv_cache_params p{.format = v4 ? SMLA_CACHE_V4 : SMLA_CACHE_V32, .cache = dc.p, .page_size = P,
                                              .num_pages = pages, .token_ids = di.p, .num_tokens = int32_t(n),
                                              .out = dout.p};
      const double ms =
          timer.median_ms([&] { check_status(smla_cuda_dequantize_kv_cache(&p, nullptr, 0), "dequant"); }, reps);
      // record + int64 id read, bf16 row written
      const double moved = double(n) * (v4 ? (smla::v4::kTokenBytes + 8 + 2 * smla::v4::kDim) : (smla::v32::kTokenBytes + 8 + 2 * smla::v32::kDim));
      const double gbs = moved / ms / 1e6;
      rows.push_back({std::string("dequant ") + (v4 ? "v4 " : "v32 ") + std::to_string(n >> 10) + "K random tokens",
                      "GB/s", ms, gbs, gbs / copy_gbs, timer.clocks()});
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
  // SMLA_BENCH_ROUNDS=n runs the prefill rows n times in this process, round k behind a spacer
  // allocation of k * SMLA_BENCH_SPACER_MB MiB (other physical pages for the same data).
  const int rounds = getenv("SMLA_BENCH_ROUNDS") ? std::max(1, atoi(getenv("SMLA_BENCH_ROUNDS"))) : 1;
  const size_t spacer_mb = getenv("SMLA_BENCH_SPACER_MB") ? size_t(atoll(getenv("SMLA_BENCH_SPACER_MB"))) : 0;
  for (int round = 0; round < rounds; ++round)
  for (const Cfg& c : cfgs) {
    if (!bench_selected(c.name)) continue;
    DBuf<uint8_t> spacer(spacer_mb * round << 20);
    Rng r(99);
    // SMLA_BENCH_KV_ARENA=1: kv at the start of one 256 MiB allocation made once per process (the
    // same physical pages for every row and round; the spacer then moves only q, out and indices).
    static DBuf<uint8_t>* kv_arena = getenv("SMLA_BENCH_KV_ARENA") ? new DBuf<uint8_t>(size_t(256) << 20) : nullptr;
    const size_t kv_elems = size_t(c.s_kv) * c.d_qk;
    DBuf<uint16_t> dq(size_t(c.s_q) * c.h_q * c.d_qk), dkv(kv_arena ? 1 : kv_elems), dout(size_t(c.s_q) * c.h_q * 512);
    device_normal(dq.p, dq.n, 1);
    uint16_t* const kv_ptr = kv_arena ? reinterpret_cast<uint16_t*>(kv_arena->p) : dkv.p;
    device_normal(kv_ptr, kv_elems, 2);
    std::vector<int32_t> idx(size_t(c.s_q) * c.topk);
    for (auto& v : idx) v = int32_t(r.range(0, c.s_kv));
    DBuf<int32_t> didx(idx.size());
    DBuf<float> dl(size_t(c.s_q) * c.h_q), dm(size_t(c.s_q) * c.h_q);
    didx.up(idx);
    const float sm = float(1.0 / sqrt(double(c.d_qk)));
    const smla_sparse_prefill_params p{.q = dq.p, .kv = kv_ptr, .indices = didx.p, .s_q = c.s_q, .h_q = c.h_q,
                                       .d_qk = c.d_qk, .d_v = 512, .s_kv = c.s_kv, .topk = c.topk, .sm_scale = sm,
                                       .out = dout.p, .max_logits = dm.p, .lse = dl.p};
    const double flops = 2.0 * c.s_q * double(c.topk) * c.h_q * (c.d_qk + 512);
    const double ms = timer.median_ms([&] { check_status(smla_cuda_sparse_prefill(&p, nullptr, 0), "prefill"); }, reps);
    rows.push_back({rounds > 1 ? std::string(c.name) + " r" + std::to_string(round + 1) : std::string(c.name), "TFLOPS", ms,
                    flops / ms / 1e9, 0, timer.clocks()});
  }
  // paged FP8 attention at V4-like shapes: SWA window 128 (main) + compressed topk (extra), from
  // two caches; and FlashMLA's sparse decode workload as the addon's bench runs it (`fm`: both sets
  // random ids of one 65,536-token cache, a sink)
  struct PCfg {
    const char* name;
    int n, h_q, topk, extra_topk;
    bool one_cache;
  };
  const PCfg pcfgs[] = {{"paged V4 n4096 h64 swa128+c512", 4096, 64, 128, 512, false},
                        {"paged V4 n4096 h128 swa128+c1024", 4096, 128, 128, 1024, false},
                        {"paged V4 n4096 h64 fm128+512", 4096, 64, 128, 512, true},
                        {"paged V4 n4096 h128 fm128+1024", 4096, 128, 128, 1024, true},
                        // decode-sized batches: fewer tiles than SMs, each tile split along the KV
                        {"paged decode n1 h64 fm128+512", 1, 64, 128, 512, true},
                        {"paged decode n16 h128 fm128+1024", 16, 128, 128, 1024, true},
                        {"paged decode n64 h128 fm128+1024", 64, 128, 128, 1024, true}};
  // the caches made once (quantizing 65,536 tokens on the host takes seconds); a reused one advances
  // the generator as making it would, so every row sees the data it always had
  std::map<int, V4Host> made;
  const auto cache_of = [&](Rng& r, int pages) -> const V4Host& {
    auto it = made.find(pages);
    if (it == made.end()) return made.emplace(pages, make_v4_cache(r, 64, pages)).first->second;
    for (int64_t t = 0; t < it->second.tokens(); ++t) r.next();
    return it->second;
  };
  for (const PCfg& c : pcfgs) {
    if (!bench_selected(c.name)) continue;
    Rng r(5);
    const V4Host& main = cache_of(r, (c.one_cache ? 65536 : 32768) / 64);
    const V4Host& extra = c.one_cache ? main : cache_of(r, 8192 / 64);
    std::vector<uint16_t> hq(size_t(c.n) * c.h_q * 512);
    for (auto& v : hq) v = to_bf16(r.normal());
    auto idx = make_indices(r, c.n, c.topk, main.tokens(), kAllValid);
    auto eidx = make_indices(r, c.n, c.extra_topk, extra.tokens(), kAllValid);
    DBuf<uint16_t> dq(hq.size()), dout(hq.size());
    DBuf<uint8_t> dmain(main.bytes.size()), dextra(c.one_cache ? 16 : extra.bytes.size());
    DBuf<int32_t> di(idx.size()), dei(eidx.size());
    DBuf<float> dl(size_t(c.n) * c.h_q), dm(size_t(c.n) * c.h_q), dsink(size_t(c.h_q));
    std::vector<float> hsink(size_t(c.h_q));
    for (auto& v : hsink) v = float(r.normal());
    dsink.up(hsink);
    dq.up(hq);
    dmain.up(main.bytes);
    if (!c.one_cache) dextra.up(extra.bytes);
    di.up(idx);
    dei.up(eidx);
    const smla_paged_sparse_attention_params p{.q = dq.p, .n = c.n, .h_q = c.h_q, .k_cache = dmain.p, .page_size = 64,
                                               .num_pages = main.num_pages, .indices = di.p, .topk = c.topk,
                                               .extra_k_cache = c.one_cache ? dmain.p : dextra.p, .extra_page_size = 64,
                                               .extra_num_pages = extra.num_pages, .extra_indices = dei.p,
                                               .extra_topk = c.extra_topk,
                                               .attn_sink = c.one_cache ? dsink.p : nullptr, .sm_scale = 0.044f,
                                               .out = dout.p, .lse = dl.p, .max_logits = dm.p};
    const double ms = timer.median_ms([&] { check_status(smla_cuda_paged_sparse_attention(&p, 0), "paged"); }, reps);
    const double flops = 2.0 * c.n * double(c.topk + c.extra_topk) * c.h_q * 1024;
    rows.push_back({c.name, "TFLOPS", ms, flops / ms / 1e9, 0, timer.clocks()});
  }
  printf("\n%-48s %10s %12s %s\n", "benchmark", "median ms", "value", "");
  for (auto& b : rows)
    printf("%-48s %10.4f %9.1f %-6s%s%s%s\n", b.name.c_str(), b.ms, b.value, b.unit.c_str(),
           b.unit == "GB/s" && b.extra != 1.0 ? (" (" + std::to_string(int(b.extra * 100 + 0.5)) + "% of copy)").c_str()
                                              : "",
           b.clocks.empty() ? "" : "  ", b.clocks.c_str());
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


// ---------------------------------------------------------------- host cost of one small launch
// Diagnostics for the router's small chunks (docs/perf-history.md, forty-first session): per op,
// the host's time in the API call (median over batches of 20 back-to-back calls, the device
// queue never full), the device span of one call (events), and one call's latency from the call
// to cudaStreamSynchronize's return after an idle device. Window rows of 128 entries, either all
// valid ("full": a long prefix) or row i's first min(i + 1, 128) valid ("prefix0").
template <class F>
static void host_cost_row(const char* name, F call) {
  cudaStream_t s = 0;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 20; ++i) call();
  CK(cudaDeviceSynchronize());
  std::vector<double> host, dev, lat;
  for (int k = 0; k < 30; ++k) {
    const double t0 = ClockSampler::now();
    for (int i = 0; i < 20; ++i) call();
    host.push_back((ClockSampler::now() - t0) * 1e6 / 20);
    CK(cudaDeviceSynchronize());
  }
  for (int k = 0; k < 50; ++k) {
    CK(cudaEventRecord(a, s));
    call();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    dev.push_back(ms * 1000);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    const double t0 = ClockSampler::now();
    call();
    CK(cudaStreamSynchronize(s));
    lat.push_back((ClockSampler::now() - t0) * 1e6);
  }
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  printf("hostcost %-44s host %7.2f us  device %7.2f us  latency %7.2f us\n", name, med(host), med(dev), med(lat));
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
}

static void run_host_cost() {
  Rng r(7);
  {
    void* x = nullptr;
    host_cost_row("cudaMallocAsync + cudaFreeAsync 64 KB", [&] { CK(cudaMallocAsync(&x, 65536, 0)); CK(cudaFreeAsync(x, 0)); });
    DBuf<unsigned long long> w(1);
    host_cost_row("cudaMemsetAsync 8 B", [&] { CK(cudaMemsetAsync(w.p, 0, 8, 0)); });
  }
  const int W = 128;
  for (int hq : {64, 128}) {
    for (int n : {16, 64, 256, 1024}) {
      const int tokens = n + W - 1;
      const int pages = (tokens + 63) / 64;
      V4Host cache = make_v4_cache(r, 64, pages);
      DBuf<uint8_t> dcache(cache.bytes.size());
      dcache.up(cache.bytes);
      std::vector<uint16_t> hq_(size_t(n) * hq * 512);
      for (auto& v : hq_) v = to_bf16(r.normal());
      DBuf<uint16_t> dq(hq_.size()), dout(hq_.size()), dkv(size_t(tokens) * 512);
      dq.up(hq_);
      DBuf<float> dl(size_t(n) * hq), dm(size_t(n) * hq);
      std::vector<int64_t> ids(tokens);
      for (int t = 0; t < tokens; ++t) ids[t] = t;
      DBuf<int64_t> dids(tokens);
      dids.up(ids);
      const smla_dequantize_kv_cache_params dp{.format = SMLA_CACHE_V4, .cache = dcache.p, .page_size = 64, .num_pages = pages,
                                               .token_ids = dids.p, .num_tokens = tokens, .out = dkv.p};
      char name[96];
      snprintf(name, sizeof name, "dequant %d tokens", tokens);
      if (hq == 64) host_cost_row(name, [&] { check_status(smla_cuda_dequantize_kv_cache(&dp, nullptr, 0), "dequant"); });
      check_status(smla_cuda_dequantize_kv_cache(&dp, nullptr, 0), "dequant");  // the prefill's kv
      CK(cudaDeviceSynchronize());
      for (int prefix0 = 0; prefix0 < 2; ++prefix0) {
        // query i sits at window position i + W - 1: its window is tokens [i, i + W)
        // prefix0 as the planner gives it: row i's i + 1 entries first, their count in topk_length
        std::vector<int32_t> idx(size_t(n) * W, -1), len(n);
        for (int i = 0; i < n; ++i) {
          len[i] = prefix0 ? std::min(i + 1, W) : W;
          for (int k = 0; k < len[i]; ++k) idx[size_t(i) * W + k] = prefix0 ? std::max(0, i + 1 - W) + k : i + k;
        }
        DBuf<int32_t> didx(idx.size()), dlen(len.size());
        didx.up(idx);
        dlen.up(len);
        const smla_sparse_prefill_params pp{.q = dq.p, .kv = dkv.p, .indices = didx.p, .topk_length = prefix0 ? dlen.p : nullptr, .s_q = n, .h_q = hq, .d_qk = 512,
                                            .d_v = 512, .s_kv = tokens, .topk = W, .sm_scale = 0.044f, .out = dout.p,
                                            .max_logits = dm.p, .lse = dl.p};
        const smla_paged_sparse_attention_params ap{.q = dq.p, .n = n, .h_q = hq, .k_cache = dcache.p, .page_size = 64,
                                                    .num_pages = pages, .indices = didx.p, .topk = W,
                                                    .topk_length = prefix0 ? dlen.p : nullptr, .sm_scale = 0.044f,
                                                    .out = dout.p, .lse = dl.p, .max_logits = dm.p};
        const char* kind = prefix0 ? "prefix0" : "full";
        snprintf(name, sizeof name, "prefill hQ %d n %d %s", hq, n, kind);
        host_cost_row(name, [&] { check_status(smla_cuda_sparse_prefill(&pp, nullptr, 0), "prefill"); });
        if (prefix0) {  // how many rows the kernel's near-zero test can flag: short, |max| < 1/4
          const std::vector<float> m = dm.down();
          int near = 0;
          for (float v : m) near += fabsf(v) < 0.25f;
          printf("hostcost   rows with |maxLogit| < 1/4: %d of %zu\n", near, m.size());
        }
        snprintf(name, sizeof name, "paged hQ %d n %d %s", hq, n, kind);
        host_cost_row(name, [&] { check_status(smla_cuda_paged_sparse_attention(&ap, 0), "paged"); });
        // q at 0.1 of the unit data: short rows' logits near 0, their max and lse redone on the CUDA cores
        if (prefix0) {
          std::vector<uint16_t> small(hq_.size());
          for (size_t i = 0; i < small.size(); ++i) small[i] = to_bf16(smla::bf16_to_float(hq_[i]) * 0.1f);
          DBuf<uint16_t> dsmall(small.size());
          dsmall.up(small);
          smla_sparse_prefill_params ps = pp;
          ps.q = dsmall.p;
          snprintf(name, sizeof name, "prefill hQ %d n %d prefix0, small logits", hq, n);
          host_cost_row(name, [&] { check_status(smla_cuda_sparse_prefill(&ps, nullptr, 0), "prefill"); });
        }
      }
    }
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);
  {
    // as the addon does: stream-ordered temporaries (the planner's uploaded tables) stay cached
    cudaMemPool_t pool;
    uint64_t threshold = UINT64_MAX;
    CK(cudaDeviceGetDefaultMemPool(&pool, 0));
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
  if (const char* g = getenv("SMLA_L2_FETCH_GRANULARITY")) {
    // experiment: the L2's fetch granularity in bytes (cudaLimitMaxL2FetchGranularity, 0-128)
    CK(cudaDeviceSetLimit(cudaLimitMaxL2FetchGranularity, size_t(atoi(g))));
    size_t v = 0;
    CK(cudaDeviceGetLimit(&v, cudaLimitMaxL2FetchGranularity));
    printf("L2 fetch granularity: %zu bytes\n", v);
  }
  if (mode == "fuzz") {
    run_fuzz();
    return 0;
  }
  if (mode == "hostcost") {
    run_host_cost();
    return 0;
  }
  if (mode == "profile") {
    run_profile(argc > 2 ? atoi(argv[2]) : 0, argc > 3 ? atoi(argv[3]) : 2);
    return 0;
  }
  if (mode == "bench") {
    static ClockSampler sampler;
    if (getenv("SMLA_BENCH_CLOCKS")) {
      if (sampler.start()) g_clocks = &sampler;
      else printf("SMLA_BENCH_CLOCKS: NVML not available\n");
    }
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
