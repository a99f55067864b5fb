// Test-only: whether a group's CPU sums go through the same-host group (shared memory) or through
// the process group, for tests/test_shm.py and the other tests that run both paths.
#include <torch/library.h>

#include "../comm/all_reduce.h"

namespace gmm_allreduce {
namespace {

bool shared_memory(c10::string_view group_name) {
  return AllReduce(resolve_group(std::string(group_name)), at::empty({0})).shared_memory();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) { m.def("_shared_memory(str group_name) -> bool"); }

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeImplicitAutograd, m) {
  m.impl("_shared_memory", &shared_memory);
}

}  // namespace gmm_allreduce
