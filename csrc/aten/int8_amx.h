// The CPU's int8 GEMM on AMX (the tile registers of Intel Xeon since Sapphire Rapids): x [r, k]
// int8 times an int8 weight [k, n] held in the columns layout ([n, k] rows, as quantize_weights
// returns it), exact in int32. ATen's torch._int_mm takes 1.5-2x its time on a W8A8 expert's
// shapes (benchmarks/RESULTS.md): it reorders the whole weight for every call, where this kernel
// loads the weight's tiles in place and reorders only x.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

namespace gmm_allreduce {

// Whether the CPU has AMX-INT8 and the OS lets this process use its tiles.
bool int8_amx_available();

// Whether int8_amx_mm takes this pair: available, both int8 on the CPU, x's rows contiguous,
// the weight in the columns layout, k a multiple of 64 and n of 16.
bool int8_amx_takes(const at::Tensor& x, const at::Tensor& w);

// Receives the int32 sums of x @ w a block at a time: (row, rows, col, cols, sums, ld) for rows
// [row, row + rows) and columns [col, col + cols), element (i, j) at sums[i * ld + j]. Called
// from several threads at once, for disjoint blocks.
using Int8Sink =
    c10::function_ref<void(int64_t, int64_t, int64_t, int64_t, const int32_t*, int64_t)>;

// x [r, k] @ w [k, n], exact in int32, handed to `sink` block by block, so that the caller's
// epilogue reads the sums while they are in cache. Requires int8_amx_takes(x, w).
void int8_amx_gemm(const at::Tensor& x, const at::Tensor& w, Int8Sink sink);

// x @ w as torch._int_mm computes it: [r, n] int32 (tests).
at::Tensor int8_amx_mm(const at::Tensor& x, const at::Tensor& w);

}  // namespace gmm_allreduce
