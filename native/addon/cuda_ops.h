// What the cuda op files share (cuda_ops.cpp, layer_program.cpp): the dequant op's reader, which a
// layer program reads its dequants with too.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "cuda_stream.h"
#include "kv_cache.h"
#include "smla_cuda.h"
#include "sparse_mla/kv_cache_layout.h"

namespace smla_addon {

// A dequantizeKvCache params object read into its struct (ReadDequantize): the launch, and for host
// ids the bad-id flag read back after it (the pool path).
struct DequantLaunch {
  std::function<int32_t(cudaStream_t)> launch;
  std::function<int32_t(cudaStream_t)> read_flag;  // host ids only: the bad-id flag read back (pool path)
  bool device_ids = false;
  bool into_rows = false;  // outRowOffset given
};

inline DequantLaunch ReadDequantize(CudaFields& f, const std::shared_ptr<DeviceCall<smla_dequantize_kv_cache_params>>& call) {
  smla_dequantize_kv_cache_params& p = call->params;
  ReadCacheGeometry(f, p);
  const int64_t n = p.num_tokens, dim = RowDim(p.format);
  f.Input(p.cache, "cache", napi_uint8_array, CacheBytes(p.format, p.page_size, p.num_pages));
  DequantLaunch d;
  const bool devIds = d.device_ids = f.OnDevice("tokenIds");
  std::shared_ptr<Operand> ids;
  if (devIds) {
    ids = f.Read("tokenIds", napi_bigint64_array, 8, uint64_t(n), false);
  } else {
    // widened with one spare slot after the ids for the kernel's bad-id flag (int32)
    const int32_t* ids32 = f.HostArray<int32_t>("tokenIds", napi_int32_array, uint64_t(n));
    auto wide = std::make_shared<std::vector<int64_t>>(ids32, ids32 + n);
    wide->push_back(0);
    ids = std::make_shared<Operand>();
    ids->host = wide->data();
    ids->bytes = uint64_t(wide->size()) * 8;
    ids->keep = wide;
    f.Add(ids);
  }
  call->bindings.Bind(p.token_ids, ids);
  std::shared_ptr<Operand> out;
  uint64_t out_offset = 0;
  if (!f.IsNull("outRowOffset")) {
    d.into_rows = true;
    const int64_t row0 = f.Int("outRowOffset", 0, INT32_MAX);
    out = std::make_shared<Operand>();
    out->output = true;
    out->name = "out";
    out->device = f.Buffer("out");
    out_offset = uint64_t(row0) * uint64_t(dim) * 2;
    out->bytes = uint64_t(n) * uint64_t(dim) * 2;
    if (out_offset + out->bytes > out->device->bytes)
      f.Refuse("out: rows [" + std::to_string(row0) + ", " + std::to_string(row0 + n) + ") do not fit a buffer of " +
               std::to_string(out->device->bytes) + " bytes");
    f.Add(out);
  } else {
    out = f.Read("out", napi_uint16_array, 2, uint64_t(n) * uint64_t(dim), true);
  }
  call->bindings.Bind(p.out, out, out_offset);
  auto bad = std::make_shared<int32_t>(0);
  auto flag = [=]() { return !devIds && n > 0 ? reinterpret_cast<int32_t*>(static_cast<int64_t*>(ids->Ptr()) + n) : nullptr; };
  if (!devIds && n > 0) {
    // host ids (a pool thread, which syncs): the kernel's bad-id flag comes back
    d.read_flag = [=](cudaStream_t s) -> int32_t {
      cudaError_t err = cudaMemcpyAsync(bad.get(), flag(), sizeof(int32_t), cudaMemcpyDeviceToHost, s);
      if (err == cudaSuccess) err = WaitForQueued(s);
      if (err != cudaSuccess) return -int32_t(err);
      return *bad != 0 ? int32_t(SMLA_ERR_OUT_OF_RANGE) : int32_t(SMLA_OK);
    };
  }
  d.launch = [call, flag](cudaStream_t s) -> int32_t { return smla_cuda_dequantize_kv_cache(call->Bound(), flag(), s); };
  return d;
}

// The paged attention kernel over a bound params struct. An empty cache (0 pages) has no device
// memory: a 16-aligned dummy stands in so the kernel's alignment check holds; every id into it is
// then out of range and never read. has_extra: the params name an extra cache.
int32_t LaunchPagedSparseAttention(const smla_paged_sparse_attention_params& bound, bool has_extra, cudaStream_t s);

// layerProgramClass(): the LayerProgram class (layer_program.cpp).
Napi::Value NewLayerProgramClass(const Napi::CallbackInfo& info);

}  // namespace smla_addon
