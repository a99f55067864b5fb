#include "comm/deferred.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace gmm_allreduce {
namespace {

// The rest of one call, run once, by whichever output is waited for first. It holds its outputs
// weakly: the caller's references alone decide how long they live.
class Deferred : public c10d::Work {
 public:
  using Finish = std::function<void(std::vector<at::Tensor>&)>;

  Deferred(Finish finish, const std::vector<at::Tensor>& outputs) : finish_(std::move(finish)) {
    for (const at::Tensor& t : outputs) {
      outputs_.push_back({.tensor = c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()),
                          .storage = t.storage().getWeakStorageImpl(),
                          .offset = t.storage_offset(),
                          .sizes = t.sizes().vec(),
                          .strides = t.strides().vec(),
                          .options = t.options()});
    }
  }

  bool wait(std::chrono::milliseconds /*timeout: the collectives' own bound it*/) override {
    std::unique_lock<std::mutex> lock(mutex_);
    TORCH_CHECK(!released_,
                "async_op: this call was released unfinished, every tensor it returned having "
                "been freed before any wait; wait on the tensors the call returned, not only on "
                "views of them");
    if (finish_) {
      Finish finish = std::move(finish_);
      finish_ = nullptr;
      try {
        std::vector<at::Tensor> outputs = live_outputs();
        finish(outputs);
        for (const at::Tensor& t : outputs) record_on_current_stream(t);
      } catch (...) {
        error_ = std::current_exception();
      }
      lock.unlock();
      // Done: no later wait needs this work, but a failed one stays for every output (wait_tensor
      // took it off the one it waited for), so that each later wait raises the error again.
      if (error_) {
        register_for_live_outputs();
      } else {
        c10d::unregister_work(self());
      }
      lock.lock();
    } else if (error_) {
      lock.unlock();
      register_for_live_outputs();
      lock.lock();
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

  bool isCompleted() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    return !finish_;
  }

  // Releases the call once the caller has freed every tensor it returned without a wait: its
  // buffer at once; its registrations once no view of an output is left either (a wait on such
  // a view raises rather than return what was never written). True once there is nothing more
  // to release.
  bool release_if_abandoned() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!finish_ && !released_) return true;  // finished
      if (finish_) {
        const bool held = std::any_of(outputs_.begin(), outputs_.end(),
                                      [](const Output& o) { return !o.tensor.expired(); });
        if (held) return false;
        finish_ = nullptr;
        released_ = true;
      }
      const bool viewed = std::any_of(outputs_.begin(), outputs_.end(),
                                      [](const Output& o) { return !o.storage.expired(); });
      if (viewed) return false;
      released_ = false;  // nothing can wait for it any more
    }
    c10d::unregister_work(self());
    return true;
  }

 private:
  struct Output {
    c10::weak_intrusive_ptr<c10::TensorImpl> tensor;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t offset;
    std::vector<int64_t> sizes;
    std::vector<int64_t> strides;
    at::TensorOptions options;
  };

  // The outputs as the caller holds them: the tensor itself; else, where only a view of it is
  // left, the tensor remade over its storage; else a placeholder of its shape.
  std::vector<at::Tensor> live_outputs() const {
    std::vector<at::Tensor> out;
    for (const Output& o : outputs_) {
      if (auto impl = o.tensor.lock()) {
        out.emplace_back(std::move(impl));
      } else if (auto storage = o.storage.lock()) {
        out.push_back(at::empty({0}, o.options)
                          .set_(c10::Storage(std::move(storage)), o.offset, o.sizes, o.strides));
      } else {
        out.push_back(at::empty_strided(o.sizes, o.strides, o.options));
      }
    }
    return out;
  }

  c10::intrusive_ptr<c10d::Work> self() {
    return c10::intrusive_ptr<c10d::Work>::unsafe_reclaim_from_nonowning(this);
  }

  void register_for_live_outputs() {
    for (const Output& o : outputs_) {
      if (auto impl = o.tensor.lock()) c10d::register_work(at::Tensor(std::move(impl)), self());
    }
  }

  std::mutex mutex_;
  Finish finish_;
  std::vector<Output> outputs_;
  bool released_ = false;  // freed unwaited, and some view of an output may still be waited for
  std::exception_ptr error_;
};

// The deferred calls not yet finished, to release those whose outputs were freed unwaited.
class Unfinished {
 public:
  void add(const c10::intrusive_ptr<Deferred>& work) {
    std::vector<c10::intrusive_ptr<Deferred>> live;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& weak : works_) {
        if (auto w = weak.lock()) live.push_back(std::move(w));
      }
      works_.clear();
    }
    std::vector<c10::weak_intrusive_ptr<Deferred>> kept{c10::weak_intrusive_ptr<Deferred>(work)};
    for (const auto& w : live) {
      if (!w->release_if_abandoned()) kept.emplace_back(w);
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    works_.insert(works_.end(), kept.begin(), kept.end());
  }

 private:
  std::mutex mutex_;
  std::vector<c10::weak_intrusive_ptr<Deferred>> works_;
};

}  // namespace

void record_on_current_stream(const at::Tensor& t) {
  if (!t.defined() || t.is_cpu() || t.is_meta()) return;
  const c10::Device device = t.device();
  t.record_stream(c10::impl::getDeviceGuardImpl(device.type())->getStream(device));
}

std::vector<at::Tensor> finish_or_defer(std::function<void(std::vector<at::Tensor>&)> finish,
                                        std::vector<at::Tensor> outputs, bool async_op) {
  if (!async_op) {
    finish(outputs);
    return outputs;
  }
  static Unfinished* unfinished = new Unfinished();  // never destroyed: works may outlive it
  const auto work = c10::make_intrusive<Deferred>(std::move(finish), outputs);
  for (const at::Tensor& out : outputs) c10d::register_work(out, work);
  unfinished->add(work);
  return outputs;
}

}  // namespace gmm_allreduce
