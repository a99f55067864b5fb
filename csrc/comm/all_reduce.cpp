#include "comm/all_reduce.h"

#include <algorithm>
#include <atomic>
#include <mutex>

#include "comm/shm/same_host_group.h"

namespace gmm_allreduce {
namespace {

std::chrono::milliseconds timeout_of(c10d::ProcessGroup& group) {
  try {
    return group.getBackend(c10::DeviceType::CPU)->getBackendOptions()->timeout;
  } catch (const c10::Error&) {
    return kProcessGroupDefaultTimeout;  // c10d's default, at global scope
  }
}

// The groups' shared-memory all-reduces, each set up at its group's first use; an entry is
// dropped once its ProcessGroup object is gone (a group destroyed and another made, even under its
// name, even at its address, sets up afresh). The cache's lock guards the list only: each group's
// setup, a collective, runs under that group's own once-flag, so that threads setting up two
// groups at once cannot wait for each other across ranks.
struct Cache {
  struct Setup {
    std::once_flag once;
    std::shared_ptr<SameHostGroup> shm;
  };
  struct Entry {
    c10::weak_intrusive_ptr<c10d::ProcessGroup> group;
    std::shared_ptr<Setup> setup;
  };
  std::mutex mutex;
  std::vector<Entry> entries;

  static Cache& get() {
    static Cache* cache = new Cache();  // never destroyed: groups may outlive static destructors
    return *cache;
  }

  // The entries of destroyed groups, taken out under the lock, released by the caller.
  std::vector<Entry> take_destroyed() {
    const std::lock_guard<std::mutex> lock(mutex);
    auto gone = std::stable_partition(entries.begin(), entries.end(),
                                      [](const Entry& e) { return !e.group.expired(); });
    std::vector<Entry> out(std::make_move_iterator(gone), std::make_move_iterator(entries.end()));
    entries.erase(gone, entries.end());
    return out;
  }

  std::shared_ptr<Setup> setup_of(const GroupPtr& group) {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : entries) {
      if (e.group.lock().get() == group.get()) return e.setup;
    }
    entries.push_back(
        {c10::weak_intrusive_ptr<c10d::ProcessGroup>(group), std::make_shared<Setup>()});
    return entries.back().setup;
  }
};

std::shared_ptr<SameHostGroup> shm_of(const GroupPtr& group) {
  release_destroyed_groups();
  const std::shared_ptr<Cache::Setup> setup = Cache::get().setup_of(group);
  std::call_once(setup->once,
                 [&] { setup->shm = SameHostGroup::create(*group, timeout_of(*group)); });
  return setup->shm;
}

}  // namespace

void release_destroyed_groups() { Cache::get().take_destroyed(); }

namespace {
std::atomic<bool> at_world_size_1{false};
}  // namespace

void set_collectives_at_world_size_1(bool on) { at_world_size_1.store(on); }

bool collectives_at_world_size_1() { return at_world_size_1.load(); }

std::shared_ptr<SameHostGroup> shared_memory_of(const GroupPtr& group, const at::Tensor& like) {
  return group->getSize() > 1 && like.is_cpu() ? shm_of(group) : nullptr;
}

AllReduce::AllReduce(const GroupPtr& group, const at::Tensor& like)
    : group_(group), shm_(shared_memory_of(group, like)) {}

void AllReduce::start(const at::Tensor& flat) {
  const bool alone = group_->getSize() == 1 && !collectives_at_world_size_1();
  if (alone || flat.numel() == 0) return;  // a sum over one rank, or of nothing
  // Shared memory, unless it found no room in /dev/shm for this call: then the process group.
  if (shm_ && shm_->sum(flat)) return;
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
