#include "cpu/kernels/int8_weight.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels/isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GMM_INT8_WEIGHT_AVX512 1
#define GMM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define GMM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define GMM_WEIGHT_AVX2 __attribute__((target("avx2,fma,f16c")))
// Loops over a tile's registers, unrolled before GCC places the registers (else they live on
// the stack).
#define GMM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gmm_allreduce {
namespace {

#ifdef GMM_INT8_WEIGHT_AVX512

// The first `count` of 16 lanes (all for count >= 16, none for count <= 0).
GMM_AVX512 inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16{0xFFFF}
                     : (count <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << count) - 1));
}

// 16 int8 weights (the mask's lanes; zero elsewhere) as fp32.
GMM_AVX512 inline __m512 widen(__mmask16 m, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// 32 int8 weights (the mask's lanes; zero elsewhere) as bf16, in order (exact).
GMM_AVX512_BF16 inline __m512bh widen_bf16(__mmask32 m, const int8_t* p) {
  const __m256i b = _mm256_maskz_loadu_epi8(m, p);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// v[0..15]'s lane sums, in order, as one vector: a tree of cross-lane shuffles and adds (46
// instructions, where 16 reductions of one vector each take 128).
GMM_AVX512 inline __m512 lane_sums(const __m512 (&v)[16]) {
  __m512 u[8], w[4], x[2];
  GMM_UNROLL
  for (int i = 0; i < 8; ++i) {  // u[i]: v[2i]'s 8 partial sums, then v[2i + 1]'s
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  GMM_UNROLL
  for (int i = 0; i < 4; ++i) {  // w[i]: 4 partial sums of each of v[4i .. 4i + 3]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  }
  GMM_UNROLL
  for (int i = 0; i < 2; ++i) {  // x[i]: in quarter q, 2 of v[8i + q]'s, then 2 of v[8i + 4 + q]'s
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  }
  // Lane 4q + j: v[4j + q]'s sum.
  const __m512 y =
      _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));
  return _mm512_permutexvar_ps(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), y);
}

// Rows of the weight ahead of the one read that are fetched into the cache: each row of a tile
// is on another page, where the hardware's prefetcher stops.
constexpr int64_t kPrefetchRows = 8;

// Rows of the weight contiguous ([k, n], w[kk * ldw + c]): y[r, n0 + c] for R rows and 16 * B
// columns (`cols` of them valid), one fp32 FMA per weight and row, the weights widened once for all
// R rows.
template <int R, int B>
GMM_AVX512 void rows_tile(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k,
                          float* y, int64_t ldy, int64_t n0, int64_t cols) {
  __m512 acc[R][B];
  __mmask16 m[B];
  GMM_UNROLL
  for (int b = 0; b < B; ++b) {
    m[b] = lanes(cols - 16 * b);
    GMM_UNROLL
    for (int r = 0; r < R; ++r) acc[r][b] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const int8_t* wr = w + kk * ldw + n0;
    _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * ldw), _MM_HINT_T0);
    __m512 wv[B];
    GMM_UNROLL
    for (int b = 0; b < B; ++b) wv[b] = widen(m[b], wr + 16 * b);
    GMM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + kk]);
      GMM_UNROLL
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_fmadd_ps(xb, wv[b], acc[r][b]);
    }
  }
  GMM_UNROLL
  for (int r = 0; r < R; ++r) {
    GMM_UNROLL
    for (int b = 0; b < B; ++b) _mm512_mask_storeu_ps(y + r * ldy + n0 + 16 * b, m[b], acc[r][b]);
  }
}

// y[r, n0 + c] = acc[r * C + c]'s lane sum, for the first `cols` of C columns.
template <int R, int C>
GMM_AVX512 inline void store_sums(const __m512 (&acc)[16], float* y, int64_t ldy, int64_t n0,
                                  int64_t cols) {
  alignas(64) float sums[16];
  _mm512_store_ps(sums, lane_sums(acc));
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C && c < cols; ++c) y[r * ldy + n0 + c] = sums[r * C + c];
  }
}

// Columns of the weight contiguous ([n, k] rows, w[c * ldw + kk]): y[r, n0 + c] for R rows and C
// columns (`cols` of them valid) as dot products over k, 16 lanes at a time.
template <int R, int C>
GMM_AVX512 void cols_tile(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k,
                          float* y, int64_t ldy, int64_t n0, int64_t cols) {
  static_assert(R * C <= 16, "one vector of sums per tile");
  __m512 acc[16];  // row r, column c: acc[r * C + c]; the rest zero
  GMM_UNROLL
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 m = lanes(k - kk);
    __m512 xv[R];
    GMM_UNROLL
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * ldx + kk);
    GMM_UNROLL
    for (int c = 0; c < C; ++c) {  // past `cols`: the last column again, not stored
      const int8_t* wc = w + (n0 + std::min<int64_t>(c, cols - 1)) * ldw + kk;
      _mm_prefetch(reinterpret_cast<const char*>(wc + 4 * C * ldw), _MM_HINT_T0);  // the next tile
      const __m512 wv = widen(m, wc);
      GMM_UNROLL
      for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_fmadd_ps(xv[r], wv, acc[r * C + c]);
    }
  }
  store_sums<R, C>(acc, y, ldy, n0, cols);
}

// cols_tile for bf16 x: 32 of k at a time, the weights widened to bf16 (exact) and the products
// summed in pairs (AVX512-BF16's dot product, fp32 sums): half the instructions per product.
template <int R, int C>
GMM_AVX512_BF16 void cols_tile(const at::BFloat16* x, int64_t ldx, const int8_t* w, int64_t ldw,
                               int64_t k, float* y, int64_t ldy, int64_t n0, int64_t cols) {
  static_assert(R * C <= 16, "one vector of sums per tile");
  __m512 acc[16];
  GMM_UNROLL
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 32) {
    const __mmask32 m = k - kk >= 32 ? ~__mmask32{0} : (__mmask32{1} << (k - kk)) - 1;
    __m512bh xv[R];
    GMM_UNROLL
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * ldx + kk);
    GMM_UNROLL
    for (int c = 0; c < C; ++c) {
      const int8_t* wc = w + (n0 + std::min<int64_t>(c, cols - 1)) * ldw + kk;
      _mm_prefetch(reinterpret_cast<const char*>(wc + 4 * C * ldw), _MM_HINT_T0);
      const __m512bh wv = widen_bf16(m, wc);
      GMM_UNROLL
      for (int r = 0; r < R; ++r) acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], xv[r], wv);
    }
  }
  store_sums<R, C>(acc, y, ldy, n0, cols);
}

// The AVX2 kernels (CPUs without AVX-512, and 16-bit weights everywhere): 8 lanes, no masks; the
// weight's tail columns or tail of k go through a zero-padded copy.

// 8 weights as fp32: int8, bf16 (the high half of an fp32) or fp16 (F16C, which every AVX2 host
// has: cpu/kernels/isa.h).
GMM_WEIGHT_AVX2 inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
GMM_WEIGHT_AVX2 inline __m256 widen8(const at::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
GMM_WEIGHT_AVX2 inline __m256 widen8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 weights, the first `count` of them read (the rest zero), as fp32.
template <typename W>
GMM_WEIGHT_AVX2 inline __m256 widen8_part(const W* p, int64_t count) {
  alignas(16) W part[8] = {};
  std::copy_n(p, std::max<int64_t>(0, std::min<int64_t>(count, 8)), part);
  return widen8(part);
}

// 8 fp32, the first `count` read (the rest zero).
GMM_WEIGHT_AVX2 inline __m256 load8_part(const float* p, int64_t count) {
  alignas(32) float part[8] = {};
  std::copy_n(p, std::max<int64_t>(0, std::min<int64_t>(count, 8)), part);
  return _mm256_load_ps(part);
}

// The lane sums of 4 vectors, in order.
GMM_WEIGHT_AVX2 inline __m128 lane_sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// rows_tile on AVX2: y[r, n0 + c] for R rows and 8 * B columns (`cols` of them valid).
template <int R, int B, typename W>
GMM_WEIGHT_AVX2 void rows_tile_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
                                    float* y, int64_t ldy, int64_t n0, int64_t cols) {
  __m256 acc[R][B];
  GMM_UNROLL
  for (int r = 0; r < R; ++r) {
    GMM_UNROLL
    for (int b = 0; b < B; ++b) acc[r][b] = _mm256_setzero_ps();
  }
  const bool whole = cols >= 8 * B;
  for (int64_t kk = 0; kk < k; ++kk) {
    const W* wr = w + kk * ldw + n0;
    _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * ldw), _MM_HINT_T0);
    GMM_UNROLL
    for (int b = 0; b < B; ++b) {
      const __m256 wv = whole ? widen8(wr + 8 * b) : widen8_part(wr + 8 * b, cols - 8 * b);
      GMM_UNROLL
      for (int r = 0; r < R; ++r) {
        acc[r][b] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + kk), wv, acc[r][b]);
      }
    }
  }
  GMM_UNROLL
  for (int r = 0; r < R; ++r) {
    GMM_UNROLL
    for (int b = 0; b < B; ++b) {
      alignas(32) float out[8];
      _mm256_store_ps(out, acc[r][b]);
      std::copy_n(out, std::max<int64_t>(0, std::min<int64_t>(8, cols - 8 * b)),
                  y + r * ldy + n0 + 8 * b);
    }
  }
}

// Columns of one streaming tile of R <= kStreamMaxRows rows: their fp32 sums (16 KB) stay in L1
// while the weight's rows stream past.
template <int R>
constexpr int64_t kStreamCols = 4096 / R;
constexpr int kStreamMaxRows = 2;  // above, the tile measured faster (RESULTS.md)

// One step of rows_stream_avx2: J rows of the weight from row kk (w at the tile's first column),
// each read along `cols` contiguous columns, added into acc's R rows in the order of k.
template <int R, int J, typename W>
GMM_WEIGHT_AVX2 inline void stream_step(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                        int64_t kk, float (*acc)[kStreamCols<R>], int64_t cols) {
  __m256 xb[J][R];
  const W* wr[J];
  GMM_UNROLL
  for (int j = 0; j < J; ++j) {
    wr[j] = w + (kk + j) * ldw;
    GMM_UNROLL
    for (int r = 0; r < R; ++r) xb[j][r] = _mm256_set1_ps(x[r * ldx + kk + j]);
  }
  for (int64_t c = 0; c < cols; c += 8) {
    __m256 wv[J];
    GMM_UNROLL
    for (int j = 0; j < J; ++j) {
      wv[j] = c + 8 <= cols ? widen8(wr[j] + c) : widen8_part(wr[j] + c, cols - c);
    }
    GMM_UNROLL
    for (int r = 0; r < R; ++r) {
      __m256 a = _mm256_load_ps(acc[r] + c);
      GMM_UNROLL
      for (int j = 0; j < J; ++j) a = _mm256_fmadd_ps(xb[j][r], wv[j], a);
      _mm256_store_ps(acc[r] + c, a);
    }
  }
}

// rows_tile_avx2 for a few rows (R <= kStreamMaxRows), up to kStreamCols columns: the weight read
// in its own order, a few of its rows at a time along the tile's columns (long contiguous reads,
// where rows_tile_avx2's narrow tile steps from page to page down k), the sums kept in L1 between
// them. Each sum adds its products in the order of k.
template <int R, typename W>
GMM_WEIGHT_AVX2 void rows_stream_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                      int64_t k, float* y, int64_t ldy, int64_t n0, int64_t cols) {
  static_assert(R <= kStreamMaxRows, "the sums of R rows in L1, their x in registers");
  constexpr int J = 4;  // weight rows a step: J * R broadcasts of x in registers
  alignas(32) float acc[R][kStreamCols<R>];
  for (int r = 0; r < R; ++r) std::fill_n(acc[r], (cols + 7) / 8 * 8, 0.0f);
  const W* wt = w + n0;
  int64_t kk = 0;
  for (; kk + J <= k; kk += J) stream_step<R, J>(x, ldx, wt, ldw, kk, acc, cols);
  for (; kk < k; ++kk) stream_step<R, 1>(x, ldx, wt, ldw, kk, acc, cols);
  for (int r = 0; r < R; ++r) std::copy_n(acc[r], cols, y + r * ldy + n0);
}

// Weight rows in one part of a streaming call: the weight's rows are cut into parts of this many,
// each streamed whole by one thread into its own partial sums, added in the parts' order after (the
// same bits on any thread count).
constexpr int64_t kStreamPartRows = 512;

// y [R, n] = x @ w for a few rows (R <= kStreamMaxRows) and a weight in the rows layout, through
// rows_stream_avx2: in parallel over parts of the weight's rows and tiles of its columns.
template <int R, typename W>
void rows_stream_mm(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* y,
                    int64_t n) {
  const int64_t parts = std::max<int64_t>(1, (k + kStreamPartRows - 1) / kStreamPartRows);
  // One part: the columns split so that every thread has a tile.
  const int64_t width =
      parts > 1
          ? kStreamCols<R>
          : std::max<int64_t>(8, std::min(kStreamCols<R>, (n / at::get_num_threads() + 7) / 8 * 8));
  const int64_t tiles = (n + width - 1) / width;
  std::vector<float> partial(parts > 1 ? parts * R * n : 0);
  at::parallel_for(0, parts * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t p = j / tiles, n0 = j % tiles * width;
      const int64_t k0 = p * kStreamPartRows;
      float* out = parts > 1 ? partial.data() + p * R * n : y;
      rows_stream_avx2<R>(x + k0, ldx, w + k0 * ldw, ldw, std::min(kStreamPartRows, k - k0), out, n,
                          n0, std::min(width, n - n0));
    }
  });
  if (parts == 1) return;
  std::copy_n(partial.data(), R * n, y);
  for (int64_t p = 1; p < parts; ++p) {
    const float* part = partial.data() + p * R * n;
    for (int64_t i = 0; i < R * n; ++i) y[i] += part[i];
  }
}

// cols_tile on AVX2: y[r, n0 + c] for R rows and C columns (`cols` of them valid) as dot products
// over k, 8 lanes at a time.
template <int R, int C, typename W>
GMM_WEIGHT_AVX2 void cols_tile_avx2(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
                                    float* y, int64_t ldy, int64_t n0, int64_t cols) {
  constexpr int kAcc = (R * C + 3) / 4 * 4;
  __m256 acc[kAcc];  // row r, column c: acc[r * C + c]; the rest zero
  GMM_UNROLL
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_ps();
  const W* wc[C];  // past `cols`: the last column again, not stored
  GMM_UNROLL
  for (int c = 0; c < C; ++c) wc[c] = w + (n0 + std::min<int64_t>(c, cols - 1)) * ldw;
  const int64_t k8 = k / 8 * 8;
  for (int64_t kk = 0; kk < k8; kk += 8) {
    __m256 xv[R];
    GMM_UNROLL
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + kk);
    GMM_UNROLL
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wc[c] + kk + 4 * C * ldw), _MM_HINT_T0);
      const __m256 wv = widen8(wc[c] + kk);
      GMM_UNROLL
      for (int r = 0; r < R; ++r) acc[r * C + c] = _mm256_fmadd_ps(xv[r], wv, acc[r * C + c]);
    }
  }
  if (k8 < k) {
    GMM_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m256 wv = widen8_part(wc[c] + k8, k - k8);
      GMM_UNROLL
      for (int r = 0; r < R; ++r) {
        acc[r * C + c] = _mm256_fmadd_ps(load8_part(x + r * ldx + k8, k - k8), wv, acc[r * C + c]);
      }
    }
  }
  alignas(16) float sums[kAcc];
  GMM_UNROLL
  for (int i = 0; i < kAcc; i += 4) {
    _mm_store_ps(sums + i, lane_sums4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C && c < cols; ++c) y[r * ldy + n0 + c] = sums[r * C + c];
  }
}

// The AVX2 tiles' columns for R rows: rows layout, 8 * B columns (R * B accumulators); columns
// layout, C columns (R * C accumulators and R rows of x in registers).
template <int R>
constexpr int kBlocksAvx2 = R == 1   ? 8
                            : R == 2 ? 4
                            : R <= 4 ? 2
                                     : 1;
template <int R>
constexpr int kColsAvx2 = R == 1   ? 8
                          : R == 2 ? 6
                          : R == 3 ? 4
                          : R == 4 ? 2
                                   : 1;

// At least 8 independent accumulators (an FMA's latency times its throughput), at most 16.
template <int R>
constexpr int kBlocks = R >= 4 ? 2 : 8 / R;

// y[0:R, :] from x's R rows (fp32, or bf16 with the weight in the columns layout), the weight's
// column tiles split between threads; on AVX2 (`kAvx2`) or AVX-512.
template <int R, bool kAvx2, typename X, typename W = int8_t>
void rows_mm(const X* x, int64_t ldx, const at::Tensor& w, float* y, int64_t n) {
  const int64_t k = w.size(0);
  const auto* wp = static_cast<const W*>(w.const_data_ptr());
  const bool rows = w.stride(1) == 1;
  const int64_t ldw = rows ? w.stride(0) : w.stride(1);
  if constexpr (kAvx2 && R <= kStreamMaxRows) {
    if (rows) return rows_stream_mm<R>(x, ldx, wp, ldw, k, y, n);
  }
  const int64_t width =
      kAvx2 ? (rows ? 8 * kBlocksAvx2<R> : kColsAvx2<R>) : (rows ? 16 * kBlocks<R> : kBlocks<R>);
  const int64_t tiles = (n + width - 1) / width;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k * width, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * width;
      const int64_t cols = std::min(width, n - n0);
      if constexpr (kAvx2) {
        static_assert(std::is_same_v<X, float>, "AVX2: fp32 x");
        if (rows) {
          rows_tile_avx2<R, kBlocksAvx2<R>>(x, ldx, wp, ldw, k, y, n, n0, cols);
        } else {
          cols_tile_avx2<R, kColsAvx2<R>>(x, ldx, wp, ldw, k, y, n, n0, cols);
        }
      } else if constexpr (!std::is_same_v<W, int8_t>) {
        TORCH_INTERNAL_ASSERT(false, "16-bit weights: the AVX2 kernels");
      } else if constexpr (!std::is_same_v<X, float>) {
        cols_tile<R, kBlocks<R>>(x, ldx, wp, ldw, k, y, n, n0, cols);
      } else if (rows) {
        rows_tile<R, kBlocks<R>>(x, ldx, wp, ldw, k, y, n, n0, cols);
      } else {
        cols_tile<R, kBlocks<R>>(x, ldx, wp, ldw, k, y, n, n0, cols);
      }
    }
  });
}

template <bool kAvx2, typename W, typename X, int... R>
void mm_rows(int64_t r, const X* x, int64_t ldx, const at::Tensor& w, float* y, int64_t n,
             std::integer_sequence<int, R...>) {
  ((r == R + 1 ? rows_mm<R + 1, kAvx2, X, W>(x, ldx, w, y, n) : void()), ...);
}

// y [r, n] (fp32) = x [r, k] (fp32, rows contiguous) @ w, a pass over the weight per 8 rows.
template <bool kAvx2, typename W, typename X>
void all_rows(const X* x, const at::Tensor& w, at::Tensor& y) {
  constexpr int64_t kRows = 8;
  const int64_t r = y.size(0), k = w.size(0), n = w.size(1);
  for (int64_t r0 = 0; r0 < r; r0 += kRows) {
    mm_rows<kAvx2, W>(std::min(kRows, r - r0), x + r0 * k, k, w,
                      y.mutable_data_ptr<float>() + r0 * n, n,
                      std::make_integer_sequence<int, kRows>{});
  }
}

#endif  // GMM_INT8_WEIGHT_AVX512

}  // namespace

bool int8_weight_mm_available() {
#ifdef GMM_INT8_WEIGHT_AVX512
  return cpu_has_avx2();
#else
  return false;
#endif
}

at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(int8_weight_mm_available(), "int8_weight_mm: needs an x86-64 CPU with AVX2");
  TORCH_CHECK(x.is_cpu() && w.is_cpu() && w.scalar_type() == at::kChar && x.dim() == 2 &&
                  w.dim() == 2 && x.size(1) == w.size(0),
              "int8_weight_mm: expected x [r, k] and an int8 weight [k, n] on the CPU");
  const at::Tensor wc = w.stride(0) == 1 || w.stride(1) == 1 ? w : w.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(1)}, x.options().dtype(at::kFloat));
#ifdef GMM_INT8_WEIGHT_AVX512
  // bf16 x with the weight in the columns layout: x as it is, AVX512-BF16's dot products where
  // the CPU has them; else x in fp32, on AVX-512 or AVX2.
  const bool avx512 = cpu_has_avx512();
  const bool bf16 = cpu_has_avx512_bf16() && x.scalar_type() == at::kBFloat16 && wc.stride(0) == 1;
  const at::Tensor xc = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  note_kernel(bf16     ? CpuKernel::kWeightBf16Dot
              : avx512 ? CpuKernel::kWeightAvx512
                       : CpuKernel::kWeightAvx2);
  if (bf16) {
    all_rows<false, int8_t>(xc.const_data_ptr<at::BFloat16>(), wc, y);
  } else if (avx512) {
    all_rows<false, int8_t>(xc.const_data_ptr<float>(), wc, y);
  } else {
    all_rows<true, int8_t>(xc.const_data_ptr<float>(), wc, y);
  }
#endif
  return y;
}

bool few_rows_mm_takes(const at::Tensor& x, const at::Tensor& w) {
  return int8_weight_mm_available() && x.is_cpu() && w.is_cpu() && x.dim() == 2 && w.dim() == 2 &&
         x.size(0) <= kInt8WeightMaxRows &&
         (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf) &&
         (w.stride(0) == 1 || w.stride(1) == 1);
}

at::Tensor few_rows_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(few_rows_mm_takes(x, w) && x.size(1) == w.size(0),
              "few_rows_mm: expected x [r <= ", kInt8WeightMaxRows,
              ", k] and a 16-bit weight [k, n] with rows or columns contiguous, on an AVX2 CPU");
  at::Tensor y = at::empty({x.size(0), w.size(1)}, x.options().dtype(at::kFloat));
#ifdef GMM_INT8_WEIGHT_AVX512
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  if (w.scalar_type() == at::kBFloat16) {
    all_rows<true, at::BFloat16>(xc.const_data_ptr<float>(), w, y);
  } else {
    all_rows<true, at::Half>(xc.const_data_ptr<float>(), w, y);
  }
#endif
  return y;
}

}  // namespace gmm_allreduce
