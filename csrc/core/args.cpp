#include "core/args.h"

#include <algorithm>
#include <cstring>

namespace gmm_allreduce {
namespace {

// The call's arguments by name: the value of argument `name`, or nullptr where the op has none.
class Arguments {
 public:
  Arguments(const c10::FunctionSchema& schema, const torch::jit::Stack& stack)
      : schema_(schema), values_(torch::jit::last(stack, schema.arguments().size())) {}

  const c10::IValue* operator()(const char* name) const {
    const std::optional<int> i = schema_.argumentIndexWithName(name);
    return i ? &values_[*i] : nullptr;
  }

 private:
  const c10::FunctionSchema& schema_;
  c10::ArrayRef<c10::IValue> values_;
};

// Each reads a value of the field's type; None (or an argument the op lacks) leaves the field.
bool given(const c10::IValue* v) {
  return v != nullptr && !v->isNone() && !(v->isTensor() && !v->toTensor().defined());
}
void read(const c10::IValue* v, std::vector<at::Tensor>& out) {
  if (given(v)) out = v->toTensorVector();
}
void read(const c10::IValue* v, std::optional<std::vector<at::Tensor>>& out) {
  if (given(v)) out = v->toTensorVector();
}
void read(const c10::IValue* v, std::optional<std::vector<int64_t>>& out) {
  if (given(v)) out = v->toIntVector();
}
void read(const c10::IValue* v, std::optional<at::Tensor>& out) {
  if (given(v)) out = v->toTensor();
}
void read(const c10::IValue* v, int64_t& out) {
  if (given(v)) out = v->toInt();
}
void read(const c10::IValue* v, std::optional<int64_t>& out) {
  if (given(v)) out = v->toInt();
}
void read(const c10::IValue* v, bool& out) {
  if (given(v)) out = v->toBool();
}
void read(const c10::IValue* v, std::string& out) {
  if (given(v)) out = v->toStringRef();
}
void read(const c10::IValue* v, std::optional<at::ScalarType>& out) {
  if (given(v)) out = v->toScalarType();
}

}  // namespace

OpArgs read_args(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const Arguments arg(op.schema(), stack);
  OpArgs a;
  read(arg("x"), a.x);
  read(arg("weight"), a.weight);
  read(arg("bias"), a.bias);
  read(arg("group_list"), a.group_list);
  read(arg("group_list_tensor"), a.group_list_tensor);
  read(arg("split_item"), a.split_item);
  read(arg("group_list_type"), a.group_list_type);
  read(arg("combine_index"), a.combine.index);
  read(arg("combine_weight"), a.combine.weight);
  read(arg("num_tokens"), a.combine.num_tokens);
  read(arg("shared_input"), a.combine.shared_input);
  read(arg("scale"), a.quant.scale);
  read(arg("per_token_scale"), a.quant.per_token_scale);
  read(arg("antiquant_scale"), a.quant.antiquant_scale);
  read(arg("antiquant_offset"), a.quant.antiquant_offset);
  read(arg("output_dtype"), a.quant.output_dtype);
  read(arg("group_name"), a.collective.group_name);
  read(arg("reduce_op"), a.collective.reduce_op);
  read(arg("comm_turn"), a.collective.comm_turn);
  read(arg("check_ranks"), a.collective.check_ranks);
  read(arg("async_op"), a.collective.async_op);
  read(arg("reduce_dtype"), a.collective.reduce_dtype);
  read(arg("world_size"), a.collective.ranks);
  read(arg("hidden_states"), a.mlp.hidden);
  read(arg("w13"), a.mlp.w13);
  read(arg("w2"), a.weight);
  read(arg("w13_bias"), a.mlp.w13_bias);
  read(arg("w2_bias"), a.bias);
  read(arg("topk_ids"), a.mlp.topk_ids);
  read(arg("topk_weights"), a.mlp.topk_weights);
  read(arg("activation"), a.mlp.activation);
  read(arg("w13_antiquant_scale"), a.mlp.w13_antiquant_scale);
  read(arg("w2_antiquant_scale"), a.quant.antiquant_scale);
  read(arg("w13_scale"), a.mlp.w13_scale);
  read(arg("w2_scale"), a.quant.scale);
  return a;
}

std::vector<c10::IValue> call_by_name(
    const char* name, std::initializer_list<std::pair<const char*, c10::IValue>> given) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(
      (std::string("gmm_allreduce::") + name).c_str(), "");
  torch::jit::Stack stack;
  for (const c10::Argument& arg : op.schema().arguments()) {
    const auto* it = std::find_if(given.begin(), given.end(),
                                  [&](const auto& g) { return arg.name() == g.first; });
    stack.push_back(it != given.end() ? it->second : c10::IValue());
  }
  op.callBoxed(stack);
  return stack;
}

}  // namespace gmm_allreduce
