#include "cpu/prepack.h"

#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "cpu/kernels/int8_avx2.h"
#include "cpu/kernels/isa.h"

namespace gmm_allreduce {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakImpl weight;
  WeakImpl pack;
  int64_t version;
};

// Tensors made under torch.inference_mode have no version counter.
int64_t version_of(const at::Tensor& t) { return t.is_inference() ? 0 : t._version(); }

class Registry {
 public:
  void add(const at::Tensor& w, const at::Tensor& pack) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {  // drop the dead ones
      it = it->second.weight.expired() || it->second.pack.expired() ? entries_.erase(it) : ++it;
    }
    entries_.insert_or_assign(
        w.unsafeGetTensorImpl(),
        Entry{WeakImpl(w.getIntrusivePtr()), WeakImpl(pack.getIntrusivePtr()), version_of(w)});
    size_.store(entries_.size(), std::memory_order_relaxed);
  }

  at::Tensor find(const at::Tensor& w) {
    if (size_.load(std::memory_order_relaxed) == 0) return {};  // nothing packed: no lock
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(w.unsafeGetTensorImpl());
    if (it == entries_.end()) return {};
    // The same weight (not a new tensor at a freed one's address), unchanged since packing.
    const auto weight = it->second.weight.lock();
    if (weight.get() != w.unsafeGetTensorImpl() || version_of(w) != it->second.version) return {};
    auto pack = it->second.pack.lock();
    return pack ? at::Tensor(std::move(pack)) : at::Tensor();
  }

 private:
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  std::atomic<size_t> size_{0};
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

bool packs(const at::Tensor& w) {
  return w.is_cpu() && w.dim() == 2 && w.layout() == at::kStrided && w.scalar_type() == at::kChar &&
         cpu_has_avx2() && !cpu_has_vnni() && !cpu_has_amx_int8();
}

std::vector<std::optional<at::Tensor>> prepack(at::TensorList weight) {
  std::vector<std::optional<at::Tensor>> out;
  for (const at::Tensor& w : weight) {
    if (!packs(w)) {
      out.emplace_back(std::nullopt);
      continue;
    }
    at::Tensor pack = int8_avx2_pack(w);
    registry().add(w, pack);
    out.emplace_back(std::move(pack));
  }
  return out;
}

at::Tensor find_pack(const at::Tensor& w) { return registry().find(w); }

TORCH_LIBRARY_IMPL(gmm_allreduce, CatchAll, m) { m.impl("_prepack_weights", &prepack); }

}  // namespace gmm_allreduce
