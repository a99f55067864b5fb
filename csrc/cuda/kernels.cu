#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "bias.cuh"
#include "kernels.h"

namespace gmm_allreduce::cuda {
namespace {

// ---- Row offsets ---------------------------------------------------------------------------

// One thread: the scan over the groups is sequential and short (tens of groups), and a single
// launch keeps it off the host and capturable in a CUDA graph.
template <typename I>
__global__ void row_ends_kernel(const I* group_list, int64_t stride, int64_t groups, bool counts,
                                int64_t rows, int64_t row_begin, int64_t row_end, int32_t* out) {
  int64_t prev = 0;
  for (int64_t i = 0; i < groups; ++i) {
    const int64_t v = static_cast<int64_t>(group_list[i * stride]);
    int64_t end;
    if (counts) {
      end = v <= 0 ? prev : (v > rows - prev ? rows : prev + v);  // saturating prev + v
    } else {
      end = v < prev ? prev : (v > rows ? rows : v);
    }
    if (i == groups - 1) end = rows;  // every row belongs to some group
    prev = end;
    out[i] = static_cast<int32_t>(std::min(std::max(end, row_begin), row_end) - row_begin);
  }
}

// ---- Bias epilogue -------------------------------------------------------------------------

// One launch's groups, passed by value (kernel parameters, so nothing to copy to the device and
// nothing a CUDA graph would have to keep alive): about 6.4 KB, within the 32 KB that CUDA 12.1+
// allows on sm_70 and newer.
struct BiasArgs {
  int64_t elem_begin;  // elements [elem_begin, elem_end) of flat
  int64_t elem_end;
  int64_t world_size;
  int32_t groups;
  // Host layout (row_ends == nullptr): group g covers elements [first[g], first[g + 1]) of flat,
  // rows of n[g] columns. Device layout: every row has n[0] columns; group g covers the rows
  // [row_ends[g - 1], row_ends[g]) counted from elem_begin / n[0].
  const int32_t* row_ends;
  int64_t first[kMaxLaunchGroups + 1];
  int64_t n[kMaxLaunchGroups];
  const void* bias[kMaxLaunchGroups];
  int8_t bias_dtype[kMaxLaunchGroups];
};

// First index i in [0, count) with v < a[i] (count if none).
template <typename T>
__device__ int32_t upper_bound(const T* a, int32_t count, int64_t v) {
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

template <typename T>
__global__ void add_bias_kernel(T* flat, const __grid_constant__ BiasArgs a) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = a.elem_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < a.elem_end; e += step) {
    int32_t g;
    int64_t col;
    if (a.row_ends != nullptr) {
      const int64_t local = e - a.elem_begin;
      g = upper_bound(a.row_ends, a.groups, local / a.n[0]);
      col = local % a.n[0];
    } else {
      g = upper_bound(a.first + 1, a.groups, e);  // first[g] <= e < first[g + 1]
      if (g >= a.groups) continue;
      col = (e - a.first[g]) % a.n[g];
    }
    if (g >= a.groups) continue;
    const Acc b = load_bias<Acc>(a.bias[g], a.bias_dtype[g], col) / static_cast<Acc>(a.world_size);
    flat[e] = static_cast<T>(static_cast<Acc>(flat[e]) + b);
  }
}

void launch_add_bias(at::Tensor& flat, const BiasArgs& args) {
  const int64_t count = args.elem_end - args.elem_begin;
  if (count <= 0) return;
  constexpr int kThreads = 256;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((count + kThreads - 1) / kThreads, int64_t{1} << 16));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "add_bias", [&] {
    add_bias_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(flat.data_ptr<scalar_t>(), args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor chunk_row_ends(const at::Tensor& group_list, int64_t group_list_type, int64_t rows,
                          int64_t row_begin, int64_t row_end) {
  const int64_t groups = group_list.numel();
  at::Tensor out = at::empty({groups}, group_list.options().dtype(at::kInt));
  if (groups == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(group_list.scalar_type(), "chunk_row_ends", [&] {
    row_ends_kernel<index_t><<<1, 1, 0, stream>>>(
        group_list.const_data_ptr<index_t>(), group_list.stride(0), groups, group_list_type == 1,
        rows, row_begin, row_end, out.mutable_data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void add_bias(at::Tensor& flat, const Plan& plan, at::TensorList bias, int64_t world_size,
              const Chunk& chunk, const std::optional<at::Tensor>& row_ends) {
  const auto groups = static_cast<int64_t>(plan.groups.size());
  std::vector<at::Tensor> keep;  // contiguous biases, alive until their launch is queued
  auto fill_bias = [&](BiasArgs& a, int64_t slot, int64_t g) {
    keep.push_back(bias[g].contiguous());
    a.bias[slot] = keep.back().const_data_ptr();
    a.bias_dtype[slot] = bias_dtype(keep.back().scalar_type());
  };
  BiasArgs a{};
  a.world_size = world_size;
  if (plan.device_rows) {
    TORCH_CHECK(row_ends.has_value() && groups <= kMaxLaunchGroups,
                "add_bias: a device_rows plan needs its row ends and at most ", kMaxLaunchGroups,
                " groups");
    a.elem_begin = chunk.elem_begin;
    a.elem_end = chunk.elem_end;
    a.groups = static_cast<int32_t>(groups);
    a.row_ends = row_ends->const_data_ptr<int32_t>();
    a.n[0] = plan.groups[0].n;
    for (int64_t g = 0; g < groups; ++g) fill_bias(a, g, g);
    launch_add_bias(flat, a);
    return;
  }
  // Host layout: kMaxLaunchGroups groups per launch, each launch over their elements in the chunk.
  for (int64_t g0 = 0; g0 < groups; g0 += kMaxLaunchGroups) {
    const int64_t g1 = std::min(groups, g0 + kMaxLaunchGroups);
    a.groups = static_cast<int32_t>(g1 - g0);
    keep.clear();
    for (int64_t g = g0; g < g1; ++g) {
      const GroupPlan& p = plan.groups[g];
      a.first[g - g0] = p.out_offset;
      a.first[g - g0 + 1] = p.out_offset + p.m * p.n;
      a.n[g - g0] = p.n;
      fill_bias(a, g - g0, g);
    }
    a.elem_begin = std::max(chunk.elem_begin, a.first[0]);
    a.elem_end = std::min(chunk.elem_end, a.first[a.groups]);
    launch_add_bias(flat, a);
  }
}

}  // namespace gmm_allreduce::cuda
