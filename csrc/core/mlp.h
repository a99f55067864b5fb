// The expert block (grouped_mlp, grouped_mlp_all_reduce, grouped_mlp_reduce_scatter): an MoE MLP
// in one call, for each token t and slot s with expert e = topk_ids[t, s] (none for -1):
//
//   pre = hidden_states[t] @ w13[e] + w13_bias[e]          gate columns [0, I), up columns [I, 2I)
//   a   = act(pre[:I]) * pre[I:]                             silu, or gelu (tanh form), or
//                                                            swigluoai (below)
//   out[t] += topk_weights[t, s] * (a @ w2[e] + w2_bias[e] / n)
//
// plus shared_input, then the op's collective. It is the down product of a combined call whose x
// is `a`: route_mlp checks the block's arguments (naming them), routes the rows (expert-major, in
// token and slot order within an expert) and fills the call's combine, group_list and down weights.
// An engine that fuses the block (Engine::fuses_mlp: the CPU's) computes `a` a block of expert rows
// at a time from hidden_states and w13 (gated_rows), never holding an [M, 2I] tensor; for any other
// the driver computes `a` whole first (the grouped gate_up product through the comm-free op, then
// the activation) and the engine runs the down product as for any combined call. W8A8 (int8
// weights with w13_scale and w2_scale) runs that way on every engine, hidden_states' rows and `a`'s
// quantised per row on the way (the down product a W8A8 combined call).
#pragma once

#include <ATen/ATen.h>

#include "core/args.h"

namespace gmm_allreduce {

// Whether the call is a block's (its ops set MlpArgs::hidden).
inline bool is_mlp(const OpArgs& a) { return a.mlp.hidden.has_value(); }

// Checks the block's own arguments (MlpArgs, weight = w2, bias = w2_bias; with the reduce-scatter,
// T against args.collective.ranks), naming them; returns the activation.
Activation check_mlp_args(const OpArgs& args);

// The expert rows of a routing, expert-major, within an expert in token then slot order. The host
// form (for a host topk_ids, whose ids it checks: in [-1, E), -1 meaning none) gives `counts` per
// expert; the device form (a device topk_ids, never read on the host) gives `device_counts` on
// the device, the rows of an id outside [0, E) last in the last expert, with weight 0 and token T
// (outside the output).
struct Routing {
  std::vector<int64_t> counts;  // host routing
  at::Tensor device_counts;     // device routing
  at::Tensor slot;              // int64 [M]: each row's (token, slot), as t * k + s
  at::Tensor token;             // int64 [M]: each row's token
  at::Tensor weight;            // [M]: each row's topk weight, in topk_weights' dtype
};
Routing route(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t experts,
              bool device_form);

// Checks the block's arguments (before any communication; args.collective.ranks set) and turns the
// call into its combined down product: x (the activations, or with `fused` an unwritten [M, I]
// tensor that only gives the plan its shape), weight = w2, bias = w2_bias, group_list (the
// routing's counts, on the device for a device topk_ids), combine_index (each row's token),
// combine_weight (its topk weight) and num_tokens.
void route_mlp(OpArgs& args, bool fused);

// gpt-oss's gate ("swigluoai"), on gate columns then up columns (gpt-oss's checkpoints interleave
// them: w13's columns ::2 then 1::2): g = min(gate, limit), u = clamp(up, -limit, limit),
// a = g * sigmoid(alpha * g) * (u + 1).
constexpr double kSwigluOaiAlpha = 1.702;
constexpr double kSwigluOaiLimit = 7.0;

// The gated activation of `pre` ([rows, 2I], any float dtype): act(pre[:, :I]) * pre[:, I:] in the
// accumulation dtype (fp32; fp64 for fp64), written in place into pre's first I columns when pre
// has that dtype (returned as that view), else returned as a new tensor.
at::Tensor gate(const at::Tensor& pre, Activation act);

}  // namespace gmm_allreduce
