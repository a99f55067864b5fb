#include "cuda/host/blocks.h"

#include <ATen/TensorUtils.h>

#include <algorithm>
#include <array>

namespace gmm_allreduce {

std::vector<GemmBlock> gemm_blocks(const Plan& plan, const OpArgs& a, at::Tensor& flat,
                                   const Chunk& chunk, std::vector<at::Tensor>& keep) {
  const auto y_bytes = static_cast<int64_t>(flat.element_size());
  std::vector<GemmBlock> blocks;
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    const auto [r0, r1] = rows_in_chunk(g, chunk);
    if (r1 <= r0 || g.n == 0) continue;
    const at::Tensor* x = plan.single_x ? &a.x[0] : &a.x[i];
    const int64_t row = plan.single_x ? g.x_row + r0 : r0;
    std::array<int64_t, 2> xs{};
    if (x->dim() == 2) {
      xs = {x->stride(0), x->stride(1)};
    } else if (const auto s = at::detail::computeStride(x->sizes(), x->strides(),
                                                        at::IntArrayRef(std::array{g.m, g.k}))) {
      xs = {(*s)[0], (*s)[1]};
    } else {
      keep.push_back(x->reshape({g.m, g.k}));
      x = &keep.back();
      xs = {x->stride(0), x->stride(1)};
    }
    const at::Tensor& w = a.weight[i];
    GemmBlock b{};
    b.y = static_cast<char*>(flat.data_ptr()) + (g.out_offset + r0 * g.n) * y_bytes;
    b.x = static_cast<const char*>(x->const_data_ptr()) +
          row * xs[0] * static_cast<int64_t>(x->element_size());
    b.w = w.const_data_ptr();
    b.m = r1 - r0;
    b.n = g.n;
    b.k = g.k;
    b.x_rs = xs[0];
    b.x_cs = xs[1];
    b.w_rs = w.stride(0);
    b.w_cs = w.stride(1);
    if (plan.has_bias) {
      const at::Tensor& bias = (*a.bias)[i];
      if (!bias.is_contiguous()) keep.push_back(bias.contiguous());
      b.bias = bias.is_contiguous() ? bias.const_data_ptr() : keep.back().const_data_ptr();
      b.bias_dtype = bias.scalar_type();
    }
    blocks.push_back(b);
  }
  return blocks;
}

}  // namespace gmm_allreduce
