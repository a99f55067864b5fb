// The process group behind a name, and the all-reduce of the op's flat output buffer through it.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace gmm_allreduce {

using GroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

// The group registered under `group_name` (ProcessGroup.group_name in Python), as PyTorch's
// functional collectives resolve it. Raises c10::ValueError naming hcomm when there is none.
GroupPtr resolve_group(const std::string& group_name);

using WorkPtr = c10::intrusive_ptr<c10d::Work>;

// Starts the in-place sum of the contiguous tensor `flat` over the group and returns at once; the
// result is in `flat` after Work::wait() (on CUDA: for work then queued on the current stream).
// Dispatched through c10d::allreduce_, so any backend (gloo, NCCL, ...) that implements all-reduce
// serves, and the collective runs where that backend runs it (NCCL: the group's own stream).
WorkPtr start_all_reduce_sum(c10d::ProcessGroup& group, const at::Tensor& flat);

}  // namespace gmm_allreduce
