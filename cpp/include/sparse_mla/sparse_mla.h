/* The C ABI of the sparse-mla core. The WASM module exports exactly these symbols and the
 * native addon calls the same functions, so every backend reaches the core through one surface.
 *
 * Conventions
 * - Every op returns an smla_status. Inputs are assumed validated by the caller (the TS facade
 *   validates once for every backend); the core still re-checks what would make it read or write
 *   out of bounds and returns an error instead of doing so.
 * - Scalar parameters are 32-bit (no i64 crosses the WASM boundary); arrays of token ids are
 *   int64. All offset arithmetic inside is 64-bit.
 * - bf16 tensors are uint16_t bit patterns. Nullable pointers are marked "or NULL".
 */
#ifndef SPARSE_MLA_H_
#define SPARSE_MLA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__EMSCRIPTEN__)
#define SMLA_API __attribute__((used, visibility("default")))
#else
#define SMLA_API
#endif

#define SMLA_ABI_VERSION 1

typedef enum smla_status {
  SMLA_OK = 0,
  SMLA_ERR_INVALID_ARGUMENT = 1, /* a size, shape or enum value the core cannot take */
  SMLA_ERR_OUT_OF_RANGE = 2,     /* a cache token id outside the cache (cache ops only) */
  SMLA_ERR_OUT_OF_MEMORY = 3,    /* scratch allocation failed */
  SMLA_ERR_UNSUPPORTED = 4       /* valid request this build does not implement */
} smla_status;

typedef enum smla_cache_format {
  SMLA_CACHE_V4 = 0, /* paged, 584 B/token, pages padded to a multiple of 576 B; rows of 512 */
  SMLA_CACHE_V32 = 1 /* contiguous, 656 B/token; rows of 576. page_size must be 1 and
                        num_pages is then the number of tokens */
} smla_cache_format;

typedef enum smla_row_dtype { SMLA_ROWS_F32 = 0, SMLA_ROWS_BF16 = 1 } smla_row_dtype;

SMLA_API int32_t smla_abi_version(void);

/* Heap for the WASM host: the facade allocates input/output buffers through these. */
SMLA_API void* smla_malloc(size_t bytes);
SMLA_API void smla_free(void* ptr);

/* SPEC §3.3 quantizeKCache: rows [num_tokens, 512] (v4) or [num_tokens, 576] (v32), float32 or
 * bf16, written into the cache at token_ids. Any id outside [0, page_size * num_pages) returns
 * SMLA_ERR_OUT_OF_RANGE before anything is written. */
SMLA_API int32_t smla_quantize_kv_cache(int32_t format, uint8_t* cache, int32_t page_size,
                                        int32_t num_pages, const int64_t* token_ids,
                                        int32_t num_tokens, const void* rows, int32_t rows_dtype);

/* SPEC §3.3 dequantizeKCachePaged: out bf16 [num_tokens, 512] (v4) or [num_tokens, 576] (v32).
 * Any id outside the cache returns SMLA_ERR_OUT_OF_RANGE before anything is written. */
SMLA_API int32_t smla_dequantize_kv_cache(int32_t format, const uint8_t* cache, int32_t page_size,
                                          int32_t num_pages, const int64_t* token_ids,
                                          int32_t num_tokens, uint16_t* out);

/* SPEC §4 sparse prefill forward.
 * q bf16 [s_q, h_q, d_qk]; kv bf16 [s_kv, d_qk]; indices int32 [s_q, topk];
 * topk_length int32 [s_q] or NULL; attn_sink float32 [h_q] or NULL;
 * out bf16 [s_q, h_q, d_v]; max_logits, lse float32 [s_q, h_q].
 * d_qk: a multiple of 64 >= d_v; d_v: a multiple of 64 (512 in DeepSeek models). */
SMLA_API int32_t smla_sparse_prefill(const uint16_t* q, const uint16_t* kv, const int32_t* indices,
                                     const int32_t* topk_length, const float* attn_sink,
                                     int32_t s_q, int32_t h_q, int32_t d_qk, int32_t d_v,
                                     int32_t s_kv, int32_t topk, float sm_scale, uint16_t* out,
                                     float* max_logits, float* lse);

/* SPEC §5 paged FP8 sparse attention over v4 caches (d_qk = d_v = 512).
 * q bf16 [n, h_q, 512]; indices int32 [n, topk] of token ids into k_cache; optional extra set
 * (extra_k_cache NULL when absent) with its own page size; one softmax over both sets.
 * Token ids outside their cache are skipped, never read.
 * out bf16 [n, h_q, 512]; lse float32 [n, h_q]; max_logits float32 [n, h_q] or NULL. */
SMLA_API int32_t smla_paged_sparse_attention(
    const uint16_t* q, int32_t n, int32_t h_q, const uint8_t* k_cache, int32_t page_size,
    int32_t num_pages, const int32_t* indices, int32_t topk, const int32_t* topk_length,
    const uint8_t* extra_k_cache, int32_t extra_page_size, int32_t extra_num_pages,
    const int32_t* extra_indices, int32_t extra_topk, const int32_t* extra_topk_length,
    const float* attn_sink, float sm_scale, uint16_t* out, float* lse, float* max_logits);

#ifdef __cplusplus
}
#endif

#endif /* SPARSE_MLA_H_ */
