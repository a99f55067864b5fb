#include "cpu/mlp.h"

#include <ATen/OpMathType.h>

#include "core/mlp.h"

namespace gmm_allreduce {

at::Tensor gated_rows(const Plan& plan, const OpArgs& args, size_t i, const at::Tensor& rows,
                      bool in_fp32, Fp32Products& products) {
  const at::Tensor tokens = args.combine.index->index_select(0, rows.add(plan.groups[i].out_row));
  const at::Tensor h = args.mlp.hidden->index_select(0, tokens);  // [r, H]
  const at::Tensor& w13 = args.mlp.w13[i];
  const bool int8 = w13.scalar_type() == at::kChar;  // weight-only: fp32 products, scaled
  at::Tensor pre = int8      ? products(h, w13, (*args.mlp.w13_antiquant_scale)[i])
                   : in_fp32 ? products(h, w13)
                             : at::mm(h, w13);
  const at::ScalarType acc = at::toOpMathType(plan.dtype);
  if (args.mlp.w13_bias) {
    if (pre.scalar_type() != acc) pre = pre.to(acc);
    pre.add_((*args.mlp.w13_bias)[i].to(acc));
  }
  const at::Tensor a = gate(pre, args.mlp.act);
  return in_fp32 || int8 || a.scalar_type() == plan.dtype ? a : a.to(plan.dtype);
}

}  // namespace gmm_allreduce
