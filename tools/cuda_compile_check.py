"""Compiles (without linking) every source of the CUDA build on a host without a GPU or a CUDA
torch: the .cu files with nvcc for each arch of TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), the
.cpp files with the host compiler, both with the flags torch's CUDAExtension uses and the ATen/c10
headers of the installed (CPU) torch wheel. Linking needs a CUDA torch, so a GPU host's
`pip install` remains the full check; this one catches what does not compile.

    python tools/cuda_compile_check.py            # exit 0 when every source compiled
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def gencodes(arch_list: str) -> list[str]:
    flags = []
    for arch in arch_list.replace(",", ";").split(";"):
        num = arch.strip().replace(".", "")
        if num:
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def main() -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_compile_check: no nvcc found (set CUDA_HOME)", file=sys.stderr)
        return 2
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{os.path.join(cuda_home, 'include')}", f"-I{sysconfig.get_paths()['include']}"]
    defines = ["-DGMM_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               # The CPU wheel lacks c10's generated cuda_cmake_macros.h, whose one line this is.
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DC10_CUDA_BUILD_SHARED_LIBS"]
    std = "-std=" + os.environ.get("CXX_STD", "c++20")  # as torch 2.13 builds extensions
    archs = gencodes(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a"))
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                     glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not sources:
        print("cuda_compile_check: no sources under csrc/cuda", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as out:
        def command(src: str) -> list[str]:
            obj = os.path.join(out, os.path.basename(src) + ".o")
            if src.endswith(".cu"):
                return [nvcc, "-c", src, "-o", obj, std, "-O3", "-Xcompiler", "-fPIC",
                        *cpp_extension.COMMON_NVCC_FLAGS, *archs, *includes, *defines]
            cxx = os.environ.get("CXX", "c++")
            return [cxx, "-c", src, "-o", obj, std, "-O3", "-fPIC", "-Wall", "-Werror",
                    "-Wno-unused-parameter", *includes, *defines]

        def run(src: str):
            proc = subprocess.run(command(src), capture_output=True, text=True)
            return src, proc.returncode, proc.stdout + proc.stderr

        failed = 0
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for src, rc, log in pool.map(run, sources):
                rel = os.path.relpath(src, ROOT)
                print(f"{'ok  ' if rc == 0 else 'FAIL'} {rel}")
                if rc != 0 or log.strip():
                    print(log)
                failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
