// How many rows make a block of about a given number of elements: the unit our CPU loops take in
// cache (and hand to parallel_for) whatever a tensor's size.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gmm_allreduce {

// Rows of a block whose rows hold `per_row` elements each, about `budget` elements in all; at
// least 1.
inline int64_t block_rows(int64_t per_row, int64_t budget) {
  return std::max<int64_t>(1, budget / std::max<int64_t>(per_row, 1));
}

}  // namespace gmm_allreduce
