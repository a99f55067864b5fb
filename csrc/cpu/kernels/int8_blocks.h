// What the CPU's int8-weight kernels that feed the epilogue a block at a time (int8_amx.h,
// int8_vnni.h) share: the sink that receives the blocks, and the pairs (x, w) they read. The
// columns layout of a weight [k, n] is the transpose of [n, k] rows (as quantize_weights returns
// it); the rows layout, [k, n] rows.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

namespace gmm_allreduce {

// Receives the sums of x @ w a block at a time: (row, rows, col, cols, sums, ld) for rows
// [row, row + rows) and columns [col, col + cols), element (i, j) at sums[i * ld + j]. Called
// from several threads at once, for disjoint blocks.
template <typename S>
using BlockSink = c10::function_ref<void(int64_t, int64_t, int64_t, int64_t, const S*, int64_t)>;

// The pair's common conditions: 2-D on the CPU, an int8 weight of N a multiple of 16, x's rows
// contiguous and K a multiple of `k_multiple`.
inline bool block_pair_shapes(const at::Tensor& x, const at::Tensor& w, int64_t k_multiple) {
  return x.is_cpu() && w.is_cpu() && w.scalar_type() == at::kChar && x.dim() == 2 && w.dim() == 2 &&
         x.size(1) == w.size(0) && x.size(1) % k_multiple == 0 && w.size(1) % 16 == 0 &&
         x.stride(1) == 1;
}

// The weight [k, n] in the columns layout.
inline bool columns_layout(const at::Tensor& w) {
  return w.stride(0) == 1 && w.stride(1) >= w.size(0);
}

// The weight [k, n] in the rows layout.
inline bool rows_layout(const at::Tensor& w) {
  return w.stride(1) == 1 && w.stride(0) >= w.size(1);
}

}  // namespace gmm_allreduce
