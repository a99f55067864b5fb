"""Builds gmm_allreduce._C: the C++ op (csrc/), plus csrc/cuda/ when torch has CUDA or FORCE_CUDA=1;
and, for the tests only, gmm_allreduce._testing (csrc/testing/) when GMM_TESTING=1.

Environment (switches take 1/true/on/yes or 0/false/off/no; anything else is an error):
  CUDA_HOME              the CUDA toolkit (found from nvcc when unset; see cuda_home below)
  TORCH_CUDA_ARCH_LIST   the GPU archs (the visible GPUs' when unset, else DEFAULT_ARCHS)
  FORCE_CUDA=1           build csrc/cuda/ even where torch reports no CUDA
  GMM_TESTING=1          also build the test-only ops (the Makefile's builds do; a user's does not)
  GMM_SANITIZE=LIST      a checked build: -fsanitize=LIST (e.g. undefined, or address,undefined),
                         -fno-sanitize-recover=all and libstdc++ assertions (make sanitize)
"""

import glob
import os
import shutil

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The archs built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: every arch CUDA 12/13
# and our kernels support (the tiled kernel runs on sm_80+), and PTX of the newest, which the driver
# compiles for GPUs newer still. Generic code only: an "a" arch would run on that one GPU family.
DEFAULT_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"


def flag(name: str) -> bool:
    """A switch from the environment: unset or empty is off; a value not understood, an error."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    raise SystemExit(f"{name}: expected 1/true/on/yes or 0/false/off/no, got {os.environ[name]!r}")


def sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns
                  for p in glob.glob(os.path.join(ROOT, pat), recursive=True))


def cuda_home():
    """The CUDA toolkit: the first of CUDA_HOME / CUDA_PATH, the toolkit of the nvcc on PATH, and
    /usr/local/cuda(-*) that holds both bin/nvcc and include/cuda_runtime.h. torch guesses
    dirname(dirname(nvcc)) alone, which is wrong where the nvcc on PATH is a wrapper or a link
    outside its toolkit (then it fails on cuda_runtime.h)."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, nvcc and os.path.realpath(nvcc)) if p]
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if all(os.path.exists(os.path.join(home, f)) for f in ("bin/nvcc", "include/cuda_runtime.h")):
            return home
    return None


cuda_sources = sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu")
# Decided from how torch was built, never by querying a GPU: a GPU-less host builds the CUDA
# extension (FORCE_CUDA=1 where its torch has no CUDA).
use_cuda = bool(cuda_sources) and (torch.version.cuda is not None or flag("FORCE_CUDA"))
if use_cuda:
    home = cuda_home()
    if home is None:
        raise RuntimeError("gmm_allreduce: building the CUDA engine needs the CUDA toolkit (nvcc and its "
                           "headers): set CUDA_HOME to it, or install a torch without CUDA")
    os.environ["CUDA_HOME"] = home  # read when torch.utils.cpp_extension is imported
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The language standard, explicitly, for g++ and nvcc alike: torch's extension builder adds one only
# when none is given, C++17 in torch 2.11 and C++20 in 2.13, and our code is C++20 (designated
# initialisers, requires-clauses).
CXX_STD = "-std=c++20"
# No debug info (Python's own CFLAGS ask for -g): with torch's templates it triples the compile
# time and the objects' size. A sanitizer build keeps line tables, for its reports.
cxx_flags, link_flags = ["-O3", "-g0"], []
sanitize = os.environ.get("GMM_SANITIZE")
if sanitize:
    checked = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cxx_flags = ["-O1", "-g1", "-D_GLIBCXX_ASSERTIONS", *checked]
    link_flags = checked
# OpenMP: ATen's parallel_for is a header template whose `#pragma omp parallel` is compiled into
# our code; without -fopenmp every one of our parallel loops runs on one thread. Not linked: the
# OpenMP calls bind at load time to the runtime torch itself loads, so that torch.set_num_threads
# governs both.
cxx_flags += [CXX_STD, "-fopenmp"]

# Every folder's C++ but the CUDA engine's own files (csrc/cuda/, CUDA builds only; its host-side
# planning in csrc/cuda/host/ is device-free and built everywhere, for the CPU twin tests) and the
# test-only ops (csrc/testing/). Includes are written from csrc/ ("core/plan.h").
cpp_files = [p for p in sources("csrc/**/*.cpp")
             if os.path.dirname(p) != os.path.join("csrc", "cuda")
             and not p.startswith(os.path.join("csrc", "testing", ""))]
include_dirs = [os.path.join(ROOT, "csrc")]


def unity(files: list[str]) -> list[str]:
    """The sources compiled: one translation unit per folder (comm/shm with comm), each including
    that folder's files. Torch's headers are most of a file's compile time; so they are parsed once
    per folder rather than once per file (a clean build takes about half the time). The units are
    written to build/unity/, rewritten only when their list changes."""
    folders: dict[str, list[str]] = {}
    for f in files:
        folder = os.path.dirname(f).replace(os.sep + "shm", "")
        folders.setdefault(folder, []).append(f)
    out_dir = os.path.join(ROOT, "build", "unity")
    os.makedirs(out_dir, exist_ok=True)
    units = []
    for folder, members in sorted(folders.items()):
        unit = os.path.join(out_dir, folder.replace(os.sep, "_") + ".cpp")
        text = "".join(f'#include "{os.path.join(ROOT, f)}"\n' for f in members)
        if not os.path.exists(unit) or open(unit).read() != text:
            with open(unit, "w") as fh:
                fh.write(text)
        units.append(os.path.relpath(unit, ROOT))
    return units


cpp_sources = unity(cpp_files)
if use_cuda:
    ext = CUDAExtension(
        "gmm_allreduce._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", CXX_STD]},
        extra_link_args=link_flags,
        include_dirs=include_dirs,
        define_macros=[("GMM_WITH_CUDA", "1")],
    )
else:
    ext = CppExtension("gmm_allreduce._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=link_flags, include_dirs=include_dirs)

exts = [ext]
if flag("GMM_TESTING"):
    # Its undefined symbols are _C's, found at import once _C is loaded globally (tests/conftest.py).
    exts.append(CppExtension("gmm_allreduce._testing", unity(sources("csrc/testing/*.cpp")),
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
                             include_dirs=include_dirs))

setup(ext_modules=exts, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
