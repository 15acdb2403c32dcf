// The `cuda` backend's layer program: a workspace layer's launches (its dequants, c4 combine and
// prefill) read once from the ops' params objects and queued per layer over that layer's buffers.
// The TS side: CudaBackend.queueLayer (src/backends/native/cuda_backend.ts), LayerSteps.queueLayer.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cuda_ops.h"
#include "cuda_stream.h"
#include "planner.h"
#include "smla_cuda.h"
#include "sparse_prefill.h"

namespace smla_addon {
namespace {

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
    for (size_t i = 0; i < head_.size() && status == SMLA_OK; ++i) status = Timed(st, head_[i]);
    // the 8-byte total right behind the combine (ahead of the prefill), as a small download reads
    SmallReadSlot read;
    const bool reading = status == SMLA_OK && dropped_into;
    if (reading && (err = QueueSmallRead(st, dropped_total_(), 8, &read)) != cudaSuccess) status = -int32_t(err);
    if (status != SMLA_OK) {
      cudaGetLastError();
      Unbind();
      state_ = State::kFailed;
      failure_ = status;
    } else {
      state_ = State::kRan;
    }
    if (!reading || status != SMLA_OK) return SettledPromise(a.Env(), a.Op(), status);
    return AwaitSmallRead(a, std::move(pins), stream_, read, dropped_into, status);
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

}  // namespace

Napi::Value NewLayerProgramClass(const Napi::CallbackInfo& info) { return LayerProgram::Class(info.Env()); }

}  // namespace smla_addon
