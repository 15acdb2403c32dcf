// What the launchers would otherwise ask the CUDA runtime on every launch, asked once per device:
// the device's SM count, and each kernel's max-dynamic-shared-memory attribute (a per-context
// setting, so it is set once on each device the kernel runs on). Launches are host-bound when the
// kernels are short, and these queries sat on that path.
//
// Keyed by device because a process may drive several GPUs (one engine per device): their SM
// counts may differ and an attribute set on one device's context does not carry to another. The
// cache is never invalidated: the addon never resets a device (cudaDeviceReset would drop the
// attributes while the cache still holds them).
#pragma once
#include <cuda_runtime.h>

#include <atomic>

namespace smla::cuda {

// A value per device, computed by `query` the first time it succeeds on that device and kept for
// the process. Thread-safe: threads racing on a device's first use may each query (the queries
// here are idempotent) and store the same value. T{} marks "not known yet", so a query must give
// something else on success. Devices outside [0, kMaxDevices) are queried every time.
template <class T>
class PerDeviceValue {
 public:
  static constexpr int kMaxDevices = 64;

  PerDeviceValue() {
    for (auto& v : values_) v.store(T{}, std::memory_order_relaxed);
  }
  PerDeviceValue(const PerDeviceValue&) = delete;
  PerDeviceValue& operator=(const PerDeviceValue&) = delete;

  // Sets *value to device's value; query(device, value) returns 0 (cudaSuccess) when it has set
  // it. Returns what the query returned (0 when the value was kept); a failed query keeps nothing.
  template <class Query>
  int get(int device, T* value, Query&& query) {
    const bool cacheable = device >= 0 && device < kMaxDevices;
    if (cacheable) {
      const T kept = values_[device].load(std::memory_order_acquire);
      if (kept != T{}) {
        *value = kept;
        return 0;
      }
    }
    const int err = static_cast<int>(query(device, value));
    if (err == 0 && cacheable && *value != T{}) values_[device].store(*value, std::memory_order_release);
    return err;
  }

 private:
  std::atomic<T> values_[kMaxDevices];
};

// The current device (the addon sets the stream's device before every launch) and its SM count.
inline cudaError_t current_device_sms(int* device, int* sms) {
  static PerDeviceValue<int> sm_counts;
  cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) return err;
  return static_cast<cudaError_t>(sm_counts.get(*device, sms, [](int d, int* out) {
    return cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, d);
  }));
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` on `device` (the current one), once:
// `set_on` is the kernel's own record (one static per kernel instantiation at its launcher).
template <class Kernel>
cudaError_t max_dynamic_smem_once(PerDeviceValue<int>& set_on, Kernel kernel, int bytes, int device) {
  int set = 0;
  return static_cast<cudaError_t>(set_on.get(device, &set, [&](int, int* out) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess) *out = bytes;
    return err;
  }));
}

}  // namespace smla::cuda
