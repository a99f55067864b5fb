// The ATen engine: one ATen matmul per group, written straight into the group's block of the flat
// output buffer. It uses only ATen ops, so it is registered as the CompositeExplicitAutograd
// kernel: it serves the CPU and any device that has ATen matmuls and a c10d backend; a device
// with its own kernel (csrc/cuda/) takes precedence.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../combine.h"
#include "../op.h"
#include "../quant.h"

namespace gmm_allreduce {
namespace {

// Rows of a block whose rows hold `per_row` elements each, about `budget` elements in all.
int64_t block_rows(int64_t per_row, int64_t budget) {
  return std::max<int64_t>(1, budget / std::max<int64_t>(per_row, 1));
}

// y += bias, added in bias's (accumulation) dtype and rounded once more into y. On the CPU a block
// of rows at a time: TensorIterator's mixed-dtype in-place add is 8x slower there on large outputs
// (4 ns per element) and, past 2^31 elements, allocates several times y; a cache-sized block costs
// one small temporary.
void add_bias(at::Tensor& y, const at::Tensor& bias) {
  if (!y.is_cpu()) {
    y.add_(bias);
    return;
  }
  const int64_t rows = block_rows(y.size(1), int64_t{1} << 16);
  for (int64_t r = 0; r < y.size(0); r += rows) {
    at::Tensor block = y.narrow(0, r, std::min(rows, y.size(0) - r));
    block.copy_(block.to(bias.scalar_type()).add_(bias));
  }
}

// y = x @ w (+ bias) for 16-bit x (fp16 on the CPU; any into reduce_dtype's fp32 buffer): an fp32
// GEMM on upcast operands (the upcast is exact), rounded once into a 16-bit y, a block of rows at a
// time so that the fp32 copies of x and of the output stay small (~4 MB) whatever m is; w is upcast
// once.
void upcast_gemm(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const at::Tensor w32 = w.to(at::kFloat);
  const int64_t rows = block_rows(x.size(1) + y.size(1), int64_t{1} << 20);
  for (int64_t r = 0; r < y.size(0); r += rows) {
    const int64_t count = std::min(rows, y.size(0) - r);
    const bool whole = count == y.size(0);  // one block (small groups): no narrow to dispatch
    const at::Tensor x32 = (whole ? x : x.narrow(0, r, count)).to(at::kFloat);
    at::Tensor out = whole ? y : y.narrow(0, r, count);
    if (out.scalar_type() == at::kFloat) {  // the fp32 buffer of reduce_dtype: written in place
      bias.defined() ? at::addmm_out(out, bias, x32, w32) : at::mm_out(out, x32, w32);
    } else {
      out.copy_(bias.defined() ? at::addmm(bias, x32, w32) : at::mm(x32, w32));
    }
  }
}

// A combined call's chunk: the combine epilogue over each group's products a block of rows at a
// time, which adds the bias, scales by the routing weights and sums into the token rows in fp32.
// The products are fp32 where the GEMM runs in fp32 anyway (fp32 x, fp16 on the CPU, reduce_dtype
// float32), else x's dtype (one rounding).
void compute_combined(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                      const Chunk& chunk, bool upcast) {
  size_t upcast_group = plan.groups.size();  // the group whose weight w32 holds
  at::Tensor w32;
  combine_groups(plan, args, world_size, flat, chunk,
                 [&](size_t i, const at::Tensor& x, int64_t, const at::Tensor&) {
                   if (!upcast) return at::mm(x, args.weight[i]);
                   if (upcast_group != i) w32 = args.weight[i].to(at::kFloat), upcast_group = i;
                   return at::mm(x.to(at::kFloat), w32);
                 });
}

void compute_aten(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                  const Chunk& chunk) {
  // Accumulation type: fp32 for the 16-bit dtypes, the dtype itself for fp32 and fp64.
  const at::ScalarType acc = at::toOpMathType(plan.dtype);
  // ATen's CPU fp16 GEMM is a scalar fallback (~80x slower than fp32 on AVX-512 hosts); an fp32
  // GEMM on upcast operands is exact for fp16 inputs and gives the single rounding of the spec.
  // reduce_dtype float32 for 16-bit x: the fp32 GEMM of upcast operands (ATen's CPU GEMMs have no
  // 16-bit inputs with an fp32 output) writes the unrounded partials into the fp32 buffer.
  const bool upcast =
      (plan.device.is_cpu() && plan.dtype == at::kHalf) || plan.reduce_dtype != plan.dtype;
  if (plan.quant != Quant::kNone) return compute_quantized(plan, args, world_size, flat, chunk);
  if (plan.combine) return compute_combined(plan, args, world_size, flat, chunk, upcast);

  for_each_block(plan, args, flat, 0, chunk, [&](size_t i, at::Tensor& y, const at::Tensor& x) {
    const at::Tensor& w = args.weight[i];
    // bias_i / world_size, divided in the accumulation type: Σ_r bias_i / n then gives bias_i.
    const at::Tensor bias = plan.has_bias ? (*args.bias)[i].to(acc).div(world_size) : at::Tensor();

    if (acc == plan.dtype) {  // fp32, fp64: fused bias, one rounding
      bias.defined() ? at::addmm_out(y, bias, x, w) : at::mm_out(y, x, w);
    } else if (upcast) {  // fp32 GEMM, one rounding into y (none into an fp32 buffer)
      upcast_gemm(y, x, w, bias);
    } else {
      // 16-bit GEMM with fp32 accumulation, rounded once; ATen has no 16-bit GEMM with an fp32
      // output on every device, so a bias is added in fp32 after that rounding (a second one).
      at::mm_out(y, x, w);
      if (bias.defined()) add_bias(y, bias);
    }
  });
}

constexpr Engine kAtenEngine{.compute = &compute_aten};

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("grouped_mat_mul_all_reduce", &op_kernel<&kAtenEngine, Collective::kAllReduce>);
  m.impl("grouped_mat_mul_reduce_scatter", &op_kernel<&kAtenEngine, Collective::kReduceScatter>);
  m.impl("grouped_mat_mul", &compute_kernel<&kAtenEngine>);
}

}  // namespace gmm_allreduce
