#include "core/op.h"

#include <ATen/DeviceGuard.h>

#include "core/collective.h"
#include "core/consensus.h"
#include "core/mlp.h"

namespace gmm_allreduce {

std::vector<at::Tensor> run_op(const Engine& engine, OpArgs args) {
  // Nothing for an empty x, rejected below.
  const at::OptionalDeviceGuard guard(is_mlp(args) ? at::device_of(*args.mlp.hidden)
                                                   : at::device_of(args.x));
  if (engine.check_environment != nullptr) engine.check_environment(args);
  const CollectiveStrategy& strategy = collective_strategy(args.collective.kind);
  // Everything that can reject the call happens here, before the first collective.
  GroupPtr group;
  if (args.collective.kind == Collective::kNone) {
    TORCH_CHECK_VALUE(args.collective.ranks >= 1, "world_size: expected an integer >= 1, got ",
                      args.collective.ranks);
  } else {
    group = resolve_group(args.collective.group_name);
    args.collective.ranks = group->getSize();
  }
  // An expert block is routed into its down product first (core/mlp.h), within the agreement of
  // check_ranks, so that a rank's bad block is every rank's error.
  auto planner = [&](const OpArgs&) {
    if (is_mlp(args)) route_mlp(args, engine.fuses_mlp != nullptr && engine.fuses_mlp(args));
    args.keep_group_list_on_device =
        engine.takes_device_group_list != nullptr && engine.takes_device_group_list(args);
    return plan_call(args);
  };
  Plan plan =
      group && args.collective.check_ranks ? make_plan_agreed(args, group, planner) : planner(args);
  return strategy.run(engine, std::move(plan), args, group);
}

void run_boxed(const Engine& engine, const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const CollectiveStrategy* strategy =
      collective_strategy(op.schema().name().substr(op.schema().name().find("::") + 2));
  TORCH_INTERNAL_ASSERT(strategy != nullptr, "no collective strategy for ", op.schema().name());
  OpArgs args = read_args(op, *stack);
  args.collective.kind = strategy->kind;
  std::vector<at::Tensor> outputs = run_op(engine, std::move(args));
  torch::jit::drop(*stack, op.schema().arguments().size());
  // An op returns its outputs as a list, or (the expert block's) its one output.
  if (op.schema().returns().front().type()->kind() == c10::TypeKind::TensorType) {
    torch::jit::push(*stack, c10::IValue(std::move(outputs.front())));
  } else {
    torch::jit::push(*stack, c10::IValue(std::move(outputs)));
  }
}

}  // namespace gmm_allreduce
