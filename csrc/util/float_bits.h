// 16-bit floats as fp32 and back in forms a compiler vectorises, and the function multiversioning
// that lets one binary run AVX-512, AVX2 or baseline loops: for our own CPU loops (the same-host
// rank sum, the combine epilogue).
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gmm_allreduce {

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

}  // namespace gmm_allreduce
