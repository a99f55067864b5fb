// The CPU's GEMM of a few float rows with an int8 weight (a decode step's weight-only call): the
// weight is read once, as int8, and widened in registers, so that the call moves half the bytes of
// a 16-bit GEMM. ATen's _weight_int8pack_mm takes only an [N, K] weight with K a multiple of 16
// (torch 2.13) and is slower at these rows (benchmarks/RESULTS.md).
#pragma once

#include <ATen/ATen.h>

namespace gmm_allreduce {

// Rows of x up to which int8_weight_mm is the CPU's weight-only GEMM (benchmarks/RESULTS.md):
// above it the weight is dequantised once and a 16-bit GEMM runs.
constexpr int64_t kInt8WeightMaxRows = 32;

// Whether int8_weight_mm runs here: an x86-64 CPU with AVX2 (its AVX-512 kernels from tier
// avx512, with bf16 dot products from avx512_bf16; cpu/kernels/isa.h).
bool int8_weight_mm_available();

// x [r, k] (fp16, bf16 or fp32, any strides) times w [k, n] int8 (rows or columns contiguous),
// without scales: [r, n] fp32, each sum over k in fp32.
at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& w);

// The same kernels (their AVX2 form) for a 16-bit weight: a decode step's few rows times a bf16
// or fp16 weight read once and widened in registers, where converting the whole weight to fp32
// for a GEMM would move it three times. Whether they take x and w: an AVX2 CPU, x [r, k] with
// r <= kInt8WeightMaxRows (any float dtype), w [k, n] bf16 or fp16 with rows or columns
// contiguous.
bool few_rows_mm_takes(const at::Tensor& x, const at::Tensor& w);

// x @ w in fp32 (each sum over k in fp32): [r, n] fp32.
at::Tensor few_rows_mm(const at::Tensor& x, const at::Tensor& w);

}  // namespace gmm_allreduce
