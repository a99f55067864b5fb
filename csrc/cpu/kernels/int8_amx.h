// The CPU's GEMMs with an int8 weight on AMX (the tile registers of Intel Xeon since Sapphire
// Rapids), in the layouts of int8_blocks.h.
// - int8 x (W8A8): x [r, k] int8 @ w [k, n] int8 in the columns layout, exact in int32. ATen's
//   torch._int_mm is slower on a W8A8 expert's shapes (benchmarks/RESULTS.md): it
//   reorders the whole weight on every call, where this kernel loads the weight's tiles in place
//   and reorders x;
// - bf16 x (weight-only): x [r, k] bf16 @ w [k, n] int8 in the columns or the rows layout, the
//   weight widened to bf16 (exact) a tile at a time in cache, sums in fp32: the int8 weight is
//   read once, and the products run on the tiles rather than on AVX-512 FMAs.
// Both hand their sums to the caller a block at a time, so that its epilogue reads them in cache.
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernels/int8_blocks.h"

namespace gmm_allreduce {

// Whether int8_amx_gemm takes this pair: the CPU has AMX-INT8 and the OS lets this process use
// it, both int8, x's rows contiguous, the weight in the columns layout, k a multiple of 64 and n
// of 16.
bool int8_amx_takes(const at::Tensor& x, const at::Tensor& w);

// x @ w, exact in int32. Requires int8_amx_takes(x, w).
void int8_amx_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink);

// Whether bf16_int8_amx_gemm takes this pair: AMX-BF16 and AVX512-BF16, x bf16 with its rows
// contiguous, the weight int8 in the columns or the rows layout, k a multiple of 32 and n of 16.
bool bf16_int8_amx_takes(const at::Tensor& x, const at::Tensor& w);

// Rows of x from which bf16_int8_amx_gemm serves weight-only calls: its widening of the weight
// costs the same for any rows, so that below this the AVX-512 kernel (int8_weight.h) is faster
// (the crossing measured: benchmarks/RESULTS.md).
constexpr int64_t kBf16AmxMinRows = 5;

// x @ w, sums in fp32. Requires bf16_int8_amx_takes(x, w). Each 32 rows of x widen the weight
// once more; still, at 48 to 256 rows per group it takes 0.4-0.7 of the time of dequantising the
// weight once and running ATen's bf16 GEMM (benchmarks/RESULTS.md).
void bf16_int8_amx_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<float> sink);

}  // namespace gmm_allreduce
