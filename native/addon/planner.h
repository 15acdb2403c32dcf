// The device planner ops' params objects (src/backends/abi.ts, CUDA_OP_PARAMS) read into the C
// ABI's planner structs: scalars in their ranges, then every array of exactly the length the
// scalars give it. The per-request arrays are host arrays (HostInput: the launcher walks the
// requests on the host); beside the struct each reader returns the length of the op's output,
// which the launcher checks against the requests (the C ABI's host ops take it from the layout).
// Read by the cuda ops (cuda_ops.cpp); the host planner runs in the WASM core.
#pragma once
#include <climits>

#include "addon.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

// planRows: smla_plan_combine_topk's struct, its topkIndices null for ratio 0 / 128 dense rows;
// *num_queries: the rows of its outputs.
template <class Fields>
void ReadPlanRows(Fields& f, smla_plan_combine_topk_params& p, int64_t* num_queries) {
  p.num_requests = f.Int("numRequests", 0, INT32_MAX);
  f.HostInput(p.seq_lens, "seqLens", napi_int32_array, uint64_t(p.num_requests));
  f.HostInput(p.extend_lens, "extendLens", napi_int32_array, uint64_t(p.num_requests));
  p.window = f.Int("window", 1, INT32_MAX);
  p.ratio = f.Int("ratio", 0, 128);
  p.topk = f.Int("topk", 0, INT32_MAX);
  p.width = f.Int("width", 0, INT32_MAX);
  *num_queries = f.Int("numQueries", 0, INT32_MAX);
  const uint64_t nq = uint64_t(*num_queries);
  f.Input(p.topk_indices, "topkIndices", napi_int32_array, nq * uint64_t(p.topk), true);
  f.Output(p.rows, "rows", napi_int32_array, nq * uint64_t(p.width));
  f.Output(p.lens, "lens", napi_int32_array, nq);
  f.Output(p.dropped, "dropped", napi_int32_array, nq, true);
  f.Output(p.dropped_total, "droppedTotal", napi_bigint64_array, 1, true);
}

// planCompressedTokenIds: *total: the ids tokenIds holds.
template <class Fields>
void ReadPlanCompressedTokenIds(Fields& f, smla_plan_compressed_token_ids_params& p, int64_t* total) {
  p.num_requests = f.Int("numRequests", 0, INT32_MAX);
  const uint64_t nr = uint64_t(p.num_requests);
  f.HostInput(p.seq_lens, "seqLens", napi_int32_array, nr);
  f.HostInput(p.extend_lens, "extendLens", napi_int32_array, nr);
  f.HostInput(p.page_table_offsets, "pageTableOffsets", napi_bigint64_array, nr + 1);
  p.ratio = f.Int("ratio", 4, 128);
  const int64_t table_len = p.page_table_offsets[nr];
  if (table_len < 0) f.Refuse("pageTableOffsets: expected non-negative offsets");
  p.page_size = f.Int("pageSize", 1, INT32_MAX);
  *total = f.Int("total", 0, INT32_MAX);
  f.Input(p.page_tables, "pageTables", napi_int32_array, uint64_t(table_len));
  f.Output(p.token_ids, "tokenIds", napi_bigint64_array, uint64_t(*total));
}

}  // namespace smla_addon
