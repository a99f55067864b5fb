#include "cpu/kernels/int8_vnni.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/transpose16.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GMM_VNNI_KERNEL 1
#define GMM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define GMM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gmm_allreduce {
namespace {

// x is reordered into panels of 16 rows: for each 4 bytes of k, one 64-byte line holding the 16
// rows' 4 bytes (unsigned: x + 128; zeros past r and past k).
constexpr int64_t kPanelRows = 16;
constexpr int64_t kLine = 64;
// Rows and columns of the blocks handed to the sink; columns per pass over k (the accumulators:
// 2 panels of rows times kPass columns).
constexpr int64_t kVnniBlockRows = 2 * kPanelRows;
constexpr int64_t kVnniChunk = 256;
constexpr int kPass = 8;

#ifdef GMM_VNNI_KERNEL

// x's rows as panels, `panels` of them (a multiple of 2), each k4 lines: line q of panel p holds
// rows 16p .. 16p + 15's bytes 4q .. 4q + 3, each plus 128.
GMM_VNNI void pack_x(const int8_t* x, int64_t ldx, int64_t r, int64_t k, int64_t panels,
                     uint8_t* packed) {
  const int64_t k4 = (k + 3) / 4;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t s = 0; s < k; s += kLine) {
      const __mmask64 m = (k - s) >= kLine ? ~__mmask64{0} : (__mmask64{1} << (k - s)) - 1;
      __m512i v[16];
      GMM_UNROLL
      for (int i = 0; i < 16; ++i) {
        const int64_t row = p * kPanelRows + i;
        v[i] = row < r ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, x + row * ldx + s),
                                          _mm512_maskz_mov_epi8(m, bias))
                       : _mm512_setzero_si512();
      }
      transpose16(v);  // v[q]: the 16 rows' dwords q (bytes s + 4q ..)
      uint8_t* dst = packed + (p * k4 + s / 4) * kLine;
      const int64_t lines = std::min<int64_t>(16, k4 - s / 4);
      for (int64_t q = 0; q < lines; ++q) _mm512_storeu_si512(dst + q * kLine, v[q]);
    }
  }
}

// 128 times the sum over k of each of 16 weight columns (w[c * ldw + kk]), as 16 lanes.
GMM_VNNI __m512i offsets(const int8_t* w, int64_t ldw, int64_t k) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) int32_t out[16];
  for (int c = 0; c < 16; ++c) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t s = 0; s < k; s += kLine) {
      const __mmask64 m = (k - s) >= kLine ? ~__mmask64{0} : (__mmask64{1} << (k - s)) - 1;
      acc = _mm512_dpbusd_epi32(acc, bias, _mm512_maskz_loadu_epi8(m, w + c * ldw + s));
    }
    out[c] = _mm512_reduce_add_epi32(acc);
  }
  return _mm512_load_si512(out);
}

// Sums of 2 panels of x (32 rows; `two` false: the first only) with kPass columns of the weight
// from w (column stride ldw), over k4 steps of 4 bytes: out[h][c] the 16 rows of panel h.
GMM_VNNI inline void pass(const uint8_t* x0, const uint8_t* x1, bool two, const int8_t* w,
                          int64_t ldw, int64_t k4, __m512i (&out)[2][kPass]) {
  __m512i acc[2][kPass];
  GMM_UNROLL
  for (int c = 0; c < kPass; ++c) acc[0][c] = acc[1][c] = _mm512_setzero_si512();
  if (two) {
    for (int64_t q = 0; q < k4; ++q) {
      const __m512i a0 = _mm512_loadu_si512(x0 + q * kLine);
      const __m512i a1 = _mm512_loadu_si512(x1 + q * kLine);
      GMM_UNROLL
      for (int c = 0; c < kPass; ++c) {
        int32_t word;
        std::memcpy(&word, w + c * ldw + 4 * q, 4);
        const __m512i b = _mm512_set1_epi32(word);
        acc[0][c] = _mm512_dpbusd_epi32(acc[0][c], a0, b);
        acc[1][c] = _mm512_dpbusd_epi32(acc[1][c], a1, b);
      }
    }
  } else {
    for (int64_t q = 0; q < k4; ++q) {
      const __m512i a0 = _mm512_loadu_si512(x0 + q * kLine);
      GMM_UNROLL
      for (int c = 0; c < kPass; ++c) {
        int32_t word;
        std::memcpy(&word, w + c * ldw + 4 * q, 4);
        acc[0][c] = _mm512_dpbusd_epi32(acc[0][c], a0, _mm512_set1_epi32(word));
      }
    }
  }
  GMM_UNROLL
  for (int c = 0; c < kPass; ++c) {
    out[0][c] = acc[0][c];
    out[1][c] = acc[1][c];
  }
}

// Output columns [n_begin, n_end) (multiples of 16) of x @ w, handed to `sink` a block of 32
// rows and up to kVnniChunk columns at a time.
GMM_VNNI void columns(const uint8_t* packed, int64_t r, int64_t k, const int8_t* w, int64_t ldw,
                      int64_t n_begin, int64_t n_end, BlockSink<int32_t> sink) {
  const int64_t k4 = (k + 3) / 4;
  alignas(64) int32_t offset[kVnniChunk];
  alignas(64) int32_t block[kVnniBlockRows * kVnniChunk];
  for (int64_t c0 = n_begin; c0 < n_end; c0 += kVnniChunk) {
    const int64_t c1 = std::min(n_end, c0 + kVnniChunk);
    for (int64_t n0 = c0; n0 < c1; n0 += 16) {
      _mm512_store_si512(offset + (n0 - c0), offsets(w + n0 * ldw, ldw, k));
    }
    for (int64_t m0 = 0; m0 < r; m0 += kVnniBlockRows) {
      const bool two = m0 + kPanelRows < r;
      const uint8_t* x0 = packed + (m0 / kPanelRows) * k4 * kLine;
      const uint8_t* x1 = x0 + k4 * kLine;
      for (int64_t n0 = c0; n0 < c1; n0 += 16) {
        __m512i half[2][kPass], rest[2][kPass];  // columns n0 .. n0 + 7, n0 + 8 .. n0 + 15
        pass(x0, x1, two, w + n0 * ldw, ldw, k4, half);
        pass(x0, x1, two, w + (n0 + kPass) * ldw, ldw, k4, rest);
        const __m512i off = _mm512_load_si512(offset + (n0 - c0));
        for (int h = 0; h < (two ? 2 : 1); ++h) {
          __m512i t[16];
          GMM_UNROLL
          for (int c = 0; c < kPass; ++c) {
            t[c] = half[h][c];
            t[kPass + c] = rest[h][c];
          }
          transpose16(t);  // t[i]: row 16h + i's 16 columns
          int32_t* dst = block + h * kPanelRows * kVnniChunk + (n0 - c0);
          GMM_UNROLL
          for (int i = 0; i < 16; ++i)
            _mm512_store_si512(dst + i * kVnniChunk, _mm512_sub_epi32(t[i], off));
        }
      }
      sink(m0, std::min(kVnniBlockRows, r - m0), c0, c1 - c0, block, kVnniChunk);
    }
  }
}

#endif  // GMM_VNNI_KERNEL

bool vnni() {
#ifdef GMM_VNNI_KERNEL
  return cpu_has_vnni();
#else
  return false;
#endif
}

}  // namespace

bool int8_vnni_takes(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kChar && block_pair_shapes(x, w, 4) && columns_layout(w) && vnni();
}

void int8_vnni_gemm(const at::Tensor& x, const at::Tensor& w, BlockSink<int32_t> sink) {
  TORCH_CHECK(int8_vnni_takes(x, w), "int8_vnni_gemm: a pair the VNNI kernel does not take");
#ifdef GMM_VNNI_KERNEL
  const int64_t r = x.size(0), k = x.size(1), n = w.size(1);
  if (r == 0 || n == 0) return;
  const int64_t panels = (r + kVnniBlockRows - 1) / kVnniBlockRows * 2;
  const int64_t k4 = (k + 3) / 4;
  at::Tensor packed = at::empty({panels * k4 * kLine}, x.options().dtype(at::kByte));
  uint8_t* packed_p = packed.mutable_data_ptr<uint8_t>();
  pack_x(x.const_data_ptr<int8_t>(), x.stride(0), r, k, panels, packed_p);
  const int8_t* w_p = w.const_data_ptr<int8_t>();
  const int64_t chunks = (n + kVnniChunk - 1) / kVnniChunk;
  // Threads take chunks of columns: about 2^22 multiply-adds each at least.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k * kVnniChunk));
  at::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    columns(packed_p, r, k, w_p, w.stride(1), b * kVnniChunk, std::min(n, e * kVnniChunk), sink);
  });
#endif
}

}  // namespace gmm_allreduce
