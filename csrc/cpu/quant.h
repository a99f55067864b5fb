// The CPU engine's quantised products (core/quant_gemm.h): its kernels, tried in order, each fused
// with the epilogue; below them ATen's products, never its reference int8 or 16-bit loops.
#pragma once

#include "core/quant_gemm.h"

namespace gmm_allreduce {

extern const QuantProducts kCpuQuantProducts;

}  // namespace gmm_allreduce
