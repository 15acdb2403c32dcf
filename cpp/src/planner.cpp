// SPEC §6 planner on the host: loops over requests and query rows that call the per-row
// functions of planner.h (a CUDA kernel calls the same ones). The TS facade validates first;
// these functions still refuse anything that would make them read or write out of bounds.
#include <stdint.h>

#include "sparse_mla/planner.h"
#include "sparse_mla/sparse_mla.h"

using namespace smla;

namespace {

bool ratio_ok(int32_t ratio) { return ratio == 0 || ratio == 4 || ratio == 128; }

bool lens_ok(int32_t num_requests, const int32_t* seq_lens, const int32_t* extend_lens) {
  if (num_requests < 0 || (num_requests > 0 && (!seq_lens || !extend_lens))) return false;
  for (int32_t r = 0; r < num_requests; ++r) {
    if (seq_lens[r] < 0 || extend_lens[r] < 0 || extend_lens[r] > seq_lens[r]) return false;
  }
  return true;
}

// Prefix sums of queries, SWA gather rows and compressed rows; totals as in smla_plan_layout.
// Workspace rows and query counts must fit int32 (the rows are int32).
bool layout(int32_t n, const int32_t* seq_lens, const int32_t* extend_lens, int64_t window,
            int64_t ratio, int64_t* query_off, int64_t* swa_off, int64_t* comp_off,
            int64_t* totals) {
  int64_t nq = 0, ns = 0, nc = 0, max_vis = 0;
  for (int32_t r = 0; r < n; ++r) {
    if (query_off) query_off[r] = nq;
    if (swa_off) swa_off[r] = ns;
    if (comp_off) comp_off[r] = nc;
    const int64_t s = seq_lens[r], e = extend_lens[r];
    nq += e;
    ns += plan::swa_gather_len(s, e, window);
    const int64_t v = plan::request_visible(s, e, ratio);
    nc += v;
    if (v > max_vis) max_vis = v;
  }
  if (query_off) query_off[n] = nq;
  if (swa_off) swa_off[n] = ns;
  if (comp_off) comp_off[n] = nc;
  if (totals) {
    totals[0] = nq;
    totals[1] = ns;
    totals[2] = nc;
    totals[3] = max_vis;
  }
  return nq <= INT32_MAX && ns + nc <= INT32_MAX;
}

// Walk every query of the chunk with its context; f(q, ctx, request) per query.
template <class F>
void for_each_query(int32_t n, const int32_t* seq_lens, const int32_t* extend_lens, int64_t window,
                    int64_t ratio, F f) {
  int64_t q = 0, swa = 0, comp = 0, comp_total = 0;
  for (int32_t r = 0; r < n; ++r) comp_total += plan::request_visible(seq_lens[r], extend_lens[r], ratio);
  for (int32_t r = 0; r < n; ++r) {
    const int64_t s = seq_lens[r], e = extend_lens[r];
    plan::QueryContext c;
    c.comp_base = comp;
    c.swa_base = comp_total + swa;
    c.swa_start_pos = s - plan::swa_gather_len(s, e, window);
    for (int64_t i = 0; i < e; ++i, ++q) {
      c.pos = s - e + i;
      f(q, c, r);
    }
    swa += plan::swa_gather_len(s, e, window);
    comp += plan::request_visible(s, e, ratio);
  }
}

}  // namespace

extern "C" {

SMLA_API int32_t smla_plan_layout(const smla_plan_layout_params* p) {
  if (!p || !lens_ok(p->num_requests, p->seq_lens, p->extend_lens) || p->window < 1 ||
      !ratio_ok(p->ratio))
    return SMLA_ERR_INVALID_ARGUMENT;
  if (!layout(p->num_requests, p->seq_lens, p->extend_lens, p->window, p->ratio, p->query_offsets,
              p->swa_offsets, p->comp_offsets, p->totals))
    return SMLA_ERR_INVALID_ARGUMENT;
  return SMLA_OK;
}

SMLA_API int32_t smla_plan_compressed_token_ids(const smla_plan_compressed_token_ids_params* p) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t num_requests = p->num_requests, ratio = p->ratio, page_size = p->page_size;
  const int32_t *seq_lens = p->seq_lens, *extend_lens = p->extend_lens, *page_tables = p->page_tables;
  const int64_t* page_table_offsets = p->page_table_offsets;
  int64_t* token_ids = p->token_ids;
  if (!lens_ok(num_requests, seq_lens, extend_lens) || ratio <= 0 || !ratio_ok(ratio) ||
      page_size < 1 || !page_table_offsets)
    return SMLA_ERR_INVALID_ARGUMENT;
  // Check every page table before writing anything.
  for (int32_t r = 0; r < num_requests; ++r) {
    const int64_t v = plan::request_visible(seq_lens[r], extend_lens[r], ratio);
    const int64_t have = page_table_offsets[r + 1] - page_table_offsets[r];
    if (have < 0 || have < (v + page_size - 1) / page_size) return SMLA_ERR_INVALID_ARGUMENT;
    if (v > 0 && (!page_tables || !token_ids)) return SMLA_ERR_INVALID_ARGUMENT;
  }
  int64_t out = 0;
  for (int32_t r = 0; r < num_requests; ++r) {
    const int64_t v = plan::request_visible(seq_lens[r], extend_lens[r], ratio);
    const int32_t* table = page_tables + page_table_offsets[r];
    for (int64_t j = 0; j < v; ++j) token_ids[out++] = plan::compressed_token_id(table, j, page_size);
  }
  return SMLA_OK;
}

SMLA_API int32_t smla_plan_dense_rows(const smla_plan_dense_rows_params* p) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t num_requests = p->num_requests, window = p->window, ratio = p->ratio, width = p->width;
  const int32_t *seq_lens = p->seq_lens, *extend_lens = p->extend_lens;
  int32_t *rows = p->rows, *lens = p->lens;
  if (!lens_ok(num_requests, seq_lens, extend_lens) || window < 1 || ratio == 4 ||
      !ratio_ok(ratio) || width < 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  int64_t totals[4];
  if (!layout(num_requests, seq_lens, extend_lens, window, ratio, nullptr, nullptr, nullptr, totals))
    return SMLA_ERR_INVALID_ARGUMENT;
  if (totals[0] > 0 && (!rows || !lens)) return SMLA_ERR_INVALID_ARGUMENT;
  bool fits = true;
  for_each_query(num_requests, seq_lens, extend_lens, window, ratio,
                 [&](int64_t, const plan::QueryContext& c, int32_t) {
                   if (plan::dense_len(c, ratio, window) > width) fits = false;
                 });
  if (!fits) return SMLA_ERR_INVALID_ARGUMENT;
  for_each_query(num_requests, seq_lens, extend_lens, window, ratio,
                 [&](int64_t q, const plan::QueryContext& c, int32_t) {
                   lens[q] = plan::dense_row(c, ratio, window, rows + q * int64_t(width), width);
                 });
  return SMLA_OK;
}

SMLA_API int32_t smla_plan_combine_topk(const smla_plan_combine_topk_params* p) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t num_requests = p->num_requests, window = p->window, ratio = p->ratio;
  const int32_t topk = p->topk, width = p->width;
  const int32_t *seq_lens = p->seq_lens, *extend_lens = p->extend_lens, *topk_indices = p->topk_indices;
  int32_t *rows = p->rows, *lens = p->lens, *dropped = p->dropped;
  if (!lens_ok(num_requests, seq_lens, extend_lens) || window < 1 || ratio <= 0 ||
      !ratio_ok(ratio) || topk < 0 || int64_t(width) < int64_t(topk) + window)
    return SMLA_ERR_INVALID_ARGUMENT;
  int64_t totals[4];
  if (!layout(num_requests, seq_lens, extend_lens, window, ratio, nullptr, nullptr, nullptr, totals))
    return SMLA_ERR_INVALID_ARGUMENT;
  if (totals[0] > 0 && (!rows || !lens || (topk > 0 && !topk_indices)))
    return SMLA_ERR_INVALID_ARGUMENT;
  int64_t bad_total = 0;
  for_each_query(num_requests, seq_lens, extend_lens, window, ratio,
                 [&](int64_t q, const plan::QueryContext& c, int32_t) {
                   int32_t bad = 0;
                   lens[q] = plan::topk_row(c, ratio, window, topk_indices + q * int64_t(topk), topk,
                                            rows + q * int64_t(width), width, &bad);
                   if (dropped) dropped[q] = bad;
                   bad_total += bad;
                 });
  if (p->dropped_total) *p->dropped_total = bad_total;
  return SMLA_OK;
}

SMLA_API int32_t smla_plan_paged_form(const smla_plan_paged_form_params* p) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t num_queries = p->num_queries, width = p->width, comp_rows = p->comp_rows;
  const int32_t swa_rows = p->swa_rows, main_width = p->main_width, extra_width = p->extra_width;
  const int32_t *rows = p->rows, *lens = p->lens;
  const int64_t *comp_token_ids = p->comp_token_ids, *swa_token_ids = p->swa_token_ids;
  int32_t *main_rows = p->main_rows, *main_lens = p->main_lens;
  int32_t *extra_rows = p->extra_rows, *extra_lens = p->extra_lens;
  if (num_queries < 0 || width < 0 || comp_rows < 0 || swa_rows < 0 || main_width < 0 ||
      extra_width < 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  if (num_queries == 0) return SMLA_OK;
  if (!rows || !lens || (comp_rows > 0 && !comp_token_ids) || (swa_rows > 0 && !swa_token_ids) ||
      (main_rows && !main_lens) || (extra_rows && !extra_lens))
    return SMLA_ERR_INVALID_ARGUMENT;
  // Every row entry must name a workspace row, so the split never reads outside the id arrays.
  for (int64_t q = 0; q < num_queries; ++q) {
    if (lens[q] < 0 || lens[q] > width) return SMLA_ERR_INVALID_ARGUMENT;
    const int32_t* row = rows + q * int64_t(width);
    for (int32_t k = 0; k < lens[q]; ++k)
      if (int64_t(row[k]) >= int64_t(comp_rows) + swa_rows) return SMLA_ERR_INVALID_ARGUMENT;
  }
  for (int64_t q = 0; q < num_queries; ++q) {
    if (!plan::split_paged_row(rows + q * int64_t(width), lens[q], comp_rows, comp_token_ids,
                               swa_token_ids, main_rows ? main_rows + q * int64_t(main_width) : nullptr,
                               main_width, main_lens ? main_lens + q : nullptr,
                               extra_rows ? extra_rows + q * int64_t(extra_width) : nullptr,
                               extra_width, extra_lens ? extra_lens + q : nullptr))
      return SMLA_ERR_OUT_OF_RANGE;
  }
  return SMLA_OK;
}

}  // extern "C"
