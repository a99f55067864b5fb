// The op's driver, shared by every device: validate and plan, allocate one flat output buffer,
// let a device engine compute all groups into it, all-reduce it once, return views of it.
#pragma once

#include <string_view>

#include "plan.h"

namespace gmm_allreduce {

// A device engine: writes every group's x_i @ weight_i + bias_i / world_size into its block of
// `flat` (Plan::groups[i].out_offset, m_i x n_i, row-major), accumulating in fp32 or better.
using Engine = void (*)(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat);

std::vector<at::Tensor> run_op(Engine engine, at::TensorList x, at::TensorList weight,
                               std::optional<at::TensorList> bias,
                               at::OptionalIntArrayRef group_list,
                               const std::optional<at::Tensor>& group_list_tensor,
                               int64_t split_item, std::string_view group_name,
                               std::string_view reduce_op, int64_t comm_turn,
                               int64_t group_list_type, bool check_ranks);

}  // namespace gmm_allreduce
