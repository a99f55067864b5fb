// The op's driver, shared by every device and every collective: read the arguments, let the engine
// look at them, validate and plan (with check_ranks, agreed by every rank), then let the call's
// collective strategy (collective.h) compute the chunks with the engine and sum them.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <vector>

#include "core/args.h"
#include "core/collective.h"
#include "core/engine.h"

namespace gmm_allreduce {

// The call on `args` with `engine`, on x[0]'s device (its device guard held): the collective's
// group resolved from args.collective.group_name (args.collective.ranks set from it), or for the
// comm-free op (Collective::kNone) no group, ranks being its world_size.
std::vector<at::Tensor> run_op(const Engine& engine, OpArgs args);

// The boxed kernel a device registers for each op that ends with a collective strategy
// (collective.cpp's table: grouped_mat_mul_all_reduce, grouped_mat_mul_reduce_scatter,
// grouped_mat_mul), given its engine:
// register_op_kernels<&kEngine>(m) registers it.
void run_boxed(const Engine& engine, const c10::OperatorHandle& op, torch::jit::Stack* stack);

template <const Engine* E>
void op_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  run_boxed(*E, op, stack);
}

// In a device's TORCH_LIBRARY_IMPL block: op_kernel<E> for every op with a collective strategy.
template <const Engine* E>
void register_op_kernels(torch::Library& m) {
  for (const char* name : strategy_ops()) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&op_kernel<E>>());
  }
}

}  // namespace gmm_allreduce
