#include "core/quant_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "core/combine.h"
#include "util/block_rows.h"
#include "util/float_bits.h"

namespace gmm_allreduce {
namespace {

// The CPU epilogue of one row: out[c] = round(p[c] * (a * col[c]) + add[c] + t * off[c]).
template <typename P, typename O, typename Load, typename Store>
inline __attribute__((always_inline)) void dequant_row(O* out, const P* p, float a,
                                                       const float* col, const float* add, float t,
                                                       const float* off, int64_t n, Load load,
                                                       Store store) {
  for (int64_t c = 0; c < n; ++c) out[c] = store(load(p[c]) * (a * col[c]) + add[c] + t * off[c]);
}

inline float load_i32(int32_t v) { return static_cast<float>(v); }
inline float same_f32(float v) { return v; }

using RowKernel = void (*)(void*, const void*, float, const float*, const float*, float,
                           const float*, int64_t);

#define GMM_DEQUANT_ROW(NAME, P, LOAD, O, STORE)                                              \
  GMM_VECTOR_CLONES void NAME(void* out, const void* p, float a, const float* col,            \
                              const float* add, float t, const float* off, int64_t n) {       \
    dequant_row(static_cast<O*>(out), static_cast<const P*>(p), a, col, add, t, off, n, LOAD, \
                STORE);                                                                       \
  }
GMM_DEQUANT_ROW(i32_to_f32, int32_t, load_i32, float, same_f32)
GMM_DEQUANT_ROW(i32_to_bf16, int32_t, load_i32, uint16_t, BFloat16Bits::store)
GMM_DEQUANT_ROW(i32_to_f16, int32_t, load_i32, uint16_t, HalfBits::store)
GMM_DEQUANT_ROW(f32_to_f32, float, same_f32, float, same_f32)
GMM_DEQUANT_ROW(f32_to_bf16, float, same_f32, uint16_t, BFloat16Bits::store)
GMM_DEQUANT_ROW(f32_to_f16, float, same_f32, uint16_t, HalfBits::store)
GMM_DEQUANT_ROW(bf16_to_f32, uint16_t, BFloat16Bits::load, float, same_f32)
GMM_DEQUANT_ROW(bf16_to_bf16, uint16_t, BFloat16Bits::load, uint16_t, BFloat16Bits::store)
GMM_DEQUANT_ROW(f16_to_f32, uint16_t, HalfBits::load, float, same_f32)
GMM_DEQUANT_ROW(f16_to_f16, uint16_t, HalfBits::load, uint16_t, HalfBits::store)
#undef GMM_DEQUANT_ROW

// The row kernel from products of dtype p into an output of dtype o, or none.
RowKernel row_kernel(at::ScalarType p, at::ScalarType o) {
  const RowKernel to_f32[] = {&i32_to_f32, &f32_to_f32, &bf16_to_f32, &f16_to_f32};
  const int from = p == at::kInt ? 0 : p == at::kFloat ? 1 : p == at::kBFloat16 ? 2 : 3;
  if (p != at::kInt && p != at::kFloat && p != at::kBFloat16 && p != at::kHalf) return nullptr;
  if (o == at::kFloat) return to_f32[from];
  if (o == at::kBFloat16)
    return from == 0   ? &i32_to_bf16
           : from == 1 ? &f32_to_bf16
           : from == 2 ? &bf16_to_bf16
                       : nullptr;
  if (o == at::kHalf)
    return from == 0 ? &i32_to_f16 : from == 1 ? &f32_to_f16 : from == 3 ? &f16_to_f16 : nullptr;
  return nullptr;
}

}  // namespace

QuantEpilogue::QuantEpilogue(const QuantGemm& q, size_t i, const at::Tensor& x, int64_t r0,
                             const at::Tensor& rows, at::Tensor& out, bool with_bias,
                             bool dequantised)
    : out_(out), n_(q.plan().groups[i].n) {
  const Plan& plan = q.plan();
  const OpArgs& args = q.args();
  const bool weight_only = plan.quant == Quant::kWeightInt8;
  // The per-column terms in fp32, [n]: the weight's scale, bias / world_size, and (weight-only,
  // the weight not dequantised) offset * scale times x's row sums. An int32 bias (W8A8, one rank)
  // joins the int32 sums instead, before dequantisation.
  if (!dequantised) {
    col_ = (weight_only ? *args.quant.antiquant_scale : *args.quant.scale)[i].to(at::kFloat);
  }
  if (with_bias && plan.has_bias) {
    const at::Tensor& b = (*args.bias)[i];
    if (b.scalar_type() == at::kInt) {
      int_bias_ = b.contiguous();
    } else {
      add_ = b.to(at::kFloat).div(q.world_size());
    }
  }
  if (weight_only && args.quant.antiquant_offset && !dequantised) {
    off_ = (*args.quant.antiquant_offset)[i].to(at::kFloat).mul((*args.quant.antiquant_scale)[i]);
    row_sum_ = x.sum(1, false, at::kFloat);
  }
  if (q.row_scale().defined()) {
    const int64_t first = plan.groups[i].out_row;
    row_ = rows.defined()
               ? q.row_scale().index_select(0, rows.to(q.row_scale().device()).add(first))
               : q.row_scale().narrow(0, first + r0, x.size(0));
  }
  if (!out.is_cpu()) return;
  // The CPU row kernels' pointers: ones and zeros where a column term is missing.
  const at::TensorOptions f32 = out.options().dtype(at::kFloat);
  if (!col_.defined()) ones_ = at::ones({n_}, f32);
  if (!add_.defined() || !off_.defined()) zeros_ = at::zeros({n_}, f32);
  col_ = (col_.defined() ? col_ : ones_).contiguous();
  const at::Tensor add = (add_.defined() ? add_ : zeros_).contiguous();
  const at::Tensor off = (off_.defined() ? off_ : zeros_).contiguous();
  col_p_ = col_.const_data_ptr<float>();
  add_p_ = add.const_data_ptr<float>();
  off_p_ = off.const_data_ptr<float>();
  // Kept alive by the members (or zeros_) they were made from, or replace them.
  if (add_.defined()) add_ = add;
  if (off_.defined()) off_ = off;
  if (row_.defined()) row_ = row_.contiguous(), row_p_ = row_.const_data_ptr<float>();
  if (row_sum_.defined())
    row_sum_ = row_sum_.contiguous(), sum_p_ = row_sum_.const_data_ptr<float>();
  if (int_bias_.defined()) int_bias_p_ = int_bias_.const_data_ptr<int32_t>();
}

void QuantEpilogue::apply(at::Tensor p) const {
  if (int_bias_.defined()) {  // exact sums: int32, or integers in fp32 or fp64
    p = (p.scalar_type() == at::kInt ? p : p.to(at::kInt)).add_(int_bias_);
  }
  const RowKernel kernel =
      out_.is_cpu() ? row_kernel(p.scalar_type(), out_.scalar_type()) : nullptr;
  if (kernel == nullptr || out_.stride(1) != 1) {  // ATen's ops: any device, any dtype
    at::Tensor v = p.to(at::kFloat);
    if (row_.defined()) v = v.mul(row_.unsqueeze(1));
    if (col_.defined() && !ones_.defined()) v = v.mul(col_);
    if (add_.defined()) v = v.add(add_);
    if (off_.defined()) v = v.addcmul(row_sum_.unsqueeze(1), off_.unsqueeze(0));
    out_.copy_(v);
    return;
  }
  // The CPU: one fused pass per row, rows in parallel.
  p = p.contiguous();
  const auto* src = static_cast<const char*>(p.const_data_ptr());
  const int64_t src_row = n_ * static_cast<int64_t>(p.element_size());
  auto* dst = static_cast<char*>(out_.mutable_data_ptr());
  const int64_t dst_row = out_.stride(0) * static_cast<int64_t>(out_.element_size());
  at::parallel_for(0, p.size(0), block_rows(n_, 1 << 14), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      kernel(dst + j * dst_row, src + j * src_row, row_p_ != nullptr ? row_p_[j] : 1.0f, col_p_,
             add_p_, sum_p_ != nullptr ? sum_p_[j] : 0.0f, off_p_, n_);
    }
  });
}

void QuantEpilogue::sum_rows(RowKernel kernel, int64_t row, int64_t rows, int64_t col, int64_t cols,
                             const void* sums, int64_t ld, int64_t sum_bytes) const {
  TORCH_INTERNAL_ASSERT(kernel != nullptr && out_.is_cpu() && out_.stride(1) == 1,
                        "QuantEpilogue: block sums take a CPU output of rows contiguous");
  const int64_t elem = out_.element_size();
  auto* dst = static_cast<char*>(out_.mutable_data_ptr());
  const int64_t dst_row = out_.stride(0) * elem;
  for (int64_t j = row; j < row + rows; ++j) {
    const void* row_sums = static_cast<const char*>(sums) + (j - row) * ld * sum_bytes;
    kernel(dst + j * dst_row + col * elem, row_sums, row_p_ != nullptr ? row_p_[j] : 1.0f,
           col_p_ + col, add_p_ + col, sum_p_ != nullptr ? sum_p_[j] : 0.0f, off_p_ + col, cols);
  }
}

void QuantEpilogue::sums(int64_t row, int64_t rows, int64_t col, int64_t cols, const int32_t* sums,
                         int64_t ld) const {
  const RowKernel kernel = row_kernel(at::kInt, out_.scalar_type());
  if (int_bias_p_ == nullptr) return sum_rows(kernel, row, rows, col, cols, sums, ld, 4);
  thread_local std::vector<int32_t> biased;  // a row of sums plus the int32 bias
  biased.resize(cols);
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t c = 0; c < cols; ++c) biased[c] = sums[j * ld + c] + int_bias_p_[col + c];
    sum_rows(kernel, row + j, 1, col, cols, biased.data(), cols, 4);
  }
}

void QuantEpilogue::sums(int64_t row, int64_t rows, int64_t col, int64_t cols, const float* sums,
                         int64_t ld) const {
  sum_rows(row_kernel(at::kFloat, out_.scalar_type()), row, rows, col, cols, sums, ld, 4);
}

QuantGemm::QuantGemm(const Plan& plan, const OpArgs& args, int64_t world_size,
                     const QuantProducts& products)
    : plan_(plan), args_(args), world_size_(world_size), products_(products) {
  if (args.quant.per_token_scale) {
    row_scale_ = args.quant.per_token_scale->to(at::kFloat).contiguous();
  }
}

const at::Tensor& QuantGemm::dequantised_weight(size_t i, at::ScalarType dtype) const {
  if (dequantised_group_ != i || dequantised_.scalar_type() != dtype) {
    at::Tensor deq = args_.weight[i].to(at::kFloat);
    if (args_.quant.antiquant_offset) deq.add_((*args_.quant.antiquant_offset)[i].to(at::kFloat));
    dequantised_ = deq.mul_((*args_.quant.antiquant_scale)[i].to(at::kFloat)).to(dtype);
    dequantised_group_ = i;
  }
  return dequantised_;
}

at::Tensor aten_product(const QuantGemm& q, size_t i, const at::Tensor& x, bool& dequantised) {
  const at::Tensor& w = q.args().weight[i];
  dequantised = false;
  switch (q.plan().quant) {
    case Quant::kInt8:
      // int32-exact: cuBLASLt's int8 GEMM where it takes the shapes; elsewhere fp64, exact for
      // any K below 2^38.
      if (x.size(0) > 16 && x.size(1) % 8 == 0 && w.size(1) % 8 == 0) {
        return at::_int_mm(x.contiguous(), w);
      }
      return at::mm(x.to(at::kDouble), w.to(at::kDouble));
    case Quant::kFp8: {
      // Unit scales and an fp32 output: the scales are applied in the epilogue.
      if (x.size(0) % 16 == 0 && x.size(1) % 16 == 0 && w.size(1) % 16 == 0) {
        const at::Tensor one = at::ones({}, x.options().dtype(at::kFloat));
        const at::Tensor b = w.stride(0) == 1 ? w : w.t().contiguous().t();
        return at::_scaled_mm(x.contiguous(), b, one, one, std::nullopt, std::nullopt, at::kFloat);
      }
      return at::mm(x.to(at::kFloat), w.to(at::kFloat));
    }
    default:  // weight-only: the weight dequantised once per group and call, x's own GEMM
      dequantised = true;
      return at::mm(x, q.dequantised_weight(i, x.scalar_type()));
  }
}

void QuantGemm::run(size_t i, const at::Tensor& x, int64_t r0, const at::Tensor& rows,
                    at::Tensor& out, bool with_bias) const {
  if (x.size(0) == 0 || plan_.groups[i].n == 0) return;
  const std::function<void(const QuantEpilogue&)> fused =
      products_.fused != nullptr ? products_.fused(*this, i, x, out) : nullptr;
  bool dequantised = false;
  const at::Tensor p = fused ? at::Tensor() : products_.product(*this, i, x, dequantised);
  const QuantEpilogue epilogue(*this, i, x, r0, rows, out, with_bias, dequantised);
  fused ? fused(epilogue) : epilogue.apply(p);
}

void compute_quantized(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                       const Chunk& chunk, const QuantProducts& products,
                       std::optional<BlockX> block_x) {
  const QuantGemm q(plan, args, world_size, products);
  if (plan.combine) {  // fp32 products, the bias added by the combine
    combine_groups(plan, args, world_size, flat, chunk,
                   [&](size_t i, const at::Tensor& given, int64_t r0, const at::Tensor& rows) {
                     const at::Tensor x = args.mlp.fused ? (*block_x)(i, rows) : given;
                     at::Tensor y =
                         at::empty({x.size(0), plan.groups[i].n}, flat.options().dtype(at::kFloat));
                     q.run(i, x, r0, rows, y, /*with_bias=*/false);
                     return y;
                   });
    return;
  }
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    const auto [first, last] = rows_in_chunk(g, chunk);
    // Blocks of about 256K products: the int32/fp32 product stays in cache for its epilogue.
    const int64_t rows = block_rows(g.n, int64_t{1} << 18);
    for (int64_t r = first; r < last; r += rows) {
      const int64_t count = std::min(rows, last - r);
      at::Tensor y =
          flat.as_strided({count, g.n}, {g.n, 1}, flat.storage_offset() + g.out_offset + r * g.n);
      q.run(i, group_x(plan, args.x, i, r, count), r, at::Tensor(), y, /*with_bias=*/true);
    }
  }
}

}  // namespace gmm_allreduce
