/* The C ABI of the sparse-mla core. The WASM module exports exactly these symbols and the
 * native addon calls the same functions, so every backend reaches the core through one surface.
 *
 * Conventions
 * - Every op returns an smla_status. Inputs are assumed validated by the caller (the TS facade
 *   validates once for every backend); the core still re-checks what would make it read or write
 *   out of bounds and returns an error instead of doing so.
 * - An op takes one params struct (its arguments, named). Scalars are 32-bit (no i64 crosses the
 *   WASM boundary); arrays of token ids are int64. All offset arithmetic inside is 64-bit.
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

#define SMLA_ABI_VERSION 2

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

/* Every op takes one params struct, filled by its caller; its fields are the op's arguments.
 * The TS facade describes the same structs field by field, in this order (src/backends/abi.ts;
 * test/abi.test.ts holds the two together). Every field is a pointer, an int32_t or a float, so
 * in wasm32 each takes 4 bytes and a struct is packed without padding. */

/* SPEC §3.3 quantizeKCache: rows [num_tokens, 512] (v4) or [num_tokens, 576] (v32), float32 or
 * bf16, written into the cache at token_ids. Any id outside [0, page_size * num_pages) returns
 * SMLA_ERR_OUT_OF_RANGE before anything is written. */
typedef struct smla_quantize_kv_cache_params {
  int32_t format; /* smla_cache_format */
  uint8_t* cache;
  int32_t page_size;
  int32_t num_pages;
  const int64_t* token_ids; /* [num_tokens] */
  int32_t num_tokens;
  const void* rows;   /* [num_tokens, 512 | 576] */
  int32_t rows_dtype; /* smla_row_dtype */
} smla_quantize_kv_cache_params;
SMLA_API int32_t smla_quantize_kv_cache(const smla_quantize_kv_cache_params* p);

/* SPEC §3.3 dequantizeKCachePaged: out bf16 [num_tokens, 512] (v4) or [num_tokens, 576] (v32).
 * Any id outside the cache returns SMLA_ERR_OUT_OF_RANGE before anything is written. */
typedef struct smla_dequantize_kv_cache_params {
  int32_t format; /* smla_cache_format */
  const uint8_t* cache;
  int32_t page_size;
  int32_t num_pages;
  const int64_t* token_ids; /* [num_tokens] */
  int32_t num_tokens;
  uint16_t* out;
} smla_dequantize_kv_cache_params;
SMLA_API int32_t smla_dequantize_kv_cache(const smla_dequantize_kv_cache_params* p);

/* SPEC §4 sparse prefill forward. d_qk: a multiple of 64 >= d_v; d_v: a multiple of 64 (512 in
 * DeepSeek models). */
typedef struct smla_sparse_prefill_params {
  const uint16_t* q;           /* bf16 [s_q, h_q, d_qk] */
  const uint16_t* kv;          /* bf16 [s_kv, d_qk] */
  const int32_t* indices;      /* [s_q, topk] */
  const int32_t* topk_length;  /* [s_q] or NULL */
  const float* attn_sink;      /* [h_q] or NULL */
  int32_t s_q;
  int32_t h_q;
  int32_t d_qk;
  int32_t d_v;
  int32_t s_kv;
  int32_t topk;
  float sm_scale;
  uint16_t* out;      /* bf16 [s_q, h_q, d_v] */
  float* max_logits;  /* [s_q, h_q] */
  float* lse;         /* [s_q, h_q] */
} smla_sparse_prefill_params;
SMLA_API int32_t smla_sparse_prefill(const smla_sparse_prefill_params* p);

/* SPEC §5 paged FP8 sparse attention over v4 caches (d_qk = d_v = 512): token ids into k_cache,
 * and an optional extra set (extra_k_cache NULL when absent) with its own page size; one softmax
 * over both sets. Token ids outside their cache are skipped, never read. */
typedef struct smla_paged_sparse_attention_params {
  const uint16_t* q; /* bf16 [n, h_q, 512] */
  int32_t n;
  int32_t h_q;
  const uint8_t* k_cache;
  int32_t page_size;
  int32_t num_pages;
  const int32_t* indices; /* [n, topk] */
  int32_t topk;
  const int32_t* topk_length; /* [n] or NULL */
  const uint8_t* extra_k_cache; /* or NULL */
  int32_t extra_page_size;
  int32_t extra_num_pages;
  const int32_t* extra_indices; /* [n, extra_topk] */
  int32_t extra_topk;
  const int32_t* extra_topk_length; /* [n] or NULL */
  const float* attn_sink;           /* [h_q] or NULL */
  float sm_scale;
  uint16_t* out;     /* bf16 [n, h_q, 512] */
  float* lse;        /* [n, h_q] */
  float* max_logits; /* [n, h_q] or NULL */
} smla_paged_sparse_attention_params;
SMLA_API int32_t smla_paged_sparse_attention(const smla_paged_sparse_attention_params* p);

/* ===== planner (SPEC §6) ======================================================================
 * The per-chunk scaffolding of the workspace path. A chunk is num_requests requests, each with
 * seq_lens[r] (tokens after the chunk) and extend_lens[r] (its queries, flattened request by
 * request; query i of r sits at pos = seq_len - extend_len + i). window = W (128), ratio = the
 * compress ratio (0, 4 or 128). Workspace rows: the compressed entries of every request first
 * (request r: floor(seq_len / ratio) rows; none when extend_len is 0), then the SWA gather of
 * every request (positions [seq_len - g, seq_len), g = min(seq_len, extend_len + W - 1); 0 when
 * extend_len is 0). Rows are int32 workspace row numbers padded with -1; all counts are int64. */

/* Prefix sums, each int64 [num_requests + 1] (any may be NULL): query_offsets, swa_offsets (SWA
 * gather rows), comp_offsets (compressed rows). totals int64 [4] or NULL: number of queries, SWA
 * rows, compressed rows, the largest floor(seq_len / ratio) of any request with queries.
 * SMLA_ERR_INVALID_ARGUMENT for extend_len > seq_len, negatives, a bad ratio, or a query count /
 * workspace row count above INT32_MAX. */
typedef struct smla_plan_layout_params {
  int32_t num_requests;
  const int32_t* seq_lens;
  const int32_t* extend_lens;
  int32_t window;
  int32_t ratio;
  int64_t* query_offsets;
  int64_t* swa_offsets;
  int64_t* comp_offsets;
  int64_t* totals;
} smla_plan_layout_params;
SMLA_API int32_t smla_plan_layout(const smla_plan_layout_params* p);

/* Compressed gather ids of a ratio (4 or 128): for each request, for every visible entry
 * j < floor(seq_len / ratio): page_table[j / page_size] * page_size + j % page_size, request by
 * request, into token_ids int64 [compressed rows]. Request r's page table is
 * page_tables[page_table_offsets[r] .. page_table_offsets[r + 1]) (int64 offsets). A page table
 * too short for its request returns SMLA_ERR_INVALID_ARGUMENT before anything is written. */
typedef struct smla_plan_compressed_token_ids_params {
  int32_t num_requests;
  const int32_t* seq_lens;
  const int32_t* extend_lens;
  int32_t ratio;
  const int32_t* page_tables;
  const int64_t* page_table_offsets; /* [num_requests + 1] */
  int32_t page_size;
  int64_t* token_ids;
} smla_plan_compressed_token_ids_params;
SMLA_API int32_t smla_plan_compressed_token_ids(const smla_plan_compressed_token_ids_params* p);

/* Combined rows of ratio 0 (window only) or 128 (every visible entry, then the window):
 * rows int32 [num_queries, width], lens int32 [num_queries]. width must hold the longest row. */
typedef struct smla_plan_dense_rows_params {
  int32_t num_requests;
  const int32_t* seq_lens;
  const int32_t* extend_lens;
  int32_t window;
  int32_t ratio;
  int32_t width;
  int32_t* rows;
  int32_t* lens;
} smla_plan_dense_rows_params;
SMLA_API int32_t smla_plan_dense_rows(const smla_plan_dense_rows_params* p);

/* Combined rows of a top-k layer (ratio 4): topk_indices int32 [num_queries, topk] holds
 * request-local compressed positions, negative = padding. A row is the visible entries in the
 * indexer's order (rebased), then the window, then -1 to width (>= topk + window). Entries
 * j >= floor((pos + 1) / ratio) are dropped and counted: dropped int32 [num_queries] or NULL,
 * dropped_total int64 [1] or NULL. */
typedef struct smla_plan_combine_topk_params {
  int32_t num_requests;
  const int32_t* seq_lens;
  const int32_t* extend_lens;
  int32_t window;
  int32_t ratio;
  const int32_t* topk_indices;
  int32_t topk;
  int32_t width;
  int32_t* rows;
  int32_t* lens;
  int32_t* dropped;
  int64_t* dropped_total;
} smla_plan_combine_topk_params;
SMLA_API int32_t smla_plan_combine_topk(const smla_plan_combine_topk_params* p);

/* The paged form (SPEC §5) of combined rows, so both paths attend the same entries: workspace
 * rows below comp_rows map through comp_token_ids to the extra set, the rest through
 * swa_token_ids (row - comp_rows) to the main set; each set in row order, padded with -1.
 * main_rows [num_queries, main_width] + main_lens, extra_rows [num_queries, extra_width] +
 * extra_lens; either set may be NULL. A row entry outside the workspace is
 * SMLA_ERR_INVALID_ARGUMENT (nothing written); a token id above INT32_MAX or a set wider than its
 * width is SMLA_ERR_OUT_OF_RANGE. */
typedef struct smla_plan_paged_form_params {
  int32_t num_queries;
  const int32_t* rows;
  const int32_t* lens;
  int32_t width;
  int32_t comp_rows;
  int32_t swa_rows;
  const int64_t* comp_token_ids;
  const int64_t* swa_token_ids;
  int32_t* main_rows;
  int32_t main_width;
  int32_t* main_lens;
  int32_t* extra_rows;
  int32_t extra_width;
  int32_t* extra_lens;
} smla_plan_paged_form_params;
SMLA_API int32_t smla_plan_paged_form(const smla_plan_paged_form_params* p);
/* ===== end planner ============================================================================ */

#ifdef __cplusplus
}
#endif

#endif /* SPARSE_MLA_H_ */
