#include "deferred.h"

#include <exception>
#include <mutex>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace gmm_allreduce {
namespace {

// The rest of one call, run once, by whichever output is waited for first.
class Deferred : public c10d::Work {
 public:
  explicit Deferred(std::function<void()> finish) : finish_(std::move(finish)) {}

  bool wait(std::chrono::milliseconds /*timeout: the collectives' own bound it*/) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (finish_) {
      std::function<void()> finish = std::move(finish_);
      finish_ = nullptr;
      try {
        finish();
      } catch (...) {
        error_ = std::current_exception();
      }
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

  bool isCompleted() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    return !finish_;
  }

 private:
  std::mutex mutex_;
  std::function<void()> finish_;
  std::exception_ptr error_;
};

}  // namespace

std::vector<at::Tensor> finish_or_defer(std::function<void()> finish,
                                        std::vector<at::Tensor> outputs, bool async_op) {
  if (!async_op) {
    finish();
    return outputs;
  }
  const auto work = c10::make_intrusive<Deferred>(std::move(finish));
  for (const at::Tensor& out : outputs) c10d::register_work(out, work);
  return outputs;
}

}  // namespace gmm_allreduce
