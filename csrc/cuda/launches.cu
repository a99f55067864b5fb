#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda/host/choice.h"
#include "cuda/host/epilogue.h"
#include "cuda/launches.h"

namespace gmm_allreduce::cuda {
namespace {

// One thread: the scan over the groups is sequential and short (tens of groups), and a single
// launch keeps it off the host and capturable in a CUDA graph.
template <typename I>
__global__ void row_ends_kernel(const I* group_list, int64_t stride, int64_t groups, bool counts,
                                int64_t rows, int64_t row_begin, int64_t row_end, int32_t* out) {
  write_row_ends(group_list, stride, groups, counts, rows, row_begin, row_end, out);
}

// Host-known end rows, passed by value (4 KB of kernel parameters).
struct RowEnds {
  int32_t groups;
  int32_t ends[kMaxGroupedGroups];
};

__global__ void copy_row_ends_kernel(const __grid_constant__ RowEnds a, int32_t* out) {
  for (int32_t i = threadIdx.x; i < a.groups; i += blockDim.x) out[i] = a.ends[i];
}

template <typename T>
__global__ void add_bias_kernel(T* flat, const __grid_constant__ BiasArgs a) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = a.elem_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < a.elem_end; e += step) {
    add_bias_at(flat, a, e);
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

at::Tensor device_row_ends(const std::vector<int32_t>& ends, c10::Device device) {
  TORCH_CHECK(static_cast<int64_t>(ends.size()) <= kMaxGroupedGroups, "device_row_ends: at most ",
              kMaxGroupedGroups, " groups, got ", ends.size());
  at::Tensor out =
      at::empty({static_cast<int64_t>(ends.size())}, at::TensorOptions(at::kInt).device(device));
  if (ends.empty()) return out;
  RowEnds args{};
  args.groups = static_cast<int32_t>(ends.size());
  std::copy(ends.begin(), ends.end(), args.ends);
  copy_row_ends_kernel<<<1, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      args, out.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void add_bias(at::Tensor& flat, const Plan& plan, at::TensorList bias, int64_t world_size,
              const Chunk& chunk, const std::optional<at::Tensor>& row_ends,
              const std::optional<at::Tensor>& src) {
  TORCH_CHECK(!plan.rows_on_device || row_ends.has_value(),
              "add_bias: a rows-on-device plan needs its row ends");
  TORCH_CHECK(!src || (src->scalar_type() == at::kFloat && src->is_contiguous() &&
                       src->numel() == chunk.elem_end - chunk.elem_begin),
              "add_bias: src must hold the chunk's elements in fp32");
  std::vector<at::Tensor> keep;  // contiguous biases, alive until their launches are queued
  const int32_t* ends = plan.rows_on_device ? row_ends->const_data_ptr<int32_t>() : nullptr;
  const float* from = src ? src->const_data_ptr<float>() : nullptr;
  for (const BiasArgs& a : bias_launches(plan, bias, world_size, chunk, ends, from, keep)) {
    launch_add_bias(flat, a);
  }
}

}  // namespace gmm_allreduce::cuda
