// Launcher for the dequant gather kernels (kv_cache.cuh).
#include <stdlib.h>

#include "kv_cache.cuh"
#include "smla_cuda.h"

using namespace smla::cuda;

extern "C" int32_t smla_cuda_dequantize_kv_cache(int32_t format, const uint8_t* cache, int32_t page_size,
                                                 int32_t num_pages, const int64_t* token_ids,
                                                 int64_t num_tokens, uint16_t* out, int32_t* bad_id,
                                                 cudaStream_t stream) {
  if (num_tokens < 0 || page_size < 1 || num_pages < 0) return SMLA_ERR_INVALID_ARGUMENT;
  if (num_tokens == 0) return SMLA_OK;
  if (!cache || !token_ids || !out) return SMLA_ERR_INVALID_ARGUMENT;
  // 16-byte loads and stores: cache and out must be 16-byte aligned (cudaMalloc'd), ids 8-byte.
  if (((reinterpret_cast<uintptr_t>(cache) | reinterpret_cast<uintptr_t>(out)) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(token_ids) & 7) != 0)
    return SMLA_ERR_INVALID_ARGUMENT;
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  // Tokens per warp iteration, per format from the H100 run of 2026-11-24 (bench/cuda/ADDON.md,
  // median of 3 rounds): v4 2 tokens 82.5% of copy vs 1 token 79.6%; v32 1 token 80.0% vs 2 tokens
  // 78.3%. SMLA_DEQUANT_TOKENS_PER_WARP=1|2 forces one loop (so the GPU bench can time both).
  const char* tpw_env = getenv("SMLA_DEQUANT_TOKENS_PER_WARP");
  const int forced = (tpw_env && (tpw_env[0] == '1' || tpw_env[0] == '2') && tpw_env[1] == 0) ? tpw_env[0] - '0' : 0;
  const int tpw = forced ? forced : (format == SMLA_CACHE_V4 ? 2 : 1);
  const int64_t warps_needed = (num_tokens + tpw - 1) / tpw;
  int64_t blocks = (warps_needed + 7) / 8;
  const int64_t cap = int64_t(sms) * 8 * 4;  // enough resident warps; the kernels grid-stride
  if (blocks > cap) blocks = cap;
  if (format == SMLA_CACHE_V4) {
    const V4Cache c{cache, page_size, int64_t(page_size) * num_pages};
    if (tpw == 1)
      dequant_v4_kernel<1><<<unsigned(blocks), 256, 0, stream>>>(c, token_ids, num_tokens, out, bad_id);
    else
      dequant_v4_kernel<2><<<unsigned(blocks), 256, 0, stream>>>(c, token_ids, num_tokens, out, bad_id);
  } else if (format == SMLA_CACHE_V32) {
    if (page_size != 1) return SMLA_ERR_INVALID_ARGUMENT;
    if (tpw == 1)
      dequant_v32_kernel<1><<<unsigned(blocks), 256, 0, stream>>>(cache, int64_t(num_pages), token_ids,
                                                                  num_tokens, out, bad_id);
    else
      dequant_v32_kernel<2><<<unsigned(blocks), 256, 0, stream>>>(cache, int64_t(num_pages), token_ids,
                                                                  num_tokens, out, bad_id);
  } else {
    return SMLA_ERR_INVALID_ARGUMENT;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? SMLA_OK : -int32_t(err);
}
