// What the ranks of a group must agree on before their collective is well formed: the plan. Two
// guards, both about the plan and both carried by the op's own collectives:
// - check_ranks=True: before the real collective, every rank tells the others whether its call is
//   valid and what it would produce, so that one rank's bad call becomes the same clear error on
//   every rank instead of a hang or a silently mismatched sum (one small all-reduce);
// - without it, a fingerprint of the plan rides at the end of the op's flat buffer, so that ranks
//   whose calls differ but whose buffers have one size (another split mode, other shapes of the
//   same element count, other group rows) raise on every rank instead of returning a mixed sum, at
//   the cost of a few elements and no extra collective.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <string>

#include "comm/group.h"
#include "core/plan.h"

namespace gmm_allreduce {

// check() on every rank, then one small all-reduce that exchanges each rank's verdict: raises on
// all ranks alike, before anything else moves, if any rank's check raised (naming that rank and
// its error) or the ranks' returned signatures differ (naming both). Returns this rank's
// signature. `device`: where the exchange runs (NCCL takes no CPU tensors).
std::string agree(const GroupPtr& group, at::Device device, c10::function_ref<std::string()> check);

// planner(args) (make_plan and the collective's rules) on every rank, then one small all-reduce
// that exchanges each rank's verdict. Raises on all ranks alike if any rank's call is invalid or
// the ranks' plans disagree.
Plan make_plan_agreed(const OpArgs& args, const GroupPtr& group,
                      c10::function_ref<Plan(const OpArgs&)> planner);

// The plan's fingerprint in the op's flat buffer: one element per bit of the signature's hash,
// after the plan's numel elements, summed with them. It rides only where it can: a non-empty
// buffer, several ranks, a world small enough for the buffer's dtype to sum 0/1 values exactly,
// and a CPU buffer (reading it back on a device would cost a sync); and only when `wanted`.
class Fingerprint {
 public:
  Fingerprint(const Plan& plan, int64_t world_size, bool wanted);

  // The op's flat buffer: the plan's numel elements of its reduce_dtype, then this rank's
  // fingerprint, written (bit b of the hash as 0 or 1).
  at::Tensor new_buffer() const;

  // After the sum of `flat` (from new_buffer): every element of the fingerprint must be 0 or
  // world_size (all ranks had the same bit); otherwise raises the same ValueError on every rank.
  void check(const at::Tensor& flat) const;

 private:
  int64_t begin_;  // the plan's numel
  int64_t size_;   // 0 where it does not ride
  int64_t world_size_;
  at::TensorOptions options_;
  std::string signature_;  // empty where it does not ride
};

}  // namespace gmm_allreduce
