// A fingerprint of the plan that rides on the op's own all-reduce, so that ranks whose calls
// disagree but happen to all-reduce buffers of one size (another split mode, other shapes of the
// same element count, other group rows) raise on every rank instead of returning a mixed sum,
// at the cost of a few elements and no extra collective. check_ranks=True is the stronger,
// earlier check; this one guards the calls made without it.
#pragma once

#include <ATen/ATen.h>

#include "../plan.h"

namespace gmm_allreduce {

// Elements the fingerprint appends to the flat buffer: one per bit of the signature's hash, or
// none where it cannot ride along: an empty buffer (no collective), one rank, a world too large
// for the dtype to sum 0/1 values exactly, or a device where reading it back would cost a sync.
int64_t fingerprint_size(const Plan& plan, int64_t world_size);

// Writes this rank's fingerprint (bit b of the hash as 0 or 1) into `tail`.
void write_fingerprint(const Plan& plan, at::Tensor& tail);

// After the all-reduce: every element must be 0 or world_size (all ranks had the same bit);
// otherwise raises the same ValueError on every rank.
void check_fingerprint(const Plan& plan, const at::Tensor& tail, int64_t world_size);

}  // namespace gmm_allreduce
