// The expert block's backward (core/mlp.h), with no collective: expert by expert, the forward's
// activations recomputed from the gathered rows (nothing [M, 2I] is saved), in the accumulation
// dtype (fp32; fp64 for fp64). For expert row j (token t, weight w, gate_up pre-activation p,
// activation a, this rank's product y = a @ W2 + b2 / n) and the output's gradient g:
//   dy = w * g[t]                 grad W2 += a^T dy      grad b2 += sum dy
//   da = dy @ W2^T                dp = [act'(p_gate) * p_up * da, act(p_gate) * da]
//   grad W13 += h^T dp            grad b13 += sum dp     grad h[t] += dp @ W13^T
//   grad w = <g[t], y>
// grad h and grad w are this rank's parts (its I-slice's), in the accumulation dtype, for the
// autograd glue to sum over the group. The weights' and biases' gradients are the rank's own
// (w2_bias is one parameter replicated on every rank: its gradient is the whole sum, as for the
// grouped products' bias). On a device, the routing's counts are read to the host (one sync).
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "core/mlp.h"

namespace gmm_allreduce {
namespace {

using Grads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                         std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// The gated activation's gradient with respect to pre's gate and up columns, given the
// activation's: [d gate, d up]. A clamp passes the gradient where its input is within its bounds.
at::Tensor gate_backward(const at::Tensor& da, const at::Tensor& pre, Activation act) {
  const int64_t i = pre.size(1) / 2;
  const at::Tensor gate = pre.narrow(1, 0, i), up = pre.narrow(1, i, i);
  switch (act) {
    case Activation::kSilu:
      return at::cat({at::silu_backward(da * up, gate), da * at::silu(gate)}, 1);
    case Activation::kGelu:
      return at::cat({at::gelu_backward(da * up, gate, "tanh"), da * at::gelu(gate, "tanh")}, 1);
    case Activation::kSwigluOai: {
      const at::Tensor g = gate.clamp_max(kSwigluOaiLimit);
      const at::Tensor s = at::sigmoid(g * kSwigluOaiAlpha);
      const at::Tensor u = up.clamp(-kSwigluOaiLimit, kSwigluOaiLimit).add_(1);
      // d/dg (g * sigmoid(alpha g)) = s + alpha g s (1 - s)
      const at::Tensor dglu = s + g * s * (1 - s) * kSwigluOaiAlpha;
      const at::Tensor d_gate = da * u * dglu * gate.le(kSwigluOaiLimit);
      const at::Tensor d_up = da * g * s * up.abs().le(kSwigluOaiLimit);
      return at::cat({d_gate, d_up}, 1);
    }
  }
  TORCH_INTERNAL_ASSERT(false, "gate_backward: unknown activation");
}

Grads grouped_mlp_backward(const at::Tensor& grad, const at::Tensor& hidden, at::TensorList w13,
                           at::TensorList w2, const at::Tensor& topk_ids,
                           const at::Tensor& topk_weights, c10::string_view activation,
                           std::optional<at::TensorList> w13_bias,
                           std::optional<at::TensorList> w2_bias, int64_t world_size,
                           std::array<bool, 5> mask) {
  // The forward's checks, on the forward's arguments (so that the routing below is valid).
  OpArgs args;
  args.mlp.hidden = hidden;
  args.mlp.w13 = w13.vec();
  args.weight = w2.vec();
  if (w13_bias) args.mlp.w13_bias = w13_bias->vec();
  if (w2_bias) args.bias = w2_bias->vec();
  args.mlp.topk_ids = topk_ids;
  args.mlp.topk_weights = topk_weights;
  args.mlp.activation = std::string(activation);
  const Activation act = check_mlp_args(args);

  const at::ScalarType acc = at::toOpMathType(hidden.scalar_type());
  const int64_t experts = static_cast<int64_t>(w13.size());
  const int64_t tokens = hidden.size(0);
  const int64_t inter = w13[0].size(1) / 2;
  const Routing r = route(topk_ids, topk_weights, experts, !topk_ids.is_cpu());
  std::vector<int64_t> counts = r.counts;
  if (r.device_counts.defined()) {  // one sync: the loop below needs the rows per expert
    const at::Tensor host = r.device_counts.to(at::kCPU, at::kLong).contiguous();
    counts.assign(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + experts);
  }
  const at::Tensor kept = r.token.to(hidden.device()).lt(tokens).to(acc);  // 0: a dropped id
  const at::Tensor token = r.token.to(hidden.device()).clamp(0, std::max<int64_t>(tokens - 1, 0));
  const at::Tensor weight = r.weight.to(acc);
  const at::Tensor slot = r.slot.to(hidden.device());
  const at::Tensor g = grad.to(acc);

  at::Tensor d_hidden = at::zeros(hidden.sizes(), hidden.options().dtype(acc));
  at::Tensor d_topk = at::zeros({topk_ids.numel()}, hidden.options().dtype(acc));
  std::vector<at::Tensor> d_w13, d_w2, d_b13, d_b2;
  int64_t first = 0;
  for (const auto e : c10::irange(experts)) {
    const int64_t m = counts[e];
    const at::Tensor tok = token.narrow(0, first, m);
    const at::Tensor w = weight.narrow(0, first, m).unsqueeze(1);
    const at::Tensor h = hidden.index_select(0, tok).to(acc);
    const at::Tensor W13 = w13[e].to(acc), W2 = w2[e].to(acc);
    at::Tensor pre = at::mm(h, W13);
    if (w13_bias) pre.add_((*w13_bias)[e].to(acc));
    const at::Tensor a = gate(pre.clone(), act);
    const at::Tensor gt = g.index_select(0, tok);
    if (mask[4]) {
      at::Tensor y = at::mm(a, W2);
      if (w2_bias) y.add_((*w2_bias)[e].to(acc).div(world_size));
      d_topk.index_add_(0, slot.narrow(0, first, m),
                        gt.mul(y).sum(1).mul_(kept.narrow(0, first, m)));
    }
    const at::Tensor dy = gt.mul(w);
    if (mask[2]) d_w2.push_back(at::mm(a.t(), dy).to(w2[e].scalar_type()));
    if (mask[3] && w2_bias) d_b2.push_back(dy.sum(0).to((*w2_bias)[e].scalar_type()));
    if (mask[0] || mask[1] || mask[3]) {
      const at::Tensor dp = gate_backward(at::mm(dy, W2.t()), pre, act);
      if (mask[1]) d_w13.push_back(at::mm(h.t(), dp).to(w13[e].scalar_type()));
      if (mask[3] && w13_bias) d_b13.push_back(dp.sum(0).to((*w13_bias)[e].scalar_type()));
      if (mask[0]) d_hidden.index_add_(0, tok, at::mm(dp, W13.t()));
    }
    first += m;
  }
  return {mask[0] ? d_hidden : at::empty({0}, hidden.options().dtype(acc)),
          d_w13,
          d_w2,
          d_b13,
          d_b2,
          d_topk.view(topk_ids.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("grouped_mlp_backward", &grouped_mlp_backward);
}

}  // namespace gmm_allreduce
