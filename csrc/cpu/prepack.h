// Weights packed once for inference (gmm_allreduce.prepack_weights): copies in a form the CPU
// engine reads faster than the weight itself, made once instead of at every call. One kind today:
// an int8 weight on a tier with AVX2 but neither VNNI nor AMX becomes the int16 pairs of
// int8_avx2_pack, which W8A8 products multiply without widening (any layout). Elsewhere nothing
// gains from a copy: VNNI and AMX read int8 weights in place, and a 16-bit weight converted in
// cache is faster than an fp32 copy read from memory (benchmarks/RESULTS.md). A pack gives the
// same bits as the call without it: exact int32 sums either way.
//
// The packs are registered by their weight's TensorImpl and held weakly: the caller (the Python
// object prepack_weights returns) keeps them alive, and a pack serves only while it and its weight
// live and the weight's version counter has not moved since packing (after an in-place change the
// engine reads the weight itself).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace gmm_allreduce {

// Whether this weight gets a pack at the current tier (GMM_CPU_ISA included).
bool packs(const at::Tensor& w);

// Packs of the weights (nullopt for those that get none), registered for the engine.
std::vector<std::optional<at::Tensor>> prepack(at::TensorList weight);

// The registered pack of w, if it is alive and w unchanged since; else an undefined tensor.
at::Tensor find_pack(const at::Tensor& w);

}  // namespace gmm_allreduce
