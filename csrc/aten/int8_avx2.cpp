#include "int8_avx2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GMM_AVX2_KERNEL 1
#define GMM_AVX2 __attribute__((target("avx2,fma")))
#define GMM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gmm_allreduce {
namespace {

// k in steps of 16 (one register of int16); a tile of kTileRows rows by kTileCols columns (12
// accumulators, 3 rows of x and one column of the weight: AVX2's 16 registers).
constexpr int64_t kStep = 16;
constexpr int kTileRows = 3;
constexpr int kTileCols = 4;
// Rows and columns of the blocks handed to the sink: 8 tiles of rows, whose int16 x (8 KiB per
// 1024 of k) stays in L1 while the tiles of columns go by.
constexpr int64_t kBlockRows = 8 * kTileRows;
constexpr int64_t kChunk = 256;

#ifdef GMM_AVX2_KERNEL

// The 4 vectors' lane sums, in order.
GMM_AVX2 inline __m128i lane_sums(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// out[r * kTileCols + c] = sum over the first k16 of k (a multiple of 16) of x[r] * w[c], for R
// rows of x (int16, row stride ldx) and kTileCols columns of the weight (int8, column stride ldw).
template <int R>
GMM_AVX2 void tile(const int16_t* x, int64_t ldx, const int8_t* const (&w)[kTileCols], int64_t k16,
                   int32_t* out) {
  __m256i acc[R][kTileCols];
  GMM_UNROLL
  for (int r = 0; r < R; ++r) {
    GMM_UNROLL
    for (int c = 0; c < kTileCols; ++c) acc[r][c] = _mm256_setzero_si256();
  }
  for (int64_t kk = 0; kk < k16; kk += kStep) {
    __m256i xv[R];
    GMM_UNROLL
    for (int r = 0; r < R; ++r) {
      xv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ldx + kk));
    }
    GMM_UNROLL
    for (int c = 0; c < kTileCols; ++c) {
      const __m256i wv =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[c] + kk)));
      GMM_UNROLL
      for (int r = 0; r < R; ++r) {
        acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(xv[r], wv));
      }
    }
  }
  GMM_UNROLL
  for (int r = 0; r < R; ++r) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * kTileCols),
                     lane_sums(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
  }
}

// Output columns [n_begin, n_end) of x @ w, handed to `sink` a block of kBlockRows rows and up to
// kChunk columns at a time. x16 holds x widened to int16, its rows ldx apart.
GMM_AVX2 void columns(const int16_t* x16, int64_t ldx, const int8_t* x, int64_t ldx8, int64_t r,
                      int64_t k, const int8_t* w, int64_t ldw, int64_t n_begin, int64_t n_end,
                      BlockSink<int32_t> sink) {
  const int64_t k16 = k / kStep * kStep;
  alignas(32) int32_t block[kBlockRows * kChunk];
  for (int64_t c0 = n_begin; c0 < n_end; c0 += kChunk) {
    const int64_t c1 = std::min(n_end, c0 + kChunk);
    for (int64_t m0 = 0; m0 < r; m0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, r - m0);
      for (int64_t n0 = c0; n0 < c1; n0 += kTileCols) {
        const int64_t cols = std::min<int64_t>(kTileCols, c1 - n0);
        const int8_t* wc[kTileCols];  // past `cols`: the last column again, its sums not kept
        for (int c = 0; c < kTileCols; ++c) wc[c] = w + (n0 + std::min<int64_t>(c, cols - 1)) * ldw;
        for (int64_t i = 0; i < rows; i += kTileRows) {
          alignas(16) int32_t sums[kTileRows * kTileCols];
          const int16_t* xi = x16 + (m0 + i) * ldx;
          const int64_t tile_rows = std::min<int64_t>(kTileRows, rows - i);
          if (tile_rows == 3) {
            tile<3>(xi, ldx, wc, k16, sums);
          } else if (tile_rows == 2) {
            tile<2>(xi, ldx, wc, k16, sums);
          } else {
            tile<1>(xi, ldx, wc, k16, sums);
          }
          for (int64_t t = 0; t < tile_rows; ++t) {
            const int8_t* xr = x + (m0 + i + t) * ldx8;
            for (int64_t c = 0; c < cols; ++c) {
              int32_t s = sums[t * kTileCols + c];
              for (int64_t kk = k16; kk < k; ++kk) s += int32_t{xr[kk]} * int32_t{wc[c][kk]};
              block[(i + t) * kChunk + (n0 - c0) + c] = s;
            }
          }
        }
      }
      sink(m0, rows, c0, c1 - c0, block, kChunk);
    }
  }
}

// x [r, k] int8 widened to int16 rows of k16 values.
GMM_AVX2 void widen_x(const int8_t* x, int64_t ldx, int64_t r, int64_t k16, int16_t* out) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t kk = 0; kk < k16; kk += kStep) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i * ldx + kk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * k16 + kk), _mm256_cvtepi8_epi16(b));
    }
  }
}

#endif  // GMM_AVX2_KERNEL

}  // namespace

bool int8_avx2_takes(const at::Tensor& x, const at::Tensor& w) {
#ifdef GMM_AVX2_KERNEL
  return x.is_cpu() && w.is_cpu() && x.scalar_type() == at::kChar && w.scalar_type() == at::kChar &&
         x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) && x.stride(1) == 1 &&
         w.size(1) > 0 && (w.size(0) == 0 || columns_layout(w)) && cpu_has_avx2();
#else
  (void)x, (void)w;
  return false;
#endif
}

void int8_avx2_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink) {
  TORCH_CHECK(int8_avx2_takes(x, w), "int8_avx2_gemm: a pair the AVX2 kernel does not take");
#ifdef GMM_AVX2_KERNEL
  const int64_t r = x.size(0), k = x.size(1), n = w.size(1);
  if (r == 0 || n == 0) return;
  const int64_t k16 = k / kStep * kStep;
  at::Tensor x16 = at::empty({r * std::max<int64_t>(k16, 1)}, x.options().dtype(at::kShort));
  int16_t* x16_p = x16.mutable_data_ptr<int16_t>();
  const int8_t* x_p = x.const_data_ptr<int8_t>();
  widen_x(x_p, x.stride(0), r, k16, x16_p);
  const int8_t* w_p = w.const_data_ptr<int8_t>();
  const int64_t ldw = w.stride(1);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // Threads take chunks of columns: about 2^22 multiply-adds each at least.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k * kChunk));
  at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    columns(x16_p, k16, x_p, x.stride(0), r, k, w_p, ldw, b * kChunk, std::min(n, e * kChunk),
            sink);
  });
#endif
}

}  // namespace gmm_allreduce
