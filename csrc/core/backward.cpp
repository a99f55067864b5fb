// The backward pass, in the row-parallel convention of Megatron-LM: the forward all-reduce's
// backward is the identity (the incoming gradient is the same on every rank), so every gradient is
// local and no collective runs here (combine_weight's gradient comes out as this rank's part, for
// the autograd glue to sum over the group):
//   grad x_i = dy_i @ W_i^T      grad W_i = x_i^T @ dy_i      grad bias_i = sum over rows of dy_i
// (the bias is one logical parameter replicated on every rank). Both grouped products are calls of
// the forward's comm-free op gmm_allreduce::grouped_mat_mul with transposed operands, so they run
// on whichever engine serves the device; the split mode maps so that the results come out in the
// layout of x and weight.
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "core/combine.h"
#include "core/plan.h"

namespace gmm_allreduce {
namespace {

// The comm-free op, without combine or quantisation.
std::vector<at::Tensor> grouped_mat_mul(at::TensorList x, at::TensorList weight,
                                        std::optional<at::TensorList> bias,
                                        at::OptionalIntArrayRef group_list,
                                        const std::optional<at::Tensor>& group_list_tensor,
                                        int64_t split_item, int64_t group_list_type,
                                        int64_t world_size) {
  return call_by_name("grouped_mat_mul", {{"x", x},
                                          {"weight", weight},
                                          {"bias", bias},
                                          {"group_list", group_list},
                                          {"group_list_tensor", group_list_tensor},
                                          {"split_item", split_item},
                                          {"group_list_type", group_list_type},
                                          {"world_size", world_size}})[0]
      .toTensorVector();
}

std::vector<at::Tensor> grouped_mat_mul(at::TensorList x, at::TensorList weight,
                                        at::OptionalIntArrayRef group_list, int64_t split_item,
                                        int64_t group_list_type) {
  return grouped_mat_mul(x, weight, std::nullopt, group_list, std::nullopt, split_item,
                         group_list_type, 1);
}

// The split mode of the grad-x product: its x is dy (laid out as y) and its output is laid out as
// x, so "one tensor" and "G tensors" swap sides for split_item 1 and 2.
int64_t grad_x_split(int64_t split_item) {
  if (split_item == 1) return 2;
  if (split_item == 2) return 1;
  return split_item;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
grouped_mat_mul_all_reduce_backward(at::TensorList grad_list, at::TensorList x,
                                    at::TensorList weight, std::optional<at::TensorList> bias,
                                    at::OptionalIntArrayRef group_list,
                                    const std::optional<at::Tensor>& group_list_tensor,
                                    int64_t split_item, int64_t group_list_type,
                                    const std::optional<at::Tensor>& combine_index,
                                    const std::optional<at::Tensor>& combine_weight,
                                    int64_t world_size, std::array<bool, 4> output_mask) {
  OpArgs args{.x = x.vec(),
              .weight = weight.vec(),
              .group_list_tensor = group_list_tensor,
              .split_item = split_item,
              .group_list_type = group_list_type};
  if (group_list) args.group_list = group_list->vec();
  // Autograd may hand in expanded gradients (stride 0, e.g. from y.sum()); the products below
  // need them materialised, and that copy is the backward's own.
  std::vector<at::Tensor> grad_in;
  for (const at::Tensor& g : grad_list) grad_in.push_back(g.contiguous());
  // combine_weight's gradient: <dout[combine_index[j]], y_j> with this rank's partial product y_j
  // (recomputed), for the caller to sum over the group into the gradient of the summed y_j.
  at::Tensor grad_combine_weight =
      at::empty({0}, grad_in[0].options().dtype(at::toOpMathType(grad_in[0].scalar_type())));
  if (combine_index) {
    TORCH_CHECK_VALUE(grad_in.size() == 1, "grad: expected one tensor (the combined output)");
    CombineGrad back = combine_backward(grad_in[0], *combine_index, combine_weight);
    if (output_mask[3]) {
      const at::Tensor y = grouped_mat_mul(x, weight, bias, group_list, group_list_tensor,
                                           split_item, group_list_type, world_size)[0];
      const at::ScalarType acc = back.kept.scalar_type();
      grad_combine_weight = back.picked.to(acc).mul(y.to(acc)).sum(1).mul_(back.kept);
    }
    grad_in = {back.dy};
  }
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
  return {grad_x, grad_weight, grad_bias, grad_combine_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("grouped_mat_mul_all_reduce_backward", &grouped_mat_mul_all_reduce_backward);
}

}  // namespace gmm_allreduce
