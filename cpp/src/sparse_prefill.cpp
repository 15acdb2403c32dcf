// SPEC §4 sparse prefill forward on the CPU: every query against its own valid rows of kv.
#include <stdlib.h>

#include "simd.h"
#include "sparse_attention_kernel.h"
#include "sparse_mla/sparse_indices.h"
#include "sparse_mla/sparse_mla.h"
#include "isa_dispatch.h"

using namespace smla;

extern "C" SMLA_API int32_t smla_sparse_prefill(const smla_sparse_prefill_params* p) {
  SMLA_ISA_DISPATCH(sparse_prefill, p);
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const uint16_t *q = p->q, *kv = p->kv;
  const int32_t *indices = p->indices, *topk_length = p->topk_length;
  const int32_t s_q = p->s_q, h_q = p->h_q, d_qk = p->d_qk, d_v = p->d_v, s_kv = p->s_kv, topk = p->topk;
  uint16_t* out = p->out;
  float *max_logits = p->max_logits, *lse = p->lse;
  if (s_q < 0 || h_q < 0 || s_kv < 0 || topk < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (d_qk <= 0 || d_qk % 64 != 0 || d_v <= 0 || d_v % 64 != 0 || d_v > d_qk)
    return SMLA_ERR_INVALID_ARGUMENT;
  if (s_q == 0 || h_q == 0) return SMLA_OK;
  if (!q || !out || !max_logits || !lse) return SMLA_ERR_INVALID_ARGUMENT;
  if (topk > 0 && !indices) return SMLA_ERR_INVALID_ARGUMENT;
  if (s_kv > 0 && !kv) return SMLA_ERR_INVALID_ARGUMENT;

  cpu::AttentionScratch sc;
  int32_t* rows = static_cast<int32_t*>(cpu::scratch_alloc(topk, sizeof(int32_t)));
  if (!rows || !sc.allocate(h_q, d_qk, d_v)) {
    free(rows);
    sc.release();
    return SMLA_ERR_OUT_OF_MEMORY;
  }

  for (int64_t i = 0; i < s_q; ++i) {
    // Compact this query's valid entries (duplicates kept, order kept).
    const int32_t limit = row_entry_limit(topk_length, i, topk);
    const int32_t* idx = indices ? indices + i * topk : nullptr;
    int64_t n_valid = 0;
    // each index read once: the caller's memory may be shared and written during the call
    for (int32_t k = 0; k < limit; ++k) {
      const int32_t id = idx[k];
      if (kv_index_valid(id, s_kv)) rows[n_valid++] = id;
    }

    auto fill = [&](int64_t start, int count, float* dst) {
      for (int r = 0; r < count; ++r) {
        const uint16_t* src = kv + int64_t(rows[start + r]) * d_qk;
        float* d = dst + int64_t(r) * d_qk;
        for (int j = 0; j < d_qk; j += simd::W) simd::store(d + j, simd::load_bf16(src + j));
      }
#if defined(SMLA_SIMD_TOUCH_AHEAD)
      // the next block's rows, touched now (see touch_lines)
      const int64_t next_end = start + 2 * int64_t(count) < n_valid ? start + 2 * int64_t(count) : n_valid;
      for (int64_t r = start + count; r < next_end; ++r)
        simd::touch_lines(kv + int64_t(rows[r]) * d_qk, int64_t(d_qk) * 2);
#endif
    };
    const int64_t o = i * h_q;
    cpu::attend_query(q + o * d_qk, h_q, d_qk, d_v, n_valid, fill, p->sm_scale, p->attn_sink, sc,
                      out + o * d_v, lse + o, max_logits + o);
  }

  free(rows);
  sc.release();
  return SMLA_OK;
}
