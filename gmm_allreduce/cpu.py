"""The CPU engine's policy: what this host computes natively, and the kernel each dtype takes.

The engine decides per host (and per call, under the ``GMM_CPU_ISA`` cap) from the tiers
``avx2`` < ``avx512`` < ``avx512_bf16`` < ``amx``; a 16-bit or int8 product never runs on
ATen's reference kernels. ``GMM_CPU_ISA`` caps the tier for tests and benchmarks of the lower
tiers on any host (a cap above the host's tier leaves the host's; any other value is an error).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)

TIERS = ("avx2", "avx512", "avx512_bf16", "amx")


def cpu_capabilities() -> dict[str, str]:
    """{"host": the host's tier, "tier": the tier in use (GMM_CPU_ISA applied), then for each of
    float32, float64, bfloat16, float16, int8, float8_e4m3fn and weight_int8 the kernel that
    serves it}. Raises ValueError naming GMM_CPU_ISA for a value it does not know."""
    flat = torch.ops.gmm_allreduce._cpu_policy()
    return dict(zip(flat[::2], flat[1::2]))


# What the libraries under the op read to cap their own CPU kernels, per tier: oneDNN (ATen's bf16
# GEMM and more), MKL (ATen's fp32 GEMM) and ATen's own vectorised loops. Set before torch is
# imported, with GMM_CPU_ISA, they make a host run a lower tier's code throughout: under avx2,
# torch.ops.mkldnn._is_mkldnn_bf16_supported() is False and a bf16 torch.mm takes ATen's reference
# GEMM, as on a host with AVX2 alone.
_LIBRARY_CAPS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ATEN_CPU_CAPABILITY": "avx512"},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "amx": {},
}


def emulation_env(tier: str) -> dict[str, str]:
    """The environment that runs `tier` on a host of that tier or above: GMM_CPU_ISA and the
    libraries' own caps. For processes started after it is set (torch reads them at import)."""
    if tier not in _LIBRARY_CAPS:
        raise ValueError(f"tier: expected one of {', '.join(TIERS)}, got {tier!r}")
    return {"GMM_CPU_ISA": tier, **_LIBRARY_CAPS[tier]}


def cpu_description() -> str:
    """The CPU's model name and the flags that set its tier, e.g. 'AMD EPYC (avx2 fma f16c
    avx512f avx512_bf16 avx512_vnni)'."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    import platform

    return f"{model or platform.processor() or platform.machine()} " \
           f"({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"
