// The `cpu` backend's ops: the C core (cpp/src, built for this machine) called on row ranges from
// worker threads. Each op is (threads, params): its binding file reads the params object into the
// op's smla_*_params struct (exact lengths derived from the scalars, so a mismatched call is
// refused instead of reading out of bounds); the op then queues a RowJob on the addon's own threads
// (QueueCpuJob) that calls the core on copies of that struct narrowed to row ranges, a block of
// rows at a time. Inputs are owned by the call or shared (addon.h, Args); a cache written in place
// is written only at the end, on the JS thread (quantize's commit), and not by a call whose worker
// thread is being torn down. An optional third argument names the calling engine (its group).
#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "addon.h"
#include "kv_cache.h"
#include "paged_sparse_attention.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_mla.h"
#include "sparse_prefill.h"

namespace smla_addon {
namespace {

constexpr int kMaxThreads = 1024;

// A compact cache of m tokens with ids 0..m-1: v4 pages without padding, v32 contiguous. It holds
// just the tokens a call reads or writes.
struct Geometry {
  int64_t page_size, num_pages;
  uint64_t bytes;
};
Geometry CompactGeometry(int32_t format, int64_t m) {
  if (format == SMLA_CACHE_V32) return {1, m, CacheBytes(format, 1, m)};
  constexpr int64_t ps = smla::v4::kCompactPageSize;
  const int64_t pages = (m + ps - 1) / ps;
  return {ps, pages, CacheBytes(format, ps, pages)};
}

// Copies token `from` of cache `src` (page size src_ps) to token `to` of `dst` (page size dst_ps):
// v32 its record, v4 its data bytes and its scale bytes (SPEC §3.1).
void CopyToken(int32_t format, const uint8_t* src, int64_t src_ps, int64_t from, uint8_t* dst, int64_t dst_ps, int64_t to) {
  using namespace smla;
  if (format == SMLA_CACHE_V32) {
    std::memcpy(dst + v32::token_offset(to), src + v32::token_offset(from), v32::kTokenBytes);
    return;
  }
  std::memcpy(dst + v4::data_offset(to, dst_ps), src + v4::data_offset(from, src_ps), v4::kDataBytes);
  std::memcpy(dst + v4::scale_offset(to, dst_ps), src + v4::scale_offset(from, src_ps), v4::kScaleBytes);
}

// Cache token ids are int32 on the JS side and int64 in the C ABI.
int32_t CheckIds(const int32_t* ids, int64_t n, int64_t num_tokens) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= num_tokens) return SMLA_ERR_OUT_OF_RANGE;
  return SMLA_OK;
}

// Rows per block (between two checks whether the call's JS thread is being torn down, addon.h):
// about a millisecond of one core's work, at least one row.
int64_t BlockRows(double work_per_row) {
  constexpr double kBlockWork = 4e6;  // flop-equivalents
  return work_per_row >= kBlockWork ? 1 : int64_t(kBlockWork / std::max(1.0, work_per_row));
}

// Queues a job on the addon's cpu threads; argument 2 (optional) is the calling engine's group.
Napi::Value Queue(Args& a, RowJob job) {
  const int32_t group = a.OptionalInt(2, "group", 0, INT32_MAX, 0);
  return QueueCpuJob(a.Env(), a.Op(), std::move(job), a.TakeHolds(), group);
}

// Queues an op over `rows` rows on the call's threads (argument 0), `work_per_row` each; run(b, e)
// calls the core on rows [b, e) and must touch only their outputs.
Napi::Value QueueRows(Args& a, int64_t rows, double work_per_row, std::function<int32_t(int64_t, int64_t)> run) {
  RowJob job;
  job.rows = rows;
  job.threads = a.Int(0, "threads", 1, kMaxThreads);
  job.block = BlockRows(work_per_row);
  job.run = std::move(run);
  return Queue(a, std::move(job));
}

// A call over fewer query rows than it has threads is split by heads as well: each unit is one row's
// run of consecutive heads (contiguous in q, out, lse and max_logits), at least kMinGroupHeads of
// them and a multiple of it, so that every unit takes the core's path the whole row would and the
// results are one thread's bits: the core's bf16 dots start at 8 heads, and a query with a bf16
// subnormal anywhere takes the fp32 dots for all its heads (cpp/src/sparse_attention_kernel.h), so
// such a call is not split (a group without the subnormal would take the bf16 dots). `groups` units
// a row; the last group takes the heads left over.
struct HeadGroups {
  int64_t groups = 1, size = 0;
  int64_t first(int64_t g) const { return g * size; }
  int64_t count(int64_t g, int64_t h_q) const { return g + 1 == groups ? h_q - g * size : size; }
};
constexpr int64_t kMinGroupHeads = 8;
bool HasBf16Subnormal(const uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if ((x[i] & 0x7f80) == 0 && (x[i] & 0x007f) != 0) return true;
  return false;
}
HeadGroups GroupHeads(int64_t rows, int64_t h_q, int64_t d_qk, const uint16_t* q, int threads) {
  if (rows <= 0 || rows >= threads || h_q < 2 * kMinGroupHeads || HasBf16Subnormal(q, rows * h_q * d_qk)) return {1, h_q};
  const int64_t wanted = std::min<int64_t>((threads + rows - 1) / rows, h_q / kMinGroupHeads);
  const int64_t size = h_q / wanted / kMinGroupHeads * kMinGroupHeads;  // at least kMinGroupHeads
  return {h_q / size, size};
}

// Calls run(row, rows, h0, heads) for the units [b, e) of a call split as `hg` says: one run of whole
// rows when the call is not split by heads, else each unit's one row and head group in turn (q, out,
// lse and max_logits of rows [row, row + rows), heads [h0, h0 + heads) are contiguous in both cases).
template <class Run>
int32_t ForUnits(const HeadGroups& hg, int64_t h_q, int64_t b, int64_t e, Run run) {
  if (hg.groups == 1) return run(b, e - b, int64_t(0), h_q);
  for (int64_t u = b; u < e; ++u) {
    const int64_t g = u % hg.groups;
    if (const int32_t s = run(u / hg.groups, int64_t(1), hg.first(g), hg.count(g, h_q)); s != SMLA_OK) return s;
  }
  return SMLA_OK;
}

// sparsePrefill(threads, params): split by query rows (and by heads when rows are fewer than threads).
Napi::Value SparsePrefill(const Napi::CallbackInfo& info) {
  Args a(info, "sparsePrefill");
  Args::Fields f = a.Object(1, "params");
  smla_sparse_prefill_params p{};
  ReadSparsePrefill(f, p);
  const HeadGroups hg = GroupHeads(p.s_q, p.h_q, p.d_qk, p.q, a.Int(0, "threads", 1, kMaxThreads));
  const double work = (2.0 * p.h_q * p.topk * (p.d_qk + p.d_v) + double(p.h_q) * p.d_v) / double(hg.groups);
  return QueueRows(a, int64_t(p.s_q) * hg.groups, work, [p, hg](int64_t b, int64_t e) {
    return ForUnits(hg, p.h_q, b, e, [&p](int64_t row, int64_t rows, int64_t h0, int64_t heads) {
      const int64_t first = row * p.h_q + h0;  // the unit's first (row, head)
      smla_sparse_prefill_params r = p;
      r.s_q = int32_t(rows);
      r.h_q = int32_t(heads);
      r.q = p.q + first * p.d_qk;
      r.indices = p.indices ? p.indices + row * p.topk : nullptr;
      r.topk_length = p.topk_length ? p.topk_length + row : nullptr;
      r.attn_sink = p.attn_sink ? p.attn_sink + h0 : nullptr;
      r.out = p.out + first * p.d_v;
      r.max_logits = p.max_logits + first;
      r.lse = p.lse + first;
      return smla_sparse_prefill(&r);
    });
  });
}

// pagedSparseAttention(threads, params): split by query rows (and by heads when rows are fewer than
// threads).
Napi::Value PagedSparseAttention(const Napi::CallbackInfo& info) {
  Args a(info, "pagedSparseAttention");
  Args::Fields f = a.Object(1, "params");
  smla_paged_sparse_attention_params p{};
  ReadPagedSparseAttention(f, p);
  const HeadGroups hg = GroupHeads(p.n, p.h_q, smla::v4::kDim, p.q, a.Int(0, "threads", 1, kMaxThreads));
  const double entries = double(p.topk) + p.extra_topk;
  const double work = (2.0 * p.h_q * entries * 1024 + entries * 1024 + double(p.h_q) * 512) / double(hg.groups);
  return QueueRows(a, int64_t(p.n) * hg.groups, work, [p, hg](int64_t b, int64_t e) {
    return ForUnits(hg, p.h_q, b, e, [&p](int64_t row, int64_t rows, int64_t h0, int64_t heads) {
      const int64_t first = row * p.h_q + h0, d = smla::v4::kDim;
      smla_paged_sparse_attention_params r = p;
      r.n = int32_t(rows);
      r.h_q = int32_t(heads);
      r.q = p.q + first * d;
      r.indices = p.indices ? p.indices + row * p.topk : nullptr;
      r.topk_length = p.topk_length ? p.topk_length + row : nullptr;
      r.extra_indices = p.extra_indices ? p.extra_indices + row * p.extra_topk : nullptr;
      r.extra_topk_length = p.extra_topk_length ? p.extra_topk_length + row : nullptr;
      r.attn_sink = p.attn_sink ? p.attn_sink + h0 : nullptr;
      r.out = p.out + first * d;
      r.lse = p.lse + first;
      r.max_logits = p.max_logits ? p.max_logits + first : nullptr;
      return smla_paged_sparse_attention(&r);
    });
  });
}

// dequantizeKvCache(threads, params)
Napi::Value DequantizeKvCache(const Napi::CallbackInfo& info) {
  Args a(info, "dequantizeKvCache");
  const int threads = a.Int(0, "threads", 1, kMaxThreads);
  Args::Fields f = a.Object(1, "params");
  const int32_t* ids = nullptr;
  bool shared = false;
  smla_dequantize_kv_cache_params p{};
  ReadDequantizeKvCache(f, p, &ids, &shared);
  const int64_t n = p.num_tokens, dim = RowDim(p.format);

  // A shared cache is read in place; of any other, only the tokens asked for are copied here (n
  // tokens, not the whole cache) into a compact cache the call owns, read as ids 0..n-1.
  const int32_t ids_ok = CheckIds(ids, n, int64_t(p.page_size) * p.num_pages);
  smla_dequantize_kv_cache_params whole = p;
  if (!shared && ids_ok == SMLA_OK && n > 0) {
    const Geometry g = CompactGeometry(p.format, n);
    uint8_t* compact = a.Own(g.bytes);
    for (int64_t i = 0; i < n; ++i) CopyToken(p.format, p.cache, p.page_size, ids[i], compact, g.page_size, i);
    whole.cache = compact;
    whole.page_size = int32_t(g.page_size);
    whole.num_pages = int32_t(g.num_pages);
  }
  const bool compact = whole.cache != p.cache;
  // The core's int64 ids for every row, widened here: the rows' threads allocate nothing.
  int64_t* wide = n > 0 ? reinterpret_cast<int64_t*>(a.Own(uint64_t(n) * sizeof(int64_t))) : nullptr;
  for (int64_t i = 0; i < n; ++i) wide[i] = compact ? i : ids[i];

  RowJob job;
  job.rows = n;
  job.threads = threads;
  job.block = BlockRows(double(dim) * 8);
  job.prepare = [=](int64_t&) { return ids_ok; };
  job.run = [=](int64_t b, int64_t e) {
    smla_dequantize_kv_cache_params r = whole;
    r.token_ids = wide + b;
    r.num_tokens = int32_t(e - b);
    r.out = p.out + b * dim;
    return smla_dequantize_kv_cache(&r);
  };
  return Queue(a, std::move(job));
}

// quantizeKvCache(threads, params): rowsDtype 0 = float32 rows (Float32Array), 1 = bf16 rows
// (Uint16Array). Atomic: the tokens are quantized into a compact scratch cache the call owns, and
// written into `cache` only by the commit on the JS thread, once every row succeeded and only if
// the cache's memory is still the one that was passed (not detached or resized meanwhile) and the
// call's promise could be resolved; otherwise the cache is untouched (the call rejects, or, on a
// worker thread being torn down, is never settled).
Napi::Value QuantizeKvCache(const Napi::CallbackInfo& info) {
  Args a(info, "quantizeKvCache");
  const int threads = a.Int(0, "threads", 1, kMaxThreads);
  Args::Fields f = a.Object(1, "params");
  const int32_t* ids = nullptr;
  smla_quantize_kv_cache_params p{};
  ReadQuantizeKvCache(f, p, &ids);  // the cache: checked and pinned, written by the commit only
  auto cache_ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(f.Get("cache").As<Napi::Object>()));
  const int32_t format = p.format, dtype = p.rows_dtype;
  const int64_t n = p.num_tokens, dim = RowDim(format), ps = p.page_size, np = p.num_pages;
  const uint64_t cache_bytes = CacheBytes(format, ps, np);
  const size_t elem = dtype == SMLA_ROWS_F32 ? 4 : 2;
  const uint8_t* rows = static_cast<const uint8_t*>(p.rows);

  // Duplicate ids: the last row wins (as in a sequential loop), so only last occurrences are
  // quantized; kept token k goes to compact slot k. Every array is made here, for all n rows (the
  // kept ones are at most n): prepare only fills them, and the rows' threads allocate nothing.
  struct Kept {
    std::unique_ptr<int64_t[]> order;    // rows sorted by (id, row)
    std::unique_ptr<int64_t[]> ids;      // cache ids of the tokens to write
    std::unique_ptr<int64_t[]> rows;     // their row numbers in `rows`
    std::unique_ptr<int64_t[]> compact;  // 0..n-1, the compact ids
    int64_t count = 0;
    Geometry geometry{1, 0, 0};
    std::unique_ptr<uint8_t[]> scratch;  // the compact cache (each kept token's bytes written before they are read)
    uint8_t* target = nullptr;           // the cache's memory, as check found it just before commit
  };
  auto kept = std::make_shared<Kept>();
  const size_t slots = size_t(std::max<int64_t>(n, 1));
  kept->order.reset(new int64_t[slots]);
  kept->ids.reset(new int64_t[slots]);
  kept->rows.reset(new int64_t[slots]);
  kept->compact.reset(new int64_t[slots]);
  for (int64_t k = 0; k < n; ++k) kept->compact[size_t(k)] = k;
  kept->geometry = CompactGeometry(format, n);
  if (kept->geometry.bytes > SIZE_MAX) throw std::bad_alloc();
  kept->scratch.reset(new uint8_t[size_t(std::max<uint64_t>(kept->geometry.bytes, 1))]);
  RowJob job;
  job.rows = n;
  job.threads = threads;
  job.block = BlockRows(double(dim) * 32);
  job.prepare = [=](int64_t& count) {
    int32_t s = CheckIds(ids, n, ps * np);
    if (s != SMLA_OK) return s;  // nothing written
    int64_t* order = kept->order.get();
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    // (id, row) pairs are distinct: an unstable sort gives the stable order without a buffer
    std::sort(order, order + n, [&](int64_t x, int64_t y) { return ids[x] < ids[y] || (ids[x] == ids[y] && x < y); });
    int64_t m = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (k + 1 < n && ids[order[k + 1]] == ids[order[k]]) continue;  // a later row has this id
      kept->ids[size_t(m)] = ids[order[k]];
      kept->rows[size_t(m)] = order[k];
      m++;
    }
    kept->count = count = m;
    return int32_t(SMLA_OK);
  };
  job.run = [=](int64_t b, int64_t e) {
    // Tokens are quantized one call per run of consecutive source rows (usually the whole range).
    const Geometry& g = kept->geometry;
    int64_t i = b;
    while (i < e) {
      int64_t j = i + 1;
      while (j < e && kept->rows[size_t(j)] == kept->rows[size_t(j - 1)] + 1) ++j;
      smla_quantize_kv_cache_params r = p;
      r.cache = kept->scratch.get();
      r.page_size = int32_t(g.page_size);
      r.num_pages = int32_t(g.num_pages);
      r.token_ids = kept->compact.get() + i;
      r.num_tokens = int32_t(j - i);
      r.rows = rows + size_t(kept->rows[size_t(i)]) * size_t(dim) * elem;
      int32_t s = smla_quantize_kv_cache(&r);
      if (s != SMLA_OK) return s;
      i = j;
    }
    return int32_t(SMLA_OK);
  };
  job.check = [=](Napi::Env env) -> std::string {
    void* data = nullptr;
    size_t length = 0;
    napi_typedarray_type type;
    if (napi_get_typedarray_info(env, cache_ref->Value(), &type, &length, &data, nullptr, nullptr) != napi_ok ||
        uint64_t(length) != cache_bytes || (cache_bytes > 0 && data == nullptr))
      return "the cache's memory was detached, transferred or resized while the call ran; nothing was written";
    kept->target = static_cast<uint8_t*>(data);
    return std::string();
  };
  job.commit = [=]() {
    for (int64_t k = 0; k < kept->count; ++k)
      CopyToken(format, kept->scratch.get(), kept->geometry.page_size, k, kept->target, ps, kept->ids[size_t(k)]);
  };
  return Queue(a, std::move(job));
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
