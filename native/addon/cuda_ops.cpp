// The `cuda` backend's ops (native/cuda kernels, host API smla_cuda.h), device buffers and streams.
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
// copies host outputs back, frees the temporaries and synchronizes, so its promise resolves when
// the host outputs are in place and the event loop never waits.
//
// Timing: with setTiming(true) (benchmarks), CUDA events bracket each launch (not the staging
// copies) and takeKernelMs(stream) waits for them and returns their device times; otherwise no
// events are created.
//
// Errors: a failing CUDA call returns -(cudaError_t) (the promise rejects with code SMLA_CUDA_ERROR
// and "cudaErrorX: message"); temporaries are freed and the non-sticky error cleared, so the next
// call starts clean. A sticky error (a kernel fault) would poison the context; the kernels are
// written never to fault on any index value (SPEC §5), and shapes are checked here.
// The argument order is mirrored by src/backends/native/binding.ts (NativeCudaOps).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "addon.h"
#include "smla_cuda.h"
#include "sparse_mla/kv_cache_layout.h"

namespace smla_addon {
namespace {

constexpr int64_t kI32Max = INT32_MAX;
// Stands in for a cache of 0 pages (no memory): every id into it is invalid, so it is never read.
alignas(16) const uint8_t kNothing[16] = {};

std::atomic<bool> g_timing{false};

// ---- streams ------------------------------------------------------------------------------------

struct StreamState {
  int device = 0;
  cudaStream_t stream = nullptr;
  // events around each launch since the last takeKernelMs (setTiming(true)); guarded by `mutex`
  std::mutex mutex;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> timed;

  ~StreamState() {
    if (cudaSetDevice(device) != cudaSuccess) return;
    for (auto& t : timed) cudaEventDestroy(t.first), cudaEventDestroy(t.second);
    if (stream && cudaStreamDestroy(stream) != cudaSuccess) cudaGetLastError();
  }
};
using StreamRef = std::shared_ptr<StreamState>;

// A device's default memory pool keeps freed blocks cached (release threshold: unlimited), so
// per-call temporaries do not go back to the driver every time. Once per device.
void KeepPoolCached(int device) {
  static std::mutex m;
  static std::vector<bool> done;
  std::lock_guard<std::mutex> lock(m);
  if (size_t(device) < done.size() && done[size_t(device)]) return;
  if (done.size() <= size_t(device)) done.resize(size_t(device) + 1, false);
  cudaMemPool_t pool;
  if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
    uint64_t threshold = UINT64_MAX;
    cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
  }
  cudaGetLastError();
  done[size_t(device)] = true;
}

const napi_type_tag kStreamTag = {0x3b7e1c55a9d24f60ULL, 0x91ac4e0f7d2b6c38ULL};

class Stream : public Napi::ObjectWrap<Stream> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "Stream", {InstanceAccessor<&Stream::Device>("device"), InstanceMethod<&Stream::Synchronize>("synchronize")});
  }

  // new Stream(device): a non-blocking stream on that device.
  explicit Stream(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Stream>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) ThrowArgument(env, "stream", "device: expected a device index");
    const int device = info[0].As<Napi::Number>().Int32Value();
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err == cudaSuccess && (device < 0 || device >= count)) err = cudaErrorInvalidDevice;
    auto s = std::make_shared<StreamState>();
    s->device = device;
    if (err == cudaSuccess) err = cudaSetDevice(device);
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      s->stream = nullptr;
      cudaGetLastError();
      Napi::Error e = Napi::Error::New(env, "stream: CUDA failed on device " + std::to_string(device) + ": " + CudaErrorText(err));
      e.Set("code", Napi::String::New(env, "SMLA_CUDA_ERROR"));
      e.Set("status", Napi::String::New(env, CudaErrorText(err)));
      throw e;
    }
    KeepPoolCached(device);
    state_ = std::move(s);
    info.This().As<Napi::Object>().TypeTag(&kStreamTag);
  }

  StreamRef Get() const { return state_; }

 private:
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), state_->device); }
  // synchronize(): resolves once every op queued on the stream has finished (a pool thread waits).
  Napi::Value Synchronize(const Napi::CallbackInfo& info);

  StreamRef state_;
};

StreamRef StreamArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (i >= info.Length() || !info[i].IsObject() || !info[i].As<Napi::Object>().CheckTypeTag(&kStreamTag))
    ThrowArgument(info.Env(), op, "stream: expected a Stream (the engine's)");
  return Stream::Unwrap(info[i].As<Napi::Object>())->Get();
}

// ---- device buffers -------------------------------------------------------------------------------

// One stream-ordered allocation on its stream's device; freed (stream-ordered, so after every op
// queued before) when the last owner lets go: the DeviceBuffer (free() or its finalizer) or an op
// still using it.
struct Allocation {
  void* ptr = nullptr;
  uint64_t bytes = 0;
  StreamRef stream;
  ~Allocation() {
    if (ptr && cudaSetDevice(stream->device) == cudaSuccess) {
      if (cudaFreeAsync(ptr, stream->stream) != cudaSuccess) cudaGetLastError();  // e.g. at process exit
    }
  }
};

const napi_type_tag kDeviceBufferTag = {0x5a1f0c3e9b2d4e71ULL, 0x8c6a3f1d2e4b5a90ULL};

class DeviceBuffer : public Napi::ObjectWrap<DeviceBuffer> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "DeviceBuffer",
                       {InstanceAccessor<&DeviceBuffer::ByteLength>("byteLength"), InstanceAccessor<&DeviceBuffer::Device>("device"),
                        InstanceAccessor<&DeviceBuffer::Freed>("freed"), InstanceMethod<&DeviceBuffer::Free>("free")});
  }

  // new DeviceBuffer(bytes, stream): cudaMallocAsync on the stream (usable by every later call on it).
  explicit DeviceBuffer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceBuffer>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) ThrowArgument(env, "alloc", "bytes: expected a number");
    const double b = info[0].As<Napi::Number>().DoubleValue();
    if (!(b >= 0 && b <= 9007199254740991.0) || b != double(int64_t(b))) ThrowArgument(env, "alloc", "bytes: expected a non-negative integer");
    auto a = std::make_shared<Allocation>();
    a->bytes = uint64_t(b);
    a->stream = StreamArg(info, 1, "alloc");
    cudaError_t err = cudaSetDevice(a->stream->device);
    if (err == cudaSuccess && a->bytes > 0) err = cudaMallocAsync(&a->ptr, a->bytes, a->stream->stream);
    if (err != cudaSuccess) {
      a->ptr = nullptr;
      cudaGetLastError();
      Napi::Error e = Napi::Error::New(env, "alloc: CUDA failed: " + CudaErrorText(err) + " (" + std::to_string(a->bytes) + " bytes)");
      e.Set("code", Napi::String::New(env, "SMLA_CUDA_ERROR"));
      e.Set("status", Napi::String::New(env, CudaErrorText(err)));
      throw e;
    }
    alloc_ = std::move(a);
    device_ = alloc_->stream->device;
    info.This().As<Napi::Object>().TypeTag(&kDeviceBufferTag);
  }

  std::shared_ptr<Allocation> Get() const { return alloc_; }

 private:
  Napi::Value ByteLength(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(alloc_ ? alloc_->bytes : 0));
  }
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }
  Napi::Value Freed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !alloc_); }
  // Drops this handle's ownership; the memory goes back once no queued op uses it.
  Napi::Value Free(const Napi::CallbackInfo& info) {
    alloc_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<Allocation> alloc_;
  int device_ = 0;
};

// The allocation of argument i (a DeviceBuffer of this stream's device), or a thrown argument error.
std::shared_ptr<Allocation> BufferArg(Args& a, const Napi::CallbackInfo& info, size_t i, const char* name, const StreamState& s) {
  if (i >= info.Length() || !info[i].IsObject() || info[i].IsTypedArray() || !info[i].As<Napi::Object>().CheckTypeTag(&kDeviceBufferTag))
    ThrowArgument(a.Env(), a.Op(), std::string(name) + ": expected a DeviceBuffer");
  std::shared_ptr<Allocation> b = DeviceBuffer::Unwrap(info[i].As<Napi::Object>())->Get();
  if (!b) ThrowArgument(a.Env(), a.Op(), std::string(name) + ": the device buffer was freed");
  if (b->stream->device != s.device)
    ThrowArgument(a.Env(), a.Op(), std::string(name) + ": a buffer on device " + std::to_string(b->stream->device) + ", this engine runs on device " + std::to_string(s.device));
  return b;
}

// ---- operands: a host typed array or a DeviceBuffer ---------------------------------------------

struct Operand {
  void* host = nullptr;                // host data (an owned copy, shared memory or an output array), or null
  std::shared_ptr<void> keep;          // owns `host` when the op built it (lives as long as the operand)
  std::shared_ptr<Allocation> device;  // or a device buffer
  uint64_t bytes = 0;
  bool output = false;
  void* temp = nullptr;  // staged copy of host data on the device
  void* Ptr() const { return device ? device->ptr : temp; }
  bool OnHost() const { return !device && host && bytes > 0; }
};

// Reads argument i as an operand of `count` elements of `elem` bytes: a DeviceBuffer of exactly
// that many bytes (on the stream's device), or a typed array of `type` with exactly `count` elements.
Operand ReadOperand(Args& a, const Napi::CallbackInfo& info, std::vector<Napi::ObjectReference>& pins, const StreamState& s, size_t i,
                    const char* name, napi_typedarray_type type, uint64_t elem, uint64_t count, bool output, bool nullable = false) {
  Operand o;
  o.output = output;
  o.bytes = elem * count;
  if (!a.IsNull(i) && info[i].IsObject() && !info[i].IsTypedArray()) {
    o.device = BufferArg(a, info, i, name, s);
    if (o.device->bytes != o.bytes)
      ThrowArgument(a.Env(), a.Op(), std::string(name) + ": expected a device buffer of " + std::to_string(o.bytes) + " bytes, got " +
                                         std::to_string(o.device->bytes));
    pins.push_back(Napi::Persistent(info[i].As<Napi::Object>()));
    return o;
  }
  // A host input is a copy the call owns or shared memory (addon.h, Args): H2D reads it later.
  o.host = output ? static_cast<void*>(a.Output<uint8_t>(i, name, type, count, nullable))
                  : const_cast<uint8_t*>(a.Input<uint8_t>(i, name, type, count, nullable));
  if (!o.host) o.bytes = 0;
  return o;
}

// Stages every host operand on the device (inputs copied H2D); returns a cudaError_t.
cudaError_t Stage(std::vector<Operand*> const& ops, cudaStream_t s) {
  for (Operand* o : ops) {
    if (!o->OnHost()) continue;
    cudaError_t err = cudaMallocAsync(&o->temp, o->bytes, s);
    if (err != cudaSuccess) {
      o->temp = nullptr;
      return err;
    }
    if (!o->output && (err = cudaMemcpyAsync(o->temp, o->host, o->bytes, cudaMemcpyHostToDevice, s)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Copies host outputs back (when the launch succeeded), frees the temporaries, synchronizes; the
// first error wins and a non-sticky one is cleared for the next call.
int32_t Finish(std::vector<Operand*> const& ops, cudaStream_t s, int32_t status) {
  for (Operand* o : ops) {
    if (status == SMLA_OK && o->output && o->temp) {
      cudaError_t err = cudaMemcpyAsync(o->host, o->temp, o->bytes, cudaMemcpyDeviceToHost, s);
      if (err != cudaSuccess) status = -int32_t(err);
    }
  }
  for (Operand* o : ops)
    if (o->temp) {
      cudaFreeAsync(o->temp, s);
      o->temp = nullptr;
    }
  cudaError_t err = cudaStreamSynchronize(s);
  if (status == SMLA_OK && err != cudaSuccess) status = -int32_t(err);
  if (status != SMLA_OK) cudaGetLastError();
  return status;
}

// launch(stream) between two fresh events when timing is on (benchmarks), kept for takeKernelMs.
template <class Launch>
int32_t Timed(StreamState& s, Launch launch) {
  if (!g_timing.load()) return launch(s.stream);
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

Napi::Promise Queue(Args& a, std::vector<Napi::ObjectReference> pins, std::function<int32_t()> body) {
  RowJob job;
  job.rows = 1;
  job.threads = 1;
  job.run = [body = std::move(body)](int64_t, int64_t) { return body(); };
  Holds all = a.TakeHolds();
  for (auto& p : pins) all.pins.push_back(std::move(p));
  return QueueRowJob(a.Env(), a.Op(), std::move(job), std::move(all));
}

// Makes `s` wait for the work queued so far on the stream of every device operand allocated by
// another engine's stream (same device).
cudaError_t WaitForOwners(std::vector<std::shared_ptr<Operand>> const& ops, const StreamState& s) {
  for (auto& o : ops) {
    if (!o->device || o->device->stream.get() == &s) continue;
    cudaEvent_t ready;
    cudaError_t err = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(ready, o->device->stream->stream);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(s.stream, ready, 0);
    cudaEventDestroy(ready);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Runs one op on its stream. Every operand on the device and allocated on this stream: enqueued
// here and now, settled at once (a buffer freed later is freed in this stream's order, after the
// op). Otherwise on a pool thread that holds the operands until the stream is done: staging, the
// owners' streams awaited, launch, host outputs back, sync.
// `after` (pool path only) runs once the launch succeeded, outside its timing events: e.g. a flag
// read back.
template <class Launch>
Napi::Promise Dispatch(Args& a, std::vector<Napi::ObjectReference> pins, StreamRef s, std::vector<std::shared_ptr<Operand>> ops, Launch launch,
                       std::function<int32_t(cudaStream_t)> after = nullptr) {
  const bool direct = std::none_of(ops.begin(), ops.end(), [&](const std::shared_ptr<Operand>& o) {
    return o->OnHost() || (o->device && o->device->stream != s);
  });
  if (direct) {
    cudaError_t err = cudaSetDevice(s->device);
    int32_t status = err != cudaSuccess ? -int32_t(err) : Timed(*s, launch);
    if (status != SMLA_OK) cudaGetLastError();
    return SettledPromise(a.Env(), a.Op(), status);  // `pins` go: the allocations are held by the queued work's owners
  }
  return Queue(a, std::move(pins), [s, ops = std::move(ops), launch, after]() -> int32_t {
    cudaError_t err = cudaSetDevice(s->device);
    if (err != cudaSuccess) return -int32_t(err);
    std::vector<Operand*> raw;
    for (auto& o : ops) raw.push_back(o.get());
    err = Stage(raw, s->stream);
    if (err == cudaSuccess) err = WaitForOwners(ops, *s);
    int32_t status = err != cudaSuccess ? -int32_t(err) : Timed(*s, launch);
    if (status == SMLA_OK && after) status = after(s->stream);
    return Finish(raw, s->stream, status);
  });
}

Napi::Value Stream::Synchronize(const Napi::CallbackInfo& info) {
  Args a(info, "synchronize");
  StreamRef s = state_;
  return Queue(a, {}, [s]() -> int32_t {
    cudaError_t err = cudaSetDevice(s->device);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s->stream);
    if (err != cudaSuccess) cudaGetLastError();
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}

uint64_t CacheBytes(int32_t format, int64_t page_size, int64_t num_pages) {
  if (format == SMLA_CACHE_V32) return uint64_t(num_pages) * smla::v32::kTokenBytes;
  return uint64_t(smla::v4::page_bytes(page_size)) * uint64_t(num_pages);
}

// ---- ops ------------------------------------------------------------------------------------------
// Every op's last argument is the engine's Stream.

// sparsePrefill(q, kv, indices, topkLength|null, attnSink|null, sQ, hQ, dQK, dV, sKV, topk, smScale,
//               out, maxLogits, lse, stream) — every array a typed array or a DeviceBuffer.
Napi::Value SparsePrefill(const Napi::CallbackInfo& info) {
  Args a(info, "sparsePrefill");
  std::vector<Napi::ObjectReference> pins;
  StreamRef st = StreamArg(info, 15, a.Op());
  const int64_t sQ = a.Int(5, "sQ", 0, kI32Max), hQ = a.Int(6, "hQ", 1, kI32Max), dQK = a.Int(7, "dQK", 1, kI32Max),
                dV = a.Int(8, "dV", 1, kI32Max), sKV = a.Int(9, "sKV", 0, kI32Max), topk = a.Int(10, "topk", 0, kI32Max);
  const float scale = a.Float(11, "smScale");
  auto rd = [&](size_t i, const char* name, napi_typedarray_type t, uint64_t elem, uint64_t count, bool out, bool nullable = false) {
    return std::make_shared<Operand>(ReadOperand(a, info, pins, *st, i, name, t, elem, count, out, nullable));
  };
  auto q = rd(0, "q", napi_uint16_array, 2, uint64_t(sQ * hQ) * uint64_t(dQK), false);
  auto kv = rd(1, "kv", napi_uint16_array, 2, uint64_t(sKV) * uint64_t(dQK), false);
  auto idx = rd(2, "indices", napi_int32_array, 4, uint64_t(sQ) * uint64_t(topk), false);
  auto lens = rd(3, "topkLength", napi_int32_array, 4, uint64_t(sQ), false, true);
  auto sink = rd(4, "attnSink", napi_float32_array, 4, uint64_t(hQ), false, true);
  auto out = rd(12, "out", napi_uint16_array, 2, uint64_t(sQ * hQ) * uint64_t(dV), true);
  auto ml = rd(13, "maxLogits", napi_float32_array, 4, uint64_t(sQ * hQ), true);
  auto lse = rd(14, "lse", napi_float32_array, 4, uint64_t(sQ * hQ), true);
  const bool hasLens = !a.IsNull(3), hasSink = !a.IsNull(4);
  return Dispatch(a, std::move(pins), st, {q, kv, idx, lens, sink, out, ml, lse}, [=](cudaStream_t s) {
    return smla_cuda_sparse_prefill(static_cast<const uint16_t*>(q->Ptr()), static_cast<const uint16_t*>(kv->Ptr()),
                                    static_cast<const int32_t*>(idx->Ptr()), hasLens ? static_cast<const int32_t*>(lens->Ptr()) : nullptr,
                                    hasSink ? static_cast<const float*>(sink->Ptr()) : nullptr, int32_t(sQ), int32_t(hQ), int32_t(dQK),
                                    int32_t(dV), int32_t(sKV), int32_t(topk), scale, static_cast<uint16_t*>(out->Ptr()),
                                    static_cast<float*>(ml->Ptr()), static_cast<float*>(lse->Ptr()), s);
  });
}

// pagedSparseAttention(q, n, hQ, kCache, pageSize, numPages, indices, topk, topkLength|null,
//                      extraKCache|null, extraPageSize, extraNumPages, extraIndices|null, extraTopk,
//                      extraTopkLength|null, attnSink|null, smScale, out, lse, maxLogits, stream)
Napi::Value PagedSparseAttention(const Napi::CallbackInfo& info) {
  Args a(info, "pagedSparseAttention");
  std::vector<Napi::ObjectReference> pins;
  StreamRef st = StreamArg(info, 20, a.Op());
  const int64_t n = a.Int(1, "n", 0, kI32Max), hQ = a.Int(2, "hQ", 1, kI32Max);
  const int64_t ps = a.Int(4, "pageSize", 1, kI32Max), np = a.Int(5, "numPages", 0, kI32Max);
  const int64_t topk = a.Int(7, "topk", 0, kI32Max);
  const bool hasExtra = !a.IsNull(9);
  const int64_t eps = a.Int(10, "extraPageSize", hasExtra ? 1 : 0, kI32Max), enp = a.Int(11, "extraNumPages", 0, kI32Max);
  const int64_t etopk = a.Int(13, "extraTopk", 0, hasExtra ? kI32Max : 0);
  const float scale = a.Float(16, "smScale");
  const bool hasLens = !a.IsNull(8), hasELens = hasExtra && !a.IsNull(14), hasSink = !a.IsNull(15);
  auto rd = [&](size_t i, const char* name, napi_typedarray_type t, uint64_t elem, uint64_t count, bool out, bool nullable = false) {
    return std::make_shared<Operand>(ReadOperand(a, info, pins, *st, i, name, t, elem, count, out, nullable));
  };
  constexpr uint64_t D = smla::v4::kDim;
  auto q = rd(0, "q", napi_uint16_array, 2, uint64_t(n * hQ) * D, false);
  auto kc = rd(3, "kCache", napi_uint8_array, 1, CacheBytes(SMLA_CACHE_V4, ps, np), false);
  auto idx = rd(6, "indices", napi_int32_array, 4, uint64_t(n) * uint64_t(topk), false);
  auto lens = rd(8, "topkLength", napi_int32_array, 4, uint64_t(n), false, true);
  auto ekc = std::make_shared<Operand>(), eidx = std::make_shared<Operand>(), elens = std::make_shared<Operand>();
  if (hasExtra) {
    ekc = rd(9, "extraKCache", napi_uint8_array, 1, CacheBytes(SMLA_CACHE_V4, eps, enp), false);
    eidx = rd(12, "extraIndices", napi_int32_array, 4, uint64_t(n) * uint64_t(etopk), false);
    elens = rd(14, "extraTopkLength", napi_int32_array, 4, uint64_t(n), false, true);
  }
  auto sink = rd(15, "attnSink", napi_float32_array, 4, uint64_t(hQ), false, true);
  auto out = rd(17, "out", napi_uint16_array, 2, uint64_t(n * hQ) * D, true);
  auto lse = rd(18, "lse", napi_float32_array, 4, uint64_t(n * hQ), true);
  auto ml = rd(19, "maxLogits", napi_float32_array, 4, uint64_t(n * hQ), true);
  return Dispatch(a, std::move(pins), st, {q, kc, idx, lens, ekc, eidx, elens, sink, out, lse, ml}, [=](cudaStream_t s) {
    // An empty extra cache (0 pages) has no device memory: pass a 16-aligned dummy so the
    // kernel's alignment check holds; every extra id is then out of range and never read.
    const uint8_t* ekp = hasExtra ? static_cast<const uint8_t*>(ekc->Ptr()) : nullptr;
    const uint8_t* kp = static_cast<const uint8_t*>(kc->Ptr());
    if (hasExtra && !ekp) ekp = kNothing;
    if (!kp) kp = kNothing;
    return smla_cuda_paged_sparse_attention(
        static_cast<const uint16_t*>(q->Ptr()), int32_t(n), int32_t(hQ), kp, int32_t(ps), int32_t(np), static_cast<const int32_t*>(idx->Ptr()),
        int32_t(topk), hasLens ? static_cast<const int32_t*>(lens->Ptr()) : nullptr, ekp, int32_t(eps), int32_t(enp),
        hasExtra ? static_cast<const int32_t*>(eidx->Ptr()) : nullptr, int32_t(etopk),
        hasELens ? static_cast<const int32_t*>(elens->Ptr()) : nullptr, hasSink ? static_cast<const float*>(sink->Ptr()) : nullptr, scale,
        static_cast<uint16_t*>(out->Ptr()), static_cast<float*>(lse->Ptr()), static_cast<float*>(ml->Ptr()), s);
  });
}

// dequantizeKvCache(format, cache, pageSize, numPages, tokenIds, n, out, outRowOffset|null, stream)
// tokenIds: a host Int32Array (widened and staged per call, with the kernel's bad-id flag read
// back: an id outside the cache rejects with SMLA_ERR_OUT_OF_RANGE), or a DeviceBuffer of n int64
// ids (a plan's ids, uploaded once and range-checked then by the caller, reused by every layer;
// the kernel zero-fills any bad id without reading it and nothing is read back). With
// outRowOffset, out is a DeviceBuffer of at least (outRowOffset + n) rows and the rows land there
// (a plan's device workspace region).
Napi::Value DequantizeKvCache(const Napi::CallbackInfo& info) {
  Args a(info, "dequantizeKvCache");
  std::vector<Napi::ObjectReference> pins;
  StreamRef st = StreamArg(info, 8, a.Op());
  const int32_t format = a.Int(0, "format", SMLA_CACHE_V4, SMLA_CACHE_V32);
  const int64_t ps = a.Int(2, "pageSize", 1, format == SMLA_CACHE_V32 ? 1 : kI32Max), np = a.Int(3, "numPages", 0, kI32Max);
  const int64_t n = a.Int(5, "n", 0, kI32Max), dim = format == SMLA_CACHE_V32 ? smla::v32::kDim : smla::v4::kDim;
  auto cache = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 1, "cache", napi_uint8_array, 1, CacheBytes(format, ps, np), false));
  const bool devIds = info.Length() > 4 && info[4].IsObject() && !info[4].IsTypedArray();
  auto ids = std::make_shared<Operand>();
  std::shared_ptr<std::vector<int64_t>> wide;
  if (devIds) {
    *ids = ReadOperand(a, info, pins, *st, 4, "tokenIds", napi_bigint64_array, 8, uint64_t(n), false);
  } else {
    // widened with one spare slot after the ids for the kernel's bad-id flag (int32)
    const int32_t* ids32 = a.Input<int32_t>(4, "tokenIds", napi_int32_array, uint64_t(n));
    wide = std::make_shared<std::vector<int64_t>>(ids32, ids32 + n);
    wide->push_back(0);
    ids->host = wide->data();
    ids->bytes = uint64_t(wide->size()) * 8;
    ids->keep = wide;
  }
  const bool into = !a.IsNull(7);
  std::shared_ptr<Operand> out;
  uint64_t out_offset = 0;
  if (into) {
    const int64_t row0 = a.Int(7, "outRowOffset", 0, kI32Max);
    out = std::make_shared<Operand>();
    out->output = true;
    out->device = BufferArg(a, info, 6, "out", *st);
    out_offset = uint64_t(row0) * uint64_t(dim) * 2;
    out->bytes = uint64_t(n) * uint64_t(dim) * 2;
    if (out_offset + out->bytes > out->device->bytes)
      ThrowArgument(a.Env(), a.Op(), "out: rows [" + std::to_string(row0) + ", " + std::to_string(row0 + n) + ") do not fit a buffer of " +
                                         std::to_string(out->device->bytes) + " bytes");
    pins.push_back(Napi::Persistent(info[6].As<Napi::Object>()));
  } else {
    out = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 6, "out", napi_uint16_array, 2, uint64_t(n) * uint64_t(dim), true));
  }
  auto bad = std::make_shared<int32_t>(0);
  auto flag = [=]() { return !devIds && n > 0 ? reinterpret_cast<int32_t*>(static_cast<int64_t*>(ids->Ptr()) + n) : nullptr; };
  std::function<int32_t(cudaStream_t)> readFlag = nullptr;
  if (!devIds && n > 0) {
    // host ids (a pool thread, which syncs): the kernel's bad-id flag comes back
    readFlag = [=](cudaStream_t s) -> int32_t {
      cudaError_t err = cudaMemcpyAsync(bad.get(), flag(), sizeof(int32_t), cudaMemcpyDeviceToHost, s);
      if (err == cudaSuccess) err = cudaStreamSynchronize(s);
      if (err != cudaSuccess) return -int32_t(err);
      return *bad != 0 ? int32_t(SMLA_ERR_OUT_OF_RANGE) : int32_t(SMLA_OK);
    };
  }
  return Dispatch(
      a, std::move(pins), st, {cache, ids, out},
      [=](cudaStream_t s) -> int32_t {
        return smla_cuda_dequantize_kv_cache(format, static_cast<const uint8_t*>(cache->Ptr()), int32_t(ps), int32_t(np),
                                             static_cast<const int64_t*>(ids->Ptr()), n,
                                             reinterpret_cast<uint16_t*>(static_cast<uint8_t*>(out->Ptr()) + out_offset), flag(), s);
      },
      readFlag);
}

// planRows(seqLens (host Int32Array), extendLens (host), numRequests, window, ratio,
//          topkIndices|null, topk, width, numQueries, rows, lens, dropped|null, stream)
// The planner's per-row index building on the device (native/cuda/planner.cu): ratio 4 with the
// indexer's top-k (topkIndices, host or device), ratio 0 / 128 dense rows without.
Napi::Value PlanRows(const Napi::CallbackInfo& info) {
  Args a(info, "planRows");
  std::vector<Napi::ObjectReference> pins;
  StreamRef st = StreamArg(info, 12, a.Op());
  const int64_t nr = a.Int(2, "numRequests", 0, kI32Max);
  auto seq = std::make_shared<std::vector<int32_t>>();
  auto ext = std::make_shared<std::vector<int32_t>>();
  const int32_t* s0 = a.Input<int32_t>(0, "seqLens", napi_int32_array, uint64_t(nr));
  const int32_t* e0 = a.Input<int32_t>(1, "extendLens", napi_int32_array, uint64_t(nr));
  if (nr > 0) seq->assign(s0, s0 + nr), ext->assign(e0, e0 + nr);
  const int32_t window = a.Int(3, "window", 1, kI32Max), ratio = a.Int(4, "ratio", 0, 128);
  const int64_t topk = a.Int(6, "topk", 0, kI32Max), width = a.Int(7, "width", 0, kI32Max), nq = a.Int(8, "numQueries", 0, kI32Max);
  const bool top = !a.IsNull(5);
  auto idx = std::make_shared<Operand>();
  if (top) *idx = ReadOperand(a, info, pins, *st, 5, "topkIndices", napi_int32_array, 4, uint64_t(nq) * uint64_t(topk), false);
  auto rows = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 9, "rows", napi_int32_array, 4, uint64_t(nq) * uint64_t(width), true));
  auto lens = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 10, "lens", napi_int32_array, 4, uint64_t(nq), true));
  auto dropped = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 11, "dropped", napi_int32_array, 4, uint64_t(nq), true, true));
  const bool hasDropped = !a.IsNull(11);
  return Dispatch(a, std::move(pins), st, {idx, rows, lens, dropped}, [=](cudaStream_t s) {
    return smla_cuda_plan_rows(int32_t(nr), seq->data(), ext->data(), window, ratio, top ? static_cast<const int32_t*>(idx->Ptr()) : nullptr,
                               int32_t(topk), int32_t(width), nq, static_cast<int32_t*>(rows->Ptr()), static_cast<int32_t*>(lens->Ptr()),
                               hasDropped ? static_cast<int32_t*>(dropped->Ptr()) : nullptr, s);
  });
}

// planCompressedTokenIds(seqLens (host Int32Array), extendLens (host), numRequests, ratio,
//                        pageTables (int32, host or device), pageTableOffsets (host BigInt64Array,
//                        numRequests + 1), pageSize, total, tokenIds (int64 [total], host or device), stream)
// A ratio's compressed flat token ids on the device (native/cuda/planner.cu).
Napi::Value PlanCompressedTokenIds(const Napi::CallbackInfo& info) {
  Args a(info, "planCompressedTokenIds");
  std::vector<Napi::ObjectReference> pins;
  StreamRef st = StreamArg(info, 9, a.Op());
  const int64_t nr = a.Int(2, "numRequests", 0, kI32Max);
  const int32_t* s0 = a.Input<int32_t>(0, "seqLens", napi_int32_array, uint64_t(nr));
  const int32_t* e0 = a.Input<int32_t>(1, "extendLens", napi_int32_array, uint64_t(nr));
  const int64_t* o0 = a.Input<int64_t>(5, "pageTableOffsets", napi_bigint64_array, uint64_t(nr) + 1);
  auto seq = std::make_shared<std::vector<int32_t>>(s0, s0 + nr);
  auto ext = std::make_shared<std::vector<int32_t>>(e0, e0 + nr);
  auto offs = std::make_shared<std::vector<int64_t>>(o0, o0 + nr + 1);
  const int32_t ratio = a.Int(3, "ratio", 4, 128);
  const int64_t tableLen = (*offs)[size_t(nr)];
  if (tableLen < 0) ThrowArgument(a.Env(), a.Op(), "pageTableOffsets: expected non-negative offsets");
  const int32_t ps = a.Int(6, "pageSize", 1, kI32Max);
  const int64_t total = a.Int(7, "total", 0, kI32Max);
  auto tables = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 4, "pageTables", napi_int32_array, 4, uint64_t(tableLen), false));
  auto ids = std::make_shared<Operand>(ReadOperand(a, info, pins, *st, 8, "tokenIds", napi_bigint64_array, 8, uint64_t(total), true));
  return Dispatch(a, std::move(pins), st, {tables, ids}, [=](cudaStream_t s) {
    return smla_cuda_plan_compressed_token_ids(int32_t(nr), seq->data(), ext->data(), ratio, static_cast<const int32_t*>(tables->Ptr()),
                                               offs->data(), ps, total, static_cast<int64_t*>(ids->Ptr()), s);
  });
}

// upload(dst: DeviceBuffer, src: typed array of exactly dst.byteLength bytes, stream) /
// download(src, dst, stream): on a pool thread, resolved when the copy is done.
Napi::Value Copy(const Napi::CallbackInfo& info, bool toDevice) {
  Args a(info, toDevice ? "upload" : "download");
  std::vector<Napi::ObjectReference> pins;
  StreamRef st = StreamArg(info, 2, a.Op());
  std::shared_ptr<Allocation> dev = BufferArg(a, info, 0, "buffer", *st);
  pins.push_back(Napi::Persistent(info[0].As<Napi::Object>()));
  if (info.Length() < 2 || !info[1].IsTypedArray()) ThrowArgument(a.Env(), a.Op(), "data: expected a typed array");
  Napi::TypedArray t = info[1].As<Napi::TypedArray>();
  if (uint64_t(t.ByteLength()) != dev->bytes)
    ThrowArgument(a.Env(), a.Op(), "data: expected " + std::to_string(dev->bytes) + " bytes, got " + std::to_string(t.ByteLength()));
  void* data = nullptr;
  if (toDevice) {
    uint64_t bytes = 0;
    data = const_cast<void*>(a.InputBytes(1, "data", &bytes));  // an owned copy or shared memory
  } else {
    napi_typedarray_type type;
    size_t length = 0;
    if (napi_get_typedarray_info(a.Env(), t, &type, &length, &data, nullptr, nullptr) != napi_ok)
      ThrowArgument(a.Env(), a.Op(), "data: cannot read the typed array's memory");
    pins.push_back(Napi::Persistent(static_cast<Napi::Object>(t)));  // an output only the caller holds
  }
  return Queue(a, std::move(pins), [st, dev, data, toDevice]() -> int32_t {
    cudaError_t err = cudaSetDevice(st->device);
    if (err == cudaSuccess && dev->bytes > 0)
      err = toDevice ? cudaMemcpyAsync(dev->ptr, data, dev->bytes, cudaMemcpyHostToDevice, st->stream)
                     : cudaMemcpyAsync(data, dev->ptr, dev->bytes, cudaMemcpyDeviceToHost, st->stream);
    cudaError_t sync = cudaStreamSynchronize(st->stream);
    if (err == cudaSuccess) err = sync;
    if (err != cudaSuccess) cudaGetLastError();
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}
Napi::Value Upload(const Napi::CallbackInfo& info) { return Copy(info, true); }
Napi::Value Download(const Napi::CallbackInfo& info) { return Copy(info, false); }

// copyDevice(dst, src, stream): a device-to-device copy of equal-sized buffers of this stream's
// device (benchmarks' copy ceiling); stream-ordered.
Napi::Value CopyDevice(const Napi::CallbackInfo& info) {
  Args a(info, "copyDevice");
  StreamRef st = StreamArg(info, 2, a.Op());
  std::shared_ptr<Allocation> dst = BufferArg(a, info, 0, "dst", *st), src = BufferArg(a, info, 1, "src", *st);
  if (dst->bytes != src->bytes) ThrowArgument(a.Env(), a.Op(), "buffers differ in size");
  return Dispatch(a, {}, st, {}, [=](cudaStream_t s) -> int32_t {
    cudaError_t err = dst->bytes > 0 ? cudaMemcpyAsync(dst->ptr, src->ptr, dst->bytes, cudaMemcpyDeviceToDevice, s) : cudaSuccess;
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}

// copyPeer(dst, dstStream, src, srcStream): dst (on dstStream's device) gets src (on srcStream's,
// maybe another device) after every op queued on srcStream so far; peer-to-peer where the devices
// allow it, through the host otherwise (cudaMemcpyPeerAsync decides). Resolves when done.
Napi::Value CopyPeer(const Napi::CallbackInfo& info) {
  Args a(info, "copyPeer");
  std::vector<Napi::ObjectReference> pins;
  StreamRef ds = StreamArg(info, 1, a.Op()), ss = StreamArg(info, 3, a.Op());
  std::shared_ptr<Allocation> dst = BufferArg(a, info, 0, "dst", *ds), src = BufferArg(a, info, 2, "src", *ss);
  if (dst->bytes != src->bytes) ThrowArgument(a.Env(), a.Op(), "buffers differ in size");
  pins.push_back(Napi::Persistent(info[0].As<Napi::Object>()));
  pins.push_back(Napi::Persistent(info[2].As<Napi::Object>()));
  return Queue(a, std::move(pins), [=]() -> int32_t {
    cudaError_t err = cudaSetDevice(ss->device);
    cudaEvent_t ready = nullptr;
    if (err == cudaSuccess) err = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(ready, ss->stream);
    if (err == cudaSuccess) err = cudaSetDevice(ds->device);
    if (err == cudaSuccess && ds->device != ss->device) {
      int can = 0;
      if (cudaDeviceCanAccessPeer(&can, ds->device, ss->device) == cudaSuccess && can) {
        const cudaError_t e = cudaDeviceEnablePeerAccess(ss->device, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) err = e;
        cudaGetLastError();
      }
    }
    if (err == cudaSuccess) err = cudaStreamWaitEvent(ds->stream, ready, 0);
    if (err == cudaSuccess && dst->bytes > 0) err = cudaMemcpyPeerAsync(dst->ptr, ds->device, src->ptr, ss->device, dst->bytes, ds->stream);
    const cudaError_t sync = cudaStreamSynchronize(ds->stream);
    if (err == cudaSuccess) err = sync;
    if (ready) {
      cudaSetDevice(ss->device);
      cudaEventDestroy(ready);
    }
    if (err != cudaSuccess) cudaGetLastError();
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}

// fillDevice(dst, src, stream): dst filled with repeats of src (benchmark inputs far larger than the
// host can build quickly, from a random block); stream-ordered.
Napi::Value FillDevice(const Napi::CallbackInfo& info) {
  Args a(info, "fillDevice");
  StreamRef st = StreamArg(info, 2, a.Op());
  std::shared_ptr<Allocation> dst = BufferArg(a, info, 0, "dst", *st), src = BufferArg(a, info, 1, "src", *st);
  if (src->bytes == 0 && dst->bytes > 0) ThrowArgument(a.Env(), a.Op(), "empty source");
  return Dispatch(a, {}, st, {}, [=](cudaStream_t s) -> int32_t {
    for (uint64_t off = 0; off < dst->bytes; off += src->bytes) {
      const uint64_t n = std::min<uint64_t>(src->bytes, dst->bytes - off);
      cudaError_t err = cudaMemcpyAsync(static_cast<uint8_t*>(dst->ptr) + off, src->ptr, n, cudaMemcpyDeviceToDevice, s);
      if (err != cudaSuccess) return -int32_t(err);
    }
    return int32_t(SMLA_OK);
  });
}

// setTiming(on): CUDA events around every launch from now on (benchmarks) or none.
Napi::Value SetTiming(const Napi::CallbackInfo& info) {
  g_timing = info.Length() > 0 && info[0].ToBoolean().Value();
  return info.Env().Undefined();
}

// takeKernelMs(stream): device ms of each timed launch on the stream since the last call, in
// order (waits for them; -1 for one that could not be timed), and forgets them.
Napi::Value TakeKernelMs(const Napi::CallbackInfo& info) {
  StreamRef st = StreamArg(info, 0, "takeKernelMs");
  std::lock_guard<std::mutex> lock(st->mutex);
  Napi::Array out = Napi::Array::New(info.Env(), st->timed.size());
  cudaSetDevice(st->device);
  for (size_t i = 0; i < st->timed.size(); ++i) {
    float ms = -1.0f;
    if (cudaEventSynchronize(st->timed[i].second) != cudaSuccess || cudaEventElapsedTime(&ms, st->timed[i].first, st->timed[i].second) != cudaSuccess)
      ms = -1.0f;
    cudaEventDestroy(st->timed[i].first);
    cudaEventDestroy(st->timed[i].second);
    out.Set(uint32_t(i), Napi::Number::New(info.Env(), double(ms)));
  }
  st->timed.clear();
  cudaGetLastError();
  return out;
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
    int32_t status = err != cudaSuccess ? -int32_t(err)
                                        : smla_cuda_dequantize_kv_cache(SMLA_CACHE_V4, static_cast<const uint8_t*>(c.Ptr()), 1, 1,
                                                                        static_cast<const int64_t*>(ids.Ptr()), 1, static_cast<uint16_t*>(out.Ptr()),
                                                                        nullptr, st->stream);
    status = Finish(ops, st->stream, status);
    if (status != SMLA_OK) return status;
    for (int i = 0; i < kDim; ++i)
      if (row[size_t(i)] != (i < kNopeDim ? 0x4000 : 0x3F80)) return SMLA_ERR_UNSUPPORTED;  // ran, but wrong
    return int32_t(SMLA_OK);
  });
}

// memInfo(stream) → { free, total } bytes on the stream's device (synchronous, cheap).
Napi::Value MemInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  StreamRef st = StreamArg(info, 0, "memInfo");
  size_t freeB = 0, total = 0;
  cudaError_t err = cudaSetDevice(st->device);
  if (err == cudaSuccess) err = cudaMemGetInfo(&freeB, &total);
  Napi::Object o = Napi::Object::New(env);
  if (err != cudaSuccess) {
    cudaGetLastError();
    o.Set("error", Napi::String::New(env, CudaErrorText(err)));
  }
  o.Set("free", double(freeB));
  o.Set("total", double(total));
  return o;
}

}  // namespace

// The classes are exported as constructors: `new ops.Stream(device)`, `new ops.DeviceBuffer(n, stream)`.
Napi::Value NewDeviceBufferClass(const Napi::CallbackInfo& info) { return DeviceBuffer::Class(info.Env()); }
Napi::Value NewStreamClass(const Napi::CallbackInfo& info) { return Stream::Class(info.Env()); }

const OpEntry kCudaOps[] = {
    {"sparsePrefill", SparsePrefill},
    {"pagedSparseAttention", PagedSparseAttention},
    {"dequantizeKvCache", DequantizeKvCache},
    {"planRows", PlanRows},
    {"planCompressedTokenIds", PlanCompressedTokenIds},
    {"upload", Upload},
    {"download", Download},
    {"copyDevice", CopyDevice},
    {"copyPeer", CopyPeer},
    {"fillDevice", FillDevice},
    {"setTiming", SetTiming},
    {"takeKernelMs", TakeKernelMs},
    {"probeLaunch", ProbeLaunch},
    {"memInfo", MemInfo},
    {"deviceBufferClass", NewDeviceBufferClass},
    {"streamClass", NewStreamClass},
};
const size_t kCudaOpCount = sizeof(kCudaOps) / sizeof(kCudaOps[0]);

}  // namespace smla_addon
