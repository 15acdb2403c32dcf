// Launchers for the dequant gather kernels (kv_cache.cuh).
#include <algorithm>

#include "kv_cache.cuh"
#include "launch_cache.cuh"
#include "smla_cuda.h"

using namespace smla::cuda;

namespace {

// A gather's checked launch geometry: SMLA_OK with its blocks set, or the status to return.
int32_t gather_blocks(const smla_dequantize_kv_cache_params* p, int sms, int64_t* blocks) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  if (p->num_tokens < 0 || p->page_size < 1 || p->num_pages < 0) return SMLA_ERR_INVALID_ARGUMENT;
  *blocks = 0;
  if (p->num_tokens == 0) return SMLA_OK;
  if (!p->cache || !p->token_ids || !p->out) return SMLA_ERR_INVALID_ARGUMENT;
  // 16-byte loads and stores: cache and out must be 16-byte aligned (cudaMalloc'd), ids 8-byte.
  if (((reinterpret_cast<uintptr_t>(p->cache) | reinterpret_cast<uintptr_t>(p->out)) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(p->token_ids) & 7) != 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  if (p->format == SMLA_CACHE_V32 ? p->page_size != 1 : p->format != SMLA_CACHE_V4) return SMLA_ERR_INVALID_ARGUMENT;
  const int tokens_per_warp = p->format == SMLA_CACHE_V4 ? V4Format::kTokens : V32Format::kTokens;
  const int64_t warps_needed = (p->num_tokens + tokens_per_warp - 1) / tokens_per_warp;
  const int64_t cap = int64_t(sms) * 128;  // blocks queued per SM (more than resident); the kernel grid-strides
  *blocks = std::min<int64_t>((warps_needed + 7) / 8, cap);
  return SMLA_OK;
}

V4Format v4_of(const smla_dequantize_kv_cache_params* p) { return V4Format{V4Cache::make(p->cache, p->page_size, p->num_pages)}; }
V32Format v32_of(const smla_dequantize_kv_cache_params* p) { return V32Format{p->cache, int64_t(p->num_pages)}; }

// The pair kernel over `first` (blocks [0, first_blocks)) and `second` (the rest; null: none).
template <class Format, class FormatOf>
void launch_pair(FormatOf format_of, const smla_dequantize_kv_cache_params* first, int32_t* first_bad, int64_t first_blocks,
                 const smla_dequantize_kv_cache_params* second, int32_t* second_bad, int64_t second_blocks, const ZeroedWords& zero,
                 cudaStream_t stream) {
  const Format f = format_of(first);
  const GatherShare<Format> s1{f, first->token_ids, first->num_tokens, first->out, first_bad};
  const GatherShare<Format> s2 = second ? GatherShare<Format>{format_of(second), second->token_ids, second->num_tokens, second->out, second_bad}
                                        : GatherShare<Format>{f, nullptr, 0, nullptr, nullptr};
  dequant_gather_pair_kernel<<<unsigned(first_blocks + second_blocks), 256, 0, stream>>>(s1, s2, unsigned(first_blocks), zero);
}

int32_t launched() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? SMLA_OK : -int32_t(err);
}

}  // namespace

extern "C" int32_t smla_cuda_dequantize_kv_cache(const smla_dequantize_kv_cache_params* p, int32_t* bad_id,
                                                 cudaStream_t stream) {
  int dev = 0, sms = 0;
  if (p && p->num_tokens > 0)
    if (const cudaError_t err = current_device_sms(&dev, &sms); err != cudaSuccess) return -int32_t(err);
  int64_t blocks = 0;
  if (const int32_t status = gather_blocks(p, sms, &blocks); status != SMLA_OK || blocks == 0) return status;
  if (p->format == SMLA_CACHE_V4) {
    dequant_gather_kernel<<<unsigned(blocks), 256, 0, stream>>>(v4_of(p), p->token_ids, p->num_tokens, p->out, bad_id);
  } else {
    dequant_gather_kernel<<<unsigned(blocks), 256, 0, stream>>>(v32_of(p), p->token_ids, p->num_tokens, p->out, bad_id);
  }
  return launched();
}

extern "C" int32_t smla_cuda_dequantize_kv_cache_pair(const smla_dequantize_kv_cache_params* a, int32_t* a_bad_id,
                                                      const smla_dequantize_kv_cache_params* b, int32_t* b_bad_id,
                                                      unsigned long long* const* zero_words, int32_t zero_count,
                                                      cudaStream_t stream) {
  if (zero_count < 0 || zero_count > kMaxZeroedWords || (zero_count > 0 && !zero_words)) return SMLA_ERR_INVALID_ARGUMENT;
  ZeroedWords zero{};
  zero.count = zero_count;
  for (int i = 0; i < zero_count; ++i) {
    if (!zero_words[i] || (reinterpret_cast<uintptr_t>(zero_words[i]) & 7) != 0) return SMLA_ERR_INVALID_ARGUMENT;
    zero.word[i] = zero_words[i];
  }
  int dev = 0, sms = 0;
  if (const cudaError_t err = current_device_sms(&dev, &sms); err != cudaSuccess) return -int32_t(err);
  int64_t a_blocks = 0, b_blocks = 0;
  if (a)
    if (const int32_t status = gather_blocks(a, sms, &a_blocks); status != SMLA_OK) return status;
  if (b)
    if (const int32_t status = gather_blocks(b, sms, &b_blocks); status != SMLA_OK) return status;
  // One launch when both gathers have work in one format (or one of them alone has work);
  // otherwise each its own launch and the words zeroed by a memset.
  const bool one_launch = a_blocks == 0 || b_blocks == 0 || a->format == b->format;
  if (!one_launch || a_blocks + b_blocks == 0) {
    for (int i = 0; i < zero_count; ++i)
      if (const cudaError_t err = cudaMemsetAsync(zero.word[i], 0, 8, stream); err != cudaSuccess) return -int32_t(err);
    if (a_blocks == 0 && b_blocks == 0) return SMLA_OK;
    if (const int32_t status = smla_cuda_dequantize_kv_cache(a, a_bad_id, stream); status != SMLA_OK) return status;
    return smla_cuda_dequantize_kv_cache(b, b_bad_id, stream);
  }
  // the gather with work first (the kernel gives blocks [0, first_blocks) to the first)
  const bool a_first = a_blocks > 0;
  const smla_dequantize_kv_cache_params* first = a_first ? a : b;
  const smla_dequantize_kv_cache_params* second = a_first && b_blocks > 0 ? b : nullptr;
  int32_t* first_bad = a_first ? a_bad_id : b_bad_id;
  const int64_t first_blocks = a_first ? a_blocks : b_blocks, second_blocks = second ? b_blocks : 0;
  if (first->format == SMLA_CACHE_V4) {
    launch_pair<V4Format>(v4_of, first, first_bad, first_blocks, second, b_bad_id, second_blocks, zero, stream);
  } else {
    launch_pair<V32Format>(v32_of, first, first_bad, first_blocks, second, b_bad_id, second_blocks, zero, stream);
  }
  return launched();
}
