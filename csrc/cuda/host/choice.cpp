#include "cuda/host/choice.h"

#include <cstdint>

#include "cuda/host/epilogue.h"

namespace gmm_allreduce {
namespace {

bool strided(const at::Tensor& t) { return t.defined() && t.layout() == at::kStrided; }

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// A 2-D [rows, cols] operand the grouped GEMM reads as it is: row- or column-major, its leading
// stride a multiple of 16 bytes (8 bf16 elements) and no smaller than a row.
bool grouped_ready(at::IntArrayRef sizes, at::IntArrayRef strides) {
  return (strides[1] == 1 && strides[0] >= std::max<int64_t>(1, sizes[1]) && strides[0] % 8 == 0) ||
         (strides[0] == 1 && strides[1] >= std::max<int64_t>(1, sizes[0]) && strides[1] % 8 == 0);
}

// The tiled kernel: 16-bit tensor-core MMA, bf16 from sm_80 on.
bool tiled_takes(at::ScalarType dtype, const GemmDevice& d) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) && d.major >= 8;
}

// Partials kept in fp32 (reduce_dtype float32 for 16-bit x), which the grouped GEMM cannot write.
bool fp32_partials(const OpArgs& a) {
  return a.collective.reduce_dtype && !a.x.empty() &&
         *a.collective.reduce_dtype != a.x[0].scalar_type();
}

// grouped_weight for a rows-on-device plan: its bias epilogue (rows layout) is one launch, so it
// takes at most kMaxLaunchGroups biases; the tiled kernel (bias fused) serves the others.
std::optional<at::Tensor> grouped_rows_weight(const OpArgs& a, const GemmDevice& d) {
  if (d.forced == Gemm::kTiled) return std::nullopt;
  if (a.bias && static_cast<int64_t>(a.bias->size()) > kMaxLaunchGroups) return std::nullopt;
  return grouped_weight(a, d);
}

}  // namespace

Gemm parse_gemm(std::string_view name) {
  if (name.empty() || name == "auto") return Gemm::kAuto;
  if (name == "loop") return Gemm::kLoop;
  if (name == "grouped") return Gemm::kGrouped;
  if (name == "tiled") return Gemm::kTiled;
  TORCH_CHECK_VALUE(false, "GMM_CUDA_GEMM: expected auto, loop, grouped or tiled, got \"", name,
                    "\"");
}

const char* gemm_name(Gemm gemm) {
  switch (gemm) {
    case Gemm::kLoop:
      return "loop";
    case Gemm::kGrouped:
      return "grouped";
    case Gemm::kTiled:
      return "tiled";
    default:
      return "auto";
  }
}

std::optional<at::Tensor> grouped_weight(const OpArgs& a, const GemmDevice& d) {
  if (d.major != 9 && d.major != 10) return std::nullopt;  // the archs torch builds it for
  if (fp32_partials(a)) return std::nullopt;
  if (a.split_item != 1 && a.split_item != 3) return std::nullopt;
  const auto groups = static_cast<int64_t>(a.weight.size());
  if (a.x.size() != 1 || groups == 0 || groups > kMaxGroupedGroups) return std::nullopt;
  const at::Tensor& x = a.x[0];
  if (!strided(x) || x.scalar_type() != at::kBFloat16 || x.dim() != 2) return std::nullopt;
  const int64_t k = x.size(1);
  // x is cut by rows: row-major with 16-byte rows (not a zero row stride, as expand gives), so that
  // every group and chunk starts aligned; its rows are counted in int32.
  if (k == 0 || k % 8 != 0 || x.size(0) > INT32_MAX || x.stride(1) != 1 || x.stride(0) < k ||
      x.stride(0) % 8 != 0)
    return std::nullopt;
  if (x.numel() > 0 && !aligned16(x)) return std::nullopt;
  const at::Tensor& w0 = a.weight[0];
  if (!strided(w0) || w0.dim() != 2 || w0.size(0) != k || w0.size(1) == 0 || w0.size(1) % 8 != 0)
    return std::nullopt;
  if (!grouped_ready(w0.sizes(), w0.strides()) || !aligned16(w0)) return std::nullopt;
  const int64_t elem = static_cast<int64_t>(w0.element_size());
  const auto base = reinterpret_cast<intptr_t>(w0.const_data_ptr());
  int64_t step = 0;  // elements between consecutive weights
  for (int64_t i = 0; i < groups; ++i) {
    const at::Tensor& w = a.weight[i];
    if (!strided(w) || w.device() != x.device() || w.scalar_type() != at::kBFloat16 ||
        w.sizes() != w0.sizes() || w.strides() != w0.strides() ||
        !w.storage().is_alias_of(w0.storage()))
      return std::nullopt;
    const intptr_t bytes = reinterpret_cast<intptr_t>(w.const_data_ptr()) - base;
    if (i == 1) step = bytes / elem;
    if (bytes != i * step * elem) return std::nullopt;
  }
  if (step < 0 || step % 8 != 0) return std::nullopt;
  return w0.as_strided({groups, k, w0.size(1)}, {step, w0.stride(0), w0.stride(1)});
}

bool serves_device_group_list(const OpArgs& a, const GemmDevice& d) {
  if (a.split_item != 3 || !a.group_list_tensor.has_value() || d.forced == Gemm::kLoop)
    return false;
  if (a.x.size() != 1 || !strided(a.x[0]) || a.x[0].dim() != 2 || a.x[0].size(0) > INT32_MAX)
    return false;
  return grouped_rows_weight(a, d).has_value() || tiled_takes(a.x[0].scalar_type(), d);
}

Gemm choose_gemm(const Plan& plan, const OpArgs& a, const GemmDevice& d,
                 std::optional<at::Tensor>& weight3) {
  if (plan.rows_on_device) {  // serves_device_group_list said yes: one of the two serves
    weight3 = grouped_rows_weight(a, d);
    TORCH_INTERNAL_ASSERT(weight3 || tiled_takes(plan.dtype, d));
    return weight3 ? Gemm::kGrouped : Gemm::kTiled;
  }
  switch (d.forced) {
    case Gemm::kLoop:
      return Gemm::kLoop;
    case Gemm::kGrouped:
      weight3 = grouped_weight(a, d);
      return weight3 ? Gemm::kGrouped : Gemm::kLoop;
    case Gemm::kTiled:
      return tiled_takes(plan.dtype, d) ? Gemm::kTiled : Gemm::kLoop;
    default:
      break;
  }
  if (plan.groups.size() <= kLoopMaxGroups) return Gemm::kLoop;
  weight3 = grouped_weight(a, d);
  if (weight3) return Gemm::kGrouped;
  if (!tiled_takes(plan.dtype, d)) return Gemm::kLoop;
  double flops = 0;
  for (const GroupPlan& g : plan.groups) flops += 2.0 * g.m * g.n * g.k;
  return flops / static_cast<double>(plan.groups.size()) <= kTiledMaxGroupFlops ? Gemm::kTiled
                                                                                : Gemm::kLoop;
}

}  // namespace gmm_allreduce
