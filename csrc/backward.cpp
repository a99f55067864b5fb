// The backward pass, in the row-parallel convention of Megatron-LM: the forward all-reduce's
// backward is the identity (the incoming gradient is the same on every rank), so every gradient is
// local and no collective runs:
//   grad x_i = dy_i @ W_i^T      grad W_i = x_i^T @ dy_i      grad bias_i = sum over rows of dy_i
// (the bias is one logical parameter replicated on every rank). Both grouped products are calls of
// the forward's comm-free op gmm_allreduce::grouped_mat_mul with transposed operands, so they run
// on whichever engine serves the device; the split mode maps so that the results come out in the
// layout of x and weight.
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "plan.h"

namespace gmm_allreduce {
namespace {

std::vector<at::Tensor> grouped_mat_mul(at::TensorList x, at::TensorList weight,
                                        at::OptionalIntArrayRef group_list, int64_t split_item,
                                        int64_t group_list_type) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gmm_allreduce::grouped_mat_mul", "")
                       .typed<std::vector<at::Tensor>(
                           at::TensorList, at::TensorList, std::optional<at::TensorList>,
                           at::OptionalIntArrayRef, const std::optional<at::Tensor>&, int64_t,
                           int64_t, int64_t)>();
  return op.call(x, weight, std::nullopt, group_list, std::nullopt, split_item, group_list_type, 1);
}

// The split mode of the grad-x product: its x is dy (laid out as y) and its output is laid out as
// x, so "one tensor" and "G tensors" swap sides for split_item 1 and 2.
int64_t grad_x_split(int64_t split_item) {
  if (split_item == 1) return 2;
  if (split_item == 2) return 1;
  return split_item;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
grouped_mat_mul_all_reduce_backward(at::TensorList grad_list, at::TensorList x,
                                    at::TensorList weight, std::optional<at::TensorList> bias,
                                    at::OptionalIntArrayRef group_list,
                                    const std::optional<at::Tensor>& group_list_tensor,
                                    int64_t split_item, int64_t group_list_type,
                                    std::array<bool, 3> output_mask) {
  const OpArgs args{.x = x,
                    .weight = weight,
                    .group_list = group_list,
                    .group_list_tensor = group_list_tensor,
                    .split_item = split_item,
                    .group_list_type = group_list_type};
  // Autograd may hand in expanded gradients (stride 0, e.g. from y.sum()); the products below
  // need them materialised, and that copy is the backward's own.
  std::vector<at::Tensor> grad_in;
  for (const at::Tensor& g : grad_list) grad_in.push_back(g.contiguous());
  const at::TensorList grad(grad_in);
  const Plan plan = make_plan(args);
  TORCH_CHECK_VALUE(grad.size() == (plan.single_y ? 1 : plan.groups.size()), "grad: expected ",
                    plan.single_y ? 1 : plan.groups.size(), " tensors (one per output), got ",
                    grad.size());
  // dy_i as a 2-D [m_i, n_i] operand, and the row counts as group_list counts.
  std::vector<at::Tensor> dy;
  std::vector<int64_t> counts;
  for (const GroupPlan& g : plan.groups) {
    const size_t i = dy.size();
    dy.push_back(plan.single_y ? grad[0].narrow(0, g.out_row, g.m) : grad[i].reshape({g.m, g.n}));
    counts.push_back(g.m);
  }

  std::vector<at::Tensor> grad_x, grad_weight, grad_bias;
  if (output_mask[0]) {
    std::vector<at::Tensor> wt;
    for (const at::Tensor& w : weight) wt.push_back(w.t());
    const int64_t split = grad_x_split(split_item);
    // dy in the layout the grad-x call takes as its x: as given for split 0 (x_i's leading dims),
    // the one tensor for 2 and 3, the G tensors for 1.
    std::vector<at::Tensor> dx_in = split_item == 1 ? dy : grad.vec();
    grad_x = grouped_mat_mul(
        dx_in, wt, single_x(split) ? at::OptionalIntArrayRef(counts) : std::nullopt, split, 1);
  }
  if (output_mask[1]) {
    std::vector<at::Tensor> xt;
    for (const auto i : c10::irange(plan.groups.size())) xt.push_back(group_x(plan, x, i).t());
    grad_weight = grouped_mat_mul(xt, dy, std::nullopt, 0, 0);
  }
  if (output_mask[2] && bias) {
    for (const auto i : c10::irange(plan.groups.size())) {
      grad_bias.push_back(dy[i].sum(0, false, at::toOpMathType(plan.dtype)).to((*bias)[i].dtype()));
    }
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("grouped_mat_mul_all_reduce_backward", &grouped_mat_mul_all_reduce_backward);
}

}  // namespace gmm_allreduce
