// The op's driver, shared by every device: validate and plan, allocate one flat output buffer,
// let a device engine compute the groups into it chunk by chunk, all-reduce each chunk as soon as
// it is computed (one collective for comm_turn = 0), return the outputs (see op.cpp).
#pragma once

#include <algorithm>
#include <string_view>

#include "plan.h"

namespace gmm_allreduce {

// A device engine.
struct Engine {
  // Writes the output rows of `chunk` (of x_i @ weight_i + bias_i / world_size, whichever groups
  // they belong to) into their place in `flat` (group i's block starts at
  // Plan::groups[i].out_offset, m_i x n_i, row-major), accumulating in fp32 or better.
  void (*compute)(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                  const Chunk& chunk);
  // Optional: whether `compute` takes this call's group rows from its group_list tensor on the
  // device (split_item 3 only), so that planning need not read them
  // (OpArgs::keep_group_list_on_device). Called before validation: it must accept any arguments.
  bool (*takes_device_group_list)(const OpArgs& args) = nullptr;
};

// The op on `args` through the process group named `group_name`: args.collective says which
// collective (kAllReduce or kReduceScatter; its args.ranks is set here, from the group). Both run
// on x[0]'s device (its device guard held) and let the engine's takes_device_group_list hook set
// args.keep_group_list_on_device. With a reduce-scatter this rank's [M / n, N] block is returned.
// With async_op, the outputs are returned once the collectives are started, to be waited for
// (comm/deferred.h).
std::vector<at::Tensor> run_op(const Engine& engine, OpArgs args, std::string_view group_name,
                               bool check_ranks, bool async_op);

// The same groups, planned and computed alike, with no process group and no collective: each
// bias divided by `world_size` (so that it equals one rank's part of the op). The backward pass
// and the compute-only benchmark use it.
std::vector<at::Tensor> run_compute(const Engine& engine, OpArgs args, int64_t world_size);

// Calls fn(i, y, x) for each group i with output rows in `chunk`: y is that block of the flat
// buffer ([rows, n_i], row-major) in `out`, whose element 0 is the buffer's element `out_begin`;
// x the matching rows of x_i ([rows, k_i]). Host-planned rows only.
template <typename Fn>
void for_each_block(const Plan& plan, const OpArgs& args, at::Tensor& out, int64_t out_begin,
                    const Chunk& chunk, Fn&& fn) {
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    const auto [r0, r1] = rows_in_chunk(g, chunk);
    if (r1 <= r0 || g.n == 0) continue;
    // One as_strided per operand: narrow and view cost several dispatches each, per group.
    at::Tensor y = out.as_strided({r1 - r0, g.n}, {g.n, 1},
                                  out.storage_offset() + g.out_offset + r0 * g.n - out_begin);
    fn(i, y, group_x(plan, args.x, i, r0, r1 - r0));
  }
}

// The kernels a device registers for the ops, given its engine:
//   m.impl("grouped_mat_mul_all_reduce", &op_kernel<&kEngine, Collective::kAllReduce>);
//   m.impl("grouped_mat_mul_reduce_scatter", &op_kernel<&kEngine, Collective::kReduceScatter>);
//   m.impl("grouped_mat_mul", &compute_kernel<&kEngine>);
template <const Engine* E, Collective C>
std::vector<at::Tensor> op_kernel(
    at::TensorList x, at::TensorList weight, std::optional<at::TensorList> bias,
    at::OptionalIntArrayRef group_list, const std::optional<at::Tensor>& group_list_tensor,
    int64_t split_item, c10::string_view group_name, c10::string_view reduce_op, int64_t comm_turn,
    int64_t group_list_type, bool check_ranks, std::optional<at::ScalarType> reduce_dtype,
    bool async_op, const std::optional<at::Tensor>& combine_index,
    const std::optional<at::Tensor>& combine_weight, std::optional<int64_t> num_tokens,
    const std::optional<at::Tensor>& shared_input, std::optional<at::TensorList> scale,
    const std::optional<at::Tensor>& per_token_scale, std::optional<at::TensorList> antiquant_scale,
    std::optional<at::TensorList> antiquant_offset, std::optional<at::ScalarType> output_dtype) {
  return run_op(*E,
                {.x = x,
                 .weight = weight,
                 .bias = bias,
                 .group_list = group_list,
                 .group_list_tensor = group_list_tensor,
                 .split_item = split_item,
                 .reduce_op = std::string(reduce_op),
                 .comm_turn = comm_turn,
                 .group_list_type = group_list_type,
                 .reduce_dtype = reduce_dtype,
                 .combine_index = combine_index,
                 .combine_weight = combine_weight,
                 .num_tokens = num_tokens,
                 .shared_input = shared_input,
                 .scale = scale,
                 .per_token_scale = per_token_scale,
                 .antiquant_scale = antiquant_scale,
                 .antiquant_offset = antiquant_offset,
                 .output_dtype = output_dtype,
                 .collective = C},
                group_name, check_ranks, async_op);
}

template <const Engine* E>
std::vector<at::Tensor> compute_kernel(
    at::TensorList x, at::TensorList weight, std::optional<at::TensorList> bias,
    at::OptionalIntArrayRef group_list, const std::optional<at::Tensor>& group_list_tensor,
    int64_t split_item, int64_t group_list_type, int64_t world_size,
    const std::optional<at::Tensor>& combine_index, const std::optional<at::Tensor>& combine_weight,
    std::optional<int64_t> num_tokens, const std::optional<at::Tensor>& shared_input,
    std::optional<at::TensorList> scale, const std::optional<at::Tensor>& per_token_scale,
    std::optional<at::TensorList> antiquant_scale, std::optional<at::TensorList> antiquant_offset,
    std::optional<at::ScalarType> output_dtype) {
  return run_compute(*E,
                     {.x = x,
                      .weight = weight,
                      .bias = bias,
                      .group_list = group_list,
                      .group_list_tensor = group_list_tensor,
                      .split_item = split_item,
                      .group_list_type = group_list_type,
                      .combine_index = combine_index,
                      .combine_weight = combine_weight,
                      .num_tokens = num_tokens,
                      .shared_input = shared_input,
                      .scale = scale,
                      .per_token_scale = per_token_scale,
                      .antiquant_scale = antiquant_scale,
                      .antiquant_offset = antiquant_offset,
                      .output_dtype = output_dtype},
                     world_size);
}

}  // namespace gmm_allreduce
