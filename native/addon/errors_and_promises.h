// What row_jobs.cpp and cpu_calls.cpp share of errors_and_promises.cpp (the ops see addon.h alone):
// the error made without the C++ heap, and a call's promise with its resolving functions.
#pragma once
#include "addon.h"

namespace smla_addon {

// An Error `op: what` with `code`, made through the C API from a fixed buffer: usable right after a
// C++ allocation failed. nullptr when even that fails (V8 itself out of memory).
napi_value PlainError(napi_env env, const char* code, const char* op, const char* what) noexcept;

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

// A new pending promise whose resolving functions `out` holds; throws when it cannot be made.
napi_value NewPromise(Napi::Env env, const char* op, Resolvers* out);

}  // namespace smla_addon
