// The `cuda` backend's ops (native/cuda kernels, host API smla_cuda.h) and device-resident buffers.
//
// Every op runs on the process's one CUDA stream (device 0), on a libuv pool thread: it stages its
// operands (a host typed array gets a stream-ordered temporary and an H2D copy; a DeviceBuffer is
// used in place), launches, copies host outputs back, frees the temporaries and synchronizes the
// stream, so the promise resolves when the results are in place and the event loop never waits.
// One stream orders everything (alloc, upload, ops, download, free) without extra events.
//
// Errors: a failing CUDA call returns -(cudaError_t) (the job rejects with code SMLA_CUDA_ERROR and
// "cudaErrorX: message"); temporaries are freed and the non-sticky error cleared, so the next call
// starts clean. A sticky error (a kernel fault) would poison the CUDA context for the process; the
// kernels are written never to fault on any index value (SPEC §5), and shapes are checked here.
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

namespace smla_addon {
namespace {

constexpr int64_t kI32Max = INT32_MAX;
// Stands in for a cache of 0 pages (no memory): every id into it is invalid, so it is never read.
alignas(16) const uint8_t kNothing[16] = {};

// ---- the stream ---------------------------------------------------------------------------------

struct StreamState {
  std::once_flag once;
  cudaError_t error = cudaSuccess;
  cudaStream_t stream = nullptr;
};

StreamState& State() {
  static StreamState s;
  return s;
}

// The process's stream, created on first use; the default memory pool keeps freed blocks cached
// (release threshold: unlimited) so per-call temporaries do not go back to the driver every time.
cudaError_t GetStream(cudaStream_t* out) {
  StreamState& s = State();
  std::call_once(s.once, [&] {
    s.error = cudaSetDevice(0);
    if (s.error == cudaSuccess) s.error = cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking);
    if (s.error == cudaSuccess) {
      cudaMemPool_t pool;
      if (cudaDeviceGetDefaultMemPool(&pool, 0) == cudaSuccess) {
        uint64_t threshold = UINT64_MAX;
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
      }
    }
    if (s.error != cudaSuccess) cudaGetLastError();
  });
  *out = s.stream;
  return s.error;
}

// ---- device buffers -------------------------------------------------------------------------------

// One stream-ordered allocation; freed (stream-ordered, so after every op queued before) when the
// last owner lets go: the DeviceBuffer (free() or its finalizer) or an op still using it.
struct Allocation {
  void* ptr = nullptr;
  uint64_t bytes = 0;
  ~Allocation() {
    cudaStream_t s;
    if (ptr && GetStream(&s) == cudaSuccess) {
      if (cudaFreeAsync(ptr, s) != cudaSuccess) cudaGetLastError();  // e.g. at process exit
    }
  }
};

const napi_type_tag kDeviceBufferTag = {0x5a1f0c3e9b2d4e71ULL, 0x8c6a3f1d2e4b5a90ULL};

class DeviceBuffer : public Napi::ObjectWrap<DeviceBuffer> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "DeviceBuffer",
                       {InstanceAccessor<&DeviceBuffer::ByteLength>("byteLength"),
                        InstanceAccessor<&DeviceBuffer::Freed>("freed"), InstanceMethod<&DeviceBuffer::Free>("free")});
  }

  // new DeviceBuffer(bytes): cudaMallocAsync on the stream (usable by every later call on it).
  explicit DeviceBuffer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceBuffer>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) ThrowArgument(env, "alloc", "bytes: expected a number");
    const double b = info[0].As<Napi::Number>().DoubleValue();
    if (!(b >= 0 && b <= 9007199254740991.0) || b != double(int64_t(b))) ThrowArgument(env, "alloc", "bytes: expected a non-negative integer");
    auto a = std::make_shared<Allocation>();
    a->bytes = uint64_t(b);
    cudaStream_t s;
    cudaError_t err = GetStream(&s);
    if (err == cudaSuccess && a->bytes > 0) err = cudaMallocAsync(&a->ptr, a->bytes, s);
    if (err != cudaSuccess) {
      a->ptr = nullptr;
      cudaGetLastError();
      Napi::Error e = Napi::Error::New(env, "alloc: CUDA failed: " + CudaErrorText(err) + " (" + std::to_string(a->bytes) + " bytes)");
      e.Set("code", Napi::String::New(env, "SMLA_CUDA_ERROR"));
      e.Set("status", Napi::String::New(env, CudaErrorText(err)));
      throw e;
    }
    alloc_ = std::move(a);
    info.This().As<Napi::Object>().TypeTag(&kDeviceBufferTag);
  }

  std::shared_ptr<Allocation> Get() const { return alloc_; }

 private:
  Napi::Value ByteLength(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(alloc_ ? alloc_->bytes : 0));
  }
  Napi::Value Freed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !alloc_); }
  // Drops this handle's ownership; the memory goes back once no queued op uses it.
  Napi::Value Free(const Napi::CallbackInfo& info) {
    alloc_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<Allocation> alloc_;
};

// ---- operands: a host typed array or a DeviceBuffer ---------------------------------------------

struct Operand {
  void* host = nullptr;                // host data (a typed array's memory), or null
  std::shared_ptr<Allocation> device;  // or a device buffer
  uint64_t bytes = 0;
  bool output = false;
  void* temp = nullptr;  // staged copy of host data on the device
  void* Ptr() const { return device ? device->ptr : temp; }
};

// Reads argument i as an operand of `count` elements of `elem` bytes: a DeviceBuffer of exactly
// that many bytes, or a typed array of `type` with exactly `count` elements.
Operand ReadOperand(Args& a, const Napi::CallbackInfo& info, std::vector<Napi::ObjectReference>& pins, size_t i,
                    const char* name, napi_typedarray_type type, uint64_t elem, uint64_t count, bool output,
                    bool nullable = false) {
  Operand o;
  o.output = output;
  o.bytes = elem * count;
  if (!a.IsNull(i) && info[i].IsObject() && !info[i].IsTypedArray()) {
    Napi::Object obj = info[i].As<Napi::Object>();
    if (!obj.CheckTypeTag(&kDeviceBufferTag)) ThrowArgument(a.Env(), a.Op(), std::string(name) + ": expected a typed array or a DeviceBuffer");
    DeviceBuffer* b = DeviceBuffer::Unwrap(obj);
    o.device = b->Get();
    if (!o.device) ThrowArgument(a.Env(), a.Op(), std::string(name) + ": the device buffer was freed");
    if (o.device->bytes != o.bytes)
      ThrowArgument(a.Env(), a.Op(), std::string(name) + ": expected a device buffer of " + std::to_string(o.bytes) + " bytes, got " +
                                         std::to_string(o.device->bytes));
    pins.push_back(Napi::Persistent(obj));
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
    if (o->device || !o->host || o->bytes == 0) continue;
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

// Device time of the last launch (CUDA events around the launch only, not the staging copies),
// read by benchmarks through lastKernelMs(); meaningful when calls do not overlap.
std::atomic<double> g_last_kernel_ms{-1.0};

// Events around launch(stream) on s; records its device time when both events completed.
template <class Launch>
int32_t Timed(cudaStream_t s, Launch launch, cudaEvent_t ev[2]) {
  const bool timed = cudaEventCreate(&ev[0]) == cudaSuccess && cudaEventCreate(&ev[1]) == cudaSuccess;
  if (timed) cudaEventRecord(ev[0], s);
  int32_t status = launch(s);
  if (timed) cudaEventRecord(ev[1], s);
  return status;
}

void ReadTimer(cudaEvent_t ev[2], int32_t status) {
  float ms = -1.0f;
  if (ev[0] && ev[1] && status == SMLA_OK && cudaEventElapsedTime(&ms, ev[0], ev[1]) == cudaSuccess) g_last_kernel_ms = double(ms);
  for (int i = 0; i < 2; ++i)
    if (ev[i]) cudaEventDestroy(ev[i]);
  cudaGetLastError();
}

// Runs one op: stream, staging, launch(stream) → smla status, outputs back, sync.
template <class Launch>
int32_t RunOnStream(std::vector<Operand*> const& ops, Launch launch) {
  cudaStream_t s;
  cudaError_t err = GetStream(&s);
  if (err != cudaSuccess) return -int32_t(err);
  err = Stage(ops, s);
  cudaEvent_t ev[2] = {nullptr, nullptr};
  int32_t status = err != cudaSuccess ? -int32_t(err) : Timed(s, launch, ev);
  status = Finish(ops, s, status);
  ReadTimer(ev, status);
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

uint64_t CacheBytes(int32_t format, int64_t page_size, int64_t num_pages) {
  if (format == SMLA_CACHE_V32) return uint64_t(num_pages) * 656;
  const uint64_t page = (uint64_t(page_size) * 584 + 575) / 576 * 576;
  return page * uint64_t(num_pages);
}

// ---- ops ------------------------------------------------------------------------------------------

// sparsePrefill(q, kv, indices, topkLength|null, attnSink|null, sQ, hQ, dQK, dV, sKV, topk, smScale,
//               out, maxLogits, lse) — every array a typed array or a DeviceBuffer.
Napi::Value SparsePrefill(const Napi::CallbackInfo& info) {
  Args a(info, "sparsePrefill");
  std::vector<Napi::ObjectReference> pins;
  const int64_t sQ = a.Int(5, "sQ", 0, kI32Max), hQ = a.Int(6, "hQ", 1, kI32Max), dQK = a.Int(7, "dQK", 1, kI32Max),
                dV = a.Int(8, "dV", 1, kI32Max), sKV = a.Int(9, "sKV", 0, kI32Max), topk = a.Int(10, "topk", 0, kI32Max);
  const float scale = a.Float(11, "smScale");
  auto q = std::make_shared<Operand>(ReadOperand(a, info, pins, 0, "q", napi_uint16_array, 2, uint64_t(sQ * hQ) * uint64_t(dQK), false));
  auto kv = std::make_shared<Operand>(ReadOperand(a, info, pins, 1, "kv", napi_uint16_array, 2, uint64_t(sKV) * uint64_t(dQK), false));
  auto idx = std::make_shared<Operand>(ReadOperand(a, info, pins, 2, "indices", napi_int32_array, 4, uint64_t(sQ) * uint64_t(topk), false));
  auto lens = std::make_shared<Operand>(ReadOperand(a, info, pins, 3, "topkLength", napi_int32_array, 4, uint64_t(sQ), false, true));
  auto sink = std::make_shared<Operand>(ReadOperand(a, info, pins, 4, "attnSink", napi_float32_array, 4, uint64_t(hQ), false, true));
  auto out = std::make_shared<Operand>(ReadOperand(a, info, pins, 12, "out", napi_uint16_array, 2, uint64_t(sQ * hQ) * uint64_t(dV), true));
  auto ml = std::make_shared<Operand>(ReadOperand(a, info, pins, 13, "maxLogits", napi_float32_array, 4, uint64_t(sQ * hQ), true));
  auto lse = std::make_shared<Operand>(ReadOperand(a, info, pins, 14, "lse", napi_float32_array, 4, uint64_t(sQ * hQ), true));
  const bool hasLens = !a.IsNull(3), hasSink = !a.IsNull(4);
  return Queue(a, std::move(pins), [=]() -> int32_t {
    std::vector<Operand*> ops{q.get(), kv.get(), idx.get(), lens.get(), sink.get(), out.get(), ml.get(), lse.get()};
    return RunOnStream(ops, [&](cudaStream_t s) {
      return smla_cuda_sparse_prefill(static_cast<const uint16_t*>(q->Ptr()), static_cast<const uint16_t*>(kv->Ptr()),
                                      static_cast<const int32_t*>(idx->Ptr()),
                                      hasLens ? static_cast<const int32_t*>(lens->Ptr()) : nullptr,
                                      hasSink ? static_cast<const float*>(sink->Ptr()) : nullptr, int32_t(sQ), int32_t(hQ),
                                      int32_t(dQK), int32_t(dV), int32_t(sKV), int32_t(topk), scale,
                                      static_cast<uint16_t*>(out->Ptr()), static_cast<float*>(ml->Ptr()),
                                      static_cast<float*>(lse->Ptr()), s);
    });
  });
}

// pagedSparseAttention(q, n, hQ, kCache, pageSize, numPages, indices, topk, topkLength|null,
//                      extraKCache|null, extraPageSize, extraNumPages, extraIndices|null, extraTopk,
//                      extraTopkLength|null, attnSink|null, smScale, out, lse, maxLogits)
Napi::Value PagedSparseAttention(const Napi::CallbackInfo& info) {
  Args a(info, "pagedSparseAttention");
  std::vector<Napi::ObjectReference> pins;
  const int64_t n = a.Int(1, "n", 0, kI32Max), hQ = a.Int(2, "hQ", 1, kI32Max);
  const int64_t ps = a.Int(4, "pageSize", 1, kI32Max), np = a.Int(5, "numPages", 0, kI32Max);
  const int64_t topk = a.Int(7, "topk", 0, kI32Max);
  const bool hasExtra = !a.IsNull(9);
  const int64_t eps = a.Int(10, "extraPageSize", hasExtra ? 1 : 0, kI32Max), enp = a.Int(11, "extraNumPages", 0, kI32Max);
  const int64_t etopk = a.Int(13, "extraTopk", 0, hasExtra ? kI32Max : 0);
  const float scale = a.Float(16, "smScale");
  const bool hasLens = !a.IsNull(8), hasELens = hasExtra && !a.IsNull(14), hasSink = !a.IsNull(15);
  auto q = std::make_shared<Operand>(ReadOperand(a, info, pins, 0, "q", napi_uint16_array, 2, uint64_t(n * hQ) * 512, false));
  auto kc = std::make_shared<Operand>(ReadOperand(a, info, pins, 3, "kCache", napi_uint8_array, 1, CacheBytes(SMLA_CACHE_V4, ps, np), false));
  auto idx = std::make_shared<Operand>(ReadOperand(a, info, pins, 6, "indices", napi_int32_array, 4, uint64_t(n) * uint64_t(topk), false));
  auto lens = std::make_shared<Operand>(ReadOperand(a, info, pins, 8, "topkLength", napi_int32_array, 4, uint64_t(n), false, true));
  auto ekc = std::make_shared<Operand>();
  auto eidx = std::make_shared<Operand>();
  auto elens = std::make_shared<Operand>();
  if (hasExtra) {
    *ekc = ReadOperand(a, info, pins, 9, "extraKCache", napi_uint8_array, 1, CacheBytes(SMLA_CACHE_V4, eps, enp), false);
    *eidx = ReadOperand(a, info, pins, 12, "extraIndices", napi_int32_array, 4, uint64_t(n) * uint64_t(etopk), false);
    *elens = ReadOperand(a, info, pins, 14, "extraTopkLength", napi_int32_array, 4, uint64_t(n), false, true);
  }
  auto sink = std::make_shared<Operand>(ReadOperand(a, info, pins, 15, "attnSink", napi_float32_array, 4, uint64_t(hQ), false, true));
  auto out = std::make_shared<Operand>(ReadOperand(a, info, pins, 17, "out", napi_uint16_array, 2, uint64_t(n * hQ) * 512, true));
  auto lse = std::make_shared<Operand>(ReadOperand(a, info, pins, 18, "lse", napi_float32_array, 4, uint64_t(n * hQ), true));
  auto ml = std::make_shared<Operand>(ReadOperand(a, info, pins, 19, "maxLogits", napi_float32_array, 4, uint64_t(n * hQ), true));
  return Queue(a, std::move(pins), [=]() -> int32_t {
    std::vector<Operand*> ops{q.get(), kc.get(), idx.get(), lens.get(), ekc.get(), eidx.get(), elens.get(), sink.get(), out.get(), lse.get(), ml.get()};
    return RunOnStream(ops, [&](cudaStream_t s) {
      // An empty extra cache (0 pages) has no device memory: pass a 16-aligned dummy so the
      // kernel's alignment check holds; every extra id is then out of range and never read.
      const uint8_t* ekp = hasExtra ? static_cast<const uint8_t*>(ekc->Ptr()) : nullptr;
      const uint8_t* kp = static_cast<const uint8_t*>(kc->Ptr());
      if (hasExtra && !ekp) ekp = kNothing;
      if (!kp) kp = kNothing;
      return smla_cuda_paged_sparse_attention(
          static_cast<const uint16_t*>(q->Ptr()), int32_t(n), int32_t(hQ), kp, int32_t(ps), int32_t(np),
          static_cast<const int32_t*>(idx->Ptr()), int32_t(topk), hasLens ? static_cast<const int32_t*>(lens->Ptr()) : nullptr,
          ekp, int32_t(eps), int32_t(enp), hasExtra ? static_cast<const int32_t*>(eidx->Ptr()) : nullptr,
          int32_t(etopk), hasELens ? static_cast<const int32_t*>(elens->Ptr()) : nullptr,
          hasSink ? static_cast<const float*>(sink->Ptr()) : nullptr, scale, static_cast<uint16_t*>(out->Ptr()),
          static_cast<float*>(lse->Ptr()), static_cast<float*>(ml->Ptr()), s);
    });
  });
}

// dequantizeKvCache(format, cache, pageSize, numPages, tokenIds, n, out[, outRowOffset])
// tokenIds: a host Int32Array (widened and staged per call), or a DeviceBuffer of n int64 ids
// (a plan's ids, uploaded once and range-checked then by the caller, reused by every layer: no
// host→device id copy per call). Ids are checked by the caller (TS) and again by the kernel
// (bad_id: zero rows and an SMLA_ERR_OUT_OF_RANGE status), never read out of the cache.
Napi::Value DequantizeKvCache(const Napi::CallbackInfo& info) {
  Args a(info, "dequantizeKvCache");
  std::vector<Napi::ObjectReference> pins;
  const int32_t format = a.Int(0, "format", SMLA_CACHE_V4, SMLA_CACHE_V32);
  const int64_t ps = a.Int(2, "pageSize", 1, format == SMLA_CACHE_V32 ? 1 : kI32Max), np = a.Int(3, "numPages", 0, kI32Max);
  const int64_t n = a.Int(5, "n", 0, kI32Max), dim = format == SMLA_CACHE_V32 ? 576 : 512;
  auto cache = std::make_shared<Operand>(ReadOperand(a, info, pins, 1, "cache", napi_uint8_array, 1, CacheBytes(format, ps, np), false));
  const bool devIds = info.Length() > 4 && info[4].IsObject() && !info[4].IsTypedArray();
  const int32_t* ids32 = nullptr;
  std::shared_ptr<Operand> idsDev;
  if (devIds) {
    idsDev = std::make_shared<Operand>(ReadOperand(a, info, pins, 4, "tokenIds", napi_bigint64_array, 8, uint64_t(n), false));
  } else {
    ids32 = a.Input<int32_t>(4, "tokenIds", napi_int32_array, uint64_t(n));
  }
  // Optional outRowOffset (argument 7): out is then a DeviceBuffer of at least
  // (outRowOffset + n) rows and the rows land at that row (a plan's device workspace region).
  const bool into = info.Length() > 7 && !info[7].IsUndefined() && !info[7].IsNull();
  std::shared_ptr<Operand> out;
  uint64_t out_offset = 0;
  if (into) {
    const int64_t row0 = a.Int(7, "outRowOffset", 0, kI32Max);
    if (!info[6].IsObject() || info[6].IsTypedArray() || !info[6].As<Napi::Object>().CheckTypeTag(&kDeviceBufferTag))
      ThrowArgument(a.Env(), a.Op(), "out: expected a DeviceBuffer when outRowOffset is given");
    Napi::Object bo = info[6].As<Napi::Object>();
    out = std::make_shared<Operand>();
    out->output = true;
    out->device = DeviceBuffer::Unwrap(bo)->Get();
    if (!out->device) ThrowArgument(a.Env(), a.Op(), "out: the device buffer was freed");
    out_offset = uint64_t(row0) * uint64_t(dim) * 2;
    out->bytes = uint64_t(n) * uint64_t(dim) * 2;
    if (out_offset + out->bytes > out->device->bytes)
      ThrowArgument(a.Env(), a.Op(), "out: rows [" + std::to_string(row0) + ", " + std::to_string(row0 + n) + ") do not fit a buffer of " +
                                         std::to_string(out->device->bytes) + " bytes");
    pins.push_back(Napi::Persistent(bo));
  } else {
    out = std::make_shared<Operand>(ReadOperand(a, info, pins, 6, "out", napi_uint16_array, 2, uint64_t(n) * uint64_t(dim), true));
  }
  return Queue(a, std::move(pins), [=]() -> int32_t {
    // Host ids: widened with one spare slot after them for the kernel's bad-id flag (int32).
    // Device ids: the flag gets a stream-ordered 8-byte temporary, zeroed on the stream.
    std::vector<int64_t> wide;
    Operand ids;
    void* flag = nullptr;
    if (!devIds) {
      wide.assign(ids32, ids32 + n);
      wide.push_back(0);
      ids.host = wide.data();
      ids.bytes = uint64_t(wide.size()) * 8;
    }
    int32_t bad = 0;
    std::vector<Operand*> ops{cache.get(), out.get()};
    if (devIds) ops.push_back(idsDev.get());
    else ops.push_back(&ids);
    int32_t status = RunOnStream(ops, [&](cudaStream_t s) -> int32_t {
      const int64_t* idp = devIds ? static_cast<const int64_t*>(idsDev->Ptr()) : static_cast<const int64_t*>(ids.Ptr());
      int32_t* bad_dev = nullptr;
      if (n > 0) {
        if (devIds) {
          cudaError_t err = cudaMallocAsync(&flag, 8, s);
          if (err != cudaSuccess) {
            flag = nullptr;
            return -int32_t(err);
          }
          if ((err = cudaMemsetAsync(flag, 0, 8, s)) != cudaSuccess) return -int32_t(err);
          bad_dev = static_cast<int32_t*>(flag);
        } else {
          bad_dev = reinterpret_cast<int32_t*>(static_cast<int64_t*>(ids.Ptr()) + n);
        }
      }
      int32_t st = smla_cuda_dequantize_kv_cache(format, static_cast<const uint8_t*>(cache->Ptr()), int32_t(ps), int32_t(np), idp, n,
                                                 reinterpret_cast<uint16_t*>(static_cast<uint8_t*>(out->Ptr()) + out_offset), bad_dev, s);
      if (st != SMLA_OK || n == 0) return st;
      cudaError_t err = cudaMemcpyAsync(&bad, bad_dev, sizeof bad, cudaMemcpyDeviceToHost, s);
      return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
    });
    if (flag) {
      cudaStream_t s;
      if (GetStream(&s) == cudaSuccess && cudaFreeAsync(flag, s) != cudaSuccess) cudaGetLastError();
    }
    if (status == SMLA_OK && bad != 0) return SMLA_ERR_OUT_OF_RANGE;
    return status;
  });
}

// planRows(seqLens (host Int32Array), extendLens (host), numRequests, window, ratio,
//          topkIndices|null, topk, width, numQueries, rows, lens, dropped|null)
// The planner's per-row index building on the device (native/cuda/planner.cu): ratio 4 with the
// indexer's top-k (topkIndices, host or device), ratio 0 / 128 dense rows without.
Napi::Value PlanRows(const Napi::CallbackInfo& info) {
  Args a(info, "planRows");
  std::vector<Napi::ObjectReference> pins;
  const int64_t nr = a.Int(2, "numRequests", 0, kI32Max);
  const int32_t* seq = a.Input<int32_t>(0, "seqLens", napi_int32_array, uint64_t(nr));
  const int32_t* ext = a.Input<int32_t>(1, "extendLens", napi_int32_array, uint64_t(nr));
  const int32_t window = a.Int(3, "window", 1, kI32Max), ratio = a.Int(4, "ratio", 0, 128);
  const int64_t topk = a.Int(6, "topk", 0, kI32Max), width = a.Int(7, "width", 0, kI32Max), nq = a.Int(8, "numQueries", 0, kI32Max);
  const bool top = !a.IsNull(5);
  auto idx = std::make_shared<Operand>();
  if (top) *idx = ReadOperand(a, info, pins, 5, "topkIndices", napi_int32_array, 4, uint64_t(nq) * uint64_t(topk), false);
  auto rows = std::make_shared<Operand>(ReadOperand(a, info, pins, 9, "rows", napi_int32_array, 4, uint64_t(nq) * uint64_t(width), true));
  auto lens = std::make_shared<Operand>(ReadOperand(a, info, pins, 10, "lens", napi_int32_array, 4, uint64_t(nq), true));
  auto dropped = std::make_shared<Operand>(ReadOperand(a, info, pins, 11, "dropped", napi_int32_array, 4, uint64_t(nq), true, true));
  const bool hasDropped = !a.IsNull(11);
  return Queue(a, std::move(pins), [=]() -> int32_t {
    std::vector<Operand*> ops{idx.get(), rows.get(), lens.get(), dropped.get()};
    return RunOnStream(ops, [&](cudaStream_t s) {
      return smla_cuda_plan_rows(int32_t(nr), seq, ext, window, ratio, top ? static_cast<const int32_t*>(idx->Ptr()) : nullptr,
                                 int32_t(topk), int32_t(width), nq, static_cast<int32_t*>(rows->Ptr()),
                                 static_cast<int32_t*>(lens->Ptr()), hasDropped ? static_cast<int32_t*>(dropped->Ptr()) : nullptr, s);
    });
  });
}

// planCompressedTokenIds(seqLens (host Int32Array), extendLens (host), numRequests, ratio,
//                        pageTables (int32, host or device), pageTableOffsets (host BigInt64Array,
//                        numRequests + 1), pageSize, total, tokenIds (int64 [total], host or device))
// A ratio's compressed flat token ids on the device (native/cuda/planner.cu).
Napi::Value PlanCompressedTokenIds(const Napi::CallbackInfo& info) {
  Args a(info, "planCompressedTokenIds");
  std::vector<Napi::ObjectReference> pins;
  const int64_t nr = a.Int(2, "numRequests", 0, kI32Max);
  const int32_t* seq = a.Input<int32_t>(0, "seqLens", napi_int32_array, uint64_t(nr));
  const int32_t* ext = a.Input<int32_t>(1, "extendLens", napi_int32_array, uint64_t(nr));
  const int32_t ratio = a.Int(3, "ratio", 4, 128);
  const int64_t* offs = a.Input<int64_t>(5, "pageTableOffsets", napi_bigint64_array, uint64_t(nr) + 1);
  const int64_t tableLen = offs[nr];
  if (tableLen < 0) ThrowArgument(a.Env(), a.Op(), "pageTableOffsets: expected non-negative offsets");
  const int32_t ps = a.Int(6, "pageSize", 1, kI32Max);
  const int64_t total = a.Int(7, "total", 0, kI32Max);
  auto tables = std::make_shared<Operand>(ReadOperand(a, info, pins, 4, "pageTables", napi_int32_array, 4, uint64_t(tableLen), false));
  auto ids = std::make_shared<Operand>(ReadOperand(a, info, pins, 8, "tokenIds", napi_bigint64_array, 8, uint64_t(total), true));
  return Queue(a, std::move(pins), [=]() -> int32_t {
    std::vector<Operand*> ops{tables.get(), ids.get()};
    return RunOnStream(ops, [&](cudaStream_t s) {
      return smla_cuda_plan_compressed_token_ids(int32_t(nr), seq, ext, ratio, static_cast<const int32_t*>(tables->Ptr()), offs, ps, total,
                                                 static_cast<int64_t*>(ids->Ptr()), s);
    });
  });
}

// upload(dst: DeviceBuffer, src: typed array of exactly dst.byteLength bytes) / download(src, dst)
Napi::Value Copy(const Napi::CallbackInfo& info, bool toDevice) {
  Args a(info, toDevice ? "upload" : "download");
  std::vector<Napi::ObjectReference> pins;
  if (!info[0].IsObject() || !info[0].As<Napi::Object>().CheckTypeTag(&kDeviceBufferTag))
    ThrowArgument(a.Env(), a.Op(), "buffer: expected a DeviceBuffer");
  Napi::Object bo = info[0].As<Napi::Object>();
  std::shared_ptr<Allocation> dev = DeviceBuffer::Unwrap(bo)->Get();
  if (!dev) ThrowArgument(a.Env(), a.Op(), "buffer: the device buffer was freed");
  pins.push_back(Napi::Persistent(bo));
  if (info.Length() < 2 || !info[1].IsTypedArray()) ThrowArgument(a.Env(), a.Op(), "data: expected a typed array");
  Napi::TypedArray t = info[1].As<Napi::TypedArray>();
  void* data = nullptr;
  size_t byteLength = 0;
  napi_typedarray_type type;
  size_t length = 0;
  if (napi_get_typedarray_info(a.Env(), t, &type, &length, &data, nullptr, nullptr) != napi_ok)
    ThrowArgument(a.Env(), a.Op(), "data: cannot read the typed array's memory");
  byteLength = t.ByteLength();
  if (uint64_t(byteLength) != dev->bytes)
    ThrowArgument(a.Env(), a.Op(), "data: expected " + std::to_string(dev->bytes) + " bytes, got " + std::to_string(byteLength));
  if (toDevice) {
    uint64_t bytes = 0;
    data = const_cast<void*>(a.InputBytes(1, "data", &bytes));  // an owned copy or shared memory
  } else {
    pins.push_back(Napi::Persistent(static_cast<Napi::Object>(t)));  // an output only the caller holds
  }
  return Queue(a, std::move(pins), [dev, data, toDevice]() -> int32_t {
    cudaStream_t s;
    cudaError_t err = GetStream(&s);
    if (err == cudaSuccess && dev->bytes > 0)
      err = toDevice ? cudaMemcpyAsync(dev->ptr, data, dev->bytes, cudaMemcpyHostToDevice, s)
                     : cudaMemcpyAsync(data, dev->ptr, dev->bytes, cudaMemcpyDeviceToHost, s);
    cudaError_t sync = cudaStreamSynchronize(s);
    if (err == cudaSuccess) err = sync;
    if (err != cudaSuccess) cudaGetLastError();
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}
Napi::Value Upload(const Napi::CallbackInfo& info) { return Copy(info, true); }
Napi::Value Download(const Napi::CallbackInfo& info) { return Copy(info, false); }

// copyDevice(dst, src): device-to-device copy of equal-sized buffers (benchmarks' copy ceiling).
Napi::Value CopyDevice(const Napi::CallbackInfo& info) {
  Args a(info, "copyDevice");
  std::vector<Napi::ObjectReference> pins;
  std::shared_ptr<Allocation> bufs[2];
  for (int i = 0; i < 2; ++i) {
    if (!info[i].IsObject() || !info[i].As<Napi::Object>().CheckTypeTag(&kDeviceBufferTag)) ThrowArgument(a.Env(), a.Op(), "expected two DeviceBuffers");
    bufs[i] = DeviceBuffer::Unwrap(info[i].As<Napi::Object>())->Get();
    if (!bufs[i]) ThrowArgument(a.Env(), a.Op(), "a device buffer was freed");
    pins.push_back(Napi::Persistent(info[i].As<Napi::Object>()));
  }
  if (bufs[0]->bytes != bufs[1]->bytes) ThrowArgument(a.Env(), a.Op(), "buffers differ in size");
  auto dst = bufs[0], src = bufs[1];
  return Queue(a, std::move(pins), [dst, src]() -> int32_t {
    std::vector<Operand*> none;
    return RunOnStream(none, [&](cudaStream_t s) -> int32_t {
      cudaError_t err = dst->bytes > 0 ? cudaMemcpyAsync(dst->ptr, src->ptr, dst->bytes, cudaMemcpyDeviceToDevice, s) : cudaSuccess;
      return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
    });
  });
}

// fillDevice(dst, src): dst filled with repeats of src (benchmark inputs far larger than the
// host can build quickly, from a random block).
Napi::Value FillDevice(const Napi::CallbackInfo& info) {
  Args a(info, "fillDevice");
  std::vector<Napi::ObjectReference> pins;
  std::shared_ptr<Allocation> bufs[2];
  for (int i = 0; i < 2; ++i) {
    if (!info[i].IsObject() || !info[i].As<Napi::Object>().CheckTypeTag(&kDeviceBufferTag)) ThrowArgument(a.Env(), a.Op(), "expected two DeviceBuffers");
    bufs[i] = DeviceBuffer::Unwrap(info[i].As<Napi::Object>())->Get();
    if (!bufs[i]) ThrowArgument(a.Env(), a.Op(), "a device buffer was freed");
    pins.push_back(Napi::Persistent(info[i].As<Napi::Object>()));
  }
  if (bufs[1]->bytes == 0 && bufs[0]->bytes > 0) ThrowArgument(a.Env(), a.Op(), "empty source");
  auto dst = bufs[0], src = bufs[1];
  return Queue(a, std::move(pins), [dst, src]() -> int32_t {
    std::vector<Operand*> none;
    return RunOnStream(none, [&](cudaStream_t s) -> int32_t {
      for (uint64_t off = 0; off < dst->bytes; off += src->bytes) {
        const uint64_t n = std::min<uint64_t>(src->bytes, dst->bytes - off);
        cudaError_t err = cudaMemcpyAsync(static_cast<uint8_t*>(dst->ptr) + off, src->ptr, n, cudaMemcpyDeviceToDevice, s);
        if (err != cudaSuccess) return -int32_t(err);
      }
      return int32_t(SMLA_OK);
    });
  });
}

Napi::Value LastKernelMs(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), g_last_kernel_ms.load()); }

// probeLaunch(): one real sm_90a kernel (a one-token v4 dequant of a known record) on the stream;
// resolves when it ran and produced the expected row, rejects with the CUDA error otherwise.
Napi::Value ProbeLaunch(const Napi::CallbackInfo& info) {
  Args a(info, "probeLaunch");
  return Queue(a, {}, []() -> int32_t {
    // Page of one token (1152 bytes): nope e4m3 0x38 (= 1.0) with scale byte 128 (2^1) → 2.0
    // (bf16 0x4000); rope bf16 0x3F80 (1.0) copied.
    std::vector<uint8_t> page(1152, 0);
    std::memset(page.data(), 0x38, 448);
    for (int i = 0; i < 64; ++i) {
      page[448 + 2 * i] = 0x80;
      page[448 + 2 * i + 1] = 0x3F;
    }
    std::memset(page.data() + 576, 128, 7);
    int64_t id = 0;
    std::vector<uint16_t> row(512, 0xFFFF);
    Operand c, ids, out;
    c.host = page.data();
    c.bytes = page.size();
    ids.host = &id;
    ids.bytes = 8;
    out.host = row.data();
    out.bytes = row.size() * 2;
    out.output = true;
    std::vector<Operand*> ops{&c, &ids, &out};
    int32_t st = RunOnStream(ops, [&](cudaStream_t s) {
      return smla_cuda_dequantize_kv_cache(SMLA_CACHE_V4, static_cast<const uint8_t*>(c.Ptr()), 1, 1,
                                           static_cast<const int64_t*>(ids.Ptr()), 1, static_cast<uint16_t*>(out.Ptr()), nullptr, s);
    });
    if (st != SMLA_OK) return st;
    for (int i = 0; i < 512; ++i)
      if (row[size_t(i)] != (i < 448 ? 0x4000 : 0x3F80)) return SMLA_ERR_UNSUPPORTED;  // ran, but wrong
    return int32_t(SMLA_OK);
  });
}

// memInfo() → { free, total } bytes on device 0 (synchronous, cheap).
Napi::Value MemInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t freeB = 0, total = 0;
  cudaStream_t s;
  cudaError_t err = GetStream(&s);
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

// The DeviceBuffer class is exported as the `alloc` entry's constructor: `new ops.DeviceBuffer(n)`.
Napi::Value NewDeviceBufferClass(const Napi::CallbackInfo& info) { return DeviceBuffer::Class(info.Env()); }

const OpEntry kCudaOps[] = {
    {"sparsePrefill", SparsePrefill},
    {"pagedSparseAttention", PagedSparseAttention},
    {"dequantizeKvCache", DequantizeKvCache},
    {"planRows", PlanRows},
    {"planCompressedTokenIds", PlanCompressedTokenIds},
    {"upload", Upload},
    {"download", Download},
    {"copyDevice", CopyDevice},
    {"fillDevice", FillDevice},
    {"lastKernelMs", LastKernelMs},
    {"probeLaunch", ProbeLaunch},
    {"memInfo", MemInfo},
    {"deviceBufferClass", NewDeviceBufferClass},
};
const size_t kCudaOpCount = sizeof(kCudaOps) / sizeof(kCudaOps[0]);

}  // namespace smla_addon
