// Test-only: the op's flat output buffer computed on the CPU from gemm_blocks (blocks.h), chunk by
// chunk, by the formula of the CUDA tiled kernel (cuda/tiled_gemm.cu): y[r * n + c] = round(
// sum_k x[r * x_rs + k * x_cs] * w[k * w_rs + c * w_cs] + bias[c] / world_size), here in double.
// Against the float64 reference (tests/test_blocks.py) it checks the blocks' pointers, strides and
// chunk cuts without a GPU; the buffer starts as NaN, so an element no block writes shows.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#include "blocks.h"

namespace gmm_allreduce {
namespace {

double bias_at(const GemmBlock& b, int64_t c) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.bias_dtype, "bias_at", [&] {
    v = static_cast<double>(static_cast<const scalar_t*>(b.bias)[c]);
  });
  return v;
}

template <typename T>
void compute_block(const GemmBlock& b, int64_t world_size) {
  const auto* x = static_cast<const T*>(b.x);
  const auto* w = static_cast<const T*>(b.w);
  auto* y = static_cast<T*>(b.y);
  for (int64_t r = 0; r < b.m; ++r) {
    for (int64_t c = 0; c < b.n; ++c) {
      double acc = 0;
      for (int64_t k = 0; k < b.k; ++k) {
        acc += static_cast<double>(x[r * b.x_rs + k * b.x_cs]) *
               static_cast<double>(w[k * b.w_rs + c * b.w_cs]);
      }
      if (b.bias != nullptr) acc += bias_at(b, c) / static_cast<double>(world_size);
      y[r * b.n + c] = static_cast<T>(acc);
    }
  }
}

at::Tensor gemm_blocks_reference(at::TensorList x, at::TensorList weight,
                                 std::optional<at::TensorList> bias,
                                 at::OptionalIntArrayRef group_list,
                                 const std::optional<at::Tensor>& group_list_tensor,
                                 int64_t split_item, int64_t group_list_type, int64_t world_size,
                                 int64_t comm_turn) {
  const OpArgs args{x,          weight, bias,      group_list,     group_list_tensor,
                    split_item, "sum",  comm_turn, group_list_type};
  const Plan plan = make_plan(args);
  at::Tensor flat = at::full({plan.numel}, std::numeric_limits<double>::quiet_NaN(),
                             at::TensorOptions(plan.dtype));
  for (const Chunk& chunk : plan.chunks) {
    std::vector<at::Tensor> keep;
    for (const GemmBlock& b : gemm_blocks(plan, args, flat, chunk, keep)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "gemm_blocks",
                                      [&] { compute_block<scalar_t>(b, world_size); });
    }
  }
  return flat;
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) {
  m.impl("_gemm_blocks_reference", &gemm_blocks_reference);
}

}  // namespace gmm_allreduce
