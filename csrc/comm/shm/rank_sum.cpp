#include "comm/shm/rank_sum.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "util/float_bits.h"

namespace gmm_allreduce {
namespace {

// T stored as S (its bits), summed in Acc: load(S) -> Acc, store(Acc) -> S.
template <typename S, typename Acc, typename Load, typename Store>
inline __attribute__((always_inline)) void sum_blocks(S* out, const S* const* in, int ranks,
                                                      int64_t begin, int64_t end, Load load,
                                                      Store store) {
  constexpr int64_t kBlock = 1024;  // 4 KiB of fp32: the accumulator stays in L1
  Acc acc[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const S* first = in[0] + b;
    for (int64_t i = 0; i < n; ++i) acc[i] = load(first[i]);
    for (int r = 1; r < ranks; ++r) {
      const S* src = in[r] + b;
      for (int64_t i = 0; i < n; ++i) acc[i] += load(src[i]);
    }
    S* dst = out + b;
    for (int64_t i = 0; i < n; ++i) dst[i] = store(acc[i]);
  }
}

GMM_VECTOR_CLONES void sum_bf16(uint16_t* out, const uint16_t* const* in, int ranks, int64_t begin,
                                int64_t end) {
  sum_blocks<uint16_t, float>(out, in, ranks, begin, end, BFloat16Bits::load, BFloat16Bits::store);
}

GMM_VECTOR_CLONES void sum_f16(uint16_t* out, const uint16_t* const* in, int ranks, int64_t begin,
                               int64_t end) {
  sum_blocks<uint16_t, float>(out, in, ranks, begin, end, HalfBits::load, HalfBits::store);
}

template <typename T>
void sum_plain(T* out, const T* const* in, int ranks, int64_t begin, int64_t end) {
  sum_blocks<T, T>(out, in, ranks, begin, end, [](T v) { return v; }, [](T v) { return v; });
}

GMM_VECTOR_CLONES void sum_f32(float* out, const float* const* in, int ranks, int64_t begin,
                               int64_t end) {
  sum_plain(out, in, ranks, begin, end);
}

GMM_VECTOR_CLONES void sum_f64(double* out, const double* const* in, int ranks, int64_t begin,
                               int64_t end) {
  sum_plain(out, in, ranks, begin, end);
}

template <typename T>
void sum_as(void* out, const std::vector<const void*>& in, int64_t begin, int64_t end,
            void (*kernel)(T*, const T* const*, int, int64_t, int64_t)) {
  std::vector<const T*> typed(in.size());
  for (size_t r = 0; r < in.size(); ++r) typed[r] = static_cast<const T*>(in[r]);
  kernel(static_cast<T*>(out), typed.data(), static_cast<int>(in.size()), begin, end);
}

}  // namespace

void rank_sum(void* out, const std::vector<const void*>& in, at::ScalarType dtype, int64_t begin,
              int64_t end) {
  switch (dtype) {
    case at::kBFloat16:
      return sum_as<uint16_t>(out, in, begin, end, &sum_bf16);
    case at::kHalf:
      return sum_as<uint16_t>(out, in, begin, end, &sum_f16);
    case at::kFloat:
      return sum_as<float>(out, in, begin, end, &sum_f32);
    case at::kDouble:
      return sum_as<double>(out, in, begin, end, &sum_f64);
    default:
      AT_DISPATCH_INTEGRAL_TYPES(
          dtype, "rank_sum", [&] { sum_as<scalar_t>(out, in, begin, end, &sum_plain<scalar_t>); });
  }
}

}  // namespace gmm_allreduce
