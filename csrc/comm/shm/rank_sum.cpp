#include "rank_sum.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace gmm_allreduce {
namespace {

// Each floating kernel is compiled for AVX-512, AVX2 (with F16C) and the baseline, and the loader
// picks the best the CPU has (GCC's function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GMM_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GMM_VECTOR_CLONES
#endif

// 16-bit values as fp32 and back, in forms a compiler vectorises: bf16 by bit shifts (round to
// nearest even, NaN kept a NaN); fp16 by the compiler's _Float16 (F16C where the CPU has it).
struct BFloat16Bits {
  static float load(uint16_t v) {
    const uint32_t u = uint32_t{v} << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return std::isnan(f) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
};

#if defined(__FLT16_MAX__)
struct HalfBits {
  static float load(uint16_t v) {
    _Float16 h;
    std::memcpy(&h, &v, sizeof h);
    return static_cast<float>(h);
  }
  static uint16_t store(float f) {
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t v;
    std::memcpy(&v, &h, sizeof v);
    return v;
  }
};
#else
struct HalfBits {
  static float load(uint16_t v) { return static_cast<float>(c10::Half(v, c10::Half::from_bits())); }
  static uint16_t store(float f) { return c10::Half(f).x; }
};
#endif

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
