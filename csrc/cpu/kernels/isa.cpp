#include "cpu/kernels/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iterator>
#include <optional>
#include <string>

#include "util/env.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define GMM_X86 1
#endif
#if defined(GMM_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace gmm_allreduce {
namespace {

constexpr const char* kCapVariable = "GMM_CPU_ISA";

struct Host {
  CpuTier tier = CpuTier::kBaseline;
  bool vnni = false;
  bool amx_int8 = false;
  bool amx_bf16 = false;
};

#ifdef GMM_X86
// AMX's tiles need the OS's consent: Linux hands their state only to a process that asks (5.16+).
bool amx_permitted() {
#ifdef __linux__
  constexpr long kReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

Host detect() {
  Host h;
#ifdef GMM_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  bool tile = false, amx_int8 = false, amx_bf16 = false;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) != 0) {
    tile = (d & (1u << 24)) != 0;
    amx_int8 = (d & (1u << 25)) != 0;
    amx_bf16 = (d & (1u << 22)) != 0;
  }
  const bool amx = bf16 && tile && amx_int8 && amx_bf16 && amx_permitted();
  h.tier = amx      ? CpuTier::kAmx
           : bf16   ? CpuTier::kAvx512Bf16
           : avx512 ? CpuTier::kAvx512
           : avx2   ? CpuTier::kAvx2
                    : CpuTier::kBaseline;
  h.vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  h.amx_int8 = h.amx_bf16 = amx;
#endif
  return h;
}

const Host& host() {
  static const Host h = detect();
  return h;
}

// GMM_CPU_ISA's tier, or none when unset or empty.
std::optional<CpuTier> parse_cap() {
  const std::optional<std::string> v = env_value(kCapVariable);
  if (!v) return std::nullopt;
  for (const CpuTier t : {CpuTier::kAvx2, CpuTier::kAvx512, CpuTier::kAvx512Bf16, CpuTier::kAmx}) {
    if (*v == tier_name(t)) return t;
  }
  TORCH_CHECK_VALUE(false, kCapVariable, ": expected avx2, avx512, avx512_bf16 or amx, got \"",
                    std::getenv(kCapVariable), "\"");
}

// The cap, parsed again only when the variable's value changes (a call reads it several times).
std::optional<CpuTier> cap() {
  thread_local std::string last;
  thread_local std::optional<CpuTier> parsed;
  const char* raw = std::getenv(kCapVariable);
  if (raw == nullptr) return std::nullopt;
  if (raw != last) {
    parsed = parse_cap();  // raises before `last` changes: a bad value raises every time
    last = raw;
  }
  return parsed;
}

bool at_least(CpuTier t) { return static_cast<int>(cpu_tier()) >= static_cast<int>(t); }

}  // namespace

const char* tier_name(CpuTier t) {
  switch (t) {
    case CpuTier::kAvx2:
      return "avx2";
    case CpuTier::kAvx512:
      return "avx512";
    case CpuTier::kAvx512Bf16:
      return "avx512_bf16";
    case CpuTier::kAmx:
      return "amx";
    default:
      return "baseline";
  }
}

CpuTier host_tier() { return host().tier; }

CpuTier cpu_tier() {
  const std::optional<CpuTier> c = cap();
  const CpuTier h = host_tier();
  return c && static_cast<int>(*c) < static_cast<int>(h) ? *c : h;
}

bool cpu_has_avx2() { return at_least(CpuTier::kAvx2); }
bool cpu_has_avx512() { return at_least(CpuTier::kAvx512); }
bool cpu_has_vnni() { return host().vnni && at_least(CpuTier::kAvx512); }
bool cpu_has_avx512_bf16() { return at_least(CpuTier::kAvx512Bf16); }
bool cpu_has_amx_int8() { return host().amx_int8 && at_least(CpuTier::kAmx); }
bool cpu_has_amx_bf16() { return host().amx_bf16 && at_least(CpuTier::kAmx); }

bool cpu_native_gemm(at::ScalarType dtype, int64_t macs) {
  if (dtype == at::kFloat || dtype == at::kDouble) return true;
  return dtype == at::kBFloat16 && macs >= kNativeBf16MinMacs && cpu_has_avx512_bf16();
}

namespace {
std::atomic<uint32_t> noted{0};
}  // namespace

const char* kernel_name(CpuKernel k) {
  static constexpr const char* kNames[] = {
      "native",           "upcast",      "int8_amx",   "int8_vnni",     "int8_avx2",
      "int8_avx2_packed", "int8_int_mm", "int8_float", "fp8_float",     "weight_avx512",
      "weight_bf16_dot",  "weight_avx2", "weight_amx", "weight_dequant"};
  static_assert(std::size(kNames) == static_cast<size_t>(CpuKernel::kCount));
  return kNames[static_cast<int>(k)];
}

void note_kernel(CpuKernel k) {
  noted.fetch_or(uint32_t{1} << static_cast<int>(k), std::memory_order_relaxed);
}

std::vector<std::string> take_noted_kernels() {
  const uint32_t bits = noted.exchange(0);
  std::vector<std::string> names;
  for (int k = 0; k < static_cast<int>(CpuKernel::kCount); ++k) {
    if ((bits >> k) & 1u) names.emplace_back(kernel_name(static_cast<CpuKernel>(k)));
  }
  return names;
}

std::vector<std::pair<std::string, std::string>> cpu_policy() {
  const bool avx2 = cpu_has_avx2(), avx512 = cpu_has_avx512();
  std::string fp32_blocks = "fp32 GEMM on blocks converted in cache (ATen's fp32 GEMM)";
  if (avx2) {  // int8_weight.h's few-rows kernels take 16-bit weights too
    fp32_blocks =
        "up to 32 rows: AVX2 fp32 FMA on the weight widened in registers; above: " + fp32_blocks;
  }
  std::string int8, weight;
  if (cpu_has_amx_int8()) {
    int8 = "AMX int8 tiles";
  } else if (cpu_has_vnni()) {
    int8 = "AVX512-VNNI int8 from 9 rows, torch._int_mm below";
  } else if (avx2) {
    int8 = "AVX2 int16 pairs (vpmaddwd), exact int32 sums";
  } else {
    int8 = "torch._int_mm (reference kernel: no AVX2)";
  }
  const std::string decode = avx512 ? "AVX-512" : avx2 ? "AVX2" : "none";
  weight = std::string("up to 32 rows: ") + decode + " fp32 FMA on the weight widened in registers";
  weight += cpu_has_amx_bf16() ? "; bf16 x from 5 rows: AMX bf16 tiles"
                               : "; above: the weight dequantised once, then the float GEMM";
  return {
      {"host", tier_name(host_tier())},
      {"tier", tier_name(cpu_tier())},
      {"float32", "ATen fp32 GEMM"},
      {"float64", "ATen fp64 GEMM"},
      {"bfloat16",
       cpu_native_gemm(at::kBFloat16)
           ? "ATen bf16 GEMM (oneDNN, native bf16); below 2^20 multiply-adds, " + fp32_blocks
           : fp32_blocks},
      {"float16", fp32_blocks},
      {"int8", int8},
      {"float8_e4m3fn", "fp32 GEMM on blocks converted in cache (e4m3 products are exact)"},
      {"weight_int8", weight},
  };
}

namespace {

std::vector<std::string> policy_op() {
  std::vector<std::string> flat;
  for (auto& [name, value] : cpu_policy()) {
    flat.push_back(name);
    flat.push_back(value);
  }
  return flat;
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CatchAll, m) { m.impl("_cpu_policy", &policy_op); }

}  // namespace gmm_allreduce
