"""The raw GEMM blocks the CUDA tiled kernel reads (csrc/blocks.cpp), checked on the CPU: the
test-only op _gemm_blocks_reference computes the flat buffer from them by the kernel's formula,
chunk by chunk, and must equal the float64 reference, every element written. So the blocks'
pointers, strides and chunk cuts are verified without a GPU; the kernel itself is not."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cuda import tiled_cases
from test_fuzz import EXAMPLES, RANDOM_SEED, cases
from test_semantics import DTYPES, SHAPES, cases_for

import gmm_allreduce  # noqa: F401  (registers the ops)
from gmm_allreduce.cases import TOLERANCE, Case, call_kwargs, make_inputs
from gmm_allreduce.reference import reference

_REF = torch.ops.gmm_allreduce._gemm_blocks_reference


def blocks_flat(case: Case, world: int = 1) -> torch.Tensor:
    inputs = make_inputs(case, 0, world)
    kw = call_kwargs(case, inputs, collective=False)
    gl = kw["group_list"]
    return _REF(inputs["x"], inputs["weight"], kw["bias"],
                gl if isinstance(gl, list) else None, gl if isinstance(gl, torch.Tensor) else None,
                case.split_item, case.group_list_type, world, case.comm_turn)


def expected_flat(case: Case, world: int) -> torch.Tensor:
    """Rank 0's part of the op (its bias divided by world) in float64, as the flat buffer."""
    inputs = make_inputs(case, 0, world)
    if inputs["bias"] is not None:
        inputs["bias"] = [b.double() / world for b in inputs["bias"]]
    refs = reference([inputs], case.split_item, case.group_list_type)
    return torch.cat([r.flatten() for r in refs])


def all_cases() -> list[Case]:
    out = [c for s in SHAPES for d in DTYPES for c in cases_for(s, d, True)]
    out += [dataclasses.replace(c, comm_turn=t, name=f"{c.name}-turn{t}")
            for c in cases_for(0, "bf16", True) + cases_for(3, "fp16", True) for t in (1, 3, 1000)]
    out += [dataclasses.replace(c, layout="strided", name=f"{c.name}-strided")
            for c in cases_for(0, "fp32", True) + cases_for(1, "bf16", True)]
    return out + tiled_cases()


@pytest.mark.parametrize("world", [1, 3])
def test_blocks_compute_the_reference(world):
    for case in all_cases():
        got = blocks_flat(case, world)
        assert not got.isnan().any(), f"{case.name}: an element no block wrote"
        want = expected_flat(case, world)
        assert got.shape == want.shape, case.name
        if case.integers:  # small integers, and biases that divide by world: exact
            torch.testing.assert_close(got.double(), want, atol=0, rtol=0, msg=case.name)
        else:
            atol, rtol = TOLERANCE[case.dtype]
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                       msg=lambda m, c=case: f"{c.name}: {m}")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM_SEED, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), world=st.integers(1, 4))
def test_random_blocks_compute_the_reference(case, world):
    """The property-based calls of test_fuzz (lead dims, strided layouts, chunks, empty groups,
    K = 0, every dtype and group_list spelling), through the blocks."""
    got = blocks_flat(case, world)
    assert not got.isnan().any(), "an element no block wrote"
    want = expected_flat(case, world)
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
