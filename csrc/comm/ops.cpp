// The communication layer as ops of its own, for the tests and the benchmark's comm-only line
// (schemas in registration.cpp).
#include <torch/library.h>

#include "all_reduce.h"

namespace gmm_allreduce {
namespace {

void all_reduce(const at::Tensor& t, c10::string_view group_name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "t: expected a contiguous tensor");
  AllReduce sum(resolve_group(std::string(group_name)), t);
  sum.start(t);
  sum.wait();
}

bool shared_memory(c10::string_view group_name) {
  return AllReduce(resolve_group(std::string(group_name)), at::empty({0})).shared_memory();
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_all_reduce_", &all_reduce);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeImplicitAutograd, m) {
  m.impl("_shared_memory", &shared_memory);
}

}  // namespace gmm_allreduce
