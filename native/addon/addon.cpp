// Module entry of sparse_mla_native.node: the op tables, build facts, and the row-parallel worker
// every CPU op runs on. The TS side (src/backends/native/binding.ts) types this surface.
#include "addon.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <thread>

#include "sparse_mla/sparse_mla.h"

// The fingerprint of the sources this addon was built from (native/CMakeLists.txt).
#ifndef SMLA_SOURCE_FINGERPRINT
#define SMLA_SOURCE_FINGERPRINT ""
#endif

namespace smla_addon {

std::string StatusName(int32_t status) {
  switch (status) {
    case SMLA_OK: return "SMLA_OK";
    case SMLA_ERR_INVALID_ARGUMENT: return "SMLA_ERR_INVALID_ARGUMENT";
    case SMLA_ERR_OUT_OF_RANGE: return "SMLA_ERR_OUT_OF_RANGE";
    case SMLA_ERR_OUT_OF_MEMORY: return "SMLA_ERR_OUT_OF_MEMORY";
    case SMLA_ERR_UNSUPPORTED: return "SMLA_ERR_UNSUPPORTED";
    default: return status < 0 ? CudaErrorText(-status) : "SMLA_ERR_UNKNOWN(" + std::to_string(status) + ")";
  }
}

void ThrowArgument(Napi::Env env, const std::string& op, const std::string& message) {
  Napi::Error e = Napi::TypeError::New(env, "sparse_mla_native." + op + ": " + message);
  e.Set("code", Napi::String::New(env, "SMLA_ADDON_ARGUMENT"));
  throw e;
}

// ---- argument reading ---------------------------------------------------------------------------

int32_t Args::IntOf(Napi::Value value, const char* name, int64_t lo, int64_t hi) const {
  if (!value.IsNumber()) ThrowArgument(Env(), op_, std::string(name) + ": expected a number");
  double v = value.As<Napi::Number>().DoubleValue();
  if (!(v >= double(lo) && v <= double(hi)) || v != double(int64_t(v)))
    ThrowArgument(Env(), op_, std::string(name) + ": expected an integer in [" + std::to_string(lo) + ", " +
                                  std::to_string(hi) + "], got " + std::to_string(v));
  return int32_t(v);
}

float Args::FloatOf(Napi::Value value, const char* name) const {
  if (!value.IsNumber()) ThrowArgument(Env(), op_, std::string(name) + ": expected a number");
  return value.As<Napi::Number>().FloatValue();
}

Args::Fields Args::ObjectOf(Napi::Value v, const char* name) {
  if (!v.IsObject() || v.IsTypedArray() || v.IsArray()) ThrowArgument(Env(), op_, std::string(name) + ": expected a params object");
  return Fields(*this, v.As<Napi::Object>());
}

static const char* TypeName(napi_typedarray_type t) {
  switch (t) {
    case napi_uint8_array: return "Uint8Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_int32_array: return "Int32Array";
    case napi_float32_array: return "Float32Array";
    default: return "another typed array";
  }
}

uint8_t* Args::Own(uint64_t bytes) {
  uint8_t* p = bytes <= SIZE_MAX ? new (std::nothrow) uint8_t[size_t(bytes ? bytes : 1)] : nullptr;
  if (!p) {
    Napi::Error e = Napi::Error::New(Env(), "sparse_mla_native." + std::string(op_) + ": cannot allocate " + std::to_string(bytes) + " bytes");
    e.Set("code", Napi::String::New(Env(), "SMLA_OUT_OF_MEMORY"));
    throw e;
  }
  holds_.copies.emplace_back(p);
  return p;
}

const void* Args::InPlaceOrCopy(Napi::TypedArray a, void* data, uint64_t bytes, bool copy_unshared, bool* shared, bool copy_shared) {
  holds_.pins.push_back(Napi::Persistent(static_cast<Napi::Object>(a)));
  napi_value buffer = nullptr;
  bool plain = true;  // an ArrayBuffer (detachable, maybe resizable), not a SharedArrayBuffer
  if (napi_get_typedarray_info(Env(), a, nullptr, nullptr, nullptr, &buffer, nullptr) != napi_ok ||
      napi_is_arraybuffer(Env(), buffer, &plain) != napi_ok)
    ThrowArgument(Env(), op_, "cannot read a typed array's buffer");
  if (shared) *shared = !plain;
  if (bytes == 0) return nullptr;
  if (plain ? !copy_unshared : !copy_shared) return data;
  uint8_t* copy = Own(bytes);
  std::memcpy(copy, data, size_t(bytes));
  return copy;
}

void* Args::ArrayData(Napi::Value value, const char* name, napi_typedarray_type type, uint64_t length, bool nullable, Use use, bool* shared) {
  if (Absent(value)) {
    if (nullable) return nullptr;
    ThrowArgument(Env(), op_, std::string(name) + ": expected a " + TypeName(type) + ", got null");
  }
  if (!value.IsTypedArray()) ThrowArgument(Env(), op_, std::string(name) + ": expected a " + TypeName(type));
  Napi::TypedArray a = value.As<Napi::TypedArray>();
  if (a.TypedArrayType() != type)
    ThrowArgument(Env(), op_, std::string(name) + ": expected a " + TypeName(type) + ", got a " + TypeName(a.TypedArrayType()));
  if (uint64_t(a.ElementLength()) != length)
    ThrowArgument(Env(), op_, std::string(name) + ": expected " + std::to_string(length) + " elements, got " +
                                  std::to_string(a.ElementLength()));
  // The raw call: it gives the view's data pointer (offset applied) for ArrayBuffer and
  // SharedArrayBuffer backing alike (Napi::ArrayBuffer refuses a SharedArrayBuffer).
  void* data = nullptr;
  if (napi_get_typedarray_info(Env(), a, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok)
    ThrowArgument(Env(), op_, std::string(name) + ": cannot read the typed array's memory");
  if (use == Use::kOutput) {
    holds_.pins.push_back(Napi::Persistent(static_cast<Napi::Object>(a)));
    return length == 0 ? nullptr : data;
  }
  return const_cast<void*>(InPlaceOrCopy(a, data, uint64_t(a.ByteLength()), use != Use::kBorrow, shared, use == Use::kSnapshot));
}

const void* Args::InputBytes(size_t i, const char* name, uint64_t* bytes) {
  if (i >= info_.Length() || !info_[i].IsTypedArray()) ThrowArgument(Env(), op_, std::string(name) + ": expected a typed array");
  Napi::TypedArray a = info_[i].As<Napi::TypedArray>();
  void* data = nullptr;
  if (napi_get_typedarray_info(Env(), a, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok)
    ThrowArgument(Env(), op_, std::string(name) + ": cannot read the typed array's memory");
  *bytes = uint64_t(a.ByteLength());
  return InPlaceOrCopy(a, data, *bytes, true, nullptr);
}

// ---- the row-parallel worker --------------------------------------------------------------------

namespace {

int32_t Guarded(const std::function<int32_t()>& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return SMLA_ERR_OUT_OF_MEMORY;
  } catch (...) {
    return SMLA_ERR_INVALID_ARGUMENT;
  }
}

}  // namespace

Napi::Error StatusError(Napi::Env env, const char* op, int32_t status) {
  const bool cuda = status < 0;
  Napi::Error e = Napi::Error::New(env, std::string(op) + (cuda ? ": CUDA failed: " : ": the core returned ") + StatusName(status));
  e.Set("code", Napi::String::New(env, cuda ? "SMLA_CUDA_ERROR" : "SMLA_CORE_STATUS"));
  e.Set("status", Napi::String::New(env, StatusName(status)));
  return e;
}

Napi::Promise SettledPromise(Napi::Env env, const char* op, int32_t status) {
  Napi::Promise::Deferred d(env);
  if (status == SMLA_OK) d.Resolve(env.Undefined());
  else d.Reject(StatusError(env, op, status).Value());
  return d.Promise();
}

namespace {

class RowJobWorker final : public Napi::AsyncWorker {
 public:
  RowJobWorker(Napi::Env env, const char* op, RowJob job, Holds holds)
      : Napi::AsyncWorker(env, op), op_(op), job_(std::move(job)), holds_(std::move(holds)), deferred_(env) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    int64_t rows = job_.rows;
    if (job_.prepare) status_ = Guarded([&] { return job_.prepare(rows); });
    if (status_ == SMLA_OK && rows > 0) status_ = RunSplit(rows);
    if (status_ != SMLA_OK) SetError(StatusName(status_));  // OnError builds the JS error
  }

  void OnOK() override {
    Napi::Env env = Env();
    const std::string why = job_.check ? job_.check(env) : std::string();
    if (why.empty()) {
      deferred_.Resolve(env.Undefined());  // throws when the env is being torn down: nothing is written then
      settled_ = true;
      if (job_.commit) job_.commit();
      return;
    }
    Napi::Error e = Napi::Error::New(env, std::string(op_) + ": " + why);
    e.Set("code", Napi::String::New(env, "SMLA_DETACHED"));
    deferred_.Reject(e.Value());
    settled_ = true;
  }

  void OnError(const Napi::Error&) override {
    deferred_.Reject(StatusError(Env(), op_, status_).Value());
    settled_ = true;
  }

  // Node tears a worker thread's env down (worker.terminate(), process.exit() in the worker) by
  // running its loop until the pool jobs in flight have come back, with JS already stopped: the
  // promise can no longer be settled, and node-addon-api's own completion turns that failure into
  // a C++ exception thrown out of a catch block, which aborts the whole process. Here whatever
  // throws while settling rejects the promise if it is not settled yet (so a live caller is told,
  // never left waiting) and is dropped when even that fails (the env is going away: nobody is left
  // to tell); the job is freed either way.
  void OnWorkComplete(Napi::Env env, napi_status status) override {
    if (status != napi_cancelled) {
      napi_handle_scope scope = nullptr;
      const bool scoped = napi_open_handle_scope(env, &scope) == napi_ok;
      try {
        if (status_ == SMLA_OK) OnOK();
        else OnError(Napi::Error());
      } catch (const Napi::Error& e) {
        RejectIfUnsettled([&] { return e.Value(); });
      } catch (const std::exception& e) {
        RejectIfUnsettled([&] { return Napi::Error::New(env, std::string(op_) + ": " + e.what()).Value(); });
      } catch (...) {
        RejectIfUnsettled([&] { return Napi::Error::New(env, std::string(op_) + ": failed while settling").Value(); });
      }
      if (scoped) napi_close_handle_scope(env, scope);
    }
    Destroy();
  }

 private:
  int32_t RunSplit(int64_t rows) {
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(job_.threads, rows));
    std::vector<int32_t> status(size_t(parts), SMLA_OK);
    auto range = [&](int64_t p) {
      const int64_t begin = rows * p / parts, end = rows * (p + 1) / parts;
      status[size_t(p)] = Guarded([&] { return job_.run(begin, end); });
    };
    std::vector<std::thread> threads;
    threads.reserve(size_t(parts - 1));
    for (int64_t p = 1; p < parts; ++p) {
      try {
        threads.emplace_back(range, p);
      } catch (...) {  // no thread to be had: do that range here
        range(p);
      }
    }
    range(0);
    for (auto& t : threads) t.join();
    for (int32_t s : status)
      if (s != SMLA_OK) return s;
    return SMLA_OK;
  }

  const char* op_;
  RowJob job_;
  Holds holds_;
  template <class MakeError>
  void RejectIfUnsettled(MakeError make) noexcept {
    if (settled_) return;
    try {
      deferred_.Reject(make());
      settled_ = true;
    } catch (...) {
    }
  }

  Napi::Promise::Deferred deferred_;
  bool settled_ = false;
  int32_t status_ = SMLA_OK;
};

}  // namespace

Napi::Promise QueueRowJob(Napi::Env env, const char* op, RowJob job, Holds holds) {
  auto* w = new RowJobWorker(env, op, std::move(job), std::move(holds));
  Napi::Promise p = w->Promise();
  w->Queue();  // deletes itself after OnOK/OnError, on the main thread (releasing pins and copies)
  return p;
}

// ---- module -------------------------------------------------------------------------------------

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("abiVersion", Napi::Number::New(env, smla_abi_version()));
  Napi::Object build = Napi::Object::New(env);
  build.Set("cpuArch", Napi::String::New(env, SMLA_CPU_ARCH));
  build.Set("simd", Napi::String::New(env, CoreSimdPath()));
  build.Set("hardwareThreads", Napi::Number::New(env, std::thread::hardware_concurrency()));
  build.Set("sources", Napi::String::New(env, SMLA_SOURCE_FINGERPRINT));
  exports.Set("build", build);

  Napi::Object cpu = Napi::Object::New(env);
  for (size_t i = 0; i < kCpuOpCount; ++i) cpu.Set(kCpuOps[i].name, Napi::Function::New(env, kCpuOps[i].fn, kCpuOps[i].name));
  exports.Set("cpu", cpu);
  exports.Set("cuda", CudaInfo(env));  // cuda_device.cpp (+ the cuda_ops.cpp table when built)
  return exports;
}

}  // namespace smla_addon

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return smla_addon::Init(env, exports); }
NODE_API_MODULE(sparse_mla_native, InitModule)
