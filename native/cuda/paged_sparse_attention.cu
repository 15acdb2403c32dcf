// Launcher for paged FP8 sparse attention (§5) over v4 caches.
#include "launch_cache.cuh"
#include "paged_sparse_attention.cuh"
#include "smla_cuda.h"

using namespace smla::cuda;

extern "C" int32_t smla_cuda_paged_sparse_attention(const smla_paged_sparse_attention_params* p, cudaStream_t stream) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const uint16_t* q = p->q;
  const int32_t n = p->n, h_q = p->h_q, page_size = p->page_size, num_pages = p->num_pages, topk = p->topk;
  const uint8_t *k_cache = p->k_cache, *extra_k_cache = p->extra_k_cache;
  const int32_t *indices = p->indices, *topk_length = p->topk_length;
  const int32_t extra_page_size = p->extra_page_size, extra_num_pages = p->extra_num_pages, extra_topk = p->extra_topk;
  const int32_t *extra_indices = p->extra_indices, *extra_topk_length = p->extra_topk_length;
  const float* attn_sink = p->attn_sink;
  const float sm_scale = p->sm_scale;
  uint16_t* out = p->out;
  float *lse = p->lse, *max_logits = p->max_logits;
  if (n < 0 || h_q < 1 || topk < 0 || page_size < 1 || num_pages < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (extra_k_cache && (extra_topk < 0 || extra_page_size < 1 || extra_num_pages < 0))
    return SMLA_ERR_INVALID_ARGUMENT;
  if (n == 0) return SMLA_OK;
  // 16-byte pieces throughout: q, out and the caches must be 16-byte aligned (cudaMalloc'd).
  if (((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(k_cache) |
        reinterpret_cast<uintptr_t>(extra_k_cache)) & 15) != 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  // the kernel counts tiles (query, 64-head group) in 32 bits; more would not fit in memory anyway
  if (attention_tiles(n, h_q) > INT32_MAX) return SMLA_ERR_UNSUPPORTED;
  if (int64_t(topk) + (extra_k_cache ? int64_t(extra_topk) : 0) > INT32_MAX) return SMLA_ERR_UNSUPPORTED;
  PagedFp8Rows src;
  src.cache = V4Cache::make(k_cache, page_size, num_pages);
  src.indices = indices;
  src.topk = topk;
  src.topk_length = topk_length;
  src.extra = extra_k_cache ? V4Cache::make(extra_k_cache, extra_page_size, extra_num_pages) : V4Cache::make(nullptr, 1, 0);
  src.extra_indices = extra_indices;
  src.extra_topk = extra_k_cache ? extra_topk : 0;
  src.extra_topk_length = extra_topk_length;
  const AttnOutputs o{q, n, h_q, sm_scale, attn_sink, out, max_logits, lse};
  const cudaError_t err = launch_paged_attention<512>(o, src, stream);
  return err == cudaSuccess ? SMLA_OK : -int32_t(err);
}
