// The `cuda` backend's kernel ops (native/cuda kernels, host API smla_cuda.h) and its op table.
// Each op is (params, stream): the op's binding file (sparse_prefill.h, paged_sparse_attention.h,
// kv_cache.h, planner.h) reads the params object into the C ABI's params struct through
// CudaFields, whose arrays are host typed arrays or DeviceBuffers of the stream's device; Dispatch
// (cuda_stream.h) runs the launch on the stream, binding each array field to its device memory.
// The TS side types this surface from src/backends/abi.ts (CUDA_OP_PARAMS).
#include <cstring>
#include <memory>
#include <vector>

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

// sparsePrefill(params, stream)
Napi::Value SparsePrefill(const Napi::CallbackInfo& info) {
  KernelCall<smla_sparse_prefill_params> k(info, "sparsePrefill");
  ReadSparsePrefill(k.fields, k.call->params);
  return Dispatch(k.fields, k.stream, [call = k.call](cudaStream_t s) { return smla_cuda_sparse_prefill(call->Bound(), s); });
}

// pagedSparseAttention(params, stream)
Napi::Value PagedSparseAttention(const Napi::CallbackInfo& info) {
  KernelCall<smla_paged_sparse_attention_params> k(info, "pagedSparseAttention");
  const bool hasExtra = !k.fields.IsNull("extraKCache");
  ReadPagedSparseAttention(k.fields, k.call->params);
  return Dispatch(k.fields, k.stream, [call = k.call, hasExtra](cudaStream_t s) {
    smla_paged_sparse_attention_params p = *call->Bound();
    // An empty cache (0 pages) has no device memory: pass a 16-aligned dummy so the kernel's
    // alignment check holds; every id into it is then out of range and never read.
    if (hasExtra && !p.extra_k_cache) p.extra_k_cache = kNothing;
    if (!p.k_cache) p.k_cache = kNothing;
    return smla_cuda_paged_sparse_attention(&p, s);
  });
}

// dequantizeKvCache(params, stream): the cache geometry (kv_cache.h), cache, tokenIds, out, and
// outRowOffset (a number or null). tokenIds: a host Int32Array (widened and staged per call, with
// the kernel's bad-id flag read back: an id outside the cache rejects with SMLA_ERR_OUT_OF_RANGE),
// or a DeviceBuffer of numTokens int64 ids (a plan's ids, uploaded once and range-checked then by
// the caller, reused by every layer; the kernel zero-fills any bad id without reading it and
// nothing is read back). With outRowOffset, out is a DeviceBuffer of at least
// (outRowOffset + numTokens) rows and the rows land there (a plan's device workspace region).
struct DequantLaunch {
  std::function<int32_t(cudaStream_t)> launch;
  std::function<int32_t(cudaStream_t)> read_flag;  // host ids only: the bad-id flag read back (pool path)
  bool device_ids = false;
  bool into_rows = false;  // outRowOffset given
};

DequantLaunch ReadDequantize(CudaFields& f, const std::shared_ptr<DeviceCall<smla_dequantize_kv_cache_params>>& call) {
  smla_dequantize_kv_cache_params& p = call->params;
  ReadCacheGeometry(f, p);
  const int64_t n = p.num_tokens, dim = RowDim(p.format);
  f.Input(p.cache, "cache", napi_uint8_array, CacheBytes(p.format, p.page_size, p.num_pages));
  DequantLaunch d;
  d.device_ids = f.OnDevice("tokenIds");
  const bool devIds = d.device_ids;
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
  return Dispatch(k.fields, k.stream, [call = k.call, num_queries](cudaStream_t s) { return smla_cuda_plan_rows(call->Bound(), num_queries, s); });
}

// planCompressedTokenIds(params, stream): a ratio's compressed flat token ids on the device
// (native/cuda/planner.cu); page tables host or device, token ids host or device.
Napi::Value PlanCompressedTokenIds(const Napi::CallbackInfo& info) {
  KernelCall<smla_plan_compressed_token_ids_params> k(info, "planCompressedTokenIds");
  int64_t total = 0;
  ReadPlanCompressedTokenIds(k.fields, k.call->params, &total);
  return Dispatch(k.fields, k.stream, [call = k.call, total](cudaStream_t s) { return smla_cuda_plan_compressed_token_ids(call->Bound(), total, s); });
}

// ---- a workspace layer as one program: read once, run per layer ---------------------------------

// layerProgramClass(): the LayerProgram class. `new LayerProgram(params, stream)` reads a workspace
// layer's launches from params = { planRows: planRows' params (a c4 combine into rows the plan
// keeps) or null, dequants: dequantizeKvCache's params (device ids, outRowOffset), prefill:
// sparsePrefill's params }, every array a device buffer of the stream, read and checked as the ops
// read them. `slots` names each buffer in reading order ("planRows.rows", "dequants.0.cache", ...,
// "prefill.q", ..., then the prefill's outputs "prefill.out", "prefill.maxLogits", "prefill.lse").
// A layer is then two calls, nothing read by name:
//   run(droppedInto, ...inputs): one buffer per input slot, each of this stream and exactly the size
//     of the one it stands for, all checked first; queues the dequants, the combine and the read of
//     its dropped total into droppedInto (a BigInt64Array(1), or null). Settles once queued, or with
//     droppedInto once the total has landed (the rest may still be running).
//   finish(smScale, out, maxLogits, lse): the outputs, checked the same way, then queues the prefill
//     over run's inputs; settled at once (with run's failure when run's launches failed).
// so the caller can allocate the outputs while the device already runs the first launches.
// abandon() lets go of run's inputs without a prefill. Between layers the program keeps no buffer.
class LayerProgram : public Napi::ObjectWrap<LayerProgram> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "LayerProgram",
                       {InstanceAccessor<&LayerProgram::Slots>("slots"), InstanceMethod<&LayerProgram::Run>("run"),
                        InstanceMethod<&LayerProgram::Finish>("finish"), InstanceMethod<&LayerProgram::Abandon>("abandon")});
  }

  explicit LayerProgram(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LayerProgram>(info) {
    Args args(info, "layerProgram");
    Args::Fields top = args.Object(0, "params");
    stream_ = StreamArg(info, 1, args.Op());
    std::vector<std::pair<std::string, std::shared_ptr<Operand>>> operands;
    auto collect = [&](CudaFields& f, const std::string& part) {
      for (auto& o : f.TakeOperands()) operands.emplace_back(part + "." + (o->name ? o->name : "?"), std::move(o));
    };
    std::function<int32_t(cudaStream_t)> combine;
    if (!top.IsNull("planRows")) {
      auto call = std::make_shared<DeviceCall<smla_plan_combine_topk_params>>();
      CudaFields f(args, top.Object("planRows"), *stream_, call->bindings);
      int64_t num_queries = 0;
      ReadPlanRows(f, call->params, &num_queries);
      if (f.IsNull("droppedTotal")) f.Refuse("planRows.droppedTotal: a combine in a layer program sums its dropped count on the device");
      collect(f, "planRows");
      combine = [call, num_queries](cudaStream_t s) { return smla_cuda_plan_rows(call->Bound(), num_queries, s); };
      dropped_total_ = [call]() -> const void* { return call->Bound()->dropped_total; };
    }
    const Napi::Value dequants = top.Get("dequants");
    if (!dequants.IsArray()) top.Refuse("dequants: expected an array of dequantizeKvCache params");
    const Napi::Array list = dequants.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); ++i) {
      const std::string part = "dequants." + std::to_string(i);
      auto call = std::make_shared<DeviceCall<smla_dequantize_kv_cache_params>>();
      CudaFields f(args, args.ObjectOf(list.Get(i), part.c_str()), *stream_, call->bindings);
      DequantLaunch d = ReadDequantize(f, call);
      if (!d.device_ids || !d.into_rows) f.Refuse(part + ": expected device tokenIds and an outRowOffset");
      collect(f, part);
      head_.push_back(std::move(d.launch));
    }
    // the dequants first (they need nothing the combine builds), then the combine and its read
    if (combine) head_.push_back(std::move(combine));
    prefill_ = std::make_shared<DeviceCall<smla_sparse_prefill_params>>();
    {
      CudaFields f(args, top.Object("prefill"), *stream_, prefill_->bindings);
      ReadSparsePrefill(f, prefill_->params);
      collect(f, "prefill");
    }
    for (auto& [name, o] : operands) {
      if (!o->device) {
        if (o->bytes == 0) continue;  // an absent optional array (a null sink, say): stays absent
        top.Refuse(name + ": expected a device buffer (a layer program queues device work only)");
      }
      if (o->device->stream != stream_) top.Refuse(name + ": a buffer of another engine's stream");
      const bool output = o->output && name.rfind("prefill.", 0) == 0;
      (output ? outputs_ : inputs_).push_back({name, o, o->device->bytes});
      o->device.reset();  // each layer binds its own
    }
  }

 private:
  struct Slot {
    std::string name;
    std::shared_ptr<Operand> operand;
    uint64_t bytes;
  };
  enum class State { kIdle, kRan, kFailed };

  Napi::Value Slots(const Napi::CallbackInfo& info) {
    Napi::Array names = Napi::Array::New(info.Env(), inputs_.size() + outputs_.size());
    uint32_t i = 0;
    for (const Slot& s : inputs_) names.Set(i++, Napi::String::New(info.Env(), s.name));
    for (const Slot& s : outputs_) names.Set(i++, Napi::String::New(info.Env(), s.name));
    return names;
  }

  void Unbind() {
    for (Slot& s : inputs_) s.operand->device.reset();
    for (Slot& s : outputs_) s.operand->device.reset();
    state_ = State::kIdle;
  }

  // Binds slots[i] to info[first + i], each checked; unbinds everything on a bad one.
  void Bind(Args& a, const Napi::CallbackInfo& info, size_t first, std::vector<Slot>& slots) {
    if (info.Length() != first + slots.size()) {
      Unbind();
      ThrowArgument(a.Env(), a.Op(), "expected " + std::to_string(first + slots.size()) + " arguments, got " + std::to_string(info.Length()));
    }
    try {
      for (size_t i = 0; i < slots.size(); ++i) {
        std::shared_ptr<Allocation> b = BufferOf(a, info[first + i], slots[i].name, *stream_);
        if (b->stream != stream_) ThrowArgument(a.Env(), a.Op(), slots[i].name + ": a buffer of another engine's stream");
        if (b->bytes != slots[i].bytes)
          ThrowArgument(a.Env(), a.Op(), slots[i].name + ": expected a device buffer of " + std::to_string(slots[i].bytes) + " bytes, got " + std::to_string(b->bytes));
        slots[i].operand->device = std::move(b);
      }
    } catch (...) {
      Unbind();
      throw;
    }
  }

  Napi::Value Run(const Napi::CallbackInfo& info) {
    Args a(info, "layerProgram.run");
    Unbind();  // a run that never finished (abandoned by an error in between) lets go here
    void* dropped_into = nullptr;
    std::vector<Napi::ObjectReference> pins;
    if (info.Length() > 0 && !info[0].IsNull() && !info[0].IsUndefined()) {
      if (!dropped_total_) ThrowArgument(a.Env(), a.Op(), "droppedInto: this program has no combine");
      if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_bigint64_array || info[0].As<Napi::TypedArray>().ElementLength() != 1)
        ThrowArgument(a.Env(), a.Op(), "droppedInto: expected a BigInt64Array of 1 element");
      Napi::TypedArray t = info[0].As<Napi::TypedArray>();
      if (napi_get_typedarray_info(a.Env(), t, nullptr, nullptr, &dropped_into, nullptr, nullptr) != napi_ok)
        ThrowArgument(a.Env(), a.Op(), "droppedInto: cannot read the typed array's memory");
      pins.push_back(Napi::Persistent(static_cast<Napi::Object>(t)));  // an output only the caller holds
    }
    Bind(a, info, 1, inputs_);

    StreamState& st = *stream_;
    cudaError_t err = cudaSetDevice(st.device);
    int32_t status = err != cudaSuccess ? -int32_t(err) : int32_t(SMLA_OK);
    ReadSlot slot;
    bool reading = false;
    for (size_t i = 0; i < head_.size() && status == SMLA_OK; ++i) status = Timed(st, head_[i]);
    if (status == SMLA_OK && dropped_into) {
      // the 8-byte total into a pinned slot, right behind the combine (ahead of the prefill)
      err = st.TakeReadSlot(&slot);
      if (err == cudaSuccess) {
        reading = true;
        err = cudaMemcpyAsync(slot.host, dropped_total_(), 8, cudaMemcpyDeviceToHost, st.stream);
        if (err == cudaSuccess) err = cudaEventRecord(slot.landed, st.stream);
      }
      if (err != cudaSuccess) status = -int32_t(err);
    }
    if (status != SMLA_OK) {
      cudaGetLastError();
      Unbind();
      state_ = State::kFailed;
      failure_ = status;
    } else {
      state_ = State::kRan;
    }
    if (!reading) return SettledPromise(a.Env(), a.Op(), status);
    StreamRef s = stream_;
    return Queue(a, std::move(pins), [s, slot, status, dropped_into]() -> int32_t {
      cudaError_t e = cudaSetDevice(s->device);
      if (e == cudaSuccess) e = cudaEventSynchronize(slot.landed);
      if (e == cudaSuccess && status == SMLA_OK) std::memcpy(dropped_into, slot.host, 8);
      s->GiveBackReadSlot(slot);
      if (e != cudaSuccess) cudaGetLastError();
      return status != SMLA_OK ? status : e == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(e);
    });
  }

  Napi::Value Finish(const Napi::CallbackInfo& info) {
    Args a(info, "layerProgram.finish");
    if (state_ == State::kFailed) {
      state_ = State::kIdle;
      return SettledPromise(a.Env(), a.Op(), failure_);
    }
    if (state_ != State::kRan) ThrowArgument(a.Env(), a.Op(), "finish without a run before it");
    if (info.Length() < 1 || !info[0].IsNumber()) {
      Unbind();
      ThrowArgument(a.Env(), a.Op(), "smScale: expected a number");
    }
    prefill_->params.sm_scale = info[0].As<Napi::Number>().FloatValue();
    Bind(a, info, 1, outputs_);
    StreamState& st = *stream_;
    cudaError_t err = cudaSetDevice(st.device);
    int32_t status = err != cudaSuccess ? -int32_t(err) : Timed(st, [call = prefill_](cudaStream_t s) { return smla_cuda_sparse_prefill(call->Bound(), s); });
    if (status != SMLA_OK) cudaGetLastError();
    Unbind();
    return SettledPromise(a.Env(), a.Op(), status);
  }

  Napi::Value Abandon(const Napi::CallbackInfo& info) {
    Unbind();
    return info.Env().Undefined();
  }

  StreamRef stream_;
  std::vector<std::function<int32_t(cudaStream_t)>> head_;  // the dequants, then the combine
  std::vector<Slot> inputs_, outputs_;
  std::function<const void*()> dropped_total_;
  std::shared_ptr<DeviceCall<smla_sparse_prefill_params>> prefill_;
  State state_ = State::kIdle;
  int32_t failure_ = SMLA_OK;
};

Napi::Value NewLayerProgramClass(const Napi::CallbackInfo& info) { return LayerProgram::Class(info.Env()); }

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
