/* Host entry points of the CUDA kernels. Each takes its op's params struct of the C ABI
 * (sparse_mla.h) with device pointers in it, plus what only the launch needs, and queues its work
 * on `stream`. Return: an smla_status (>= 0), or -(cudaError_t) when a CUDA call failed.
 * Validation of shapes and cache token ids is the caller's (the TS facade checks once for every
 * backend); these re-check what they must to never read or write out of bounds. */
#ifndef SMLA_CUDA_H_
#define SMLA_CUDA_H_
#include <cuda_runtime.h>
#include <stdint.h>

#include "sparse_mla/sparse_mla.h"

#ifdef __cplusplus
extern "C" {
#endif

/* §3.3 (smla_dequantize_kv_cache's struct): out bf16 [num_tokens, 512] (v4) or [num_tokens, 576]
 * (v32). Ids outside the cache give zero rows and set *bad_id (device int32, or NULL) to 1; they
 * are never read. */
int32_t smla_cuda_dequantize_kv_cache(const smla_dequantize_kv_cache_params* p, int32_t* bad_id, cudaStream_t stream);

/* A layer's two gathers (its compressed rows and its SWA rows, say; either may be NULL) in one launch
 * when they share a format, each as smla_cuda_dequantize_kv_cache with its own bad-id flag; the
 * zero_count (at most 4) 8-byte device words at zero_words are set to 0 in stream order before any
 * work queued after this call, so later launches of the layer queue no memset of their own
 * (smla_cuda_plan_rows' total_zeroed, smla_cuda_sparse_prefill's tile_claims). */
int32_t smla_cuda_dequantize_kv_cache_pair(const smla_dequantize_kv_cache_params* a, int32_t* a_bad_id,
                                           const smla_dequantize_kv_cache_params* b, int32_t* b_bad_id,
                                           unsigned long long* const* zero_words, int32_t zero_count, cudaStream_t stream);

/* §4 (smla_sparse_prefill's struct). max_logits / lse may be NULL. tile_claims: an 8-byte device
 * word that is 0 when the launch runs (stream order) and may be left changed, for the kernel's
 * tile counter; NULL: the launch allocates and zeroes its own. */
int32_t smla_cuda_sparse_prefill(const smla_sparse_prefill_params* p, unsigned long long* tile_claims, cudaStream_t stream);

/* §5 (smla_paged_sparse_attention's struct). A launch whose last round leaves CTAs idle splits that
 * round's tiles along the KV: it takes a stream-ordered workspace (cudaMallocAsync, at most 132 KB a
 * piece, freed on the stream) and runs a combine kernel after the attention kernel; without the
 * workspace it runs unsplit. */
int32_t smla_cuda_paged_sparse_attention(const smla_paged_sparse_attention_params* p, cudaStream_t stream);

/* §6: a chunk's combined rows on the device, one thread per query, by the host planner's per-row
 * functions, in smla_plan_combine_topk's struct. topk_indices (device int32 [num_queries, topk],
 * request-local compressed positions, negative = padding) given: ratio 4 rows (topk_row;
 * dropped[q] = causality-dropped entries); NULL: ratio 0 / 128 dense rows (dense_row, as
 * smla_plan_dense_rows; dropped[q] = 0). seq_lens / extend_lens are HOST arrays (the per-request
 * layout is walked on the host); rows int32 [num_queries, width], lens and dropped int32
 * [num_queries] are device memory (dropped may be NULL), and so is dropped_total (int64 [1], or
 * NULL): set to 0 first in stream order, then the sum of the dropped counts (0 for dense rows), so
 * a layer reads back 8 bytes rather than a count per query (total_zeroed: it is 0 already in
 * stream order, no memset queued). num_queries, the rows the outputs hold, must equal Σ extend_lens. */
int32_t smla_cuda_plan_rows(const smla_plan_combine_topk_params* p, int64_t num_queries, int32_t total_zeroed, cudaStream_t stream);

/* §6: a ratio's compressed flat token ids on the device, by the host planner's per-entry function
 * (compressed_token_id), in smla_plan_compressed_token_ids's struct: request r's entries
 * j < request_visible(seq_lens[r], extend_lens[r], ratio) are
 * page_tables[page_table_offsets[r] + j / page_size] * page_size + j % page_size, written request
 * by request. seq_lens / extend_lens / page_table_offsets (num_requests + 1) are HOST arrays;
 * page_tables (int32, flattened) and token_ids (int64 [total]) are device memory. total, the ids
 * token_ids holds, must equal the sum of the visible counts. Page ids are not range-checked here
 * (the caller checks the page tables against the cache). */
int32_t smla_cuda_plan_compressed_token_ids(const smla_plan_compressed_token_ids_params* p, int64_t total,
                                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
