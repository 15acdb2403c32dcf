// Launcher for the dequant gather kernels (kv_cache.cuh).
#include "kv_cache.cuh"
#include "launch_cache.cuh"
#include "smla_cuda.h"

using namespace smla::cuda;


extern "C" int32_t smla_cuda_dequantize_kv_cache(const smla_dequantize_kv_cache_params* p, int32_t* bad_id,
                                                 cudaStream_t stream) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const int32_t format = p->format, page_size = p->page_size, num_pages = p->num_pages;
  const uint8_t* cache = p->cache;
  const int64_t* token_ids = p->token_ids;
  const int64_t num_tokens = p->num_tokens;
  uint16_t* out = p->out;
  if (num_tokens < 0 || page_size < 1 || num_pages < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (num_tokens == 0) return SMLA_OK;
  if (!cache || !token_ids || !out) return SMLA_ERR_INVALID_ARGUMENT;
  // 16-byte loads and stores: cache and out must be 16-byte aligned (cudaMalloc'd), ids 8-byte.
  if (((reinterpret_cast<uintptr_t>(cache) | reinterpret_cast<uintptr_t>(out)) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(token_ids) & 7) != 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  int dev = 0, sms = 0;
  if (const cudaError_t err = current_device_sms(&dev, &sms); err != cudaSuccess) return -int32_t(err);
  const int tokens_per_warp = format == SMLA_CACHE_V4 ? V4Format::kTokens : V32Format::kTokens;
  const int64_t warps_needed = (num_tokens + tokens_per_warp - 1) / tokens_per_warp;
  int64_t blocks = (warps_needed + 7) / 8;
  const int64_t cap = int64_t(sms) * 128;  // blocks queued per SM (more than resident); the kernel grid-strides
  if (blocks > cap) blocks = cap;
  if (format == SMLA_CACHE_V4) {
    dequant_gather_kernel<<<unsigned(blocks), 256, 0, stream>>>(V4Format{V4Cache::make(cache, page_size, num_pages)}, token_ids,
                                                                num_tokens, out, bad_id);
  } else if (format == SMLA_CACHE_V32) {
    if (page_size != 1) return SMLA_ERR_INVALID_ARGUMENT;
    dequant_gather_kernel<<<unsigned(blocks), 256, 0, stream>>>(V32Format{cache, int64_t(num_pages)}, token_ids, num_tokens, out,
                                                                bad_id);
  } else {
    return SMLA_ERR_INVALID_ARGUMENT;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? SMLA_OK : -int32_t(err);
}
