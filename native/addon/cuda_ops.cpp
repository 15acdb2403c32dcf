// The `cuda` backend's kernel ops (native/cuda kernels, host API smla_cuda.h) and its op table.
// Each op is (params, stream): the op's binding file (sparse_prefill.h, paged_sparse_attention.h,
// kv_cache.h, planner.h) reads the params object into the C ABI's params struct through
// CudaFields, whose arrays are host typed arrays or DeviceBuffers of the stream's device; Dispatch
// (cuda_stream.h) runs the launch on the stream, binding each array field to its device memory.
// The TS side types this surface from src/backends/abi.ts (CUDA_OP_PARAMS).
#include <cstring>
#include <memory>
#include <vector>

#include "cuda_ops.h"
#include "cuda_stream.h"
#include "kv_cache.h"
#include "paged_sparse_attention.h"
#include "planner.h"
#include "smla_cuda.h"
#include "sparse_mla/kv_cache_layout.h"
#include "sparse_prefill.h"

namespace smla_addon {
namespace {

// Stands in for a cache of 0 pages (no memory): every id into it is invalid, so it is never read.
alignas(16) const uint8_t kNothing[16] = {};

// One call of a kernel op (params, stream): the engine's stream (argument 1) and the params object
// (argument 0), read through `fields` into `call`'s struct.
template <class Params>
struct KernelCall {
  KernelCall(const Napi::CallbackInfo& info, const char* op)
      : args(info, op), stream(StreamArg(info, 1, op)), call(std::make_shared<DeviceCall<Params>>()), fields(args, 0, *stream, call->bindings) {}
  Args args;
  StreamRef stream;
  std::shared_ptr<DeviceCall<Params>> call;
  CudaFields fields;
};

}  // namespace

int32_t LaunchPagedSparseAttention(const smla_paged_sparse_attention_params& bound, bool has_extra, cudaStream_t s) {
  smla_paged_sparse_attention_params p = bound;
  if (has_extra && !p.extra_k_cache) p.extra_k_cache = kNothing;
  if (!p.k_cache) p.k_cache = kNothing;
  return smla_cuda_paged_sparse_attention(&p, s);
}

namespace {

// sparsePrefill(params, stream)
Napi::Value SparsePrefill(const Napi::CallbackInfo& info) {
  KernelCall<smla_sparse_prefill_params> k(info, "sparsePrefill");
  ReadSparsePrefill(k.fields, k.call->params);
  return Dispatch(k.fields, k.stream, [call = k.call](cudaStream_t s) { return smla_cuda_sparse_prefill(call->Bound(), nullptr, s); });
}

// pagedSparseAttention(params, stream)
Napi::Value PagedSparseAttention(const Napi::CallbackInfo& info) {
  KernelCall<smla_paged_sparse_attention_params> k(info, "pagedSparseAttention");
  const bool hasExtra = !k.fields.IsNull("extraKCache");
  ReadPagedSparseAttention(k.fields, k.call->params);
  return Dispatch(k.fields, k.stream, [call = k.call, hasExtra](cudaStream_t s) { return LaunchPagedSparseAttention(*call->Bound(), hasExtra, s); });
}

// dequantizeKvCache(params, stream): the cache geometry (kv_cache.h), cache, tokenIds, out, and
// outRowOffset (a number or null). tokenIds: a host Int32Array (widened and staged per call, with
// the kernel's bad-id flag read back: an id outside the cache rejects with SMLA_ERR_OUT_OF_RANGE),
// or a DeviceBuffer of numTokens int64 ids (a plan's ids, uploaded once and range-checked then by
// the caller, reused by every layer; the kernel zero-fills any bad id without reading it and
// nothing is read back). With outRowOffset, out is a DeviceBuffer of at least
// (outRowOffset + numTokens) rows and the rows land there (a plan's device workspace region).
Napi::Value DequantizeKvCache(const Napi::CallbackInfo& info) {
  KernelCall<smla_dequantize_kv_cache_params> k(info, "dequantizeKvCache");
  DequantLaunch d = ReadDequantize(k.fields, k.call);
  return Dispatch(k.fields, k.stream, std::move(d.launch), std::move(d.read_flag));
}

// planRows(params, stream): the planner's per-row index building on the device
// (native/cuda/planner.cu): ratio 4 with the indexer's top-k (topkIndices, host or device), ratio
// 0 / 128 dense rows without.
Napi::Value PlanRows(const Napi::CallbackInfo& info) {
  KernelCall<smla_plan_combine_topk_params> k(info, "planRows");
  int64_t num_queries = 0;
  ReadPlanRows(k.fields, k.call->params, &num_queries);
  return Dispatch(k.fields, k.stream, [call = k.call, num_queries](cudaStream_t s) { return smla_cuda_plan_rows(call->Bound(), num_queries, 0, s); });
}

// planCompressedTokenIds(params, stream): a ratio's compressed flat token ids on the device
// (native/cuda/planner.cu); page tables host or device, token ids host or device.
Napi::Value PlanCompressedTokenIds(const Napi::CallbackInfo& info) {
  KernelCall<smla_plan_compressed_token_ids_params> k(info, "planCompressedTokenIds");
  int64_t total = 0;
  ReadPlanCompressedTokenIds(k.fields, k.call->params, &total);
  return Dispatch(k.fields, k.stream, [call = k.call, total](cudaStream_t s) { return smla_cuda_plan_compressed_token_ids(call->Bound(), total, s); });
}

// probeLaunch(stream): one real sm_90a kernel (a one-token v4 dequant of a known record) on the
// stream; resolves when it ran and produced the expected row, rejects with the CUDA error otherwise.
Napi::Value ProbeLaunch(const Napi::CallbackInfo& info) {
  Args a(info, "probeLaunch");
  StreamRef st = StreamArg(info, 0, a.Op());
  return Queue(a, {}, [st]() -> int32_t {
    // Page of one token (1152 bytes): nope e4m3 0x38 (= 1.0) with scale byte 128 (2^1) → 2.0
    // (bf16 0x4000); rope bf16 0x3F80 (1.0) copied.
    using namespace smla::v4;
    std::vector<uint8_t> page(size_t(page_bytes(1)), 0);
    std::memset(page.data(), 0x38, kNopeDim);
    for (int i = 0; i < kRopeDim; ++i) {
      page[size_t(kNopeDim + 2 * i)] = 0x80;
      page[size_t(kNopeDim + 2 * i + 1)] = 0x3F;
    }
    std::memset(page.data() + kDataBytes, 128, kNumTiles);
    int64_t id = 0;
    std::vector<uint16_t> row(kDim, 0xFFFF);
    Operand c, ids, out;
    c.host = page.data();
    c.bytes = page.size();
    ids.host = &id;
    ids.bytes = 8;
    out.host = row.data();
    out.bytes = row.size() * 2;
    out.output = true;
    std::vector<Operand*> ops{&c, &ids, &out};
    cudaError_t err = cudaSetDevice(st->device);
    if (err != cudaSuccess) return -int32_t(err);
    err = Stage(ops, st->stream);
    smla_dequantize_kv_cache_params p{};
    p.format = SMLA_CACHE_V4;
    p.cache = static_cast<const uint8_t*>(c.Ptr());
    p.page_size = 1;
    p.num_pages = 1;
    p.token_ids = static_cast<const int64_t*>(ids.Ptr());
    p.num_tokens = 1;
    p.out = static_cast<uint16_t*>(out.Ptr());
    int32_t status = err != cudaSuccess ? -int32_t(err) : smla_cuda_dequantize_kv_cache(&p, nullptr, st->stream);
    status = Finish(ops, st->stream, status);
    if (status != SMLA_OK) return status;
    for (int i = 0; i < kDim; ++i)
      if (row[size_t(i)] != (i < kNopeDim ? 0x4000 : 0x3F80)) return SMLA_ERR_UNSUPPORTED;  // ran, but wrong
    return int32_t(SMLA_OK);
  });
}

}  // namespace

const OpEntry kCudaOps[] = {
    {"sparsePrefill", SparsePrefill},
    {"pagedSparseAttention", PagedSparseAttention},
    {"dequantizeKvCache", DequantizeKvCache},
    {"planRows", PlanRows},
    {"planCompressedTokenIds", PlanCompressedTokenIds},
    {"layerProgramClass", NewLayerProgramClass},
    {"upload", Upload},
    {"download", Download},
    {"copyDevice", CopyDevice},
    {"copyPeer", CopyPeer},
    {"fillDevice", FillDevice},
    {"setTiming", SetTiming},
    {"takeKernelMs", TakeKernelMs},
    {"takeKernelSpans", TakeKernelSpans},
    {"probeLaunch", ProbeLaunch},
    {"memInfo", MemInfo},
    {"deviceBufferClass", NewDeviceBufferClass},
    {"streamClass", NewStreamClass},
};
const size_t kCudaOpCount = sizeof(kCudaOps) / sizeof(kCudaOps[0]);

}  // namespace smla_addon
