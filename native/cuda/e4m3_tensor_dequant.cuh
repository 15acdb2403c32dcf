// e4m3 bytes to scaled bf16 on the tensor cores (the paged producer's route, SPEC §5): a 64-row
// tile of e4m3 bytes in shared memory (a K-major 128B-swizzled operand: rows of 128 bytes) times the
// 32 x 32 e4m3 identity gives the bytes' values in float32 exactly (one product of 1.0 per sum, the
// rest exact zeros; a NaN byte makes its row's 32 sums NaN, and that row's logit is NaN anyway);
// each value is rounded to bf16 (exact: e4m3 fits) and multiplied once by the token's ue8m0 scale
// as a bf16, as dequant8 does in float32 (the one rounding of the exact product). Two MMAs and 32
// conversions a thread per 64 x 64 tile (two half tiles), against four conversions a byte pair in
// registers.
#pragma once
#include <stdint.h>

#include "kv_cache.cuh"
#include "sm90_ptx.cuh"
#include "sparse_attention_sm90.cuh"

namespace smla::cuda {

constexpr int kE4m3IdentityBytes = 32 * 128;
constexpr uint32_t kE4m3One = 0x38;

// The identity as a K-major 128B-swizzled operand (32 rows n of 128 bytes, byte k = n is 1.0),
// written by `threads` threads; the caller fences it for the async proxy and syncs.
__device__ __forceinline__ void write_e4m3_identity(uint8_t* ident, int tid, int threads) {
  for (int i = tid; i < kE4m3IdentityBytes / 16; i += threads) {
    const int n = i >> 3, k0 = ((i & 7) ^ (n & 7)) * 16;
    const int at = n - k0;  // the byte of this 16-byte piece that is 1.0, if any
    const uint32_t one = kE4m3One << (8 * (at & 3));
    auto word = [&](int j) { return at >= 0 && at < 16 && (at >> 2) == j ? one : 0u; };
    *reinterpret_cast<uint4*>(ident + i * 16) = make_uint4(word(0), word(1), word(2), word(3));
  }
}

// Where byte piece `piece` (16 bytes, piece < 8) of row r goes in a 64-row operand tile of 128-byte
// rows: the bf16 tiles' swizzle, a piece sitting where bf16 dims [8 piece, 8 piece + 8) would.
__device__ __forceinline__ uint32_t e4m3_operand_offset(int r, int piece) { return swz_offset(r, 8 * piece); }

// Issues (does not commit) the MMA of one 32-dim half tile: bytes [byte0, byte0 + 32) of every row
// of the operand at `operand` (shared address) into acc (the m64n32 accumulator layout). Half tiles
// let the producer keep several MMAs in flight in the registers of two whole tiles.
__device__ __forceinline__ void e4m3_half_mma(float (&acc)[16], uint32_t operand, int byte0, uint64_t d_ident) {
  wgmma_m64n32k32_e4m3_ss(acc, detail::kmajor_desc(operand) + (byte0 >> 4), d_ident);
}

// A half tile's values (acc, after its MMA is done) times the scales of this thread's rows (bf16
// pairs: row a = 16 * warp + lane / 4, row b = a + 8) into dims [d0, d0 + 32) of the bf16 tile at
// shared address `tile` (swz_offset layout), by stmatrix.
__device__ __forceinline__ void store_scaled_half(uint32_t tile, int d0, const float (&acc)[16], uint32_t scale_a,
                                                  uint32_t scale_b, int warp, int lane) {
  // stmatrix: lane i names row i % 8 (+ 8 for matrices 1 and 3) of the warp's 16, column group i / 16
  const int row = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), group = lane >> 4;
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    w[2 * j] = bf16x2_mul(detail::pack_bf16(acc[4 * j], acc[4 * j + 1]), scale_a);
    w[2 * j + 1] = bf16x2_mul(detail::pack_bf16(acc[4 * j + 2], acc[4 * j + 3]), scale_b);
  }
  stmatrix_x4(tile + swz_offset(row, d0 + 8 * group), w[0], w[1], w[2], w[3]);
  stmatrix_x4(tile + swz_offset(row, d0 + 16 + 8 * group), w[4], w[5], w[6], w[7]);
}

}  // namespace smla::cuda
