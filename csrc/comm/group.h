// The process group behind a name, as PyTorch's functional collectives resolve it.
#pragma once

#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace gmm_allreduce {

using GroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

// The group registered under `group_name` (ProcessGroup.group_name in Python). Raises
// c10::ValueError naming hcomm when there is none.
GroupPtr resolve_group(const std::string& group_name);

}  // namespace gmm_allreduce
