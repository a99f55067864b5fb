// The sum at the heart of the shared-memory all-reduce: elements [begin, end) of several ranks'
// buffers, added in rank order, in fp32 for 16-bit types (their own type otherwise), rounded
// once into out. The fixed order makes every rank's result the same bytes.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace gmm_allreduce {

void rank_sum(void* out, const std::vector<const void*>& in, at::ScalarType dtype, int64_t begin,
              int64_t end);

}  // namespace gmm_allreduce
