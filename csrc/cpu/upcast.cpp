#include "cpu/upcast.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/kernels/int8_weight.h"
#include "cpu/kernels/isa.h"
#include "util/block_rows.h"
#include "util/float_bits.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace gmm_allreduce {
namespace {

template <typename Bits>
GMM_VECTOR_CLONES void widen(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bits::load(src[i]);
}

template <typename Bits>
GMM_VECTOR_CLONES void narrow(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bits::store(src[i]);
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 through F16C, 8 at a time (GCC does not vectorise _Float16 conversions without
// AVX512-FP16: the loops above call a helper per element). Every AVX2 host has F16C
// (cpu/kernels/isa.h).
#define GMM_F16C __attribute__((target("avx2,f16c")))

GMM_F16C void widen_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

GMM_F16C void narrow_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// The conversions of one 16-bit dtype: bf16, fp16 through F16C, or fp16 in plain C++ (no AVX2).
enum class Bits { kBf16, kF16c, kHalf };

Bits bits_of(at::ScalarType t) {
  if (t == at::kBFloat16) return Bits::kBf16;
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2()) return Bits::kF16c;
#endif
  return Bits::kHalf;
}

void widen(Bits b, const uint16_t* src, float* dst, int64_t n) {
  if (b == Bits::kBf16) return widen<BFloat16Bits>(src, dst, n);
#if defined(__x86_64__) && defined(__GNUC__)
  if (b == Bits::kF16c) return widen_f16c(src, dst, n);
#endif
  widen<HalfBits>(src, dst, n);
}

void narrow(Bits b, const float* src, uint16_t* dst, int64_t n) {
  if (b == Bits::kBf16) return narrow<BFloat16Bits>(src, dst, n);
#if defined(__x86_64__) && defined(__GNUC__)
  if (b == Bits::kF16c) return narrow_f16c(src, dst, n);
#endif
  narrow<HalfBits>(src, dst, n);
}

// fn(begin, end) over [0, n): in parallel, or on this thread for fewer than `grain` (what
// at::parallel_for would do, without its cost).
template <typename Fn>
void over(int64_t n, int64_t grain, const Fn& fn) {
  if (n < grain) return fn(int64_t{0}, n);
  at::parallel_for(0, n, grain, fn);
}

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// Rows contiguous (false) or the transposed view of contiguous rows (true); nullopt otherwise.
std::optional<bool> dense_2d(const at::Tensor& t) {
  if (t.dim() != 2) return std::nullopt;
  if (t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) == t.size(1))) return false;
  if (t.stride(0) == 1 && (t.size(1) <= 1 || t.stride(1) == t.size(0))) return true;
  return std::nullopt;
}

// Row j of an [rows, n] fp32 block (rows contiguous) rounded into y's row j.
void round_rows(const float* src, at::Tensor& y) {
  const int64_t n = y.size(1);
  auto* dst = static_cast<uint16_t*>(y.mutable_data_ptr());
  const int64_t ld = y.stride(0);
  const Bits bits = bits_of(y.scalar_type());
  over(y.size(0), block_rows(n, 1 << 14), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      narrow(bits, src + j * n, dst + j * ld, n);
    }
  });
}

}  // namespace

at::Tensor upcast(const at::Tensor& t, int slot) {
  const std::optional<bool> transposed = dense_2d(t);
  if (!t.is_cpu() || !is_16bit(t) || !transposed) return t.to(at::kFloat);
  // The thread's scratch: its pages stay mapped and warm from one group to the next (a fresh
  // allocation of a weight's size costs a page fault per 4 KiB on every call).
  thread_local at::Tensor scratches[2];
  at::Tensor out;
  if (slot >= 0 && t.numel() <= kScratchFloats) {
    at::Tensor& scratch = scratches[slot];
    if (!scratch.defined() || scratch.numel() < t.numel()) {
      scratch = at::empty({t.numel()}, t.options().dtype(at::kFloat));
    }
    const std::vector<int64_t> sizes{t.size(0), t.size(1)};
    const std::vector<int64_t> strides =
        *transposed ? std::vector<int64_t>{1, t.size(0)} : std::vector<int64_t>{t.size(1), 1};
    out = scratch.as_strided(sizes, strides, 0);
  } else {
    out = *transposed ? at::empty({t.size(1), t.size(0)}, t.options().dtype(at::kFloat)).t()
                      : at::empty(t.sizes(), t.options().dtype(at::kFloat));
  }
  const auto* src = static_cast<const uint16_t*>(t.const_data_ptr());
  float* dst = out.mutable_data_ptr<float>();
  const Bits bits = bits_of(t.scalar_type());
  over(t.numel(), int64_t{1} << 15,
       [&](int64_t b, int64_t e) { widen(bits, src + b, dst + b, e - b); });
  return out;
}

void upcast_gemm(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  if (few_rows_mm_takes(x, w)) {  // a few rows: the weight read once, widened in registers
    at::Tensor sums = few_rows_mm(x, w);
    if (bias.defined()) sums.add_(bias);
    if (y.is_cpu() && is_16bit(y) && y.stride(1) == 1) {
      round_rows(sums.const_data_ptr<float>(), y);
    } else {
      y.copy_(sums);
    }
    return;
  }
  const at::Tensor w32 = upcast(w, /*scratch=*/0);
  const int64_t rows = block_rows(x.size(1) + y.size(1), int64_t{1} << 20);
  const bool fp32_out = y.scalar_type() == at::kFloat;
  for (int64_t r = 0; r < y.size(0); r += rows) {
    const int64_t count = std::min(rows, y.size(0) - r);
    const bool whole = count == y.size(0);  // one block (small groups): no narrow to dispatch
    const at::Tensor x32 = upcast(whole ? x : x.narrow(0, r, count));
    at::Tensor out = whole ? y : y.narrow(0, r, count);
    if (fp32_out) {  // the fp32 buffer of reduce_dtype: written in place
      bias.defined() ? at::addmm_out(out, bias, x32, w32) : at::mm_out(out, x32, w32);
    } else if (out.is_cpu() && is_16bit(out) && out.stride(1) == 1) {
      const at::Tensor sums = bias.defined() ? at::addmm(bias, x32, w32) : at::mm(x32, w32);
      round_rows(sums.const_data_ptr<float>(), out);
    } else {
      out.copy_(bias.defined() ? at::addmm(bias, x32, w32) : at::mm(x32, w32));
    }
  }
}

at::Tensor Fp32Products::operator()(const at::Tensor& x, const at::Tensor& w,
                                    const at::Tensor& scale) {
  const bool int8 = w.scalar_type() == at::kChar;
  if (int8 && x.size(0) <= kInt8WeightMaxRows && int8_weight_mm_available()) {
    return int8_weight_mm(x, w).mul_(scale.to(at::kFloat));
  }
  if (!int8 && few_rows_mm_takes(x, w)) return few_rows_mm(x, w);
  if (held_ != w.unsafeGetTensorImpl() || !w32_.defined()) {
    w32_ = int8 ? w.to(at::kFloat).mul_(scale.to(at::kFloat)) : upcast(w, scratch_);
    held_ = w.unsafeGetTensorImpl();
  }
  return at::mm(x.scalar_type() == at::kFloat ? x : upcast(x), w32_);
}

}  // namespace gmm_allreduce
