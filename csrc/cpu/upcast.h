// 16-bit GEMMs on a CPU without a native kernel for them (cpu/kernels/isa.h): fp32 GEMMs on
// operands upcast (exactly) by our own loops, a block of rows at a time, and the fp32 sums rounded
// once into the output. Our loops rather than ATen's conversions: at a few thousand elements ATen's
// dispatch of each conversion costs more than the conversion (benchmarks/RESULTS.md, "Figures
// behind the code's thresholds").
#pragma once

#include <ATen/ATen.h>

namespace gmm_allreduce {

// t (2-D, fp16 or bf16) as fp32 in the same layout (rows contiguous, or the transposed view of
// contiguous rows); any other dtype or layout through ATen's conversion. With a `scratch` slot (0
// or 1), up to kScratchFloats elements land in that slot of this thread's scratch, which the next
// upcast into the same slot overwrites: for a weight used and dropped before the next one (an
// expert block keeps its two weights in the two slots).
constexpr int kNoScratch = -1;
at::Tensor upcast(const at::Tensor& t, int scratch = kNoScratch);

// The most elements a scratch slot holds (16 MiB of fp32 a thread, kept once used).
constexpr int64_t kScratchFloats = int64_t{1} << 22;

// y = x @ w (+ bias, fp32) for 16-bit x and w: a few rows through few_rows_mm (the weight read
// once), more as fp32 GEMMs on upcast blocks of x's rows (about 4 MB of fp32 whatever x's size),
// w upcast once; rounded once into y when it is 16-bit, written
// in place when it is fp32 (reduce_dtype float32's buffer). y's rows contiguous.
void upcast_gemm(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);

// x @ w in fp32 for a 16-bit w and x of w's dtype or fp32, a call's groups one after another: a
// few rows (a decode step) through few_rows_mm (cpu/kernels/int8_weight.h), the weight read once;
// more through an fp32 GEMM on x upcast and w upcast once into a scratch slot, kept while the
// next products use the same weight. An int8 w (weight-only) takes its per-column `scale`: a few
// rows through int8_weight_mm, more through w dequantised once in fp32.
class Fp32Products {
 public:
  explicit Fp32Products(int scratch) : scratch_(scratch) {}
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& scale = at::Tensor());

 private:
  int scratch_;
  const c10::TensorImpl* held_ = nullptr;  // the weight w32_ holds
  at::Tensor w32_;
};

}  // namespace gmm_allreduce
