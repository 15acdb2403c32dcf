// The cpu calls' own threads (native/addon/README.md, "The cpu calls' threads"): one process-wide
// queue of every JS thread's (env's) calls, the threads that run them (row_jobs.cpp's Execute), the
// wake that settles finished calls on their JS thread, cancelQueued, and an env's teardown.
#include "row_jobs.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

namespace {

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

}  // namespace smla_addon
