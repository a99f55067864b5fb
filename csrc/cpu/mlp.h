// The CPU engine's part of a fused expert block (core/mlp.h): the activations of a block of one
// expert's rows, computed from the gathered hidden rows and the expert's gate_up weight, in a
// buffer the size of the block (the whole [M, 2I] gate_up output never exists).
#pragma once

#include <ATen/ATen.h>

#include "core/plan.h"
#include "cpu/upcast.h"

namespace gmm_allreduce {

// The activations of group (expert) i's rows `rows` (int64, counted from the group's first row),
// [r, I]. With `in_fp32` or an int8 w13 (weight-only, its scales applied), the gate_up product
// runs in fp32 (`products`, cpu/upcast.h) and the activations stay fp32 for the down product;
// otherwise the product is ATen's in x's dtype and the activations are rounded once to it from the
// activation computed in fp32 (fp64 for fp64).
at::Tensor gated_rows(const Plan& plan, const OpArgs& args, size_t i, const at::Tensor& rows,
                      bool in_fp32, Fp32Products& products);

}  // namespace gmm_allreduce
