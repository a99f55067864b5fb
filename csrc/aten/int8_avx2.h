// The CPU's W8A8 int8 GEMM on AVX2, for CPUs without VNNI or AMX (AMD EPYC before Zen 4, Intel
// before Cascade Lake): x [r, k] int8 @ w [k, n] int8 in the columns layout (the transpose of
// [n, k] rows, as quantize_weights returns it), exact in int32, handed to the caller's epilogue a
// block at a time (int8_blocks.h). There torch._int_mm runs a reference loop (15-90x an fp32
// GEMM); this kernel widens both operands to int16 and sums pairs of products with vpmaddwd (16
// multiply-adds an instruction, twice an fp32 FMA's): x once per call, the weight in registers.
#pragma once

#include <ATen/ATen.h>

#include "int8_blocks.h"

namespace gmm_allreduce {

// Whether int8_avx2_gemm takes this pair: the CPU has AVX2 (under GMM_CPU_ISA), both int8 on the
// CPU, x's rows contiguous and the weight in the columns layout; any k and n.
bool int8_avx2_takes(const at::Tensor& x, const at::Tensor& w);

// x @ w, exact in int32. Requires int8_avx2_takes(x, w).
void int8_avx2_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink);

}  // namespace gmm_allreduce
