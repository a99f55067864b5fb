// The combine epilogue (split_item 2, 3 with combine_index): expert row j's product
// y_j = x_j @ W_g + bias_g / world_size, scaled by combine_weight[j] (1 when none), added into
// token row combine_index[j] of the [num_tokens, N] output, with shared_input added once.
// Accumulated in fp32 (fp64 for fp64 x) and rounded once into the flat buffer; on the CPU in a
// fixed order (the order of the add calls, then rows in order), so that a call gives the same bytes
// every time. Both engines use it: they compute a group's products (a block of rows at a time) and
// hand them here, so that the combined output never holds an [M, N] intermediate of the expert
// rows.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <vector>

#include "core/plan.h"

namespace gmm_allreduce {

class Combine {
 public:
  // The token rows [chunk.row_begin, chunk.row_end) of the combined output, in `flat`'s elements
  // [chunk.elem_begin, chunk.elem_end). The accumulator starts at zero.
  Combine(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
          const Chunk& chunk);

  // Off the CPU, where picking a chunk's expert rows would read combine_index on the host (a
  // sync), every token row is computed with the first chunk and later chunks find theirs done:
  // the chunk to compute for `chunk` (all token rows for the first one), or none.
  static std::optional<Chunk> on_device(const Plan& plan, const Chunk& chunk);

  // Whether every expert row can land in this chunk (it holds all token rows): no selection.
  bool whole() const { return whole_; }

  // The rows of group i (counted from its first row) whose token is in this chunk, in order, as
  // a CPU int64 tensor (host combine_index only; for chunks that are not whole()).
  at::Tensor rows_of(size_t i) const;

  // Adds the products y ([r, N], rows contiguous) of group i's rows: rows [r0, r0 + r) of the
  // group, or the rows listed in `rows` (counted from the group's first row). With `with_bias`,
  // bias_i / world_size is added to each row first (false: y holds it already).
  void add(size_t i, const at::Tensor& y, int64_t r0, bool with_bias = true);
  void add(size_t i, const at::Tensor& y, const at::Tensor& rows, bool with_bias = true);

  // Adds the products y ([M, N]) of all expert rows, bias included (an engine that computed them
  // whole, on a device).
  void add_all(const at::Tensor& y);

  // shared_input's rows added, then the accumulator rounded into the chunk of `flat`.
  void finish();

 private:
  void add_rows(size_t i, const at::Tensor& y, const int64_t* rows, int64_t r0, int64_t count,
                bool with_bias);
  void add_on_device(size_t i, const at::Tensor& y, const at::Tensor& expert_rows, bool with_bias);

  const Plan& plan_;
  const OpArgs& args_;
  int64_t world_size_;
  at::Tensor out_;  // the chunk of the flat buffer, [t1 - t0, N]
  at::Tensor acc_;  // the accumulator: out_ itself when it has the accumulation dtype
  int64_t t0_, t1_;
  bool whole_;
  bool host_;                     // CPU tensors, host index: our loop
  at::Tensor index_;              // combine_index as int64 (on the host for host_)
  at::Tensor weight_;             // combine_weight in the accumulation dtype, or undefined
  std::vector<at::Tensor> bias_;  // bias_i / world_size in the accumulation dtype (host_ only)
};

// The combine's arithmetic on rows that are not the call's own products (expert parallelism's
// rows returned to their tokens' rank, Ascend's finalize routing): for each add p in order,
// acc[token[p]] += weight[p] * (rows[pick[p]] + bias[expert[p]]). CPU tensors: rows [r, N] of any
// float dtype with contiguous rows, acc [T, N] contiguous in its accumulation dtype (fp32; fp64
// for fp64 rows), weight in that dtype (nullptr: 1), bias [E, N] contiguous in it (undefined: none,
// expert unread); pick nullptr: add p takes row p; a pick of -1 adds no row (its bias alone).
// Every other index in range.
struct RowAdds {
  int64_t count = 0;
  const int64_t* token = nullptr;
  const void* weight = nullptr;
  const int64_t* pick = nullptr;
  at::Tensor bias;
  const int64_t* expert = nullptr;
};
void add_rows_into(const at::Tensor& acc, const at::Tensor& rows, const RowAdds& adds);

// The combine's backward: the combined output's gradient dout [T, N] taken back to the expert
// rows, dy_j = combine_weight[j] * dout[combine_index[j]] (0 for a row outside [0, T), which the
// forward dropped), in dout's dtype; and the rows of dout each expert row went to (`picked`) and
// whether it went anywhere (`kept`, in the accumulation dtype), for combine_weight's gradient
// <picked_j, y_j> * kept_j. Any device.
struct CombineGrad {
  at::Tensor dy, picked, kept;
};
CombineGrad combine_backward(const at::Tensor& dout, const at::Tensor& combine_index,
                             const std::optional<at::Tensor>& combine_weight);

// An engine's products of group i's rows `x` ([r, K]): rows [r0, r0 + r) of the group, or the
// listed `rows` (counted from the group's first row) when defined; [r, N], rows contiguous, without
// the bias. For a fused expert block x is undefined and `rows` always given: the engine computes
// those rows' x (core/mlp.h).
using GroupProducts = c10::function_ref<at::Tensor(size_t i, const at::Tensor& x, int64_t r0,
                                                   const at::Tensor& rows)>;

// A combined chunk computed a group and a block of rows at a time (the products of those whose
// token is in the chunk, or on a device all of them with the first chunk), handed to the combine.
// With `parallel` (products safe to call from several threads at once, for different blocks), on
// the CPU as many blocks as threads are computed at a time, then added in order.
void combine_groups(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                    const Chunk& chunk, GroupProducts products, bool parallel = false);

}  // namespace gmm_allreduce
