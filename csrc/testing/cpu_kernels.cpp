// Test-only: the CPU's own AMX kernels called directly, and whether they take a pair, so that
// tests check them over shapes and layouts against ATen, and fail on a host with AMX where the op
// stops taking them.
#include <torch/library.h>

#include "../aten/int8_amx.h"

namespace {

bool amx_takes(const at::Tensor& x, const at::Tensor& w) {
  return gmm_allreduce::int8_amx_takes(x, w) || gmm_allreduce::bf16_int8_amx_takes(x, w);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) {
  m.def("_amx_takes(Tensor x, Tensor w) -> bool");
  m.def("_amx_mm(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_amx_takes", &amx_takes);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) { m.impl("_amx_mm", &gmm_allreduce::amx_mm); }
