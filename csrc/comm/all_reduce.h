// The all-reduces the op issues over its process group (its data, chunk by chunk; check_ranks'
// exchange), and where they run: for CPU tensors whose group's ranks share a /dev/shm, through
// shared memory (shm/same_host_group.h, set up once per process group); otherwise through the
// process group, on any backend (gloo, NCCL, ...), where the backend runs it (NCCL: its own
// stream). GMM_ALLREDUCE_SHM=0 keeps every all-reduce on the process group.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "comm/group.h"

namespace gmm_allreduce {

class SameHostGroup;

// The group's shared-memory collectives for tensors like `like`: for CPU tensors of a group of
// several ranks that share a /dev/shm (set up at the group's first call: a collective, which every
// rank reaches at the same call); nullptr otherwise.
std::shared_ptr<SameHostGroup> shared_memory_of(const GroupPtr& group, const at::Tensor& like);

// Test-only (the testing library sets it): whether the collectives are issued even over a group
// of one rank, which they otherwise skip (a sum over one rank is the tensor itself), so that GPU
// tests exercise NCCL's stream order, graph capture and async waits on a single GPU.
void set_collectives_at_world_size_1(bool on);
bool collectives_at_world_size_1();

// Releases the shared memory of the groups whose ProcessGroup objects are gone (each call of the
// op does so too; the Python front calls this when a group object it saw is freed).
void release_destroyed_groups();

class AllReduce {
 public:
  // The sums of tensors like `like` (its device decides) over `group`. The first one of a CPU
  // group sets up its shared memory: a collective, which every rank reaches at the same call.
  AllReduce(const GroupPtr& group, const at::Tensor& like);

  // Starts the in-place sum of the contiguous `flat` over the group: done before it returns
  // through shared memory (and for one rank); queued on the backend otherwise.
  void start(const at::Tensor& flat);
  // Until every started sum is done (on CUDA: for work then queued on the current stream).
  void wait();

  // Whether this call's sums go through shared memory.
  bool shared_memory() const { return shm_ != nullptr; }

 private:
  GroupPtr group_;
  std::shared_ptr<SameHostGroup> shm_;
  std::vector<c10::intrusive_ptr<c10d::Work>> pending_;
};

}  // namespace gmm_allreduce
