// The `cuda` backend's streams, device buffers and operands, and how an op runs on its stream
// (the per-op bindings are in cuda_ops.cpp).
//
// Streams: each engine owns a Stream bound to one device (`new ops.Stream(device)`); every op and
// every device buffer names its stream, so engines on different devices run at the same time and
// never share a stream or a lock. Every CUDA call is preceded by cudaSetDevice(stream's device) on
// the thread that makes it.
//
// When an op's operands all live on the device it is enqueued on its stream right away, on the
// calling (JS) thread, and its promise is settled at once: device work is stream-ordered, nothing
// waits for the GPU, and a later download (or stream.synchronize()) sees its results. An op with a
// host operand runs on a libuv pool thread instead: it stages host inputs on the device, launches,
// copies host outputs back, frees the temporaries and waits for that work (not for work queued
// after it), so its promise resolves when the host outputs are in place and the event loop never
// waits. A download of at most kSmallReadBytes is queued on the calling thread into a pinned read
// slot (exactly where the caller asked in stream order), and a pool thread waits for its event.
//
// Timing: with setTiming(true) (benchmarks), CUDA events bracket each launch (not the staging
// copies) and takeKernelMs(stream) waits for them and returns their device times; otherwise no
// events are created.
//
// Errors: a failing CUDA call returns -(cudaError_t) (the promise rejects with code SMLA_CUDA_ERROR
// and "cudaErrorX: message"); temporaries are freed and the non-sticky error cleared, so the next
// call starts clean. A sticky error (a kernel fault) would poison the context; the kernels are
// written never to fault on any index value (SPEC §5), and shapes are checked here.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "addon.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

// ---- streams ------------------------------------------------------------------------------------

// A pinned host buffer of kSmallReadBytes and an event: where a small device-to-host read lands
// (download of at most kSmallReadBytes, e.g. a c4 layer's dropped total) and when it has.
struct ReadSlot {
  void* host = nullptr;
  cudaEvent_t landed = nullptr;
  cudaEvent_t fork = nullptr;  // an aside read's start in the stream (ForkSmallRead)
};
constexpr uint64_t kSmallReadBytes = 256;

struct StreamState {
  int device = 0;
  cudaStream_t stream = nullptr;
  // events around each launch since the last takeKernelMs (setTiming(true)); guarded by `mutex`
  std::mutex mutex;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> timed;

  // Read slots not in use, made on first need: each read in flight holds its own, so reads queued
  // back to back (two layers in flight) never share one.
  cudaError_t TakeReadSlot(ReadSlot* slot);
  void GiveBackReadSlot(ReadSlot slot);
  // The stream aside reads are copied on (made on first need), or a cudaError_t.
  cudaError_t SideStream(cudaStream_t* side);

  ~StreamState();

 private:
  std::mutex slots_mutex_;
  std::vector<ReadSlot> free_slots_;  // capacity >= slots_made_: giving one back (on a pool thread) allocates nothing
  size_t slots_made_ = 0;
  cudaStream_t side_ = nullptr;
};
using StreamRef = std::shared_ptr<StreamState>;

// A small device-to-host read in flight: its pinned slot and how many bytes it reads.
struct SmallReadSlot {
  ReadSlot slot;
  uint64_t bytes = 0;
};

// Queues a read of `bytes` (at most kSmallReadBytes) from device memory `src` into a pinned slot of
// `s`, on the calling thread, so it sits in the stream exactly where it is queued; a cudaError_t
// (the slot already given back, the error cleared, when it fails).
cudaError_t QueueSmallRead(StreamState& s, const void* src, uint64_t bytes, SmallReadSlot* read);

// An aside read, in two steps so that launches can be queued between them and the stream's next
// launch does not wait for the copy: ForkSmallRead takes a slot and marks the read's place in the
// stream (one event record); CopyForkedRead queues the copy of `bytes` from `src` on the side stream
// from that place, whatever was queued on the stream in between. The caller then queues
// JoinSmallRead (work queued later waits for the copy, and may overwrite or free its source). Each
// a cudaError_t; a failed step gives the slot back and clears the error.
cudaError_t ForkSmallRead(StreamState& s, uint64_t bytes, SmallReadSlot* read);
cudaError_t CopyForkedRead(StreamState& s, const void* src, SmallReadSlot* read);

// The stream waits for an aside read (ForkSmallRead, CopyForkedRead) before its next work; a cudaError_t.
cudaError_t JoinSmallRead(StreamState& s, const SmallReadSlot& read);

// The promise of a queued small read: a pool thread waits for it to land, copies its bytes to
// `data` and gives the slot back. `status`: a failure of the work queued with the read (it then
// settles with that, `data` untouched); `keep`: whatever must live until then.
Napi::Promise AwaitSmallRead(Args& a, std::vector<Napi::ObjectReference> pins, StreamRef s, SmallReadSlot read, void* data, int32_t status,
                             std::shared_ptr<void> keep = nullptr);

// cudaStreamQuery of `s` on its device: cudaSuccess when idle, cudaErrorNotReady (cleared, not an
// error) while work runs, or the stream's error (cleared for the next call).
cudaError_t QueryIdle(const StreamState& s);

// Argument i as a Stream (the engine's), or a thrown argument error.
StreamRef StreamArg(const Napi::CallbackInfo& info, size_t i, const char* op);

// ---- device buffers -------------------------------------------------------------------------------

// One stream-ordered allocation on its stream's device; freed (stream-ordered, so after every op
// queued before) when the last owner lets go: the DeviceBuffer (free() or its finalizer) or an op
// still using it.
struct Allocation {
  void* ptr = nullptr;
  uint64_t bytes = 0;
  StreamRef stream;
  // set for a view (several outputs of one call in one allocation): ptr lies inside base's memory,
  // which base frees once it and every view of it have let go
  std::shared_ptr<Allocation> base;
  ~Allocation();
};

// The allocation of a DeviceBuffer value on stream s's device, or a thrown argument error.
std::shared_ptr<Allocation> BufferOf(Args& a, Napi::Value value, const std::string& name, const StreamState& s);

// `bytes` of s's device memory, stream-ordered (cudaMallocAsync on s from the device's default
// pool): what `new DeviceBuffer(bytes, stream)` allocates, and a layer program its outputs. The
// cudaError_t (cleared) when it fails.
cudaError_t Allocate(const StreamRef& s, uint64_t bytes, std::shared_ptr<Allocation>* out);

// `bytes` at byte_offset inside base (which the caller checked it fits): no CUDA call; the view
// holds base's memory.
std::shared_ptr<Allocation> ViewOf(const std::shared_ptr<Allocation>& base, uint64_t byte_offset, uint64_t bytes);

// A DeviceBuffer (the JS object) owning `a`: how an op hands memory it allocated to the caller.
Napi::Object NewDeviceBuffer(Napi::Env env, std::shared_ptr<Allocation> a);

// ---- operands: a host typed array or a DeviceBuffer ---------------------------------------------

struct Operand {
  void* host = nullptr;                // host data (an owned copy, shared memory or an output array), or null
  std::shared_ptr<void> keep;          // owns `host` when the op built it (lives as long as the operand)
  std::shared_ptr<Allocation> device;  // or a device buffer
  uint64_t bytes = 0;
  bool output = false;
  const char* name = nullptr;  // the params field it was read from
  void* temp = nullptr;        // staged copy of host data on the device
  void* Ptr() const { return device ? device->ptr : temp; }
  bool OnHost() const { return !device && host && bytes > 0; }
};

// The array fields of a device op's params struct, each bound to its operand: at launch a field
// gets the operand's device pointer (the buffer's own, or the staged copy of a host array) plus a
// byte offset. Also keeps the host arrays a launcher walks on the host as long as the launch.
class DeviceBindings {
 public:
  template <class T>
  void Bind(T*& field, std::shared_ptr<Operand> operand, uint64_t byte_offset = 0) {
    field = nullptr;
    set_.push_back([&field, operand, byte_offset] {
      field = static_cast<T*>(static_cast<void*>(static_cast<uint8_t*>(operand->Ptr()) + byte_offset));
    });
  }
  void Keep(std::shared_ptr<void> data) { keep_.push_back(std::move(data)); }
  void Apply() const {
    for (auto& set : set_) set();
  }

 private:
  std::vector<std::function<void()>> set_;
  std::vector<std::shared_ptr<void>> keep_;
};

// What a device op's launch holds: its params struct (sparse_mla.h) and the struct's bindings.
// Held by a shared_ptr and never moved: the bindings point into `params`.
template <class Params>
struct DeviceCall {
  Params params{};
  DeviceBindings bindings;
  // The struct with every array field pointing at its operand's device memory (after staging).
  const Params* Bound() {
    bindings.Apply();
    return &params;
  }
};

// A device op's params object (argument i), read by the op's binding file as Args::Fields is for
// the cpu ops: scalars alike; an array field is a host typed array (staged by the op) or a
// DeviceBuffer of this stream's device of exactly the bytes its scalars give, and is bound to its
// struct field (DeviceBindings); HostInput is a host array the launcher walks on the host, copied
// here on the calling thread. Reading collects the op's operands (in field order) and the pins of
// its DeviceBuffers, for Dispatch.
class CudaFields {
 public:
  CudaFields(Args& a, size_t i, const StreamState& s, DeviceBindings& bindings) : CudaFields(a, a.Object(i, "params"), s, bindings) {}
  // A nested params object (one part of an op made of several ops' params).
  CudaFields(Args& a, Args::Fields fields, const StreamState& s, DeviceBindings& bindings) : a_(a), f_(fields), s_(s), bindings_(bindings) {}

  int32_t Int(const char* name, int64_t lo, int64_t hi) const { return f_.Int(name, lo, hi); }
  float Float(const char* name) const { return f_.Float(name); }
  bool IsNull(const char* name) const { return f_.IsNull(name); }
  // Whether the field holds a DeviceBuffer (any object that is not a typed array).
  bool OnDevice(const char* name) const;
  [[noreturn]] void Refuse(const std::string& message) const { f_.Refuse(message); }

  template <class T>
  void Input(const T*& field, const char* name, napi_typedarray_type type, uint64_t length, bool nullable = false) {
    bindings_.Bind(field, Read(name, type, sizeof(T), length, false, nullable));
  }
  template <class T>
  void Output(T*& field, const char* name, napi_typedarray_type type, uint64_t length, bool nullable = false) {
    bindings_.Bind(field, Read(name, type, sizeof(T), length, true, nullable));
  }
  template <class T>
  void HostInput(const T*& field, const char* name, napi_typedarray_type type, uint64_t length) {
    const T* data = HostArray<T>(name, type, length);
    auto copy = std::make_shared<std::vector<T>>(data, data + length);
    bindings_.Keep(copy);
    field = copy->data();
  }
  // A host typed array's data (Args' rules: an owned copy or shared memory).
  template <class T>
  const T* HostArray(const char* name, napi_typedarray_type type, uint64_t length) {
    const T* data = nullptr;
    f_.Input(data, name, type, length);
    return data;
  }

  // Field `name` as an operand of `count` elements of `elem` bytes, added to the op's operands.
  std::shared_ptr<Operand> Read(const char* name, napi_typedarray_type type, uint64_t elem, uint64_t count, bool output,
                                bool nullable = false);
  // Field `name` as a DeviceBuffer of this stream's device (any size), pinned.
  std::shared_ptr<Allocation> Buffer(const char* name);
  // An operand the op built itself, added to its operands.
  void Add(std::shared_ptr<Operand> operand) { operands_.push_back(std::move(operand)); }

  // Output fields bound by the caller per call instead (a layer program's prefill outputs, which
  // each run allocates): each must be null here and becomes an operand of its size, no memory yet.
  void OutputsBoundLater() { outputs_later_ = true; }

  Args& args() const { return a_; }
  // References that keep its DeviceBuffers' JS objects alive while a pool thread runs the op; made
  // only for that path (an op enqueued at once needs none, and making them costs host time).
  std::vector<Napi::ObjectReference> TakePins() {
    std::vector<Napi::ObjectReference> pins;
    pins.reserve(buffers_.size());
    for (const Napi::Object& b : buffers_) pins.push_back(Napi::Persistent(b));
    buffers_.clear();
    return pins;
  }
  std::vector<std::shared_ptr<Operand>> TakeOperands() { return std::move(operands_); }

 private:
  Args& a_;
  Args::Fields f_;
  const StreamState& s_;
  DeviceBindings& bindings_;
  std::vector<Napi::Object> buffers_;  // the DeviceBuffer fields' objects (handles of this call)
  std::vector<std::shared_ptr<Operand>> operands_;
  bool outputs_later_ = false;
};

// ---- running an op on its stream -----------------------------------------------------------------

// Stages every host operand on the device (inputs copied H2D); returns a cudaError_t.
cudaError_t Stage(std::vector<Operand*> const& ops, cudaStream_t s);

// Waits until the work queued on `s` so far is done (an event: work queued later, e.g. by the JS
// thread meanwhile, is not waited for).
cudaError_t WaitForQueued(cudaStream_t s);

// Copies host outputs back (when the launch succeeded), frees the temporaries, waits for them
// (WaitForQueued); the first error wins and a non-sticky one is cleared for the next call.
int32_t Finish(std::vector<Operand*> const& ops, cudaStream_t s, int32_t status);

// setTiming's state: CUDA events around every launch (benchmarks).
bool TimingOn();

// launch(stream) between two fresh events when timing is on (benchmarks), kept for takeKernelMs.
template <class Launch>
int32_t Timed(StreamState& s, Launch launch) {
  if (!TimingOn()) return launch(s.stream);
  std::lock_guard<std::mutex> lock(s.mutex);
  cudaEvent_t b = nullptr, e = nullptr;
  if (cudaEventCreate(&b) != cudaSuccess || cudaEventCreate(&e) != cudaSuccess) {
    if (b) cudaEventDestroy(b);
    cudaGetLastError();
    return launch(s.stream);
  }
  cudaEventRecord(b, s.stream);
  const int32_t status = launch(s.stream);
  cudaEventRecord(e, s.stream);
  s.timed.emplace_back(b, e);
  return status;
}

// body() on a libuv pool thread; the promise settles with its status. Holds the call's pins and
// input copies until then.
Napi::Promise Queue(Args& a, std::vector<Napi::ObjectReference> pins, std::function<int32_t()> body);

// Makes `s` wait for the work queued so far on the stream of every device operand allocated by
// another engine's stream (same device).
cudaError_t WaitForOwners(std::vector<std::shared_ptr<Operand>> const& ops, const StreamState& s);

// Whether an op with these operands is enqueued on the calling thread (all on the device, all
// allocated on stream s).
inline bool RunsHere(std::vector<std::shared_ptr<Operand>> const& ops, const StreamRef& s) {
  return std::none_of(ops.begin(), ops.end(), [&](const std::shared_ptr<Operand>& o) { return o->OnHost() || (o->device && o->device->stream != s); });
}

// The launch enqueued here and now; its promise settled at once. No pins: the allocations are
// held by the queued work's owners.
template <class Launch>
Napi::Promise LaunchHere(Args& a, StreamState& s, Launch& launch) {
  cudaError_t err = cudaSetDevice(s.device);
  int32_t status = err != cudaSuccess ? -int32_t(err) : Timed(s, launch);
  if (status != SMLA_OK) cudaGetLastError();
  return SettledPromise(a.Env(), a.Op(), status);
}

// The launch on a pool thread that holds the operands until the stream is done: staging, the
// owners' streams awaited, launch, `after`, host outputs back, sync.
template <class Launch>
Napi::Promise LaunchOnPool(Args& a, std::vector<Napi::ObjectReference> pins, StreamRef s, std::vector<std::shared_ptr<Operand>> ops,
                           Launch launch, std::function<int32_t(cudaStream_t)> after) {
  std::vector<Operand*> raw;  // made here: the pool thread allocates nothing to run it
  raw.reserve(ops.size());
  for (auto& o : ops) raw.push_back(o.get());
  return Queue(a, std::move(pins), [s, ops = std::move(ops), raw = std::move(raw), launch, after]() -> int32_t {
    cudaError_t err = cudaSetDevice(s->device);
    if (err != cudaSuccess) return -int32_t(err);
    err = Stage(raw, s->stream);
    if (err == cudaSuccess) err = WaitForOwners(ops, *s);
    int32_t status = err != cudaSuccess ? -int32_t(err) : Timed(*s, launch);
    if (status == SMLA_OK && after) status = after(s->stream);
    return Finish(raw, s->stream, status);
  });
}

// Runs one op on its stream. Every operand on the device and allocated on this stream: enqueued
// here and now, settled at once (a buffer freed later is freed in this stream's order, after the
// op). Otherwise on a pool thread (LaunchOnPool).
// `after` (pool path only) runs once the launch succeeded, outside its timing events: e.g. a flag
// read back.
template <class Launch>
Napi::Promise Dispatch(Args& a, std::vector<Napi::ObjectReference> pins, StreamRef s, std::vector<std::shared_ptr<Operand>> ops, Launch launch,
                       std::function<int32_t(cudaStream_t)> after = nullptr) {
  if (RunsHere(ops, s)) return LaunchHere(a, *s, launch);
  return LaunchOnPool(a, std::move(pins), std::move(s), std::move(ops), std::move(launch), std::move(after));
}

// A device op whose params object was read through `f`, as Dispatch; its buffers' pins are made
// only for the pool path.
template <class Launch>
Napi::Promise Dispatch(CudaFields& f, StreamRef s, Launch launch, std::function<int32_t(cudaStream_t)> after = nullptr) {
  std::vector<std::shared_ptr<Operand>> ops = f.TakeOperands();
  if (RunsHere(ops, s)) return LaunchHere(f.args(), *s, launch);
  return LaunchOnPool(f.args(), f.TakePins(), std::move(s), std::move(ops), std::move(launch), std::move(after));
}

// ---- the stream and buffer entries of the op table (cuda_stream.cpp) ----------------------------

Napi::Value Upload(const Napi::CallbackInfo& info);
Napi::Value Download(const Napi::CallbackInfo& info);
Napi::Value CopyDevice(const Napi::CallbackInfo& info);
Napi::Value CopyPeer(const Napi::CallbackInfo& info);
Napi::Value FillDevice(const Napi::CallbackInfo& info);
Napi::Value SetTiming(const Napi::CallbackInfo& info);
Napi::Value TakeKernelMs(const Napi::CallbackInfo& info);
Napi::Value TakeKernelSpans(const Napi::CallbackInfo& info);
Napi::Value MemInfo(const Napi::CallbackInfo& info);
Napi::Value NewDeviceBufferClass(const Napi::CallbackInfo& info);
Napi::Value NewStreamClass(const Napi::CallbackInfo& info);

}  // namespace smla_addon
