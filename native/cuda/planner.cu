// The planner's per-row index building on the GPU (SPEC §6): the rows of the host planner's per-row
// functions (cpp/include/sparse_mla/planner.h: topk_row, dense_row), one warp per query row, so a
// chunk's per-layer c4 rows are built where the indexer's top-k and the attention live.
// The per-request layout (a walk over the requests) is computed on the host and passed with the
// launch (in the kernel's parameters when it is small); the per-query work runs on the device.
#include <algorithm>
#include <climits>
#include <vector>

#include "launch_cache.cuh"
#include "smla_cuda.h"
#include "sparse_mla/planner.h"

namespace {

using smla::plan::QueryContext;

// A launch's per-request table. Up to kInlineRequests requests travel by value in the kernel's
// parameters (a __grid_constant__ parameter, read in place): no allocation, copy or free in the
// stream. More are uploaded for the launch and read through `uploaded`. Each request starts with
// `start`, the first item (query or id) it holds.
constexpr int32_t kInlineRequests = 64;
template <class Request>
struct RequestTable {
  Request inline_requests[kInlineRequests];
  const Request* uploaded;
  int32_t count;

  __device__ __forceinline__ const Request& operator[](int32_t i) const { return uploaded ? uploaded[i] : inline_requests[i]; }

  // The request holding item i: the last whose start is at or before i (a request without items
  // shares its start with the next, so the last such is the one holding it).
  __device__ __forceinline__ const Request& holding(int64_t i) const {
    int32_t lo = 0, hi = count - 1;
    while (lo < hi) {
      const int32_t mid = (lo + hi + 1) / 2;
      if ((*this)[mid].start <= i) lo = mid; else hi = mid - 1;
    }
    return (*this)[lo];
  }
};

struct RequestContext {
  int64_t start;  // its first query
  int64_t comp_base;
  int64_t swa_base;
  int64_t swa_start_pos;
  int64_t first_pos;  // seq_len - extend_len
};

// One request's compressed id region: entries [start, start + visible) of the flat ids come from
// its page table (table_offset into the flattened page tables).
struct CompressedRequest {
  int64_t start;
  int64_t table_offset;
};

// Kernel parameters may take 4 KB (the portable limit): the table plus the rest of the arguments.
static_assert(sizeof(RequestTable<RequestContext>) + 256 <= 4096, "the inline request table must fit the kernel parameters");

// Blocks for `work` items at `threads` a block, at most 16 per SM (the kernels loop grid-stride).
unsigned grid_blocks(int64_t work, int threads) {
  int device = 0, sms = 0;
  if (smla::cuda::current_device_sms(&device, &sms) != cudaSuccess) sms = 1;  // the launch reports the error
  const int64_t blocks = std::min<int64_t>((work + threads - 1) / threads, int64_t(std::max(sms, 1)) * 16);
  return unsigned(blocks);
}

// launch(table, blocks) over the requests `reqs` (at least one) and `work` items at `threads` a
// block: the table inline when it fits, else uploaded for the launch (stream-ordered, freed after
// it). Returns an smla status or -(cudaError_t).
template <class Request, class Launch>
int32_t launch_with_requests(const std::vector<Request>& reqs, int64_t work, int threads, cudaStream_t stream, Launch launch) {
  RequestTable<Request> table{};
  table.count = int32_t(reqs.size());
  Request* uploaded = nullptr;
  cudaError_t err = cudaSuccess;
  if (reqs.size() <= size_t(kInlineRequests)) {
    std::copy(reqs.begin(), reqs.end(), table.inline_requests);
  } else {
    const size_t bytes = reqs.size() * sizeof(Request);
    err = cudaMallocAsync(reinterpret_cast<void**>(&uploaded), bytes, stream);
    if (err != cudaSuccess) return -int32_t(err);
    // From pageable memory the copy has taken the data when it returns, so reqs may go after it.
    err = cudaMemcpyAsync(uploaded, reqs.data(), bytes, cudaMemcpyHostToDevice, stream);
    table.uploaded = uploaded;
  }
  if (err == cudaSuccess) {
    launch(table, grid_blocks(work, threads));  // the parameters are copied at the launch: `table` may go
    err = cudaGetLastError();
  }
  if (uploaded) cudaFreeAsync(uploaded, stream);
  return err == cudaSuccess ? SMLA_OK : -int32_t(err);
}

constexpr int kPlanRowsThreads = 128;
constexpr int kCompressedIdThreads = 256;

// Adds each thread's `count` into *total: a block sum (warp shuffles, then one warp over the warps'
// sums), then one atomic per block.
__device__ __forceinline__ void add_block_total(int64_t count, unsigned long long* total) {
  __shared__ int64_t warp_sums[kPlanRowsThreads / 32];
  for (int off = 16; off > 0; off /= 2) count += __shfl_down_sync(0xffffffffu, count, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x < 32) {
    count = threadIdx.x < kPlanRowsThreads / 32 ? warp_sums[threadIdx.x] : 0;
    for (int off = 16; off > 0; off /= 2) count += __shfl_down_sync(0xffffffffu, count, off);
    if (threadIdx.x == 0 && count != 0) atomicAdd(total, static_cast<unsigned long long>(count));
  }
}

// One warp per query row: the row's entries are read and written by the warp's lanes together
// (coalesced), the top-k entries kept in the indexer's order by a ballot and a prefix count. The
// rows are exactly topk_row's and dense_row's (planner.h), which the host planner runs one row at a
// time; a thread per row left most of the GPU idle and each thread's reads and writes strided.
__global__ void __launch_bounds__(kPlanRowsThreads)
    plan_rows_kernel(const __grid_constant__ RequestTable<RequestContext> reqs, int64_t num_queries, int32_t window, int32_t ratio,
                     const int32_t* topk_indices, int32_t topk, int32_t width, int32_t* rows, int32_t* lens, int32_t* dropped,
                     unsigned long long* dropped_total) {
  constexpr int kWarps = kPlanRowsThreads / 32;
  const int lane = threadIdx.x & 31;
  const uint32_t below = (1u << lane) - 1u;  // the lanes before this one
  int64_t dropped_here = 0;                  // lane 0's rows only: each row counted once
  for (int64_t q = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; q < num_queries; q += int64_t(gridDim.x) * kWarps) {
    const RequestContext& r = reqs.holding(q);
    const smla::plan::QueryContext c{r.first_pos + (q - r.start), r.comp_base, r.swa_base, r.swa_start_pos};
    int32_t* row = rows + q * int64_t(width);
    const int64_t nc = smla::plan::query_visible(c.pos, ratio);
    int64_t n = 0;
    int32_t bad = 0;
    if (topk_indices) {
      // visible entries in order; padding (negative) skipped; entries past the causal limit dropped
      // and counted. kAhead rounds of entries are loaded before the first is placed, so their loads
      // are in flight together (the stores to row could alias them for the compiler).
      const int32_t* tk = topk_indices + q * int64_t(topk);
      constexpr int kAhead = 8;
      for (int64_t k0 = 0; k0 < topk; k0 += 32 * kAhead) {
        int32_t ahead[kAhead];
#pragma unroll
        for (int u = 0; u < kAhead; ++u) ahead[u] = k0 + 32 * u + lane < topk ? tk[k0 + 32 * u + lane] : -1;
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          if (k0 + 32 * u >= topk) break;  // the same for the whole warp
          const int64_t j = ahead[u];
          const bool keep = j >= 0 && j < nc;
          bad += j >= nc;
          const uint32_t kept = __ballot_sync(0xffffffffu, keep);
          if (keep) row[n + __popc(kept & below)] = int32_t(c.comp_base + j);
          n += __popc(kept);
        }
      }
      for (int off = 16; off > 0; off /= 2) bad += __shfl_xor_sync(0xffffffffu, bad, off);
    } else {
      for (int64_t k = lane; k < nc; k += 32) row[k] = int32_t(c.comp_base + k);
      n = nc;
    }
    const int64_t wl = smla::plan::window_len(c.pos, window);
    const int64_t first = smla::plan::window_row(c, window, 0);
    for (int64_t w = lane; w < wl; w += 32) row[n + w] = int32_t(first + w);
    n += wl;
    for (int64_t k = n + lane; k < width; k += 32) row[k] = -1;
    if (lane == 0) {
      lens[q] = int32_t(n);
      if (dropped) dropped[q] = bad;
      dropped_here += bad;
    }
  }
  // block-uniform: every thread of the block reaches the reduction
  if (dropped_total && topk_indices) add_block_total(dropped_here, dropped_total);
}

__global__ void __launch_bounds__(kCompressedIdThreads)
    plan_compressed_ids_kernel(const __grid_constant__ RequestTable<CompressedRequest> reqs, int64_t total, const int32_t* page_tables,
                               int32_t page_size, int64_t* token_ids) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const CompressedRequest& r = reqs.holding(i);
    token_ids[i] = smla::plan::compressed_token_id(page_tables + r.table_offset, i - r.start, page_size);
  }
}

}  // namespace

extern "C" int32_t smla_cuda_plan_compressed_token_ids(const smla_plan_compressed_token_ids_params* p, int64_t total,
                                                       cudaStream_t stream) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t num_requests = p->num_requests, ratio = p->ratio, page_size = p->page_size;
  const int32_t *seq_lens = p->seq_lens, *extend_lens = p->extend_lens, *page_tables = p->page_tables;
  const int64_t* page_table_offsets = p->page_table_offsets;
  int64_t* token_ids = p->token_ids;
  if (num_requests < 0 || (ratio != 4 && ratio != 128) || page_size < 1 || total < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (num_requests > 0 && (!seq_lens || !extend_lens || !page_table_offsets)) return SMLA_ERR_INVALID_ARGUMENT;
  // The host walk (as smla_plan_compressed_token_ids): every page table checked before anything runs.
  std::vector<CompressedRequest> reqs(static_cast<size_t>(num_requests));
  int64_t out = 0;
  for (int32_t r = 0; r < num_requests; ++r) {
    if (seq_lens[r] < 0 || extend_lens[r] < 0 || extend_lens[r] > seq_lens[r]) return SMLA_ERR_INVALID_ARGUMENT;
    const int64_t v = smla::plan::request_visible(seq_lens[r], extend_lens[r], ratio);
    const int64_t have = page_table_offsets[r + 1] - page_table_offsets[r];
    if (page_table_offsets[r] < 0 || have < 0 || have < (v + page_size - 1) / page_size) return SMLA_ERR_INVALID_ARGUMENT;
    reqs[size_t(r)] = CompressedRequest{out, page_table_offsets[r]};
    out += v;
  }
  if (out != total) return SMLA_ERR_INVALID_ARGUMENT;
  if (total == 0) return SMLA_OK;
  if (!page_tables || !token_ids) return SMLA_ERR_INVALID_ARGUMENT;

  return launch_with_requests(reqs, total, kCompressedIdThreads, stream, [&](const RequestTable<CompressedRequest>& table, unsigned blocks) {
    plan_compressed_ids_kernel<<<blocks, kCompressedIdThreads, 0, stream>>>(table, total, page_tables, page_size, token_ids);
  });
}

extern "C" int32_t smla_cuda_plan_rows(const smla_plan_combine_topk_params* p, int64_t num_queries, int32_t total_zeroed,
                                   cudaStream_t stream) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t num_requests = p->num_requests, window = p->window, ratio = p->ratio, topk = p->topk, width = p->width;
  const int32_t *seq_lens = p->seq_lens, *extend_lens = p->extend_lens, *topk_indices = p->topk_indices;
  int32_t *rows = p->rows, *lens = p->lens, *dropped = p->dropped;
  auto* dropped_total = reinterpret_cast<unsigned long long*>(p->dropped_total);
  if (num_requests < 0 || window < 1 || width < 0 || topk < 0) return SMLA_ERR_INVALID_ARGUMENT;
  const bool top = topk_indices != nullptr;
  if (top ? ratio != 4 : (ratio != 0 && ratio != 128)) return SMLA_ERR_INVALID_ARGUMENT;
  if (top && int64_t(width) < int64_t(topk) + window) return SMLA_ERR_INVALID_ARGUMENT;
  // The host walk: each request's bases (as the host planner's for_each_query), the widest row.
  std::vector<RequestContext> reqs(static_cast<size_t>(num_requests));
  int64_t nq = 0, swa = 0, comp = 0, comp_total = 0, widest = 0;
  for (int32_t r = 0; r < num_requests; ++r) {
    if (seq_lens[r] < 0 || extend_lens[r] < 0 || extend_lens[r] > seq_lens[r]) return SMLA_ERR_INVALID_ARGUMENT;
    comp_total += smla::plan::request_visible(seq_lens[r], extend_lens[r], ratio);
  }
  for (int32_t r = 0; r < num_requests; ++r) {
    const int64_t s = seq_lens[r], e = extend_lens[r];
    const int64_t g = smla::plan::swa_gather_len(s, e, window);
    reqs[size_t(r)] = RequestContext{nq, comp, comp_total + swa, s - g, s - e};
    if (e > 0 && !top) {
      const int64_t last = s - 1;  // rows grow with pos: the last query's is the widest
      const int64_t len = smla::plan::query_visible(last, ratio) + smla::plan::window_len(last, window);
      if (len > widest) widest = len;
    }
    nq += e;
    swa += g;
    comp += smla::plan::request_visible(s, e, ratio);
  }
  if (nq != num_queries || nq > INT32_MAX || swa + comp > INT32_MAX) return SMLA_ERR_INVALID_ARGUMENT;
  if (widest > width) return SMLA_ERR_INVALID_ARGUMENT;
  if (nq > 0 && (!rows || !lens || (top && topk > 0 && !topk_indices))) return SMLA_ERR_INVALID_ARGUMENT;
  // The total starts at 0 in stream order; the kernel's blocks add to it (dense rows drop nothing).
  if (dropped_total && !total_zeroed) {
    const cudaError_t err = cudaMemsetAsync(dropped_total, 0, sizeof(*dropped_total), stream);
    if (err != cudaSuccess) return -int32_t(err);
  }
  if (nq == 0) return SMLA_OK;

  return launch_with_requests(reqs, nq * 32, kPlanRowsThreads, stream, [&](const RequestTable<RequestContext>& table, unsigned blocks) {
    plan_rows_kernel<<<blocks, kPlanRowsThreads, 0, stream>>>(table, nq, window, ratio, top ? topk_indices : nullptr, topk, width, rows,
                                                            lens, dropped, dropped_total);
  });
}
