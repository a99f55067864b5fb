// The kind of a call by its inputs' dtypes, and the dtypes that kind implies: what the plan
// (plan.cpp checks the quantisation arguments) and the engines read.
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

#include "core/args.h"

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

}  // namespace gmm_allreduce
