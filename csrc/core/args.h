// The ops' arguments as one struct, read by name from the dispatcher's stack in one place
// (read_args): the schemas in registration.cpp are the only list of them. Adding an argument
// touches its schema, its field here and the line of read_args that reads it, its check and its
// use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gmm_allreduce {

// Where the summed outputs go: nowhere (the comm-free op: one rank's part), to every rank
// (all-reduce), or by rows, rank r getting the output rows [r * M / n, (r + 1) * M / n) of n ranks
// (reduce-scatter: single-output split modes, M divisible by n). Each has its strategy
// (collective.h).
enum class Collective { kNone, kAllReduce, kReduceScatter };

// The kind of call by its inputs' dtypes (quant.h): float, int8 x and weight (W8A8), fp8 e4m3 x
// and weight (W8A8), float x with int8 weights (weight-only).
enum class Quant : int8_t { kNone, kInt8, kFp8, kWeightInt8 };

// The combine (split_item 2, 3): expert row j (of the groups' rows, in order) is scaled by
// combine_weight[j] (1 when none) and added into token row combine_index[j] of a
// [num_tokens, N] output, with shared_input ([num_tokens, N]) added once; all in fp32.
struct CombineArgs {
  std::optional<at::Tensor> index;   // combine_index
  std::optional<at::Tensor> weight;  // combine_weight
  std::optional<int64_t> num_tokens;
  std::optional<at::Tensor> shared_input;
};

// Quantised inputs (quant.h): per group the weight's per-output-channel scale [N_i] and x's
// per-row scale [M] (all groups' rows, in group order) for int8 and fp8 x; per group the int8
// weight's scale and offset [N_i] for float x (weight-only); the outputs' dtype for int8/fp8 x.
struct QuantArgs {
  std::optional<std::vector<at::Tensor>> scale;
  std::optional<at::Tensor> per_token_scale;
  std::optional<std::vector<at::Tensor>> antiquant_scale;
  std::optional<std::vector<at::Tensor>> antiquant_offset;
  std::optional<at::ScalarType> output_dtype;
};

// The expert block (core/mlp.h): the first layer of an MoE MLP, whose gated activation is the x of
// the call's down product. Its ops take the token rows, the routing and the gate_up weights; the
// driver turns them into a combined call (route_mlp), whose x the engine computes per block of
// expert rows (or the driver, whole, for an engine that does not fuse the block).
enum class Activation : int8_t { kSilu, kGelu, kSwigluOai };

struct MlpArgs {
  std::optional<at::Tensor> hidden;  // hidden_states [T, H]: set for a block's call
  std::vector<at::Tensor> w13;       // per expert [H, 2 * I]: gate columns, then up columns
  std::optional<std::vector<at::Tensor>> w13_bias;  // per expert [2 * I]
  // int8 w13 and w2 (weight-only): w13's per-column scales, per expert [2 * I]; w2's are the
  // down product's QuantArgs::antiquant_scale.
  std::optional<std::vector<at::Tensor>> w13_antiquant_scale;
  // int8 w13 and w2 with int8 activations (W8A8): w13's per-column scales, per expert [2 * I];
  // w2's are the down product's QuantArgs::scale. hidden_states' rows and the activations' are
  // quantised per row (dynamic per-token scales).
  std::optional<std::vector<at::Tensor>> w13_scale;
  std::optional<at::Tensor> topk_ids;      // [T, k]: the expert of each (token, slot), -1 for none
  std::optional<at::Tensor> topk_weights;  // [T, k]
  std::string activation = "silu";
  Activation act = Activation::kSilu;  // activation's value, set by route_mlp
  // Set by route_mlp: whether x is computed by the engine from these (true), or holds the
  // activations already (the driver computed them for an engine that does not fuse the block).
  bool fused = false;
};

// The collective and how it runs.
struct CollectiveArgs {
  Collective kind = Collective::kNone;
  std::string group_name;  // the process group's name (none for kNone)
  std::string reduce_op = "sum";
  int64_t comm_turn = 0;
  bool check_ranks = false;
  bool async_op = false;
  // The dtype of the flat buffer the partials are written into and summed in: none for x's own;
  // float32 keeps 16-bit partials unrounded until the outputs (rounded once, after the sum).
  std::optional<at::ScalarType> reduce_dtype;
  // The group's size (set from the group), or the comm-free op's world_size: each bias is divided
  // by it, and a reduce-scatter's chunks are cut per rank.
  int64_t ranks = 1;
};

struct OpArgs {
  std::vector<at::Tensor> x;
  std::vector<at::Tensor> weight;
  std::optional<std::vector<at::Tensor>> bias;
  std::optional<std::vector<int64_t>> group_list;  // group_list given as Python ints
  std::optional<at::Tensor> group_list_tensor;     // group_list given as a 1-D integer tensor
  int64_t split_item = 0;
  int64_t group_list_type = 0;  // 0: cumulative end offsets along M, 1: per-group counts
  CombineArgs combine;
  QuantArgs quant;
  CollectiveArgs collective;
  MlpArgs mlp;
  // Set by an engine that computes split_item 3 from group_list_tensor on x's device itself
  // (Engine::takes_device_group_list, which checks that the tensor is on the device): make_plan
  // then leaves the tensor's values unread and unvalidated, since reading them would be a
  // device-to-host sync.
  bool keep_group_list_on_device = false;
};

// The arguments of a call of `op` (one of the ops in registration.cpp), read by name from the
// last arguments on `stack` (left there); an argument its schema lacks keeps its default.
OpArgs read_args(const c10::OperatorHandle& op, const torch::jit::Stack& stack);

// Calls the op `name` (gmm_allreduce::name) through the dispatcher with the arguments given by
// name, every other one None; returns its outputs.
std::vector<c10::IValue> call_by_name(
    const char* name, std::initializer_list<std::pair<const char*, c10::IValue>> given);

}  // namespace gmm_allreduce
