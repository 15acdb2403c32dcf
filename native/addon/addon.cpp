// Module entry of sparse_mla_native.node: the op tables, build facts, and the row-parallel worker
// every CPU op runs on. The TS side (src/backends/native/binding.ts) types this surface.
#include "addon.h"

#include <algorithm>
#include <chrono>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <cstdint>
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

// A thread's share of a job's rows stopped because its env is being torn down (never reported:
// nobody is left to tell).
constexpr int32_t kStopped = INT32_MAX;

// Runs job.run over `rows` rows split into `threads` contiguous parts (this thread does part 0),
// each part `block` rows at a time; stops between blocks once *stop is set.
int32_t RunSplit(const RowJob& job, int64_t rows, const std::atomic<bool>* stop) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(job.threads, rows));
  const int64_t block = std::max<int64_t>(1, job.block);
  std::vector<int32_t> status(size_t(parts), SMLA_OK);
  auto range = [&](int64_t p) {
    const int64_t begin = rows * p / parts, end = rows * (p + 1) / parts;
    status[size_t(p)] = Guarded([&] {
      for (int64_t b = begin; b < end; b += std::min(block, end - b)) {
        if (stop && stop->load(std::memory_order_relaxed)) return kStopped;
        const int32_t s = job.run(b, std::min(end, b + block));
        if (s != SMLA_OK) return s;
      }
      return int32_t(SMLA_OK);
    });
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

int32_t Execute(const RowJob& job, const std::atomic<bool>* stop) {
  int64_t rows = job.rows;
  int32_t status = SMLA_OK;
  if (job.prepare) status = Guarded([&] { return job.prepare(rows); });
  if (status == SMLA_OK && rows > 0) status = RunSplit(job, rows, stop);
  return status;
}

// Settles a finished job's promise (`*deferred`, set to null once used) on its JS thread: check,
// resolve, then commit; or reject. Run while a worker thread's env is being torn down, the resolve
// fails (JS is stopped) and nothing is committed; whatever throws while settling rejects the
// promise if it is not settled yet (so a live caller is told, never left waiting) and is dropped
// when even that fails (the env is going away: nobody is left to tell).
void SettleJob(Napi::Env env, const char* op, const RowJob& job, int32_t status, napi_deferred* deferred) {
  // napi_ok: settled. A refusal before the promise is touched (pending exception, JS stopped)
  // leaves the deferred usable; any other failure has used it up.
  auto conclude = [&](bool resolve, napi_value v) {
    if (!*deferred) return napi_generic_failure;
    const napi_status s = resolve ? napi_resolve_deferred(env, *deferred, v) : napi_reject_deferred(env, *deferred, v);
    if (s == napi_ok || (s != napi_pending_exception && s != napi_cannot_run_js)) *deferred = nullptr;
    return s;
  };
  auto reject_if_unsettled = [&](auto make) noexcept {
    if (!*deferred) return;
    try {
      conclude(false, make());
    } catch (...) {
    }
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
          reject_if_unsettled([&] { return Napi::Error::New(env, std::string(op) + ": cannot resolve the call").Value(); });
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
    reject_if_unsettled([&] { return e.Value(); });
  } catch (const std::exception& e) {
    reject_if_unsettled([&] { return Napi::Error::New(env, std::string(op) + ": " + e.what()).Value(); });
  } catch (...) {
    reject_if_unsettled([&] { return Napi::Error::New(env, std::string(op) + ": failed while settling").Value(); });
  }
  if (scoped) napi_close_handle_scope(env, scope);
}

// Node tears a worker thread's env down (worker.terminate(), process.exit() in the worker) by
// running its loop until the pool jobs in flight have come back, with JS already stopped: the
// promise can no longer be settled, and node-addon-api's own completion turns that failure into
// a C++ exception thrown out of a catch block, which aborts the whole process. Hence the own
// completion (SettleJob); the job is freed either way.
class RowJobWorker final : public Napi::AsyncWorker {
 public:
  RowJobWorker(Napi::Env env, const char* op, RowJob job, Holds holds)
      : Napi::AsyncWorker(env, op), op_(op), job_(std::move(job)), holds_(std::move(holds)) {
    if (napi_create_promise(env, &deferred_, &promise_) != napi_ok) throw Napi::Error::New(env, std::string(op) + ": cannot create a promise");
  }

  Napi::Promise Promise() { return Napi::Promise(Env(), promise_); }

 protected:
  void Execute() override {
    status_ = smla_addon::Execute(job_, nullptr);
    if (status_ != SMLA_OK) SetError(StatusName(status_));
  }

  void OnWorkComplete(Napi::Env env, napi_status status) override {
    if (status != napi_cancelled) SettleJob(env, op_, job_, status_, &deferred_);
    Destroy();
  }

 private:
  const char* op_;
  RowJob job_;
  Holds holds_;
  napi_deferred deferred_ = nullptr;
  napi_value promise_ = nullptr;
  int32_t status_ = SMLA_OK;
};

// ---- the cpu calls' own threads -----------------------------------------------------------------

struct EnvCalls;

// One queued cpu call: owned by its env's queue, then by the thread running it, then by its env's
// list of finished calls, and released on its JS thread (its references and copies).
struct CpuCall {
  const char* op;
  RowJob job;
  Holds holds;
  napi_deferred deferred;
  std::shared_ptr<EnvCalls> owner;
  int32_t group;
  int width;  // threads it may use
  int32_t status = SMLA_OK;
};
using CallPtr = std::unique_ptr<CpuCall>;

// One JS thread's (env's) calls. Fields below `wake` are guarded by Runner::mutex, except
// `unsettled` (its JS thread only) and `stop` (set under the mutex, read by the row loops).
struct EnvCalls {
  napi_env env = nullptr;
  napi_threadsafe_function wake = nullptr;  // settles `done` on the JS thread
  std::atomic<bool> stop{false};
  size_t unsettled = 0;  // calls not settled yet: the wake is ref'd (keeps the loop alive) while > 0
  std::deque<CallPtr> queued;
  bool in_ring = false;
  int running = 0;           // calls of this env a thread is running or handing back
  std::vector<CallPtr> done; // finished, to settle
  bool wake_sent = false;
  bool closing = false;  // torn down: no thread calls `wake` any more
};

// The process-wide queue and its threads. Never destroyed: a thread may still run while the
// process exits.
struct Runner {
  std::mutex mutex;
  std::condition_variable env_idle;  // a teardown waits here for its env's running calls
  std::deque<std::shared_ptr<EnvCalls>> ring;  // envs with queued calls, served in turn
  std::map<napi_env, std::shared_ptr<EnvCalls>> envs;
  int running_calls = 0, running_threads = 0;
  const int thread_budget = std::max(2, 2 * int(std::thread::hardware_concurrency()));

  // The next call that may start now (under the mutex), counted as running.
  CallPtr TakeNext() {
    if (ring.empty()) return nullptr;
    std::shared_ptr<EnvCalls> e = ring.front();
    const int width = e->queued.front()->width;
    if (running_calls > 0 && running_threads + width > thread_budget) return nullptr;
    CallPtr c = std::move(e->queued.front());
    e->queued.pop_front();
    ring.pop_front();
    if (e->queued.empty()) e->in_ring = false;
    else ring.push_back(e);
    running_calls++;
    running_threads += width;
    e->running++;
    return c;
  }

  std::vector<CallPtr> TakeStartable() {
    std::vector<CallPtr> calls;
    while (CallPtr c = TakeNext()) calls.push_back(std::move(c));
    return calls;
  }

  // Hands a finished call to its env (under the mutex): to be settled on its JS thread, or, when
  // the env is being torn down, to the teardown, which waits for it.
  void Finish(CallPtr c) {
    running_calls--;
    running_threads -= c->width;
    EnvCalls& e = *c->owner;
    e.done.push_back(std::move(c));
    if (!e.closing && !e.wake_sent) e.wake_sent = napi_call_threadsafe_function(e.wake, nullptr, napi_tsfn_nonblocking) == napi_ok;
    if (--e.running == 0) env_idle.notify_all();
  }

  // Takes every call that may start now (under the mutex): the first for the idle thread, if one
  // waits, the others to start on new threads (returned). None is left queued while it fits, so
  // cancelQueued (dispose) never drops a call that a free thread was only about to take.
  std::vector<CallPtr> Dispatch() {
    if (ring.empty()) return {};
    if (idle > 0 && !handoff) {
      handoff = TakeNext();
      if (handoff) work_ready.notify_one();
    }
    return TakeStartable();
  }

  // A thread of its own for each call (it then takes the next ones that fit until none is left).
  void Start(std::vector<CallPtr> calls) {
    for (CallPtr& c : calls) {
      CpuCall* raw = c.release();
      try {
        std::thread([this, raw] { Work(CallPtr(raw)); }).detach();
      } catch (...) {  // no thread to be had: the call fails
        CallPtr failed(raw);
        failed->status = SMLA_ERR_OUT_OF_MEMORY;
        std::lock_guard<std::mutex> lock(mutex);
        Finish(std::move(failed));
      }
    }
  }

  // Runs calls until none is left to take; the last thread to run out waits a while for the next
  // (a thread's start-up is a good part of a small call's cost), the others end.
  void Work(CallPtr c) {
    std::unique_lock<std::mutex> lock(mutex, std::defer_lock);
    while (c) {
      c->status = Execute(c->job, &c->owner->stop);
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
      std::vector<CallPtr> more = c ? Dispatch() : std::vector<CallPtr>();
      lock.unlock();
      Start(std::move(more));
    }
  }

  static constexpr std::chrono::milliseconds kLinger{1000};
  int idle = 0;  // threads waiting for a call (at most one)
  CallPtr handoff;  // a call already taken (counted as running) for the idle thread
  std::condition_variable work_ready;
};

Runner& TheRunner() {
  static Runner* runner = new Runner();
  return *runner;
}

void ReleaseRef(EnvCalls& e, size_t settled) {
  e.unsettled -= settled;
  if (e.unsettled == 0 && settled > 0) napi_unref_threadsafe_function(e.env, e.wake);
}

// The wake's callback, on the JS thread: settles the finished calls (env null: the wake is being
// finalized at teardown, which took them already).
void SettleFinished(napi_env raw_env, napi_value, void* context, void*) {
  if (!raw_env) return;
  EnvCalls& e = *static_cast<EnvCalls*>(context);
  std::vector<CallPtr> done;
  {
    std::lock_guard<std::mutex> lock(TheRunner().mutex);
    done.swap(e.done);
    e.wake_sent = false;
  }
  Napi::Env env(raw_env);
  for (CallPtr& c : done) {
    SettleJob(env, c->op, c->job, c->status, &c->deferred);
    c.reset();
  }
  ReleaseRef(e, done.size());
}

void FinalizeWake(napi_env, void* data, void*) { delete static_cast<std::shared_ptr<EnvCalls>*>(data); }

// The env's teardown (a cleanup hook): its queued calls never start, its running ones stop at the
// next block, and this returns only once none of them is running. Their references and copies are
// released here.
void TearDown(void* arg) {
  std::unique_ptr<std::shared_ptr<EnvCalls>> hold(static_cast<std::shared_ptr<EnvCalls>*>(arg));
  EnvCalls& e = **hold;
  Runner& r = TheRunner();
  std::vector<CallPtr> left;
  {
    std::unique_lock<std::mutex> lock(r.mutex);
    e.closing = true;
    e.stop.store(true, std::memory_order_relaxed);
    for (auto it = r.ring.begin(); it != r.ring.end(); ++it)
      if (it->get() == &e) {
        r.ring.erase(it);
        break;
      }
    e.in_ring = false;
    for (CallPtr& c : e.queued) left.push_back(std::move(c));
    e.queued.clear();
    r.env_idle.wait(lock, [&] { return e.running == 0; });
    for (CallPtr& c : e.done) left.push_back(std::move(c));
    e.done.clear();
    r.envs.erase(e.env);
  }
  // Frees each promise's handle where the env still allows it (a rejection nobody can observe).
  napi_handle_scope scope = nullptr;
  const bool scoped = napi_open_handle_scope(e.env, &scope) == napi_ok;
  napi_value undefined = nullptr;
  if (napi_get_undefined(e.env, &undefined) == napi_ok)
    for (CallPtr& c : left)
      if (c->deferred) napi_reject_deferred(e.env, c->deferred, undefined);
  left.clear();
  if (scoped) napi_close_handle_scope(e.env, scope);
}

EnvCalls& CallsOf(Napi::Env env) {
  Runner& r = TheRunner();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.envs.find(env);
    if (it != r.envs.end()) return *it->second;
  }
  auto e = std::make_shared<EnvCalls>();
  e->env = env;
  auto* for_wake = new std::shared_ptr<EnvCalls>(e);
  napi_value name = Napi::String::New(env, "sparse_mla_native.cpu");
  if (napi_create_threadsafe_function(env, nullptr, nullptr, name, 0, 1, for_wake, FinalizeWake, e.get(), SettleFinished, &e->wake) != napi_ok) {
    delete for_wake;
    throw Napi::Error::New(env, "sparse_mla_native: cannot create the cpu calls' thread-safe function");
  }
  napi_unref_threadsafe_function(env, e->wake);
  // after the wake's own cleanup hook, so it runs first (hooks run last in, first out)
  napi_add_env_cleanup_hook(env, TearDown, new std::shared_ptr<EnvCalls>(e));
  std::lock_guard<std::mutex> lock(r.mutex);
  r.envs.emplace(env, e);
  return *e;
}

}  // namespace

Napi::Promise QueueRowJob(Napi::Env env, const char* op, RowJob job, Holds holds) {
  auto* w = new RowJobWorker(env, op, std::move(job), std::move(holds));
  Napi::Promise p = w->Promise();
  w->Queue();  // deletes itself after OnWorkComplete, on the main thread (releasing pins and copies)
  return p;
}

Napi::Promise QueueCpuJob(Napi::Env env, const char* op, RowJob job, Holds holds, int32_t group) {
  EnvCalls& e = CallsOf(env);
  napi_value promise = nullptr;
  auto c = std::make_unique<CpuCall>();
  if (napi_create_promise(env, &c->deferred, &promise) != napi_ok) throw Napi::Error::New(env, std::string(op) + ": cannot create a promise");
  c->op = op;
  c->width = std::max(1, job.threads);
  c->job = std::move(job);
  c->holds = std::move(holds);
  c->group = group;
  Runner& r = TheRunner();
  std::vector<CallPtr> start;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    c->owner = r.envs.at(env);
    e.queued.push_back(std::move(c));
    if (!e.in_ring) {
      e.in_ring = true;
      r.ring.push_back(e.queued.back()->owner);
    }
    start = r.Dispatch();
  }
  if (e.unsettled++ == 0) napi_ref_threadsafe_function(env, e.wake);
  r.Start(std::move(start));
  return Napi::Promise(env, promise);
}

Napi::Value CancelQueued(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Args a(info, "cancelQueued");
  const int32_t group = a.Int(0, "group", 0, INT32_MAX);
  Runner& r = TheRunner();
  std::vector<CallPtr> cancelled;
  EnvCalls* e = nullptr;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.envs.find(env);
    if (it != r.envs.end()) {
      e = it->second.get();
      std::deque<CallPtr> keep;
      for (CallPtr& c : e->queued) {
        if (c->group == group) cancelled.push_back(std::move(c));
        else keep.push_back(std::move(c));
      }
      e->queued.swap(keep);
      if (e->queued.empty() && e->in_ring) {
        for (auto q = r.ring.begin(); q != r.ring.end(); ++q)
          if (q->get() == e) {
            r.ring.erase(q);
            break;
          }
        e->in_ring = false;
      }
    }
  }
  if (e) ReleaseRef(*e, cancelled.size());
  for (CallPtr& c : cancelled) {
    Napi::Error err = Napi::Error::New(env, std::string(c->op) + ": cancelled before it started (its engine was disposed)");
    err.Set("code", Napi::String::New(env, "SMLA_CANCELLED"));
    napi_reject_deferred(env, c->deferred, err.Value());
    c.reset();
  }
  return Napi::Number::New(env, double(cancelled.size()));
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
  exports.Set("abiVersion", Napi::Number::New(env, smla_abi_version()));
  Napi::Object build = Napi::Object::New(env);
  build.Set("cpuArch", Napi::String::New(env, SMLA_CPU_ARCH));
  build.Set("simd", Napi::String::New(env, CoreSimdPath()));
  build.Set("hardwareThreads", Napi::Number::New(env, std::thread::hardware_concurrency()));
  build.Set("sources", Napi::String::New(env, SMLA_SOURCE_FINGERPRINT));
  exports.Set("build", build);

  Napi::Object cpu = Napi::Object::New(env);
  for (size_t i = 0; i < kCpuOpCount; ++i) cpu.Set(kCpuOps[i].name, Napi::Function::New(env, kCpuOps[i].fn, kCpuOps[i].name));
  cpu.Set("cancelQueued", Napi::Function::New(env, CancelQueued, "cancelQueued"));
  exports.Set("cpu", cpu);
  exports.Set("cuda", CudaInfo(env));  // cuda_device.cpp (+ the cuda_ops.cpp table when built)
  return exports;
}

}  // namespace smla_addon

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return smla_addon::Init(env, exports); }
NODE_API_MODULE(sparse_mla_native, InitModule)
