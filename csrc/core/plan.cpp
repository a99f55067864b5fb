#include "core/plan.h"

#include <ATen/TensorUtils.h>
#include <c10/util/irange.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <sstream>

#include "core/quant.h"

namespace gmm_allreduce {
namespace {

std::string name(const char* arg, size_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
}

// Whether the plan leaves split_item 3's group rows unread (see OpArgs::keep_group_list_on_device).
bool rows_stay_on_device(const OpArgs& a) {
  return a.keep_group_list_on_device && a.split_item == 3 && a.group_list_tensor.has_value();
}

// Largest operand ATen's matmul may be left to copy behind the caller's back; past it the caller is
// asked to make the copy explicit.
constexpr int64_t kMaxHiddenCopyBytes = int64_t{64} << 20;

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(a, b, &out), what, ": ", a, " * ", b,
                    " overflows int64: the call is too large");
  return out;
}

int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!c10::add_overflows(a, b, &out), what, ": ", a, " + ", b,
                    " overflows int64: the call is too large");
  return out;
}

// Whether ATen's matmul takes the 2-D operand t as it is: one unit stride, the other spanning a
// row (the test of ATen's CPU addmm); otherwise it copies t first.
bool matmul_ready(at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto spans = [](int64_t stride, int64_t size) { return stride >= std::max<int64_t>(1, size); };
  return (strides[1] == 1 && (sizes[0] == 1 || spans(strides[0], sizes[1]))) ||
         (strides[0] == 1 && (sizes[1] == 1 || spans(strides[1], sizes[0])));
}

// Accepts any strided operand that a matmul can read as [rows, cols], copying small ones; rejects
// one whose copy would be hidden and large.
void check_operand_layout(const std::string& arg, const at::Tensor& t, int64_t rows, int64_t cols) {
  if (t.numel() == 0) return;
  const std::vector<int64_t> shape{rows, cols};
  const std::optional<std::vector<int64_t>> strides =
      at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef(shape));
  if (strides && matmul_ready(shape, *strides)) return;
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  TORCH_CHECK_VALUE(bytes <= kMaxHiddenCopyBytes, arg, ": its strides ", t.strides(), " (sizes ",
                    t.sizes(), ") let no matmul read it as [", rows, ", ", cols,
                    "] without copying it (", bytes >> 20, " MiB); pass ", arg,
                    ".contiguous() to make that copy explicit");
}

void check_scalars(const OpArgs& a) {
  TORCH_CHECK_VALUE(a.split_item >= 0 && a.split_item <= 3,
                    "split_item: expected 0, 1, 2 or 3, got ", a.split_item);
  TORCH_CHECK_VALUE(a.collective.reduce_op == "sum", "reduce_op: only \"sum\" is supported, got \"",
                    a.collective.reduce_op, "\"");
  TORCH_CHECK_VALUE(a.collective.comm_turn >= 0, "comm_turn: expected an integer >= 0, got ",
                    a.collective.comm_turn);
  TORCH_CHECK_VALUE(a.group_list_type == 0 || a.group_list_type == 1,
                    "group_list_type: expected 0 (cumulative offsets) or 1 (counts), got ",
                    a.group_list_type);
  TORCH_CHECK_VALUE(!a.collective.reduce_dtype || *a.collective.reduce_dtype == at::kFloat,
                    "reduce_dtype: expected None or torch.float32, got ",
                    *a.collective.reduce_dtype);
}

void check_tensor_list(const char* arg, at::TensorList list) {
  TORCH_CHECK_VALUE(!list.empty(), arg, ": expected at least one tensor, got an empty list");
  for (const auto i : c10::irange(list.size())) {
    TORCH_CHECK_VALUE(list[i].defined(), name(arg, i), ": expected a tensor, got None");
    TORCH_CHECK_TYPE(list[i].layout() == at::kStrided, name(arg, i),
                     ": expected a dense (strided) tensor, got layout ", list[i].layout());
  }
}

// dtype and device of every tensor against x[0]'s (and weight[0]'s, for int8 weights).
void check_dtypes_and_devices(const OpArgs& a, Quant q) {
  const at::Tensor& ref = a.x[0];
  const at::ScalarType w_dtype = weight_dtype(q, ref.scalar_type());
  auto check = [&](const char* arg, at::TensorList list, std::optional<at::ScalarType> dtype) {
    for (const auto i : c10::irange(list.size())) {
      const at::Tensor& t = list[i];
      if (dtype) {
        TORCH_CHECK_TYPE(t.scalar_type() == *dtype, name(arg, i), ": expected dtype ", *dtype,
                         " like ", *dtype == ref.scalar_type() ? "x[0]" : "weight[0]", ", got ",
                         t.scalar_type());
      } else if (q == Quant::kInt8) {  // a bias: float, or int32 (added before dequantising)
        TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) || t.scalar_type() == at::kInt,
                         name(arg, i), ": expected a floating-point dtype or int32, got ",
                         t.scalar_type());
      } else {
        TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name(arg, i),
                         ": expected a floating-point dtype, got ", t.scalar_type());
      }
      TORCH_CHECK_VALUE(t.device() == ref.device(), name(arg, i), ": expected a tensor on ",
                        ref.device(), " like x[0], got one on ", t.device());
    }
  };
  check("x", a.x, ref.scalar_type());
  check("weight", a.weight, w_dtype);
  if (a.bias) check("bias", *a.bias, std::nullopt);
}

void check_list_counts(const OpArgs& a, size_t groups) {
  if (single_x(a.split_item)) {
    TORCH_CHECK_VALUE(a.x.size() == 1, "x: expected a single tensor for split_item=", a.split_item,
                      " (its rows are cut by group_list), got ", a.x.size());
  } else {
    TORCH_CHECK_VALUE(a.x.size() == groups, "x: expected ", groups,
                      " tensors (one per weight) for split_item=", a.split_item, ", got ",
                      a.x.size());
  }
  if (a.bias) {
    TORCH_CHECK_VALUE(a.bias->size() == groups, "bias: expected ", groups,
                      " tensors (one per weight), got ", a.bias->size());
  }
  const bool given = a.group_list.has_value() || a.group_list_tensor.has_value();
  if (single_x(a.split_item)) {
    TORCH_CHECK_VALUE(given, "group_list: required for split_item=", a.split_item,
                      " (it cuts the rows of x into groups)");
  } else {
    TORCH_CHECK_VALUE(!given, "group_list: must not be given for split_item=", a.split_item,
                      " (each tensor of x is one group)");
  }
}

// What can be checked of a group_list tensor without reading its values.
void check_group_list_tensor(const OpArgs& a) {
  const at::Tensor& t = *a.group_list_tensor;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                   "group_list: expected an int64 or int32 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "group_list: expected a 1-D tensor, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == a.x[0].device(),
                    "group_list: expected a tensor on cpu or on ", a.x[0].device(),
                    " like x[0], got one on ", t.device());
}

// group_list as host int64 values, whichever form it came in.
std::vector<int64_t> group_list_values(const OpArgs& a) {
  if (a.group_list) return *a.group_list;
  check_group_list_tensor(a);
  const at::Tensor& t = *a.group_list_tensor;
  at::Tensor host = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

// Row counts per group from group_list (split_item 1 and 3).
std::vector<int64_t> rows_from_group_list(const OpArgs& a, size_t groups, int64_t total_rows) {
  const std::vector<int64_t> v = group_list_values(a);
  TORCH_CHECK_VALUE(v.size() == groups, "group_list: expected ", groups,
                    " values (one per weight), got ", v.size());
  std::vector<int64_t> rows(groups);
  int64_t sum = 0;
  for (const auto i : c10::irange(groups)) {
    TORCH_CHECK_VALUE(v[i] >= 0, name("group_list", i), ": expected a value >= 0, got ", v[i]);
    if (a.group_list_type == 0) {
      const int64_t prev = i == 0 ? 0 : v[i - 1];
      TORCH_CHECK_VALUE(v[i] >= prev, name("group_list", i),
                        ": cumulative offsets must not decrease, got ", v[i], " after ", prev);
      rows[i] = v[i] - prev;
    } else {
      rows[i] = v[i];
    }
    sum = checked_add(sum, rows[i], "group_list: the sum of the counts");
  }
  if (a.group_list_type == 0) {
    TORCH_CHECK_VALUE(v.back() == total_rows,
                      "group_list: the last cumulative offset must equal x[0].shape[0] = ",
                      total_rows, ", got ", v.back());
  } else {
    TORCH_CHECK_VALUE(sum == total_rows,
                      "group_list: counts must sum to x[0].shape[0] = ", total_rows, ", got ", sum);
  }
  return rows;
}

// m and k of each group from x (and group_list); x's rank is checked here.
void fill_mk(const OpArgs& a, std::vector<GroupPlan>& groups) {
  if (single_x(a.split_item)) {
    const at::Tensor& x = a.x[0];
    TORCH_CHECK_VALUE(x.dim() == 2, "x[0]: expected a 2-D tensor for split_item=", a.split_item,
                      ", got ", x.dim(), "-D");
    check_operand_layout("x[0]", x, x.size(0), x.size(1));
    if (rows_stay_on_device(a)) {  // m and the row offsets stay on the device
      check_group_list_tensor(a);
      TORCH_CHECK_VALUE(a.group_list_tensor->numel() == static_cast<int64_t>(groups.size()),
                        "group_list: expected ", groups.size(), " values (one per weight), got ",
                        a.group_list_tensor->numel());
      for (GroupPlan& g : groups) g.k = x.size(1);
      return;
    }
    const std::vector<int64_t> rows = rows_from_group_list(a, groups.size(), x.size(0));
    int64_t row = 0;
    for (const auto i : c10::irange(groups.size())) {
      groups[i].m = rows[i];
      groups[i].k = x.size(1);
      groups[i].x_row = row;
      row += rows[i];
    }
    return;
  }
  const int64_t max_dim = a.split_item == 0 ? 5 : 2;
  for (const auto i : c10::irange(groups.size())) {
    const at::Tensor& x = a.x[i];
    if (max_dim == 2) {
      TORCH_CHECK_VALUE(x.dim() == 2, name("x", i),
                        ": expected a 2-D tensor for split_item=", a.split_item, ", got ", x.dim(),
                        "-D");
    } else {
      TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= max_dim, name("x", i),
                        ": expected a tensor of 2 to 5 dims for split_item=0, got ", x.dim(), "-D");
    }
    int64_t m = 1;
    for (const auto d : c10::irange(x.dim() - 1)) {
      m = checked_mul(m, x.size(d), name("x", i) + ": the product of the leading dims");
    }
    groups[i].m = m;
    groups[i].k = x.size(-1);
    check_operand_layout(name("x", i), x, m, groups[i].k);
  }
}

void fill_n_and_check_weights(const OpArgs& a, std::vector<GroupPlan>& groups) {
  for (const auto i : c10::irange(groups.size())) {
    const at::Tensor& w = a.weight[i];
    TORCH_CHECK_VALUE(w.dim() == 2, name("weight", i), ": expected a 2-D tensor [K, N], got ",
                      w.dim(), "-D");
    const std::string x_name = single_x(a.split_item) ? "x[0]" : name("x", i);
    TORCH_CHECK_VALUE(w.size(0) == groups[i].k, name("weight", i), ": expected ", groups[i].k,
                      " rows (K, the last dim of ", x_name, "), got ", w.size(0));
    groups[i].n = w.size(1);
    check_operand_layout(name("weight", i), w, groups[i].k, groups[i].n);
    if (single_y(a.split_item)) {
      TORCH_CHECK_VALUE(groups[i].n == groups[0].n, name("weight", i),
                        ": expected N = ", groups[0].n,
                        " like weight[0], since split_item=", a.split_item,
                        " returns one tensor; got ", groups[i].n);
    }
    if (a.bias) {
      const at::Tensor& b = (*a.bias)[i];
      TORCH_CHECK_VALUE(b.dim() == 1, name("bias", i), ": expected a 1-D tensor, got ", b.dim(),
                        "-D");
      TORCH_CHECK_VALUE(b.size(0) == groups[i].n, name("bias", i), ": expected length ",
                        groups[i].n, " (N of ", name("weight", i), "), got ", b.size(0));
    }
  }
}

void fill_layout(const OpArgs& a, Plan& plan) {
  int64_t offset = 0;
  int64_t total_rows = 0;
  for (const auto i : c10::irange(plan.groups.size())) {
    GroupPlan& g = plan.groups[i];
    g.out_offset = offset;
    g.out_row = total_rows;
    const std::string what = "output of group " + std::to_string(i);
    offset = checked_add(offset, checked_mul(g.m, g.n, what), what);
    total_rows = checked_add(total_rows, g.m, what);
    if (plan.single_y) continue;
    if (a.split_item == 0) {
      std::vector<int64_t> shape = a.x[i].sizes().vec();
      shape.back() = g.n;
      plan.out_shapes.push_back(std::move(shape));
    } else {
      plan.out_shapes.push_back({g.m, g.n});
    }
  }
  if (plan.rows_on_device) {  // one [M, N] block: the groups' places in it are on the device
    total_rows = a.x[0].size(0);
    offset = checked_mul(total_rows, plan.groups[0].n, "output");
  }
  if (plan.single_y) plan.out_shapes.push_back({total_rows, plan.groups[0].n});
  plan.numel = offset;
  plan.rows = total_rows;
}

// A list of one 1-D floating tensor [n_i] per group, on x's device.
void check_per_group(const char* arg, at::TensorList list, const Plan& plan) {
  TORCH_CHECK_VALUE(list.size() == plan.groups.size(), arg, ": expected ", plan.groups.size(),
                    " tensors (one per weight), got ", list.size());
  for (const auto i : c10::irange(list.size())) {
    const at::Tensor& t = list[i];
    TORCH_CHECK_VALUE(t.defined(), name(arg, i), ": expected a tensor, got None");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name(arg, i),
                     ": expected a floating-point dtype, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, name(arg, i), ": expected a dense tensor");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == plan.groups[i].n, name(arg, i),
                      ": expected a 1-D tensor of ", plan.groups[i].n, " values (N of ",
                      name("weight", i), "), got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == plan.device, name(arg, i), ": expected a tensor on ",
                      plan.device, " like x[0], got one on ", t.device());
  }
}

// Given only for `wanted` kinds of call.
void check_given_for(const char* arg, bool given, bool wanted, Quant q) {
  TORCH_CHECK_VALUE(!given || wanted, arg, ": given for a call of ", quant_name(q),
                    ", which it does not apply to");
}

// scale, per_token_scale, antiquant_scale and antiquant_offset against the kind of call and the
// plan's groups (m and n known, before a combine re-plans the rows).
void check_quant_args(const OpArgs& a, const Plan& plan) {
  const Quant q = plan.quant;
  const bool w8a8 = q == Quant::kInt8 || q == Quant::kFp8;
  const bool weight_only = q == Quant::kWeightInt8;
  check_given_for("scale", a.quant.scale.has_value(), w8a8, q);
  check_given_for("per_token_scale", a.quant.per_token_scale.has_value(), w8a8, q);
  check_given_for("antiquant_scale", a.quant.antiquant_scale.has_value(), weight_only, q);
  check_given_for("antiquant_offset", a.quant.antiquant_offset.has_value(), weight_only, q);
  if (w8a8) {
    TORCH_CHECK_VALUE(a.quant.scale.has_value(), "scale: required for ", quant_name(q),
                      " (the weights' per-output-channel dequantisation scales, [N_i] per group)");
    TORCH_CHECK_VALUE(a.quant.per_token_scale.has_value(), "per_token_scale: required for ",
                      quant_name(q), " (x's per-row dequantisation scales, [M])");
    check_per_group("scale", *a.quant.scale, plan);
    const at::Tensor& t = *a.quant.per_token_scale;
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                     "per_token_scale: expected a floating-point dtype, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "per_token_scale: expected a dense tensor");
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.size(0) == plan.rows, "per_token_scale: expected a 1-D tensor of ",
        plan.rows, " values (one per row of x, all groups' rows in order), got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == plan.device, "per_token_scale: expected a tensor on ",
                      plan.device, " like x[0], got one on ", t.device());
  }
  if (a.bias && q == Quant::kInt8) {
    const auto is_int = [](const at::Tensor& b) { return b.scalar_type() == at::kInt; };
    const bool any_int = std::any_of(a.bias->begin(), a.bias->end(), is_int);
    TORCH_CHECK_TYPE(!any_int || std::all_of(a.bias->begin(), a.bias->end(), is_int),
                     "bias: expected every tensor int32 (added to the int32 sums) or every one "
                     "floating-point (added after dequantisation), got both");
    TORCH_CHECK_VALUE(!any_int || !a.combine.index,
                      "bias: an int32 bias is not supported with combine_index; pass it as a "
                      "float bias, times scale, or combine after the call");
    TORCH_CHECK_VALUE(!any_int || a.collective.ranks == 1,
                      "bias: an int32 bias joins the int32 sums whole, which a rank's share "
                      "(bias / n) of it would not: it takes one rank (world size 1), got ",
                      a.collective.ranks);
  }
  if (weight_only) {
    TORCH_CHECK_VALUE(a.quant.antiquant_scale.has_value(), "antiquant_scale: required for ",
                      quant_name(q), " (the weights' per-output-channel scales, [N_i] per group)");
    check_per_group("antiquant_scale", *a.quant.antiquant_scale, plan);
    if (a.quant.antiquant_offset)
      check_per_group("antiquant_offset", *a.quant.antiquant_offset, plan);
  }
}

// The combine's arguments, after the groups' rows are known (plan.rows are the expert rows M);
// the plan then describes the [num_tokens, N] combined output.
void plan_combine(const OpArgs& a, Plan& plan) {
  if (!a.combine.index) {
    TORCH_CHECK_VALUE(!a.combine.weight, "combine_weight: given without combine_index");
    TORCH_CHECK_VALUE(!a.combine.shared_input, "shared_input: given without combine_index");
    TORCH_CHECK_VALUE(!a.combine.num_tokens, "num_tokens: given without combine_index");
    return;
  }
  const at::Device device = a.x[0].device();
  TORCH_CHECK_VALUE(plan.single_y,
                    "combine_index: the combine sums expert rows into token rows of "
                    "one output: expected split_item 2 or 3, got ",
                    a.split_item);
  TORCH_CHECK_VALUE(a.combine.num_tokens.has_value(),
                    "num_tokens: required with combine_index (the combined output's rows)");
  const int64_t tokens = *a.combine.num_tokens;
  TORCH_CHECK_VALUE(tokens >= 0, "num_tokens: expected an integer >= 0, got ", tokens);
  const int64_t m = plan.rows;
  const at::Tensor& index = *a.combine.index;
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "combine_index: expected an int64 or int32 tensor, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.layout() == at::kStrided, "combine_index: expected a dense tensor");
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == m,
                    "combine_index: expected a 1-D tensor "
                    "of ",
                    m, " values (one per expert row), got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.device().is_cpu() || index.device() == device,
                    "combine_index: expected a tensor on cpu or on ", device,
                    " like x[0], got one on ", index.device());
  if (a.combine.weight) {
    const at::Tensor& w = *a.combine.weight;
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                     "combine_weight: expected a floating-point dtype, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.layout() == at::kStrided, "combine_weight: expected a dense tensor");
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == m, "combine_weight: expected a 1-D tensor of ",
                      m, " values (one per expert row), got shape ", w.sizes());
    TORCH_CHECK_VALUE(w.device() == device, "combine_weight: expected a tensor on ", device,
                      " like x[0], got one on ", w.device());
  }
  const int64_t n = plan.groups[0].n;
  if (a.combine.shared_input) {
    const at::Tensor& s = *a.combine.shared_input;
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()),
                     "shared_input: expected a floating-point dtype, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.layout() == at::kStrided, "shared_input: expected a dense tensor");
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == tokens && s.size(1) == n,
                      "shared_input: expected a tensor [num_tokens, N] = [", tokens, ", ", n,
                      "], got shape ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == device, "shared_input: expected a tensor on ", device,
                      " like x[0], got one on ", s.device());
  }
  // Values on the host are checked; on the device they stay unread (a sync), and the engine
  // drops rows outside [0, tokens).
  if (index.device().is_cpu()) {
    const at::Tensor host = index.to(at::kLong).contiguous();
    const int64_t* v = host.const_data_ptr<int64_t>();
    for (const auto j : c10::irange(m)) {
      TORCH_CHECK_VALUE(v[j] >= 0 && v[j] < tokens, name("combine_index", j),
                        ": expected a token row in [0, num_tokens = ", tokens, "), got ", v[j]);
    }
  }
  plan.combine = true;
  plan.combine_weighted = a.combine.weight.has_value();
  plan.combine_shared = a.combine.shared_input.has_value();
  plan.expert_rows = m;
  plan.rows = tokens;
  plan.numel = checked_mul(tokens, n, "the combined output");
  plan.out_shapes = {{tokens, n}};
}

}  // namespace

Plan make_plan(const OpArgs& a) {
  check_scalars(a);
  check_tensor_list("x", a.x);
  check_tensor_list("weight", a.weight);
  if (a.bias) check_tensor_list("bias", *a.bias);
  const size_t groups = a.weight.size();
  check_list_counts(a, groups);
  const Quant quant = quant_kind(a);
  check_dtypes_and_devices(a, quant);

  Plan plan;
  plan.split_item = a.split_item;
  plan.single_x = single_x(a.split_item);
  plan.single_y = single_y(a.split_item);
  plan.comm_turn = a.collective.comm_turn;
  plan.quant = quant;
  plan.dtype = output_dtype(a, quant);
  TORCH_CHECK_VALUE(!a.collective.reduce_dtype || plan.dtype != at::kDouble,
                    "reduce_dtype: float32 would sum the float64 partials of x's dtype in less "
                    "precision; pass None");
  plan.reduce_dtype = a.collective.reduce_dtype.value_or(plan.dtype);
  plan.device = a.x[0].device();
  plan.has_bias = a.bias.has_value();
  plan.rows_on_device = rows_stay_on_device(a);
  plan.groups.resize(groups);
  fill_mk(a, plan.groups);
  fill_n_and_check_weights(a, plan.groups);
  fill_layout(a, plan);
  check_quant_args(a, plan);
  plan_combine(a, plan);
  plan.collective = a.collective.kind;
  plan.ranks = a.collective.ranks;
  plan.chunks = make_chunks(plan, a.collective.comm_turn);  // a collective may cut its own
  return plan;
}

Plan expert_plan(const Plan& plan) {
  Plan expert = plan;
  expert.combine = false;
  expert.rows = plan.expert_rows;
  expert.numel = plan.expert_rows * plan.groups[0].n;  // checked when the groups were laid out
  expert.out_shapes = {{plan.expert_rows, plan.groups[0].n}};
  expert.collective = Collective::kNone;
  expert.chunks = make_chunks(expert, 0);
  return expert;
}

at::Tensor group_x(const Plan& plan, at::TensorList x, size_t i, int64_t r0, int64_t rows) {
  const GroupPlan& g = plan.groups[i];
  if (rows < 0) rows = g.m - r0;
  const at::Tensor xi = plan.single_x ? x[0] : x[i].dim() == 2 ? x[i] : x[i].reshape({g.m, g.k});
  const int64_t first = (plan.single_x ? g.x_row : 0) + r0;
  if (first == 0 && rows == xi.size(0)) return xi;
  // One as_strided: narrow costs several dispatches, per group and call.
  return xi.as_strided({rows, g.k}, xi.strides(), xi.storage_offset() + first * xi.stride(0));
}

std::vector<Chunk> make_chunks(const Plan& plan, int64_t turns) {
  // Never more chunks than rows: this also keeps the arithmetic below far from overflow.
  const int64_t k = std::clamp<int64_t>(turns, 1, std::max<int64_t>(plan.rows, 1));
  // Element c * numel / k, rounded up, without overflowing numel * c.
  auto target = [&](int64_t c) {
    return (plan.numel / k) * c + ((plan.numel % k) * c + k - 1) / k;
  };
  std::vector<Chunk> chunks;
  Chunk cur;
  auto cut = [&](int64_t row, int64_t elem) {
    if (elem <= cur.elem_begin) return;  // nothing since the last cut: no empty chunk
    cur.row_end = row;
    cur.elem_end = elem;
    chunks.push_back(cur);
    cur = Chunk{row, row, elem, elem};
  };
  // With rows on the device, or combined, the output is one [rows, n] block whose rows are no
  // group's.
  const std::vector<GroupPlan> whole{
      GroupPlan{plan.rows, 0, plan.rows ? plan.numel / plan.rows : 0}};
  int64_t c = 1;
  for (const GroupPlan& g : plan.rows_on_device || plan.combine ? whole : plan.groups) {
    if (g.m == 0 || g.n == 0) continue;
    const int64_t end = g.out_offset + g.m * g.n;
    for (; c < k && target(c) <= end; ++c) {
      // The first row of this group that starts at or after the target element.
      const int64_t r = std::clamp<int64_t>((target(c) - g.out_offset + g.n - 1) / g.n, 0, g.m);
      cut(g.out_row + r, g.out_offset + r * g.n);
    }
  }
  cut(plan.rows, plan.numel);
  if (chunks.empty()) chunks.push_back(Chunk{0, plan.rows, 0, 0});  // numel == 0
  return chunks;
}

std::string Plan::signature() const {
  std::ostringstream s;
  s << "split_item=" << split_item << " comm_turn=" << comm_turn << " dtype=" << dtype;
  if (reduce_dtype != dtype) s << " reduce_dtype=" << reduce_dtype;
  if (quant != Quant::kNone) s << " quant=(" << quant_name(quant) << ")";
  if (collective == Collective::kReduceScatter) s << " reduce_scatter";
  if (combine) {
    s << " combine(expert_rows=" << expert_rows << (combine_weighted ? ", weighted" : "")
      << (combine_shared ? ", shared_input" : "") << ")";
  }
  s << " outputs=[";
  for (const auto& shape : out_shapes) s << at::IntArrayRef(shape);
  s << "]";
  if (rows_on_device) {  // the group rows are on the device: not compared (nor the device's index,
    s << " rows=on device";  // which differs between the ranks of a multi-GPU job)
  } else if (single_y) {     // one output: where its groups' rows fall is not in its shape
    s << " rows=[";
    for (size_t i = 0; i < groups.size(); ++i) s << (i ? ", " : "") << groups[i].m;
    s << "]";
  }
  return s.str();
}

}  // namespace gmm_allreduce
