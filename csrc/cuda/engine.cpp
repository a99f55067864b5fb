// The CUDA engine: the op's kernel for CUDA tensors, on the shared validation, plan and
// all-reduce of op.cpp. Per chunk it runs one GEMM strategy and then the bias epilogue (one launch,
// kernels.cu) into the flat output buffer:
// - grouped: CUTLASS's bf16 grouped GEMM, the kernel behind torch._grouped_mm on sm_90/sm_100
//   (at::cuda::detail::bf16bf16_grouped_mm, given our buffer as its output): one launch for all
//   groups, group offsets read on the device. It serves bf16, one x (split_item 1, 3), one N, and
//   weights that are equally spaced views of one storage (a [G, K, N] parameter's slices), with
//   16-byte aligned rows. split_item 3 with a device group_list then costs no host sync.
// - tiled: our own one-launch grouped GEMM (tiled_gemm.cu, bias fused) for fp16/bf16 calls of
//   many small groups that the grouped one cannot take (fp16, split_item 0 and 2, separate
//   weights, any strides).
// - loop: one cuBLAS GEMM per group (at::mm_out into the group's block), for everything else.
// The rule between them (choose_gemm) follows the H100 measurements of DEVELOPERS.md; the
// environment variable GMM_CUDA_GEMM=loop|grouped|tiled overrides it, for the benchmark.
#include <ATen/ATen.h>
#include <ATen/native/cuda/GroupMM.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "../blocks.h"
#include "../op.h"
#include "kernels.h"

namespace gmm_allreduce::cuda {
namespace {

enum class Gemm { kAuto, kLoop, kGrouped, kTiled };

// Up to this many groups the per-group loop is chosen over the grouped kernel. Measured on the
// H100 (bf16 TFLOP/s, grouped / loop): 8 groups, moe8_big 683 / 706 and moe8_deep 563 / 600; 64
// groups, moe64_ffn 426 / 213 and moe64_small 34 / 1.5.
constexpr size_t kLoopMaxGroups = 8;

// Past kLoopMaxGroups, where the grouped GEMM cannot serve, the tiled kernel is chosen while the
// mean group is at most this many FLOPs (launch-bound groups; per-group cuBLAS beyond). A first
// guess, not yet measured: calibrate it on the GPU with GMM_CUDA_GEMM=loop|tiled.
constexpr double kTiledMaxGroupFlops = 1 << 28;

Gemm forced_gemm() {
  static const Gemm forced = [] {
    const char* v = std::getenv("GMM_CUDA_GEMM");
    if (v == nullptr || std::strcmp(v, "auto") == 0 || *v == '\0') return Gemm::kAuto;
    if (std::strcmp(v, "loop") == 0) return Gemm::kLoop;
    if (std::strcmp(v, "grouped") == 0) return Gemm::kGrouped;
    if (std::strcmp(v, "tiled") == 0) return Gemm::kTiled;
    TORCH_CHECK_VALUE(false, "GMM_CUDA_GEMM: expected auto, loop, grouped or tiled, got \"", v,
                      "\"");
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

// sm_90 and sm_100: the archs torch builds CUTLASS's grouped GEMM for.
bool has_grouped_gemm(c10::DeviceIndex device) {
  const int major = capability_major(device);
  return major == 9 || major == 10;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// A 2-D [rows, cols] operand the grouped GEMM reads as it is: row- or column-major, its leading
// stride a multiple of 16 bytes (8 bf16 elements).
bool grouped_ready(at::IntArrayRef sizes, at::IntArrayRef strides) {
  return (strides[1] == 1 && strides[0] >= std::max<int64_t>(1, sizes[1]) && strides[0] % 8 == 0) ||
         (strides[0] == 1 && strides[1] >= std::max<int64_t>(1, sizes[0]) && strides[1] % 8 == 0);
}

// The call's weights as one [G, K, N] view, when the grouped GEMM can take this call: see the
// file comment. nullopt otherwise. Runs before validation, so it checks what it relies on.
std::optional<at::Tensor> grouped_weight(const OpArgs& a) {
  if (a.split_item != 1 && a.split_item != 3) return std::nullopt;
  if (a.x.size() != 1 || a.weight.empty() || !a.x[0].defined()) return std::nullopt;
  const at::Tensor& x = a.x[0];
  if (!x.is_cuda() || x.scalar_type() != at::kBFloat16 || x.dim() != 2) return std::nullopt;
  if (!has_grouped_gemm(x.device().index())) return std::nullopt;
  const int64_t k = x.size(1);
  // x is cut by rows: row-major with 16-byte rows, so every group and chunk starts aligned.
  if (k == 0 || x.size(0) > INT32_MAX || x.stride(1) != 1 || x.stride(0) % 8 != 0)
    return std::nullopt;
  if (x.numel() > 0 && !aligned16(x)) return std::nullopt;
  const at::Tensor& w0 = a.weight[0];
  if (!w0.defined() || w0.dim() != 2 || w0.size(0) != k || w0.size(1) % 8 != 0 || w0.size(1) == 0)
    return std::nullopt;
  if (!grouped_ready(w0.sizes(), w0.strides()) || !aligned16(w0)) return std::nullopt;
  const auto groups = static_cast<int64_t>(a.weight.size());
  const int64_t elem = static_cast<int64_t>(w0.element_size());
  const auto base = reinterpret_cast<intptr_t>(w0.const_data_ptr());
  int64_t step = 0;  // elements between consecutive weights
  for (int64_t i = 0; i < groups; ++i) {
    const at::Tensor& w = a.weight[i];
    if (!w.defined() || w.device() != x.device() || w.scalar_type() != at::kBFloat16 ||
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

// Engine::device_rows: split_item 3 with a device group_list that the grouped GEMM will serve.
bool device_rows(const OpArgs& a) {
  if (a.split_item != 3 || !a.group_list_tensor || a.group_list_tensor->device().is_cpu())
    return false;
  if (forced_gemm() == Gemm::kLoop || (a.bias && a.bias->size() > kMaxLaunchGroups)) return false;
  return grouped_weight(a).has_value();
}

// The strategy for this call, and the [G, K, N] weight when it is the grouped one.
Gemm choose_gemm(const Plan& plan, const OpArgs& a, std::optional<at::Tensor>& weight3) {
  const Gemm forced = forced_gemm();
  const bool many = plan.groups.size() > kLoopMaxGroups;
  if (plan.device_rows || forced == Gemm::kGrouped || (forced == Gemm::kAuto && many)) {
    weight3 = grouped_weight(a);
  }
  TORCH_INTERNAL_ASSERT(!plan.device_rows || weight3.has_value());
  if (weight3) return Gemm::kGrouped;
  // The tiled kernel: 16-bit tensor-core MMA, bf16 from sm_80 on.
  const bool half = plan.dtype == at::kHalf || plan.dtype == at::kBFloat16;
  if (!half || forced == Gemm::kLoop || capability_major(plan.device.index()) < 8) {
    return Gemm::kLoop;
  }
  if (forced == Gemm::kTiled) return Gemm::kTiled;
  double flops = 0;
  for (const GroupPlan& g : plan.groups) flops += 2.0 * g.m * g.n * g.k;
  return many && flops / plan.groups.size() <= kTiledMaxGroupFlops ? Gemm::kTiled : Gemm::kLoop;
}

void loop_gemm(const Plan& plan, const OpArgs& a, at::Tensor& flat, const Chunk& chunk) {
  for_each_block(plan, a, flat, chunk, [&](size_t i, at::Tensor& y, const at::Tensor& x) {
    at::mm_out(y, x, a.weight[i]);
  });
}

// The chunk's rows of x times their groups' weights, into the chunk's [rows, N] block of flat.
// Returns the group offsets it used (int32 end rows within the chunk).
at::Tensor grouped_gemm(const Plan& plan, const OpArgs& a, const at::Tensor& weight3,
                        at::Tensor& flat, const Chunk& chunk) {
  const int64_t rows = chunk.row_end - chunk.row_begin;
  const int64_t n = plan.groups[0].n;
  at::Tensor offs;
  if (plan.device_rows) {
    offs = chunk_row_ends(*a.group_list_tensor, a.group_list_type, plan.rows, chunk.row_begin,
                          chunk.row_end);
  } else {
    std::vector<int32_t> ends;
    for (const GroupPlan& g : plan.groups) {
      const int64_t end = std::clamp(g.x_row + g.m, chunk.row_begin, chunk.row_end);
      ends.push_back(static_cast<int32_t>(end - chunk.row_begin));
    }
    // A pageable host-to-device copy: queued on the stream, no sync.
    offs = at::tensor(ends, at::kInt).to(flat.device(), /*non_blocking=*/true);
  }
  at::Tensor out = flat.narrow(0, chunk.elem_begin, rows * n).view({rows, n});
  at::cuda::detail::bf16bf16_grouped_mm(a.x[0].narrow(0, chunk.row_begin, rows), weight3, offs,
                                        std::nullopt, out);
  return offs;
}

void tiled_gemm(const Plan& plan, const OpArgs& a, int64_t world_size, at::Tensor& flat,
                const Chunk& chunk) {
  std::vector<at::Tensor> keep;
  tiled_grouped_gemm(plan.dtype, gemm_blocks(plan, a, flat, chunk, keep), world_size);
}

void compute_cuda(const Plan& plan, const OpArgs& a, int64_t world_size, at::Tensor& flat,
                  const Chunk& chunk) {
  if (chunk.elem_end == chunk.elem_begin) return;
  std::optional<at::Tensor> weight3;
  std::optional<at::Tensor> row_ends;
  const Gemm gemm = choose_gemm(plan, a, weight3);
  if (gemm == Gemm::kTiled) {  // the bias is fused
    tiled_gemm(plan, a, world_size, flat, chunk);
    return;
  }
  if (gemm == Gemm::kGrouped) {
    try {
      row_ends = grouped_gemm(plan, a, *weight3, flat, chunk);
    } catch (const c10::Error& e) {
      // A torch build without the CUTLASS kernel for this GPU: the loop serves a host plan.
      if (plan.device_rows) throw;
      TORCH_WARN_ONCE("gmm_allreduce: the grouped GEMM is unavailable (",
                      e.what_without_backtrace(), "); falling back to one GEMM per group");
      loop_gemm(plan, a, flat, chunk);
    }
  } else {
    loop_gemm(plan, a, flat, chunk);
  }
  if (plan.has_bias) add_bias(flat, plan, *a.bias, world_size, chunk, row_ends);
}

constexpr Engine kCudaEngine{&compute_cuda, &device_rows};

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CUDA, m) {
  m.impl("grouped_mat_mul_all_reduce", &op_kernel<&kCudaEngine>);
  m.impl("grouped_mat_mul", &compute_kernel<&kCudaEngine>);
}

}  // namespace gmm_allreduce::cuda
