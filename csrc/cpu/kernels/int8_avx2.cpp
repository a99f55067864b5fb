#include "cpu/kernels/int8_avx2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels/isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GMM_AVX2_KERNEL 1
#define GMM_AVX2 __attribute__((target("avx2,fma")))
#define GMM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gmm_allreduce {
namespace {

// k in steps of 16 (one register of int16); a tile of kAvx2TileRows rows by kTileCols columns (12
// accumulators, 3 rows of x and one column of the weight: AVX2's 16 registers).
constexpr int64_t kStep = 16;
constexpr int kAvx2TileRows = 3;
constexpr int kTileCols = 4;
// Rows and columns of the blocks handed to the sink: 8 tiles of rows, whose int16 x (8 KiB per
// 1024 of k) stays in L1 while the tiles of columns go by.
constexpr int64_t kBlockRows = 8 * kAvx2TileRows;
constexpr int64_t kAvx2Chunk = 256;
// The packed kernel: panels of kPanel columns, a tile of up to kPackedRows rows by one panel (12
// accumulators, two registers of weight, one broadcast pair of x).
constexpr int64_t kPanel = 16;
constexpr int kPackedRows = 6;
// Rows from which int8_avx2_gemm widens the weight's panels at each call and runs the packed
// kernel (the widening is paid once for every row).
constexpr int64_t kWidenMinRows = 8;

int64_t pairs(int64_t k) { return (k + 1) / 2; }
int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }
int64_t panel_size(int64_t k) { return pairs(k) * 2 * kPanel; }

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
// kAvx2Chunk columns at a time. x16 holds x widened to int16, its rows ldx apart.
GMM_AVX2 void columns(const int16_t* x16, int64_t ldx, const int8_t* x, int64_t ldx8, int64_t r,
                      int64_t k, const int8_t* w, int64_t ldw, int64_t n_begin, int64_t n_end,
                      BlockSink<int32_t> sink) {
  const int64_t k16 = k / kStep * kStep;
  alignas(32) int32_t block[kBlockRows * kAvx2Chunk];
  for (int64_t c0 = n_begin; c0 < n_end; c0 += kAvx2Chunk) {
    const int64_t c1 = std::min(n_end, c0 + kAvx2Chunk);
    for (int64_t m0 = 0; m0 < r; m0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, r - m0);
      for (int64_t n0 = c0; n0 < c1; n0 += kTileCols) {
        const int64_t cols = std::min<int64_t>(kTileCols, c1 - n0);
        const int8_t* wc[kTileCols];  // past `cols`: the last column again, its sums not kept
        for (int c = 0; c < kTileCols; ++c) wc[c] = w + (n0 + std::min<int64_t>(c, cols - 1)) * ldw;
        for (int64_t i = 0; i < rows; i += kAvx2TileRows) {
          alignas(16) int32_t sums[kAvx2TileRows * kTileCols];
          const int16_t* xi = x16 + (m0 + i) * ldx;
          const int64_t tile_rows = std::min<int64_t>(kAvx2TileRows, rows - i);
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
              block[(i + t) * kAvx2Chunk + (n0 - c0) + c] = s;
            }
          }
        }
      }
      sink(m0, rows, c0, c1 - c0, block, kAvx2Chunk);
    }
  }
}

// x [r, k] int8 widened to int16 rows of `width` values: the first min(k, width) of each row,
// then zeros.
GMM_AVX2 void widen_x(const int8_t* x, int64_t ldx, int64_t r, int64_t k, int64_t width,
                      int16_t* out) {
  const int64_t k16 = std::min(k, width) / kStep * kStep;
  for (int64_t i = 0; i < r; ++i) {
    int16_t* o = out + i * width;
    for (int64_t kk = 0; kk < k16; kk += kStep) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i * ldx + kk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + kk), _mm256_cvtepi8_epi16(b));
    }
    for (int64_t kk = k16; kk < width; ++kk) o[kk] = kk < k ? x[i * ldx + kk] : 0;
  }
}

// Columns [c, c + cols) (cols <= kPanel) of the weight (element (kk, j) at w[kk * sk + j * sc])
// widened into one panel of int16 pairs: pair p of column j at panel[p * 2 * kPanel + 2 * j], k
// and the columns padded with zeros to 2 * k2 and kPanel.
GMM_AVX2 void widen_panel(const int8_t* w, int64_t sk, int64_t sc, int64_t k, int64_t cols,
                          int16_t* panel) {
  const int64_t k2 = pairs(k);
  int64_t done = 0;                 // k below it is written
  if (sc == 1 && cols == kPanel) {  // the rows layout: two rows of 16 columns, interleaved
    done = k / 2 * 2;
    for (int64_t kk = 0; kk < done; kk += 2) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kk * sk));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (kk + 1) * sk));
      int16_t* out = panel + kk / 2 * 2 * kPanel;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                          _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kPanel),
                          _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b)));
    }
  } else if (sk == 1 && cols == kPanel) {  // the columns layout: 16 k of each column at once
    done = k / kStep * kStep;
    auto* out = reinterpret_cast<int32_t*>(panel);  // pairs as int32
    for (int64_t kk = 0; kk < done; kk += kStep) {
      for (int64_t half = 0; half < 2; ++half) {  // columns 0-7, then 8-15
        __m256i v[8];                             // column j: its 8 pairs of k [kk, kk + 16)
        GMM_UNROLL
        for (int j = 0; j < 8; ++j) {
          v[j] = _mm256_cvtepi8_epi16(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (half * 8 + j) * sc + kk)));
        }
        // The 8 x 8 transpose of pairs: t[p] = pair p of the 8 columns.
        __m256i a[8], b[8];
        GMM_UNROLL
        for (int j = 0; j < 8; j += 2) {
          a[j] = _mm256_unpacklo_epi32(v[j], v[j + 1]);
          a[j + 1] = _mm256_unpackhi_epi32(v[j], v[j + 1]);
        }
        GMM_UNROLL
        for (int j = 0; j < 8; j += 4) {
          b[j] = _mm256_unpacklo_epi64(a[j], a[j + 2]);
          b[j + 1] = _mm256_unpackhi_epi64(a[j], a[j + 2]);
          b[j + 2] = _mm256_unpacklo_epi64(a[j + 1], a[j + 3]);
          b[j + 3] = _mm256_unpackhi_epi64(a[j + 1], a[j + 3]);
        }
        GMM_UNROLL
        for (int p = 0; p < 4; ++p) {
          const __m256i lo = _mm256_permute2x128_si256(b[p], b[p + 4], 0x20);
          const __m256i hi = _mm256_permute2x128_si256(b[p], b[p + 4], 0x31);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (kk / 2 + p) * kPanel + half * 8),
                              lo);
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(out + (kk / 2 + p + 4) * kPanel + half * 8), hi);
        }
      }
    }
  }
  for (int64_t kk = done; kk < 2 * k2; ++kk) {
    int16_t* row = panel + kk / 2 * 2 * kPanel + kk % 2;
    for (int64_t j = 0; j < kPanel; ++j) row[2 * j] = kk < k && j < cols ? w[kk * sk + j * sc] : 0;
  }
}

// out[r * ld + c] = sum over k2 pairs of x[r] * panel[c] for R rows of x16 (rows ldx apart, k
// padded to 2 * k2) and the kPanel columns of one packed panel.
template <int R>
GMM_AVX2 void packed_tile(const int16_t* x, int64_t ldx, const int16_t* panel, int64_t k2,
                          int32_t* out, int64_t ld) {
  __m256i acc[R][2];
  GMM_UNROLL
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < k2; ++p) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 32));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 32 + 16));
    GMM_UNROLL
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * ldx + 2 * p, sizeof(pair));
      const __m256i xb = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, w1));
    }
  }
  GMM_UNROLL
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld + 8), acc[r][1]);
  }
}

// packed_tile<R> by R.
using PackedTile = void (*)(const int16_t*, int64_t, const int16_t*, int64_t, int32_t*, int64_t);
constexpr PackedTile kPackedTiles[kPackedRows + 1] = {
    nullptr,         &packed_tile<1>, &packed_tile<2>, &packed_tile<3>,
    &packed_tile<4>, &packed_tile<5>, &packed_tile<6>};

// Output columns [c0, c1) (c1 - c0 <= kAvx2Chunk) of x @ w from their packed panels (the first is
// column c0's), a block of kBlockRows rows to `sink` at a time.
GMM_AVX2 void packed_chunk(const int16_t* x16, int64_t k2, int64_t r, const int16_t* first,
                           int64_t c0, int64_t c1, BlockSink<int32_t> sink) {
  const int64_t ldx = 2 * k2;
  alignas(32) int32_t block[kBlockRows * kAvx2Chunk];
  for (int64_t m0 = 0; m0 < r; m0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, r - m0);
    for (int64_t n0 = c0; n0 < c1; n0 += kPanel) {
      const int16_t* panel = first + (n0 - c0) / kPanel * k2 * 2 * kPanel;
      for (int64_t i = 0; i < rows; i += kPackedRows) {
        const int16_t* xi = x16 + (m0 + i) * ldx;
        int32_t* out = block + i * kAvx2Chunk + (n0 - c0);
        kPackedTiles[std::min<int64_t>(kPackedRows, rows - i)](xi, ldx, panel, k2, out, kAvx2Chunk);
      }
    }
    sink(m0, rows, c0, c1 - c0, block, kAvx2Chunk);
  }
}

#endif  // GMM_AVX2_KERNEL

}  // namespace

bool int8_avx2_takes(const at::Tensor& x, const at::Tensor& w) {
#ifdef GMM_AVX2_KERNEL
  return x.is_cpu() && w.is_cpu() && x.scalar_type() == at::kChar && w.scalar_type() == at::kChar &&
         x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) && x.stride(1) == 1 &&
         w.size(1) > 0 && (w.size(0) == 0 || columns_layout(w) || rows_layout(w)) && cpu_has_avx2();
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
  // From kWidenMinRows rows (any rows in the rows layout): each chunk's panels widened into the
  // thread's scratch (in cache), then the packed kernel. Fewer in the columns layout: the weight
  // widened in registers by every tile of rows.
  const bool widen = r >= kWidenMinRows || !columns_layout(w);
  const int64_t width = widen ? 2 * pairs(k) : k / kStep * kStep;
  at::Tensor x16 = at::empty({r * std::max<int64_t>(width, 1)}, x.options().dtype(at::kShort));
  int16_t* x16_p = x16.mutable_data_ptr<int16_t>();
  const int8_t* x_p = x.const_data_ptr<int8_t>();
  widen_x(x_p, x.stride(0), r, k, width, x16_p);
  const int8_t* w_p = w.const_data_ptr<int8_t>();
  const int64_t sk = w.stride(0), sc = w.stride(1);
  const int64_t chunks = (n + kAvx2Chunk - 1) / kAvx2Chunk;
  // Threads take chunks of columns: about 2^22 multiply-adds each at least.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k * kAvx2Chunk));
  at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    if (!widen) {
      columns(x16_p, width, x_p, x.stride(0), r, k, w_p, sc, b * kAvx2Chunk,
              std::min(n, e * kAvx2Chunk), sink);
      return;
    }
    thread_local std::vector<int16_t> scratch;  // kept: no page faults at every call
    scratch.resize(std::max<size_t>(scratch.size(), kAvx2Chunk / kPanel * panel_size(k)));
    for (int64_t c = b; c < e; ++c) {
      const int64_t c0 = c * kAvx2Chunk, c1 = std::min(n, c0 + kAvx2Chunk);
      for (int64_t n0 = c0; n0 < c1; n0 += kPanel) {
        widen_panel(w_p + n0 * sc, sk, sc, k, std::min(kPanel, c1 - n0),
                    scratch.data() + (n0 - c0) / kPanel * panel_size(k));
      }
      packed_chunk(x16_p, pairs(k), r, scratch.data(), c0, c1, sink);
    }
  });
#endif
}

at::Tensor int8_avx2_pack(const at::Tensor& w) {
  TORCH_CHECK(w.is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2,
              "int8_avx2_pack: expected a 2-D int8 CPU weight");
  const int64_t k = w.size(0), n = w.size(1);
  at::Tensor packed = at::empty({panels(n) * panel_size(k)}, w.options().dtype(at::kShort));
#ifdef GMM_AVX2_KERNEL
  int16_t* out = packed.mutable_data_ptr<int16_t>();
  const int8_t* src = w.const_data_ptr<int8_t>();
  at::parallel_for(0, panels(n), 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      widen_panel(src + p * kPanel * w.stride(1), w.stride(0), w.stride(1), k,
                  std::min(kPanel, n - p * kPanel), out + p * panel_size(k));
    }
  });
#endif
  return packed;
}

bool int8_avx2_packed_takes(const at::Tensor& x) {
#ifdef GMM_AVX2_KERNEL
  return x.is_cpu() && x.scalar_type() == at::kChar && x.dim() == 2 && x.stride(1) == 1 &&
         cpu_has_avx2();
#else
  (void)x;
  return false;
#endif
}

void int8_avx2_gemm_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                           BlockSink<int32_t> sink) {
  TORCH_CHECK(int8_avx2_packed_takes(x), "int8_avx2_gemm_packed: an x the kernel does not take");
  const int64_t r = x.size(0), k = x.size(1), k2 = pairs(k);
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.is_contiguous() &&
                  packed.numel() == panels(n) * panel_size(k),
              "int8_avx2_gemm_packed: a pack of another shape than [", k, ", ", n, "]");
#ifdef GMM_AVX2_KERNEL
  if (r == 0 || n == 0) return;
  at::Tensor x16 = at::empty({r * std::max<int64_t>(2 * k2, 1)}, x.options().dtype(at::kShort));
  int16_t* x16_p = x16.mutable_data_ptr<int16_t>();
  widen_x(x.const_data_ptr<int8_t>(), x.stride(0), r, k, 2 * k2, x16_p);
  const int16_t* packed_p = packed.const_data_ptr<int16_t>();
  const int64_t chunks = (n + kAvx2Chunk - 1) / kAvx2Chunk;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k * kAvx2Chunk));
  at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      packed_chunk(x16_p, k2, r, packed_p + c * kAvx2Chunk / kPanel * panel_size(k), c * kAvx2Chunk,
                   std::min(n, (c + 1) * kAvx2Chunk), sink);
    }
  });
#endif
}

}  // namespace gmm_allreduce
