#include "cpu/quant.h"

#include "cpu/kernels/int8_amx.h"
#include "cpu/kernels/int8_avx2.h"
#include "cpu/kernels/int8_vnni.h"
#include "cpu/kernels/int8_weight.h"
#include "cpu/kernels/isa.h"
#include "cpu/prepack.h"

namespace gmm_allreduce {
namespace {

// The epilogue as the sink a kernel hands its blocks of sums to.
template <typename S>
auto sink(const QuantEpilogue& e) {
  return [&e](int64_t row, int64_t rows, int64_t col, int64_t cols, const S* sums, int64_t ld) {
    e.sums(row, rows, col, cols, sums, ld);
  };
}

// Without VNNI (or AMX) ATen's int8 GEMM is a reference loop: there our AVX2 kernel takes every
// pair it can, from the weight's int16 pairs where it was packed (prepack.h), else from the weight
// itself (columns or rows layout).
bool no_vnni_packed(const at::Tensor& x, const at::Tensor& w) {
  return !cpu_has_vnni() && int8_avx2_packed_takes(x) && find_pack(w).defined();
}
bool no_vnni_unpacked(const at::Tensor& x, const at::Tensor& w) {
  return !cpu_has_vnni() && !find_pack(w).defined() && int8_avx2_takes(x, w);
}

void run_int8_amx(const at::Tensor& x, const at::Tensor& w, const QuantEpilogue& e) {
  int8_amx_gemm(x, w, sink<int32_t>(e));
}
void run_int8_vnni(const at::Tensor& x, const at::Tensor& w, const QuantEpilogue& e) {
  int8_vnni_gemm(x, w, sink<int32_t>(e));
}
void run_int8_avx2_packed(const at::Tensor& x, const at::Tensor& w, const QuantEpilogue& e) {
  int8_avx2_gemm_packed(x, find_pack(w), w.size(1), sink<int32_t>(e));
}
void run_int8_avx2(const at::Tensor& x, const at::Tensor& w, const QuantEpilogue& e) {
  int8_avx2_gemm(x, w, sink<int32_t>(e));
}
void run_weight_amx(const at::Tensor& x, const at::Tensor& w, const QuantEpilogue& e) {
  bf16_int8_amx_gemm(x, w, sink<float>(e));
}

// The kernels fused with the epilogue, in the order they are tried: the first that takes the
// call's kind, rows and pair runs.
struct FusedKernel {
  CpuKernel name;
  Quant quant;
  int64_t min_rows;
  bool (*takes)(const at::Tensor& x, const at::Tensor& w);
  void (*run)(const at::Tensor& x, const at::Tensor& w, const QuantEpilogue& e);
};

constexpr FusedKernel kFusedKernels[] = {
    {CpuKernel::kInt8Amx, Quant::kInt8, 1, &int8_amx_takes, &run_int8_amx},
    {CpuKernel::kInt8Vnni, Quant::kInt8, kInt8VnniMinRows, &int8_vnni_takes, &run_int8_vnni},
    {CpuKernel::kInt8Avx2Packed, Quant::kInt8, 1, &no_vnni_packed, &run_int8_avx2_packed},
    {CpuKernel::kInt8Avx2, Quant::kInt8, 1, &no_vnni_unpacked, &run_int8_avx2},
    {CpuKernel::kWeightAmx, Quant::kWeightInt8, kBf16AmxMinRows, &bf16_int8_amx_takes,
     &run_weight_amx},
};

std::function<void(const QuantEpilogue&)> fused(const QuantGemm& q, size_t i, const at::Tensor& x,
                                                const at::Tensor& out) {
  if (!out.is_cpu() || out.stride(1) != 1) return nullptr;
  const at::Tensor& w = q.args().weight[i];
  for (const FusedKernel& k : kFusedKernels) {
    if (k.quant != q.plan().quant || x.size(0) < k.min_rows || !k.takes(x, w)) continue;
    return [&k, x, w](const QuantEpilogue& e) {
      note_kernel(k.name);
      k.run(x, w, e);
    };
  }
  return nullptr;
}

// The products below the fused kernels.
at::Tensor product(const QuantGemm& q, size_t i, const at::Tensor& x, bool& dequantised) {
  if (!x.is_cpu()) return aten_product(q, i, x, dequantised);  // another device ATen serves
  const at::Tensor& w = q.args().weight[i];
  dequantised = false;
  switch (q.plan().quant) {
    case Quant::kInt8: {
      if (cpu_has_vnni()) {  // VNNI's int32-exact GEMM in ATen, for the rows ours leaves
        note_kernel(CpuKernel::kInt8IntMm);
        return at::_int_mm(x, w);
      }
      // A pair the AVX2 kernel refuses: fp32, exact while k * 2^14 < 2^24, or fp64.
      note_kernel(CpuKernel::kInt8Float);
      const at::ScalarType exact = x.size(1) <= (1 << 10) ? at::kFloat : at::kDouble;
      return at::mm(x.to(exact), w.to(exact));
    }
    case Quant::kFp8:
      // Every tier: an fp32 GEMM of the upcast operands (e4m3 products are exact in fp32), faster
      // than ATen's CPU _scaled_mm (benchmarks/RESULTS.md).
      note_kernel(CpuKernel::kFp8Float);
      return at::mm(x.to(at::kFloat), w.to(at::kFloat));
    default: {  // weight-only
      // A few rows: our AVX-512 or AVX2 kernel reads the int8 weight in place (the scales in the
      // epilogue); more: the weight dequantised once per group and call, and a float GEMM, in fp32
      // where the CPU has no native GEMM of x's dtype (isa.h).
      if (x.size(0) <= kInt8WeightMaxRows && int8_weight_mm_available()) {
        return int8_weight_mm(x, w);
      }
      dequantised = true;
      note_kernel(CpuKernel::kWeightDequant);
      const at::ScalarType gemm = cpu_native_gemm(x.scalar_type()) ? x.scalar_type() : at::kFloat;
      return at::mm(x.to(gemm), q.dequantised_weight(i, gemm));
    }
  }
}

}  // namespace

const QuantProducts kCpuQuantProducts{.fused = &fused, .product = &product};

}  // namespace gmm_allreduce
