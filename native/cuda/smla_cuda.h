/* Host entry points of the CUDA kernels (device pointers; work queued on `stream`).
 * Return: an smla_status (>= 0), or -(cudaError_t) when a CUDA call failed. Validation of
 * shapes and cache token ids is the caller's (the TS facade checks once for every backend);
 * these re-check what they must to never read or write out of bounds. */
#ifndef SMLA_CUDA_H_
#define SMLA_CUDA_H_
#include <cuda_runtime.h>
#include <stdint.h>

#include "sparse_mla/sparse_mla.h"

#ifdef __cplusplus
extern "C" {
#endif

/* §3.3: out bf16 [num_tokens, 512] (v4) or [num_tokens, 576] (v32). Ids outside the cache give
 * zero rows and set *bad_id (device int32, or NULL) to 1; they are never read. */
int32_t smla_cuda_dequantize_kv_cache(int32_t format, const uint8_t* cache, int32_t page_size,
                                      int32_t num_pages, const int64_t* token_ids,
                                      int64_t num_tokens, uint16_t* out, int32_t* bad_id,
                                      cudaStream_t stream);

/* §4 (same arguments as smla_sparse_prefill). max_logits / lse may be NULL. */
int32_t smla_cuda_sparse_prefill(const uint16_t* q, const uint16_t* kv, const int32_t* indices,
                                 const int32_t* topk_length, const float* attn_sink, int32_t s_q,
                                 int32_t h_q, int32_t d_qk, int32_t d_v, int32_t s_kv, int32_t topk,
                                 float sm_scale, uint16_t* out, float* max_logits, float* lse,
                                 cudaStream_t stream);

/* §5 (same arguments as smla_paged_sparse_attention). */
int32_t smla_cuda_paged_sparse_attention(
    const uint16_t* q, int32_t n, int32_t h_q, const uint8_t* k_cache, int32_t page_size,
    int32_t num_pages, const int32_t* indices, int32_t topk, const int32_t* topk_length,
    const uint8_t* extra_k_cache, int32_t extra_page_size, int32_t extra_num_pages,
    const int32_t* extra_indices, int32_t extra_topk, const int32_t* extra_topk_length,
    const float* attn_sink, float sm_scale, uint16_t* out, float* lse, float* max_logits,
    cudaStream_t stream);

/* §6: a chunk's combined rows on the device, one thread per query, by the host planner's per-row
 * functions. topk_indices (device int32 [num_queries, topk], request-local compressed positions,
 * negative = padding) given: ratio 4 rows (topk_row; dropped[q] = causality-dropped entries);
 * NULL: ratio 0 / 128 dense rows (dense_row; dropped[q] = 0). seq_lens / extend_lens are HOST
 * arrays (the per-request layout is walked on the host); rows int32 [num_queries, width], lens and
 * dropped int32 [num_queries] are device memory (dropped may be NULL). num_queries must equal
 * Σ extend_lens. */
int32_t smla_cuda_plan_rows(int32_t num_requests, const int32_t* seq_lens, const int32_t* extend_lens,
                            int32_t window, int32_t ratio, const int32_t* topk_indices, int32_t topk,
                            int32_t width, int64_t num_queries, int32_t* rows, int32_t* lens,
                            int32_t* dropped, cudaStream_t stream);

/* §6: a ratio's compressed flat token ids on the device, by the host planner's per-entry function
 * (compressed_token_id): request r's entries j < request_visible(seq_lens[r], extend_lens[r], ratio)
 * are page_tables[page_table_offsets[r] + j / page_size] * page_size + j % page_size, written
 * request by request. seq_lens / extend_lens / page_table_offsets (num_requests + 1) are HOST
 * arrays; page_tables (int32, flattened) and token_ids (int64 [total]) are device memory. total
 * must equal the sum of the visible counts. Page ids are not range-checked here (the caller checks
 * the page tables against the cache). */
int32_t smla_cuda_plan_compressed_token_ids(int32_t num_requests, const int32_t* seq_lens, const int32_t* extend_lens,
                                            int32_t ratio, const int32_t* page_tables, const int64_t* page_table_offsets,
                                            int32_t page_size, int64_t total, int64_t* token_ids, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
