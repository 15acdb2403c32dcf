// Single-thread benchmark of the native core on the `run` shape (the WASM twin is
// bench/wasm_kernel.mjs): sparse prefill GFLOP/s and dequant gather GB/s (v4; v32 with power-of-two
// scales, which keep products exact, and with other scales, which take the bf16 rounding), medians
// of runs.
//   ./build/smla_core_bench [sQ=32] [sKV=4096] [runs=5] [hQ=64] [dQK=512] [topk=640]
// sQ = 0 times only the dequant. SMLA_BENCH_CPU_TIME=1 times with the thread's CPU clock instead of
// the wall clock: on a shared machine, time the thread waited for a core is then not counted.
#include <math.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <time.h>
#include <random>
#include <vector>

#include "core_calls.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_mla.h"

namespace {
const bool g_cpu_time = getenv("SMLA_BENCH_CPU_TIME") != nullptr;
double now() {
  if (g_cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
uint16_t bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
}  // namespace

int main(int argc, char** argv) {
  const int s_q = argc > 1 ? atoi(argv[1]) : 32, s_kv = argc > 2 ? atoi(argv[2]) : 4096;
  const int runs = argc > 3 ? atoi(argv[3]) : 5;
  // the shape: the run shape unless given (V3.2: 128 576 2048)
  const int h_q = argc > 4 ? atoi(argv[4]) : 64, d_qk = argc > 5 ? atoi(argv[5]) : 512, d_v = 512;
  const int topk = argc > 6 ? atoi(argv[6]) : 640;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<uint16_t> q(size_t(s_q) * h_q * d_qk), kv(size_t(s_kv) * d_qk), out(size_t(s_q) * h_q * d_v);
  for (auto& x : q) x = bf16(u(rng));
  for (auto& x : kv) x = bf16(u(rng));
  std::vector<int32_t> idx(size_t(s_q) * topk);
  for (auto& x : idx) x = int32_t(rng() % uint32_t(s_kv));
  std::vector<float> sink(h_q, 0.5f), ml(size_t(s_q) * h_q), lse(size_t(s_q) * h_q);
  const double flops = 2.0 * s_q * topk * h_q * (d_qk + d_v);
  std::vector<double> t;
  for (int r = 0; s_q > 0 && r <= runs; ++r) {
    const double t0 = now();
    if (core(smla_sparse_prefill_params{.q = q.data(), .kv = kv.data(), .indices = idx.data(),
                                        .attn_sink = sink.data(), .s_q = s_q, .h_q = h_q, .d_qk = d_qk,
                                        .d_v = d_v, .s_kv = s_kv, .topk = topk,
                                        .sm_scale = 1.0f / sqrtf(float(d_qk)), .out = out.data(),
                                        .max_logits = ml.data(), .lse = lse.data()}) != 0)
      return 1;
    if (r > 0) t.push_back(now() - t0);
  }
  if (s_q > 0)
    printf("native sparse_prefill sQ=%d hQ=%d dQK=%d topk=%d sKV=%d: median %.1f ms, %.2f GFLOP/s\n", s_q, h_q,
         d_qk, topk, s_kv, median(t) * 1e3, flops / median(t) / 1e9);

  const int P = 64, pages = 128, n = 8192;
  const int64_t page_bytes = smla::v4::page_bytes(P);
  std::vector<uint8_t> cache(size_t(page_bytes * pages));
  std::vector<int64_t> ids(n);
  std::vector<uint16_t> dq(size_t(n) * 576);
  auto time_dequant = [&](int format, int32_t page_size, int32_t num_pages, const char* what,
                          double token_bytes, int dim) {
    t.clear();
    for (int r = 0; r <= runs; ++r) {
      const double t0 = now();
      if (core(smla_dequantize_kv_cache_params{.format = format, .cache = cache.data(), .page_size = page_size,
                                               .num_pages = num_pages, .token_ids = ids.data(), .num_tokens = n,
                                               .out = dq.data()}) != 0) return false;
      if (r > 0) t.push_back(now() - t0);
    }
    printf("native dequantize %s gather n=%d: median %.2f ms, %.2f GB/s\n", what, n, median(t) * 1e3,
           n * (token_bytes + 2.0 * dim) / median(t) / 1e9);
    return true;
  };
  // v4 as quantization writes it: scale bytes whose products are exact (no bf16 rounding step)
  for (auto& b : cache) b = uint8_t(rng() & 0x7e);
  auto fill_scales = [&](auto scale_byte) {
    for (int p = 0; p < pages; ++p)
      for (int s = 0; s < P * smla::v4::kScaleBytes; ++s)
        cache[size_t(p * page_bytes + P * smla::v4::kDataBytes + s)] = scale_byte();
  };
  fill_scales([&] { return uint8_t(120 + rng() % 8); });
  for (auto& x : ids) x = int64_t(rng() % uint32_t(P * pages));
  if (!time_dequant(0, P, pages, "v4", smla::v4::kTokenBytes, smla::v4::kDim)) return 1;
  // paged attention (SPEC §5) over that v4 cache: sQ queries, hQ heads, topk token ids each; the
  // rope values set to bf16 values of the prefill's data
  if (s_q > 0) {
    for (int64_t id = 0; id < int64_t(P) * pages; ++id) {
      uint8_t* rope = &cache[size_t(smla::v4::data_offset(id, P) + smla::v4::kNopeDim)];
      for (int j = 0; j < smla::v4::kRopeDim; ++j) {
        const uint16_t b = bf16(u(rng));
        memcpy(rope + 2 * j, &b, 2);
      }
    }
    const int D = smla::v4::kDim;
    std::vector<uint16_t> qp(size_t(s_q) * h_q * D), op(size_t(s_q) * h_q * D);
    for (auto& x : qp) x = bf16(u(rng));
    std::vector<int32_t> pidx(size_t(s_q) * topk);
    for (auto& x : pidx) x = int32_t(rng() % uint32_t(P * pages));
    t.clear();
    for (int r = 0; r <= runs; ++r) {
      const double t0 = now();
      if (core(smla_paged_sparse_attention_params{.q = qp.data(), .n = s_q, .h_q = h_q, .k_cache = cache.data(),
                                                  .page_size = P, .num_pages = pages, .indices = pidx.data(),
                                                  .topk = topk, .sm_scale = 1.0f / sqrtf(float(D)),
                                                  .out = op.data(), .lse = lse.data(),
                                                  .max_logits = ml.data()}) != 0)
        return 1;
      if (r > 0) t.push_back(now() - t0);
    }
    printf("native paged_sparse_attention n=%d hQ=%d topk=%d: median %.1f ms, %.2f GFLOP/s\n", s_q, h_q, topk,
           median(t) * 1e3, 2.0 * s_q * topk * h_q * (2 * D) / median(t) / 1e9);
  }
  // v32 (page size 1) over the same bytes: 656-byte tokens, float32 scales. Powers of two in
  // range keep products exact; other scales take the bf16 rounding step.
  const int v32_tokens = int(cache.size() / 656);
  auto fill_v32_scales = [&](auto scale) {
    for (int i = 0; i < v32_tokens; ++i)
      for (int k = 0; k < 4; ++k) {
        const float sc = scale();
        memcpy(&cache[size_t(i) * 656 + 512 + 4 * k], &sc, 4);
      }
  };
  for (auto& x : ids) x = int64_t(rng() % uint32_t(v32_tokens));
  fill_v32_scales([&] { return ldexpf(1.0f, int(rng() % 16) - 8); });
  if (!time_dequant(1, 1, v32_tokens, "v32", 656, 576)) return 1;
  fill_v32_scales([&] { return ldexpf(1.0f + float(rng() % 4096) / 4096.0f, int(rng() % 16) - 8); });
  if (!time_dequant(1, 1, v32_tokens, "v32 (scales not powers of two)", 656, 576)) return 1;
  return 0;
}
