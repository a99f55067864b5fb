#include "int8_amx.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define GMM_INT8_AMX 1
#define GMM_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-int8")))
#define GMM_UNROLL _Pragma("GCC unroll 16")
// GCC 12's unpack intrinsics start from a vector it sees as uninitialised (`__Y = __Y`), once
// inlined into a target-attributed function: a false warning.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace gmm_allreduce {
namespace {

// A tile of int8 is 16 rows of 64 bytes; one of int32, 16 rows of 16 values.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileK = 64;
constexpr int64_t kTileBytes = kTileRows * kTileK;
// Columns of the blocks handed to the sink.
constexpr int64_t kChunk = 256;

#ifdef GMM_INT8_AMX

// The 16 x 16 matrix of 32-bit values in v[0..15] (one row each), transposed in place.
GMM_AMX inline void transpose16(__m512i (&v)[16]) {
  __m512i t[16];
  GMM_UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  GMM_UNROLL
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  GMM_UNROLL
  for (int h = 0; h < 2; ++h) {
    GMM_UNROLL
    for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_i32x4(v[8 * h + j], v[8 * h + 4 + j], 0x88);
      t[8 * h + 4 + j] = _mm512_shuffle_i32x4(v[8 * h + j], v[8 * h + 4 + j], 0xDD);
    }
  }
  GMM_UNROLL
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    v[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
  }
}

// The tiles' shapes (palette 1): tiles 0-3 the int32 sums, 4-5 weight, 6-7 x; all 16 x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// x's rows as the tiles' second operand: for each block of 16 rows (zeros past r) and each 64 of
// k, one tile whose row q holds, for each of the 16 rows, its 4 values at k = 4q .. 4q + 3.
GMM_AMX void pack_x(const int8_t* x, int64_t ldx, int64_t r, int64_t k, int64_t blocks,
                    int8_t* packed) {
  const int64_t steps = k / kTileK;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t s = 0; s < steps; ++s) {
      __m512i v[16];
      GMM_UNROLL
      for (int i = 0; i < 16; ++i) {
        const int64_t row = b * kTileRows + i;
        v[i] = row < r ? _mm512_loadu_si512(x + row * ldx + s * kTileK) : _mm512_setzero_si512();
      }
      transpose16(v);
      int8_t* dst = packed + (b * steps + s) * kTileBytes;
      GMM_UNROLL
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * kTileK, v[i]);
    }
  }
}

// Output columns [n_begin, n_end) (multiples of 16) of x @ w, handed to `sink` a block of 32 rows
// and up to kChunk columns at a time. For each 32 rows and 32 columns, four tiles of sums over k of
// weight tiles ([16 columns, 64 k], loaded in place) by x's packed tiles; the sums come out as
// [column, row] and are transposed into the block.
GMM_AMX void columns(const int8_t* packed, int64_t r, int64_t k, const int8_t* w, int64_t ldw,
                     int64_t n_begin, int64_t n_end, Int8Sink sink) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.bytes_per_row[t] = kTileK;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
  const int64_t steps = k / kTileK;
  alignas(64) int32_t sums[4][kTileRows * kTileRows];
  alignas(64) int32_t block[2 * kTileRows * kChunk];
  for (int64_t c0 = n_begin; c0 < n_end; c0 += kChunk) {
    const int64_t c1 = std::min(n_end, c0 + kChunk);
    for (int64_t m0 = 0; m0 < r; m0 += 2 * kTileRows) {
      const int8_t* x0 = packed + (m0 / kTileRows) * steps * kTileBytes;
      const int8_t* x1 = x0 + steps * kTileBytes;  // zeros past r: packed for whole pairs
      for (int64_t n0 = c0; n0 < c1; n0 += 2 * kTileRows) {
        const bool two_n = n0 + kTileRows < c1;
        const int8_t* w0 = w + n0 * ldw;
        const int8_t* w1 = two_n ? w0 + kTileRows * ldw : w0;
        // The first pass over the rows reads the weight from memory: fetch the next 32 columns'.
        const int8_t* next =
            m0 == 0 && n0 + 2 * kTileRows < c1 ? w0 + 2 * kTileRows * ldw : nullptr;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          if (next != nullptr) {
            for (int64_t c = 0; c < 2 * kTileRows; ++c) {
              _mm_prefetch(reinterpret_cast<const char*>(next + c * ldw + s * kTileK), _MM_HINT_T0);
            }
          }
          _tile_loadd(4, w0 + s * kTileK, ldw);
          _tile_loadd(5, w1 + s * kTileK, ldw);
          _tile_loadd(6, x0 + s * kTileBytes, kTileK);
          _tile_loadd(7, x1 + s * kTileBytes, kTileK);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, sums[0], kTileK);
        _tile_stored(1, sums[1], kTileK);
        _tile_stored(2, sums[2], kTileK);
        _tile_stored(3, sums[3], kTileK);
        for (int t = 0; t < (two_n ? 4 : 2); ++t) {
          __m512i v[16];
          GMM_UNROLL
          for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(sums[t] + i * kTileRows);
          transpose16(v);
          int32_t* dst = block + (t & 1) * kTileRows * kChunk + (n0 - c0) + (t >> 1) * kTileRows;
          GMM_UNROLL
          for (int i = 0; i < 16; ++i) _mm512_store_si512(dst + i * kChunk, v[i]);
        }
      }
      sink(m0, std::min<int64_t>(2 * kTileRows, r - m0), c0, c1 - c0, block, kChunk);
    }
  }
  _tile_release();
}

bool detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  const bool avx512 = (b & (1u << 16)) != 0 && (b & (1u << 30)) != 0;  // F, BW
  const bool amx = (d & (1u << 24)) != 0 && (d & (1u << 25)) != 0;     // TILE, INT8
  if (!avx512 || !amx) return false;
  // Linux hands out the tiles' state only to a process that asks for it (5.16+).
  constexpr long kReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

#endif  // GMM_INT8_AMX

}  // namespace

bool int8_amx_available() {
#ifdef GMM_INT8_AMX
  static const bool available = detect();
  return available;
#else
  return false;
#endif
}

bool int8_amx_takes(const at::Tensor& x, const at::Tensor& w) {
  return x.is_cpu() && w.is_cpu() && x.scalar_type() == at::kChar && w.scalar_type() == at::kChar &&
         x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) && x.size(1) % kTileK == 0 &&
         w.size(1) % kTileRows == 0 && x.stride(1) == 1 && w.stride(0) == 1 &&
         w.stride(1) >= w.size(0) && int8_amx_available();
}

void int8_amx_gemm(const at::Tensor& x, const at::Tensor& w, Int8Sink sink) {
  TORCH_CHECK(int8_amx_takes(x, w), "int8_amx_gemm: a pair the AMX kernel does not take");
#ifdef GMM_INT8_AMX
  const int64_t r = x.size(0), k = x.size(1), n = w.size(1);
  if (r == 0 || n == 0) return;
  const int64_t blocks = (r + 2 * kTileRows - 1) / (2 * kTileRows) * 2;  // whole pairs of 16 rows
  at::Tensor packed = at::empty({blocks * k * kTileRows}, x.options());
  pack_x(x.const_data_ptr<int8_t>(), x.stride(0), r, k, blocks, packed.mutable_data_ptr<int8_t>());
  const int8_t* packed_p = packed.const_data_ptr<int8_t>();
  const int8_t* w_p = w.const_data_ptr<int8_t>();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // Threads take chunks of columns: about 2^22 MACs each at least.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k * kChunk));
  at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    columns(packed_p, r, k, w_p, w.stride(1), b * kChunk, std::min(n, e * kChunk), sink);
  });
#endif
}

at::Tensor int8_amx_mm(const at::Tensor& x, const at::Tensor& w) {
  at::Tensor out = at::zeros({x.size(0), w.size(1)}, x.options().dtype(at::kInt));
  int32_t* out_p = out.mutable_data_ptr<int32_t>();
  const int64_t n = out.size(1);
  int8_amx_gemm(
      x, w,
      [&](int64_t row, int64_t rows, int64_t col, int64_t cols, const int32_t* sums, int64_t ld) {
        for (int64_t i = 0; i < rows; ++i) {
          std::copy_n(sums + i * ld, cols, out_p + (row + i) * n + col);
        }
      });
  return out;
}

}  // namespace gmm_allreduce
