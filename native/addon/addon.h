// Shared pieces of the sparse-mla node addon, the one header its op files include: checked argument
// reading (defined in args.cpp), the row jobs that run an op off the event loop, split by rows
// across threads (row_jobs.cpp; a cpu call's queue and threads: cpu_calls.cpp), the coded errors,
// promises and per-env data (errors_and_promises.cpp), and the op tables (the module entry,
// addon.cpp, exports them).
#pragma once
// A C++ exception other than Napi::Error that escapes an addon function called from JS (a
// std::bad_alloc, say) becomes a JS error instead of unwinding into V8, which would abort the
// process. The op tables' functions turn them into coded errors themselves (OpFunctionOf); this is
// the net for the classes' methods and accessors. Defined here, before the only #include of napi.h,
// so that every translation unit sees the same node-addon-api. Likewise, an error that cannot be
// thrown into JS any more (a Worker being terminated) is dropped instead of rethrown as a C++
// exception out of node-addon-api's catch block (std::terminate).
#define NODE_ADDON_API_CPP_EXCEPTIONS_ALL
#define NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS
#include <napi.h>

#include <cstdint>
#include <climits>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace smla_addon {

// Thrown to JS (as a TypeError with code "SMLA_ADDON_ARGUMENT") when the binding passes arguments
// that do not match each other; the TS facade validates first, so this is a last line of defense
// that keeps a mismatched call from reading or writing outside its buffers.
[[noreturn]] void ThrowArgument(Napi::Env env, const std::string& op, const std::string& message);

// What a queued call keeps until it settles: references to the JS objects it uses (so none is
// collected while a worker thread runs) and the owned copies of its inputs.
struct Holds {
  std::vector<Napi::ObjectReference> pins;
  std::vector<std::unique_ptr<uint8_t[]>> copies;
};

// Reads the arguments of one op call: a few positional ones (thread count, raw copies) and the
// named fields of a params object (an op's smla_*_params struct, filled by its binding file),
// checking types and exact lengths.
//
// Who owns the memory a worker thread touches: a reference to a typed array does not stop its
// ArrayBuffer from being detached or transferred (structuredClone(buf, { transfer })) or a
// resizable one from shrinking, and any of those frees or unmaps the memory under a raw pointer.
// So an input (read while the call runs) is used in place only when it lives in a
// SharedArrayBuffer, which can be neither detached nor shrunk; any other input is copied here, on
// the calling thread, into memory the call owns. An output is written in place: it must be an
// array that only the caller (the TS backend, which allocated it) can reach until the call settles.
class Args {
 public:
  Args(const Napi::CallbackInfo& info, const char* op) : info_(info), op_(op) {}

  int32_t Int(size_t i, const char* name, int64_t lo, int64_t hi) const { return IntOf(At(i), name, lo, hi); }
  // Argument i, or `absent` when it is undefined (an optional trailing argument).
  int32_t OptionalInt(size_t i, const char* name, int64_t lo, int64_t hi, int32_t absent) const {
    return At(i).IsUndefined() ? absent : IntOf(At(i), name, lo, hi);
  }
  // A typed array of any type as bytes, read as an input (Fields::Input's rules); sets *bytes.
  const void* InputBytes(size_t i, const char* name, uint64_t* bytes);
  // `bytes` of uninitialized memory the call owns; throws (code SMLA_OUT_OF_MEMORY) when there is none.
  uint8_t* Own(uint64_t bytes);

  // The named fields of a params object, read by the op's binding file.
  class Fields {
   public:
    Fields(Args& args, Napi::Object object) : a_(args), o_(object) {}
    int32_t Int(const char* name, int64_t lo, int64_t hi) const { return a_.IntOf(Get(name), name, lo, hi); }
    float Float(const char* name) const { return a_.FloatOf(Get(name), name); }
    // Sets `field` (an array field of the op's params struct) to an input typed array of `type`
    // with exactly `length` elements (shared memory or an owned copy, see above); nullptr when
    // nullable and null, or when empty.
    template <class T>
    void Input(const T*& field, const char* name, napi_typedarray_type type, uint64_t length, bool nullable = false) {
      field = static_cast<const T*>(a_.ArrayData(Get(name), name, type, length, nullable, Use::kInput));
    }
    // An input whose values are checked and then used (token ids): always copied, also out of a
    // SharedArrayBuffer, so another thread writing it during the call cannot change a value between
    // its check and its use.
    template <class T>
    void Snapshot(const T*& field, const char* name, napi_typedarray_type type, uint64_t length) {
      field = static_cast<const T*>(a_.ArrayData(Get(name), name, type, length, false, Use::kSnapshot));
    }
    // An output typed array (written in place, pinned until the call settles).
    template <class T>
    void Output(T*& field, const char* name, napi_typedarray_type type, uint64_t length, bool nullable = false) {
      field = static_cast<T*>(a_.ArrayData(Get(name), name, type, length, nullable, Use::kOutput));
    }
    // An input's memory without a copy, pinned: *shared tells whether it lives in a
    // SharedArrayBuffer. Unless it does, the pointer may be used only before the op function
    // returns to JS (to copy the part of it the call needs).
    const void* Borrow(const char* name, napi_typedarray_type type, uint64_t length, bool* shared) {
      return a_.ArrayData(Get(name), name, type, length, false, Use::kBorrow, shared);
    }
    bool IsNull(const char* name) const { return Absent(Get(name)); }
    Napi::Value Get(const char* name) const { return o_.Get(name); }
    // Field `name` as a nested params object (an op made of several ops' params).
    Fields Object(const char* name) const { return a_.ObjectOf(Get(name), name); }
    // An argument error of the op (fields that do not match each other).
    [[noreturn]] void Refuse(const std::string& message) const { ThrowArgument(a_.Env(), a_.Op(), message); }
    Args& args() const { return a_; }

   private:
    Args& a_;
    Napi::Object o_;
  };

  // Argument i as a params object.
  Fields Object(size_t i, const char* name) { return ObjectOf(At(i), name); }
  // A value as a params object, or an argument error naming it.
  Fields ObjectOf(Napi::Value v, const char* name);

  Napi::Env Env() const { return info_.Env(); }
  const char* Op() const { return op_; }
  Holds TakeHolds() { return std::move(holds_); }

 private:
  enum class Use { kInput, kSnapshot, kOutput, kBorrow };
  Napi::Value At(size_t i) const { return i < info_.Length() ? info_[i] : Env().Undefined(); }
  static bool Absent(Napi::Value v) { return v.IsNull() || v.IsUndefined(); }
  int32_t IntOf(Napi::Value v, const char* name, int64_t lo, int64_t hi) const;
  float FloatOf(Napi::Value v, const char* name) const;
  void* ArrayData(Napi::Value v, const char* name, napi_typedarray_type type, uint64_t length, bool nullable, Use use, bool* shared = nullptr);
  const void* InPlaceOrCopy(Napi::TypedArray a, void* data, uint64_t bytes, bool copy_unshared, bool* shared, bool copy_shared = false);
  const Napi::CallbackInfo& info_;
  const char* op_;
  Holds holds_;
};

// One op, split by rows: prepare (optional) runs once on a worker thread before the split and may
// change the row count; run(begin, end) computes rows [begin, end) and must touch only their
// outputs. Both return an smla_status (0 = ok). Where a result goes into memory the caller can
// reach (a cache written in place), it is written there, and only there, on the JS thread once
// every row succeeded: check (optional) returns an empty string or why nothing may be written (the
// promise then rejects, code SMLA_DETACHED); commit (optional) writes, right after the promise is
// resolved in the same callback (so before any JS sees it), and not at all when the promise cannot
// be resolved: a worker thread being torn down (terminate(), process.exit()) writes nothing.
// A cpu call runs each thread's rows `block` at a time and stops between blocks once its JS thread
// is being torn down, so `block` bounds how long that teardown waits for it.
struct RowJob {
  int64_t rows = 0;
  int threads = 1;
  int64_t block = INT64_MAX;
  std::function<int32_t(int64_t& rows)> prepare;
  std::function<int32_t(int64_t begin, int64_t end)> run;
  std::function<std::string(Napi::Env env)> check;
  std::function<void()> commit;
};

// Queues a RowJob on the libuv pool; its Execute fans out to `threads` std::threads (itself one of
// them). The promise resolves with undefined (outputs are the JS arrays passed in) or rejects with
// an Error whose `status` is StatusName (e.g. "SMLA_ERR_OUT_OF_MEMORY"). A CUDA op is a RowJob of
// one row on one thread whose run() copies, launches and synchronizes its stream.
//
// Failures off the JS thread (both queues): what a thread needs to split a job is allocated when
// the call is made, on the JS thread (a failure there is a thrown JS error, code
// SMLA_OUT_OF_MEMORY, before anything is queued); the queues link calls through the calls
// themselves, so queuing, taking and finishing a call allocate nothing. A std::bad_alloc in a
// job's prepare or run rejects its call with code SMLA_OUT_OF_MEMORY (status
// SMLA_ERR_OUT_OF_MEMORY), any other exception with SMLA_CORE_STATUS; a part of a job whose thread
// cannot be started runs on the job's own thread; a cpu call for which no thread can be started
// waits for a running thread of the addon, or, when there is none, rejects with code
// SMLA_NO_THREAD. No exception leaves a thread of the addon or a callback of Node.
Napi::Promise QueueRowJob(Napi::Env env, const char* op, RowJob job, Holds holds);

// Queues a cpu RowJob on the addon's own threads (never libuv's pool, which the process's file,
// DNS, zlib and crypto work needs): one process-wide queue, taken round-robin over the JS threads
// (envs) that have calls waiting, first come first served within each, as many calls at once as
// fit in twice the machine's hardware threads (a call counts its `threads`; one call always runs).
// The promise settles on its JS thread (a thread-safe function) as QueueRowJob's does. `group`
// (an engine's id) names the call for CancelQueued. When the env is torn down, its queued calls
// never start, its running ones stop at their next block, and the teardown returns only once no
// thread of the addon touches the env's memory.
Napi::Promise QueueCpuJob(Napi::Env env, const char* op, RowJob job, Holds holds, int32_t group);

// cpu.cancelQueued(group): rejects this JS thread's queued (not yet started) calls of `group` now,
// with code SMLA_CANCELLED (an engine's dispose()); returns how many.
Napi::Value CancelQueued(const Napi::CallbackInfo& info);

// The JS error of a failed status (code SMLA_CUDA_ERROR or SMLA_CORE_STATUS, and `status`;
// SMLA_OUT_OF_MEMORY for SMLA_ERR_OUT_OF_MEMORY, SMLA_NO_THREAD for kNoThread), and a promise
// already settled with `status` (ops that finish on the calling thread).
Napi::Error StatusError(Napi::Env env, const char* op, int32_t status);
Napi::Promise SettledPromise(Napi::Env env, const char* op, int32_t status);

// A status of the addon's own (never the core's): no thread could be started for a cpu call and
// none of the addon's was left to take it.
constexpr int32_t kNoThread = INT32_MAX - 1;

// What the addon keeps per env (JS thread), made at module init: its instance data, freed with
// the env.
struct Resolvers;
struct EnvData {
  Napi::FunctionReference promise_constructor;  // globalThis.Promise as it was at init
  Napi::FunctionReference capture_resolvers;    // the executor NewPromise passes it
  Resolvers* capture = nullptr;                 // where that executor stores them (while NewPromise runs)
  Napi::FunctionReference device_buffer_class;  // cuda_stream.cpp, made on first need
};
EnvData& DataOf(Napi::Env env);
// Module init, per env: makes its EnvData (globalThis.Promise as it is now, and the executor
// NewPromise passes it) and notes the env of this JS thread for TypedAllocation.
void SetUpEnv(Napi::Env env);

// The op tables. Adding an op = one entry here (and its function next to its siblings).
using OpFunction = Napi::Value (*)(const Napi::CallbackInfo&);
struct OpEntry {
  const char* name;
  OpFunction fn;
};
// An entry as a JS function: a C++ exception other than Napi::Error thrown while it reads, copies
// or queues becomes a thrown JS error with a code (std::bad_alloc: SMLA_OUT_OF_MEMORY; any
// other: SMLA_ADDON_FAILURE), made without allocating on the C++ heap.
Napi::Function OpFunctionOf(Napi::Env env, const OpEntry& entry);
// The same for the classes' constructors and methods (a function-try-block catching
// std::bad_alloc throws this): node-addon-api would turn it into an Error without a code. Made
// without allocating on the C++ heap.
Napi::Error OutOfMemoryError(Napi::Env env, const char* op);
// A base of those classes: node-addon-api allocates an instance before its constructor runs, and
// a failure there throws OutOfMemoryError too (with the env of this JS thread, which has one).
struct TypedAllocation {
  static void* operator new(size_t bytes);
  static void operator delete(void* p) noexcept;
};
extern const OpEntry kCpuOps[];
extern const size_t kCpuOpCount;
#if defined(SMLA_WITH_CUDA_OPS)
extern const OpEntry kCudaOps[];  // native/addon/cuda_ops.cpp
extern const size_t kCudaOpCount;
#endif

// The name of an op's status: the core's smla_status names for >= 0, and for < 0 (a CUDA launcher
// returning -(cudaError_t)) "cudaErrorX: <message>".
std::string StatusName(int32_t status);
std::string CudaErrorText(int32_t cuda_error);
const char* CoreSimdPath();

// CUDA device queries ({built: false} when the addon was built without CUDA).
Napi::Object CudaInfo(Napi::Env env);

}  // namespace smla_addon
