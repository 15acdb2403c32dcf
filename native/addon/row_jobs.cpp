// The row-parallel worker: a RowJob split by rows over std::threads (RunSplit, Execute), its
// promise settled on the JS thread (SettleJob), and QueueRowJob, which runs one on libuv's pool
// (a CUDA op's host work). The cpu calls run theirs on the addon's own threads (cpu_calls.cpp).
#include "row_jobs.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <new>

#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

namespace {

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

// A thread's share of a job's rows stopped because its env is being torn down (never reported:
// nobody is left to tell).
constexpr int32_t kStopped = INT32_MAX;

}  // namespace

SplitParts MakeParts(const RowJob& job) { return SplitParts(new SplitPart[size_t(std::max(1, job.threads))]); }

namespace {

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

}  // namespace

int32_t Execute(const RowJob& job, const std::atomic<bool>* stop, SplitPart* parts) noexcept {
  int64_t rows = job.rows;
  int32_t status = SMLA_OK;
  if (job.prepare) status = Guarded([&] { return job.prepare(rows); });
  if (status == SMLA_OK && rows > 0) status = RunSplit(job, rows, stop, parts);
  return status;
}

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

namespace {

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

}  // namespace smla_addon
