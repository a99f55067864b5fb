// Test-only: the expert block's paths that a CPU-only host does not take by itself, so that tests
// check them against the fused CPU path: the device form of the routing (run on host tensors), the
// block composed as on a device that does not fuse it (the driver's gate_up products through the
// comm-free op, then the combined down product), and the few-rows kernel of 16-bit weights.
#include <torch/library.h>

#include "core/mlp.h"
#include "core/op.h"
#include "cpu/engine.h"
#include "cpu/kernels/int8_weight.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_route(const at::Tensor& ids,
                                                                     const at::Tensor& weights,
                                                                     int64_t experts,
                                                                     bool device_form) {
  gmm_allreduce::Routing r = gmm_allreduce::route(ids, weights, experts, device_form);
  const at::Tensor counts = device_form ? r.device_counts : at::tensor(r.counts, at::kLong);
  return {counts, r.slot, r.token, r.weight};
}

at::Tensor grouped_mlp_composed(const at::Tensor& hidden, at::TensorList w13, at::TensorList w2,
                                const at::Tensor& ids, const at::Tensor& weights,
                                c10::string_view activation, std::optional<at::TensorList> w13_bias,
                                std::optional<at::TensorList> w2_bias,
                                std::optional<at::TensorList> w13_antiquant_scale,
                                std::optional<at::TensorList> w2_antiquant_scale) {
  gmm_allreduce::OpArgs args;
  args.mlp.hidden = hidden;
  args.mlp.w13 = w13.vec();
  args.weight = w2.vec();
  if (w13_bias) args.mlp.w13_bias = w13_bias->vec();
  if (w2_bias) args.bias = w2_bias->vec();
  if (w13_antiquant_scale) args.mlp.w13_antiquant_scale = w13_antiquant_scale->vec();
  if (w2_antiquant_scale) args.quant.antiquant_scale = w2_antiquant_scale->vec();
  args.mlp.topk_ids = ids;
  args.mlp.topk_weights = weights;
  args.mlp.activation = std::string(activation);
  gmm_allreduce::Engine unfused = gmm_allreduce::cpu_engine();
  unfused.fuses_mlp = nullptr;
  return gmm_allreduce::run_op(unfused, std::move(args)).front();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) {
  m.def(
      "_mlp_route(Tensor topk_ids, Tensor topk_weights, int experts, bool device_form) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_grouped_mlp_composed(Tensor hidden_states, Tensor[] w13, Tensor[] w2, Tensor topk_ids, "
      "Tensor topk_weights, str activation, Tensor[]? w13_bias, Tensor[]? w2_bias, "
      "Tensor[]? w13_antiquant_scale, Tensor[]? w2_antiquant_scale) -> Tensor");
  m.def("_few_rows_takes(Tensor x, Tensor w) -> bool");
  m.def("_few_rows_mm(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) {
  m.impl("_mlp_route", &mlp_route);
  m.impl("_grouped_mlp_composed", &grouped_mlp_composed);
  m.impl("_few_rows_takes", &gmm_allreduce::few_rows_mm_takes);
  m.impl("_few_rows_mm", &gmm_allreduce::few_rows_mm);
}
