#include "cuda/host/epilogue.h"

#include <algorithm>

namespace gmm_allreduce {

BiasDtype bias_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kBiasHalf;
    case at::kBFloat16:
      return kBiasBFloat16;
    case at::kFloat:
      return kBiasFloat;
    case at::kDouble:
      return kBiasDouble;
    default:
      TORCH_CHECK_TYPE(false, "bias: unsupported dtype ", t);
  }
}

std::vector<BiasArgs> bias_launches(const Plan& plan, at::TensorList bias, int64_t world_size,
                                    const Chunk& chunk, const int32_t* row_ends, const float* src,
                                    std::vector<at::Tensor>& keep) {
  const auto groups = static_cast<int64_t>(plan.groups.size());
  auto set_bias = [&](BiasArgs& a, int64_t slot, int64_t g) {
    const at::Tensor* b = &bias[g];
    if (!b->is_contiguous()) {
      keep.push_back(b->contiguous());
      b = &keep.back();
    }
    a.bias[slot] = b->const_data_ptr();
    a.bias_dtype[slot] = bias_dtype(b->scalar_type());
  };
  std::vector<BiasArgs> launches;
  if (row_ends != nullptr) {  // rows layout: one launch over the chunk
    TORCH_CHECK(groups <= kMaxLaunchGroups, "bias epilogue: the rows layout takes at most ",
                kMaxLaunchGroups, " groups, got ", groups);
    TORCH_CHECK(src == nullptr, "bias epilogue: the rows layout reads no fp32 source");
    BiasArgs& a = launches.emplace_back();
    a.elem_begin = chunk.elem_begin;
    a.elem_end = chunk.elem_end;
    a.world_size = world_size;
    a.groups = static_cast<int32_t>(groups);
    a.row_ends = row_ends;
    a.n[0] = plan.groups[0].n;
    for (int64_t g = 0; g < groups; ++g) set_bias(a, g, g);
    return launches;
  }
  // Plan layout: kMaxLaunchGroups groups per launch, each over their elements in the chunk.
  for (int64_t g0 = 0; g0 < groups; g0 += kMaxLaunchGroups) {
    const int64_t g1 = std::min(groups, g0 + kMaxLaunchGroups);
    BiasArgs a{};
    a.world_size = world_size;
    a.src = src;
    a.src_begin = chunk.elem_begin;
    a.groups = static_cast<int32_t>(g1 - g0);
    for (int64_t g = g0; g < g1; ++g) {
      const GroupPlan& p = plan.groups[g];
      a.first[g - g0] = p.out_offset;
      a.first[g - g0 + 1] = p.out_offset + p.m * p.n;
      a.n[g - g0] = p.n;
      set_bias(a, g - g0, g);
    }
    a.elem_begin = std::max(chunk.elem_begin, a.first[0]);
    a.elem_end = std::min(chunk.elem_end, a.first[a.groups]);
    if (a.elem_end > a.elem_begin) launches.push_back(a);
  }
  return launches;
}

}  // namespace gmm_allreduce
