// The `cpu` backend's ops: the C core (cpp/src, built for this machine) called on row ranges from
// worker threads. Each op reads and checks its positional arguments (exact lengths derived from the
// scalars, so a mismatched call is refused instead of reading out of bounds), then queues a RowJob.
// Inputs are owned by the call or shared (addon.h, Args); a cache written in place is written only
// at the end, on the JS thread (quantize's commit). The argument order is mirrored by
// src/backends/native/binding.ts.
#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "addon.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {
namespace {

constexpr int64_t kI32Max = INT32_MAX;
constexpr int kMaxThreads = 1024;

// Bytes of a cache in the C ABI's geometry (SPEC §3).
uint64_t CacheBytes(int32_t format, int64_t page_size, int64_t num_pages) {
  if (format == SMLA_CACHE_V32) return uint64_t(num_pages) * 656;
  const uint64_t page = (uint64_t(page_size) * 584 + 575) / 576 * 576;
  return page * uint64_t(num_pages);
}

int64_t RowDim(int32_t format) { return format == SMLA_CACHE_V32 ? 576 : 512; }

// A compact cache of m tokens with ids 0..m-1: v4 pages of 72 tokens (72 · 584 = 73 · 576 bytes,
// no padding), v32 contiguous. It holds just the tokens a call reads or writes.
constexpr int64_t kCompactV4PageSize = 72;
struct Geometry {
  int64_t page_size, num_pages;
  uint64_t bytes;
};
Geometry CompactGeometry(int32_t format, int64_t m) {
  if (format == SMLA_CACHE_V32) return {1, m, uint64_t(m) * 656};
  const int64_t pages = (m + kCompactV4PageSize - 1) / kCompactV4PageSize;
  return {kCompactV4PageSize, pages, CacheBytes(format, kCompactV4PageSize, pages)};
}

// Copies token `from` of cache `src` (page size src_ps) to token `to` of `dst` (page size dst_ps):
// v32 its 656 bytes, v4 its 576 data bytes and its 8 scale bytes (SPEC §3.1).
void CopyToken(int32_t format, const uint8_t* src, int64_t src_ps, int64_t from, uint8_t* dst, int64_t dst_ps, int64_t to) {
  if (format == SMLA_CACHE_V32) {
    std::memcpy(dst + uint64_t(to) * 656, src + uint64_t(from) * 656, 656);
    return;
  }
  auto at = [](int64_t ps, int64_t t, uint64_t* data, uint64_t* scales) {
    const uint64_t page_bytes = CacheBytes(SMLA_CACHE_V4, ps, 1), page = uint64_t(t / ps), slot = uint64_t(t % ps);
    *data = page * page_bytes + slot * 576;
    *scales = page * page_bytes + uint64_t(ps) * 576 + slot * 8;
  };
  uint64_t sd, ss, dd, ds;
  at(src_ps, from, &sd, &ss);
  at(dst_ps, to, &dd, &ds);
  std::memcpy(dst + dd, src + sd, 576);
  std::memcpy(dst + ds, src + ss, 8);
}

// Cache token ids are int32 on the JS side and int64 in the C ABI.
int32_t CheckIds(const int32_t* ids, int64_t n, int64_t num_tokens) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= num_tokens) return SMLA_ERR_OUT_OF_RANGE;
  return SMLA_OK;
}

// sparsePrefill(threads, q, kv, indices, topkLength|null, attnSink|null, sQ, hQ, dQK, dV, sKV, topk,
//               smScale, out, maxLogits, lse)
Napi::Value SparsePrefill(const Napi::CallbackInfo& info) {
  Args a(info, "sparsePrefill");
  const int threads = a.Int(0, "threads", 1, kMaxThreads);
  const int64_t sQ = a.Int(6, "sQ", 0, kI32Max), hQ = a.Int(7, "hQ", 1, kI32Max), dQK = a.Int(8, "dQK", 1, kI32Max),
                dV = a.Int(9, "dV", 1, kI32Max), sKV = a.Int(10, "sKV", 0, kI32Max), topk = a.Int(11, "topk", 0, kI32Max);
  const float scale = a.Float(12, "smScale");
  const uint16_t* q = a.Input<uint16_t>(1, "q", napi_uint16_array, uint64_t(sQ * hQ) * uint64_t(dQK));
  const uint16_t* kv = a.Input<uint16_t>(2, "kv", napi_uint16_array, uint64_t(sKV) * uint64_t(dQK));
  const int32_t* idx = a.Input<int32_t>(3, "indices", napi_int32_array, uint64_t(sQ) * uint64_t(topk));
  const int32_t* lens = a.Input<int32_t>(4, "topkLength", napi_int32_array, uint64_t(sQ), true);
  const float* sink = a.Input<float>(5, "attnSink", napi_float32_array, uint64_t(hQ), true);
  uint16_t* out = a.Output<uint16_t>(13, "out", napi_uint16_array, uint64_t(sQ * hQ) * uint64_t(dV));
  float* ml = a.Output<float>(14, "maxLogits", napi_float32_array, uint64_t(sQ * hQ));
  float* lse = a.Output<float>(15, "lse", napi_float32_array, uint64_t(sQ * hQ));

  RowJob job;
  job.rows = sQ;
  job.threads = threads;
  job.run = [=](int64_t b, int64_t e) {
    return smla_sparse_prefill(q + b * hQ * dQK, kv, idx + b * topk, lens ? lens + b : nullptr, sink, int32_t(e - b),
                               int32_t(hQ), int32_t(dQK), int32_t(dV), int32_t(sKV), int32_t(topk), scale,
                               out + b * hQ * dV, ml + b * hQ, lse + b * hQ);
  };
  return QueueRowJob(a.Env(), a.Op(), std::move(job), a.TakeHolds());
}

// pagedSparseAttention(threads, q, n, hQ, kCache, pageSize, numPages, indices, topk, topkLength|null,
//                      extraKCache|null, extraPageSize, extraNumPages, extraIndices|null, extraTopk,
//                      extraTopkLength|null, attnSink|null, smScale, out, lse, maxLogits)
Napi::Value PagedSparseAttention(const Napi::CallbackInfo& info) {
  Args a(info, "pagedSparseAttention");
  const int threads = a.Int(0, "threads", 1, kMaxThreads);
  const int64_t n = a.Int(2, "n", 0, kI32Max), hQ = a.Int(3, "hQ", 1, kI32Max);
  const int64_t ps = a.Int(5, "pageSize", 1, kI32Max), np = a.Int(6, "numPages", 0, kI32Max);
  const int64_t topk = a.Int(8, "topk", 0, kI32Max);
  const bool hasExtra = !a.IsNull(10);
  const int64_t eps = a.Int(11, "extraPageSize", hasExtra ? 1 : 0, kI32Max), enp = a.Int(12, "extraNumPages", 0, kI32Max);
  const int64_t etopk = a.Int(14, "extraTopk", 0, hasExtra ? kI32Max : 0);
  const float scale = a.Float(17, "smScale");
  const uint16_t* q = a.Input<uint16_t>(1, "q", napi_uint16_array, uint64_t(n * hQ) * 512);
  const uint8_t* kc = a.Input<uint8_t>(4, "kCache", napi_uint8_array, CacheBytes(SMLA_CACHE_V4, ps, np));
  const int32_t* idx = a.Input<int32_t>(7, "indices", napi_int32_array, uint64_t(n) * uint64_t(topk));
  const int32_t* lens = a.Input<int32_t>(9, "topkLength", napi_int32_array, uint64_t(n), true);
  const uint8_t* ekc = hasExtra ? a.Input<uint8_t>(10, "extraKCache", napi_uint8_array, CacheBytes(SMLA_CACHE_V4, eps, enp)) : nullptr;
  const int32_t* eidx = hasExtra ? a.Input<int32_t>(13, "extraIndices", napi_int32_array, uint64_t(n) * uint64_t(etopk)) : nullptr;
  const int32_t* elens = hasExtra ? a.Input<int32_t>(15, "extraTopkLength", napi_int32_array, uint64_t(n), true) : nullptr;
  const float* sink = a.Input<float>(16, "attnSink", napi_float32_array, uint64_t(hQ), true);
  uint16_t* out = a.Output<uint16_t>(18, "out", napi_uint16_array, uint64_t(n * hQ) * 512);
  float* lse = a.Output<float>(19, "lse", napi_float32_array, uint64_t(n * hQ));
  float* ml = a.Output<float>(20, "maxLogits", napi_float32_array, uint64_t(n * hQ));

  RowJob job;
  job.rows = n;
  job.threads = threads;
  job.run = [=](int64_t b, int64_t e) {
    return smla_paged_sparse_attention(
        q + b * hQ * 512, int32_t(e - b), int32_t(hQ), kc, int32_t(ps), int32_t(np), idx + b * topk, int32_t(topk),
        lens ? lens + b : nullptr, ekc, int32_t(eps), int32_t(enp), eidx ? eidx + b * etopk : nullptr, int32_t(etopk),
        elens ? elens + b : nullptr, sink, scale, out + b * hQ * 512, lse + b * hQ, ml + b * hQ);
  };
  return QueueRowJob(a.Env(), a.Op(), std::move(job), a.TakeHolds());
}

// dequantizeKvCache(threads, format, cache, pageSize, numPages, tokenIds, n, out)
Napi::Value DequantizeKvCache(const Napi::CallbackInfo& info) {
  Args a(info, "dequantizeKvCache");
  const int threads = a.Int(0, "threads", 1, kMaxThreads);
  const int32_t format = a.Int(1, "format", SMLA_CACHE_V4, SMLA_CACHE_V32);
  const int64_t ps = a.Int(3, "pageSize", 1, format == SMLA_CACHE_V32 ? 1 : kI32Max), np = a.Int(4, "numPages", 0, kI32Max);
  const int64_t n = a.Int(6, "n", 0, kI32Max), dim = RowDim(format);
  bool shared = false;
  const uint8_t* whole = static_cast<const uint8_t*>(a.Borrow(2, "cache", napi_uint8_array, CacheBytes(format, ps, np), &shared));
  const int32_t* ids = a.Input<int32_t>(5, "tokenIds", napi_int32_array, uint64_t(n));
  uint16_t* out = a.Output<uint16_t>(7, "out", napi_uint16_array, uint64_t(n) * uint64_t(dim));

  // A shared cache is read in place; of any other, only the tokens asked for are copied here (n
  // tokens, not the whole cache) into a compact cache the call owns, read as ids 0..n-1.
  const int32_t ids_ok = CheckIds(ids, n, ps * np);
  const uint8_t* cache = whole;
  int64_t cps = ps, cnp = np;
  if (!shared && ids_ok == SMLA_OK && n > 0) {
    const Geometry g = CompactGeometry(format, n);
    uint8_t* compact = a.Own(g.bytes);
    for (int64_t i = 0; i < n; ++i) CopyToken(format, whole, ps, ids[i], compact, g.page_size, i);
    cache = compact;
    cps = g.page_size;
    cnp = g.num_pages;
  }
  const bool compact = cache != whole;

  RowJob job;
  job.rows = n;
  job.threads = threads;
  job.prepare = [=](int64_t&) { return ids_ok; };
  job.run = [=](int64_t b, int64_t e) {
    std::vector<int64_t> wide(size_t(e - b));
    for (int64_t i = b; i < e; ++i) wide[size_t(i - b)] = compact ? i : ids[i];
    return smla_dequantize_kv_cache(format, cache, int32_t(cps), int32_t(cnp), wide.data(), int32_t(e - b), out + b * dim);
  };
  return QueueRowJob(a.Env(), a.Op(), std::move(job), a.TakeHolds());
}

// quantizeKvCache(threads, format, cache, pageSize, numPages, tokenIds, n, rows, rowsDtype)
// rowsDtype: 0 = float32 rows (Float32Array), 1 = bf16 rows (Uint16Array).
// Atomic: the tokens are quantized into a compact scratch cache the call owns, and written into
// `cache` only by the commit on the JS thread, once every row succeeded and only if the cache's
// memory is still the one that was passed (not detached or resized meanwhile); otherwise the call
// rejects and the cache is untouched.
Napi::Value QuantizeKvCache(const Napi::CallbackInfo& info) {
  Args a(info, "quantizeKvCache");
  const int threads = a.Int(0, "threads", 1, kMaxThreads);
  const int32_t format = a.Int(1, "format", SMLA_CACHE_V4, SMLA_CACHE_V32);
  const int64_t ps = a.Int(3, "pageSize", 1, format == SMLA_CACHE_V32 ? 1 : kI32Max), np = a.Int(4, "numPages", 0, kI32Max);
  const int64_t n = a.Int(6, "n", 0, kI32Max), dim = RowDim(format);
  const int32_t dtype = a.Int(8, "rowsDtype", SMLA_ROWS_F32, SMLA_ROWS_BF16);
  const uint64_t cache_bytes = CacheBytes(format, ps, np);
  a.Output<uint8_t>(2, "cache", napi_uint8_array, cache_bytes);  // checked and pinned; written by the commit only
  auto cache_ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(info[2].As<Napi::Object>()));
  const int32_t* ids = a.Input<int32_t>(5, "tokenIds", napi_int32_array, uint64_t(n));
  const size_t elem = dtype == SMLA_ROWS_F32 ? 4 : 2;
  const uint8_t* rows = dtype == SMLA_ROWS_F32
                            ? reinterpret_cast<const uint8_t*>(a.Input<float>(7, "rows", napi_float32_array, uint64_t(n * dim)))
                            : reinterpret_cast<const uint8_t*>(a.Input<uint16_t>(7, "rows", napi_uint16_array, uint64_t(n * dim)));

  // Duplicate ids: the last row wins (as in a sequential loop), so only last occurrences are
  // quantized; kept token k goes to compact slot k.
  struct Kept {
    std::vector<int64_t> ids;      // cache ids of the tokens to write
    std::vector<int64_t> rows;     // their row numbers in `rows`
    std::vector<int64_t> compact;  // 0..m-1, the compact ids
    Geometry geometry{1, 0, 0};
    std::vector<uint8_t> scratch;  // the compact cache
  };
  auto kept = std::make_shared<Kept>();
  RowJob job;
  job.rows = n;
  job.threads = threads;
  job.prepare = [=](int64_t& count) {
    int32_t s = CheckIds(ids, n, ps * np);
    if (s != SMLA_OK) return s;  // nothing written
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return ids[x] < ids[y]; });
    for (size_t k = 0; k < order.size(); ++k) {
      if (k + 1 < order.size() && ids[order[k + 1]] == ids[order[k]]) continue;  // a later row has this id
      kept->ids.push_back(ids[order[k]]);
      kept->rows.push_back(order[k]);
    }
    count = int64_t(kept->ids.size());
    kept->compact.resize(size_t(count));
    for (int64_t k = 0; k < count; ++k) kept->compact[size_t(k)] = k;
    kept->geometry = CompactGeometry(format, count);
    kept->scratch.assign(size_t(kept->geometry.bytes), 0);
    return int32_t(SMLA_OK);
  };
  job.run = [=](int64_t b, int64_t e) {
    // Tokens are quantized one call per run of consecutive source rows (usually the whole range).
    const Geometry& g = kept->geometry;
    int64_t i = b;
    while (i < e) {
      int64_t j = i + 1;
      while (j < e && kept->rows[size_t(j)] == kept->rows[size_t(j - 1)] + 1) ++j;
      int32_t s = smla_quantize_kv_cache(format, kept->scratch.data(), int32_t(g.page_size), int32_t(g.num_pages),
                                         kept->compact.data() + i, int32_t(j - i),
                                         rows + size_t(kept->rows[size_t(i)]) * size_t(dim) * elem, dtype);
      if (s != SMLA_OK) return s;
      i = j;
    }
    return int32_t(SMLA_OK);
  };
  job.commit = [=](Napi::Env env) -> std::string {
    void* data = nullptr;
    size_t length = 0;
    napi_typedarray_type type;
    if (napi_get_typedarray_info(env, cache_ref->Value(), &type, &length, &data, nullptr, nullptr) != napi_ok ||
        uint64_t(length) != cache_bytes || (cache_bytes > 0 && data == nullptr))
      return "the cache's memory was detached, transferred or resized while the call ran; nothing was written";
    uint8_t* cache = static_cast<uint8_t*>(data);
    for (size_t k = 0; k < kept->ids.size(); ++k)
      CopyToken(format, kept->scratch.data(), kept->geometry.page_size, int64_t(k), cache, ps, kept->ids[k]);
    return std::string();
  };
  return QueueRowJob(a.Env(), a.Op(), std::move(job), a.TakeHolds());
}

}  // namespace

const OpEntry kCpuOps[] = {
    {"sparsePrefill", SparsePrefill},
    {"pagedSparseAttention", PagedSparseAttention},
    {"dequantizeKvCache", DequantizeKvCache},
    {"quantizeKvCache", QuantizeKvCache},
};
const size_t kCpuOpCount = sizeof(kCpuOps) / sizeof(kCpuOps[0]);

}  // namespace smla_addon
