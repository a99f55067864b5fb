// Validation and the group plan: everything the op decides from shapes, dtypes and group_list
// alone, before any compute or communication. Device-free, comm-free C++.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/args.h"

namespace gmm_allreduce {

// The two facts a split_item stands for: x is one tensor whose rows group_list cuts (1, 3); the
// output is one tensor, the groups' rows stacked (2, 3).
inline bool single_x(int64_t split_item) { return split_item == 1 || split_item == 3; }
inline bool single_y(int64_t split_item) { return split_item == 2 || split_item == 3; }

// One group's matmul y_i[m, n] = x_i[m, k] @ weight_i[k, n], and where it lives. In a plan with
// rows_on_device, m, x_row, out_row and out_offset are unknown on the host (left 0).
struct GroupPlan {
  int64_t m = 0;
  int64_t k = 0;
  int64_t n = 0;
  int64_t x_row = 0;       // first row of this group in x[0] (split_item 1 and 3)
  int64_t out_row = 0;     // first row of y_i among all groups' output rows, in group order
  int64_t out_offset = 0;  // first element of y_i in the flat output buffer
};

// A run of consecutive output rows (possibly spanning groups) and the contiguous elements of the
// flat buffer they occupy: the unit of work that is computed, then all-reduced on its own.
struct Chunk {
  int64_t row_begin = 0;
  int64_t row_end = 0;
  int64_t elem_begin = 0;
  int64_t elem_end = 0;
};

// Every group's output is a contiguous [m_i, n_i] block of one flat buffer, in group order, so
// that a single all-reduce covers all of them.
struct Plan {
  int64_t split_item = 0;
  bool single_x = false;  // single_x(split_item)
  bool single_y = false;  // single_y(split_item)
  int64_t comm_turn = 0;
  at::ScalarType dtype = at::kFloat;  // the outputs': x's, or output_dtype (quant.h)
  Quant quant = Quant::kNone;
  at::ScalarType reduce_dtype = at::kFloat;  // the flat buffer's: dtype, or float32 (OpArgs)
  at::Device device = at::kCPU;
  bool has_bias = false;
  // With combine_index: the output is the [tokens, N] combined one (rows, numel, out_shapes and
  // chunks are the token rows'), and the groups' own rows (GroupPlan::out_row) are expert rows, of
  // which there are expert_rows; combine_index's values are validated when it is on the host.
  bool combine = false;
  bool combine_weighted = false;  // combine_weight given
  bool combine_shared = false;    // shared_input given
  int64_t expert_rows = 0;
  // split_item 3 with group_list on the device, left there (OpArgs::keep_group_list_on_device): the
  // output is [rows, n] whatever the groups' rows are, so chunks are cut by rows alone.
  bool rows_on_device = false;
  std::vector<GroupPlan> groups;
  std::vector<std::vector<int64_t>> out_shapes;  // one per returned tensor
  int64_t numel = 0;                             // elements of the flat buffer
  int64_t rows = 0;                              // output rows of all groups together
  // comm_turn = 0: one chunk, all rows. comm_turn = k >= 1: at most k chunks with about numel / k
  // elements each, cut at row boundaries; never an empty one (so fewer when rows are few).
  // A reduce-scatter over n ranks: rounds of n chunks, round c holding the c-th of k runs of rows
  // of each rank's block, in rank order (its strategy cuts them: collective.cpp).
  std::vector<Chunk> chunks;
  Collective collective = Collective::kNone;  // OpArgs'
  int64_t ranks = 1;                          // OpArgs'; the reduce-scatter's n

  // What every rank of the group must agree on for the all-reduce to be well formed.
  std::string signature() const;
};

// The rows [r0, r1) of group g, counted from its first row, that fall in `chunk` (none: r1 <= r0).
inline std::pair<int64_t, int64_t> rows_in_chunk(const GroupPlan& g, const Chunk& chunk) {
  return {std::max(chunk.row_begin, g.out_row) - g.out_row,
          std::min(chunk.row_end, g.out_row + g.m) - g.out_row};
}

// The plan of a combined call's products before the combine: its [expert_rows, N] output rows,
// one chunk, no collective.
Plan expert_plan(const Plan& plan);

// Cuts the plan's output rows into at most `turns` chunks of about equal elements (one if turns
// is 0). Chunks cover every element once, in order; none is empty unless numel is 0.
std::vector<Chunk> make_chunks(const Plan& plan, int64_t turns);

// Rows [r0, r0 + rows) of x_i (all from r0 when rows < 0) as a 2-D [rows, k_i] operand: a row
// slice of x[0] (split_item 1, 3) or of x[i] with its leading dims flattened (split_item 0, 2).
at::Tensor group_x(const Plan& plan, at::TensorList x, size_t i, int64_t r0 = 0, int64_t rows = -1);

// Checks every rule of the call (docs/semantics.md) that needs no process group but its
// collective's own (collective.h) and returns the plan, its chunks cut by comm_turn. Raises
// c10::ValueError / c10::TypeError naming the argument and index; reads group_list to the host.
Plan make_plan(const OpArgs& args);

}  // namespace gmm_allreduce
