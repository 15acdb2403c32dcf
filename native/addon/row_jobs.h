// What cpu_calls.cpp shares of row_jobs.cpp: a job's parts, made on the JS thread, running a job
// split by rows over them, and settling its promise.
#pragma once
#include <atomic>
#include <memory>
#include <thread>

#include "addon.h"
#include "errors_and_promises.h"
#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

// One part of a split job: its status and the thread that runs it (none for part 0).
struct SplitPart {
  int32_t status = SMLA_OK;
  std::thread thread;
};
// A job's parts, one per thread it may use: made on the JS thread when the call is made, so that
// splitting it allocates nothing on a worker thread.
using SplitParts = std::unique_ptr<SplitPart[]>;
SplitParts MakeParts(const RowJob& job);

// Runs a job (prepare, then its rows split over `parts`): its status; stops between blocks of rows
// once *stop is set (nullptr: never).
int32_t Execute(const RowJob& job, const std::atomic<bool>* stop, SplitPart* parts) noexcept;

// Settles a finished job's promise (`settle`, released once used) on its JS thread: check,
// resolve, then commit; or reject. Run while a worker thread's env is being torn down, the resolve
// fails (JS is stopped) and nothing is committed; whatever throws while settling rejects the
// promise if it is not settled yet (so a live caller is told, never left waiting; with an error
// made without the C++ heap, which may be what just failed) and is dropped when even that fails
// (the env is going away: nobody is left to tell).
void SettleJob(Napi::Env env, const char* op, const RowJob& job, int32_t status, Resolvers* settle) noexcept;

}  // namespace smla_addon
