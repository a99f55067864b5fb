#include "core/combine.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include "util/float_bits.h"

namespace gmm_allreduce {
namespace {

// acc[c] += w * (y[c] (+ bias[c])) over a row of n elements; y stored as S, loaded as A.
template <typename S, typename A, typename Load>
inline __attribute__((always_inline)) void axpy_row(A* acc, const S* y, const A* bias, A w,
                                                    int64_t n, Load load) {
  if (bias != nullptr) {
    for (int64_t c = 0; c < n; ++c) acc[c] += w * (load(y[c]) + bias[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) acc[c] += w * load(y[c]);
  }
}

GMM_VECTOR_CLONES void axpy_bf16(float* acc, const uint16_t* y, const float* bias, float w,
                                 int64_t n) {
  axpy_row(acc, y, bias, w, n, BFloat16Bits::load);
}

GMM_VECTOR_CLONES void axpy_f16(float* acc, const uint16_t* y, const float* bias, float w,
                                int64_t n) {
  axpy_row(acc, y, bias, w, n, HalfBits::load);
}

GMM_VECTOR_CLONES void axpy_f32(float* acc, const float* y, const float* bias, float w, int64_t n) {
  axpy_row(acc, y, bias, w, n, [](float v) { return v; });
}

GMM_VECTOR_CLONES void axpy_f64(double* acc, const double* y, const double* bias, double w,
                                int64_t n) {
  axpy_row(acc, y, bias, w, n, [](double v) { return v; });
}

// The row kernel for products of dtype `y` into an accumulator of `A`, as one signature.
template <typename A>
using AxpyKernel = void (*)(A*, const void*, const A*, A, int64_t);

template <typename A, typename S, void (*K)(A*, const S*, const A*, A, int64_t)>
void row_as(A* acc, const void* y, const A* bias, A w, int64_t n) {
  K(acc, static_cast<const S*>(y), bias, w, n);
}

AxpyKernel<float> float_kernel(at::ScalarType y) {
  switch (y) {
    case at::kBFloat16:
      return &row_as<float, uint16_t, &axpy_bf16>;
    case at::kHalf:
      return &row_as<float, uint16_t, &axpy_f16>;
    case at::kFloat:
      return &row_as<float, float, &axpy_f32>;
    default:
      TORCH_INTERNAL_ASSERT(false, "combine: no fp32 row kernel for products of ", y);
  }
}

}  // namespace

void add_rows_into(const at::Tensor& acc, const at::Tensor& rows, const RowAdds& adds) {
  const int64_t n = acc.size(1);
  TORCH_INTERNAL_ASSERT(
      acc.is_cpu() && acc.is_contiguous() && rows.dim() == 2 && rows.size(1) == n &&
          (rows.size(0) == 0 || rows.stride(1) == 1),
      "add_rows_into: acc [T, N] contiguous and rows [r, N] with contiguous rows");
  TORCH_INTERNAL_ASSERT(!adds.bias.defined() || (adds.bias.is_contiguous() &&
                                                 adds.bias.scalar_type() == acc.scalar_type()),
                        "add_rows_into: a contiguous bias in the accumulation dtype");
  const auto* y = static_cast<const char*>(rows.const_data_ptr());
  const int64_t row_bytes = rows.stride(0) * static_cast<int64_t>(rows.element_size());
  auto each = [&](auto* a, const auto* w, const auto* bias, auto kernel) {
    for (const auto p : c10::irange(adds.count)) {
      const int64_t row = adds.pick != nullptr ? adds.pick[p] : p;
      const auto* b = bias != nullptr ? bias + adds.expert[p] * n : nullptr;
      const auto wp = w != nullptr ? w[p] : 1;
      auto* target = a + adds.token[p] * n;
      if (row >= 0) {
        kernel(target, y + row * row_bytes, b, wp, n);
      } else if (b != nullptr) {  // a dropped row: its bias alone
        for (int64_t c = 0; c < n; ++c) target[c] += wp * b[c];
      }
    }
  };
  if (acc.scalar_type() == at::kDouble) {
    TORCH_INTERNAL_ASSERT(rows.scalar_type() == at::kDouble, "add_rows_into: fp64 rows expected");
    each(acc.mutable_data_ptr<double>(), static_cast<const double*>(adds.weight),
         adds.bias.defined() ? adds.bias.const_data_ptr<double>() : nullptr,
         [](double* a, const void* v, const double* b, double w, int64_t k) {
           axpy_f64(a, static_cast<const double*>(v), b, w, k);
         });
    return;
  }
  each(acc.mutable_data_ptr<float>(), static_cast<const float*>(adds.weight),
       adds.bias.defined() ? adds.bias.const_data_ptr<float>() : nullptr,
       float_kernel(rows.scalar_type()));
}

CombineGrad combine_backward(const at::Tensor& dout, const at::Tensor& combine_index,
                             const std::optional<at::Tensor>& combine_weight) {
  const int64_t tokens = dout.size(0);
  const at::ScalarType acc = at::toOpMathType(dout.scalar_type());
  const at::Tensor index = combine_index.to(dout.device(), at::kLong);
  const at::Tensor kept = index.ge(0).logical_and_(index.lt(tokens)).to(acc);
  const at::Tensor picked = dout.index_select(0, index.clamp(0, std::max<int64_t>(tokens - 1, 0)));
  at::Tensor scale = combine_weight ? combine_weight->to(acc).mul(kept) : kept;
  // Out of place: .to() returns its input when the dtype already matches.
  return {picked.to(acc).mul(scale.unsqueeze(1)).to(dout.scalar_type()), picked, kept};
}

Combine::Combine(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                 const Chunk& chunk)
    : plan_(plan),
      args_(args),
      world_size_(world_size),
      t0_(chunk.row_begin),
      t1_(chunk.row_end),
      whole_(chunk.row_begin == 0 && chunk.row_end == plan.rows),
      host_(plan.device.is_cpu()) {
  TORCH_INTERNAL_ASSERT(plan.combine, "Combine: the plan has no combine");
  const int64_t n = plan.groups[0].n;
  out_ = flat.narrow(0, chunk.elem_begin, chunk.elem_end - chunk.elem_begin).view({t1_ - t0_, n});
  const at::ScalarType acc = at::toOpMathType(plan.dtype);
  acc_ = out_.scalar_type() == acc ? out_.zero_()
                                   : at::zeros({t1_ - t0_, n}, out_.options().dtype(acc));
  const at::Device where = host_ ? at::Device(at::kCPU) : plan.device;
  index_ = args.combine.index->to(where, at::kLong).contiguous();
  if (args.combine.weight) weight_ = args.combine.weight->to(where, acc).contiguous();
  if (host_ && plan.has_bias) {
    for (const at::Tensor& b : *args.bias) bias_.push_back(b.to(acc).div(world_size).contiguous());
  }
}

std::optional<Chunk> Combine::on_device(const Plan& plan, const Chunk& chunk) {
  if (chunk.row_begin > 0) return std::nullopt;
  return Chunk{0, plan.rows, 0, plan.numel};
}

at::Tensor Combine::rows_of(size_t i) const {
  TORCH_INTERNAL_ASSERT(host_, "Combine::rows_of: host combine_index only");
  const GroupPlan& g = plan_.groups[i];
  const int64_t* idx = index_.const_data_ptr<int64_t>() + g.out_row;
  std::vector<int64_t> rows;
  for (const auto r : c10::irange(g.m)) {
    if (idx[r] >= t0_ && idx[r] < t1_) rows.push_back(r);
  }
  return at::tensor(rows, at::kLong);
}

void Combine::add(size_t i, const at::Tensor& y, int64_t r0, bool with_bias) {
  if (y.size(0) == 0 || t1_ == t0_) return;
  if (host_) return add_rows(i, y, nullptr, r0, y.size(0), with_bias);
  const int64_t first = plan_.groups[i].out_row + r0;
  add_on_device(i, y, at::arange(first, first + y.size(0), index_.options()), with_bias);
}

void Combine::add(size_t i, const at::Tensor& y, const at::Tensor& rows, bool with_bias) {
  if (y.size(0) == 0 || t1_ == t0_) return;
  TORCH_INTERNAL_ASSERT(rows.numel() == y.size(0), "Combine::add: one row number per row of y");
  if (host_) {
    const at::Tensor r = rows.to(at::kLong).contiguous();
    return add_rows(i, y, r.const_data_ptr<int64_t>(), 0, y.size(0), with_bias);
  }
  add_on_device(i, y, rows.to(index_.device(), at::kLong).add(plan_.groups[i].out_row), with_bias);
}

void Combine::add_all(const at::Tensor& y) {
  TORCH_INTERNAL_ASSERT(!host_ && y.size(0) == plan_.expert_rows, "Combine::add_all: device only");
  if (y.size(0) == 0 || t1_ == t0_) return;
  add_on_device(0, y, at::arange(y.size(0), index_.options()), /*with_bias=*/false);
}

void Combine::add_rows(size_t i, const at::Tensor& y, const int64_t* rows, int64_t r0,
                       int64_t count, bool with_bias) {
  const int64_t n = plan_.groups[i].n;
  TORCH_INTERNAL_ASSERT(y.dim() == 2 && y.size(1) == n && y.stride(1) == 1,
                        "Combine::add: y must be [rows, N] with contiguous rows");
  const int64_t* idx = index_.const_data_ptr<int64_t>() + plan_.groups[i].out_row;
  const auto* y_bytes = static_cast<const char*>(y.const_data_ptr());
  const int64_t y_row_bytes = y.stride(0) * static_cast<int64_t>(y.element_size());
  auto each_row = [&](auto* acc, const auto* weight, const auto* bias, auto kernel) {
    for (const auto r : c10::irange(count)) {
      const int64_t local = rows != nullptr ? rows[r] : r0 + r;
      const int64_t t = idx[local];
      if (t < t0_ || t >= t1_) continue;
      const auto w = weight != nullptr ? weight[plan_.groups[i].out_row + local] : 1;
      kernel(acc + (t - t0_) * n, y_bytes + r * y_row_bytes, bias, w, n);
    }
  };
  const bool bias = with_bias && !bias_.empty();
  if (acc_.scalar_type() == at::kDouble) {
    TORCH_INTERNAL_ASSERT(y.scalar_type() == at::kDouble, "Combine: fp64 accumulation of ",
                          y.scalar_type());
    each_row(acc_.mutable_data_ptr<double>(),
             weight_.defined() ? weight_.const_data_ptr<double>() : nullptr,
             bias ? bias_[i].const_data_ptr<double>() : nullptr,
             [](double* a, const void* v, const double* b, double w, int64_t k) {
               axpy_f64(a, static_cast<const double*>(v), b, w, k);
             });
    return;
  }
  each_row(acc_.mutable_data_ptr<float>(),
           weight_.defined() ? weight_.const_data_ptr<float>() : nullptr,
           bias ? bias_[i].const_data_ptr<float>() : nullptr, float_kernel(y.scalar_type()));
}

void Combine::add_on_device(size_t i, const at::Tensor& y, const at::Tensor& expert_rows,
                            bool with_bias) {
  // No host read of combine_index: rows whose token lies outside this chunk (or outside
  // [0, num_tokens), on a device) get weight 0 and a clamped target.
  at::Tensor target = index_.index_select(0, expert_rows);
  at::Tensor keep = target.ge(t0_).logical_and_(target.lt(t1_)).to(acc_.scalar_type());
  at::Tensor w = weight_.defined() ? weight_.index_select(0, expert_rows).mul_(keep) : keep;
  target = target.sub(t0_).clamp_(0, t1_ - t0_ - 1);
  at::Tensor rows = y.to(acc_.scalar_type());
  if (with_bias && plan_.has_bias) {
    rows = rows.add((*args_.bias)[i].to(acc_.scalar_type()).div(world_size_));
  }
  acc_.index_add_(0, target, rows.mul(w.unsqueeze(1)));  // rows may be y itself
}

void Combine::finish() {
  if (args_.combine.shared_input && t1_ > t0_)
    acc_.add_(args_.combine.shared_input->narrow(0, t0_, t1_ - t0_));
  if (!acc_.is_same(out_)) out_.copy_(acc_);
}

void combine_groups(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                    const Chunk& chunk, GroupProducts products, bool parallel) {
  std::optional<Chunk> mine = chunk;
  if (!plan.device.is_cpu()) mine = Combine::on_device(plan, chunk);
  if (!mine) return;
  Combine combine(plan, args, world_size, flat, *mine);
  // A fused expert block's x is computed by the engine from the rows it is handed (core/mlp.h):
  // none is passed, and the rows are always listed.
  const bool fused = args.mlp.fused;
  // The blocks: rows [r0, r0 + count) of a group, or its listed `rows` (this chunk's).
  struct Block {
    size_t group;
    int64_t r0, count;
    at::Tensor rows;
  };
  std::vector<Block> blocks;
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    if (g.m == 0 || g.n == 0) continue;
    // Blocks of about 1M elements of x and products together (with a block's gate_up products
    // and gathered hidden rows, for a fused block).
    const int64_t width = g.k + g.n + (fused ? 2 * g.k + args.mlp.hidden->size(1) : 0);
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(width, 1));
    if (combine.whole()) {
      for (int64_t r = 0; r < g.m; r += rows) blocks.push_back({i, r, std::min(rows, g.m - r), {}});
      continue;
    }
    const at::Tensor selected = combine.rows_of(i);
    for (int64_t r = 0; r < selected.numel(); r += rows) {
      const int64_t count = std::min(rows, selected.numel() - r);
      blocks.push_back({i, 0, count, selected.narrow(0, r, count)});
    }
  }
  auto product = [&](const Block& b) {
    if (b.rows.defined()) {
      return products(b.group,
                      fused ? at::Tensor() : group_x(plan, args.x, b.group).index_select(0, b.rows),
                      0, b.rows);
    }
    return fused ? products(b.group, at::Tensor(), b.r0, at::arange(b.r0, b.r0 + b.count))
                 : products(b.group, group_x(plan, args.x, b.group, b.r0, b.count), b.r0, {});
  };
  // With `parallel`, the products of as many blocks as threads at a time, each on its own
  // thread, then added in the blocks' order: the same sums in the same order on any thread count.
  const size_t wave = parallel && plan.device.is_cpu() ? std::max(1, at::get_num_threads()) : 1;
  std::vector<at::Tensor> ys(wave);
  for (size_t b0 = 0; b0 < blocks.size(); b0 += wave) {
    const size_t b1 = std::min(blocks.size(), b0 + wave);
    auto run = [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) ys[j - b0] = product(blocks[j]);
    };
    b1 - b0 > 1 ? at::parallel_for(b0, b1, 1, run) : run(b0, b1);
    for (size_t j = b0; j < b1; ++j) {
      const Block& b = blocks[j];
      b.rows.defined() ? combine.add(b.group, ys[j - b0], b.rows)
                       : combine.add(b.group, ys[j - b0], b.r0);
      ys[j - b0] = at::Tensor();
    }
  }
  combine.finish();
}

}  // namespace gmm_allreduce
