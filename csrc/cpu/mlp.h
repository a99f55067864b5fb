// The CPU engine's part of a fused expert block (core/mlp.h): the activations of a block of one
// expert's rows, computed from the gathered hidden rows and the expert's gate_up weight, in a
// buffer the size of the block (the whole [M, 2I] gate_up output never exists).
#pragma once

#include <ATen/ATen.h>

#include "core/plan.h"

namespace gmm_allreduce {

// The activations of group (expert) i's rows `rows` (int64, counted from the group's first row),
// [r, I], with `w13` its gate_up weight: w13[i] itself, or upcast to fp32 (cpu/upcast.h), which
// makes the GEMM run in fp32 on upcast rows and the activations stay fp32 for the down product's
// fp32 GEMM. Otherwise they come in x's dtype, rounded once from the activation computed in fp32
// (fp64 for fp64).
at::Tensor gated_rows(const Plan& plan, const OpArgs& args, size_t i, const at::Tensor& rows,
                      const at::Tensor& w13);

}  // namespace gmm_allreduce
