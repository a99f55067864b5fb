// Test-only: whether a group's CPU sums go through the same-host group (shared memory) or through
// the process group, for tests/test_shm.py and the other tests that run both paths; and what its
// segment holds in /dev/shm now and how many calls it refused for want of room; and the switch
// that makes the op issue its collectives at world size 1 (NCCL on one GPU, for test_cuda); and
// how often a waiting rank of the same-host group checks its peers.
#include <torch/library.h>

#include "comm/all_reduce.h"
#include "comm/shm/same_host_group.h"

namespace gmm_allreduce {
namespace {

bool shared_memory(c10::string_view group_name) {
  return AllReduce(resolve_group(std::string(group_name)), at::empty({0})).shared_memory();
}

std::vector<int64_t> shm_stats(c10::string_view group_name) {
  const auto shm = shared_memory_of(resolve_group(std::string(group_name)), at::empty({0}));
  if (!shm) return {0, 0};
  return {shm->pinned_bytes(), shm->refused_calls()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) {
  m.def("_shared_memory(str group_name) -> bool");
  m.def("_shm_stats(str group_name) -> int[]");
  m.def("_collectives_at_world_size_1(bool on) -> ()");
  m.def("_shm_peer_check_spins(int spins) -> ()");
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CatchAll, m) {
  m.impl("_collectives_at_world_size_1", &set_collectives_at_world_size_1);
  m.impl("_shm_peer_check_spins", &SameHostGroup::set_peer_check_spins);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeImplicitAutograd, m) {
  m.impl("_shared_memory", &shared_memory);
  m.impl("_shm_stats", &shm_stats);
}

}  // namespace gmm_allreduce
