// SPEC §5 paged FP8 sparse attention: queries attend straight over v4 caches (main + optional
// extra set, one softmax over both); each gathered token is dequantized to the exact bf16 values
// the dequant op would produce, then attention runs as in §4.
#include <stdlib.h>

#include "kv_cache_rows.h"
#include "sparse_attention_kernel.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_mla/sparse_indices.h"
#include "sparse_mla/sparse_mla.h"
#include "isa_dispatch.h"

using namespace smla;

namespace {

struct TokenRef {
  const uint8_t* data;
  const uint8_t* scales;
};

// Appends the valid tokens of one index row of one cache to list; returns the new count.
int64_t collect_tokens(const uint8_t* cache, int32_t page_size, int32_t num_pages,
                       const int32_t* idx, int32_t limit, TokenRef* list, int64_t n) {
  for (int32_t k = 0; k < limit; ++k) {
    const int64_t id = idx[k];
    if (!token_id_valid(id, page_size, num_pages)) continue;
    list[n].data = cache + v4::data_offset(id, page_size);
    list[n].scales = cache + v4::scale_offset(id, page_size);
    ++n;
  }
  return n;
}

}  // namespace

extern "C" SMLA_API int32_t smla_paged_sparse_attention(const smla_paged_sparse_attention_params* p) {
  SMLA_ISA_DISPATCH(paged_sparse_attention, p);
  constexpr int kD = v4::kDim;
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const uint16_t* q = p->q;
  const int32_t n = p->n, h_q = p->h_q, page_size = p->page_size, num_pages = p->num_pages, topk = p->topk;
  const int32_t *indices = p->indices, *extra_indices = p->extra_indices;
  const uint8_t *k_cache = p->k_cache, *extra_k_cache = p->extra_k_cache;
  const int32_t extra_page_size = p->extra_page_size, extra_num_pages = p->extra_num_pages;
  const int32_t extra_topk = p->extra_topk;
  uint16_t* out = p->out;
  float *lse = p->lse, *max_logits = p->max_logits;
  if (n < 0 || h_q < 0 || topk < 0 || page_size <= 0 || num_pages < 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  const bool has_extra = extra_k_cache != nullptr;
  if (has_extra && (extra_page_size <= 0 || extra_num_pages < 0 || extra_topk < 0))
    return SMLA_ERR_INVALID_ARGUMENT;
  if (n == 0 || h_q == 0) return SMLA_OK;
  if (!q || !out || !lse) return SMLA_ERR_INVALID_ARGUMENT;
  if (topk > 0 && !indices) return SMLA_ERR_INVALID_ARGUMENT;
  if (num_pages > 0 && !k_cache) return SMLA_ERR_INVALID_ARGUMENT;
  if (has_extra && extra_topk > 0 && !extra_indices) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t etopk = has_extra ? extra_topk : 0;

  cpu::AttentionScratch sc;
  TokenRef* list =
      static_cast<TokenRef*>(cpu::scratch_alloc(int64_t(topk) + etopk, sizeof(TokenRef)));
  if (!list || !sc.allocate(h_q, kD, kD)) {
    free(list);
    sc.release();
    return SMLA_ERR_OUT_OF_MEMORY;
  }

  for (int64_t i = 0; i < n; ++i) {
    int64_t cnt = 0;
    if (topk > 0)
      cnt = collect_tokens(k_cache, page_size, num_pages, indices + i * topk,
                           row_entry_limit(p->topk_length, i, topk), list, cnt);
    if (etopk > 0)
      cnt = collect_tokens(extra_k_cache, extra_page_size, extra_num_pages,
                           extra_indices + i * etopk, row_entry_limit(p->extra_topk_length, i, etopk),
                           list, cnt);
    auto fill = [&](int64_t start, int count, float* dst) {
      for (int r = 0; r < count; ++r)
        cpu::dequant_v4_token_f32(list[start + r].data, list[start + r].scales,
                                  dst + int64_t(r) * kD);
#if defined(SMLA_SIMD_TOUCH_AHEAD)
      // the next block's rows, touched now (see touch_lines)
      const int64_t next_end = start + 2 * int64_t(count) < cnt ? start + 2 * int64_t(count) : cnt;
      for (int64_t r = start + count; r < next_end; ++r) {
        simd::touch_lines(list[r].data, v4::kDataBytes);
        simd::touch_lines(list[r].scales, 1);
      }
#endif
    };
    const int64_t o = i * h_q;
    cpu::attend_query(q + o * kD, h_q, kD, kD, cnt, fill, p->sm_scale, p->attn_sink, sc, out + o * kD,
                      lse + o, max_logits ? max_logits + o : nullptr);
  }

  free(list);
  sc.release();
  return SMLA_OK;
}
