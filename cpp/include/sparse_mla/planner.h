// Per-chunk planner of SPEC §6: the per-request layout, the compressed gather ids, each query's
// combined index row rebased into the workspace, the per-layer top-k combine, and the paged form.
//
// Everything here is SMLA_HD and works on one request or one query row, so the host loops of
// planner.cpp and a CUDA kernel (one thread per query row) share the same code.
// Index arithmetic is 64-bit; rows are int32 (workspace row numbers, -1 for padding).
#pragma once
#include <stdint.h>

#include "config.h"

namespace smla {
namespace plan {

// ---- per request --------------------------------------------------------------------------

SMLA_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
SMLA_HD int64_t round_up(int64_t x, int64_t m) { return m > 0 ? (x + m - 1) / m * m : x; }

// SWA positions a request's queries need: [seq_len - g, seq_len), g = min(seq_len, extend_len + W - 1).
// A request without queries (extend_len 0) needs none.
SMLA_HD int64_t swa_gather_len(int64_t seq_len, int64_t extend_len, int64_t window) {
  return extend_len > 0 ? min64(seq_len, extend_len + window - 1) : 0;
}

// Compressed entries the request's last query can see (floor(seq_len / r)); 0 for r = 0 and for a
// request without queries. This, not the batch maximum, sizes the request's workspace region.
SMLA_HD int64_t request_visible(int64_t seq_len, int64_t extend_len, int64_t ratio) {
  return (ratio > 0 && extend_len > 0) ? seq_len / ratio : 0;
}

// Token id of compressed entry j through a request's page table (page size pc).
SMLA_HD int64_t compressed_token_id(const int32_t* page_table, int64_t j, int64_t pc) {
  return int64_t(page_table[j / pc]) * pc + j % pc;
}

// Width of a ratio's combined rows: c0 = roundUp(W), c4 = roundUp(topk + W),
// c128 = roundUp(maxVisible + W) (alignment `align`).
SMLA_HD int64_t combined_width(int64_t ratio, int64_t topk, int64_t max_visible, int64_t window,
                               int64_t align) {
  const int64_t compressed = ratio == 0 ? 0 : (ratio == 4 ? topk : max_visible);
  return round_up(compressed + window, align);
}

// ---- per query ----------------------------------------------------------------------------

// What a query's row needs to know about its request and the workspace.
struct QueryContext {
  int64_t pos;            // token position of the query in its sequence
  int64_t comp_base;      // workspace row of the request's compressed entry 0
  int64_t swa_base;       // workspace row of the request's first gathered SWA position
  int64_t swa_start_pos;  // position held by that row (seq_len - g)
};

SMLA_HD int64_t window_len(int64_t pos, int64_t window) { return min64(pos + 1, window); }

// Compressed entries visible to a query: j < floor((pos + 1) / r).
SMLA_HD int64_t query_visible(int64_t pos, int64_t ratio) {
  return ratio > 0 ? (pos + 1) / ratio : 0;
}

// Workspace row of window entry w (0 <= w < window_len): position pos - window_len + 1 + w.
SMLA_HD int64_t window_row(const QueryContext& c, int64_t window, int64_t w) {
  return c.swa_base + (c.pos - window_len(c.pos, window) + 1 + w - c.swa_start_pos);
}

// One query's dense row (r = 0: its window; r = 128: every visible entry, then its window),
// padded with -1 to width. Returns the row's length. One thread per row in a kernel.
SMLA_HD int32_t dense_row(const QueryContext& c, int64_t ratio, int64_t window, int32_t* row,
                          int64_t width) {
  const int64_t nc = query_visible(c.pos, ratio);
  const int64_t wl = window_len(c.pos, window);
  int64_t n = 0;
  for (int64_t k = 0; k < nc; ++k) row[n++] = int32_t(c.comp_base + k);
  const int64_t first = window_row(c, window, 0);
  for (int64_t w = 0; w < wl; ++w) row[n++] = int32_t(first + w);
  const int32_t len = int32_t(n);
  for (; n < width; ++n) row[n] = -1;
  return len;
}

SMLA_HD int32_t dense_len(const QueryContext& c, int64_t ratio, int64_t window) {
  return int32_t(query_visible(c.pos, ratio) + window_len(c.pos, window));
}

// One query's c4 row: the indexer's entries (request-local compressed positions, negative =
// padding) that are visible, in the indexer's order, rebased; then the window; then -1 up to
// width. Entries j >= floor((pos + 1) / r) break causality: dropped and counted, never attended.
// Returns the row's length; *dropped gets the number of dropped entries.
SMLA_HD int32_t topk_row(const QueryContext& c, int64_t ratio, int64_t window,
                         const int32_t* topk_indices, int64_t topk, int32_t* row, int64_t width,
                         int32_t* dropped) {
  const int64_t nc = query_visible(c.pos, ratio);
  int64_t n = 0;
  int32_t bad = 0;
  for (int64_t k = 0; k < topk; ++k) {
    const int64_t j = topk_indices[k];
    if (j < 0) continue;
    if (j >= nc) {
      ++bad;
      continue;
    }
    row[n++] = int32_t(c.comp_base + j);
  }
  const int64_t wl = window_len(c.pos, window);
  const int64_t first = window_row(c, window, 0);
  for (int64_t w = 0; w < wl; ++w) row[n++] = int32_t(first + w);
  const int32_t len = int32_t(n);
  for (; n < width; ++n) row[n] = -1;
  *dropped = bad;
  return len;
}

// The paged form (§5) of one combined row: workspace rows below comp_rows are compressed entries
// (their token ids go to the extra set), the rest are SWA rows (token ids to the main set). Both
// paths then attend exactly the same entries. Either output may be null (main is chunk-invariant
// and built once). Returns false when a token id does not fit int32 or a set overflows its width.
SMLA_HD bool split_paged_row(const int32_t* row, int32_t len, int64_t comp_rows,
                             const int64_t* comp_token_ids, const int64_t* swa_token_ids,
                             int32_t* main_row, int64_t main_width, int32_t* main_len,
                             int32_t* extra_row, int64_t extra_width, int32_t* extra_len) {
  int64_t nm = 0, ne = 0;
  for (int32_t k = 0; k < len; ++k) {
    const int64_t r = row[k];
    if (r < 0) continue;
    const bool compressed = r < comp_rows;
    const int64_t id = compressed ? comp_token_ids[r] : swa_token_ids[r - comp_rows];
    if (id < 0 || id > INT32_MAX) return false;
    if (compressed) {
      if (extra_row) {
        if (ne >= extra_width) return false;
        extra_row[ne] = int32_t(id);
      }
      ++ne;
    } else {
      if (main_row) {
        if (nm >= main_width) return false;
        main_row[nm] = int32_t(id);
      }
      ++nm;
    }
  }
  if (main_row) {
    for (int64_t k = nm; k < main_width; ++k) main_row[k] = -1;
    *main_len = int32_t(nm);
  }
  if (extra_row) {
    for (int64_t k = ne; k < extra_width; ++k) extra_row[k] = -1;
    *extra_len = int32_t(ne);
  }
  return true;
}

// Request of flat query q (query_offsets: prefix sums, num_requests + 1 entries). For kernels
// that run one thread per query; host loops walk the requests instead.
SMLA_HD int32_t find_request(const int64_t* query_offsets, int32_t num_requests, int64_t q) {
  int32_t lo = 0, hi = num_requests - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (query_offsets[mid] <= q) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace plan
}  // namespace smla
