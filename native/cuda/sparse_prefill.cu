// Launcher for sparse prefill (§4): the sm_90a kernel for dQK in {512, 576} with dV = 512,
// the fallback kernel for every other shape.
#include "smla_cuda.h"
#include "sparse_prefill.cuh"

using namespace smla::cuda;


extern "C" int32_t smla_cuda_sparse_prefill(const smla_sparse_prefill_params* p, unsigned long long* tile_claims,
                                         cudaStream_t stream) {
  if (!p) return SMLA_ERR_INVALID_ARGUMENT;
  const uint16_t *q = p->q, *kv = p->kv;
  const int32_t *indices = p->indices, *topk_length = p->topk_length;
  const float* attn_sink = p->attn_sink;
  const int32_t s_q = p->s_q, h_q = p->h_q, d_qk = p->d_qk, d_v = p->d_v, s_kv = p->s_kv, topk = p->topk;
  const float sm_scale = p->sm_scale;
  uint16_t* out = p->out;
  float *max_logits = p->max_logits, *lse = p->lse;
  if (s_q < 0 || h_q < 1 || topk < 0 || s_kv < 0 || d_v < 1 || d_qk < d_v) return SMLA_ERR_INVALID_ARGUMENT;
  if (s_q == 0) return SMLA_OK;
  if (h_q > 65535 * kHeadsPerCta) return SMLA_ERR_UNSUPPORTED;
  cudaError_t err;
  // The fast kernel moves 16-byte pieces: q, kv and out must be 16-byte aligned (they are when
  // they come from cudaMalloc); anything else takes the fallback kernel.
  const bool aligned = ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(kv) |
                         reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  // (the fast kernel counts its tiles in 32 bits)
  if (aligned && attention_tiles(s_q, h_q) <= INT32_MAX && d_v == kDv && (d_qk == 512 || d_qk == 576)) {
    const AttnOutputs o{q, s_q, h_q, sm_scale, attn_sink, out, max_logits, lse};
    const Bf16GatherSource src{kv, s_kv, indices, topk, topk_length};
    unsigned* claims = reinterpret_cast<unsigned*>(tile_claims);
    err = d_qk == 576 ? launch_sparse_attention<576>(o, src, stream, claims) : launch_sparse_attention<512>(o, src, stream, claims);
  } else {
    if (d_v > 1024 || h_q > 65535) return SMLA_ERR_UNSUPPORTED;
    const dim3 grid{unsigned(s_q), unsigned(h_q)};
    sparse_prefill_generic_kernel<8><<<grid, 128, 0, stream>>>(q, kv, indices, topk_length, attn_sink, h_q,
                                                                d_qk, d_v, s_kv, topk, sm_scale, out,
                                                                max_logits, lse);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? SMLA_OK : -int32_t(err);
}
