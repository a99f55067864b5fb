// The op's flat output buffer (every group's output, in group order, then possibly the plan's
// fingerprint: consensus.h) and the outputs made from it, which every collective shares.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "core/plan.h"

namespace gmm_allreduce {

// Elements [begin, end) of the 1-D `flat`; flat itself, with no dispatch, when that is all of it.
at::Tensor elements(const at::Tensor& flat, int64_t begin, int64_t end);

// A buffer of the plan's numel elements of its reduce_dtype, on its device.
at::Tensor empty_flat(const Plan& plan);

// The returned tensors, made before the sum is done (async_op returns them then). One output
// (split_item 2, 3, or a single group): a view of the flat buffer (which may end with the
// fingerprint), or a tensor of its own where the sum runs in fp32 (rounded into it by
// fill_outputs). Several outputs: tensors of their own, since PyTorch's custom-op contract forbids
// outputs that alias each other (an error under torch.compile, and in future PyTorch); the single
// collective over the buffer stays, and fill_outputs copies each group's block out.
std::vector<at::Tensor> make_outputs(const Plan& plan, const at::Tensor& flat);

// The summed buffer into the outputs of make_outputs.
void fill_outputs(const Plan& plan, const at::Tensor& flat, std::vector<at::Tensor>& outputs);

}  // namespace gmm_allreduce
