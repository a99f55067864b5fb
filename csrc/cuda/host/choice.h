// Which GEMM the CUDA engine (cuda/engine.cpp) runs for a call, decided from the call, the device's
// compute capability and GMM_CUDA_GEMM alone. Device-free, so that the CPU build tests the rule
// (the test-only op _gemm_choice, testing/kernel_twins.cpp).
//
// - grouped: torch's CUTLASS bf16 grouped GEMM (the kernel behind torch._grouped_mm on sm_90 and
//   sm_100), given our buffer as its output: bf16, one x (split_item 1, 3), one N, and weights that
//   are equally spaced views of one storage (a [G, K, N] parameter's slices), 16-byte aligned rows,
//   fewer than 1024 groups. It writes bf16 only, so it never serves partials kept in fp32
//   (reduce_dtype float32).
// - tiled: our one-launch grouped GEMM (cuda/tiled_gemm.cu, bias fused), fp16/bf16 on sm_80+: any
//   strides, ragged K and N, separate weights, a 16-bit or an fp32 output.
// - loop: one cuBLAS GEMM per group, for everything else.
#pragma once

#include <optional>

#include "core/plan.h"

namespace gmm_allreduce {

enum class Gemm { kAuto, kLoop, kGrouped, kTiled };

// GMM_CUDA_GEMM's values: auto (or empty), loop, grouped, tiled. Raises ValueError otherwise.
Gemm parse_gemm(std::string_view name);
const char* gemm_name(Gemm gemm);

// What the choice depends on besides the call.
struct GemmDevice {
  int major = 0;              // compute capability major (9: sm_90); 0 unknown
  Gemm forced = Gemm::kAuto;  // GMM_CUDA_GEMM
};

// Up to this many groups the per-group loop is chosen over the grouped kernel: cuBLAS per group
// matches the grouped kernel at a few groups and falls far behind it at many (the H100 figures:
// benchmarks/RESULTS.md, "Figures behind the code's thresholds").
constexpr size_t kLoopMaxGroups = 8;

// Past kLoopMaxGroups, where the grouped GEMM cannot serve, the tiled kernel is chosen while the
// mean group is at most this many FLOPs (launch-bound groups; per-group cuBLAS beyond). A first
// guess: calibrate it on a GPU with GMM_CUDA_GEMM=loop|tiled.
constexpr double kTiledMaxGroupFlops = 1 << 28;

// torch's grouped GEMM launches one thread per group and refuses 1024 or more groups.
constexpr int64_t kMaxGroupedGroups = 1023;

// The call's weights as one [G, K, N] view, when the grouped GEMM can take the call on `device`;
// nullopt otherwise. Safe before validation: it checks everything it relies on.
std::optional<at::Tensor> grouped_weight(const OpArgs& args, const GemmDevice& device);

// Engine::takes_device_group_list on `device`: split_item 3 with a group_list tensor (the engine
// checks that it lives on the GPU) that a one-launch GEMM, grouped or tiled, serves from its device
// values. Safe before validation.
bool serves_device_group_list(const OpArgs& args, const GemmDevice& device);

// The GEMM for a planned call; `weight3` is set when it is the grouped one. A forced GEMM that
// cannot take the call falls back to the loop (to the tiled one for a rows-on-device plan).
Gemm choose_gemm(const Plan& plan, const OpArgs& args, const GemmDevice& device,
                 std::optional<at::Tensor>& weight3);

}  // namespace gmm_allreduce
