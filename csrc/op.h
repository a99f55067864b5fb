// The op's driver, shared by every device: validate and plan, allocate one flat output buffer,
// let a device engine compute the groups into it chunk by chunk, all-reduce each chunk as soon as
// it is computed (one collective for comm_turn = 0), return the outputs (see op.cpp).
#pragma once

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
  // device (split_item 3 only), so that planning need not read them (OpArgs::device_rows). Called
  // before validation: it must accept any arguments.
  bool (*device_rows)(const OpArgs& args) = nullptr;
};

std::vector<at::Tensor> run_op(Engine engine, at::TensorList x, at::TensorList weight,
                               std::optional<at::TensorList> bias,
                               at::OptionalIntArrayRef group_list,
                               const std::optional<at::Tensor>& group_list_tensor,
                               int64_t split_item, std::string_view group_name,
                               std::string_view reduce_op, int64_t comm_turn,
                               int64_t group_list_type, bool check_ranks);

// The same groups, planned and computed alike, with no process group and no collective: each
// bias divided by `world_size` (so that it equals one rank's part of the op). The backward pass
// and the compute-only benchmark use it.
std::vector<at::Tensor> run_compute(Engine engine, at::TensorList x, at::TensorList weight,
                                    std::optional<at::TensorList> bias,
                                    at::OptionalIntArrayRef group_list,
                                    const std::optional<at::Tensor>& group_list_tensor,
                                    int64_t split_item, int64_t group_list_type,
                                    int64_t world_size);

}  // namespace gmm_allreduce
