// The CPU's W8A8 int8 GEMM on AVX2, for CPUs without VNNI or AMX (AMD EPYC before Zen 4, Intel
// before Cascade Lake): x [r, k] int8 @ w [k, n] int8, exact in int32, handed to the caller's
// epilogue a block at a time (int8_blocks.h). There torch._int_mm runs a reference loop; this
// kernel widens both operands to int16 and sums pairs of products with vpmaddwd: x once per call;
// the weight, a panel of 16 columns at a time, into int16 pairs in cache (each pair of x,
// broadcast, then meets 16 columns in two instructions), or from a pack made once (prepack.h). A
// few rows in the columns layout widen the weight in registers instead (the panels would cost more
// than the products).
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernels/int8_blocks.h"

namespace gmm_allreduce {

// Whether int8_avx2_gemm takes this pair: the CPU has AVX2 (under GMM_CPU_ISA), both int8 on the
// CPU, x's rows contiguous and the weight in the columns or the rows layout; any k and n.
bool int8_avx2_takes(const at::Tensor& x, const at::Tensor& w);

// x @ w, exact in int32. Requires int8_avx2_takes(x, w).
void int8_avx2_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink);

// The weight [k, n] (int8 on the CPU, any layout) widened once to the int16 pairs that
// int8_avx2_gemm_packed reads: panels of 16 columns, each k-pair's 16 x 2 values adjacent (k and n
// padded with zeros to multiples of 2 and 16).
at::Tensor int8_avx2_pack(const at::Tensor& w);

// Whether int8_avx2_gemm_packed takes x: int8 on the CPU, rows contiguous, AVX2 (under
// GMM_CPU_ISA).
bool int8_avx2_packed_takes(const at::Tensor& x);

// x @ w, exact in int32, from `packed` = int8_avx2_pack(w) of a weight of n columns.
void int8_avx2_gemm_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                           BlockSink<int32_t> sink);

}  // namespace gmm_allreduce
