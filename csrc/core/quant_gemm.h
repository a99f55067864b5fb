// A quantised call's products and their epilogue (quant.h names the kinds), which both engines
// use: QuantGemm runs a group's rows through the engine's product (QuantProducts), and
// QuantEpilogue, the one home of the dequantisation, turns the product into the output: the
// scales, bias / world_size (an int32 bias into the int32 sums), the weight-only offset, one
// rounding.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>
#include <functional>

#include "core/plan.h"

namespace gmm_allreduce {

class QuantGemm;

// The epilogue of a block of group i's rows (x, [r, k]): out = round(p * row_scale[:, None] *
// col[None, :] + add + row_sum[:, None] * off), in fp32, where col is the weight's scale (none
// for a dequantised product), row_scale x's per-row scale (int8, fp8), add bias_i / world_size,
// and off the weight-only offset times its scale (with x's row sums).
class QuantEpilogue {
 public:
  // Rows [r0, r0 + r) of the group, or the listed `rows` when defined (counted from its first
  // row); `out` [r, n] of any float dtype; bias added with `with_bias`; `dequantised`: the product
  // is x @ the dequantised weight, its scale and offset already in it.
  QuantEpilogue(const QuantGemm& q, size_t i, const at::Tensor& x, int64_t r0,
                const at::Tensor& rows, at::Tensor& out, bool with_bias, bool dequantised);

  // The whole product p ([r, n]: int32 sums, fp32, or x's dtype) into out.
  void apply(at::Tensor p) const;

  // The sums of a kernel that hands them over a block at a time: rows [row, row + rows) and
  // columns [col, col + cols) of the product, element (i, j) at sums[i * ld + j], into the same
  // place of out (a CPU tensor, rows contiguous). Called from several threads for disjoint
  // blocks.
  void sums(int64_t row, int64_t rows, int64_t col, int64_t cols, const int32_t* sums,
            int64_t ld) const;
  void sums(int64_t row, int64_t rows, int64_t col, int64_t cols, const float* sums,
            int64_t ld) const;

 private:
  using RowKernel = void (*)(void*, const void*, float, const float*, const float*, float,
                             const float*, int64_t);
  void sum_rows(RowKernel kernel, int64_t row, int64_t rows, int64_t col, int64_t cols,
                const void* sums, int64_t ld, int64_t sum_bytes) const;

  at::Tensor out_;
  int64_t n_;
  // The terms in fp32 ([n] per column, [r] per row); undefined where they do not apply.
  at::Tensor col_, add_, off_, row_, row_sum_, int_bias_;
  // Their CPU pointers (out on the CPU): ones and zeros in place of a missing column term.
  at::Tensor ones_, zeros_;
  const float *col_p_ = nullptr, *add_p_ = nullptr, *off_p_ = nullptr;
  const float *row_p_ = nullptr, *sum_p_ = nullptr;
  const int32_t* int_bias_p_ = nullptr;
};

// What an engine contributes to quantised calls.
struct QuantProducts {
  // Optional: the engine's own kernel for group i's rows x into out ([r, n]), where it takes them,
  // fused with the epilogue (it hands its sums to QuantEpilogue::sums); an empty function where it
  // does not.
  std::function<void(const QuantEpilogue&)> (*fused)(const QuantGemm& q, size_t i,
                                                     const at::Tensor& x,
                                                     const at::Tensor& out) = nullptr;
  // The product of group i's rows x: int32 (int8), fp32 (fp8, and weight-only from a kernel of
  // the engine's), or x's dtype with `dequantised` set (weight-only, x @ dequantised_weight).
  at::Tensor (*product)(const QuantGemm& q, size_t i, const at::Tensor& x, bool& dequantised);
};

// ATen's products, on any device: int8 through at::_int_mm where cuBLASLt takes the shapes
// (more than 16 rows, K and N multiples of 8), else exact in fp64; fp8 through at::_scaled_mm
// where the shapes are multiples of 16, else fp32; weight-only through the dequantised weight.
at::Tensor aten_product(const QuantGemm& q, size_t i, const at::Tensor& x, bool& dequantised);

// One chunk's quantised products and their epilogue.
class QuantGemm {
 public:
  QuantGemm(const Plan& plan, const OpArgs& args, int64_t world_size,
            const QuantProducts& products);

  // Group i's rows `x` ([r, k]: rows [r0, r0 + r) of the group, or the listed `rows` when defined,
  // counted from the group's first row) through the engine's product and the epilogue, bias_i /
  // world_size added with `with_bias`, rounded once into `out` ([r, n], rows contiguous; of any
  // float dtype).
  void run(size_t i, const at::Tensor& x, int64_t r0, const at::Tensor& rows, at::Tensor& out,
           bool with_bias) const;

  // Group i's weight dequantised, (w + antiquant_offset) * antiquant_scale in `dtype`; kept for
  // the group's next block of rows.
  const at::Tensor& dequantised_weight(size_t i, at::ScalarType dtype) const;

  const Plan& plan() const { return plan_; }
  const OpArgs& args() const { return args_; }
  int64_t world_size() const { return world_size_; }
  const at::Tensor& row_scale() const { return row_scale_; }

 private:
  const Plan& plan_;
  const OpArgs& args_;
  int64_t world_size_;
  const QuantProducts& products_;
  at::Tensor row_scale_;  // per_token_scale in fp32, [M] (int8, fp8)
  mutable size_t dequantised_group_ = SIZE_MAX;
  mutable at::Tensor dequantised_;
};

// The x of a fused expert block's rows (core/mlp.h): group i's listed `rows`, computed by the
// engine.
using BlockX = c10::function_ref<at::Tensor(size_t i, const at::Tensor& rows)>;

// The chunk of a quantised call into `flat`: every group's rows of the chunk a block at a time,
// through QuantGemm, and for a combined call through the combine epilogue; a fused expert block's
// x from `block_x`.
void compute_quantized(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                       const Chunk& chunk, const QuantProducts& products,
                       std::optional<BlockX> block_x = std::nullopt);

}  // namespace gmm_allreduce
