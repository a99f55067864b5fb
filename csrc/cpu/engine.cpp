// The ATen engine: one ATen matmul per group, written straight into the group's block of the flat
// output buffer. It uses only ATen ops, so it is registered as the CompositeExplicitAutograd
// kernel: it serves the CPU and any device that has ATen matmuls and a c10d backend; a device
// with its own kernel (csrc/cuda/) takes precedence.
#include "cpu/engine.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/FunctionRef.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "core/combine.h"
#include "core/op.h"
#include "core/quant_gemm.h"
#include "cpu/kernels/isa.h"
#include "cpu/mlp.h"
#include "cpu/quant.h"
#include "cpu/upcast.h"
#include "util/block_rows.h"

namespace gmm_allreduce {
namespace {

// y += bias, added in bias's (accumulation) dtype and rounded once more into y. On the CPU a block
// of rows at a time: TensorIterator's mixed-dtype in-place add is several times slower there on
// large outputs and, past 2^31 elements, allocates several times y; a cache-sized block costs one
// small temporary.
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

// A combined call's chunk: the combine epilogue over each group's products a block of rows at a
// time, which adds the bias, scales by the routing weights and sums into the token rows in fp32.
// The products are fp32 where the GEMM runs in fp32 anyway (fp32 x, 16-bit x that the CPU has no
// native GEMM for, reduce_dtype float32: `in_fp32(i)`), else x's dtype (one rounding). For a fused
// expert block, each block's x is its rows' activations (cpu/mlp.h), the gate_up product in fp32
// alike.
void compute_combined(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                      const Chunk& chunk, c10::function_ref<bool(size_t)> in_fp32) {
  // Each thread its own upcast weights (the blocks run in parallel).
  const size_t threads = std::max(1, at::get_num_threads());
  std::vector<Fp32Products> down(threads, Fp32Products(/*scratch=*/0));
  std::vector<Fp32Products> gate_up(threads, Fp32Products(/*scratch=*/1));
  combine_groups(
      plan, args, world_size, flat, chunk,
      [&](size_t i, const at::Tensor& x, int64_t, const at::Tensor& rows) {
        const bool fp32 = in_fp32(i);
        if (plan.device.is_cpu()) note_kernel(fp32 ? CpuKernel::kUpcast : CpuKernel::kNative);
        const size_t t = std::min<size_t>(at::get_thread_num(), threads - 1);
        const at::Tensor a = args.mlp.fused ? gated_rows(plan, args, i, rows, fp32, gate_up[t]) : x;
        return fp32 ? down[t](a, args.weight[i]) : at::mm(a, args.weight[i]);
      },
      /*parallel=*/true);
}

void compute_aten(const Plan& plan, const OpArgs& args, int64_t world_size, at::Tensor& flat,
                  const Chunk& chunk) {
  // Accumulation type: fp32 for the 16-bit dtypes, the dtype itself for fp32 and fp64.
  const at::ScalarType acc = at::toOpMathType(plan.dtype);
  // A 16-bit GEMM the CPU has no native kernel for (fp16 everywhere: ATen's CPU fp16 GEMM is a
  // scalar loop; bf16 below AVX512-BF16, where ATen's is a reference loop far slower than fp32;
  // isa.h) runs as an fp32 GEMM on upcast operands: exact upcasts, one rounding, as natively.
  // reduce_dtype float32 for 16-bit x: the fp32 GEMM of upcast operands (ATen's CPU GEMMs have no
  // 16-bit inputs with an fp32 output) writes the unrounded partials into the fp32 buffer.
  const bool fp32_partials = plan.reduce_dtype != plan.dtype;
  const auto upcast = [&](size_t i) {
    const GroupPlan& g = plan.groups[i];
    return fp32_partials || (plan.device.is_cpu() && !cpu_native_gemm(plan.dtype, g.m * g.k * g.n));
  };
  if (plan.quant != Quant::kNone) {  // a fused block's x: its activations, fp32
    Fp32Products gate_up(/*scratch=*/1);
    return compute_quantized(plan, args, world_size, flat, chunk, kCpuQuantProducts,
                             [&](size_t i, const at::Tensor& rows) {
                               return gated_rows(plan, args, i, rows, true, gate_up);
                             });
  }
  if (plan.combine) return compute_combined(plan, args, world_size, flat, chunk, upcast);

  for_each_block(plan, args, flat, 0, chunk, [&](size_t i, at::Tensor& y, const at::Tensor& x) {
    const at::Tensor& w = args.weight[i];
    // bias_i / world_size, divided in the accumulation type: Σ_r bias_i / n then gives bias_i.
    const at::Tensor bias = plan.has_bias ? (*args.bias)[i].to(acc).div(world_size) : at::Tensor();
    const bool in_fp32 = acc != plan.dtype && upcast(i);
    if (x.is_cpu()) note_kernel(in_fp32 ? CpuKernel::kUpcast : CpuKernel::kNative);

    if (acc == plan.dtype) {  // fp32, fp64: fused bias, one rounding
      bias.defined() ? at::addmm_out(y, bias, x, w) : at::mm_out(y, x, w);
    } else if (in_fp32) {  // fp32 GEMM, one rounding into y (none into an fp32 buffer)
      upcast_gemm(y, x, w, bias);
    } else {
      // 16-bit GEMM with fp32 accumulation, rounded once; ATen has no 16-bit GEMM with an fp32
      // output on every device, so a bias is added in fp32 after that rounding (a second one).
      at::mm_out(y, x, w);
      if (bias.defined()) add_bias(y, bias);
    }
  });
}

// The CPU's tier: a GMM_CPU_ISA it does not know fails the call here, before any communication
// (with check_ranks, on every rank).
void check_environment(const OpArgs& args) {
  const bool on_cpu = args.mlp.hidden
                          ? args.mlp.hidden->is_cpu()
                          : !args.x.empty() && args.x[0].defined() && args.x[0].is_cpu();
  if (on_cpu) cpu_tier();
}

// A block on the CPU is fused (cpu/mlp.h); on another device served by ATen, composed.
bool fuses_mlp(const OpArgs& args) { return args.mlp.hidden && args.mlp.hidden->is_cpu(); }

constexpr Engine kAtenEngine{
    .compute = &compute_aten, .check_environment = &check_environment, .fuses_mlp = &fuses_mlp};

}  // namespace

const Engine& cpu_engine() { return kAtenEngine; }

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  register_op_kernels<&kAtenEngine>(m);
}

}  // namespace gmm_allreduce
