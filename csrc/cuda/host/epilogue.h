// What the CUDA engine's small kernels (cuda/launches.cu, cuda/tiled_gemm.cu) compute per element,
// as host-and-device functions: the row offsets of a device group_list and the bias epilogue.
// The kernels call them on the GPU; their CPU twins (testing/kernel_twins.cpp) call the same source
// on the host, so that tests check this logic without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/plan.h"

namespace gmm_allreduce {

// Groups whose bias metadata one launch of the bias epilogue carries as kernel parameters.
constexpr int64_t kMaxLaunchGroups = 256;

enum BiasDtype : int8_t { kBiasHalf, kBiasBFloat16, kBiasFloat, kBiasDouble };

BiasDtype bias_dtype(at::ScalarType t);

// One launch of the bias epilogue, passed by value (kernel parameters: nothing to copy to the
// device, nothing a CUDA graph must keep alive): about 6.4 KB, within the 32 KB that CUDA 12.1+
// allows on sm_70 and newer.
struct BiasArgs {
  int64_t elem_begin;  // elements [elem_begin, elem_end) of flat
  int64_t elem_end;
  int64_t world_size;
  // The products to round into flat: src[e - src_begin] in fp32 (the loop GEMM's output), or
  // nullptr for flat's own elements.
  const float* src;
  int64_t src_begin;
  int32_t groups;
  // Host layout (row_ends == nullptr): group g covers elements [first[g], first[g + 1]) of flat,
  // rows of n[g] columns. Rows layout: every row has n[0] columns; group g covers the rows
  // [row_ends[g - 1], row_ends[g]) counted from elem_begin / n[0].
  const int32_t* row_ends;
  int64_t first[kMaxLaunchGroups + 1];
  int64_t n[kMaxLaunchGroups];
  const void* bias[kMaxLaunchGroups];
  int8_t bias_dtype[kMaxLaunchGroups];
};

// The launches that add bias_g / world_size to the chunk's elements: in the plan's layout, or in
// the rows layout when row_ends (the chunk's end rows, as write_row_ends gives them) is given.
// With src (the chunk's elements in fp32, plan layout only), each element is src's plus the bias,
// rounded once into flat. Biases that are not contiguous are copied into `keep`, which must
// outlive the launches.
std::vector<BiasArgs> bias_launches(const Plan& plan, at::TensorList bias, int64_t world_size,
                                    const Chunk& chunk, const int32_t* row_ends, const float* src,
                                    std::vector<at::Tensor>& keep);

// First index i in [0, count) with v < a[i] (count if none).
template <typename T>
C10_HOST_DEVICE inline int32_t upper_bound(const T* a, int32_t count, int64_t v) {
  int32_t lo = 0, hi = count;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(a[mid]) <= v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename Acc>
C10_HOST_DEVICE inline Acc load_bias(const void* p, int8_t dtype, int64_t col) {
  switch (dtype) {
    case kBiasHalf:
      return static_cast<Acc>(static_cast<float>(static_cast<const c10::Half*>(p)[col]));
    case kBiasBFloat16:
      return static_cast<Acc>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[col]));
    case kBiasFloat:
      return static_cast<Acc>(static_cast<const float*>(p)[col]);
    default:
      return static_cast<Acc>(static_cast<const double*>(p)[col]);
  }
}

// flat[e] = round(v + bias_g[col] / world_size) with v = flat[e] or src's element, in fp32 (fp64
// for fp64), rounded once into T.
template <typename T>
C10_HOST_DEVICE inline void add_bias_at(T* flat, const BiasArgs& a, int64_t e) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  int32_t g;
  int64_t col;
  if (a.row_ends != nullptr) {
    const int64_t local = e - a.elem_begin;
    g = upper_bound(a.row_ends, a.groups, local / a.n[0]);
    col = local % a.n[0];
  } else {
    g = upper_bound(a.first + 1, a.groups, e);  // first[g] <= e < first[g + 1]
    col = g < a.groups ? (e - a.first[g]) % a.n[g] : 0;
  }
  if (g >= a.groups) return;
  const Acc b = load_bias<Acc>(a.bias[g], a.bias_dtype[g], col) / static_cast<Acc>(a.world_size);
  const Acc v =
      a.src != nullptr ? static_cast<Acc>(a.src[e - a.src_begin]) : static_cast<Acc>(flat[e]);
  flat[e] = static_cast<T>(v + b);
}

// out[i] (int32): the end row of group i within x's rows [row_begin, row_end), relative to
// row_begin, from a group_list of cumulative end rows (counts = false) or counts, read through
// `stride`. The values are made non-decreasing within [0, rows] and the last one is rows, so that
// whatever the list holds (it is not validated where it lives on the device) no kernel touches
// memory outside x or the output; a valid list gives its exact ends.
template <typename I>
C10_HOST_DEVICE inline void write_row_ends(const I* group_list, int64_t stride, int64_t groups,
                                           bool counts, int64_t rows, int64_t row_begin,
                                           int64_t row_end, int32_t* out) {
  int64_t prev = 0;
  for (int64_t i = 0; i < groups; ++i) {
    const auto v = static_cast<int64_t>(group_list[i * stride]);
    int64_t end;
    if (counts) {
      end = v <= 0 ? prev : (v > rows - prev ? rows : prev + v);  // saturating prev + v
    } else {
      end = v < prev ? prev : (v > rows ? rows : v);
    }
    if (i == groups - 1) end = rows;  // every row belongs to some group
    prev = end;
    const int64_t clamped = end < row_begin ? row_begin : (end > row_end ? row_end : end);
    out[i] = static_cast<int32_t>(clamped - row_begin);
  }
}

}  // namespace gmm_allreduce
