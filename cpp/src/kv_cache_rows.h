// Row-level dequantization used by the kv_cache op and by paged attention: one v4 / v32 token to
// bf16 bits or to float32 (the float32 value of those same bf16 bits, so paged attention sees
// exactly what the dequant op would write).
#pragma once
#include <stdint.h>

namespace smla {
namespace cpu {

// v4: data = the token's 576-byte record, scales = its 8-byte scale record.
void dequant_v4_token_bf16(const uint8_t* data, const uint8_t* scales, uint16_t* out /*512*/);
void dequant_v4_token_f32(const uint8_t* data, const uint8_t* scales, float* out /*512*/);
// v32: token = the token's 656-byte record.
void dequant_v32_token_bf16(const uint8_t* token, uint16_t* out /*576*/);

}  // namespace cpu
}  // namespace smla
