// A device engine: what computes a call's groups into the flat output buffer (cpu/engine.cpp for
// the CPU and any device with ATen matmuls, cuda/engine.cpp for CUDA), as the driver (op.h) calls
// it.
#pragma once

#include <ATen/ATen.h>

#include "core/plan.h"

namespace gmm_allreduce {

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
  // Optional: checks what the engine reads from its environment (e.g. GMM_CPU_ISA) before
  // validation and any communication, raising a ValueError naming what is wrong. It must accept
  // any arguments.
  void (*check_environment)(const OpArgs& args) = nullptr;
  // Optional: whether `compute` computes an expert block's activations itself (core/mlp.h), a
  // block of expert rows at a time, from MlpArgs; otherwise the driver computes them first.
  bool (*fuses_mlp)(const OpArgs& args) = nullptr;
};

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

}  // namespace gmm_allreduce
