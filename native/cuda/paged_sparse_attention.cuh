// SPEC §5 paged FP8 sparse attention on sm_90a (dQK = dV = 512): a kernel of its own whose
// producer reads v4 tokens straight from the paged FP8 cache(s) into registers and dequantizes
// them into the bf16 tile on the tensor cores (e4m3_tensor_dequant.cuh). The main and extra sets
// form one list per query: the main set's first min(topk, topkLength) entries, then the extra
// set's; one softmax over all of it.
//
// A tile = one query x 64 heads, on a persistent grid (below); warpgroup 2 dequantizes 64 tokens
// per stage into a two-stage ring (each warp's 16 rows of FP8 loaded into registers at once, in
// the middle of the stage before's fill; the RoPE dims copied into the tile by cp.async).
// Warpgroup 0 computes S = QKᵀ for the whole block (m64n64, so Q is read once per block), the
// softmax and O[:, 0:256] += P·V with P in registers;
// it hands P (bf16) and each row's rescale factor to warpgroup 1 through shared memory (double-
// buffered by block parity), which computes O[:, 256:512] += P·V and, while it waits for the next
// P, dequantizes two of the next block's seven nope tiles in registers (dequant_wg1_tiles). The
// dequantizing producer needs registers that the math warpgroups of the prefill kernel
// (sparse_attention_sm90.cuh) cannot spare; here warpgroup 1 holds only its half of O.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "e4m3_tensor_dequant.cuh"
#include "kv_cache.cuh"
#include "sparse_attention_sm90.cuh"
#include "sparse_prefill.cuh"

namespace smla::cuda {

constexpr int kPagedRowsPerStage = 64;
constexpr uint32_t kProducerSync = 6;  // named barrier of the producer warpgroup (128)
constexpr int kPagedStages = 2;

// Warpgroup 1's share of a stage's dequantization: nope tiles 5 and 6 (dims 320-447), converted in
// registers from the e4m3 bytes the producer staged for its tensor cores (tile 5's in chunk 5
// pieces 4-7, beside tile 4's, which the producer's MMAs have read by then; tile 6's in chunk 6
// pieces 0-3) and written in place as bf16. Thread ctid takes row ctid / 2, tile 5 + ctid % 2, two
// pieces a round in an order that reads every piece before its place is written: tile 5 from the
// low pieces up, tile 6 from the high pieces down.
__device__ __forceinline__ void dequant_wg1_tiles(uint8_t* stage, const uint32_t* tile_scale, int ctid) {
  const int r = ctid >> 1, h = ctid & 1;
  uint8_t* chunk = stage + (5 + h) * 8192;
  const uint32_t scale = ue8m0_to_bf16x2((tile_scale[r] >> (8 * (1 + h))) & 0xffu);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    uint4 raw[2];
    int q[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      q[j] = h ? 3 - 2 * k - j : 2 * k + j;
      raw[j] = *reinterpret_cast<const uint4*>(chunk + swz_offset(r, 8 * (h ? q[j] : q[j] + 4)));
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      *reinterpret_cast<uint4*>(chunk + swz_offset(r, 16 * q[j])) = dequant8_bf16_scale(raw[j].x, raw[j].y, scale);
      *reinterpret_cast<uint4*>(chunk + swz_offset(r, 16 * q[j] + 8)) = dequant8_bf16_scale(raw[j].z, raw[j].w, scale);
    }
  }
}

template <int DQK>
struct PagedSmem {
  static_assert(DQK % 64 == 0 && DQK >= kDv, "dQK: a multiple of 64, at least dV");
  static constexpr int kChunks = DQK / 64;
  static constexpr int kTileBytes = kChunks * 8192;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTileBytes;
  static constexpr int kP = kK + kPagedStages * kTileBytes;  // P: two 64x64 bf16 K-major tiles (by block parity)
  static constexpr int kScale = kP + 2 * 8192;       // float [2][64]: each block's rescale factor of O
  static constexpr int kOutScale = kScale + 512;     // float [2][64]: the rows' final normalization (by tile parity)
  static constexpr int kAny = kOutScale + 512;       // int [2][4]: each WG0 warp saw a valid entry (by tile parity)
  static constexpr int kValid = kAny + 32;           // uint8 [kPagedStages][64]
  static constexpr int kTileScale = kValid + kPagedStages * 64;  // uint32 [kPagedStages][64]: scale bytes 4-7
  // uint64 full[kPagedStages], empty[kPagedStages], p_ready[2], p_free[2], out_ready[2], out_free[2],
  // raw_ready[kPagedStages], q_full
  static constexpr int kBar = kTileScale + kPagedStages * 256;
  // the producer's e4m3 identity (a 128B-swizzled operand: 1024-aligned)
  static constexpr int kIdentity = (kBar + (3 * kPagedStages + 9) * 8 + 1023) / 1024 * 1024;
  static constexpr int kTotal = kIdentity + kE4m3IdentityBytes;
  static constexpr int kAlloc = kTotal + 1024;       // slack to align the base to 1024 B
  static_assert(kAlloc <= 232448, "fits the 227 KB a block may use");
};

// The last round of a launch split along the KV (split-KV for the tail): with T tiles on G CTAs, the
// r = T mod G tiles of the last round (all T when T < G) each become `pieces_per_tile` work items
// over consecutive ranges of the tile's blocks, so the round's CTAs are not left idle behind r of
// them. A piece writes its O unnormalized (fp32, relative to its own running max) and its rows'
// softmax state to `parts` / `stats`; paged_combine_pieces_kernel then merges a tile's pieces and
// finalizes the rows as the kernel's epilogue would. Items below full_items are whole tiles.
struct PagedSplit {
  float* parts = nullptr;    // [piece][64 rows][512]
  float4* stats = nullptr;   // [piece][64 rows]: the lazy max O and l are relative to (log2), the true max, l, any valid
  uint32_t full_items = 0;
  uint32_t n_items = 0;
  int32_t pieces_per_tile = 1;

  static PagedSplit whole_tiles(int64_t tiles) {
    PagedSplit sp;
    sp.full_items = sp.n_items = uint32_t(tiles);
    return sp;
  }
};

// Work item w: its query, first head, first block, block count and piece (-1: a whole tile).
struct PagedItem {
  int64_t qi;
  int h0, b0, nb, piece;
};
template <class Source>
__device__ __forceinline__ PagedItem item_of(uint32_t w, int head_blocks, const Source& src, const PagedSplit& sp,
                                             typename Source::Entries& e) {
  uint32_t t = w;
  int piece = -1, j = 0;
  if (w >= sp.full_items) {
    piece = int(w - sp.full_items);
    t = sp.full_items + uint32_t(piece / sp.pieces_per_tile);
    j = piece % sp.pieces_per_tile;
  }
  const detail::TileOf tile = detail::tile_of(t, head_blocks);
  e = src.begin(tile.qi);
  const int blocks = (e.total + kPagedRowsPerStage - 1) / kPagedRowsPerStage;
  int b0 = 0, nb = blocks;
  if (piece >= 0) {
    b0 = j * blocks / sp.pieces_per_tile;
    nb = (j + 1) * blocks / sp.pieces_per_tile - b0;
  }
  return PagedItem{tile.qi, tile.h0, b0, nb, piece};
}
template <class Source>
__device__ __forceinline__ PagedItem item_of(uint32_t w, int head_blocks, const Source& src, const PagedSplit& sp) {
  typename Source::Entries e;
  return item_of(w, head_blocks, src, sp, e);
}

// One row of a piece's unnormalized O half (fp32), as store_o_row's row: o[4j + 2 half + e] is
// column 8j + 2 quad + e of this warpgroup's 256.
__device__ __forceinline__ void store_part_row(const PagedSplit& sp, int piece, int row, int wg, int quad, int half,
                                               const float (&o)[128]) {
  float2* dst = reinterpret_cast<float2*>(sp.parts + (int64_t(piece) * kPagedRowsPerStage + row) * kDv + wg * 256) + quad;
#pragma unroll
  for (int j = 0; j < 32; ++j) dst[4 * j] = make_float2(o[4 * j + 2 * half], o[4 * j + 2 * half + 1]);
}

// This thread's two rows of a warpgroup's O half: a whole tile's normalized into out, a piece's
// unnormalized into its part of the workspace.
__device__ __forceinline__ void store_item_o(const AttnOutputs& p, const PagedSplit& sp, const PagedItem& it, int wg,
                                             int row_a, int row_b, int quad, const float (&o)[128], float sc_a,
                                             float sc_b) {
  if (it.piece < 0) {
    detail::store_o_row(p, it.qi, it.h0 + row_a, wg, quad, 0, o, sc_a);
    detail::store_o_row(p, it.qi, it.h0 + row_b, wg, quad, 1, o, sc_b);
  } else {
    store_part_row(sp, it.piece, row_a, wg, quad, 0, o);
    store_part_row(sp, it.piece, row_b, wg, quad, 1, o);
  }
}

// Merges each split tile's pieces (blockIdx.x: the tile among the split ones, blockIdx.y: its row;
// 128 threads of 4 columns) and finalizes the row: out, lse and max_logits as one pass would give.
__global__ void __launch_bounds__(128) paged_combine_pieces_kernel(const AttnOutputs p, const PagedSplit sp) {
  using namespace detail;
  const int row = int(blockIdx.y), n = sp.pieces_per_tile;
  const TileOf tile = tile_of(sp.full_items + blockIdx.x, head_blocks_of(p.h_q));
  const int h = tile.h0 + row;
  if (h >= p.h_q) return;
  const int64_t first = int64_t(blockIdx.x) * n;
  float m = -INFINITY, true_max = -INFINITY;
  bool any_valid = false;
  for (int j = 0; j < n; ++j) {
    const float4 st = sp.stats[(first + j) * kPagedRowsPerStage + row];
    m = max_nan(m, st.x);
    true_max = max_nan(true_max, st.y);
    any_valid |= st.w != 0.0f;
  }
  float l = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int j = 0; j < n; ++j) {
    const float4 st = sp.stats[(first + j) * kPagedRowsPerStage + row];
    // A piece whose logits are all −inf weighs 0 (not exp2(−inf − −inf)); its O still enters, so a
    // value row it weighted by 0 that holds inf or NaN makes NaN as in one pass. A NaN max poisons the row.
    const float w = st.x == -INFINITY ? 0.0f : exp2f(st.x - m);
    l += w * st.z;
    const float4 v = reinterpret_cast<const float4*>(sp.parts + ((first + j) * kPagedRowsPerStage + row) * kDv)[threadIdx.x];
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  const float sc = finalize_row(p, tile.qi, h, m, true_max, l, any_valid, threadIdx.x == 0);
  reinterpret_cast<uint2*>(p.out + (tile.qi * p.h_q + h) * kDv)[threadIdx.x] =
      make_uint2(pack_bf16(acc.x * sc, acc.y * sc), pack_bf16(acc.z * sc, acc.w * sc));
}

// Source policy: begin(qi) -> Entries (the query's entry count); load_id(entries, qi, k) -> the
// entry's id (-1 past the end, where the row is never read); resolve(entries, k, id) -> Entry (its
// records, or invalid); load_rows(entry, raw, scales, ptid) loads a warp's 16 rows into registers;
// fill(cur, raw, scales, next entries, next k, next id, tile, valid, identity, ptid, stage_free,
// tile_scale, raw_ready) is called by all 128 producer threads per stage, each passing the entry of
// its own row (warp w, lane l < 16 owns row 16w + l) whose bytes load_rows has put in raw / scales;
// it must call stage_free() before it writes the tile, the valid flags or the rows' scale bytes 4-7
// (tile_scale); it leaves nope tiles 5 and 6 staged as e4m3 bytes and arrives on raw_ready once WG1
// may convert them (dequant_wg1_tiles); once raw / scales are staged it resolves the next block's
// entry into cur and loads it; it must make its stores visible to wgmma (wait + fence.proxy.async)
// and return. The kernel then arrives.
//
// The grid is persistent (one CTA per SM, tiles = (query, 64-head group) pairs taken round-robin,
// query-major so a query's head groups run side by side): the producer streams blocks across
// tiles, so the next tile's first blocks are dequantized while the math warpgroups finish this
// one, and warpgroup 0 loads the next tile's Q as soon as its last QKᵀ is done. Every stage,
// handoff and epilogue barrier keeps counting across tiles (g: the CTA's block count; tile parity
// for the epilogue's exchange). The work items are the tiles, except in a split last round
// (PagedSplit), where a tile's pieces are items of their own.
// kQByTma: Q arrives by TMA boxes of `q_map` (make_q_map), otherwise by the threads' cp.async.
template <int DQK, class Source, bool kQByTma>
__global__ void __launch_bounds__(kAttnThreads, 1)
    paged_attention_sm90_kernel(const AttnOutputs p, const Source src, const __grid_constant__ CUtensorMap q_map,
                                const PagedSplit split) {
  using L = PagedSmem<DQK>;
  using namespace detail;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  uint8_t* sP = smem + L::kP;
  float* sScale = reinterpret_cast<float*>(smem + L::kScale);
  float* sOutScale = reinterpret_cast<float*>(smem + L::kOutScale);
  int* sAny = reinterpret_cast<int*>(smem + L::kAny);
  uint8_t* sValid = smem + L::kValid;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint64_t* empty = full + kPagedStages;
  uint64_t* p_ready = empty + kPagedStages;  // [block parity]: P and the rescale factors are in shared memory
  uint64_t* p_free = p_ready + 2;            // [block parity]: WG1 is done with them
  uint64_t* out_ready = p_free + 2;          // [tile parity]: WG0's rows' final factors are in sOutScale
  uint64_t* out_free = out_ready + 2;        // [tile parity]: WG1 has read them
  uint64_t* raw_ready = out_free + 2;        // [stage]: WG1's tiles' e4m3 bytes are staged, tile 4's read
  uint64_t* q_full = raw_ready + kPagedStages;  // kQByTma: a tile's Q has landed
  uint32_t* sTileScale = reinterpret_cast<uint32_t*>(smem + L::kTileScale);

  const int head_blocks = head_blocks_of(p.h_q);
  const uint32_t n_items = split.n_items;
  const int tid = threadIdx.x;

  if (tid == 0) {
    for (int s = 0; s < kPagedStages; ++s) {
      mbar_init(&full[s], 256);  // the producer's threads and WG1's
      mbar_init(&empty[s], 256);
      mbar_init(&raw_ready[s], 128);
    }
    for (int i = 0; i < 2; ++i) {
      mbar_init(&p_ready[i], 128);
      mbar_init(&p_free[i], 128);
      mbar_init(&out_ready[i], 128);
      mbar_init(&out_free[i], 128);
    }
    if (kQByTma) {
      mbar_init(q_full, 1);
      fence_mbarrier_init();
    }
  }
  __syncthreads();

  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);

  if (wg == 2) {
    setmaxnreg_dec<Source::kProducerRegs>();
    const int ptid = tid - 256;
    // Each producer lane owns one row of its warp's 16 per stage. The id of the next block's row
    // (the next tile's first block after a tile's last) is read before this block's fill, and its
    // bytes are loaded in the middle of the fill, so both latencies hide behind the fill.
    const int my_row = (ptid >> 5) * 16 + (ptid & 15);
    write_e4m3_identity(smem + L::kIdentity, ptid, 128);
    fence_proxy_async();
    named_barrier_sync(kProducerSync, 128);
    // The CTA's items with blocks, in order (items without blocks have no producer work).
    auto next_busy = [&](uint32_t w, PagedItem& it, typename Source::Entries& en) {
      for (; w < n_items; w += gridDim.x) {
        it = item_of(w, head_blocks, src, split, en);
        if (it.nb > 0) break;
      }
      return w;
    };
    PagedItem it{0, 0, 0, 0, -1};
    typename Source::Entries e{0, 0};
    uint32_t t = next_busy(blockIdx.x, it, e);
    const int k0 = my_row + kPagedRowsPerStage * it.b0;
    typename Source::Entry cur = src.resolve(e, k0, t < n_items ? src.load_id(e, it.qi, k0) : -1);
    uint4 raw[Source::kWarpRows];
    uint2 scales;
    src.load_rows(cur, raw, scales, ptid);
    uint32_t g = 0;
    while (t < n_items) {
      PagedItem it2{0, 0, 0, 0, -1};
      typename Source::Entries e2{0, 0};
      const uint32_t t2 = next_busy(t + gridDim.x, it2, e2);
      const uint32_t g_end = g + it.nb;
      const int k2 = my_row + kPagedRowsPerStage * it2.b0;
      for (int k = my_row + kPagedRowsPerStage * (it.b0 + 1); g < g_end; ++g, k += kPagedRowsPerStage) {
        const int st = g % kPagedStages;
        const bool last = g + 1 == g_end;
        const typename Source::Entries ne = last ? e2 : e;
        const int nk = last ? k2 : k;
        const int32_t nid = last ? (t2 < n_items ? src.load_id(e2, it2.qi, k2) : -1) : src.load_id(e, it.qi, k);
        const auto stage_free = [&] {
          if (g >= kPagedStages) mbar_wait(&empty[st], ((g / kPagedStages) - 1) & 1);
        };
        src.template fill<DQK>(cur, raw, scales, ne, nk, nid, sK + st * L::kTileBytes, sValid + st * kPagedRowsPerStage,
                               smem + L::kIdentity, ptid, stage_free, sTileScale + st * kPagedRowsPerStage, &raw_ready[st]);
        mbar_arrive(&full[st]);
      }
      t = t2;
      it = it2;
      e = e2;
    }
    return;
  }

  const MathThread mt = math_thread(tid);
  const int ctid = mt.ctid, quad = mt.quad, row_a = mt.row_a, row_b = mt.row_b;
  const uint32_t k_base0 = smem_u32(sK);

  float o[128];

  if (wg == 0) {
    // WG0: S = Q·Kᵀ for the whole block (m64n64), the softmax, O[:, 0:256] += P·V (P in
    // registers); P and the factor that moves O to the new max go to WG1 through shared memory.
    setmaxnreg_inc<Source::kScoreRegs>();
    const float c2 = p.sm_scale * kLog2e;  // logits in log2 units
    const uint64_t dq = kmajor_desc(smem_u32(sQ));
    float s[32];
    uint32_t pa[16];
    auto issue_s = [&](int stage) {
      wgmma_fence();
      qk_chunks<0, L::kChunks>(s, dq, kmajor_desc(k_base0 + stage * L::kTileBytes), true);
      wgmma_commit();
    };
    // Q of a tile is loaded by WG0 alone (the only reader), as soon as the previous tile's last
    // QKᵀ is done; `q_issued`: the current tile's Q is on its way.
    bool q_issued = false;
    // kQByTma: eight TMA boxes (64 dims x 64 heads of the query; heads past h_q zero-filled) issued by
    // thread 0 once every warp of WG0 is done with the Q before (named barrier 7), completing on
    // q_full; each load is waited for once, in order.
    uint32_t q_waits = 0;
    const auto q_load = [&](int64_t qi, int h0) {
      if constexpr (kQByTma) {
        named_barrier_sync(7, 128);
        const uint64_t once = l2_policy_evict_first();
        mbar_arrive_expect_tx_tid0(ctid, q_full, 64u * DQK * 2u);
#pragma unroll
        for (int c = 0; c < L::kChunks; ++c)
          tma_load_3d_tid0(ctid, smem_u32(sQ + c * 8192), &q_map, 64 * c, h0, int32_t(qi), q_full, once);
      } else {
        load_q_tile<DQK>(sQ, p, qi, h0, ctid, 128);
        cp_async_commit();
      }
    };
    const auto q_wait = [&] {
      if constexpr (kQByTma) {
        mbar_wait(q_full, q_waits & 1);
        ++q_waits;
      } else {
        cp_async_wait_all();
        fence_proxy_async();
        named_barrier_sync(3, 128);  // the whole Q tile has landed
      }
    };
    uint32_t g = 0, tiles_done = 0;
    for (uint32_t t = blockIdx.x; t < n_items; t += gridDim.x, ++tiles_done) {
      const PagedItem tile = item_of(t, head_blocks, src, split);
      const int n_blocks = tile.nb;
      if (n_blocks == 0 && q_issued) q_wait();  // a Q loaded for nothing: landed before the next one is
      if (n_blocks > 0) {
        if (!q_issued) q_load(tile.qi, tile.h0);
        q_wait();
      }
      q_issued = false;
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] = 0.0f;
      float m_a = -INFINITY, m_b = -INFINITY;  // running (lazy) max, log2 units
      float mt_a = -INFINITY, mt_b = -INFINITY;  // the true running max, for max_logits
      float l_a = 0.0f, l_b = 0.0f;            // this thread's share of the running sums
      bool seen_valid = false;                 // a valid entry among this thread's columns (any head)
      // S(b+1) is issued right behind PV(b) when block b+1 has already landed; otherwise stage b
      // is released first and S(b+1) waits at the top.
      bool s_issued = false;
      for (int b = 0; b < n_blocks; ++b, ++g) {
        const int st = g % kPagedStages, pb = g & 1;
        if (!s_issued) {
          mbar_wait(&full[st], (g / kPagedStages) & 1);
          issue_s(st);
        }
        wgmma_wait<0>();
        if (b + 1 == n_blocks && t + gridDim.x < n_items) {  // the tile's last QKᵀ is done: Q is free
          const PagedItem next = item_of(t + gridDim.x, head_blocks, src, split);
          q_load(next.qi, next.h0);
          q_issued = true;
        }
        float bm_a, bm_b;
        seen_valid |= mask_and_max(s, sValid + st * kPagedRowsPerStage, quad, c2, bm_a, bm_b);
        const float nm_a = lazy_max(m_a, bm_a), nm_b = lazy_max(m_b, bm_b);
        mt_a = max_nan(mt_a, bm_a);
        mt_b = max_nan(mt_b, bm_b);
        const float alpha_a = rebase(m_a, nm_a), alpha_b = rebase(m_b, nm_b);
        float sum_a, sum_b;
        exponentiate(s, exp_base(nm_a), exp_base(nm_b), sum_a, sum_b);
        l_a = l_a * alpha_a + sum_a;
        l_b = l_b * alpha_b + sum_b;
        m_a = nm_a;
        m_b = nm_b;
        p_to_regs(s, pa);
        // Hand P and the factors to WG1 once it is done with those of block g-2.
        if (g >= 2) mbar_wait(&p_free[pb], ((g >> 1) - 1) & 1);
        p_to_smem(pa, sP + pb * 8192, row_a, quad);
        if (quad == 0) {
          sScale[pb * 64 + row_a] = alpha_a;
          sScale[pb * 64 + row_b] = alpha_b;
        }
        fence_proxy_async();
        mbar_arrive(&p_ready[pb]);
        scale_rows(o, alpha_a, alpha_b);
        wgmma_fence();
        pv_local(o, pa, v_desc(k_base0 + st * L::kTileBytes));
        wgmma_commit();
        const int nst = (g + 1) % kPagedStages;
        // One answer for the whole warpgroup, broadcast so it is warp-uniform and the wgmma stays
        // asynchronous.
        s_issued = b + 1 < n_blocks &&
                   __shfl_sync(0xffffffffu, int(named_barrier_all(3, 128, mbar_test(&full[nst], ((g + 1) / kPagedStages) & 1))), 0);
        if (s_issued) {
          issue_s(nst);
          wgmma_wait<1>();  // PV(b) done; S(b+1) may still run
        } else {
          wgmma_wait<0>();
        }
        mbar_arrive(&empty[st]);
      }
      // Row sums: this thread's columns -> quad. Whether the query had any valid entry (the same
      // for every head; logits that are all −inf still count: lse = −inf then, not the +inf of an
      // empty row, as in the core).
      const int tp = tiles_done & 1;
      l_a = quad_sum(l_a);
      l_b = quad_sum(l_b);
      const bool warp_seen = __any_sync(0xffffffffu, seen_valid);
      if (mt.lane == 0) sAny[tp * 4 + (ctid >> 5)] = warp_seen;
      named_barrier_sync(3, 128);
      const bool any_valid = (sAny[tp * 4] | sAny[tp * 4 + 1] | sAny[tp * 4 + 2] | sAny[tp * 4 + 3]) != 0;
      float sc_a = 1.0f, sc_b = 1.0f;  // a piece's O leaves unnormalized
      if (tile.piece < 0) {
        sc_a = finalize_row(p, tile.qi, tile.h0 + row_a, m_a, mt_a, l_a, any_valid, quad == 0);
        sc_b = finalize_row(p, tile.qi, tile.h0 + row_b, m_b, mt_b, l_b, any_valid, quad == 0);
      } else if (quad == 0) {
        const float any = any_valid ? 1.0f : 0.0f;
        split.stats[int64_t(tile.piece) * kPagedRowsPerStage + row_a] = make_float4(m_a, mt_a, l_a, any);
        split.stats[int64_t(tile.piece) * kPagedRowsPerStage + row_b] = make_float4(m_b, mt_b, l_b, any);
      }
      // The factors to WG1, once it has read those of the tile before last.
      if (tiles_done >= 2) mbar_wait(&out_free[tp], ((tiles_done >> 1) - 1) & 1);
      if (quad == 0) {
        sOutScale[tp * 64 + row_a] = sc_a;
        sOutScale[tp * 64 + row_b] = sc_b;
      }
      mbar_arrive(&out_ready[tp]);
      store_item_o(p, split, tile, 0, row_a, row_b, quad, o, sc_a, sc_b);
    }
  } else {
    // WG1: O[:, 256:512] += P·V with WG0's P from shared memory, after moving O to its new max.
    setmaxnreg_inc<Source::kRemoteRegs>();  // above the launch's 168: what the producer gives up
    const uint32_t p_base = smem_u32(sP);
    // WG1's tiles of the CTA's block c (counted across tiles, as g) are dequantized while it waits
    // for P of block c - 1: `conv` blocks done so far, `known` blocks in the CTA's tiles before t_ahead.
    uint32_t conv = 0, known = 0, t_ahead = blockIdx.x;
    const auto convert_through = [&](uint32_t last) {
      for (; conv <= last; ++conv) {
        while (known <= conv && t_ahead < n_items) {
          known += uint32_t(item_of(t_ahead, head_blocks, src, split).nb);
          t_ahead += gridDim.x;
        }
        if (known <= conv) return;  // the CTA has no block `conv`
        const int cs = conv % kPagedStages;
        mbar_wait(&raw_ready[cs], (conv / kPagedStages) & 1);
        dequant_wg1_tiles(sK + cs * L::kTileBytes, sTileScale + cs * kPagedRowsPerStage, ctid);
        fence_proxy_async();
        mbar_arrive(&full[cs]);
      }
    };
    convert_through(0);
    uint32_t g = 0, tiles_done = 0;
    for (uint32_t t = blockIdx.x; t < n_items; t += gridDim.x, ++tiles_done) {
      const PagedItem tile = item_of(t, head_blocks, src, split);
      const int n_blocks = tile.nb;
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] = 0.0f;
      for (int b = 0; b < n_blocks; ++b, ++g) {
        const int st = g % kPagedStages, pb = g & 1;
        convert_through(g + 1);
        mbar_wait(&p_ready[pb], (g >> 1) & 1);
        const float alpha_a = sScale[pb * 64 + row_a], alpha_b = sScale[pb * 64 + row_b];
        scale_rows(o, alpha_a, alpha_b);
        wgmma_fence();
        pv_remote(o, kmajor_desc(p_base + pb * 8192), v_desc(k_base0 + st * L::kTileBytes + kLeftChunks * 8192));
        wgmma_commit();
        wgmma_wait<0>();
        mbar_arrive(&p_free[pb]);
        mbar_arrive(&empty[st]);
      }
      const int tp = tiles_done & 1;
      mbar_wait(&out_ready[tp], (tiles_done >> 1) & 1);
      const float sc_a = sOutScale[tp * 64 + row_a], sc_b = sOutScale[tp * 64 + row_b];
      mbar_arrive(&out_free[tp]);
      // the next tile's second block converted before this tile's O is stored: the producer's
      // stages keep moving while the stores drain
      convert_through(g + 1);
      store_item_o(p, split, tile, 1, row_a, row_b, quad, o, sc_a, sc_b);
    }
  }
}

// Q as a [s_q][h_q][512] bf16 tensor of 64 x 64 x 1 boxes (heads past h_q zero-filled); false
// without an encoder in the driver.
inline bool make_q_map(CUtensorMap* map, const AttnOutputs& o) {
  if (o.s_q >= (int64_t(1) << 31)) return false;  // the kernel's query coordinate is 32-bit
  const cuuint64_t dims[3] = {cuuint64_t(kDv), cuuint64_t(o.h_q), cuuint64_t(o.s_q)};
  const cuuint64_t strides[2] = {cuuint64_t(kDv) * 2, cuuint64_t(o.h_q) * kDv * 2};
  return encode_bf16_boxes_64x64(map, const_cast<uint16_t*>(o.q), 3, dims, strides);
}

// How the launch's last round is split (PagedSplit): into as many pieces a tile as the idle CTAs
// allow, at most kMaxPiecesPerTile and at least two blocks a piece of the longest list; none when
// the tiles fill every round or the lists are too short.
constexpr int kMaxPiecesPerTile = 16;
inline PagedSplit plan_paged_split(int64_t tiles, int sms, int64_t max_entries) {
  PagedSplit sp = PagedSplit::whole_tiles(tiles);
  const int64_t tail = tiles >= sms ? tiles % sms : tiles;
  if (tail == 0) return sp;
  const int64_t max_blocks = (max_entries + kPagedRowsPerStage - 1) / kPagedRowsPerStage;
  int64_t pieces = sms / tail;
  if (pieces > kMaxPiecesPerTile) pieces = kMaxPiecesPerTile;
  if (pieces > max_blocks / 2) pieces = max_blocks / 2;
  if (pieces < 2) return sp;
  sp.full_items = uint32_t(tiles - tail);
  sp.n_items = uint32_t(tiles - tail + tail * pieces);
  sp.pieces_per_tile = int32_t(pieces);
  return sp;
}

template <int DQK, class Source>
cudaError_t launch_paged_attention(const AttnOutputs& o, const Source& src, cudaStream_t stream) {
  static_assert(DQK == kDv, "make_q_map describes Q rows of dV elements");
  static PerDeviceValue<int> smem_set_tma, smem_set_cp_async;
  int device = 0, sms = 0;
  if (const cudaError_t err = current_device_sms(&device, &sms); err != cudaSuccess) return err;
  const int64_t tiles = attention_tiles(o.s_q, o.h_q);
  PagedSplit split = plan_paged_split(tiles, sms, src.max_entries());
  const int64_t pieces = int64_t(split.n_items) - split.full_items;
  void* workspace = nullptr;
  if (pieces > 0) {
    const size_t bytes = size_t(pieces) * kPagedRowsPerStage * (kDv * sizeof(float) + sizeof(float4));
    if (cudaMallocAsync(&workspace, bytes, stream) == cudaSuccess) {
      split.parts = static_cast<float*>(workspace);
      split.stats = reinterpret_cast<float4*>(split.parts + pieces * kPagedRowsPerStage * kDv);
    } else {
      (void)cudaGetLastError();  // no workspace: the tail runs unsplit
      split = PagedSplit::whole_tiles(tiles);
    }
  }
  CUtensorMap q_map{};
  const bool q_by_tma = make_q_map(&q_map, o);  // otherwise the threads load Q by cp.async
  const auto kernel = q_by_tma ? paged_attention_sm90_kernel<DQK, Source, true> : paged_attention_sm90_kernel<DQK, Source, false>;
  cudaError_t err = launch_persistent_items(kernel, PagedSmem<DQK>::kAlloc, q_by_tma ? smem_set_tma : smem_set_cp_async,
                                            device, sms, split.n_items, stream, o, src, q_map, split);
  if (err == cudaSuccess && split.parts) {
    const dim3 grid(unsigned(pieces / split.pieces_per_tile), kPagedRowsPerStage);
    paged_combine_pieces_kernel<<<grid, 128, 0, stream>>>(o, split);
    err = cudaGetLastError();
  }
  if (workspace) {
    const cudaError_t freed = cudaFreeAsync(workspace, stream);
    if (err == cudaSuccess) err = freed;
  }
  return err;
}

struct PagedFp8Rows {
  // The producer holds a warp's 16 rows of FP8 in registers (all their loads in flight at once):
  // it needs more of them than the cp.async gather. ptxas confines the code after setmaxnreg to
  // these counts. The launch gives 168 a thread (384 threads); what WG0 takes above it must be
  // given back by WG1 and the producer, or WG0's setmaxnreg waits forever.
  static constexpr uint32_t kScoreRegs = 208;   // WG0: O half (128) + S (32) + P (16) + softmax state
  static constexpr uint32_t kRemoteRegs = 184;  // WG1: O half (128) + its two tiles' dequantization
  static constexpr uint32_t kProducerRegs = 112;
  static_assert(kScoreRegs + kRemoteRegs + kProducerRegs <= 3 * 168, "the launch's 168 a thread");
  struct Entries {
    int total;
    int main;
  };
  V4Cache cache;
  const int32_t* indices;  // [n, topk] token ids
  int32_t topk;
  const int32_t* topk_length;
  V4Cache extra;  // extra.data == nullptr when absent
  const int32_t* extra_indices;
  int32_t extra_topk;
  const int32_t* extra_topk_length;

  // the most entries a query may have (the split's planning)
  int64_t max_entries() const { return int64_t(topk) + (extra.data ? extra_topk : 0); }
  __device__ Entries begin(int64_t qi) const {
    const int nm = row_entry_limit(topk_length, qi, topk);
    const int ne = extra.data ? row_entry_limit(extra_topk_length, qi, extra_topk) : 0;
    return Entries{nm + ne, nm};
  }

  // Entry: the token's data and scale records, or data == nullptr when invalid.
  struct Entry {
    const uint8_t* data;
    const uint8_t* scales;
  };
  // Entry k's token id; -1 past the end (the index arrays are never read there).
  __device__ __forceinline__ int32_t load_id(const Entries& e, int64_t qi, int k) const {
    if (k >= e.total) return -1;
    return k < e.main ? indices[qi * int64_t(topk) + k] : extra_indices[qi * int64_t(extra_topk) + (k - e.main)];
  }
  // Entry k's records from its id (k picks the cache), or an invalid entry.
  __device__ __forceinline__ Entry resolve(const Entries& e, int k, int32_t id) const {
    Entry r{nullptr, nullptr};
    const V4Cache c = V4Cache::pick(k >= e.main, cache, extra);
    if (k < e.total && c.contains(id)) {
      int64_t slot;
      const uint8_t* page = c.page_of(id, slot);
      r.data = page + slot * v4::kDataBytes;
      r.scales = page + c.page_size * v4::kDataBytes + slot * v4::kScaleBytes;
    }
    return r;
  }

  static constexpr int kWarpRows = 16;  // a producer warp's rows of a stage
  // The warp's rows (lane l < 16 holds row l's entry) into registers, all their loads in flight at
  // once: lane l < 28 holds dims [16l, 16l+16) of each row, lanes < 16 also their own row's 8 scale
  // bytes (an invalid row: zeros and scale 1).
  __device__ __forceinline__ void load_rows(const Entry& mine, uint4 (&raw)[kWarpRows], uint2& scales, int ptid) const {
    const int lane = ptid & 31;
    scales = make_uint2(0x7f7f7f7fu, 0x7f7f7f7fu);
    if (lane < 16 && mine.data) scales = __ldg(reinterpret_cast<const uint2*>(mine.scales));
#pragma unroll
    for (int u = 0; u < kWarpRows; ++u) {
      const uint8_t* data = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(mine.data), u));
      raw[u] = make_uint4(0, 0, 0, 0);
      if (data && lane < 28) raw[u] = __ldg(reinterpret_cast<const uint4*>(data + lane * 16));
    }
  }

  // Stages `cur`'s block (its bytes already in raw / scales: loaded during the fill before) and,
  // once they are staged, resolves the next block's entry (entry nk of ne, id nid) into cur and
  // loads its bytes into raw / scales.
  template <int DQK, class StageFree>
  __device__ __forceinline__ void fill(Entry& cur, uint4 (&raw)[kWarpRows], uint2& scales, const Entries& ne, int nk, int32_t nid,
                                       uint8_t* tile, uint8_t* valid, const uint8_t* identity, int ptid,
                                       StageFree stage_free, uint32_t* tile_scale, uint64_t* raw_ready) const {
    static_assert(DQK == 512, "v4 rows are 512 wide");
    const int warp = ptid >> 5, lane = ptid & 31;
    const uint8_t* my_data = cur.data;
    stage_free();
    if (lane < 16) {
      valid[warp * 16 + lane] = my_data ? 1 : 0;
      tile_scale[warp * 16 + lane] = scales.y;
    }
    // RoPE dims (bf16 as stored) straight into the tile: 16 rows x 8 pieces of 16 bytes, 4 a lane;
    // an invalid row's pieces are zeros.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int c = lane + 32 * k, u = c >> 3, piece = c & 7;
      const uint8_t* data = reinterpret_cast<const uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_data), u));
      uint8_t* dst = tile + swz_offset(warp * 16 + u, v4::kNopeDim + piece * 8);
      if (data) {
        cp_async_16(dst, data + v4::kNopeDim + piece * 16, 16u);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
    // nope: tiles 0-4 through the tensor cores (e4m3_tensor_dequant.cuh), 5 and 6 by WG1
    // (dequant_wg1_tiles), all staged as e4m3 operands where the output of their last reader goes:
    // dims [128s, 128s + 128) in chunk 2s + 1 (s < 3), dims 384-447 in chunk 6. A warp's MMA rows
    // and stores are its own 16 rows.
    if (lane < 28) {
      const int slice = lane >> 3;
      uint8_t* operand = tile + (slice < 3 ? 2 * slice + 1 : 6) * 8192;
#pragma unroll
      for (int u = 0; u < kWarpRows; ++u) *reinterpret_cast<uint4*>(operand + e4m3_operand_offset(warp * 16 + u, lane & 7)) = raw[u];
    }
    fence_proxy_async();
    named_barrier_sync(kProducerSync, 128);
    // the scale bytes of this thread's accumulator rows a = lane / 4 and b = a + 8 of the warp's 16
    const uint32_t sa0 = __shfl_sync(0xffffffffu, scales.x, lane >> 2), sa1 = __shfl_sync(0xffffffffu, scales.y, lane >> 2);
    const uint32_t sb0 = __shfl_sync(0xffffffffu, scales.x, (lane >> 2) + 8), sb1 = __shfl_sync(0xffffffffu, scales.y, (lane >> 2) + 8);
    const uint64_t d_ident = detail::kmajor_desc(smem_u32(identity));
    const uint32_t tile_addr = smem_u32(tile);
    // The producer's tiles 0-4 as ten half tiles (32 dims, one m64n32 MMA each), tile 4 first: once
    // both its halves are done WG1 may overwrite its bytes (chunk 5's low pieces) with tile 5's
    // values. kInFlight accumulators: half h is stored while halves h + 1 .. h + kInFlight - 1 run.
    // Tile t (dims [64t, 64t + 64)) is written to chunk t, which holds no bytes a later half reads.
    constexpr int kHalves = 10, kInFlight = 4;
    constexpr auto tile_of_half = [](int h) { return h < 2 ? 4 : (h >> 1) - 1; };
    auto issue = [&](int h, float (&acc)[16]) {
      const int t = tile_of_half(h);
      wgmma_fence();
      e4m3_half_mma(acc, tile_addr + (t | 1) * 8192, 64 * (t & 1) + 32 * (h & 1), d_ident);
      wgmma_commit();
    };
    float acc[kInFlight][16];
#pragma unroll
    for (int h = 0; h + 1 < kInFlight; ++h) issue(h, acc[h]);
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const int t = tile_of_half(h);
      // the MMAs issued after half h may still run; the last three halves wait for all (a wait for
      // fewer there was slower on the H200: docs/perf-history.md)
      if (h + kInFlight - 1 < kHalves) {
        issue(h + kInFlight - 1, acc[(h + kInFlight - 1) % kInFlight]);
        wgmma_wait<kInFlight - 1>();
      } else if (h + 2 == kHalves) {
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      if (h == 1) mbar_arrive(raw_ready);
      fence_regs(acc[h % kInFlight]);
      const int shift = 8 * (t & 3);
      store_scaled_half(tile_addr, 64 * t + 32 * (h & 1), acc[h % kInFlight],
                        ue8m0_to_bf16x2(((t < 4 ? sa0 : sa1) >> shift) & 0xffu),
                        ue8m0_to_bf16x2(((t < 4 ? sb0 : sb1) >> shift) & 0xffu), warp, lane);
      // Tiles 4 and 0 are stored: the next block's rows are loaded into the registers this block's
      // bytes left (their latency then hides behind the rest of this fill and the next stage_free;
      // ptxas sinks the loads into the last two tiles' stores, docs/perf-history.md).
      if (h == 3) {
        cur = resolve(ne, nk, nid);
        load_rows(cur, raw, scales, ptid);
      }
    }
    cp_async_wait_all();
    fence_proxy_async();
  }
};

}  // namespace smla::cuda
