// DSMEM exchange microbenchmark: each math-warpgroup-sized group of a 2-CTA cluster sends `v4s`
// 16-byte pieces a thread to the same group of the peer CTA by st.async (complete_tx on the peer's
// mbarrier), then waits for the peer's pieces and reads them: one symmetric exchange an iteration.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

__device__ __forceinline__ uint32_t su32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ uint32_t mapa(uint32_t a, uint32_t rank) {
  uint32_t r; asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank)); return r; }
__device__ __forceinline__ void st_async(uint32_t ra, uint4 v, uint32_t rb) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1,%2,%3,%4}, [%5];"
               :: "r"(ra), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(rb) : "memory"); }
__device__ __forceinline__ void expect_tx(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(bytes) : "memory"); }
__device__ __forceinline__ void wait_par(uint32_t b, uint32_t par) {
  asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}\n"
               :: "r"(b), "r"(par) : "memory"); }
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ uint32_t cluster_rank() { uint32_t r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r; }

template <int V4S>
__global__ void __cluster_dims__(2, 1, 1) exch(int iters, int spin_ns, float* out) {
  extern __shared__ __align__(128) uint8_t sm[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(sm);  // [wg][par]
  uint8_t* buf = sm + 128;                          // [wg][par][V4S * 2048]
  const int tid = threadIdx.x, wg = tid / 128, ctid = tid % 128;
  const int wgs = blockDim.x / 128;
  if (tid == 0) for (int i = 0; i < 2 * wgs; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(su32(&bar[i])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  cluster_sync();
  const uint32_t peer = cluster_rank() ^ 1;
  uint4 v[V4S];
  for (int j = 0; j < V4S; ++j) v[j] = make_uint4(tid + j, 1, 2, 3);
  constexpr uint32_t kBytes = V4S * 2048;
  for (int it = 0; it < iters; ++it) {
    const int par = it & 1;
    uint8_t* b = buf + (wg * 2 + par) * kBytes;
    const uint32_t lbar = su32(&bar[wg * 2 + par]);
    if (spin_ns) { uint64_t t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0)); uint64_t t; do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < (uint64_t)spin_ns); }
    const uint32_t rb = mapa(lbar, peer), rbase = mapa(su32(b), peer);
#pragma unroll
    for (int j = 0; j < V4S; ++j) st_async(rbase + j * 2048 + ctid * 16, v[j], rb);
    if (ctid == 0) expect_tx(lbar, kBytes);
    wait_par(lbar, (it >> 1) & 1);
#pragma unroll
    for (int j = 0; j < V4S; ++j) { uint4 r = *reinterpret_cast<const uint4*>(b + j * 2048 + ctid * 16); v[j].x += r.y; v[j].y ^= r.x; }
  }
  uint32_t acc = 0;
  for (int j = 0; j < V4S; ++j) acc += v[j].x + v[j].y;
  if (acc == 0x12345678u) out[0] = 1.0f;
  cluster_sync();
}

template <int V4S>
void run(int wgs, int spin, int iters) {
  const int smem = 128 + wgs * 2 * V4S * 2048;
  cudaFuncSetAttribute(exch<V4S>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  float* out; cudaMalloc(&out, 4);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  float best = 1e30f;
  for (int r = 0; r < 5; ++r) {
    cudaEventRecord(a);
    exch<V4S><<<132, wgs * 128, smem>>>(iters, spin, out);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); if (ms < best) best = ms;
  }
  cudaError_t e = cudaGetLastError();
  printf("wgs %d bytes/wg %6d spin %4d ns: %7.1f ns/iter  (%s)  per-SM out %.1f GB/s\n", wgs, V4S * 2048, spin,
         best * 1e6 / iters, cudaGetErrorString(e), (double)wgs * V4S * 2048 * iters / (best * 1e-3) / 1e9);
  cudaFree(out);
}

int main() {
  const int it = 4000;
  for (int wgs = 1; wgs <= 2; ++wgs) {
    run<1>(wgs, 0, it); run<2>(wgs, 0, it); run<4>(wgs, 0, it); run<8>(wgs, 0, it); run<16>(wgs, 0, it);
  }
  run<8>(2, 500, it); run<8>(2, 1000, it); run<8>(2, 2000, it);
  run<8>(1, 1000, it);
  return 0;
}
