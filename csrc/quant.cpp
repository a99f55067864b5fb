#include "quant.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "aten/cpu_isa.h"
#include "aten/int8_amx.h"
#include "aten/int8_avx2.h"
#include "aten/int8_vnni.h"
#include "aten/int8_weight.h"
#include "aten/prepack.h"
#include "combine.h"
#include "float_bits.h"
#include "op.h"

namespace gmm_allreduce {
namespace {

std::string name(const char* arg, size_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
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

// A [rows, cols] block's row count of about `budget` elements.
int64_t rows_per_block(int64_t cols, int64_t budget) {
  return std::max<int64_t>(1, budget / std::max<int64_t>(cols, 1));
}

}  // namespace

const char* quant_name(Quant q) {
  switch (q) {
    case Quant::kInt8:
      return "int8 x and weight";
    case Quant::kFp8:
      return "float8_e4m3fn x and weight";
    case Quant::kWeightInt8:
      return "int8 weights with float x";
    default:
      return "float x and weight";
  }
}

Quant quant_kind(const OpArgs& a) {
  const at::ScalarType x = a.x[0].scalar_type();
  const at::ScalarType w = a.weight[0].scalar_type();
  if (x == at::kChar) return Quant::kInt8;
  if (x == at::kFloat8_e4m3fn) return Quant::kFp8;
  TORCH_CHECK_TYPE(
      x == at::kHalf || x == at::kBFloat16 || x == at::kFloat || x == at::kDouble,
      "x[0]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got ", x);
  if (w == at::kChar) {
    TORCH_CHECK_TYPE(x != at::kDouble,
                     "weight[0]: int8 weights take float16, bfloat16 or float32 x, got x of ", x);
    return Quant::kWeightInt8;
  }
  return Quant::kNone;
}

at::ScalarType weight_dtype(Quant q, at::ScalarType x) {
  switch (q) {
    case Quant::kInt8:
    case Quant::kWeightInt8:
      return at::kChar;
    case Quant::kFp8:
      return at::kFloat8_e4m3fn;
    default:
      return x;
  }
}

at::ScalarType output_dtype(const OpArgs& a, Quant q) {
  const at::ScalarType x = a.x[0].scalar_type();
  if (q == Quant::kInt8 || q == Quant::kFp8) {
    const at::ScalarType out = a.output_dtype.value_or(at::kBFloat16);
    TORCH_CHECK_VALUE(out == at::kBFloat16 || out == at::kHalf || out == at::kFloat,
                      "output_dtype: expected None, torch.bfloat16, torch.float16 or "
                      "torch.float32 for ",
                      quant_name(q), ", got ", out);
    return out;
  }
  TORCH_CHECK_VALUE(!a.output_dtype || *a.output_dtype == x,
                    "output_dtype: the outputs of a call of ", quant_name(q),
                    " have x's dtype: expected None or ", x, ", got ", *a.output_dtype);
  return x;
}

void check_quant_args(const OpArgs& a, const Plan& plan) {
  const Quant q = plan.quant;
  const bool w8a8 = q == Quant::kInt8 || q == Quant::kFp8;
  const bool weight_only = q == Quant::kWeightInt8;
  check_given_for("scale", a.scale.has_value(), w8a8, q);
  check_given_for("per_token_scale", a.per_token_scale.has_value(), w8a8, q);
  check_given_for("antiquant_scale", a.antiquant_scale.has_value(), weight_only, q);
  check_given_for("antiquant_offset", a.antiquant_offset.has_value(), weight_only, q);
  if (w8a8) {
    TORCH_CHECK_VALUE(a.scale.has_value(), "scale: required for ", quant_name(q),
                      " (the weights' per-output-channel dequantisation scales, [N_i] per group)");
    TORCH_CHECK_VALUE(a.per_token_scale.has_value(), "per_token_scale: required for ",
                      quant_name(q), " (x's per-row dequantisation scales, [M])");
    check_per_group("scale", *a.scale, plan);
    const at::Tensor& t = *a.per_token_scale;
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
    TORCH_CHECK_VALUE(!any_int || !a.combine_index,
                      "bias: an int32 bias is not supported with combine_index; pass it as a "
                      "float bias, times scale, or combine after the call");
    TORCH_CHECK_VALUE(!any_int || a.ranks == 1,
                      "bias: an int32 bias joins the int32 sums whole, which a rank's share "
                      "(bias / n) of it would not: it takes one rank (world size 1), got ",
                      a.ranks);
  }
  if (weight_only) {
    TORCH_CHECK_VALUE(a.antiquant_scale.has_value(), "antiquant_scale: required for ",
                      quant_name(q), " (the weights' per-output-channel scales, [N_i] per group)");
    check_per_group("antiquant_scale", *a.antiquant_scale, plan);
    if (a.antiquant_offset) check_per_group("antiquant_offset", *a.antiquant_offset, plan);
  }
}

QuantGemm::QuantGemm(const Plan& plan, const OpArgs& args, int64_t world_size)
    : plan_(plan), args_(args), world_size_(world_size) {
  if (args.per_token_scale) row_scale_ = args.per_token_scale->to(at::kFloat).contiguous();
}

at::Tensor QuantGemm::product(size_t i, const at::Tensor& x, bool& dequantised) const {
  const at::Tensor& w = args_.weight[i];
  dequantised = false;
  switch (plan_.quant) {
    case Quant::kInt8:
      // int32-exact: ATen's int8 GEMM (VNNI or AMX on the CPU; cuBLASLt on CUDA, which takes more
      // than 16 rows and K, N multiples of 8); elsewhere fp64, exact for any K below 2^38. (Our
      // AMX or VNNI kernel, where it applies, runs in run(), fused with the epilogue.)
      // Without VNNI or AMX, ATen's CPU int8 GEMM is a reference loop: there (for pairs our AVX2
      // kernel does not take) fp32, exact while k * 2^14 < 2^24, or fp64.
      if (x.is_cpu() && !cpu_has_vnni()) {
        note_kernel(CpuKernel::kInt8Float);
        const at::ScalarType exact = x.size(1) <= (1 << 10) ? at::kFloat : at::kDouble;
        return at::mm(x.to(exact), w.to(exact));
      }
      if (x.is_cpu() || (x.size(0) > 16 && x.size(1) % 8 == 0 && w.size(1) % 8 == 0)) {
        if (x.is_cpu()) note_kernel(CpuKernel::kInt8IntMm);
        return at::_int_mm(x.is_cpu() ? x : x.contiguous(), w);
      }
      return at::mm(x.to(at::kDouble), w.to(at::kDouble));
    case Quant::kFp8: {
      // Unit scales and an fp32 output: the scales are applied in the epilogue.
      // On the CPU (every tier) an fp32 GEMM of the upcast operands: e4m3 products are exact in
      // fp32, and it takes 0.75 of ATen's CPU _scaled_mm's time.
      const bool aligned = x.size(0) % 16 == 0 && x.size(1) % 16 == 0 && w.size(1) % 16 == 0;
      if (!x.is_cpu() && aligned) {
        const at::Tensor one = at::ones({}, x.options().dtype(at::kFloat));
        const at::Tensor b = w.stride(0) == 1 ? w : w.t().contiguous().t();
        return at::_scaled_mm(x.contiguous(), b, one, one, std::nullopt, std::nullopt, at::kFloat);
      }
      if (x.is_cpu()) note_kernel(CpuKernel::kFp8Float);
      return at::mm(x.to(at::kFloat), w.to(at::kFloat));
    }
    default: {  // weight-only
      // (bf16 x on AMX runs in run(), fused with the epilogue.) A few rows: our AVX-512 or AVX2
      // kernel reads the int8 weight in place (the scales in the epilogue); more: the weight
      // dequantised to x's dtype once per group and call (kept for its next block of rows) and
      // ATen's 16-bit GEMM.
      if (x.is_cpu() && x.size(0) <= kInt8WeightMaxRows && int8_weight_mm_available()) {
        return int8_weight_mm(x, w);
      }
      // Where the CPU has no native GEMM of x's dtype (cpu_isa.h), the weight is dequantised to
      // fp32 and x upcast.
      dequantised = true;
      if (x.is_cpu()) note_kernel(CpuKernel::kWeightDequant);
      const at::ScalarType gemm =
          !x.is_cpu() || cpu_native_gemm(x.scalar_type()) ? x.scalar_type() : at::kFloat;
      if (dequantised_group_ != i) {
        at::Tensor deq = w.to(at::kFloat);
        if (args_.antiquant_offset) deq.add_((*args_.antiquant_offset)[i].to(at::kFloat));
        dequantised_ = deq.mul_((*args_.antiquant_scale)[i].to(at::kFloat)).to(gemm);
        dequantised_group_ = i;
      }
      return at::mm(x.to(gemm), dequantised_);
    }
  }
}

void QuantGemm::run(size_t i, const at::Tensor& x, int64_t r0, const at::Tensor& rows,
                    at::Tensor& out, bool with_bias) const {
  const GroupPlan& g = plan_.groups[i];
  const int64_t r = x.size(0);
  const int64_t n = g.n;
  if (r == 0 || n == 0) return;
  const at::Tensor& w = args_.weight[i];
  // Our kernels (int8 x on AMX, or else on VNNI from kInt8VnniMinRows rows; bf16 x with an int8
  // weight on AMX from kBf16AmxMinRows rows): the epilogue runs on each block of sums as the
  // kernel hands it over.
  const bool on_cpu = out.is_cpu() && out.stride(1) == 1;
  const bool int8_amx = on_cpu && plan_.quant == Quant::kInt8 && int8_amx_takes(x, w);
  const bool int8_vnni = on_cpu && plan_.quant == Quant::kInt8 && !int8_amx &&
                         r >= kInt8VnniMinRows && int8_vnni_takes(x, w);
  // Without VNNI (or AMX), any rows: ATen's int8 GEMM there is a reference loop. The weight's
  // int16 pairs where it was packed (prepack.h); else the weight itself (columns or rows layout).
  const bool no_vnni = on_cpu && plan_.quant == Quant::kInt8 && !int8_amx && !cpu_has_vnni();
  const at::Tensor int16_pack = no_vnni ? find_pack(w) : at::Tensor();
  const bool int8_avx2 =
      no_vnni && (int16_pack.defined() ? int8_avx2_packed_takes(x) : int8_avx2_takes(x, w));
  const bool bf16_amx = on_cpu && plan_.quant == Quant::kWeightInt8 && r >= kBf16AmxMinRows &&
                        bf16_int8_amx_takes(x, w);
  const RowKernel block_kernel = int8_amx || int8_vnni || int8_avx2
                                     ? row_kernel(at::kInt, out.scalar_type())
                                 : bf16_amx ? row_kernel(at::kFloat, out.scalar_type())
                                            : nullptr;
  bool dequantised = false;
  at::Tensor p = block_kernel != nullptr ? at::Tensor() : product(i, x, dequantised);
  const bool weight_only = plan_.quant == Quant::kWeightInt8;
  const at::TensorOptions f32 = out.options().dtype(at::kFloat);
  // The epilogue's per-column terms in fp32, [n]: the weight's scale, bias / world_size, and
  // (weight-only, the weight not dequantised) offset * scale times x's row sums. An int32 bias
  // (W8A8, one rank) joins the int32 sums instead, before dequantisation.
  at::Tensor col, add, off, row, row_sum, int_bias;
  if (!dequantised) col = (weight_only ? *args_.antiquant_scale : *args_.scale)[i].to(at::kFloat);
  if (with_bias && plan_.has_bias) {
    const at::Tensor& b = (*args_.bias)[i];
    if (b.scalar_type() == at::kInt) {
      int_bias = b.contiguous();
    } else {
      add = b.to(at::kFloat).div(world_size_);
    }
  }
  if (int_bias.defined() && p.defined()) {  // exact sums: int32, or integers in fp32 or fp64
    p = (p.scalar_type() == at::kInt ? p : p.to(at::kInt)).add_(int_bias);
  }
  if (weight_only && args_.antiquant_offset && !dequantised) {
    off = (*args_.antiquant_offset)[i].to(at::kFloat).mul((*args_.antiquant_scale)[i]);
    row_sum = x.sum(1, false, at::kFloat);
  }
  if (row_scale_.defined()) {
    row = rows.defined() ? row_scale_.index_select(0, rows.to(row_scale_.device()).add(g.out_row))
                         : row_scale_.narrow(0, g.out_row + r0, r);
  }
  const RowKernel kernel = block_kernel != nullptr ? block_kernel
                           : out.is_cpu()          ? row_kernel(p.scalar_type(), out.scalar_type())
                                                   : nullptr;
  if (kernel == nullptr || out.stride(1) != 1) {  // ATen's ops: any device, any dtype
    at::Tensor v = p.to(at::kFloat);
    if (row.defined()) v = v.mul(row.unsqueeze(1));
    if (col.defined()) v = v.mul(col);
    if (add.defined()) v = v.add(add);
    if (off.defined()) v = v.addcmul(row_sum.unsqueeze(1), off.unsqueeze(0));
    out.copy_(v);
    return;
  }
  // The CPU: one fused pass per row, rows in parallel.
  p = p.contiguous();
  const at::Tensor ones = col.defined() ? at::Tensor() : at::ones({n}, f32);
  const at::Tensor zeros = add.defined() && off.defined() ? at::Tensor() : at::zeros({n}, f32);
  const float* col_p = (col.defined() ? col : ones).contiguous().const_data_ptr<float>();
  const at::Tensor add_c = (add.defined() ? add : zeros).contiguous();
  const at::Tensor off_c = (off.defined() ? off : zeros).contiguous();
  const float* add_p = add_c.const_data_ptr<float>();
  const float* off_p = off_c.const_data_ptr<float>();
  const at::Tensor row_c = row.defined() ? row.contiguous() : row;
  const at::Tensor sum_c = row_sum.defined() ? row_sum.contiguous() : row_sum;
  const float* row_p = row_c.defined() ? row_c.const_data_ptr<float>() : nullptr;
  const float* sum_p = sum_c.defined() ? sum_c.const_data_ptr<float>() : nullptr;
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t dst_row = out.stride(0) * static_cast<int64_t>(out.element_size());
  if (block_kernel != nullptr) {
    const int64_t elem = out.element_size();
    const int32_t* int_bias_p = int_bias.defined() ? int_bias.const_data_ptr<int32_t>() : nullptr;
    auto sink = [&](int64_t b, int64_t rows, int64_t c, int64_t cols, const auto* sums,
                    int64_t ld) {
      using S = std::decay_t<decltype(*sums)>;
      thread_local std::vector<S> biased;  // a row of sums plus the int32 bias
      for (int64_t j = b; j < b + rows; ++j) {
        const S* row_sums = sums + (j - b) * ld;
        if constexpr (std::is_same_v<S, int32_t>) {
          if (int_bias_p != nullptr) {
            biased.resize(cols);
            for (int64_t q = 0; q < cols; ++q) biased[q] = row_sums[q] + int_bias_p[c + q];
            row_sums = biased.data();
          }
        }
        kernel(dst + j * dst_row + c * elem, row_sums, row_p != nullptr ? row_p[j] : 1.0f,
               col_p + c, add_p + c, sum_p != nullptr ? sum_p[j] : 0.0f, off_p + c, cols);
      }
    };
    const bool packed = int8_avx2 && int16_pack.defined();
    note_kernel(int8_amx    ? CpuKernel::kInt8Amx
                : int8_vnni ? CpuKernel::kInt8Vnni
                : packed    ? CpuKernel::kInt8Avx2Packed
                : int8_avx2 ? CpuKernel::kInt8Avx2
                            : CpuKernel::kWeightAmx);
    if (int8_amx) {
      int8_amx_gemm(x, w, sink);
    } else if (int8_vnni) {
      int8_vnni_gemm(x, w, sink);
    } else if (packed) {
      int8_avx2_gemm_packed(x, int16_pack, n, sink);
    } else if (int8_avx2) {
      int8_avx2_gemm(x, w, sink);
    } else {
      bf16_int8_amx_gemm(x, w, sink);
    }
    return;
  }
  const auto* src = static_cast<const char*>(p.const_data_ptr());
  const int64_t src_row = n * static_cast<int64_t>(p.element_size());
  at::parallel_for(0, r, rows_per_block(n, 1 << 14), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      kernel(dst + j * dst_row, src + j * src_row, row_p != nullptr ? row_p[j] : 1.0f, col_p, add_p,
             sum_p != nullptr ? sum_p[j] : 0.0f, off_p, n);
    }
  });
}

void compute_quantized(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                       const Chunk& chunk) {
  const QuantGemm q(plan, args, world_size);
  if (plan.combine) {  // fp32 products, the bias added by the combine
    combine_groups(plan, args, world_size, flat, chunk,
                   [&](size_t i, const at::Tensor& x, int64_t r0, const at::Tensor& rows) {
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
    const int64_t rows = rows_per_block(g.n, int64_t{1} << 18);
    for (int64_t r = first; r < last; r += rows) {
      const int64_t count = std::min(rows, last - r);
      at::Tensor y =
          flat.as_strided({count, g.n}, {g.n, 1}, flat.storage_offset() + g.out_offset + r * g.n);
      q.run(i, group_x(plan, args.x, i, r, count), r, at::Tensor(), y, /*with_bias=*/true);
    }
  }
}

}  // namespace gmm_allreduce
