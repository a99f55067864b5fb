// The CUDA engine's own kernels (launches.cu, tiled_gemm.cu): the row offsets of a grouped GEMM,
// the bias epilogue and the tiled grouped GEMM. Launchers take ATen tensors or host-built launch
// arguments and run on the current stream, so that the engine (engine.cpp) needs no CUDA headers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "core/plan.h"
#include "cuda/host/epilogue.h"
#include "cuda/host/tiles.h"

namespace gmm_allreduce::cuda {

// The int32 end row of every group within x's rows [row_begin, row_end), relative to row_begin:
// the offsets of a grouped GEMM over those rows. Computed on the device from group_list (a 1-D
// int32/int64 tensor on the current device; cumulative end rows for group_list_type 0, counts for
// 1), with no host read. A device group_list is not validated (that would take a device-to-host
// sync): its values are clamped to be non-decreasing within [0, rows] and the last one is rows, so
// that whatever it holds no kernel touches memory outside x or the output.
at::Tensor chunk_row_ends(const at::Tensor& group_list, int64_t group_list_type, int64_t rows,
                          int64_t row_begin, int64_t row_end);

// The same from host-known end rows (at most kMaxGroupedGroups), written on the device by a kernel
// that takes them as parameters: no copy from pageable memory, capturable in a CUDA graph.
at::Tensor device_row_ends(const std::vector<int32_t>& ends, c10::Device device);

// flat[e] = round(v + bias_g[col] / world_size) for every element e of `chunk`, v being flat[e] or,
// given `src` (the chunk's elements in fp32), src's; computed in fp32 (fp64 for an fp64 output) and
// rounded once into flat's dtype. Group g and column col of e come from the plan, or for a
// rows-on-device plan from row_ends (chunk_row_ends of this chunk). One launch per kMaxLaunchGroups
// groups; the biases may have any floating dtypes.
void add_bias(at::Tensor& flat, const Plan& plan, at::TensorList bias, int64_t world_size,
              const Chunk& chunk, const std::optional<at::Tensor>& row_ends,
              const std::optional<at::Tensor>& src);

// The tiled grouped GEMM's launches (tiled_gemm.cu): tensor-core tiles of all blocks or groups in
// one grid each, fp32 accumulation, the bias added before the single rounding into y. dtype: x's
// and w's (fp16, bf16); out_dtype: y's (dtype, or fp32 for partials kept in fp32).
void tiled_grouped_gemm(at::ScalarType dtype, at::ScalarType out_dtype,
                        const std::vector<TiledArgs>& launches);
void tiled_grouped_gemm(at::ScalarType dtype, at::ScalarType out_dtype,
                        const std::vector<RowsTiledArgs>& launches);

}  // namespace gmm_allreduce::cuda
