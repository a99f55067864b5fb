#include "all_reduce.h"

#include <algorithm>
#include <mutex>

#include "shm/same_host_group.h"

namespace gmm_allreduce {
namespace {

std::chrono::milliseconds timeout_of(c10d::ProcessGroup& group) {
  try {
    return group.getBackend(c10::DeviceType::CPU)->getBackendOptions()->timeout;
  } catch (const c10::Error&) {
    return kProcessGroupDefaultTimeout;  // c10d's default, at global scope
  }
}

// The group's shared-memory all-reduce, set up at its first use; nullptr where it cannot serve.
// Cached per ProcessGroup object: a group destroyed and another made (even under its name, even at
// its address) sets up afresh. Setup is a collective, run under the cache's lock.
std::shared_ptr<SameHostGroup> shm_of(const GroupPtr& group) {
  struct Entry {
    c10::weak_intrusive_ptr<c10d::ProcessGroup> group;
    std::shared_ptr<SameHostGroup> shm;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  cache.erase(
      std::remove_if(cache.begin(), cache.end(), [](const Entry& e) { return e.group.expired(); }),
      cache.end());
  for (const Entry& e : cache) {
    if (e.group.lock().get() == group.get()) return e.shm;
  }
  std::shared_ptr<SameHostGroup> shm = SameHostGroup::create(*group, timeout_of(*group));
  cache.push_back({c10::weak_intrusive_ptr<c10d::ProcessGroup>(group), shm});
  return shm;
}

}  // namespace

std::shared_ptr<SameHostGroup> shared_memory_of(const GroupPtr& group, const at::Tensor& like) {
  return group->getSize() > 1 && like.is_cpu() ? shm_of(group) : nullptr;
}

AllReduce::AllReduce(const GroupPtr& group, const at::Tensor& like)
    : group_(group), shm_(shared_memory_of(group, like)) {}

void AllReduce::start(const at::Tensor& flat) {
  if (group_->getSize() == 1 || flat.numel() == 0) return;  // a sum over one rank, or of nothing
  if (shm_) {
    shm_->sum(flat);
    return;
  }
  std::vector<at::Tensor> tensors{flat};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  pending_.push_back(group_->allreduce(tensors, opts));
}

void AllReduce::wait() {
  for (const auto& work : pending_) work->wait();
  pending_.clear();
}

}  // namespace gmm_allreduce
