#include "cpu/kernels/int8_amx.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/transpose16.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define GMM_AMX_KERNELS 1
#define GMM_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-int8,amx-bf16")))
#define GMM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gmm_allreduce {
namespace {

// A tile is 16 rows of 64 bytes: 64 int8 or 32 bf16 of k per row of operands, 16 sums per row
// of the results (int32 or fp32).
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileRowBytes = 64;
constexpr int64_t kTileBytes = kTileRows * kTileRowBytes;
// Columns of the blocks handed to the sink.
constexpr int64_t kChunk = 256;

// The weight's tiles: int8 in the columns layout loaded in place (W8A8, the first operand), or
// int8 widened to bf16 into a buffer (weight-only with bf16 x: int8 values are exact in bf16), in
// the columns layout (the first operand) or the rows layout (the second, k in pairs).
enum class Weight { kInt8, kInt8AsBf16, kInt8RowsAsBf16 };

// Whether the weight is the first operand, so that x is the second (reordered) and the sums come
// out as [column, row].
constexpr bool weight_first(Weight w) { return w != Weight::kInt8RowsAsBf16; }

#ifdef GMM_AMX_KERNELS

// The tiles' shapes (palette 1): tiles 0-3 the sums, 4-5 the weight, 6-7 x; all 16 x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// x's rows as tiles: for each block of 16 rows (zeros past r) and each 64 bytes of a row, one
// tile. As the second operand (`transpose`), its row q holds, for each of the 16 rows, its 4 bytes
// at 4q (4 int8 or 2 bf16 of k); as the first, the 16 rows' 64 bytes.
GMM_AMX void pack_x(const char* x, int64_t ldx, int64_t r, int64_t row_bytes, int64_t blocks,
                    bool transpose, char* packed) {
  const int64_t steps = row_bytes / kTileRowBytes;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t s = 0; s < steps; ++s) {
      __m512i v[16];
      GMM_UNROLL
      for (int i = 0; i < 16; ++i) {
        const int64_t row = b * kTileRows + i;
        v[i] = row < r ? _mm512_loadu_si512(x + row * ldx + s * kTileRowBytes)
                       : _mm512_setzero_si512();
      }
      if (transpose) transpose16(v);
      char* dst = packed + (b * steps + s) * kTileBytes;
      GMM_UNROLL
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * kTileRowBytes, v[i]);
    }
  }
}

// 16 rows of 32 int8 weights (row stride ldw) as a bf16 tile.
GMM_AMX inline void widen_to_bf16(const int8_t* w, int64_t ldw, char* tile) {
  GMM_UNROLL
  for (int i = 0; i < 16; ++i) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    _mm512_store_si512(tile + i * kTileRowBytes, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// 32 rows of 16 int8 weights (row stride ldw) as a bf16 tile of the second operand: row q holds
// the 16 columns' weights at rows 2q and 2q + 1, interleaved.
GMM_AMX inline void widen_pairs_to_bf16(const int8_t* w, int64_t ldw, char* tile) {
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  GMM_UNROLL
  for (int q = 0; q < 16; ++q) {
    const __m128i* even = reinterpret_cast<const __m128i*>(w + 2 * q * ldw);
    const __m128i* odd = reinterpret_cast<const __m128i*>(w + (2 * q + 1) * ldw);
    const __m512 e = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(even)));
    const __m512 o = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(odd)));
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(o, e);  // e's 16, then o's 16
    _mm512_store_si512(tile + q * kTileRowBytes, _mm512_permutexvar_epi16(interleave, both));
  }
}

// Tile c += the product of weight tile wt and x tile xt, in the order the weight's layout takes:
// int8 sums in int32, or bf16 sums in fp32. A macro: the tile intrinsics take the tiles' numbers
// as literals (GCC pastes them into the instruction).
#define GMM_DOT(kW, c, wt, xt)               \
  do {                                       \
    if constexpr (kW == Weight::kInt8) {     \
      _tile_dpbssd(c, wt, xt);               \
    } else if constexpr (weight_first(kW)) { \
      _tile_dpbf16ps(c, wt, xt);             \
    } else {                                 \
      _tile_dpbf16ps(c, xt, wt);             \
    }                                        \
  } while (false)

// Output columns [n_begin, n_end) (multiples of 16) of x @ w, handed to `sink` a block of 32 rows
// and up to kChunk columns at a time. For each 32 rows and 32 columns, up to four tiles of sums
// over k of weight tiles (16 columns by 64 bytes of k) and x's packed tiles; with the weight
// first, the sums come out as [column, row] and are transposed into the block.
template <Weight kW, typename S>
GMM_AMX void columns(const char* packed, int64_t r, int64_t k, const int8_t* w, int64_t ldw,
                     int64_t n_begin, int64_t n_end, BlockSink<S> sink) {
  constexpr int64_t kStepK = kW == Weight::kInt8 ? kTileRowBytes : kTileRowBytes / 2;
  // Where weight column n, row k is: w[n * ldw + k] (columns layout) or w[k * ldw + n] (rows).
  constexpr bool kColumns = weight_first(kW);
  const int64_t col_stride = kColumns ? ldw : 1;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.bytes_per_row[t] = kTileRowBytes;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
  const int64_t steps = k / kStepK;
  alignas(64) S sums[4][kTileRows * kTileRows];
  alignas(64) S block[2 * kTileRows * kChunk];
  alignas(64) char widened[2][kTileBytes];
  for (int64_t c0 = n_begin; c0 < n_end; c0 += kChunk) {
    const int64_t c1 = std::min(n_end, c0 + kChunk);
    for (int64_t m0 = 0; m0 < r; m0 += 2 * kTileRows) {
      const bool two_m = m0 + kTileRows < r;
      const char* x0 = packed + (m0 / kTileRows) * steps * kTileBytes;
      const char* x1 = x0 + steps * kTileBytes;
      for (int64_t n0 = c0; n0 < c1; n0 += 2 * kTileRows) {
        const bool two_n = n0 + kTileRows < c1;
        const int8_t* w0 = w + n0 * col_stride;
        const int8_t* w1 = two_n ? w0 + kTileRows * col_stride : w0;
        // The first pass over the rows reads the weight from memory: fetch the next (up to) 32
        // columns', across chunks (rows layout: the next 64 columns' lines, every other pair).
        int64_t ahead = 0;
        if (m0 == 0 && kColumns) ahead = std::min(2 * kTileRows, n_end - n0 - 2 * kTileRows);
        if (m0 == 0 && !kColumns && (n0 - n_begin) % 64 == 0 && n0 + 64 < n_end) ahead = kStepK;
        const int8_t* next = kColumns ? w0 + 2 * kTileRows * ldw : w0 + 64;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          for (int64_t c = 0; c < ahead; ++c) {
            const int8_t* p =
                kColumns ? next + c * ldw + s * kStepK : next + (s * kStepK + c) * ldw;
            _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
          }
          if constexpr (kW == Weight::kInt8) {
            _tile_loadd(4, w0 + s * kStepK, ldw);
            _tile_loadd(5, w1 + s * kStepK, ldw);
          } else {
            if constexpr (kColumns) {
              widen_to_bf16(w0 + s * kStepK, ldw, widened[0]);
              widen_to_bf16(w1 + s * kStepK, ldw, widened[1]);
            } else {
              widen_pairs_to_bf16(w0 + s * kStepK * ldw, ldw, widened[0]);
              widen_pairs_to_bf16(w1 + s * kStepK * ldw, ldw, widened[1]);
            }
            _tile_loadd(4, widened[0], kTileRowBytes);
            _tile_loadd(5, widened[1], kTileRowBytes);
          }
          _tile_loadd(6, x0 + s * kTileBytes, kTileRowBytes);
          GMM_DOT(kW, 0, 4, 6);
          GMM_DOT(kW, 2, 5, 6);
          if (two_m) {
            _tile_loadd(7, x1 + s * kTileBytes, kTileRowBytes);
            GMM_DOT(kW, 1, 4, 7);
            GMM_DOT(kW, 3, 5, 7);
          }
        }
        if constexpr (!kColumns) {  // the sums as [row, column]: straight into the block
          constexpr int64_t ld = kChunk * sizeof(S);
          S* dst = block + (n0 - c0);
          _tile_stored(0, dst, ld);
          _tile_stored(1, dst + kTileRows * kChunk, ld);
          _tile_stored(2, dst + kTileRows, ld);
          _tile_stored(3, dst + kTileRows * kChunk + kTileRows, ld);
          continue;
        }
        _tile_stored(0, sums[0], kTileRowBytes);
        _tile_stored(1, sums[1], kTileRowBytes);
        _tile_stored(2, sums[2], kTileRowBytes);
        _tile_stored(3, sums[3], kTileRowBytes);
        for (int t = 0; t < 4; ++t) {
          if ((t & 1) && !two_m) continue;
          if ((t >> 1) && !two_n) continue;
          __m512i v[16];
          GMM_UNROLL
          for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(sums[t] + i * kTileRows);
          transpose16(v);
          S* dst = block + (t & 1) * kTileRows * kChunk + (n0 - c0) + (t >> 1) * kTileRows;
          GMM_UNROLL
          for (int i = 0; i < 16; ++i) _mm512_store_si512(dst + i * kChunk, v[i]);
        }
      }
      sink(m0, std::min<int64_t>(2 * kTileRows, r - m0), c0, c1 - c0, block, kChunk);
    }
  }
  _tile_release();
}

// x @ w through columns<kW>: x packed once, threads taking chunks of columns.
template <Weight kW, typename S>
void gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<S> sink) {
  const int64_t r = x.size(0), k = x.size(1), n = w.size(1);
  if (r == 0 || n == 0) return;
  const int64_t row_bytes = k * x.element_size();
  const int64_t blocks = (r + 2 * kTileRows - 1) / (2 * kTileRows) * 2;  // whole pairs of 16 rows
  at::Tensor packed = at::empty({blocks * row_bytes * kTileRows}, x.options().dtype(at::kChar));
  char* packed_p = static_cast<char*>(packed.mutable_data_ptr());
  pack_x(static_cast<const char*>(x.const_data_ptr()), x.stride(0) * x.element_size(), r, row_bytes,
         blocks, weight_first(kW), packed_p);
  const int8_t* w_p = w.const_data_ptr<int8_t>();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // Threads take chunks of columns: about 2^22 multiply-adds each at least.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k * kChunk));
  at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    columns<kW, S>(packed_p, r, k, w_p, weight_first(kW) ? w.stride(1) : w.stride(0), b * kChunk,
                   std::min(n, e * kChunk), sink);
  });
}

#endif  // GMM_AMX_KERNELS

// Whether the CPU has AMX-INT8 (int8) or AMX-BF16 and AVX512-BF16 (bf16), the OS lets this
// process use the tiles, and GMM_CPU_ISA leaves them (cpu/kernels/isa.h).
bool amx(bool bf16) {
#ifdef GMM_AMX_KERNELS
  return bf16 ? cpu_has_amx_bf16() : cpu_has_amx_int8();
#else
  (void)bf16;
  return false;
#endif
}

}  // namespace

bool int8_amx_takes(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kChar && block_pair_shapes(x, w, kTileRowBytes) &&
         columns_layout(w) && amx(false);
}

void int8_amx_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink) {
  TORCH_CHECK(int8_amx_takes(x, w), "int8_amx_gemm: a pair the AMX kernel does not take");
#ifdef GMM_AMX_KERNELS
  gemm<Weight::kInt8, int32_t>(x, w, sink);
#endif
}

bool bf16_int8_amx_takes(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kBFloat16 && block_pair_shapes(x, w, kTileRowBytes / 2) &&
         (columns_layout(w) || rows_layout(w)) && amx(true);
}

void bf16_int8_amx_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<float> sink) {
  TORCH_CHECK(bf16_int8_amx_takes(x, w), "bf16_int8_amx_gemm: a pair the AMX kernel does not take");
#ifdef GMM_AMX_KERNELS
  if (columns_layout(w)) {
    gemm<Weight::kInt8AsBf16, float>(x, w, sink);
  } else {
    gemm<Weight::kInt8RowsAsBf16, float>(x, w, sink);
  }
#endif
}

}  // namespace gmm_allreduce
