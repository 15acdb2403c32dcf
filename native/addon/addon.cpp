// Module entry of sparse_mla_native.node: the op tables, build facts, and the row-parallel worker
// every CPU op runs on. The TS side (src/backends/native/binding.ts) types this surface.
#include "addon.h"

#include <algorithm>
#include <chrono>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <map>
#include <mutex>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <thread>

#include "sparse_mla/sparse_mla.h"

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

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
    case kNoThread: return "no thread could be started for the call (the system refused one, or no memory was left) and none of the addon's was running";
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

// ---- failures that must not escape ---------------------------------------------------------------

namespace {

// An Error `op: what` with `code`, made through the C API from a fixed buffer: usable right after a
// C++ allocation failed. nullptr when even that fails (V8 itself out of memory).
napi_value PlainError(napi_env env, const char* code, const char* op, const char* what) noexcept {
  char text[320];
  std::snprintf(text, sizeof text, "%s: %s", op, what);
  napi_value code_value = nullptr, message = nullptr, error = nullptr;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_value) != napi_ok ||
      napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message) != napi_ok || napi_create_error(env, code_value, message, &error) != napi_ok)
    return nullptr;
  return error;
}

void ThrowPlain(napi_env env, const char* code, const char* op, const char* what) noexcept {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  if (napi_value e = PlainError(env, code, op, what)) napi_throw(env, e);
  else napi_throw_error(env, code, what);
}

// Runs a job's prepare or run: an exception becomes a status (nothing may leave a worker thread).
template <class F>
int32_t Guarded(F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return SMLA_ERR_OUT_OF_MEMORY;
  } catch (...) {
    return SMLA_ERR_INVALID_ARGUMENT;
  }
}

}  // namespace

// A pending promise's resolve and reject functions, held by references. Not a napi_deferred: Node
// frees a deferred only in napi_resolve_deferred / napi_reject_deferred, which refuse once the
// env's JS has stopped, so every promise still pending when its Worker was terminated leaked one
// (a 32-byte block); a reference is freed by napi_delete_reference, which works then too. JS
// thread only.
struct Resolvers {
  napi_env env = nullptr;
  napi_ref resolve = nullptr;
  napi_ref reject = nullptr;

  Resolvers() = default;
  Resolvers(const Resolvers&) = delete;
  Resolvers& operator=(const Resolvers&) = delete;
  ~Resolvers() { Release(); }

  bool Pending() const { return resolve != nullptr; }
  // Lets go of the functions (the promise stays pending if it was not settled).
  void Release() noexcept {
    if (resolve) napi_delete_reference(env, resolve);
    if (reject) napi_delete_reference(env, reject);
    resolve = reject = nullptr;
  }
  // Settles the promise with `v`: napi_ok once settled (and released); any failure leaves it
  // pending (JS stopped: a Worker being torn down refuses the call before it is made).
  napi_status Conclude(bool fulfil, napi_value v) noexcept {
    if (!resolve || !reject || !v) return napi_generic_failure;
    napi_value fn = nullptr, undefined = nullptr;
    napi_status s = napi_get_reference_value(env, fulfil ? resolve : reject, &fn);
    if (s == napi_ok) s = napi_get_undefined(env, &undefined);
    if (s == napi_ok) s = napi_call_function(env, undefined, fn, 1, &v, nullptr);
    if (s == napi_ok) Release();
    return s;
  }
};

EnvData& DataOf(Napi::Env env) { return *env.GetInstanceData<EnvData>(); }

namespace {

// The executor of NewPromise's `new Promise(...)`: keeps its resolve and reject in EnvData::capture.
napi_value CaptureResolvers(napi_env env, napi_callback_info info) noexcept {
  size_t argc = 2;
  napi_value argv[2] = {nullptr, nullptr};
  void* data = nullptr;
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, &data) != napi_ok || argc < 2 || !data) return nullptr;
  Resolvers* r = static_cast<EnvData*>(data)->capture;
  static_cast<EnvData*>(data)->capture = nullptr;
  if (!r) return nullptr;
  if (napi_create_reference(env, argv[0], 1, &r->resolve) != napi_ok) r->resolve = nullptr;
  if (napi_create_reference(env, argv[1], 1, &r->reject) != napi_ok) r->reject = nullptr;
  if (!r->resolve || !r->reject) r->Release();
  return nullptr;
}

// A new pending promise whose resolving functions `out` holds; throws when it cannot be made.
napi_value NewPromise(Napi::Env env, const char* op, Resolvers* out) {
  EnvData& d = DataOf(env);
  out->env = env;
  napi_value executor = d.capture_resolvers.Value(), promise = nullptr;
  d.capture = out;
  const napi_status s = napi_new_instance(env, d.promise_constructor.Value(), 1, &executor, &promise);
  d.capture = nullptr;
  if (s != napi_ok || !out->Pending()) {
    out->Release();
    throw Napi::Error::New(env, std::string(op) + ": cannot create a promise");
  }
  return promise;
}

}  // namespace

Napi::Function OpFunctionOf(Napi::Env env, const OpEntry& entry) {
  return Napi::Function::New(
      env,
      [fn = entry.fn, name = entry.name](const Napi::CallbackInfo& info) -> Napi::Value {
        try {
          return fn(info);
        } catch (const Napi::Error& e) {
          // Thrown here rather than by node-addon-api, which throws a C++ exception out of its
          // catch block (std::terminate) when napi_throw fails: in a Worker being terminated,
          // whose JS can no longer run (a call made just then fails to read its arguments).
          napi_value v = nullptr;
          try {
            v = e.Value();
          } catch (...) {
          }
          bool pending = false;
          if (v && napi_is_exception_pending(info.Env(), &pending) == napi_ok && !pending) napi_throw(info.Env(), v);
        } catch (const std::bad_alloc&) {
          ThrowPlain(info.Env(), "SMLA_OUT_OF_MEMORY", name, "out of memory (nothing was queued)");
        } catch (const std::exception& e) {
          ThrowPlain(info.Env(), "SMLA_ADDON_FAILURE", name, e.what());
        } catch (...) {
          ThrowPlain(info.Env(), "SMLA_ADDON_FAILURE", name, "a native exception");
        }
        return Napi::Value();
      },
      entry.name);
}

Napi::Error OutOfMemoryError(Napi::Env env, const char* op) {
  napi_value e = PlainError(env, "SMLA_OUT_OF_MEMORY", op, "out of memory");
  return e ? Napi::Error(env, e) : Napi::Error::New(env, "out of memory");
}

namespace {
thread_local napi_env t_js_env = nullptr;  // this JS thread's env (Init): one per thread
}  // namespace

void* TypedAllocation::operator new(size_t bytes) {
  if (void* p = ::operator new(bytes, std::nothrow)) return p;
  if (!t_js_env) throw std::bad_alloc();
  throw OutOfMemoryError(Napi::Env(t_js_env), "sparse_mla_native: new");
}
void TypedAllocation::operator delete(void* p) noexcept { ::operator delete(p); }

// ---- the row-parallel worker --------------------------------------------------------------------

Napi::Error StatusError(Napi::Env env, const char* op, int32_t status) {
  const bool cuda = status < 0;
  const char* code = cuda ? "SMLA_CUDA_ERROR"
                     : status == SMLA_ERR_OUT_OF_MEMORY ? "SMLA_OUT_OF_MEMORY"
                     : status == kNoThread              ? "SMLA_NO_THREAD"
                                                        : "SMLA_CORE_STATUS";
  const std::string what = cuda ? ": CUDA failed: " : status == kNoThread ? ": " : status == SMLA_ERR_OUT_OF_MEMORY ? ": out of memory: " : ": the core returned ";
  Napi::Error e = Napi::Error::New(env, std::string(op) + what + StatusName(status));
  e.Set("code", Napi::String::New(env, code));
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

// A thread's share of a job's rows stopped because its env is being torn down (never reported:
// nobody is left to tell).
constexpr int32_t kStopped = INT32_MAX;

// One part of a split job: its status and the thread that runs it (none for part 0).
struct SplitPart {
  int32_t status = SMLA_OK;
  std::thread thread;
};
// A job's parts, one per thread it may use: made on the JS thread when the call is made, so that
// splitting it allocates nothing on a worker thread.
using SplitParts = std::unique_ptr<SplitPart[]>;
SplitParts MakeParts(const RowJob& job) { return SplitParts(new SplitPart[size_t(std::max(1, job.threads))]); }

// Runs job.run over `rows` rows split into at most `threads` contiguous parts (this thread does part
// 0), each part `block` rows at a time; stops between blocks once *stop is set. A part whose thread
// cannot be started (no memory for its state, or the system refuses a thread) runs here.
int32_t RunSplit(const RowJob& job, int64_t rows, const std::atomic<bool>* stop, SplitPart* part) noexcept {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(std::max(1, job.threads), rows));
  const int64_t block = std::max<int64_t>(1, job.block);
  auto range = [&job, part, rows, parts, block, stop](int64_t p) noexcept {
    const int64_t begin = rows * p / parts, end = rows * (p + 1) / parts;
    part[p].status = Guarded([&] {
      for (int64_t b = begin; b < end; b += std::min(block, end - b)) {
        if (stop && stop->load(std::memory_order_relaxed)) return kStopped;
        const int32_t s = job.run(b, std::min(end, b + block));
        if (s != SMLA_OK) return s;
      }
      return int32_t(SMLA_OK);
    });
  };
  for (int64_t p = 1; p < parts; ++p) {
    try {
      part[p].thread = std::thread(range, p);
    } catch (...) {
      range(p);
    }
  }
  range(0);
  int32_t status = SMLA_OK;
  for (int64_t p = 0; p < parts; ++p) {
    if (part[p].thread.joinable()) {
      try {
        part[p].thread.join();
      } catch (...) {
      }
    }
    if (status == SMLA_OK) status = part[p].status;
  }
  return status;
}

int32_t Execute(const RowJob& job, const std::atomic<bool>* stop, SplitPart* parts) noexcept {
  int64_t rows = job.rows;
  int32_t status = SMLA_OK;
  if (job.prepare) status = Guarded([&] { return job.prepare(rows); });
  if (status == SMLA_OK && rows > 0) status = RunSplit(job, rows, stop, parts);
  return status;
}

// Settles a finished job's promise (`settle`, released once used) on its JS thread: check,
// resolve, then commit; or reject. Run while a worker thread's env is being torn down, the resolve
// fails (JS is stopped) and nothing is committed; whatever throws while settling rejects the
// promise if it is not settled yet (so a live caller is told, never left waiting; with an error
// made without the C++ heap, which may be what just failed) and is dropped when even that fails
// (the env is going away: nobody is left to tell).
void SettleJob(Napi::Env env, const char* op, const RowJob& job, int32_t status, Resolvers* settle) noexcept {
  // napi_ok: settled; else the promise is still pending
  auto conclude = [&](bool resolve, napi_value v) noexcept { return settle->Conclude(resolve, v); };
  auto reject_if_unsettled = [&](const char* code, const char* what) noexcept {
    if (settle->Pending()) conclude(false, PlainError(env, code, op, what));
  };
  napi_handle_scope scope = nullptr;
  const bool scoped = napi_open_handle_scope(env, &scope) == napi_ok;
  try {
    if (status == SMLA_OK) {
      const std::string why = job.check ? job.check(env) : std::string();
      if (why.empty()) {
        // fails when the env is being torn down: nothing is written then
        if (conclude(true, env.Undefined()) == napi_ok) {
          if (job.commit) job.commit();
        } else {
          reject_if_unsettled("SMLA_ADDON_FAILURE", "cannot resolve the call");
        }
      } else {
        Napi::Error e = Napi::Error::New(env, std::string(op) + ": " + why);
        e.Set("code", Napi::String::New(env, "SMLA_DETACHED"));
        conclude(false, e.Value());
      }
    } else {
      conclude(false, StatusError(env, op, status).Value());
    }
  } catch (const Napi::Error& e) {
    // its value may be out of reach too (a Worker being torn down), and Value() then throws
    napi_value v = nullptr;
    try {
      v = e.Value();
    } catch (...) {
    }
    if (v) conclude(false, v);
    else reject_if_unsettled("SMLA_ADDON_FAILURE", "failed while settling");
  } catch (const std::bad_alloc&) {
    reject_if_unsettled("SMLA_OUT_OF_MEMORY", "out of memory while settling the call");
  } catch (const std::exception& e) {
    reject_if_unsettled("SMLA_ADDON_FAILURE", e.what());
  } catch (...) {
    reject_if_unsettled("SMLA_ADDON_FAILURE", "failed while settling");
  }
  if (scoped) napi_close_handle_scope(env, scope);
}

// Node tears a worker thread's env down (worker.terminate(), process.exit() in the worker) by
// running its loop until the pool jobs in flight have come back, with JS already stopped: the
// promise can no longer be settled, and node-addon-api's own completion turns that failure into
// a C++ exception thrown out of a catch block, which aborts the whole process. Hence the own
// completion (SettleJob); the job is freed either way. Execute allocates nothing (its parts are
// made here) and reports only through status_: AsyncWorker's SetError would build a string on
// the pool thread.
class RowJobWorker final : public Napi::AsyncWorker {
 public:
  RowJobWorker(Napi::Env env, const char* op, RowJob job, Holds holds)
      : Napi::AsyncWorker(env, op), op_(op), job_(std::move(job)), holds_(std::move(holds)), parts_(MakeParts(job_)) {
    promise_ = NewPromise(env, op, &settle_);
  }

  Napi::Promise Promise() { return Napi::Promise(Env(), promise_); }

 protected:
  void Execute() override { status_ = smla_addon::Execute(job_, nullptr, parts_.get()); }

  void OnWorkComplete(Napi::Env env, napi_status status) override {
    if (status != napi_cancelled) SettleJob(env, op_, job_, status_, &settle_);
    Destroy();  // (the promise's functions are let go, also when it could not be settled)
  }

 private:
  const char* op_;
  RowJob job_;
  Holds holds_;
  SplitParts parts_;
  Resolvers settle_;
  napi_value promise_ = nullptr;
  int32_t status_ = SMLA_OK;
};

// ---- the cpu calls' own threads -----------------------------------------------------------------

struct EnvCalls;

// One queued cpu call: owned by its env's queue, then by the thread running it, then by its env's
// list of finished calls, and released on its JS thread (its references and copies). Everything a
// thread needs to run it (its parts) is made with it, on the JS thread.
struct CpuCall {
  const char* op = nullptr;
  RowJob job;
  Holds holds;
  SplitParts parts;
  Resolvers settle;  // its promise's functions, let go with the call
  std::shared_ptr<EnvCalls> owner;
  int32_t group = 0;
  int width = 1;  // threads it may use
  int32_t status = SMLA_OK;
  CpuCall* next = nullptr;  // the list it is in (CallList)
};
using CallPtr = std::unique_ptr<CpuCall>;

// A FIFO of calls linked through CpuCall::next, owning them: putting a call in or taking it out
// allocates nothing, so the queue and the counts stay consistent on any thread whatever memory is
// left. Destroying a non-empty list frees its calls (their references): JS thread only.
class CallList {
 public:
  CallList() = default;
  CallList(CallList&& other) noexcept : head_(other.head_), tail_(other.tail_), size_(other.size_) { other.Forget(); }
  CallList& operator=(CallList&& other) noexcept {
    Clear();
    head_ = other.head_, tail_ = other.tail_, size_ = other.size_;
    other.Forget();
    return *this;
  }
  ~CallList() { Clear(); }

  bool Empty() const { return head_ == nullptr; }
  size_t Size() const { return size_; }
  CpuCall* Front() const { return head_; }
  void PushBack(CallPtr c) noexcept {
    CpuCall* raw = c.release();
    raw->next = nullptr;
    (tail_ ? tail_->next : head_) = raw;
    tail_ = raw;
    size_++;
  }
  void PushFront(CallPtr c) noexcept {
    CpuCall* raw = c.release();
    raw->next = head_;
    head_ = raw;
    if (!tail_) tail_ = raw;
    size_++;
  }
  CallPtr PopFront() noexcept {
    CpuCall* raw = head_;
    if (!raw) return nullptr;
    head_ = raw->next;
    if (!head_) tail_ = nullptr;
    raw->next = nullptr;
    size_--;
    return CallPtr(raw);
  }
  // Moves every call of `other` to the back of this list.
  void Append(CallList& other) noexcept {
    while (CallPtr c = other.PopFront()) PushBack(std::move(c));
  }
  // Takes out the calls for which keep(call) is false, in order.
  template <class Keep>
  CallList Split(Keep keep) noexcept {
    CallList kept, taken;
    while (CallPtr c = PopFront()) (keep(*c) ? kept : taken).PushBack(std::move(c));
    *this = std::move(kept);
    return taken;
  }

 private:
  void Forget() { head_ = tail_ = nullptr, size_ = 0; }
  void Clear() {
    while (PopFront()) {
    }
  }
  CpuCall* head_ = nullptr;
  CpuCall* tail_ = nullptr;
  size_t size_ = 0;
};

// One JS thread's (env's) calls. Fields below `armed` are guarded by Runner::mutex, except
// `unsettled` (its JS thread only) and `stop` (set under the mutex, read by the row loops).
//
// The wake: a thread that finishes a call tells the JS thread by releasing `armed`, a thread-safe
// function of one thread made for that one wake (its finalizer, on the JS thread, settles `done`
// and arms the next). Releasing allocates nothing, where napi_call_threadsafe_function pushes onto
// Node's queue, a std::deque that allocates a block every 64 calls: a std::bad_alloc there, on a
// thread of the addon, ended the process (Node is built without exceptions, so nothing catches
// it, and its queue's mutex would stay locked).
struct EnvCalls;
// A wake's finalizer data, kept in its env's EnvCalls (at most one wake is armed or on its way at
// a time, and one finalized), so that arming one allocates nothing of the addon's. JS thread only.
struct WakeSlot {
  std::shared_ptr<EnvCalls> keep;  // its env's calls, kept until the wake's finalizer has run
  napi_threadsafe_function self = nullptr;
};

struct EnvCalls {
  napi_env env = nullptr;
  WakeSlot wake_slots[2];
  napi_threadsafe_function armed = nullptr;  // the next wake; null while one is on its way (sent) or none could be made
  std::atomic<bool> stop{false};
  size_t unsettled = 0;  // calls not settled yet: the armed wake is ref'd (keeps the loop alive) while > 0
  napi_threadsafe_function sent = nullptr;  // a wake released whose finalizer has not run yet
  CallList queued;
  bool in_ring = false;
  EnvCalls* ring_next = nullptr;  // the Runner's ring, while in_ring
  int running = 0;                // calls of this env a thread is running or handing back
  CallList done;                  // finished, to settle
  bool closing = false;  // torn down: no thread wakes it any more
};

// The process-wide queue and its threads. Never destroyed: a thread may still run while the
// process exits. Every member function runs under `mutex` (Start and Work take it themselves) and
// allocates nothing (Start: but the threads it starts).
struct Runner {
  std::mutex mutex;
  std::condition_variable env_idle;  // a teardown waits here for its env's running calls
  // envs with queued calls, served in turn (linked through EnvCalls::ring_next; an env is taken
  // out before its teardown lets it go)
  EnvCalls* ring_head = nullptr;
  EnvCalls* ring_tail = nullptr;
  std::map<napi_env, std::shared_ptr<EnvCalls>> envs;  // changed on its env's JS thread only
  int running_calls = 0, running_threads = 0;
  const int thread_budget = std::max(2, 2 * int(std::thread::hardware_concurrency()));

  void RingPushBack(EnvCalls* e) noexcept {
    e->ring_next = nullptr;
    (ring_tail ? ring_tail->ring_next : ring_head) = e;
    ring_tail = e;
  }
  void RingPushFront(EnvCalls* e) noexcept {
    e->ring_next = ring_head;
    ring_head = e;
    if (!ring_tail) ring_tail = e;
  }
  void RingRemove(EnvCalls* e) noexcept {
    EnvCalls* prev = nullptr;
    for (EnvCalls* x = ring_head; x; prev = x, x = x->ring_next) {
      if (x != e) continue;
      (prev ? prev->ring_next : ring_head) = x->ring_next;
      if (ring_tail == x) ring_tail = prev;
      x->ring_next = nullptr;
      return;
    }
  }

  // The next call that may start now, counted as running.
  CallPtr TakeNext() noexcept {
    EnvCalls* e = ring_head;
    if (!e) return nullptr;
    const int width = e->queued.Front()->width;
    if (running_calls > 0 && running_threads + width > thread_budget) return nullptr;
    CallPtr c = e->queued.PopFront();
    ring_head = e->ring_next;
    if (!ring_head) ring_tail = nullptr;
    e->ring_next = nullptr;
    if (e->queued.Empty()) e->in_ring = false;
    else RingPushBack(e);
    running_calls++;
    running_threads += width;
    e->running++;
    return c;
  }

  CallList TakeStartable() noexcept {
    CallList calls;
    while (CallPtr c = TakeNext()) calls.PushBack(std::move(c));
    return calls;
  }

  // Sends the env's armed wake (allocates nothing); the next is armed when it arrives.
  static void Wake(EnvCalls& e) noexcept {
    if (!e.armed) return;
    e.sent = e.armed;
    e.armed = nullptr;
    napi_release_threadsafe_function(e.sent, napi_tsfn_release);
  }

  // Hands a finished call to its env: to be settled on its JS thread, or, when the env is being
  // torn down, to the teardown, which waits for it.
  void Finish(CallPtr c) noexcept {
    running_calls--;
    running_threads -= c->width;
    EnvCalls& e = *c->owner;  // kept alive by the envs map until its teardown, which waits for it
    e.done.PushBack(std::move(c));
    if (!e.closing) Wake(e);
    if (--e.running == 0) env_idle.notify_all();
  }

  // A call taken to start on a thread of its own, for which none could be started, while the
  // thread that tried will take the next call once it has finished its own: back to the front of
  // its env's queue (an idle thread may take it first).
  void PutBack(CallPtr c) noexcept {
    EnvCalls& e = *c->owner;
    running_calls--;
    running_threads -= c->width;
    e.queued.PushFront(std::move(c));
    if (!e.in_ring) {
      e.in_ring = true;
      RingPushFront(&e);
    }
    if (--e.running == 0) env_idle.notify_all();
    work_ready.notify_one();
  }

  // Takes every call that may start now: the first for the idle thread, if one waits, the others
  // to start on new threads (returned). None is left queued while it fits, so cancelQueued
  // (dispose) never drops a call that a free thread was only about to take.
  CallList Dispatch() noexcept {
    if (!ring_head) return CallList();
    if (idle > 0 && !handoff) {
      handoff = TakeNext();
      if (handoff) work_ready.notify_one();
    }
    return TakeStartable();
  }

  // A thread of its own for each call (it then takes the next ones that fit until none is left).
  // Called without the mutex; `caller_works`: by a thread of the addon that will take the next call
  // once it has finished its own. A call for which no thread can be started (no memory for the
  // thread's state, or the system refuses a thread) is put back for that thread, else handed to
  // the idle thread if one waits, else rejected (kNoThread), and whatever fits once it no longer
  // counts is started in its place: so no call is left queued with no thread to take it.
  void Start(CallList calls, bool caller_works) noexcept {
    while (CallPtr c = calls.PopFront()) {
      CpuCall* raw = c.release();
      try {
        std::thread([this, raw] { Work(CallPtr(raw)); }).detach();
      } catch (...) {
        CallPtr failed(raw);
        std::lock_guard<std::mutex> lock(mutex);
        if (caller_works && !failed->owner->closing) {
          PutBack(std::move(failed));
        } else if (idle > 0 && !handoff && !failed->owner->closing) {
          handoff = std::move(failed);  // (still counted as running) the idle thread takes it
          work_ready.notify_one();
        } else {
          failed->status = kNoThread;
          Finish(std::move(failed));
          CallList more = Dispatch();
          calls.Append(more);
        }
      }
    }
  }

  // Runs calls until none is left to take; the last thread to run out waits a while for the next
  // (a thread's start-up is a good part of a small call's cost), the others end.
  void Work(CallPtr c) noexcept {
    std::unique_lock<std::mutex> lock(mutex, std::defer_lock);
    while (c) {
      c->status = Execute(c->job, &c->owner->stop, c->parts.get());
      lock.lock();
      Finish(std::move(c));
      c = TakeNext();
      if (!c && idle == 0) {
        idle++;
        work_ready.wait_for(lock, kLinger, [&] {
          c = handoff ? std::move(handoff) : TakeNext();
          return c != nullptr;
        });
        idle--;
      }
      CallList more = c ? Dispatch() : CallList();
      lock.unlock();
      Start(std::move(more), /*caller_works=*/true);
    }
  }

  static constexpr std::chrono::milliseconds kLinger{1000};
  int idle = 0;     // threads waiting for a call (at most one)
  CallPtr handoff;  // a call already taken (counted as running) for the idle thread
  std::condition_variable work_ready;
};

Runner& TheRunner() {
  static Runner* runner = new Runner();
  return *runner;
}

// The env's wakes (armed, and the one on its way) keep its JS thread's loop alive while calls are
// unsettled: a wake sent unref'd could otherwise arrive after the loop has ended.
void RefWake(EnvCalls& e, bool ref) noexcept {
  napi_threadsafe_function w[2] = {nullptr, nullptr};
  {
    std::lock_guard<std::mutex> lock(TheRunner().mutex);
    w[0] = e.armed;
    w[1] = e.sent;
  }
  // (each freed only on this thread, by its finalizer: still there even if a thread released it since)
  for (napi_threadsafe_function x : w)
    if (x) (ref ? napi_ref_threadsafe_function : napi_unref_threadsafe_function)(e.env, x);
}

void ReleaseRef(EnvCalls& e, size_t settled) {
  e.unsettled -= settled;
  if (e.unsettled == 0 && settled > 0) RefWake(e, false);
}

void NeverCalled(napi_env, napi_value, void*, void*) {}

// Whether JS can still run on the env's thread (not once its teardown has begun): a call of the
// promise executor with nothing to capture, which does nothing.
bool JsRuns(napi_env env) noexcept {
  napi_value fn = nullptr, undefined = nullptr;
  EnvData* data = nullptr;
  return napi_get_instance_data(env, reinterpret_cast<void**>(&data)) == napi_ok && data &&
         napi_get_reference_value(env, data->capture_resolvers, &fn) == napi_ok && fn && napi_get_undefined(env, &undefined) == napi_ok &&
         napi_call_function(env, undefined, fn, 0, nullptr, nullptr) == napi_ok;
}
void WakeArrived(napi_env raw_env, void* data, void*) noexcept;

// Arms the env's next wake (JS thread); when calls finished meanwhile, sends it at once. False when
// Node cannot make it: the env's next call tries again.
bool Arm(const std::shared_ptr<EnvCalls>& e) noexcept {
  WakeSlot* slot = nullptr;
  for (WakeSlot& x : e->wake_slots)
    if (!x.keep) slot = &x;
  napi_value name = nullptr;
  napi_threadsafe_function w = nullptr;
  if (!slot || napi_create_string_utf8(e->env, "sparse_mla_native.cpu", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(e->env, nullptr, nullptr, name, 0, 1, slot, WakeArrived, nullptr, NeverCalled, &w) != napi_ok)
    return false;
  slot->keep = e;
  slot->self = w;
  if (e->unsettled == 0) napi_unref_threadsafe_function(e->env, w);
  std::lock_guard<std::mutex> lock(TheRunner().mutex);
  e->armed = w;
  if (!e->done.Empty() && !e->closing) Runner::Wake(*e);
  return true;
}

// A wake's finalizer, on the JS thread: arms the next wake and settles the finished calls. Node
// also finalizes the armed wake when it tears the env down (it was not released then): nothing is
// armed any more, and what is settled then fails (JS has stopped) and is let go.
void WakeArrived(napi_env raw_env, void* data, void*) noexcept {
  WakeSlot& slot = *static_cast<WakeSlot*>(data);
  const std::shared_ptr<EnvCalls> calls = std::move(slot.keep);  // (the slot is free from here on)
  const napi_threadsafe_function self = slot.self;
  slot.self = nullptr;
  EnvCalls& e = *calls;
  bool torn_down = !JsRuns(raw_env);  // (a wake on its way when the teardown began)
  CallList done;
  {
    std::lock_guard<std::mutex> lock(TheRunner().mutex);
    torn_down = torn_down || e.closing || e.armed == self;
    if (e.armed == self) e.armed = nullptr;
    if (e.sent == self) e.sent = nullptr;
    done.Append(e.done);
  }
  // (a call finished since finds no wake to send: Arm sends the new one at once then)
  if (!torn_down) Arm(calls);
  Napi::Env env(raw_env);
  const size_t settled = done.Size();
  while (CallPtr c = done.PopFront()) SettleJob(env, c->op, c->job, c->status, &c->settle);
  ReleaseRef(e, settled);
}

// The env's teardown (a cleanup hook): its queued calls never start, its running ones stop at the
// next block, and this returns only once none of them is running. Their references (their
// promises' functions included: JS has stopped, so those promises stay pending) and copies are
// released here.
void TearDown(void* arg) {
  std::unique_ptr<std::shared_ptr<EnvCalls>> hold(static_cast<std::shared_ptr<EnvCalls>*>(arg));
  EnvCalls& e = **hold;
  Runner& r = TheRunner();
  CallList left;
  {
    std::unique_lock<std::mutex> lock(r.mutex);
    e.closing = true;
    e.stop.store(true, std::memory_order_relaxed);
    if (e.in_ring) r.RingRemove(&e);
    e.in_ring = false;
    left.Append(e.queued);
    // wait_for, not wait: GCC 12 binds condition_variable::wait to GLIBCXX_3.4.30, which the
    // libstdc++ of RHEL 9 / Amazon Linux 2023 (GCC 11) lacks; wait_for is inline
    while (e.running != 0) r.env_idle.wait_for(lock, std::chrono::seconds(1));
    left.Append(e.done);
    r.envs.erase(e.env);
  }
  left = CallList();
}

// The env's calls, made at its first call: the entry is made first and the wake and cleanup hook
// after it, so that a failure leaves nothing half made (the next call tries again). Re-arms the
// wake when the last one could not be made.
std::shared_ptr<EnvCalls> CallsOf(Napi::Env env) {
  Runner& r = TheRunner();
  std::shared_ptr<EnvCalls> e;
  bool unarmed = false;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.envs.find(env);
    if (it != r.envs.end()) {
      e = it->second;
      unarmed = !e->armed && !e->sent;
    }
  }
  if (e) {
    if (unarmed && !Arm(e)) throw std::bad_alloc();  // (the call is not queued)
    return e;
  }
  e = std::make_shared<EnvCalls>();
  e->env = env;
  auto for_hook = std::make_unique<std::shared_ptr<EnvCalls>>(e);
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    r.envs.emplace(env, e);
  }
  if (!Arm(e)) {
    std::lock_guard<std::mutex> lock(r.mutex);
    r.envs.erase(env);
    throw std::bad_alloc();
  }
  napi_add_env_cleanup_hook(env, TearDown, for_hook.release());
  return e;
}

}  // namespace

Napi::Promise QueueRowJob(Napi::Env env, const char* op, RowJob job, Holds holds) {
  auto* w = new RowJobWorker(env, op, std::move(job), std::move(holds));
  Napi::Promise p = w->Promise();
  try {
    w->Queue();  // deletes itself after OnWorkComplete, on the main thread (releasing pins and copies)
  } catch (...) {
    delete w;
    throw;
  }
  return p;
}

Napi::Promise QueueCpuJob(Napi::Env env, const char* op, RowJob job, Holds holds, int32_t group) {
  // Everything the call needs is made first: a failure throws before anything is queued.
  std::shared_ptr<EnvCalls> owner = CallsOf(env);
  auto c = std::make_unique<CpuCall>();
  c->parts = MakeParts(job);
  napi_value promise = NewPromise(env, op, &c->settle);
  c->op = op;
  c->width = std::max(1, job.threads);
  c->job = std::move(job);
  c->holds = std::move(holds);
  c->group = group;
  c->owner = owner;
  EnvCalls& e = *owner;
  Runner& r = TheRunner();
  CallList start;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    e.queued.PushBack(std::move(c));
    if (!e.in_ring) {
      e.in_ring = true;
      r.RingPushBack(&e);
    }
    start = r.Dispatch();
  }
  if (e.unsettled++ == 0) RefWake(e, true);
  r.Start(std::move(start), /*caller_works=*/false);
  return Napi::Promise(env, promise);
}

Napi::Value CancelQueued(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Args a(info, "cancelQueued");
  const int32_t group = a.Int(0, "group", 0, INT32_MAX);
  Runner& r = TheRunner();
  CallList cancelled;
  EnvCalls* e = nullptr;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.envs.find(env);
    if (it != r.envs.end()) {
      e = it->second.get();
      cancelled = e->queued.Split([group](const CpuCall& c) { return c.group != group; });
      if (e->queued.Empty() && e->in_ring) {
        r.RingRemove(e);
        e->in_ring = false;
      }
    }
  }
  const size_t count = cancelled.Size();
  if (e) ReleaseRef(*e, count);
  while (CallPtr c = cancelled.PopFront()) {
    napi_value err = PlainError(env, "SMLA_CANCELLED", c->op, "cancelled before it started (its engine was disposed)");
    if (!err) napi_get_undefined(env, &err);
    c->settle.Conclude(false, err);
  }
  return Napi::Number::New(env, double(count));
}

// ---- module -------------------------------------------------------------------------------------

// Node unloads an addon with the last env that loaded it (a Worker's, at its teardown), but a thread
// of the cpu calls may still be returning through this library's code right after that env's
// teardown has let go of it: the library stays loaded for the life of the process.
void KeepLoaded() {
#if defined(__unix__) || defined(__APPLE__)
  static const bool kept = [] {
    Dl_info info{};
    return dladdr(reinterpret_cast<void*>(&KeepLoaded), &info) != 0 && info.dli_fname &&
           dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE) != nullptr;
  }();
  (void)kept;
#endif
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  KeepLoaded();
  t_js_env = env;
  auto* data = new EnvData();
  env.SetInstanceData(data);  // deleted with the env
  const Napi::Value promise = env.Global().Get("Promise");
  if (!promise.IsFunction()) throw Napi::Error::New(env, "sparse_mla_native: globalThis.Promise is not a function");
  data->promise_constructor = Napi::Persistent(promise.As<Napi::Function>());
  napi_value executor = nullptr;
  if (napi_create_function(env, "captureResolvers", NAPI_AUTO_LENGTH, CaptureResolvers, data, &executor) != napi_ok)
    throw Napi::Error::New(env, "sparse_mla_native: cannot create a function");
  data->capture_resolvers = Napi::Persistent(Napi::Function(env, executor));
  exports.Set("abiVersion", Napi::Number::New(env, smla_abi_version()));
  Napi::Object build = Napi::Object::New(env);
  build.Set("cpuArch", Napi::String::New(env, SMLA_CPU_ARCH));
  build.Set("simd", Napi::String::New(env, CoreSimdPath()));
  build.Set("hardwareThreads", Napi::Number::New(env, std::thread::hardware_concurrency()));
  build.Set("sources", Napi::String::New(env, SMLA_SOURCE_FINGERPRINT));
  exports.Set("build", build);

  Napi::Object cpu = Napi::Object::New(env);
  for (size_t i = 0; i < kCpuOpCount; ++i) cpu.Set(kCpuOps[i].name, OpFunctionOf(env, kCpuOps[i]));
  cpu.Set("cancelQueued", OpFunctionOf(env, {"cancelQueued", CancelQueued}));
  exports.Set("cpu", cpu);
  exports.Set("cuda", CudaInfo(env));  // cuda_device.cpp (+ the cuda_ops.cpp table when built)
  return exports;
}

}  // namespace smla_addon

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return smla_addon::Init(env, exports); }
NODE_API_MODULE(sparse_mla_native, InitModule)
