#include "comm/group.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

namespace gmm_allreduce {

GroupPtr resolve_group(const std::string& group_name) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error&) {
    TORCH_CHECK_VALUE(false, "hcomm: no process group is registered under the name \"", group_name,
                      "\" (pass ProcessGroup.group_name, a ProcessGroup, or None for the default "
                      "group, after torch.distributed.init_process_group)");
  }
}

}  // namespace gmm_allreduce
