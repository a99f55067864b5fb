// What this CPU computes natively, and the product each dtype takes there: one policy for the CPU
// engine, decided from the host once per process and capped by GMM_CPU_ISA (for tests and
// benchmarks of the lower tiers on any host).
//
// The tiers, each including the ones below:
//   avx2         AVX2, FMA and F16C: fp32 FMA; int8 as int16 pairs (vpmaddwd)
//   avx512       AVX-512 F, BW, VL and DQ (and VNNI's int8 dot products where the CPU has them)
//   avx512_bf16  AVX512-BF16: bf16 dot products, so that a bf16 GEMM runs natively (oneDNN)
//   amx          AMX-INT8 and AMX-BF16 tiles, which the OS lets this process use
// Below avx2 ("baseline") only ATen's own kernels run.
//
// The rule the policy keeps: a 16-bit or int8 product never runs on ATen's reference kernels. A
// 16-bit GEMM the host has no native kernel for runs as an fp32 GEMM on operands converted a block
// at a time (fp32 accumulation, one rounding, as the native GEMM); int8 runs on our kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace gmm_allreduce {

enum class CpuTier : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

const char* tier_name(CpuTier t);

// The host's tier, detected once.
CpuTier host_tier();

// The tier the engine uses: the host's, capped by GMM_CPU_ISA (avx2, avx512, avx512_bf16 or amx;
// unset or empty: no cap; a cap above the host's tier leaves the host's). Read at each call, so
// that a test may change it; any other value raises a ValueError naming the variable.
CpuTier cpu_tier();

// Features under the cap, each also requiring that the host has it.
bool cpu_has_avx2();         // AVX2 + FMA + F16C
bool cpu_has_avx512();       // AVX-512 F, BW, VL, DQ
bool cpu_has_vnni();         // AVX512-VNNI (tier avx512 and up)
bool cpu_has_avx512_bf16();  // AVX512-BF16
bool cpu_has_amx_int8();     // AMX-INT8 usable
bool cpu_has_amx_bf16();     // AMX-BF16 usable (with AVX512-BF16)

// Whether a CPU GEMM of this float dtype and `macs` multiply-adds runs natively in ATen: fp32 and
// fp64 everywhere; bf16 from tier avx512_bf16 (oneDNN) and kNativeBf16MinMacs multiply-adds;
// fp16 nowhere (ATen's CPU fp16 GEMM is a scalar loop). Otherwise the engine computes it as an
// fp32 GEMM on upcast operands (upcast.h).
bool cpu_native_gemm(at::ScalarType dtype, int64_t macs = INT64_MAX);

// Multiply-adds below which a bf16 GEMM takes the fp32 path even where oneDNN's bf16 GEMM runs
// natively: there oneDNN's fixed cost a call is more than the products (benchmarks/RESULTS.md,
// "Figures behind the code's thresholds").
constexpr int64_t kNativeBf16MinMacs = int64_t{1} << 20;

// The CPU products, as the engine notes them when it runs one (the tests read which ran, so that a
// silent fallback to another kernel fails them).
enum class CpuKernel : int {
  kNative,          // ATen's GEMM in the call's dtype (fp32, fp64; bf16 natively)
  kUpcast,          // a 16-bit GEMM as fp32 on upcast operands (upcast.h)
  kInt8Amx,         // int8_amx.h, W8A8
  kInt8Vnni,        // int8_vnni.h
  kInt8Avx2,        // int8_avx2.h
  kInt8Avx2Packed,  // int8_avx2.h, the weight's int16 pairs read from its pack (prepack.h)
  kInt8IntMm,       // torch._int_mm (VNNI hosts, few rows)
  kInt8Float,       // int8 as an exact fp32 or fp64 GEMM (no VNNI, a pair the AVX2 kernel refuses)
  kFp8Float,        // float8_e4m3fn as an fp32 GEMM
  kWeightAvx512,    // int8_weight.h, fp32 FMA on AVX-512
  kWeightBf16Dot,   // int8_weight.h, AVX512-BF16 dot products
  kWeightAvx2,      // int8_weight.h, fp32 FMA on AVX2
  kWeightAmx,       // int8_amx.h, bf16 x
  kWeightDequant,   // the weight dequantised once, then a float GEMM
  kCount
};

const char* kernel_name(CpuKernel k);

// Notes that `k` ran (a relaxed atomic or: cheap enough for every group's product).
void note_kernel(CpuKernel k);

// The kernels noted since the last call, by name, and forgets them (tests).
std::vector<std::string> take_noted_kernels();

// The policy in words, for cpu_capabilities(): ("host", tier), ("tier", tier), then for each of
// float32, float64, bfloat16, float16, int8 (W8A8), float8_e4m3fn and weight-only int8 the kernel
// that serves it at this tier.
std::vector<std::pair<std::string, std::string>> cpu_policy();

}  // namespace gmm_allreduce
