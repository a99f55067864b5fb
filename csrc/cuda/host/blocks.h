// A chunk's groups as raw GEMM operands: pointers, sizes and strides, with no tensor per group (a
// tensor view costs host time per group). The CUDA engine's tiled kernel takes them; on the CPU,
// the test-only op _gemm_blocks_reference (testing/kernel_twins.cpp) computes them by the same
// formula, which checks their arithmetic without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "core/plan.h"

namespace gmm_allreduce {

// One group's part of a chunk: y[m, n] = x[m, k] @ w[k, n] (+ bias / world_size); y row-major
// with row stride n, x and w read through their strides (in elements): x[r * x_rs + c * x_cs].
struct GemmBlock {
  void* y;
  const void* x;
  const void* w;
  const void* bias;  // n contiguous elements of bias_dtype; nullptr for none
  at::ScalarType bias_dtype;
  int64_t m, n, k;
  int64_t x_rs, x_cs, w_rs, w_cs;
};

// The blocks of the groups with rows in `chunk`, in group order, writing into `flat` (of x's dtype,
// or fp32 for partials kept in fp32). Operands that
// cannot be read in place (an x_i of several dims whose leading dims do not collapse, a strided
// bias) are copied into `keep`, which must outlive the blocks' use. Host-planned rows only.
std::vector<GemmBlock> gemm_blocks(const Plan& plan, const OpArgs& args, at::Tensor& flat,
                                   const Chunk& chunk, std::vector<at::Tensor>& keep);

}  // namespace gmm_allreduce
