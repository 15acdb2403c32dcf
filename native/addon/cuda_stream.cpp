// The `cuda` backend's streams, device buffers, operands and staging, and the ops that move memory
// (upload, download, copyDevice, copyPeer, fillDevice), timing and memInfo. See cuda_stream.h.
#include "cuda_stream.h"

#include <atomic>
#include <climits>
#include <cstring>

namespace smla_addon {
namespace {

std::atomic<bool> g_timing{false};

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

class Stream : public Napi::ObjectWrap<Stream>, public TypedAllocation {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "Stream", {InstanceAccessor<&Stream::Device>("device"), InstanceMethod<&Stream::Synchronize>("synchronize"),
                                       InstanceMethod<&Stream::Query>("query")});
  }

  // new Stream(device): a non-blocking stream on that device.
  explicit Stream(const Napi::CallbackInfo& info) try : Napi::ObjectWrap<Stream>(info) {
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
  } catch (const std::bad_alloc&) {
    throw OutOfMemoryError(info.Env(), "stream");
  }

  StreamRef Get() const { return state_; }

 private:
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), state_->device); }
  // synchronize(): resolves once every op queued on the stream has finished (at once when the
  // stream is idle, else a pool thread waits).
  Napi::Value Synchronize(const Napi::CallbackInfo& info);
  // query(): whether everything queued on the stream has finished (cudaStreamQuery), without
  // waiting; a failed stream throws (code SMLA_CUDA_ERROR).
  Napi::Value Query(const Napi::CallbackInfo& info);

  StreamRef state_;
};

Napi::Value Stream::Synchronize(const Napi::CallbackInfo& info) try {
  Args a(info, "synchronize");
  StreamRef s = state_;
  // A stream with nothing left to run settles here: no pool thread to wake and come back from.
  const cudaError_t idle = QueryIdle(*s);
  if (idle != cudaErrorNotReady) return SettledPromise(a.Env(), a.Op(), idle == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(idle));
  return Queue(a, {}, [s]() -> int32_t {
    cudaError_t err = cudaSetDevice(s->device);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s->stream);
    if (err != cudaSuccess) cudaGetLastError();
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
} catch (const std::bad_alloc&) {
  throw OutOfMemoryError(info.Env(), "synchronize");
}

Napi::Value Stream::Query(const Napi::CallbackInfo& info) try {
  const cudaError_t err = QueryIdle(*state_);
  if (err != cudaSuccess && err != cudaErrorNotReady) throw StatusError(info.Env(), "synchronize", -int32_t(err));
  return Napi::Boolean::New(info.Env(), err == cudaSuccess);
} catch (const std::bad_alloc&) {
  throw OutOfMemoryError(info.Env(), "query");
}

const napi_type_tag kDeviceBufferTag = {0x5a1f0c3e9b2d4e71ULL, 0x8c6a3f1d2e4b5a90ULL};
// The allocation NewDeviceBuffer hands the constructor it calls on this thread (null otherwise).
thread_local std::shared_ptr<Allocation>* t_handed = nullptr;

class DeviceBuffer : public Napi::ObjectWrap<DeviceBuffer>, public TypedAllocation {
 public:
  // The class, made once per env (deviceBufferClass() and NewDeviceBuffer share it), kept in the
  // env's EnvData.
  static Napi::Function Class(Napi::Env env) {
    EnvData& data = DataOf(env);
    if (!data.device_buffer_class.IsEmpty()) return data.device_buffer_class.Value();
    Napi::Function cls = DefineClass(env, "DeviceBuffer",
                                     {InstanceAccessor<&DeviceBuffer::ByteLength>("byteLength"), InstanceAccessor<&DeviceBuffer::Device>("device"),
                                      InstanceAccessor<&DeviceBuffer::Freed>("freed"), InstanceMethod<&DeviceBuffer::Free>("free")});
    data.device_buffer_class = Napi::Persistent(cls);
    return cls;
  }

  // new DeviceBuffer(bytes, stream): cudaMallocAsync on the stream (usable by every later call on it).
  // new DeviceBuffer(bytes, stream, base, byteOffset): a view of `bytes` at byteOffset (a multiple of
  // 256) inside base, a DeviceBuffer of the same stream: no CUDA call; the memory goes back once the
  // base and every view of it have let go (one allocation for several outputs of one call).
  // (Called by NewDeviceBuffer: the allocation it hands over, adopted as it is.)
  explicit DeviceBuffer(const Napi::CallbackInfo& info) try : Napi::ObjectWrap<DeviceBuffer>(info) {
    Napi::Env env = info.Env();
    if (t_handed != nullptr) {
      std::shared_ptr<Allocation>* handed = t_handed;
      t_handed = nullptr;
      Adopt(info, std::move(*handed));
      return;
    }
    if (info.Length() < 1 || !info[0].IsNumber()) ThrowArgument(env, "alloc", "bytes: expected a number");
    const double b = info[0].As<Napi::Number>().DoubleValue();
    if (!(b >= 0 && b <= 9007199254740991.0) || b != double(int64_t(b))) ThrowArgument(env, "alloc", "bytes: expected a non-negative integer");
    const uint64_t bytes = uint64_t(b);
    StreamRef stream = StreamArg(info, 1, "alloc");
    if (info.Length() > 2) {
      Args args(info, "alloc");
      std::shared_ptr<Allocation> base = BufferOf(args, info[2], "base", *stream);
      if (base->stream != stream) ThrowArgument(env, "alloc", "base: a buffer of another stream");
      const double off = info.Length() > 3 && info[3].IsNumber() ? info[3].As<Napi::Number>().DoubleValue() : -1;
      if (!(off >= 0 && off <= 9007199254740991.0) || off != double(int64_t(off)) || int64_t(off) % 256 != 0)
        ThrowArgument(env, "alloc", "byteOffset: expected a non-negative multiple of 256");
      if (uint64_t(off) + bytes > base->bytes)
        ThrowArgument(env, "alloc", "a view of " + std::to_string(bytes) + " bytes at " + std::to_string(uint64_t(off)) + " does not fit a buffer of " + std::to_string(base->bytes) + " bytes");
      Adopt(info, ViewOf(base, uint64_t(off), bytes));
      return;
    }
    std::shared_ptr<Allocation> a;
    const cudaError_t err = Allocate(stream, bytes, &a);
    if (err != cudaSuccess) {
      Napi::Error e = Napi::Error::New(env, "alloc: CUDA failed: " + CudaErrorText(err) + " (" + std::to_string(bytes) + " bytes)");
      e.Set("code", Napi::String::New(env, "SMLA_CUDA_ERROR"));
      e.Set("status", Napi::String::New(env, CudaErrorText(err)));
      throw e;
    }
    Adopt(info, std::move(a));
  } catch (const std::bad_alloc&) {
    throw OutOfMemoryError(info.Env(), "alloc");
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

  void Adopt(const Napi::CallbackInfo& info, std::shared_ptr<Allocation> a) {
    alloc_ = std::move(a);
    device_ = alloc_->stream->device;
    info.This().As<Napi::Object>().TypeTag(&kDeviceBufferTag);
  }

  std::shared_ptr<Allocation> alloc_;
  int device_ = 0;
};

// The allocation of argument i (a DeviceBuffer of this stream's device), or a thrown argument error.
std::shared_ptr<Allocation> BufferArg(Args& a, const Napi::CallbackInfo& info, size_t i, const char* name, const StreamState& s) {
  return BufferOf(a, i < info.Length() ? info[i] : a.Env().Undefined(), name, s);
}

}  // namespace

cudaError_t StreamState::TakeReadSlot(ReadSlot* slot) {
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    if (!free_slots_.empty()) {
      *slot = free_slots_.back();
      free_slots_.pop_back();
      return cudaSuccess;
    }
    free_slots_.reserve(slots_made_ + 1);  // may throw (JS thread): nothing made yet
  }
  ReadSlot made;
  cudaError_t err = cudaMallocHost(&made.host, kSmallReadBytes);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&made.landed, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&made.fork, cudaEventDisableTiming);
  if (err != cudaSuccess) {
    if (made.host) cudaFreeHost(made.host);
    if (made.landed) cudaEventDestroy(made.landed);
    return err;
  }
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    slots_made_++;
  }
  *slot = made;
  return cudaSuccess;
}

void StreamState::GiveBackReadSlot(ReadSlot slot) {
  std::lock_guard<std::mutex> lock(slots_mutex_);
  free_slots_.push_back(slot);
}

cudaError_t StreamState::SideStream(cudaStream_t* side) {
  std::lock_guard<std::mutex> lock(slots_mutex_);
  if (!side_) {
    const cudaError_t err = cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      side_ = nullptr;
      return err;
    }
  }
  *side = side_;
  return cudaSuccess;
}

cudaError_t QueueSmallRead(StreamState& s, const void* src, uint64_t bytes, SmallReadSlot* read) {
  cudaError_t err = cudaSetDevice(s.device);
  if (err == cudaSuccess) err = s.TakeReadSlot(&read->slot);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return err;
  }
  read->bytes = bytes;
  err = cudaMemcpyAsync(read->slot.host, src, bytes, cudaMemcpyDeviceToHost, s.stream);
  if (err == cudaSuccess) err = cudaEventRecord(read->slot.landed, s.stream);
  if (err != cudaSuccess) {
    s.GiveBackReadSlot(read->slot);
    cudaGetLastError();
  }
  return err;
}

cudaError_t ForkSmallRead(StreamState& s, uint64_t bytes, SmallReadSlot* read) {
  cudaStream_t side = nullptr;
  cudaError_t err = cudaSetDevice(s.device);
  if (err == cudaSuccess) err = s.SideStream(&side);
  if (err == cudaSuccess) err = s.TakeReadSlot(&read->slot);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return err;
  }
  read->bytes = bytes;
  if ((err = cudaEventRecord(read->slot.fork, s.stream)) != cudaSuccess) {
    s.GiveBackReadSlot(read->slot);
    cudaGetLastError();
  }
  return err;
}

cudaError_t CopyForkedRead(StreamState& s, const void* src, SmallReadSlot* read) {
  cudaStream_t side = nullptr;
  cudaError_t err = s.SideStream(&side);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(side, read->slot.fork, 0);
  if (err == cudaSuccess) err = cudaMemcpyAsync(read->slot.host, src, read->bytes, cudaMemcpyDeviceToHost, side);
  if (err == cudaSuccess) err = cudaEventRecord(read->slot.landed, side);
  if (err != cudaSuccess) {
    s.GiveBackReadSlot(read->slot);
    cudaGetLastError();
  }
  return err;
}

cudaError_t JoinSmallRead(StreamState& s, const SmallReadSlot& read) {
  cudaError_t err = cudaSetDevice(s.device);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(s.stream, read.slot.landed, 0);
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

Napi::Promise AwaitSmallRead(Args& a, std::vector<Napi::ObjectReference> pins, StreamRef s, SmallReadSlot read, void* data, int32_t status,
                             std::shared_ptr<void> keep) {
  return Queue(a, std::move(pins), [s, read, data, status, keep]() -> int32_t {
    cudaError_t err = cudaSetDevice(s->device);
    if (err == cudaSuccess) err = cudaEventSynchronize(read.slot.landed);
    if (err == cudaSuccess && status == SMLA_OK) std::memcpy(data, read.slot.host, read.bytes);
    s->GiveBackReadSlot(read.slot);
    if (err != cudaSuccess) cudaGetLastError();
    return status != SMLA_OK ? status : err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}

cudaError_t QueryIdle(const StreamState& s) {
  cudaError_t err = cudaSetDevice(s.device);
  if (err == cudaSuccess) err = cudaStreamQuery(s.stream);
  if (err == cudaErrorNotReady) {
    // a state, not an error: it must not reach the next launch's cudaGetLastError
    if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();
  } else if (err != cudaSuccess) {
    cudaGetLastError();
  }
  return err;
}

StreamState::~StreamState() {
  if (cudaSetDevice(device) != cudaSuccess) return;
  for (auto& t : timed) cudaEventDestroy(t.first), cudaEventDestroy(t.second);
  for (auto& slot : free_slots_) cudaFreeHost(slot.host), cudaEventDestroy(slot.landed), cudaEventDestroy(slot.fork);
  if (side_ && cudaStreamDestroy(side_) != cudaSuccess) cudaGetLastError();
  if (stream && cudaStreamDestroy(stream) != cudaSuccess) cudaGetLastError();
}

StreamRef StreamArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (i >= info.Length() || !info[i].IsObject() || !info[i].As<Napi::Object>().CheckTypeTag(&kStreamTag))
    ThrowArgument(info.Env(), op, "stream: expected a Stream (the engine's)");
  return Stream::Unwrap(info[i].As<Napi::Object>())->Get();
}

Allocation::~Allocation() {
  if (ptr && !base && cudaSetDevice(stream->device) == cudaSuccess) {
    if (cudaFreeAsync(ptr, stream->stream) != cudaSuccess) cudaGetLastError();  // e.g. at process exit
  }
}

cudaError_t Allocate(const StreamRef& s, uint64_t bytes, std::shared_ptr<Allocation>* out) {
  auto a = std::make_shared<Allocation>();
  a->bytes = bytes;
  a->stream = s;
  cudaError_t err = cudaSetDevice(s->device);
  if (err == cudaSuccess && bytes > 0) err = cudaMallocAsync(&a->ptr, bytes, s->stream);
  if (err != cudaSuccess) {
    a->ptr = nullptr;
    cudaGetLastError();
    return err;
  }
  *out = std::move(a);
  return cudaSuccess;
}

std::shared_ptr<Allocation> ViewOf(const std::shared_ptr<Allocation>& base, uint64_t byte_offset, uint64_t bytes) {
  auto v = std::make_shared<Allocation>();
  v->bytes = bytes;
  v->stream = base->stream;
  v->ptr = bytes > 0 ? static_cast<uint8_t*>(base->ptr) + byte_offset : nullptr;
  v->base = base->base ? base->base : base;
  return v;
}

Napi::Object NewDeviceBuffer(Napi::Env env, std::shared_ptr<Allocation> a) {
  Napi::Function cls = DeviceBuffer::Class(env);
  // napi_new_instance runs the constructor at once, with no other JS in between
  t_handed = &a;
  try {
    Napi::Object b = cls.New({});
    t_handed = nullptr;
    return b;
  } catch (...) {
    t_handed = nullptr;
    throw;
  }
}

std::shared_ptr<Allocation> BufferOf(Args& a, Napi::Value value, const std::string& name, const StreamState& s) {
  if (!value.IsObject() || value.IsTypedArray() || !value.As<Napi::Object>().CheckTypeTag(&kDeviceBufferTag))
    ThrowArgument(a.Env(), a.Op(), name + ": expected a DeviceBuffer");
  std::shared_ptr<Allocation> b = DeviceBuffer::Unwrap(value.As<Napi::Object>())->Get();
  if (!b) ThrowArgument(a.Env(), a.Op(), name + ": the device buffer was freed");
  if (b->stream->device != s.device)
    ThrowArgument(a.Env(), a.Op(), name + ": a buffer on device " + std::to_string(b->stream->device) + ", this engine runs on device " + std::to_string(s.device));
  return b;
}

// ---- operands -------------------------------------------------------------------------------------

bool CudaFields::OnDevice(const char* name) const {
  const Napi::Value v = f_.Get(name);
  return v.IsObject() && !v.IsTypedArray();
}

// A DeviceBuffer of exactly elem * count bytes (on the stream's device), or a typed array of `type`
// with exactly `count` elements.
std::shared_ptr<Operand> CudaFields::Read(const char* name, napi_typedarray_type type, uint64_t elem, uint64_t count, bool output,
                                          bool nullable) {
  auto o = std::make_shared<Operand>();
  o->output = output;
  o->name = name;
  o->bytes = elem * count;
  const Napi::Value v = f_.Get(name);
  if (output && outputs_later_) {
    if (!v.IsNull() && !v.IsUndefined()) ThrowArgument(a_.Env(), a_.Op(), std::string(name) + ": expected null (bound per call)");
  } else if (!v.IsNull() && v.IsObject() && !v.IsTypedArray()) {
    o->device = BufferOf(a_, v, name, s_);
    if (o->device->bytes != o->bytes)
      ThrowArgument(a_.Env(), a_.Op(), std::string(name) + ": expected a device buffer of " + std::to_string(o->bytes) + " bytes, got " +
                                           std::to_string(o->device->bytes));
    buffers_.push_back(v.As<Napi::Object>());
  } else {
    // A host input is a copy the call owns or shared memory (addon.h, Args): H2D reads it later.
    if (output) {
      uint8_t* data = nullptr;
      f_.Output(data, name, type, count, nullable);
      o->host = data;
    } else {
      const uint8_t* data = nullptr;
      f_.Input(data, name, type, count, nullable);
      o->host = const_cast<uint8_t*>(data);
    }
    if (!o->host) o->bytes = 0;
  }
  operands_.push_back(o);
  return o;
}

std::shared_ptr<Allocation> CudaFields::Buffer(const char* name) {
  const Napi::Value v = f_.Get(name);
  std::shared_ptr<Allocation> b = BufferOf(a_, v, name, s_);
  buffers_.push_back(v.As<Napi::Object>());
  return b;
}

// ---- running an op on its stream -----------------------------------------------------------------

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

cudaError_t WaitForQueued(cudaStream_t s) {
  cudaEvent_t done = nullptr;
  cudaError_t err = cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventRecord(done, s);
  if (err == cudaSuccess) err = cudaEventSynchronize(done);
  if (done) cudaEventDestroy(done);
  return err;
}

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
  cudaError_t err = WaitForQueued(s);
  if (status == SMLA_OK && err != cudaSuccess) status = -int32_t(err);
  if (status != SMLA_OK) cudaGetLastError();
  return status;
}

bool TimingOn() { return g_timing.load(); }

Napi::Promise Queue(Args& a, std::vector<Napi::ObjectReference> pins, std::function<int32_t()> body) {
  RowJob job;
  job.rows = 1;
  job.threads = 1;
  job.run = [body = std::move(body)](int64_t, int64_t) { return body(); };
  Holds all = a.TakeHolds();
  for (auto& p : pins) all.pins.push_back(std::move(p));
  return QueueRowJob(a.Env(), a.Op(), std::move(job), std::move(all));
}

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

// ---- memory ops ---------------------------------------------------------------------------------

namespace {

// A download of at most kSmallReadBytes: the copy is queued here, on the calling thread, into a
// pinned read slot (QueueSmallRead), so it sits in the stream exactly where the caller asked (after
// the ops queued before it, before those queued after) as one small DMA rather than a staged
// pageable copy; a pool thread only waits for the slot's event and copies the bytes out.
Napi::Value SmallRead(Args& a, std::vector<Napi::ObjectReference> pins, StreamRef st, std::shared_ptr<Allocation> dev, void* data) {
  SmallReadSlot read;
  const cudaError_t err = QueueSmallRead(*st, dev->ptr, dev->bytes, &read);
  if (err != cudaSuccess) return SettledPromise(a.Env(), a.Op(), -int32_t(err));
  // `dev` rides along: the read's source stays allocated until the read has landed
  return AwaitSmallRead(a, std::move(pins), st, read, data, int32_t(SMLA_OK), dev);
}

// upload(dst: DeviceBuffer, src: typed array of exactly dst.byteLength bytes, stream) /
// download(src, dst, stream): on a pool thread, resolved when the copy is done (not waiting for
// work queued on the stream after it); a small download is queued on the calling thread
// (SmallRead).
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
    if (dev->bytes > 0 && dev->bytes <= kSmallReadBytes) return SmallRead(a, std::move(pins), st, dev, data);
  }
  return Queue(a, std::move(pins), [st, dev, data, toDevice]() -> int32_t {
    cudaError_t err = cudaSetDevice(st->device);
    if (err == cudaSuccess && dev->bytes > 0)
      err = toDevice ? cudaMemcpyAsync(dev->ptr, data, dev->bytes, cudaMemcpyHostToDevice, st->stream)
                     : cudaMemcpyAsync(data, dev->ptr, dev->bytes, cudaMemcpyDeviceToHost, st->stream);
    cudaError_t sync = WaitForQueued(st->stream);
    if (err == cudaSuccess) err = sync;
    if (err != cudaSuccess) cudaGetLastError();
    return err == cudaSuccess ? int32_t(SMLA_OK) : -int32_t(err);
  });
}

}  // namespace

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
    const cudaError_t sync = WaitForQueued(ds->stream);
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

// takeKernelSpans(stream): like takeKernelMs, but each timed launch as [start, end] device ms
// measured from the first one's start (flattened: start0, end0, start1, end1, ...), so the gaps
// between launches (untimed device work, or the device waiting for the host) show; forgets them.
Napi::Value TakeKernelSpans(const Napi::CallbackInfo& info) {
  StreamRef st = StreamArg(info, 0, "takeKernelSpans");
  std::lock_guard<std::mutex> lock(st->mutex);
  Napi::Array out = Napi::Array::New(info.Env(), 2 * st->timed.size());
  cudaSetDevice(st->device);
  const cudaEvent_t origin = st->timed.empty() ? nullptr : st->timed.front().first;
  for (size_t i = 0; i < st->timed.size(); ++i) {
    float start = -1.0f, end = -1.0f;
    if (cudaEventSynchronize(st->timed[i].second) != cudaSuccess || cudaEventElapsedTime(&start, origin, st->timed[i].first) != cudaSuccess ||
        cudaEventElapsedTime(&end, origin, st->timed[i].second) != cudaSuccess)
      start = end = -1.0f;
    out.Set(uint32_t(2 * i), Napi::Number::New(info.Env(), double(start)));
    out.Set(uint32_t(2 * i + 1), Napi::Number::New(info.Env(), double(end)));
  }
  for (auto& t : st->timed) cudaEventDestroy(t.first), cudaEventDestroy(t.second);
  st->timed.clear();
  cudaGetLastError();
  return out;
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

// The classes are exported as constructors: `new ops.Stream(device)`, `new ops.DeviceBuffer(n, stream)`.
Napi::Value NewDeviceBufferClass(const Napi::CallbackInfo& info) { return DeviceBuffer::Class(info.Env()); }
Napi::Value NewStreamClass(const Napi::CallbackInfo& info) { return Stream::Class(info.Env()); }

}  // namespace smla_addon
