// Test-only: the CPU's own int8 kernel called directly, and whether the op takes it for a pair,
// so that tests check it over shapes and layouts against torch._int_mm, and fail on a host with
// AMX where the op stops taking it.
#include <torch/library.h>

#include "../aten/int8_amx.h"

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) {
  m.def("_int8_amx_takes(Tensor x, Tensor w) -> bool");
  m.def("_int8_amx_mm(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_int8_amx_takes", &gmm_allreduce::int8_amx_takes);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) { m.impl("_int8_amx_mm", &gmm_allreduce::int8_amx_mm); }
