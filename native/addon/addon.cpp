// Module entry of sparse_mla_native.node: the build facts and the op tables as JS functions. The
// TS side (src/backends/native/binding.ts) types this surface; addon.h says which file holds what.
#include "addon.h"

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
  SetUpEnv(env);
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
