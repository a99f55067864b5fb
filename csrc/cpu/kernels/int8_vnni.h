// The CPU's W8A8 int8 GEMM on AVX512-VNNI, for CPUs without AMX (AMD Zen 4 and 5, Intel before
// Sapphire Rapids): x [r, k] int8 @ w [k, n] int8 in the columns layout (the transpose of [n, k]
// rows, as quantize_weights returns it), exact in int32, handed to the caller's epilogue a block
// at a time (int8_blocks.h). ATen's torch._int_mm reorders the whole weight on every
// call; this kernel reads the weight in place, 4 bytes of a column at a time broadcast against 16
// rows of x (reordered once per call, as unsigned bytes: VNNI multiplies unsigned by signed
// bytes, so that x + 128 is multiplied and 128 times each column's sum taken off).
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernels/int8_blocks.h"

namespace gmm_allreduce {

// Whether int8_vnni_gemm takes this pair: the CPU has AVX512-VNNI (with F, BW, VL), both int8,
// x's rows contiguous, the weight in the columns layout, k a multiple of 4 and n of 16.
bool int8_vnni_takes(const at::Tensor& x, const at::Tensor& w);

// Rows of x from which int8_vnni_gemm serves W8A8 calls: its cost is per panel of 16 rows, so
// that below it torch._int_mm is faster (the crossing measured: benchmarks/RESULTS.md).
constexpr int64_t kInt8VnniMinRows = 9;

// x @ w, exact in int32. Requires int8_vnni_takes(x, w).
void int8_vnni_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink);

}  // namespace gmm_allreduce
