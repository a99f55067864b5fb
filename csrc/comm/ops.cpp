// The communication layer as ops of its own: the op's all-reduce alone (the benchmark's comm_op
// line), the reduce-scatter op's backward all-gather, and the release of destroyed groups' shared
// memory (schemas in registration.cpp).
#include <torch/library.h>

#include "comm/all_reduce.h"
#include "comm/reduce_scatter.h"

namespace gmm_allreduce {
namespace {

void all_reduce(const at::Tensor& t, c10::string_view group_name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "t: expected a contiguous tensor");
  AllReduce sum(resolve_group(std::string(group_name)), t);
  sum.start(t);
  sum.wait();
}

at::Tensor gather_rows(const at::Tensor& t, c10::string_view group_name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, "t: expected a tensor of at least 1 dim");
  return all_gather_rows(resolve_group(std::string(group_name)), t);
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_all_reduce_", &all_reduce);
  m.impl("_all_gather_rows", &gather_rows);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CatchAll, m) {
  m.impl("_release_destroyed_groups", &release_destroyed_groups);
}

}  // namespace gmm_allreduce
