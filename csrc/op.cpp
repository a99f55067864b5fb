#include "op.h"

#include "agree.h"
#include "comm.h"

namespace gmm_allreduce {

std::vector<at::Tensor> run_op(Engine engine, at::TensorList x, at::TensorList weight,
                               std::optional<at::TensorList> bias,
                               at::OptionalIntArrayRef group_list,
                               const std::optional<at::Tensor>& group_list_tensor,
                               int64_t split_item, std::string_view group_name,
                               std::string_view reduce_op, int64_t comm_turn,
                               int64_t group_list_type, bool check_ranks) {
  const OpArgs args{x,
                    weight,
                    bias,
                    group_list,
                    group_list_tensor,
                    split_item,
                    std::string(reduce_op),
                    comm_turn,
                    group_list_type};
  // Everything that can reject the call happens here, before the first collective.
  const GroupPtr group = resolve_group(std::string(group_name));
  const Plan plan = check_ranks ? make_plan_agreed(args, *group) : make_plan(args);

  at::Tensor flat = at::empty({plan.numel}, at::TensorOptions(plan.dtype).device(plan.device));
  engine(plan, args, group->getSize(), flat);
  // Every valid call of the group has the same numel, so all ranks skip an empty one together.
  if (plan.numel > 0) all_reduce_sum(*group, flat);

  std::vector<at::Tensor> outputs;
  if (plan.split_item == 2 || plan.split_item == 3) {
    outputs.push_back(flat.view(plan.out_shapes[0]));
    return outputs;
  }
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    outputs.push_back(flat.narrow(0, g.out_offset, g.m * g.n).view(plan.out_shapes[i]));
  }
  return outputs;
}

}  // namespace gmm_allreduce
