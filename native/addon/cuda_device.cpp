// CUDA device queries for the loader's probe and `sparse-mla info`. With cudart linked statically,
// a machine without a driver or GPU gets an error code from cudaGetDeviceCount, never a crash.
// The runtime is only touched when devices() is called, not when the addon loads. With the
// kernels built, the op table of native/addon/cuda_ops.cpp is exported as `cuda.ops` (README.md).
#include "addon.h"

#if defined(SMLA_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace smla_addon {

#if defined(SMLA_WITH_CUDA)
namespace {

// devices() → { count, error: string | null, runtimeVersion, driverVersion, devices: [...] }
Napi::Value Devices(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);  // 0 when no driver is installed
  r.Set("runtimeVersion", runtime);
  r.Set("driverVersion", driver);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  Napi::Array list = Napi::Array::New(env);
  if (err != cudaSuccess) {
    count = 0;
    r.Set("error", Napi::String::New(env, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)));
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  } else {
    r.Set("error", env.Null());
    for (int d = 0; d < count; ++d) {
      cudaDeviceProp p{};
      if (cudaGetDeviceProperties(&p, d) != cudaSuccess) continue;
      Napi::Object o = Napi::Object::New(env);
      o.Set("index", d);
      o.Set("name", Napi::String::New(env, p.name));
      o.Set("computeCapability", Napi::String::New(env, std::to_string(p.major) + "." + std::to_string(p.minor)));
      o.Set("multiProcessors", p.multiProcessorCount);
      o.Set("memoryBytes", double(p.totalGlobalMem));
      o.Set("l2Bytes", p.l2CacheSize);
      // peerAccess[j]: this device can read and write device j's memory directly
      Napi::Array peers = Napi::Array::New(env);
      for (int j = 0; j < count; ++j) {
        int can = 0;
        if (j != d && cudaDeviceCanAccessPeer(&can, d, j) != cudaSuccess) can = 0;
        peers.Set(uint32_t(j), Napi::Boolean::New(env, j == d || can != 0));
      }
      o.Set("peerAccess", peers);
      list.Set(list.Length(), o);
    }
    cudaGetLastError();
  }
  r.Set("count", count);
  r.Set("devices", list);
  return r;
}

}  // namespace

Napi::Object CudaInfo(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", true);
  o.Set("compilerVersion", Napi::String::New(env, SMLA_CUDA_VERSION));
  o.Set("arch", Napi::String::New(env, "sm_90a"));
#if defined(SMLA_WITH_CUDA_KERNELS)
  o.Set("kernels", true);
#else
  o.Set("kernels", false);
#endif
  o.Set("devices", OpFunctionOf(env, {"devices", Devices}));  // (out of memory: code SMLA_OUT_OF_MEMORY)
#if defined(SMLA_WITH_CUDA_OPS)
  Napi::Object ops = Napi::Object::New(env);
  for (size_t i = 0; i < kCudaOpCount; ++i) ops.Set(kCudaOps[i].name, OpFunctionOf(env, kCudaOps[i]));
  o.Set("ops", ops);
#endif
  return o;
}

std::string CudaErrorText(int32_t cuda_error) {
  const cudaError_t e = static_cast<cudaError_t>(cuda_error);
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

#else

Napi::Object CudaInfo(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", false);
  return o;
}

std::string CudaErrorText(int32_t cuda_error) { return "CUDA error " + std::to_string(cuda_error); }

#endif

}  // namespace smla_addon
