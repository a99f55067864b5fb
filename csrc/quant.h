// Quantised inputs: which kind of quantised call a call is, its checks, and the dequantising
// epilogue of a group's product, which both engines use.
//
// - int8 (W8A8): x and weight int8; y = (x_q @ w_q) * per_token_scale[:, None] * scale_i[None, :],
//   the product exact in int32, dequantised in fp32, rounded once into output_dtype (bf16 unless
//   given).
// - fp8 (e4m3, W8A8): the same with float8_e4m3fn x and weight; the product in fp32.
// - weight-only int8 (A16W8): x fp16/bf16/fp32, weight int8;
//   y = x @ ((w_q + antiquant_offset_i) * antiquant_scale_i), in x's dtype.
// bias_i / world_size is added in fp32 before the rounding, as for any call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "plan.h"

namespace gmm_allreduce {

// The kind of call in words ("int8 x and weight", ...), for messages and the plan's signature.
const char* quant_name(Quant q);

// The kind of call, from x[0]'s and weight[0]'s dtypes (the other tensors are checked against
// them); a TypeError naming the argument for a pair that is none.
Quant quant_kind(const OpArgs& a);

// The dtype every weight must have in a call of this kind with x of dtype `x`.
at::ScalarType weight_dtype(Quant q, at::ScalarType x);

// The outputs' dtype: x's for float and weight-only calls (output_dtype None or x's dtype),
// output_dtype (bf16, fp16 or fp32; bf16 when None) for int8 and fp8 x.
at::ScalarType output_dtype(const OpArgs& a, Quant q);

// Checks scale, per_token_scale, antiquant_scale and antiquant_offset against the kind of call and
// the plan's groups (m and n known, before a combine re-plans the rows): ValueError or TypeError
// naming the argument.
void check_quant_args(const OpArgs& a, const Plan& plan);

// One chunk's quantised products and their epilogue.
class QuantGemm {
 public:
  QuantGemm(const Plan& plan, const OpArgs& args, int64_t world_size);

  // Group i's rows `x` ([r, k]: rows [r0, r0 + r) of the group, or the listed `rows` when defined,
  // counted from the group's first row), dequantised in fp32, bias_i / world_size added with
  // `with_bias`, rounded once into `out` ([r, n], rows contiguous; of any float dtype).
  void run(size_t i, const at::Tensor& x, int64_t r0, const at::Tensor& rows, at::Tensor& out,
           bool with_bias) const;

 private:
  // The product before its epilogue: int32 (int8), fp32 (fp8, and weight-only in our kernel), or
  // x's dtype with `dequantised` set (weight-only, scale and offset already in the weight).
  at::Tensor product(size_t i, const at::Tensor& x, bool& dequantised) const;

  const Plan& plan_;
  const OpArgs& args_;
  int64_t world_size_;
  at::Tensor row_scale_;  // per_token_scale in fp32, [M] (int8, fp8)
  // Weight-only calls above the kernel's rows: the last group's dequantised weight.
  mutable size_t dequantised_group_ = SIZE_MAX;
  mutable at::Tensor dequantised_;
};

// The chunk of a quantised call into `flat`: every group's rows of the chunk a block at a time,
// through QuantGemm, and for a combined call through the combine epilogue.
void compute_quantized(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                       const Chunk& chunk);

}  // namespace gmm_allreduce
