"""Builds gmm_allreduce._C: the C++ op (csrc/), plus csrc/cuda/ when torch has CUDA or FORCE_CUDA=1."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


cxx_flags = ["-O3"]
cpp_sources = sources("csrc/*.cpp") + sources("csrc/aten/*.cpp")
cuda_sources = sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
# Decided from how torch was built, never by querying a GPU: a GPU-less host builds the CUDA
# extension with FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST.
use_cuda = bool(cuda_sources) and (torch.version.cuda is not None or os.environ.get("FORCE_CUDA") == "1")

if use_cuda:
    # sm_80 and sm_90a unless the builder says otherwise (our kernels are generic; the grouped GEMM
    # we call is torch's own).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ext = CUDAExtension(
        "gmm_allreduce._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        define_macros=[("GMM_WITH_CUDA", "1")],
    )
else:
    ext = CppExtension("gmm_allreduce._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
