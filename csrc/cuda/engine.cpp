// The CUDA engine: the op's kernel for CUDA tensors, under the driver's validation, plan and
// collective strategies (core/op.cpp). Per chunk it runs one of three GEMMs (the rule:
// cuda/host/choice.h) into the flat output buffer, and the bias epilogue where the GEMM does not
// fuse it:
// - grouped: torch's CUTLASS bf16 grouped GEMM (at::cuda::detail::bf16bf16_grouped_mm, given our
//   buffer as its output), one launch; group offsets written on the device (from a device
//   group_list, or from the plan's rows passed as kernel parameters), so that nothing copies from
//   the host. With a bias, its bf16 output is rounded before the bias is added (a second rounding,
//   as on the CPU in bf16).
// - tiled: our one-launch grouped GEMM (tiled_gemm.cu), bias fused before the single rounding; for
//   host-planned blocks, or for split_item 3 with its group rows on the device. With reduce_dtype
//   float32 it writes the fp32 flat buffer, unrounded.
// - loop: one cuBLAS GEMM per group. 16-bit products go to an fp32 buffer (mm with an fp32 output:
//   no 16-bit split-K reduction), rounded once into the flat buffer with the bias; with
//   reduce_dtype float32 the flat buffer itself is that fp32 buffer.
// GMM_CUDA_GEMM=loop|grouped|tiled overrides the rule, for the benchmark.
#include <ATen/ATen.h>
#include <ATen/native/cuda/GroupMM.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "core/combine.h"
#include "core/op.h"
#include "core/quant_gemm.h"
#include "cuda/host/blocks.h"
#include "cuda/host/choice.h"
#include "cuda/launches.h"

namespace gmm_allreduce::cuda {
namespace {

Gemm forced_gemm() {
  static const Gemm forced = [] {
    const char* v = std::getenv("GMM_CUDA_GEMM");
    return parse_gemm(v == nullptr ? "" : v);
  }();
  return forced;
}

// The device's compute capability major (9: sm_90), asked of the runtime once per process.
int capability_major(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<int> major;
  std::call_once(once, [] {
    major.resize(c10::cuda::device_count());
    for (size_t d = 0; d < major.size(); ++d) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[d], cudaDevAttrComputeCapabilityMajor,
                                            static_cast<int>(d)));
    }
  });
  return device >= 0 && static_cast<size_t>(device) < major.size() ? major[device] : 0;
}

GemmDevice gemm_device(c10::Device device) {
  return {capability_major(device.index()), forced_gemm()};
}

// Engine::takes_device_group_list: split_item 3 with a group_list on x's GPU, which a one-launch
// GEMM serves.
bool takes_device_group_list(const OpArgs& a) {
  if (!a.group_list_tensor || !a.group_list_tensor->defined() ||
      a.group_list_tensor->device().is_cpu() || a.x.size() != 1 || !a.x[0].defined() ||
      !a.x[0].is_cuda() || !at::isFloatingType(a.x[0].scalar_type()) ||
      a.x[0].scalar_type() == at::kFloat8_e4m3fn || a.weight.empty() || !a.weight[0].defined() ||
      a.weight[0].scalar_type() == at::kChar)
    return false;  // quantised calls (quant.h) plan their rows on the host
  return serves_device_group_list(a, gemm_device(a.x[0].device()));
}

// Group g's end row within the chunk, for the grouped GEMM's offsets.
std::vector<int32_t> host_row_ends(const Plan& plan, const Chunk& chunk) {
  std::vector<int32_t> ends;
  for (const GroupPlan& g : plan.groups) {
    const int64_t end = std::clamp(g.x_row + g.m, chunk.row_begin, chunk.row_end);
    ends.push_back(static_cast<int32_t>(end - chunk.row_begin));
  }
  return ends;
}

// The chunk's rows of x times their groups' weights, into the chunk's [rows, N] block of flat.
void grouped_gemm(const OpArgs& a, const at::Tensor& weight3, const at::Tensor& row_ends,
                  at::Tensor& flat, const Chunk& chunk, int64_t n) {
  const int64_t rows = chunk.row_end - chunk.row_begin;
  at::Tensor out = flat.narrow(0, chunk.elem_begin, rows * n).view({rows, n});
  at::cuda::detail::bf16bf16_grouped_mm(a.x[0].narrow(0, chunk.row_begin, rows), weight3, row_ends,
                                        std::nullopt, out);
}

// One cuBLAS GEMM per group; 16-bit products through an fp32 buffer, rounded once with the bias.
void loop_gemm(const Plan& plan, const OpArgs& a, int64_t world_size, at::Tensor& flat,
               const Chunk& chunk) {
  const int64_t count = chunk.elem_end - chunk.elem_begin;
  if (plan.reduce_dtype != plan.dtype) {  // 16-bit x, fp32 partials kept in the fp32 buffer
    for_each_block(plan, a, flat, 0, chunk, [&](size_t i, at::Tensor& y, const at::Tensor& x) {
      at::mm_out(y, x, a.weight[i], at::kFloat);
      if (plan.has_bias) y.add_((*a.bias)[i].to(at::kFloat).div(world_size));
    });
    return;
  }
  if (plan.dtype == at::kFloat || plan.dtype == at::kDouble) {
    for_each_block(plan, a, flat, 0, chunk, [&](size_t i, at::Tensor& y, const at::Tensor& x) {
      at::mm_out(y, x, a.weight[i]);
    });
    if (plan.has_bias) add_bias(flat, plan, *a.bias, world_size, chunk, std::nullopt, std::nullopt);
    return;
  }
  at::Tensor products = at::empty({count}, flat.options().dtype(at::kFloat));
  for_each_block(plan, a, products, chunk.elem_begin, chunk,
                 [&](size_t i, at::Tensor& y, const at::Tensor& x) {
                   at::mm_out(y, x, a.weight[i], at::kFloat);
                 });
  if (plan.has_bias) {
    add_bias(flat, plan, *a.bias, world_size, chunk, std::nullopt, products);
  } else {
    flat.narrow(0, chunk.elem_begin, count).copy_(products);  // one rounding
  }
}

void compute_cuda(const Plan& plan, const OpArgs& a, int64_t world_size, at::Tensor& flat,
                  const Chunk& chunk);

// Quantised calls take ATen's products (cuBLASLt's int8 and fp8 GEMMs where they apply).
constexpr QuantProducts kQuantProducts{.product = &aten_product};

// A combined call: the products of every expert row (bias included) by the GEMM the call gets,
// into a scratch buffer, then the combine epilogue's ATen ops (an fp32 index_add_, no host read of
// combine_index), all with the first chunk (Combine::on_device).
void compute_combined(const Plan& plan, const OpArgs& a, int64_t world_size, at::Tensor& flat,
                      const Chunk& chunk) {
  const std::optional<Chunk> all = Combine::on_device(plan, chunk);
  if (!all) return;
  const Plan expert = expert_plan(plan);
  at::Tensor products = at::empty({expert.numel}, flat.options().dtype(expert.reduce_dtype));
  compute_cuda(expert, a, world_size, products, expert.chunks.front());
  Combine combine(plan, a, world_size, flat, *all);
  combine.add_all(products.view({expert.rows, expert.groups.front().n}));
  combine.finish();
}

void compute_cuda(const Plan& plan, const OpArgs& a, int64_t world_size, at::Tensor& flat,
                  const Chunk& chunk) {
  // Quantised calls: ATen's int8 and fp8 GEMMs per group (core/quant_gemm.h).
  if (plan.quant != Quant::kNone) {
    return compute_quantized(plan, a, world_size, flat, chunk, kQuantProducts);
  }
  if (plan.combine) return compute_combined(plan, a, world_size, flat, chunk);
  if (chunk.elem_end == chunk.elem_begin) return;
  std::optional<at::Tensor> weight3;
  const Gemm gemm = choose_gemm(plan, a, gemm_device(plan.device), weight3);
  // The chunk's group end rows on the device: computed there from a device group_list, or
  // written from the plan (kernel parameters, no copy from pageable memory).
  std::optional<at::Tensor> row_ends;
  if (plan.rows_on_device) {
    row_ends = chunk_row_ends(*a.group_list_tensor, a.group_list_type, plan.rows, chunk.row_begin,
                              chunk.row_end);
  } else if (gemm == Gemm::kGrouped) {
    row_ends = device_row_ends(host_row_ends(plan, chunk), flat.device());
  }
  std::vector<at::Tensor> keep;  // operand copies, alive until their launches are queued
  switch (gemm) {
    case Gemm::kTiled:  // the bias is fused
      if (plan.rows_on_device) {
        tiled_grouped_gemm(
            plan.dtype, plan.reduce_dtype,
            rows_tiled_launches(plan, a, flat, chunk, row_ends->const_data_ptr<int32_t>(),
                                world_size, keep));
      } else {
        tiled_grouped_gemm(plan.dtype, plan.reduce_dtype,
                           tiled_launches(gemm_blocks(plan, a, flat, chunk, keep), world_size));
      }
      return;
    case Gemm::kGrouped:
      grouped_gemm(a, *weight3, *row_ends, flat, chunk, plan.groups.front().n);
      if (plan.has_bias) {
        add_bias(flat, plan, *a.bias, world_size, chunk,
                 plan.rows_on_device ? row_ends : std::nullopt, std::nullopt);
      }
      return;
    default:
      loop_gemm(plan, a, world_size, flat, chunk);
  }
}

constexpr Engine kCudaEngine{.compute = &compute_cuda,
                             .takes_device_group_list = &takes_device_group_list};

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CUDA, m) { register_op_kernels<&kCudaEngine>(m); }

}  // namespace gmm_allreduce::cuda
