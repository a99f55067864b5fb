#include "fingerprint.h"

#include <c10/util/irange.h>

#include <functional>

namespace gmm_allreduce {
namespace {

constexpr int64_t kBits = 32;

// Integers up to this are exact in the dtype, so sums of world_size 0/1 values are exact.
int64_t exact_integers(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return int64_t{1} << 8;
    case at::kHalf:
      return int64_t{1} << 11;
    case at::kFloat:
      return int64_t{1} << 24;
    default:
      return int64_t{1} << 53;
  }
}

uint64_t signature_hash(const Plan& plan) { return std::hash<std::string>{}(plan.signature()); }

}  // namespace

int64_t fingerprint_size(const Plan& plan, int64_t world_size) {
  const bool rides = plan.numel > 0 && world_size > 1 &&
                     world_size <= exact_integers(plan.reduce_dtype) && plan.device.is_cpu();
  return rides ? kBits : 0;
}

void write_fingerprint(const Plan& plan, at::Tensor& tail) {
  const uint64_t hash = signature_hash(plan);
  at::Tensor bits = at::empty({kBits}, at::kDouble);
  double* p = bits.data_ptr<double>();
  for (const auto b : c10::irange(kBits)) p[b] = static_cast<double>((hash >> b) & 1);
  tail.copy_(bits);
}

void check_fingerprint(const Plan& plan, const at::Tensor& tail, int64_t world_size) {
  const at::Tensor sums = tail.to(at::kCPU, at::kDouble).contiguous();
  const double* p = sums.const_data_ptr<double>();
  for (const auto b : c10::irange(kBits)) {
    TORCH_CHECK_VALUE(p[b] == 0 || p[b] == static_cast<double>(world_size),
                      "ranks disagree on the call: their plans (split_item, comm_turn, dtype, "
                      "output shapes, group rows) differ, so the all-reduced outputs would mix "
                      "unrelated elements; this rank has ",
                      plan.signature(),
                      ". Pass check_ranks=True to have every rank name the one that differs, "
                      "before any data moves");
  }
}

}  // namespace gmm_allreduce
