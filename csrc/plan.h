// Validation and the group plan: everything the op decides from shapes, dtypes and group_list
// alone, before any compute or communication. Device-free, comm-free C++.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace gmm_allreduce {

// The op's arguments, as the schema in registration.cpp passes them.
struct OpArgs {
  at::TensorList x;
  at::TensorList weight;
  std::optional<at::TensorList> bias;
  at::OptionalIntArrayRef group_list;           // group_list given as Python ints
  std::optional<at::Tensor> group_list_tensor;  // group_list given as a 1-D integer tensor
  int64_t split_item = 0;
  std::string reduce_op = "sum";
  int64_t comm_turn = 0;
  int64_t group_list_type = 0;  // 0: cumulative end offsets along M, 1: per-group counts
};

// One group's matmul y_i[m, n] = x_i[m, k] @ weight_i[k, n], and where it lives.
struct GroupPlan {
  int64_t m = 0;
  int64_t k = 0;
  int64_t n = 0;
  int64_t x_row = 0;       // first row of this group in x[0] (split_item 1 and 3)
  int64_t out_offset = 0;  // first element of y_i in the flat output buffer
};

// Every group's output is a contiguous [m_i, n_i] block of one flat buffer, in group order, so
// that a single all-reduce covers all of them; the outputs are views of that buffer.
struct Plan {
  int64_t split_item = 0;
  int64_t comm_turn = 0;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  bool has_bias = false;
  std::vector<GroupPlan> groups;
  std::vector<std::vector<int64_t>> out_shapes;  // one per returned tensor
  int64_t numel = 0;                             // elements of the flat buffer

  // What every rank of the group must agree on for the all-reduce to be well formed.
  std::string signature() const;
};

// Checks every rule of SPEC §4 that needs no process group and returns the plan. Raises
// c10::ValueError / c10::TypeError naming the argument and index; reads group_list to the host.
Plan make_plan(const OpArgs& args);

}  // namespace gmm_allreduce
