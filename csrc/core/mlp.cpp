#include "core/mlp.h"

#include <ATen/OpMathType.h>
#include <c10/util/irange.h>

#include <limits>
#include <string>
#include <utility>

namespace gmm_allreduce {
namespace {

std::string indexed(const char* arg, size_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
}

Activation parse_activation(const std::string& s) {
  if (s == "silu") return Activation::kSilu;
  if (s == "gelu") return Activation::kGelu;
  if (s == "swigluoai") return Activation::kSwigluOai;
  TORCH_CHECK_VALUE(false, "activation: expected \"silu\" (silu(gate) * up), \"gelu\" ",
                    "(gelu(gate, tanh) * up) or \"swigluoai\" (gpt-oss's clamped gate), got \"", s,
                    "\"");
}

void check_tensor(const std::string& arg, const at::Tensor& t, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(t.defined(), arg, ": expected a tensor, got None");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, arg, ": expected a dense (strided) tensor, got ",
                   "layout ", t.layout());
  TORCH_CHECK_VALUE(t.device() == hidden.device(), arg, ": expected a tensor on ", hidden.device(),
                    " like hidden_states, got one on ", t.device());
}

// A per-expert list of 2-D weights [rows, cols] of `dtype` (hidden's, or int8).
void check_weights(const char* arg, at::TensorList w, const at::Tensor& hidden, size_t experts,
                   int64_t rows, const char* rows_are, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(w.size() == experts, arg, ": expected ", experts,
                    " tensors (one per expert of w13), got ", w.size());
  for (const auto i : c10::irange(w.size())) {
    check_tensor(indexed(arg, i), w[i], hidden);
    TORCH_CHECK_TYPE(w[i].scalar_type() == dtype, indexed(arg, i), ": expected dtype ", dtype,
                     dtype == hidden.scalar_type() ? " like hidden_states" : " like w13[0]",
                     ", got ", w[i].scalar_type());
    TORCH_CHECK_VALUE(w[i].dim() == 2, indexed(arg, i), ": expected a 2-D tensor, got ", w[i].dim(),
                      "-D");
    TORCH_CHECK_VALUE(w[i].size(0) == rows, indexed(arg, i), ": expected ", rows, " rows (",
                      rows_are, "), got ", w[i].size(0));
    TORCH_CHECK_VALUE(w[i].size(1) == w[0].size(1), indexed(arg, i), ": expected ", w[0].size(1),
                      " columns like ", arg, "[0], got ", w[i].size(1));
  }
}

void check_biases(const char* arg, const std::optional<std::vector<at::Tensor>>& bias,
                  const at::Tensor& hidden, size_t experts, int64_t n, const char* n_is) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->size() == experts, arg, ": expected ", experts,
                    " tensors (one per expert), got ", bias->size());
  for (const auto i : c10::irange(bias->size())) {
    const at::Tensor& b = (*bias)[i];
    check_tensor(indexed(arg, i), b, hidden);
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), indexed(arg, i),
                     ": expected a floating-point dtype, got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, indexed(arg, i),
                      ": expected a 1-D tensor of ", n, " values (", n_is, "), got shape ",
                      b.sizes());
  }
}

// The block's own arguments; the rest (shared_input, the collective's) the plan checks.
void check_mlp(const OpArgs& a) {
  const at::Tensor& h = *a.mlp.hidden;
  TORCH_CHECK_TYPE(h.layout() == at::kStrided, "hidden_states: expected a dense (strided) tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(h.scalar_type()),
                   "hidden_states: expected a floating-point dtype (float16, bfloat16, float32, "
                   "float64), got ",
                   h.scalar_type());
  TORCH_CHECK_VALUE(h.dim() == 2, "hidden_states: expected a 2-D tensor [T, H], got ", h.dim(),
                    "-D");
  const std::vector<at::Tensor>& w13 = a.mlp.w13;
  TORCH_CHECK_VALUE(!w13.empty(), "w13: expected at least one expert's weight, got none");
  const size_t experts = w13.size();
  // int8 weights (weight-only) with their scales, or weights of hidden_states' dtype.
  const bool int8 = w13[0].defined() && w13[0].scalar_type() == at::kChar;
  TORCH_CHECK_TYPE(!int8 || h.scalar_type() != at::kDouble,
                   "w13[0]: int8 weights take float16, bfloat16 or float32 hidden_states, got ",
                   h.scalar_type());
  const at::ScalarType w_dtype = int8 ? at::kChar : h.scalar_type();
  check_weights("w13", w13, h, experts, h.size(1), "H, the columns of hidden_states", w_dtype);
  const int64_t two_i = w13[0].size(1);
  TORCH_CHECK_VALUE(two_i % 2 == 0, "w13[0]: expected an even number of columns (the gate's I, ",
                    "then the up's I), got ", two_i);
  check_weights("w2", a.weight, h, experts, two_i / 2, "I, half the columns of w13", w_dtype);
  const int64_t n = a.weight[0].size(1);
  check_biases("w13_bias", a.mlp.w13_bias, h, experts, two_i, "2 * I, the columns of w13");
  check_biases("w2_bias", a.bias, h, experts, n, "the columns of w2");
  // int8 weights: weight-only (antiquant scales) or W8A8 (scales), one of them.
  const bool w8a8 = a.mlp.w13_scale.has_value() || a.quant.scale.has_value();
  for (const auto& [arg, scale, cols, of_w8a8] :
       {std::tuple{"w13_antiquant_scale", &a.mlp.w13_antiquant_scale, int64_t{two_i}, false},
        std::tuple{"w2_antiquant_scale", &a.quant.antiquant_scale, n, false},
        std::tuple{"w13_scale", &a.mlp.w13_scale, int64_t{two_i}, true},
        std::tuple{"w2_scale", &a.quant.scale, n, true}}) {
    TORCH_CHECK_VALUE(!scale->has_value() || int8, arg,
                      ": given for float weights, which it does not apply to");
    TORCH_CHECK_VALUE(!int8 || of_w8a8 != w8a8 || scale->has_value(), arg,
                      of_w8a8 ? ": required with the other W8A8 scale (int8 w13 and w2 with int8 "
                                "activations: their per-column scales)"
                              : ": required for int8 w13 and w2 (their per-column scales)");
    TORCH_CHECK_VALUE(!int8 || of_w8a8 == w8a8 || !scale->has_value(), arg,
                      ": given with W8A8's w13_scale and w2_scale: pass the antiquant scales ",
                      "(weight-only) or the scales (W8A8), not both");
    check_biases(arg, *scale, h, experts, cols, "the columns of its weight");
  }

  const at::Tensor& ids = *a.mlp.topk_ids;
  const at::Tensor& weights = *a.mlp.topk_weights;
  TORCH_CHECK_TYPE(ids.layout() == at::kStrided, "topk_ids: expected a dense (strided) tensor");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "topk_ids: expected an int64 or int32 tensor, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == h.size(0) && ids.size(1) >= 1,
                    "topk_ids: expected a tensor [T, k] with T = ", h.size(0),
                    " (the rows of hidden_states) and k >= 1, got shape ", ids.sizes());
  TORCH_CHECK_VALUE(ids.device().is_cpu() || ids.device() == h.device(),
                    "topk_ids: expected a tensor on cpu or on ", h.device(),
                    " like hidden_states, got one on ", ids.device());
  check_tensor("topk_weights", weights, h);
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()),
                   "topk_weights: expected a floating-point dtype, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.sizes() == ids.sizes(), "topk_weights: expected the shape of topk_ids ",
                    ids.sizes(), ", got ", weights.sizes());
  if (a.collective.kind == Collective::kReduceScatter) {
    TORCH_CHECK_VALUE(h.size(0) % a.collective.ranks == 0, "hidden_states: the output's ",
                      h.size(0), " token rows cannot be scattered evenly over the group's ",
                      a.collective.ranks,
                      " ranks (rank r gets rows [r * T / n, (r + 1) * T / n)); ",
                      "pad T to a multiple of ", a.collective.ranks);
  }
}

// The rows of a host topk_ids, expert-major (a counting sort: within an expert, in token then slot
// order); ids are checked here.
Routing route_on_host(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t experts) {
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t k = ids.size(1);
  Routing r;
  r.counts.assign(experts, 0);
  for (const auto j : c10::irange(ids.numel())) {
    TORCH_CHECK_VALUE(id[j] >= -1 && id[j] < experts, "topk_ids[", j / k, ", ", j % k,
                      "]: expected an expert in [0, ", experts, ") or -1 (none), got ", id[j]);
    if (id[j] >= 0) ++r.counts[id[j]];
  }
  std::vector<int64_t> next(experts, 0);
  int64_t rows = 0;
  for (const auto e : c10::irange(experts)) next[e] = rows, rows += r.counts[e];
  r.slot = at::empty({rows}, at::kLong);
  int64_t* s = r.slot.mutable_data_ptr<int64_t>();
  for (const auto j : c10::irange(ids.numel())) {
    if (id[j] >= 0) s[next[id[j]]++] = j;
  }
  r.token = r.slot.div(k, "floor");
  r.weight = topk_weights.reshape({-1}).index_select(0, r.slot.to(topk_weights.device()));
  return r;
}

// The same on the device, without reading the ids on the host (see route_mlp for the dropped ids).
Routing route_on_device(const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                        int64_t experts) {
  const at::Tensor ids = topk_ids.to(topk_weights.device(), at::kLong).reshape({-1});
  const at::Tensor valid = ids.ge(0).logical_and_(ids.lt(experts));
  // Sorted with the dropped rows after every expert's, counted in the last expert's.
  const at::Tensor order = std::get<1>(at::where(valid, ids, experts).sort(true, 0, false));
  const at::Tensor kept = valid.index_select(0, order);
  const at::Tensor key = at::where(valid, ids, experts - 1);
  Routing r;
  // Counted by an index_add_: at::bincount reads the ids' maximum on the host (a sync).
  r.device_counts = at::zeros({experts}, key.options()).index_add_(0, key, at::ones_like(key));
  r.slot = order;
  r.token = at::where(kept, order.div(topk_ids.size(1), "floor"), topk_ids.size(0));
  r.weight = topk_weights.reshape({-1}).index_select(0, order).mul(kept);
  return r;
}

// The routed rows of hidden_states, expert-major (a dropped row, token T, reads row T - 1).
at::Tensor gathered_rows(const OpArgs& a) {
  return a.mlp.hidden->index_select(
      0, a.combine.index->to(a.mlp.hidden->device()).clamp(0, a.mlp.hidden->size(0) - 1));
}

// The activations of rows x, whole: their gate_up products through the comm-free op (on whichever
// engine serves the device; W8A8: int8 x with its rows' scales, fp32 out), then the gate.
at::Tensor gated(const OpArgs& a, const at::Tensor& x, std::optional<at::Tensor> x_scale) {
  const bool w8a8 = x_scale.has_value();
  const at::Tensor pre =
      call_by_name("grouped_mat_mul",
                   {{"x", std::vector<at::Tensor>{x}},
                    {"weight", a.mlp.w13},
                    {"bias", a.mlp.w13_bias},
                    {"antiquant_scale", a.mlp.w13_antiquant_scale},
                    {"scale", a.mlp.w13_scale},
                    {"per_token_scale", std::move(x_scale)},
                    {"output_dtype", w8a8 ? c10::IValue(at::kFloat) : c10::IValue()},
                    {"group_list", a.group_list},
                    {"group_list_tensor", a.group_list_tensor},
                    {"split_item", 3},
                    {"group_list_type", 1},
                    {"world_size", 1}})[0]
          .toTensorVector()[0];
  return gate(pre, a.mlp.act);
}

// Rows of t quantised to int8 with a scale each (dynamic per-token quantisation): s = max |row| /
// 127 (in fp32), q = round(row / s); a zero row gets scale 0 and zeros.
std::pair<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& t) {
  const at::Tensor f = t.to(at::kFloat);
  const at::Tensor s = f.abs().amax({1}).div_(127);
  const at::Tensor q = f.div(s.clamp_min(std::numeric_limits<float>::min()).unsqueeze(1))
                           .round_()
                           .clamp_(-127, 127)
                           .to(at::kChar);
  return {q, s};
}

// The x of the down product, whole: the activations in hidden_states' dtype; W8A8: the gathered
// rows and then the activations (in fp32) quantised per row, the down product a W8A8 combined call
// with those rows' scales and hidden_states' dtype out.
void activations(OpArgs& a) {
  const at::Tensor rows = gathered_rows(a);
  if (!a.mlp.w13_scale) {
    a.x = {gated(a, rows, std::nullopt).to(rows.scalar_type())};
    return;
  }
  const auto [xq, xs] = quantize_rows(rows);
  const auto [aq, as] = quantize_rows(gated(a, xq, xs));
  a.x = {aq};
  a.quant.per_token_scale = as;
  a.quant.output_dtype = a.mlp.hidden->scalar_type();
}

}  // namespace

Activation check_mlp_args(const OpArgs& a) {
  check_mlp(a);
  return parse_activation(a.mlp.activation);
}

Routing route(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t experts,
              bool device_form) {
  return device_form ? route_on_device(topk_ids, topk_weights, experts)
                     : route_on_host(topk_ids, topk_weights, experts);
}

at::Tensor gate(const at::Tensor& pre, Activation act) {
  const int64_t i = pre.size(1) / 2;
  const at::ScalarType acc = at::toOpMathType(pre.scalar_type());
  const bool in_place = pre.scalar_type() == acc;
  at::Tensor g = in_place ? pre.narrow(1, 0, i) : pre.narrow(1, 0, i).to(acc);
  const at::Tensor up = pre.narrow(1, i, i);
  switch (act) {
    case Activation::kSilu:
      return at::silu_(g).mul_(up);
    case Activation::kGelu:
      return at::gelu_(g, "tanh").mul_(up);
    case Activation::kSwigluOai:  // g * sigmoid(alpha g) * (u + 1), g and u clamped
      g.clamp_max_(kSwigluOaiLimit);
      g.mul_(at::sigmoid(g * kSwigluOaiAlpha));
      return g.mul_(up.clamp(-kSwigluOaiLimit, kSwigluOaiLimit).add_(1));
  }
  TORCH_INTERNAL_ASSERT(false, "gate: unknown activation");
}

void route_mlp(OpArgs& a, bool fused) {
  a.mlp.act = check_mlp_args(a);
  const at::Tensor& h = *a.mlp.hidden;
  const int64_t experts = static_cast<int64_t>(a.mlp.w13.size());
  const int64_t inter = a.mlp.w13[0].size(1) / 2;
  Routing r = route(*a.mlp.topk_ids, *a.mlp.topk_weights, experts, !a.mlp.topk_ids->is_cpu());
  const int64_t rows = r.token.numel();
  if (r.device_counts.defined()) {
    a.group_list_tensor = r.device_counts;
  } else {
    a.group_list = std::move(r.counts);
  }
  a.combine.index = r.token.to(h.device());
  a.combine.weight = r.weight;
  a.split_item = 3;
  a.group_list_type = 1;
  a.combine.num_tokens = h.size(0);
  // Fused: x only gives the plan its shape (its pages are never touched); else the activations.
  // W8A8 is composed on every engine.
  a.mlp.fused = fused && !a.mlp.w13_scale;
  if (!a.mlp.fused) return activations(a);
  a.x = {at::empty({rows, inter}, h.options())};
}

}  // namespace gmm_allreduce
