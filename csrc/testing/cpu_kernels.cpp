// Test-only: the CPU's own int8 kernels (AMX; VNNI where the CPU has no AMX; AVX2 where it has
// neither, or under GMM_CPU_ISA=avx2) called directly, and whether they take a pair, so that tests
// check them over shapes and layouts against ATen, and fail on a host that has them where the op
// stops taking them.
#include <torch/library.h>

#include <algorithm>

#include "cpu/kernels/int8_amx.h"
#include "cpu/kernels/int8_avx2.h"
#include "cpu/kernels/int8_vnni.h"
#include "cpu/kernels/isa.h"

namespace {

bool amx_takes(const at::Tensor& x, const at::Tensor& w) {
  return gmm_allreduce::int8_amx_takes(x, w) || gmm_allreduce::bf16_int8_amx_takes(x, w);
}

// x @ w through `gemm`, its blocks copied into an [r, n] tensor of sums S.
template <typename S, typename Gemm>
at::Tensor block_mm(const at::Tensor& x, const at::Tensor& w, Gemm gemm) {
  at::Tensor out =
      at::zeros({x.size(0), w.size(1)}, x.options().dtype(c10::CppTypeToScalarType<S>()));
  S* out_p = out.mutable_data_ptr<S>();
  const int64_t n = out.size(1);
  gemm(x, w,
       [out_p, n](int64_t row, int64_t rows, int64_t col, int64_t cols, const S* sums, int64_t ld) {
         for (int64_t i = 0; i < rows; ++i)
           std::copy_n(sums + i * ld, cols, out_p + (row + i) * n + col);
       });
  return out;
}

// int32 sums for int8 x, fp32 for bf16 x.
at::Tensor amx_mm(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kChar ? block_mm<int32_t>(x, w, gmm_allreduce::int8_amx_gemm)
                                      : block_mm<float>(x, w, gmm_allreduce::bf16_int8_amx_gemm);
}

at::Tensor vnni_mm(const at::Tensor& x, const at::Tensor& w) {
  return block_mm<int32_t>(x, w, gmm_allreduce::int8_vnni_gemm);
}

at::Tensor avx2_mm(const at::Tensor& x, const at::Tensor& w) {
  return block_mm<int32_t>(x, w, gmm_allreduce::int8_avx2_gemm);
}

// The same from the weight's pack (made here).
at::Tensor avx2_packed_mm(const at::Tensor& x, const at::Tensor& w) {
  const at::Tensor packed = gmm_allreduce::int8_avx2_pack(w);
  return block_mm<int32_t>(x, w, [&](const at::Tensor& a, const at::Tensor& b, auto sink) {
    gmm_allreduce::int8_avx2_gemm_packed(a, packed, b.size(1), sink);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) {
  m.def("_amx_takes(Tensor x, Tensor w) -> bool");
  m.def("_amx_mm(Tensor x, Tensor w) -> Tensor");
  m.def("_vnni_takes(Tensor x, Tensor w) -> bool");
  m.def("_vnni_mm(Tensor x, Tensor w) -> Tensor");
  m.def("_avx2_int8_takes(Tensor x, Tensor w) -> bool");
  m.def("_avx2_int8_mm(Tensor x, Tensor w) -> Tensor");
  m.def("_avx2_int8_packed_mm(Tensor x, Tensor w) -> Tensor");
  // The CPU products the engine ran since the last call (cpu/kernels/isa.h's CpuKernel names).
  m.def("_cpu_kernels_taken() -> str[]");
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_amx_takes", &amx_takes);
  m.impl("_vnni_takes", &gmm_allreduce::int8_vnni_takes);
  m.impl("_avx2_int8_takes", &gmm_allreduce::int8_avx2_takes);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CatchAll, m) {
  m.impl("_cpu_kernels_taken", &gmm_allreduce::take_noted_kernels);
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) {
  m.impl("_amx_mm", &amx_mm);
  m.impl("_vnni_mm", &vnni_mm);
  m.impl("_avx2_int8_mm", &avx2_mm);
  m.impl("_avx2_int8_packed_mm", &avx2_packed_mm);
}
