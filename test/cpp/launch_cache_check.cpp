// Host check of native/cuda/launch_cache.cuh's per-device cache (no GPU needed: the queries are
// stand-ins that count their calls). Built and run by test/launch_cache.test.ts; exit status 0 =
// every check passed, and each failure is printed.
#include <stdio.h>

#include <thread>
#include <vector>

#include "launch_cache.cuh"

using smla::cuda::PerDeviceValue;

namespace {

int g_failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    ++g_failures;
    printf("FAILED: %s\n", what);
  }
}

// A stand-in device query: device d has value values[d]; counts its calls per device.
struct Query {
  std::vector<int> values;
  std::vector<int> calls;
  int fail_first = 0;  // the first this many calls fail (returning 1) without setting the value
  int operator()(int device, int* out) {
    ++calls[size_t(device)];
    if (fail_first > 0) {
      --fail_first;
      return 1;
    }
    *out = values[size_t(device)];
    return 0;
  }
};

}  // namespace

int main() {
  {
    PerDeviceValue<int> cache;
    Query q{{132, 78, 0}, {0, 0, 0}};
    auto query = [&](int d, int* out) { return q(d, out); };
    int v = -1;
    expect(cache.get(0, &v, query) == 0 && v == 132, "device 0: its value");
    expect(cache.get(1, &v, query) == 0 && v == 78, "device 1: its own value, not device 0's");
    expect(cache.get(0, &v, query) == 0 && v == 132, "device 0 again: still its value");
    expect(cache.get(1, &v, query) == 0 && v == 78, "device 1 again: still its value");
    expect(q.calls[0] == 1 && q.calls[1] == 1, "each device queried once");
    // a value of 0 is "not known": queried again each time, never kept
    expect(cache.get(2, &v, query) == 0 && v == 0 && cache.get(2, &v, query) == 0, "device 2: value 0");
    expect(q.calls[2] == 2, "a zero value is not kept");
  }
  {
    PerDeviceValue<int> cache;
    Query q{{16, 0}, {0, 0}, 1};
    auto query = [&](int d, int* out) { return q(d, out); };
    int v = -1;
    expect(cache.get(0, &v, query) == 1, "a failed query returns its error");
    expect(cache.get(0, &v, query) == 0 && v == 16, "a failed query is not kept: the next call queries again");
    expect(cache.get(0, &v, query) == 0 && v == 16 && q.calls[0] == 2, "then the value is kept");
  }
  {
    // devices outside the table are answered by the query every time
    PerDeviceValue<int> cache;
    int calls = 0;
    auto query = [&](int d, int* out) {
      ++calls;
      *out = d + 1;
      return 0;
    };
    int v = -1;
    const int far = PerDeviceValue<int>::kMaxDevices;
    expect(cache.get(far, &v, query) == 0 && v == far + 1 && cache.get(far, &v, query) == 0 && calls == 2, "device beyond the table: no caching");
    expect(cache.get(-1, &v, query) == 0 && v == 0 && calls == 3, "negative device: no caching");
  }
  {
    // two caches (two kernels' attribute records) are independent
    PerDeviceValue<int> a, b;
    int v = -1;
    a.get(0, &v, [](int, int* out) { *out = 100; return 0; });
    expect(b.get(0, &v, [](int, int* out) { *out = 200; return 0; }) == 0 && v == 200, "a second record keeps its own value");
    expect(a.get(0, &v, [](int, int* out) { *out = 999; return 0; }) == 0 && v == 100, "the first keeps its own");
  }
  {
    // threads racing on first use all see the device's value
    PerDeviceValue<int> cache;
    std::vector<std::thread> threads;
    std::vector<int> seen(8, -1);
    for (int t = 0; t < 8; ++t)
      threads.emplace_back([&, t] {
        for (int i = 0; i < 1000; ++i) cache.get(t % 2, &seen[size_t(t)], [](int d, int* out) { *out = 50 + d; return 0; });
      });
    for (auto& t : threads) t.join();
    bool ok = true;
    for (int t = 0; t < 8; ++t) ok = ok && seen[size_t(t)] == 50 + t % 2;
    expect(ok, "concurrent first use: every thread sees its device's value");
  }
  printf("%s\n", g_failures == 0 ? "launch_cache: all checks passed" : "launch_cache: checks FAILED");
  return g_failures == 0 ? 0 : 1;
}
