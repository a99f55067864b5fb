"""The CUDA sources compile (sm_80 and sm_90a, no link) on a host with nvcc, GPU or not: the
check of the CUDA build that CI can make. Skipped where there is no nvcc."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_compile_check import find_nvcc  # noqa: E402


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (CUDA_HOME or PATH)")
def test_cuda_sources_compile():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_compile_check.py")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok   csrc/cuda/kernels.cu" in out.stdout and "ok   csrc/cuda/engine.cpp" in out.stdout
