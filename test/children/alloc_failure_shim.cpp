// Fault injection for test/alloc_failure.test.ts, built by the test with the system C++ compiler
// and loaded into a child node with LD_PRELOAD. While the file SMLA_FAIL_SWITCH exists:
//  - every SMLA_FAIL_NEW_EVERY-th operator new / new[] called from the native addon's own code
//    (the caller's address inside the mapping of the file named SMLA_FAIL_MODULE) fails: the
//    throwing forms throw std::bad_alloc, the nothrow forms return null;
//  - every SMLA_FAIL_THREAD_EVERY-th pthread_create called from libstdc++ (a std::thread: Node and
//    V8 start theirs through libuv and their own platform code) fails with EAGAIN.
// SMLA_FAIL_ON=std-threads fails allocations only on threads started by std::thread (the addon's
// own), not on the JS threads that make the calls. SMLA_FAIL_ANY_CALLER=1 (with std-threads) fails
// them whoever calls operator new there: also Node's code, which the addon's threads may call (a
// thread-safe function's queue), and libstdc++'s.
// Allocations of Node, V8 and libstdc++ itself are never failed: Node is built without exceptions,
// so a failure inside it ends the process whatever the addon does. At exit it writes how many
// allocations and thread starts it failed to SMLA_FAIL_REPORT ("<news> <threads> <news on
// std::threads>").
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace {

struct Range {
  std::atomic<uintptr_t> lo{0}, hi{0};
  bool Has(uintptr_t a) const { return a >= lo.load(std::memory_order_relaxed) && a < hi.load(std::memory_order_relaxed); }
};

Range g_addon, g_libstdcxx;
char g_module[256], g_switch[1024], g_report[1024];
unsigned long g_new_every = 0, g_thread_every = 0;
bool g_std_threads_only = false;
bool g_any_caller = false;  // (only with g_std_threads_only)
std::atomic<unsigned long> g_news{0}, g_threads{0}, g_failed_news{0}, g_failed_threads{0}, g_failed_news_std{0};
thread_local bool t_std_thread = false;  // this thread was started by std::thread
using PthreadCreate = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
using Dlopen = void* (*)(const char*, int);
PthreadCreate g_real_pthread_create = nullptr;
Dlopen g_real_dlopen = nullptr;

void CopyEnv(const char* name, char* out, size_t size) {
  const char* v = getenv(name);
  std::snprintf(out, size, "%s", v ? v : "");
}

// The executable segments of the loaded object whose path contains `needle`.
struct Find {
  const char* needle;
  uintptr_t lo, hi;
};
int FindSegments(struct dl_phdr_info* info, size_t, void* data) {
  Find& f = *static_cast<Find*>(data);
  if (!info->dlpi_name || !*f.needle || !std::strstr(info->dlpi_name, f.needle)) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_X)) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (!f.lo || lo < f.lo) f.lo = lo;
    if (hi > f.hi) f.hi = hi;
  }
  return f.hi ? 1 : 0;
}
void Locate(const char* needle, Range& r) {
  Find f{needle, 0, 0};
  dl_iterate_phdr(FindSegments, &f);
  if (!f.hi) return;
  r.lo.store(f.lo);
  r.hi.store(f.hi);
}

bool On() { return g_switch[0] && access(g_switch, F_OK) == 0; }

bool FailNew(void* caller) {
  const bool ours = g_addon.Has(reinterpret_cast<uintptr_t>(caller)) || (g_any_caller && t_std_thread);
  if (!g_new_every || !ours || (g_std_threads_only && !t_std_thread) || !On()) return false;
  if (++g_news % g_new_every != 0) return false;
  g_failed_news++;
  if (t_std_thread) g_failed_news_std++;
  return true;
}

// A std::thread's start routine, marked.
struct Start {
  void* (*start)(void*);
  void* arg;
};
void* MarkedStart(void* p) {
  const Start s = *static_cast<Start*>(p);
  std::free(p);
  t_std_thread = true;
  return s.start(s.arg);
}

void* Allocate(size_t n, void* caller, bool nothrow) {
  if (FailNew(caller)) {
    if (nothrow) return nullptr;
    throw std::bad_alloc();
  }
  for (;;) {
    if (void* p = std::malloc(n ? n : 1)) return p;
    std::new_handler h = std::get_new_handler();
    if (!h) {
      if (nothrow) return nullptr;
      throw std::bad_alloc();
    }
    if (!nothrow) {
      h();
      continue;
    }
    try {
      h();
    } catch (...) {
      return nullptr;
    }
  }
}

__attribute__((constructor)) void Init() {
  CopyEnv("SMLA_FAIL_MODULE", g_module, sizeof g_module);
  CopyEnv("SMLA_FAIL_SWITCH", g_switch, sizeof g_switch);
  CopyEnv("SMLA_FAIL_REPORT", g_report, sizeof g_report);
  g_new_every = std::strtoul(getenv("SMLA_FAIL_NEW_EVERY") ? getenv("SMLA_FAIL_NEW_EVERY") : "0", nullptr, 10);
  g_thread_every = std::strtoul(getenv("SMLA_FAIL_THREAD_EVERY") ? getenv("SMLA_FAIL_THREAD_EVERY") : "0", nullptr, 10);
  g_std_threads_only = getenv("SMLA_FAIL_ON") && std::strcmp(getenv("SMLA_FAIL_ON"), "std-threads") == 0;
  g_any_caller = g_std_threads_only && getenv("SMLA_FAIL_ANY_CALLER") && std::strcmp(getenv("SMLA_FAIL_ANY_CALLER"), "1") == 0;
  g_real_pthread_create = reinterpret_cast<PthreadCreate>(dlsym(RTLD_NEXT, "pthread_create"));
  g_real_dlopen = reinterpret_cast<Dlopen>(dlsym(RTLD_NEXT, "dlopen"));
  Locate("libstdc++", g_libstdcxx);
  Locate(g_module, g_addon);  // already loaded (unusual): found now
}

__attribute__((destructor)) void Report() {
  if (!g_report[0] || !g_addon.hi.load()) return;  // (a process that never loaded the addon: a wrapper like timeout)
  if (FILE* f = std::fopen(g_report, "w")) {
    std::fprintf(f, "%lu %lu %lu\n", g_failed_news.load(), g_failed_threads.load(), g_failed_news_std.load());
    std::fclose(f);
  }
}

}  // namespace

extern "C" void* dlopen(const char* file, int mode) {
  void* handle = g_real_dlopen(file, mode);
  if (handle && file && g_module[0] && std::strstr(file, g_module)) Locate(g_module, g_addon);
  return handle;
}

extern "C" int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*start)(void*), void* arg) {
  if (!g_libstdcxx.Has(reinterpret_cast<uintptr_t>(__builtin_return_address(0)))) return g_real_pthread_create(thread, attr, start, arg);
  if (g_thread_every && On() && ++g_threads % g_thread_every == 0) {
    g_failed_threads++;
    return EAGAIN;
  }
  Start* s = static_cast<Start*>(std::malloc(sizeof(Start)));
  if (!s) return EAGAIN;
  *s = {start, arg};
  const int r = g_real_pthread_create(thread, attr, MarkedStart, s);
  if (r != 0) std::free(s);
  return r;
}

void* operator new(size_t n) { return Allocate(n, __builtin_return_address(0), false); }
void* operator new[](size_t n) { return Allocate(n, __builtin_return_address(0), false); }
void* operator new(size_t n, const std::nothrow_t&) noexcept { return Allocate(n, __builtin_return_address(0), true); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return Allocate(n, __builtin_return_address(0), true); }
