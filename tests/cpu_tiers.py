"""The CPU tiers this host supports, for the tests that run under each GMM_CPU_ISA cap (the `tier`
fixture, in conftest.py), and which CPU kernels a call ran."""

import os

import torch

import gmm_allreduce
from gmm_allreduce.cpu import TIERS


def _host() -> str:
    saved = os.environ.pop("GMM_CPU_ISA", None)
    try:
        return gmm_allreduce.cpu_capabilities()["host"]
    finally:
        if saved is not None:
            os.environ["GMM_CPU_ISA"] = saved


HOST = _host()
HERE = TIERS[: TIERS.index(HOST) + 1] if HOST in TIERS else ()


def _flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


VNNI = "avx512_vnni" in _flags()


def at_least(tier: str, floor: str) -> bool:
    return TIERS.index(tier) >= TIERS.index(floor)


def taken(fn) -> set:
    """The CPU kernels `fn` ran."""
    torch.ops.gmm_allreduce._cpu_kernels_taken()
    fn()
    return set(torch.ops.gmm_allreduce._cpu_kernels_taken())
