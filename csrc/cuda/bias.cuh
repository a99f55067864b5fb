// A bias element read in the accumulation type, whatever the bias's floating dtype: shared by the
// bias epilogue (kernels.cu) and the tiled grouped GEMM's fused epilogue (tiled_gemm.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace gmm_allreduce::cuda {

enum BiasDtype : int8_t { kHalf, kBFloat16, kFloat, kDouble };

inline BiasDtype bias_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kHalf;
    case at::kBFloat16:
      return kBFloat16;
    case at::kFloat:
      return kFloat;
    case at::kDouble:
      return kDouble;
    default:
      TORCH_CHECK_TYPE(false, "bias: unsupported dtype ", t);
  }
}

template <typename Acc>
__device__ inline Acc load_bias(const void* p, int8_t dtype, int64_t col) {
  switch (dtype) {
    case kHalf:
      return static_cast<Acc>(static_cast<float>(static_cast<const c10::Half*>(p)[col]));
    case kBFloat16:
      return static_cast<Acc>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[col]));
    case kFloat:
      return static_cast<Acc>(static_cast<const float*>(p)[col]);
    default:
      return static_cast<Acc>(static_cast<const double*>(p)[col]);
  }
}

}  // namespace gmm_allreduce::cuda
