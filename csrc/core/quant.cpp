#include "core/quant.h"

namespace gmm_allreduce {

const char* quant_name(Quant q) {
  switch (q) {
    case Quant::kInt8:
      return "int8 x and weight";
    case Quant::kFp8:
      return "float8_e4m3fn x and weight";
    case Quant::kWeightInt8:
      return "int8 weights with float x";
    default:
      return "float x and weight";
  }
}

Quant quant_kind(const OpArgs& a) {
  const at::ScalarType x = a.x[0].scalar_type();
  const at::ScalarType w = a.weight[0].scalar_type();
  if (x == at::kChar) return Quant::kInt8;
  if (x == at::kFloat8_e4m3fn) return Quant::kFp8;
  TORCH_CHECK_TYPE(
      x == at::kHalf || x == at::kBFloat16 || x == at::kFloat || x == at::kDouble,
      "x[0]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got ", x);
  if (w == at::kChar) {
    TORCH_CHECK_TYPE(x != at::kDouble,
                     "weight[0]: int8 weights take float16, bfloat16 or float32 x, got x of ", x);
    return Quant::kWeightInt8;
  }
  return Quant::kNone;
}

at::ScalarType weight_dtype(Quant q, at::ScalarType x) {
  switch (q) {
    case Quant::kInt8:
    case Quant::kWeightInt8:
      return at::kChar;
    case Quant::kFp8:
      return at::kFloat8_e4m3fn;
    default:
      return x;
  }
}

at::ScalarType output_dtype(const OpArgs& a, Quant q) {
  const at::ScalarType x = a.x[0].scalar_type();
  if (q == Quant::kInt8 || q == Quant::kFp8) {
    const at::ScalarType out = a.quant.output_dtype.value_or(at::kBFloat16);
    TORCH_CHECK_VALUE(out == at::kBFloat16 || out == at::kHalf || out == at::kFloat,
                      "output_dtype: expected None, torch.bfloat16, torch.float16 or "
                      "torch.float32 for ",
                      quant_name(q), ", got ", out);
    return out;
  }
  TORCH_CHECK_VALUE(!a.quant.output_dtype || *a.quant.output_dtype == x,
                    "output_dtype: the outputs of a call of ", quant_name(q),
                    " have x's dtype: expected None or ", x, ", got ", *a.quant.output_dtype);
  return x;
}

}  // namespace gmm_allreduce
