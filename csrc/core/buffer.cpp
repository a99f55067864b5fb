#include "core/buffer.h"

#include <cstring>

namespace gmm_allreduce {
namespace {

constexpr size_t kSmallCopyBytes = size_t{1} << 20;

// Whether the one output is the flat buffer itself (a view of it): no copy and no rounding left.
bool output_is_buffer(const Plan& plan) {
  return plan.out_shapes.size() == 1 && plan.reduce_dtype == plan.dtype;
}

}  // namespace

at::Tensor elements(const at::Tensor& flat, int64_t begin, int64_t end) {
  return begin == 0 && end == flat.numel() ? flat : flat.narrow(0, begin, end - begin);
}

std::vector<at::Tensor> make_outputs(const Plan& plan, const at::Tensor& flat) {
  if (output_is_buffer(plan)) return {elements(flat, 0, plan.numel).view(plan.out_shapes[0])};
  std::vector<at::Tensor> outputs;
  outputs.reserve(plan.out_shapes.size());
  for (const auto& shape : plan.out_shapes) {
    outputs.push_back(at::empty(shape, flat.options().dtype(plan.dtype)));
  }
  return outputs;
}

void fill_outputs(const Plan& plan, const at::Tensor& flat, std::vector<at::Tensor>& outputs) {
  if (output_is_buffer(plan)) return;
  if (outputs.size() == 1) {  // one rounding from the fp32 sum
    outputs[0].view({-1}).copy_(elements(flat, 0, plan.numel));
    return;
  }
  // The outputs' one rounding, where the sum ran in reduce_dtype (no copy otherwise).
  const at::Tensor used = elements(flat, 0, plan.numel).to(plan.dtype);
  if (used.is_cpu()) {
    // A memcpy per small group (ATen's copy costs more in dispatch than a small copy); ATen's
    // (parallel) copy for large ones.
    const auto* src = static_cast<const char*>(used.const_data_ptr());
    int64_t begin = 0;
    for (at::Tensor& out : outputs) {
      const int64_t n = out.numel();
      if (n > 0 && out.nbytes() <= kSmallCopyBytes) {
        std::memcpy(out.mutable_data_ptr(), src + begin * used.element_size(), out.nbytes());
      } else if (n > 0) {
        out.view({-1}).copy_(used.narrow(0, begin, n));
      }
      begin += n;
    }
    return;
  }
  // One op for all (on CUDA one kernel: ATen's fast path for contiguous splits).
  std::vector<int64_t> sizes;
  std::vector<at::Tensor> flat_outputs;
  for (const at::Tensor& out : outputs) {
    sizes.push_back(out.numel());
    flat_outputs.push_back(out.view({-1}));
  }
  at::split_with_sizes_copy_out(flat_outputs, used, sizes);
}

at::Tensor empty_flat(const Plan& plan) {
  return at::empty({plan.numel}, at::TensorOptions(plan.reduce_dtype).device(plan.device));
}

}  // namespace gmm_allreduce
