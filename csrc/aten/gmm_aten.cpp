// The ATen engine: one ATen matmul per group, written straight into the group's block of the flat
// output buffer. It uses only ATen ops, so it is registered as the CompositeExplicitAutograd
// kernel: it serves the CPU and any device that has ATen matmuls and a c10d backend; a device
// with its own kernel (csrc/cuda/) takes precedence.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../combine.h"
#include "../op.h"

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

// A combined call's chunk of token rows: each group's products a block of rows at a time (those
// whose token is in the chunk), handed to the combine epilogue, which adds the bias, scales by the
// routing weights and sums into the token rows in fp32. The products are fp32 where the GEMM runs
// in fp32 anyway (fp32 x, fp16 on the CPU, reduce_dtype float32), else x's dtype (one rounding).
void compute_combined(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                      const Chunk& chunk, bool upcast) {
  std::optional<Chunk> mine = chunk;
  if (!plan.device.is_cpu()) mine = Combine::on_device(plan, chunk);
  if (!mine) return;
  Combine combine(plan, args, world_size, flat, *mine);
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    if (g.m == 0 || g.n == 0) continue;
    const at::Tensor w = upcast ? args.weight[i].to(at::kFloat) : args.weight[i];
    auto product = [&](const at::Tensor& x) { return at::mm(upcast ? x.to(at::kFloat) : x, w); };
    const int64_t rows = block_rows(g.k + g.n, int64_t{1} << 20);
    if (combine.whole()) {
      for (int64_t r = 0; r < g.m; r += rows) {
        const int64_t count = std::min(rows, g.m - r);
        combine.add(i, product(group_x(plan, args.x, i, r, count)), r);
      }
      continue;
    }
    const at::Tensor mine = combine.rows_of(i);  // this chunk's rows of the group
    const at::Tensor x = group_x(plan, args.x, i);
    for (int64_t r = 0; r < mine.numel(); r += rows) {
      const at::Tensor some = mine.narrow(0, r, std::min(rows, mine.numel() - r));
      combine.add(i, product(x.index_select(0, some)), some);
    }
  }
  combine.finish();
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
