// A 16 x 16 matrix of 32-bit values, one row per AVX-512 register, transposed in registers: the
// CPU's int8 kernels compute sums as [column, row] and hand them over as [row, column].
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// GCC 12's unpack intrinsics start from a vector it sees as uninitialised (`__Y = __Y`), once
// inlined into a target-attributed function: a false warning.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace gmm_allreduce {

// Inlined into callers compiled for AVX-512 and more (AMX, VNNI).
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512i (&v)[16]) {
  __m512i t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 16
  for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_i32x4(v[8 * h + j], v[8 * h + 4 + j], 0x88);
      t[8 * h + 4 + j] = _mm512_shuffle_i32x4(v[8 * h + j], v[8 * h + 4 + j], 0xDD);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    v[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
  }
}

}  // namespace gmm_allreduce

#endif
