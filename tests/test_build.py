"""What the extension registers, whichever torch it was built against."""

import pytest
import torch

import gmm_allreduce  # noqa: F401  (loads the extension)

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
