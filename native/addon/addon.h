// Shared pieces of the sparse-mla node addon: checked argument reading, the op table entry, and
// the worker that runs an op off the event loop, split by rows across threads.
#pragma once
#include <napi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace smla_addon {

// Thrown to JS (as a TypeError with code "SMLA_ADDON_ARGUMENT") when the binding passes arguments
// that do not match each other; the TS facade validates first, so this is a last line of defense
// that keeps a mismatched call from reading or writing outside its buffers.
[[noreturn]] void ThrowArgument(Napi::Env env, const std::string& op, const std::string& message);

// Reads the positional arguments of one op call, checking types and exact lengths, and pins every
// typed array it hands out (a reference held until the call settles, so none is collected while
// a worker thread uses its memory; callers must not detach/transfer them during the call).
class Args {
 public:
  Args(const Napi::CallbackInfo& info, const char* op) : info_(info), op_(op) {}

  int32_t Int(size_t i, const char* name, int64_t lo, int64_t hi) const;
  float Float(size_t i, const char* name) const;
  // A typed array of `type` with exactly `length` elements; nullptr when nullable and null.
  template <class T>
  T* Array(size_t i, const char* name, napi_typedarray_type type, uint64_t length, bool nullable = false);
  bool IsNull(size_t i) const { return i >= info_.Length() || info_[i].IsNull() || info_[i].IsUndefined(); }

  Napi::Env Env() const { return info_.Env(); }
  const char* Op() const { return op_; }
  std::vector<Napi::ObjectReference> TakePins() { return std::move(pins_); }

 private:
  void* ArrayData(size_t i, const char* name, napi_typedarray_type type, uint64_t length, bool nullable);
  const Napi::CallbackInfo& info_;
  const char* op_;
  std::vector<Napi::ObjectReference> pins_;
};

template <class T>
T* Args::Array(size_t i, const char* name, napi_typedarray_type type, uint64_t length, bool nullable) {
  return static_cast<T*>(ArrayData(i, name, type, length, nullable));
}

// One op, split by rows: prepare (optional) runs once on a worker thread before the split and may
// change the row count; run(begin, end) computes rows [begin, end) and must touch only their
// outputs. Both return an smla_status (0 = ok).
struct RowJob {
  int64_t rows = 0;
  int threads = 1;
  std::function<int32_t(int64_t& rows)> prepare;
  std::function<int32_t(int64_t begin, int64_t end)> run;
};

// Queues a RowJob on the libuv pool; its Execute fans out to `threads` std::threads (itself one of
// them). The promise resolves with undefined (outputs are the JS arrays passed in) or rejects with
// an Error whose `status` is StatusName (e.g. "SMLA_ERR_OUT_OF_MEMORY"). A CUDA op is a RowJob of
// one row on one thread whose run() copies, launches and synchronizes its stream.
Napi::Promise QueueRowJob(Napi::Env env, const char* op, RowJob job, std::vector<Napi::ObjectReference> pins);

// The op tables. Adding an op = one entry here (and its function next to its siblings).
using OpFunction = Napi::Value (*)(const Napi::CallbackInfo&);
struct OpEntry {
  const char* name;
  OpFunction fn;
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
