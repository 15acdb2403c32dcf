// The `cuda` backend's layer program: a layer's launches read once from the ops' params objects and
// queued per layer, by one call, over that layer's buffers: a workspace layer's (its dequants, c4
// combine and prefill) or a paged layer's (one paged attention over the plan's paged form). The TS
// side: CudaBackend.queueLayer and CudaBackend.queuePagedLayer (src/backends/native/cuda_backend.ts),
// LayerSteps.queueLayer and LayerSteps.pagedAttention.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cuda_ops.h"
#include "cuda_stream.h"
#include "paged_sparse_attention.h"
#include "planner.h"
#include "smla_cuda.h"
#include "sparse_prefill.h"

namespace smla_addon {
namespace {

// The outputs' allocation failed: out of memory rejects with code SMLA_OUT_OF_MEMORY (TOO_LARGE on
// the TS side, as a failed alloc() is), anything else as a launch's failure does.
Napi::Promise OutputsFailed(Napi::Env env, const char* op, cudaError_t err, uint64_t bytes) {
  Napi::Error e = Napi::Error::New(env, std::string(op) + ": the prefill's outputs (" + std::to_string(bytes) + " bytes): CUDA failed: " + CudaErrorText(err));
  e.Set("code", Napi::String::New(env, err == cudaErrorMemoryAllocation ? "SMLA_OUT_OF_MEMORY" : "SMLA_CUDA_ERROR"));
  e.Set("status", Napi::String::New(env, CudaErrorText(err)));
  Napi::Promise::Deferred d(env);
  d.Reject(e.Value());
  return d.Promise();
}

// layerProgramClass(): the LayerProgram class. `new LayerProgram(params, stream)` reads a workspace
// layer's launches from params = { planRows: planRows' params (a c4 combine into rows the plan
// keeps) or null, dequants: dequantizeKvCache's params (device ids, outRowOffset), prefill:
// sparsePrefill's params with out, maxLogits and lse null }, every array a device buffer of the
// stream, read and checked as the ops read them. `slots` names each buffer in reading order
// ("planRows.rows", "dequants.0.cache", ..., "prefill.q", ...). A layer is then one call, nothing
// read by name:
//   run(droppedInto, smScale, ...buffers): one buffer per slot, each of this stream and exactly the
//     size of the one it stands for, all checked before any launch; allocates the prefill's outputs
//     (one stream-ordered allocation, as a DeviceBuffer makes one, split at 256-byte boundaries),
//     queues the dequants (one launch, which also zeroes the combine's total and the prefill's tile
//     counter), the combine, the prefill and the read of the combine's dropped total into
//     droppedInto (a BigInt64Array(1), or null; copied beside the prefill, which does not wait for
//     it), all before it returns: between the layer's launches the host makes only their CUDA
//     calls. Returns { done, out, maxLogits,
//     lse }: the outputs (DeviceBuffers, views of the one allocation) once everything was queued,
//     else null (nothing kept); done settles once queued, or once the total has landed (the prefill
//     may still be running), and rejects with the first failure, when the caller frees the outputs.
// A paged layer's program reads params = { paged: pagedSparseAttention's params with out, maxLogits
// and lse null } instead (slots "paged.q", "paged.kCache", ...); its run(null, smScale, ...buffers)
// allocates the outputs the same way and queues the paged attention; done settles once queued.
// Between layers the program keeps no buffer.
class LayerProgram : public Napi::ObjectWrap<LayerProgram>, public TypedAllocation {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "LayerProgram", {InstanceAccessor<&LayerProgram::Slots>("slots"), InstanceMethod<&LayerProgram::Run>("run")});
  }

  explicit LayerProgram(const Napi::CallbackInfo& info) try : Napi::ObjectWrap<LayerProgram>(info) {
    Args args(info, "layerProgram");
    Args::Fields top = args.Object(0, "params");
    stream_ = StreamArg(info, 1, args.Op());
    std::vector<std::pair<std::string, std::shared_ptr<Operand>>> operands;
    auto collect = [&](CudaFields& f, const std::string& part) {
      for (auto& o : f.TakeOperands()) operands.emplace_back(part + "." + (o->name ? o->name : "?"), std::move(o));
    };
    if (!top.IsNull("paged")) {
      if (!top.IsNull("planRows") || !top.IsNull("dequants") || !top.IsNull("prefill"))
        top.Refuse("paged: a paged layer's program has no planRows, dequants or prefill");
      paged_ = std::make_shared<DeviceCall<smla_paged_sparse_attention_params>>();
      CudaFields f(args, top.Object("paged"), *stream_, paged_->bindings);
      f.OutputsBoundLater();  // each run allocates them
      paged_has_extra_ = !f.IsNull("extraKCache");
      ReadPagedSparseAttention(f, paged_->params);
      collect(f, "paged");
      Place(top, operands, "paged.");
      return;
    }
    if (!top.IsNull("planRows")) {
      auto call = std::make_shared<DeviceCall<smla_plan_combine_topk_params>>();
      CudaFields f(args, top.Object("planRows"), *stream_, call->bindings);
      int64_t num_queries = 0;
      ReadPlanRows(f, call->params, &num_queries);
      if (f.IsNull("droppedTotal")) f.Refuse("planRows.droppedTotal: a combine in a layer program sums its dropped count on the device");
      collect(f, "planRows");
      // its total is zeroed by the dequants' launch before it (Run)
      combine_ = [call, num_queries](cudaStream_t s) { return smla_cuda_plan_rows(call->Bound(), num_queries, /*total_zeroed=*/1, s); };
      dropped_total_ = [call]() -> void* { return call->Bound()->dropped_total; };
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
      dequants_.push_back(call);
    }
    if (dequants_.size() > 2) top.Refuse("dequants: a layer has at most two (its compressed rows and its SWA rows)");
    prefill_ = std::make_shared<DeviceCall<smla_sparse_prefill_params>>();
    {
      CudaFields f(args, top.Object("prefill"), *stream_, prefill_->bindings);
      f.OutputsBoundLater();  // each run allocates them
      ReadSparsePrefill(f, prefill_->params);
      collect(f, "prefill");
    }
    Place(top, operands, "prefill.");
  } catch (const std::bad_alloc&) {
    throw OutOfMemoryError(info.Env(), "layerProgram");
  }

 private:
  struct Slot {
    std::string name;
    std::shared_ptr<Operand> operand;
    uint64_t bytes;
    uint64_t offset;  // an output's, in the outputs' allocation
  };

  // The operands read as slots: the attention part's outputs (names starting with `outputs_of`)
  // placed in the outputs' allocation, every other one an input slot of the device.
  void Place(const Args::Fields& top, std::vector<std::pair<std::string, std::shared_ptr<Operand>>>& operands, const char* outputs_of) {
    for (auto& [name, o] : operands) {
      if (o->output && name.rfind(outputs_of, 0) == 0) {
        // out, maxLogits, lse in reading order, each at a 256-byte boundary of the one allocation
        outputs_.push_back({name, o, o->bytes, output_bytes_});
        output_bytes_ += (o->bytes + 255) / 256 * 256;
        continue;
      }
      if (!o->device) {
        if (o->bytes == 0) continue;  // an absent optional array (a null sink, say): stays absent
        top.Refuse(name + ": expected a device buffer (a layer program queues device work only)");
      }
      if (o->device->stream != stream_) top.Refuse(name + ": a buffer of another engine's stream");
      inputs_.push_back({name, o, o->device->bytes, 0});
      o->device.reset();  // each layer binds its own
    }
  }

  Napi::Value Slots(const Napi::CallbackInfo& info) try {
    Napi::Array names = Napi::Array::New(info.Env(), inputs_.size());
    for (uint32_t i = 0; i < inputs_.size(); ++i) names.Set(i, Napi::String::New(info.Env(), inputs_[i].name));
    return names;
  } catch (const std::bad_alloc&) {
    throw OutOfMemoryError(info.Env(), "layerProgram.slots");
  }

  void Unbind() {
    for (Slot& s : inputs_) s.operand->device.reset();
    for (Slot& s : outputs_) s.operand->device.reset();
  }

  // Binds each input slot to info[first + i], each checked; unbinds everything on a bad one.
  void Bind(Args& a, const Napi::CallbackInfo& info, size_t first) {
    if (info.Length() != first + inputs_.size())
      ThrowArgument(a.Env(), a.Op(), "expected " + std::to_string(first + inputs_.size()) + " arguments, got " + std::to_string(info.Length()));
    try {
      for (size_t i = 0; i < inputs_.size(); ++i) {
        Slot& slot = inputs_[i];
        std::shared_ptr<Allocation> b = BufferOf(a, info[first + i], slot.name, *stream_);
        if (b->stream != stream_) ThrowArgument(a.Env(), a.Op(), slot.name + ": a buffer of another engine's stream");
        if (b->bytes != slot.bytes)
          ThrowArgument(a.Env(), a.Op(), slot.name + ": expected a device buffer of " + std::to_string(slot.bytes) + " bytes, got " + std::to_string(b->bytes));
        slot.operand->device = std::move(b);
      }
    } catch (...) {
      Unbind();
      throw;
    }
  }

  Napi::Value Run(const Napi::CallbackInfo& info) try {
    Args a(info, "layerProgram.run");
    Napi::Env env = a.Env();
    void* dropped_into = nullptr;
    std::vector<Napi::ObjectReference> pins;
    if (info.Length() > 0 && !info[0].IsNull() && !info[0].IsUndefined()) {
      if (!dropped_total_) ThrowArgument(env, a.Op(), "droppedInto: this program has no combine");
      if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_bigint64_array || info[0].As<Napi::TypedArray>().ElementLength() != 1)
        ThrowArgument(env, a.Op(), "droppedInto: expected a BigInt64Array of 1 element");
      Napi::TypedArray t = info[0].As<Napi::TypedArray>();
      if (napi_get_typedarray_info(env, t, nullptr, nullptr, &dropped_into, nullptr, nullptr) != napi_ok)
        ThrowArgument(env, a.Op(), "droppedInto: cannot read the typed array's memory");
      pins.push_back(Napi::Persistent(static_cast<Napi::Object>(t)));  // an output only the caller holds
    }
    if (info.Length() < 2 || !info[1].IsNumber()) ThrowArgument(env, a.Op(), "smScale: expected a number");
    (paged_ ? paged_->params.sm_scale : prefill_->params.sm_scale) = info[1].As<Napi::Number>().FloatValue();
    Bind(a, info, 2);

    StreamState& st = *stream_;
    cudaError_t err = cudaSetDevice(st.device);
    int32_t status = err != cudaSuccess ? -int32_t(err) : int32_t(SMLA_OK);
    // The outputs first (one stream-ordered allocation, with the prefill's tile counter after them),
    // so that the dequants' launch zeroes the counter and the combine's total: between the first
    // launch and the prefill's the host then makes only the combine's launch and one event record.
    std::shared_ptr<Allocation> whole;
    cudaError_t alloc_err = cudaSuccess;
    if (status == SMLA_OK && (alloc_err = Allocate(stream_, output_bytes_ + (paged_ ? 0 : kCounterBytes), &whole)) != cudaSuccess) status = -int32_t(alloc_err);
    unsigned long long* claims = nullptr;
    if (status == SMLA_OK) {
      for (Slot& s : outputs_) s.operand->device = ViewOf(whole, s.offset, s.bytes);
      if (!paged_) claims = reinterpret_cast<unsigned long long*>(static_cast<uint8_t*>(whole->ptr) + output_bytes_);
    }
    SmallReadSlot read;
    bool reading = false;
    if (paged_) {
      if (status == SMLA_OK) status = Timed(st, [this](cudaStream_t s) { return LaunchPagedSparseAttention(*paged_->Bound(), paged_has_extra_, s); });
    } else {
      status = QueueWorkspaceLayer(st, status, claims, dropped_into, &read, &reading);
    }
    if (status != SMLA_OK) cudaGetLastError();
    std::vector<std::shared_ptr<Allocation>> outputs;
    if (status == SMLA_OK)
      for (Slot& s : outputs_) outputs.push_back(s.operand->device);
    Unbind();
    whole.reset();  // the views hold it; after a failure, freed behind what was queued

    Napi::Object result = Napi::Object::New(env);
    result.Set("done", alloc_err != cudaSuccess ? OutputsFailed(env, a.Op(), alloc_err, output_bytes_)
                       : reading                ? AwaitSmallRead(a, std::move(pins), stream_, read, dropped_into, status)
                                                : SettledPromise(env, a.Op(), status));
    for (size_t i = 0; i < outputs_.size(); ++i)
      result.Set(outputs_[i].operand->name, outputs.empty() ? env.Null() : Napi::Value(NewDeviceBuffer(env, std::move(outputs[i]))));
    return result;
  } catch (const std::bad_alloc&) {
    Unbind();  // (the layer's buffers are not held until the next run)
    throw OutOfMemoryError(info.Env(), "layerProgram.run");
  }

  // A workspace layer's launches after its outputs' allocation (status: how that went): the
  // dequants (one launch, which also zeroes the prefill's tile counter `claims` and the combine's
  // total), the combine, the read of its total into dropped_into (when given: *reading then tells
  // whether it was queued), the prefill. Returns the first failure.
  int32_t QueueWorkspaceLayer(StreamState& st, int32_t status, unsigned long long* claims, void* dropped_into, SmallReadSlot* read_out,
                              bool* reading_out) {
    cudaError_t err = cudaSuccess;
    unsigned long long* zero[2] = {claims, dropped_total_ ? static_cast<unsigned long long*>(dropped_total_()) : nullptr};
    const int32_t zero_count = dropped_total_ ? 2 : 1;
    if (status == SMLA_OK) {
      const auto* a = dequants_.size() > 0 ? dequants_[0]->Bound() : nullptr;
      const auto* b = dequants_.size() > 1 ? dequants_[1]->Bound() : nullptr;
      // (no dequant: the pair launcher zeroes the words by memsets)
      status = Timed(st, [&](cudaStream_t s) { return smla_cuda_dequantize_kv_cache_pair(a, nullptr, b, nullptr, zero, zero_count, s); });
    }
    if (status == SMLA_OK && combine_) status = Timed(st, combine_);
    // the 8-byte total read from right behind the combine on the side stream: the prefill does not
    // wait for the copy (its DMA left a gap of about 8 µs before the prefill in the stream); work
    // queued after the prefill does (JoinSmallRead), so the next layer's combine cannot overwrite
    // the total first. Only the read's place is marked before the prefill's launch; the copy is
    // queued behind it.
    SmallReadSlot& read = *read_out;
    bool& reading = *reading_out;
    if (status == SMLA_OK && dropped_into) {
      if ((err = ForkSmallRead(st, 8, &read)) != cudaSuccess) status = -int32_t(err);
      reading = err == cudaSuccess;
    }
    if (status == SMLA_OK)
      status = Timed(st, [call = prefill_, claims](cudaStream_t s) { return smla_cuda_sparse_prefill(call->Bound(), claims, s); });
    if (reading && (err = CopyForkedRead(st, dropped_total_(), &read)) != cudaSuccess) {
      reading = false;
      if (status == SMLA_OK) status = -int32_t(err);
    }
    if (reading && (err = JoinSmallRead(st, read)) != cudaSuccess && status == SMLA_OK) status = -int32_t(err);
    return status;
  }

  static constexpr uint64_t kCounterBytes = 256;  // the prefill's tile counter, after the outputs

  StreamRef stream_;
  std::vector<std::shared_ptr<DeviceCall<smla_dequantize_kv_cache_params>>> dequants_;  // at most two, one launch
  std::function<int32_t(cudaStream_t)> combine_;  // none without planRows
  std::vector<Slot> inputs_, outputs_;
  uint64_t output_bytes_ = 0;  // the outputs' allocation
  std::function<void*()> dropped_total_;
  std::shared_ptr<DeviceCall<smla_sparse_prefill_params>> prefill_;
  std::shared_ptr<DeviceCall<smla_paged_sparse_attention_params>> paged_;  // a paged layer's program instead
  bool paged_has_extra_ = false;
};

}  // namespace

Napi::Value NewLayerProgramClass(const Napi::CallbackInfo& info) { return LayerProgram::Class(info.Env()); }

}  // namespace smla_addon
