// The combine on rows that are already computed, as an op (gmm_allreduce::_combine_rows, the
// front of Ascend's npu_moe_finalize_routing): for each add p,
//   out[token[p]] += weight[p] * (rows[pick[p]] + bias[expert[p]])
// (a pick of -1: no row, the bias alone) plus every addend, in the accumulation dtype (fp32; fp64
// for fp64 rows), rounded once into the rows' dtype. On the CPU through the combine's own row
// kernel (core/combine.h), the adds in order; elsewhere through ATen's gather and index_add.
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "core/combine.h"

namespace gmm_allreduce {
namespace {

void check_index(const char* arg, const at::Tensor& t, int64_t count, int64_t bound,
                 int64_t lowest = 0) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == count, arg, ": expected ", count,
                    " values, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, arg,
                   ": expected int64 or int32, got ", t.scalar_type());
  if (t.is_cpu() && count > 0) {
    const int64_t lo = t.min().item<int64_t>();
    const int64_t hi = t.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= lowest && hi < bound, arg, ": expected values in [", lowest, ", ",
                      bound, "), got values in [", lo, ", ", hi, "]");
  }
}

at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& pick, const at::Tensor& token,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& expert, int64_t num_tokens,
                        at::TensorList addends) {
  TORCH_CHECK_VALUE(rows.dim() == 2, "rows: expected a 2-D tensor, got ", rows.dim(), "-D");
  const int64_t count = pick.numel();
  const int64_t n = rows.size(1);
  const at::ScalarType acc_type = at::toOpMathType(rows.scalar_type());
  check_index("pick", pick, count, rows.size(0), /*lowest=*/-1);
  check_index("token", token, count, num_tokens);
  if (bias) {
    TORCH_CHECK_VALUE(expert.has_value(), "expert: needed with bias");
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(1) == n, "bias: expected [E, ", n,
                      "], got shape ", bias->sizes());
    check_index("expert", *expert, count, bias->size(0));
  }
  if (weight) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == count, "weight: expected ", count,
                      " values, got shape ", weight->sizes());
  }
  const auto opts = rows.options().dtype(acc_type);
  at::Tensor acc = at::zeros({num_tokens, n}, opts);
  const at::Tensor w = weight ? weight->to(opts).contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->to(opts).contiguous() : at::Tensor();
  if (rows.is_cpu()) {
    const at::Tensor p = pick.to(at::kLong).contiguous();
    const at::Tensor t = token.to(at::kLong).contiguous();
    const at::Tensor e = expert ? expert->to(at::kLong).contiguous() : at::Tensor();
    const at::Tensor r = rows.stride(1) == 1 ? rows : rows.contiguous();
    add_rows_into(acc, r,
                  {.count = count,
                   .token = t.const_data_ptr<int64_t>(),
                   .weight = w.defined() ? w.const_data_ptr() : nullptr,
                   .pick = p.const_data_ptr<int64_t>(),
                   .bias = b,
                   .expert = e.defined() ? e.const_data_ptr<int64_t>() : nullptr});
  } else {
    const at::Tensor index = pick.to(at::kLong);
    const at::Tensor kept = index.ge(0).unsqueeze(1);
    at::Tensor picked = rows.index_select(0, index.clamp_min(0)).to(acc_type).mul(kept);
    if (b.defined()) picked = picked.add(b.index_select(0, expert->to(at::kLong)));
    if (w.defined()) picked = picked.mul(w.unsqueeze(1));
    acc.index_add_(0, token.to(at::kLong), picked);
  }
  for (const auto i : c10::irange(addends.size())) {
    TORCH_CHECK_VALUE(addends[i].sizes() == acc.sizes(), "addends[", i, "]: expected shape ",
                      acc.sizes(), ", got ", addends[i].sizes());
    acc.add_(addends[i].to(acc_type));
  }
  return acc.scalar_type() == rows.scalar_type() ? acc : acc.to(rows.scalar_type());
}

// The combine's backward on given rows (expert parallelism's returned rows): each row's gradient
// and, with `rows`, combine_weight's, <dout[combine_index[j]], rows[j]> in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> combine_rows_backward(
    const at::Tensor& grad, const at::Tensor& combine_index,
    const std::optional<at::Tensor>& combine_weight, const std::optional<at::Tensor>& rows) {
  const CombineGrad back = combine_backward(grad, combine_index, combine_weight);
  const at::ScalarType acc = back.kept.scalar_type();
  at::Tensor grad_weight = rows ? back.picked.to(acc).mul(rows->to(acc)).sum(1).mul_(back.kept)
                                : at::empty({0}, back.kept.options());
  return {back.dy, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_combine_rows", &combine_rows);
  m.impl("_combine_rows_backward", &combine_rows_backward);
}

}  // namespace gmm_allreduce
