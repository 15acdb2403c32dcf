// Failures and promises: the coded JS errors (made without the C++ heap where an allocation may just
// have failed), the net that keeps a C++ exception from leaving an op function or a class, the
// status names, and a call's promise (made with `new Promise(executor)`, settled through
// references to its resolving functions).
#include "errors_and_promises.h"

#include <cstdio>
#include <exception>
#include <new>

#include "sparse_mla/sparse_mla.h"

namespace smla_addon {

napi_value PlainError(napi_env env, const char* code, const char* op, const char* what) noexcept {
  char text[320];
  std::snprintf(text, sizeof text, "%s: %s", op, what);
  napi_value code_value = nullptr, message = nullptr, error = nullptr;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_value) != napi_ok ||
      napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message) != napi_ok || napi_create_error(env, code_value, message, &error) != napi_ok)
    return nullptr;
  return error;
}

namespace {

void ThrowPlain(napi_env env, const char* code, const char* op, const char* what) noexcept {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  if (napi_value e = PlainError(env, code, op, what)) napi_throw(env, e);
  else napi_throw_error(env, code, what);
}

}  // namespace

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

thread_local napi_env t_js_env = nullptr;  // this JS thread's env (Init): one per thread

}  // namespace

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

void SetUpEnv(Napi::Env env) {
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
}

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

void* TypedAllocation::operator new(size_t bytes) {
  if (void* p = ::operator new(bytes, std::nothrow)) return p;
  if (!t_js_env) throw std::bad_alloc();
  throw OutOfMemoryError(Napi::Env(t_js_env), "sparse_mla_native: new");
}
void TypedAllocation::operator delete(void* p) noexcept { ::operator delete(p); }

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

}  // namespace smla_addon
