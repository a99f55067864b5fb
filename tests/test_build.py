"""What the extension registers, whichever torch it was built against."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmm_allreduce  # noqa: F401  (loads the extension)
from gmm_allreduce import _C, _testing

OPS = ["grouped_mat_mul_all_reduce", "grouped_mat_mul_reduce_scatter", "grouped_mat_mul"]


@pytest.mark.parametrize("op", OPS)
def test_every_device_has_a_kernel(op):
    """The ATen engine serves the CPU (and any device with ATen matmuls)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gmm_allreduce::{op}",
                                                          "CompositeExplicitAutograd")


@pytest.mark.skipif(torch.version.cuda is None, reason="a torch without CUDA builds no CUDA engine")
@pytest.mark.parametrize("op", OPS)
def test_a_cuda_torch_gets_the_cuda_engine(op):
    """Built against a CUDA torch, on a host with or without a GPU: the CUDA engine registered."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gmm_allreduce::{op}", "CUDA")


TEST_OPS = ["_gemm_blocks_reference", "_tiled_reference", "_row_ends_reference", "_bias_reference",
            "_gemm_choice", "_plan_signature", "_shared_memory", "_shm_stats",
            "_collectives_at_world_size_1", "_shm_peer_check_spins", "_amx_takes",
            "_amx_mm"]


def test_test_ops_stay_out_of_the_product():
    """The test-only ops are registered by gmm_allreduce._testing (loaded here, by conftest), never
    by _C: a user's `import gmm_allreduce` has none of them."""
    for op in TEST_OPS:
        assert hasattr(torch.ops.gmm_allreduce, op), op  # the check below can fail
        name = f"{op}(".encode()  # the schema string of a library that defines it
        assert name not in Path(_C.__file__).read_bytes(), op
        assert name in Path(_testing.__file__).read_bytes(), op
    code = ("import torch, gmm_allreduce; "
            f"print([op for op in {TEST_OPS!r} if hasattr(torch.ops.gmm_allreduce, op)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    assert out.stdout.strip() == "[]", out.stdout
