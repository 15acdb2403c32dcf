// Which entries of an index row are attended (SPEC §4, §5). Shared by every backend so that
// "valid" means the same everywhere: entry k of row i is valid iff k < topkLength[i] (when given)
// and the index lies inside its source. Invalid entries are skipped and never read.
#pragma once
#include <stdint.h>

#include "config.h"

namespace smla {

// Number of leading entries of row `row` that may be valid: topk, cut by topk_length when given.
// A negative length means no entry; a length above topk is capped at topk.
SMLA_HD int32_t row_entry_limit(const int32_t* topk_length, int64_t row, int32_t topk) {
  if (!topk_length) return topk;
  const int32_t n = topk_length[row];
  return n < 0 ? 0 : (n < topk ? n : topk);
}

// §4: a row index of the workspace, valid iff 0 <= idx < s_kv.
SMLA_HD bool kv_index_valid(int32_t idx, int32_t s_kv) { return idx >= 0 && idx < s_kv; }

// §5 / §3.3: a cache token id (page * page_size + slot), valid iff 0 <= id < page_size * num_pages.
SMLA_HD bool token_id_valid(int64_t id, int64_t page_size, int64_t num_pages) {
  return id >= 0 && id < page_size * num_pages;
}

}  // namespace smla
